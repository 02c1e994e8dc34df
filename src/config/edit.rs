//! Text-level edits of `modelgate.toml` made by the CLI.
//!
//! Owns the initial file `modelgate init` writes, the `[[peer]]` / `[[upstream]]` additions
//! and removals of `modelgate peer add/remove` and `modelgate upstream add/remove`, and the
//! `[[model]]` settings of `modelgate model set/remove`. Edits go
//! through `toml_edit` so the operator's comments, key order and formatting survive; these
//! functions only transform text. Never writes files and never decides validity: callers
//! validate the result with [`super::Config::from_toml_str`] before writing it with
//! [`crate::fsutil::write_atomic`].

use toml_edit::{value, Array, ArrayOfTables, DocumentMut, Item, Table, Value};

/// Why an edit could not be applied to the text.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("line {line}: not valid TOML ({message}); fix: correct the file by hand first")]
    Syntax { line: usize, message: String },
    #[error("`peer` is not a list of [[peer]] tables; fix: write each peer as a [[peer]] table")]
    PeerNotTables,
    #[error("no peer named {0:?}; fix: see `modelgate peer list`")]
    NoSuchPeer(String),
    #[error("`upstream` is not a list of [[upstream]] tables; fix: write each upstream as an [[upstream]] table")]
    UpstreamNotTables,
    #[error("no upstream named {0:?}; fix: see `modelgate upstream list`")]
    NoSuchUpstream(String),
    #[error("`model` is not a list of [[model]] tables; fix: write each model's settings as a [[model]] table")]
    ModelNotTables,
    #[error("no [[model]] table for {0:?}; fix: see `modelgate model list`")]
    NoSuchModel(String),
}

fn parse(text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| EditError::Syntax {
        line: e.span().map_or(0, |s| {
            text.get(..s.start).unwrap_or(text).matches('\n').count() + 1
        }),
        message: e.message().trim().replace('\n', " "),
    })
}

/// A TOML string literal for `s` (quoted and escaped as needed).
fn lit(s: &str) -> String {
    Value::from(s).to_string()
}

/// Sets `[store]` to the PostgreSQL store at `url` (replacing any `[store]` table), for
/// `init --store-url` and `store migrate`. Paths are written as given.
pub fn set_store(
    text: &str,
    url: &str,
    password_file: Option<&str>,
    ca_file: Option<&str>,
) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let mut t = Table::new();
    t.decor_mut()
        .set_prefix("\n# The shared store (keys, usage) of every appliance: see README \"HA\".\n");
    t.insert("url", value(url));
    if let Some(p) = password_file {
        t.insert("password_file", value(p));
    }
    if let Some(p) = ca_file {
        t.insert("ca_file", value(p));
    }
    doc.insert("store", Item::Table(t));
    Ok(doc.to_string())
}

/// The `[[peer]]` table `peer add` appends.
#[derive(Debug, Clone)]
pub struct NewPeer {
    pub name: String,
    pub public_key: String,
    pub tunnel_address: String,
    /// Networks behind the peer, as CIDR strings.
    pub allowed_ips: Vec<String>,
    pub keepalive: Option<u16>,
}

/// Appends `peer` as a new `[[peer]]` table after the existing ones, preceded by `comment`
/// (one line, without `#`). Everything else in `text` is kept byte for byte.
pub fn add_peer(text: &str, peer: &NewPeer, comment: &str) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let mut t = Table::new();
    t.insert("name", value(&peer.name));
    t.insert("public_key", value(&peer.public_key));
    t.insert("tunnel_address", value(&peer.tunnel_address));
    t.insert(
        "allowed_ips",
        value(Array::from_iter(
            peer.allowed_ips.iter().map(String::as_str),
        )),
    );
    if let Some(k) = peer.keepalive {
        t.insert("keepalive", value(i64::from(k)));
    }
    append_table(&mut doc, "peer", t, comment).ok_or(EditError::PeerNotTables)?;
    Ok(doc.to_string())
}

/// Removes the `[[peer]]` table named `name` (with the comment lines directly above it).
pub fn remove_peer(text: &str, name: &str) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    match remove_named(&mut doc, "peer", name) {
        Some(true) => Ok(doc.to_string()),
        Some(false) => Err(EditError::NoSuchPeer(name.to_string())),
        None => Err(EditError::PeerNotTables),
    }
}

/// Appends `t`, preceded by the one-line `comment`, to the array of tables `key` (created at the
/// end of the document when absent). `None` when `key` exists but is not an array of tables.
fn append_table(doc: &mut DocumentMut, key: &str, mut t: Table, comment: &str) -> Option<()> {
    let list = doc
        .entry(key)
        .or_insert(Item::ArrayOfTables(ArrayOfTables::new()))
        .as_array_of_tables_mut()?;
    t.decor_mut().set_prefix(format!("\n# {comment}\n"));
    list.push(t);
    Some(())
}

/// Removes the table whose `name` is `name` from the array of tables `key` (dropping the key
/// when it becomes empty). `Some(false)` when there is no such table, `None` when `key` is not an
/// array of tables.
fn remove_named(doc: &mut DocumentMut, key: &str, name: &str) -> Option<bool> {
    let list = match doc.get_mut(key) {
        None => return Some(false),
        Some(item) => item.as_array_of_tables_mut()?,
    };
    let Some(idx) = list
        .iter()
        .position(|t| t.get("name").and_then(Item::as_str) == Some(name))
    else {
        return Some(false);
    };
    list.remove(idx);
    if list.is_empty() {
        doc.remove(key);
    }
    Some(true)
}

/// The `[[upstream]]` table `upstream add` appends.
#[derive(Debug, Clone)]
pub struct NewUpstream {
    pub name: String,
    /// As the operator gave it (`http://IP:PORT[/PATH]`).
    pub url: String,
    /// Path written as is (absolute, or relative to the config file's folder).
    pub api_key_file: Option<String>,
    /// `PUBLIC[=UPSTREAM_ID]` entries; empty means "discover" and writes no `models` key.
    pub models: Vec<String>,
    pub max_concurrent: Option<u32>,
}

/// Appends `upstream` as a new `[[upstream]]` table after the existing ones, preceded by
/// `comment` (one line, without `#`). Everything else in `text` is kept byte for byte.
pub fn add_upstream(
    text: &str,
    upstream: &NewUpstream,
    comment: &str,
) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let mut t = Table::new();
    t.insert("name", value(&upstream.name));
    t.insert("url", value(&upstream.url));
    if let Some(f) = &upstream.api_key_file {
        t.insert("api_key_file", value(f));
    }
    if !upstream.models.is_empty() {
        t.insert(
            "models",
            value(Array::from_iter(upstream.models.iter().map(String::as_str))),
        );
    }
    if let Some(n) = upstream.max_concurrent {
        t.insert("max_concurrent", value(i64::from(n)));
    }
    append_table(&mut doc, "upstream", t, comment).ok_or(EditError::UpstreamNotTables)?;
    Ok(doc.to_string())
}

/// Removes the `[[upstream]]` table named `name` (with the comment lines directly above it).
pub fn remove_upstream(text: &str, name: &str) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    match remove_named(&mut doc, "upstream", name) {
        Some(true) => Ok(doc.to_string()),
        Some(false) => Err(EditError::NoSuchUpstream(name.to_string())),
        None => Err(EditError::UpstreamNotTables),
    }
}

/// Sets `balance` in the `[[model]]` table of `name`, appending the table (preceded by the
/// one-line `comment`) when there is none. Everything else in `text` is kept byte for byte.
pub fn set_model(
    text: &str,
    name: &str,
    balance: &str,
    comment: &str,
) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    let existing = match doc.get_mut("model") {
        None => None,
        Some(item) => item
            .as_array_of_tables_mut()
            .ok_or(EditError::ModelNotTables)?
            .iter_mut()
            .find(|t| t.get("name").and_then(Item::as_str) == Some(name)),
    };
    match existing {
        Some(t) => {
            t.insert("balance", value(balance));
        }
        None => {
            let mut t = Table::new();
            t.insert("name", value(name));
            t.insert("balance", value(balance));
            append_table(&mut doc, "model", t, comment).ok_or(EditError::ModelNotTables)?;
        }
    }
    Ok(doc.to_string())
}

/// Removes the `[[model]]` table of `name` (its model goes back to the defaults).
pub fn remove_model(text: &str, name: &str) -> Result<String, EditError> {
    let mut doc = parse(text)?;
    match remove_named(&mut doc, "model", name) {
        Some(true) => Ok(doc.to_string()),
        Some(false) => Err(EditError::NoSuchModel(name.to_string())),
        None => Err(EditError::ModelNotTables),
    }
}

/// TLS choice of `modelgate init`, as it will be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitTls {
    Files {
        cert: String,
        key: String,
    },
    SelfSigned {
        name: String,
    },
    Acme {
        domain: String,
        email: Option<String>,
        directory: Option<String>,
        ca_root: Option<String>,
    },
}

/// Everything `modelgate init` writes into the config.
#[derive(Debug, Clone)]
pub struct InitSettings {
    pub listen: String,
    pub state_dir: String,
    pub control_socket: String,
    pub metrics_listen: String,
    pub tls: InitTls,
    pub wg_listen: String,
    pub public_endpoint: String,
    pub tunnel_address: String,
    /// Shown in a comment so operators can find it without running the CLI.
    pub public_key: String,
    /// RFC 3339 time for the header comment.
    pub generated: String,
}

/// The commented config file `modelgate init` writes.
pub fn render_initial(s: &InitSettings) -> String {
    let tls = tls_table(&s.tls);
    format!(
        r#"# modelgate configuration, written by `modelgate init` at {generated}.
# Every key is documented in config/modelgate.toml of the modelgate sources.
# `modelgate peer add/remove` edit this file and keep your comments. Corp peers are the
# [[peer]] tables at the end; add one (this also prints the corp side's wg-quick file) with
#   modelgate peer add NAME --allowed-ips 10.20.0.0/24 > NAME.conf

[server]
# Public HTTPS listener: the only TCP port the internet needs to reach.
listen = {listen}
# Keys and state live here (mode 0700). Relative paths below resolve against it.
state_dir = {state_dir}
# Local control API used by the CLI (status, reload).
control_socket = {control_socket}
# Prometheus metrics; keep this on loopback.
metrics_listen = {metrics_listen}

[tls]
{tls}
[wireguard]
# UDP address WireGuard listens on; allow this UDP port in the appliance's firewall.
listen = {wg_listen}
# What corp peers put in `Endpoint =`: this appliance's public name or IP and UDP port.
public_endpoint = {public_endpoint}
# The appliance's tunnel address and the tunnel network; `peer add` allocates peers from it.
address = {tunnel_address}
# Private key (relative to state_dir), mode 0600 required.
# The matching public key is {public_key}
private_key_file = "wg.key"
# Tunnel MTU; 1420 is the wg-quick default and fits any 1500-byte path over IPv4 or IPv6.
mtu = 1420
"#,
        generated = s.generated,
        listen = lit(&s.listen),
        state_dir = lit(&s.state_dir),
        control_socket = lit(&s.control_socket),
        metrics_listen = lit(&s.metrics_listen),
        wg_listen = lit(&s.wg_listen),
        public_endpoint = lit(&s.public_endpoint),
        tunnel_address = lit(&s.tunnel_address),
        public_key = s.public_key,
    )
}

/// The body of the `[tls]` table `modelgate init` writes, with a comment on the choice.
fn tls_table(tls: &InitTls) -> String {
    match tls {
        InitTls::Files { cert, key } => format!(
            "mode = \"files\"\n# PEM certificate chain and its key (re-read on reload).\ncert = {}\nkey = {}\n",
            lit(cert),
            lit(key)
        ),
        InitTls::SelfSigned { name } => format!(
            "# A certificate generated at start. Fine for tests and the demo; Cursor's backend will\n\
             # NOT accept it: switch to \"acme\" or \"files\" for real use.\n\
             mode = \"self-signed\"\nself_signed_name = {}\n",
            lit(name)
        ),
        InitTls::Acme {
            domain,
            email,
            directory,
            ca_root,
        } => {
            let mut t = format!(
                "# Publicly trusted certificate via ACME TLS-ALPN-01 on the HTTPS port: {domain}\n\
                 # must resolve to this appliance and port 443 must be reachable from the internet.\n\
                 mode = \"acme\"\nacme_domain = {}\n",
                lit(domain)
            );
            if let Some(e) = email {
                t += &format!("acme_email = {}\n", lit(e));
            }
            if let Some(d) = directory {
                t += &format!("acme_directory = {}\n", lit(d));
            }
            if let Some(c) = ca_root {
                t += &format!("acme_ca_root = {}\n", lit(c));
            }
            t
        }
    }
}
