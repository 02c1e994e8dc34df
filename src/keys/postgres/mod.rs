//! The PostgreSQL backend: the key rows and the usage ledger of several appliances in one
//! shared database (`[store] url = "postgres://…"`).
//!
//! Owns the connection (the password from a 0600 file, TLS through rustls when the URL asks
//! for it, a reconnect when the server went away), the schema and its migrations (under an
//! advisory lock, so two appliances starting at once do not race), and the SQL of
//! [`KeyBackend`] and [`LedgerBackend`]. Never decides a rule (that is [`super::store`]'s and
//! [`super::ledger`]'s) and never sees the server secret: only its fingerprint, which the store
//! records on first use and every later opener must match ([`Backend::check_fingerprint`]).
//!
//! Change stamp: `keys_generation`, bumped by a statement trigger on `keys` (which also sends
//! `NOTIFY modelgate_keys`); usage writes never move it. Usage batches carry an id recorded in
//! `usage_batches` in the same transaction, so a batch retried after a lost answer is applied
//! once. Budget leases (`budget_leases`, [`LedgerBackend::lease_budgets`]) are granted under a
//! per-key advisory lock, so two appliances never hand out the same remaining tokens.

use std::cell::{RefCell, RefMut};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use postgres::{Client, Config as PgClientConfig, NoTls, Row, Transaction};

use super::backend::{to_ms, Backend, KeyBackend, KeyRow, LedgerBackend, NewKeyRow, Rotation};
use super::secret::Minted;
use super::types::{KeyRecord, MinuteRows, StoreError, UsageTotals, DAY_MS, MINUTE_MS};

/// How long connecting may take before the store counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest one statement may run (a stuck server must not stall the watcher for long).
const STATEMENT_TIMEOUT_MS: u32 = 5_000;
/// The channel the keys trigger notifies.
pub const NOTIFY_CHANNEL: &str = "modelgate_keys";

/// `[store]` with `url`: where the shared PostgreSQL store is and how to log in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgStoreConfig {
    /// `postgres://user@host:port/db?sslmode=require` (no password in it).
    pub url: String,
    /// File holding the password, mode 0600 (optional: trust or peer authentication).
    pub password_file: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate (optional; the Mozilla roots
    /// otherwise). Only used when the URL's `sslmode` is `require` (or `prefer`).
    pub ca_file: Option<PathBuf>,
}

impl PgStoreConfig {
    /// The URL without anything secret, for messages.
    pub fn display_url(&self) -> String {
        match url_password_split(&self.url) {
            Some((before, after)) => format!("{before}****{after}"),
            None => self.url.clone(),
        }
    }

    /// Checks the URL (parses, no password in it). `Err((problem, fix))`.
    pub fn check_url(url: &str) -> Result<(), (String, &'static str)> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err((
                "is not a postgres:// URL".into(),
                "write url = \"postgres://USER@HOST:5432/DB?sslmode=require\"",
            ));
        }
        if url_password_split(url).is_some() {
            return Err((
                "contains a password".into(),
                "remove it from the URL and put it in password_file (mode 0600)",
            ));
        }
        PgClientConfig::from_str(url).map_err(|e| {
            (
                format!("does not parse: {e}"),
                "write url = \"postgres://USER@HOST:5432/DB?sslmode=require\"",
            )
        })?;
        Ok(())
    }
}

/// `(before the password, after it)` when the URL's user info has a password.
fn url_password_split(url: &str) -> Option<(&str, &str)> {
    let rest_at = url.find("://")? + 3;
    let rest = &url[rest_at..];
    let at = rest.find('@')?;
    let userinfo = &rest[..at];
    if userinfo.contains('/') {
        return None;
    }
    let colon = userinfo.find(':')?;
    Some((&url[..rest_at + colon + 1], &url[rest_at + at..]))
}

/// Schema migrations; `meta.schema_version` = how many have been applied.
const MIGRATIONS: &[&str] = &[
    // 1: keys, usage, the keys generation and its trigger, usage batch ids.
    "CREATE TABLE keys (
        id                   TEXT PRIMARY KEY,
        name                 TEXT NOT NULL,
        created_at           BIGINT NOT NULL,
        expires_at           BIGINT,
        revoked_at           BIGINT,
        policy               TEXT NOT NULL,
        secret_hash          BYTEA NOT NULL,
        previous_hash        BYTEA,
        previous_valid_until BIGINT,
        rotated_at           BIGINT
    );
    CREATE UNIQUE INDEX keys_active_name ON keys(name) WHERE revoked_at IS NULL;
    CREATE TABLE usage (
        key_id            TEXT NOT NULL,
        bucket_start      BIGINT NOT NULL,
        bucket_ms         BIGINT NOT NULL,
        prompt_tokens     BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        requests          BIGINT NOT NULL,
        estimated         BIGINT NOT NULL,
        PRIMARY KEY (key_id, bucket_start, bucket_ms)
    );
    CREATE INDEX usage_fine ON usage(bucket_ms, bucket_start);
    CREATE TABLE usage_imports (
        source            TEXT NOT NULL,
        key_id            TEXT NOT NULL,
        bucket_start      BIGINT NOT NULL,
        bucket_ms         BIGINT NOT NULL,
        prompt_tokens     BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL,
        requests          BIGINT NOT NULL,
        estimated         BIGINT NOT NULL,
        PRIMARY KEY (source, key_id, bucket_start, bucket_ms)
    );
    CREATE TABLE usage_batches (
        batch_id   TEXT PRIMARY KEY,
        applied_at BIGINT NOT NULL
    );
    CREATE TABLE keys_generation (
        id         INTEGER PRIMARY KEY CHECK (id = 1),
        generation BIGINT NOT NULL
    );
    INSERT INTO keys_generation VALUES (1, 0);
    CREATE FUNCTION modelgate_keys_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE g BIGINT;
    BEGIN
        UPDATE keys_generation SET generation = generation + 1 WHERE id = 1
            RETURNING generation INTO g;
        PERFORM pg_notify('modelgate_keys', g::text);
        RETURN NULL;
    END $$;
    CREATE TRIGGER keys_changed AFTER INSERT OR UPDATE OR DELETE ON keys
        FOR EACH STATEMENT EXECUTE FUNCTION modelgate_keys_changed();",
    // 2: live appliances (heartbeats), which share each key's rate limits.
    "CREATE TABLE appliances (
        id      TEXT PRIMARY KEY,
        seen_at BIGINT NOT NULL
    );",
    // 3: budget leases: what each appliance may spend of a key's day or month budget.
    // held = granted - flushed: its unspent lease plus its spending not yet in `usage`.
    "CREATE TABLE budget_leases (
        key_id       TEXT NOT NULL,
        period_start BIGINT NOT NULL,
        appliance    TEXT NOT NULL,
        granted      BIGINT NOT NULL,
        flushed      BIGINT NOT NULL,
        expires_at   BIGINT NOT NULL,
        PRIMARY KEY (key_id, period_start, appliance)
    );",
];

const UPSERT: &str = "INSERT INTO usage
        (key_id, bucket_start, bucket_ms, prompt_tokens, completion_tokens, requests, estimated)
    VALUES ($1, $2, $3, $4, $5, $6, $7)
    ON CONFLICT (key_id, bucket_start, bucket_ms) DO UPDATE SET
        prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = usage.completion_tokens + excluded.completion_tokens,
        requests = usage.requests + excluded.requests,
        estimated = usage.estimated + excluded.estimated";

const SELECT: &str = "SELECT id, name, created_at, expires_at, revoked_at, rotated_at,
    previous_valid_until, policy, secret_hash, previous_hash FROM keys";

/// One connection to the shared store (reconnected on first use after the server went away).
pub struct PgBackend {
    cfg: PgStoreConfig,
    /// What messages name: the URL without a password.
    location: PathBuf,
    client: RefCell<Option<Client>>,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBackend")
            .field("url", &self.location)
            .finish_non_exhaustive()
    }
}

impl Drop for PgBackend {
    /// The synchronous client shuts its connection down with a `block_on` of its own, which
    /// panics on a thread that drives a tokio runtime (a watcher or ledger task dropping its
    /// store): drop it on a plain thread there.
    fn drop(&mut self) {
        if let Some(client) = self.client.get_mut().take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("pg-close".into())
                    .spawn(move || drop(client));
            } else {
                drop(client);
            }
        }
    }
}

/// A failure inside a transaction: PostgreSQL's or one of the store's own refusals.
enum TxError {
    Pg(postgres::Error),
    Store(StoreError),
}

impl From<postgres::Error> for TxError {
    fn from(e: postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

impl PgBackend {
    /// Connects, checks the schema and brings it up to date.
    pub fn open(cfg: &PgStoreConfig) -> Result<PgBackend, StoreError> {
        let b = PgBackend {
            cfg: cfg.clone(),
            location: PathBuf::from(cfg.display_url()),
            client: RefCell::new(None),
        };
        b.migrate()?;
        Ok(b)
    }

    fn pg_error(&self, source: postgres::Error) -> StoreError {
        StoreError::Postgres {
            url: self.cfg.display_url(),
            source,
        }
    }

    fn map_tx(&self, e: TxError) -> StoreError {
        match e {
            TxError::Pg(e) => self.pg_error(e),
            TxError::Store(e) => e,
        }
    }

    /// The connection, (re)connecting when there is none or the server closed it.
    fn client(&self) -> Result<RefMut<'_, Client>, StoreError> {
        let mut slot = self.client.borrow_mut();
        if slot.as_ref().is_none_or(|c| c.is_closed()) {
            *slot = None;
            *slot = Some(connect(&self.cfg)?);
        }
        Ok(RefMut::map(slot, |c| c.as_mut().expect("connected above")))
    }

    /// Forgets the connection after an error, so the next call reconnects.
    fn reset_on_error<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_err() {
            if let Ok(mut slot) = self.client.try_borrow_mut() {
                if slot.as_ref().is_some_and(|c| c.is_closed()) {
                    *slot = None;
                }
            }
        }
        r
    }

    /// Runs `f` in one transaction (`READ COMMITTED`; key changes lock their rows or the
    /// `keys_generation` row first) and commits it.
    fn write_tx<T>(
        &self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<T, TxError>,
    ) -> Result<T, StoreError> {
        let r = (|| {
            let mut c = self.client()?;
            let run = |c: &mut Client| -> Result<T, TxError> {
                let mut tx = c.transaction()?;
                let v = f(&mut tx)?;
                tx.commit()?;
                Ok(v)
            };
            run(&mut c).map_err(|e| self.map_tx(e))
        })();
        self.reset_on_error(r)
    }

    /// Runs the reads of `f` on the connection.
    fn read<T>(&self, f: impl FnOnce(&mut Client) -> Result<T, TxError>) -> Result<T, StoreError> {
        let r = (|| {
            let mut c = self.client()?;
            f(&mut c).map_err(|e| self.map_tx(e))
        })();
        self.reset_on_error(r)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let latest = MIGRATIONS.len() as i64;
        let location = self.location.clone();
        self.write_tx(|tx| {
            // One migrator at a time across every appliance.
            tx.execute("SELECT pg_advisory_xact_lock(7236478121)", &[])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS modelgate_meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)",
            )?;
            let version: i64 = tx
                .query_opt(
                    "SELECT v FROM modelgate_meta WHERE k = 'schema_version'",
                    &[],
                )?
                .map(|r| r.get::<_, String>(0).parse().unwrap_or(i64::MAX))
                .unwrap_or(0);
            if version > latest {
                return Err(TxError::Store(StoreError::SchemaTooNew {
                    path: location,
                    found: version,
                    supported: latest,
                }));
            }
            for m in MIGRATIONS.iter().skip(version.max(0) as usize) {
                tx.batch_execute(m)?;
            }
            tx.execute(
                "INSERT INTO modelgate_meta VALUES ('schema_version', $1)
                 ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                &[&latest.to_string()],
            )?;
            Ok(())
        })
    }

    /// Copies key rows as they are (same ids, hashes, times), replacing rows with the same id:
    /// what `store migrate` does, so running it again changes nothing. Returns how many.
    pub(crate) fn import_keys(&mut self, rows: &[KeyRow]) -> Result<usize, StoreError> {
        self.write_tx(|tx| {
            tx.execute("SELECT 1 FROM keys_generation WHERE id = 1 FOR UPDATE", &[])?;
            let stmt = tx.prepare(
                "INSERT INTO keys (id, name, created_at, expires_at, revoked_at, rotated_at,
                                   previous_valid_until, policy, secret_hash, previous_hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name,
                    created_at = excluded.created_at, expires_at = excluded.expires_at,
                    revoked_at = excluded.revoked_at, rotated_at = excluded.rotated_at,
                    previous_valid_until = excluded.previous_valid_until,
                    policy = excluded.policy, secret_hash = excluded.secret_hash,
                    previous_hash = excluded.previous_hash",
            )?;
            for r in rows {
                tx.execute(
                    &stmt,
                    &[
                        &r.id,
                        &r.name,
                        &r.created_at,
                        &r.expires_at,
                        &r.revoked_at,
                        &r.rotated_at,
                        &r.previous_valid_until,
                        &r.policy,
                        &r.secret_hash,
                        &r.previous_hash,
                    ],
                )?;
            }
            Ok(rows.len())
        })
    }

    /// Makes the store hold `rows` as what `source` contributed: adds the difference between
    /// `rows` and what the last import from `source` brought (recorded in `usage_imports`), in
    /// one transaction. So importing the same rows again adds nothing, and importing a source
    /// that has grown (or compacted) since adds only the change: usage is never counted twice.
    pub(crate) fn import_usage(
        &mut self,
        source: &str,
        rows: &[crate::keys::sqlite::UsageRow],
    ) -> Result<usize, StoreError> {
        self.write_tx(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock(7236478122)", &[])?;
            tx.batch_execute(
                "CREATE TEMP TABLE incoming (
                    key_id TEXT, bucket_start BIGINT, bucket_ms BIGINT, prompt_tokens BIGINT,
                    completion_tokens BIGINT, requests BIGINT, estimated BIGINT,
                    PRIMARY KEY (key_id, bucket_start, bucket_ms)
                 ) ON COMMIT DROP",
            )?;
            let stmt = tx.prepare("INSERT INTO incoming VALUES ($1, $2, $3, $4, $5, $6, $7)")?;
            for (key, start, ms, t) in rows {
                tx.execute(
                    &stmt,
                    &[
                        key,
                        start,
                        ms,
                        &to_i64(t.prompt_tokens),
                        &to_i64(t.completion_tokens),
                        &to_i64(t.requests),
                        &to_i64(t.estimated),
                    ],
                )?;
            }
            tx.execute(
                "INSERT INTO usage
                    (key_id, bucket_start, bucket_ms, prompt_tokens, completion_tokens, requests,
                     estimated)
                 SELECT COALESCE(i.key_id, m.key_id), COALESCE(i.bucket_start, m.bucket_start),
                        COALESCE(i.bucket_ms, m.bucket_ms),
                        COALESCE(i.prompt_tokens, 0) - COALESCE(m.prompt_tokens, 0),
                        COALESCE(i.completion_tokens, 0) - COALESCE(m.completion_tokens, 0),
                        COALESCE(i.requests, 0) - COALESCE(m.requests, 0),
                        COALESCE(i.estimated, 0) - COALESCE(m.estimated, 0)
                 FROM incoming i
                 FULL JOIN (SELECT * FROM usage_imports WHERE source = $1) m
                   ON i.key_id = m.key_id AND i.bucket_start = m.bucket_start
                  AND i.bucket_ms = m.bucket_ms
                 ON CONFLICT (key_id, bucket_start, bucket_ms) DO UPDATE SET
                    prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = usage.completion_tokens + excluded.completion_tokens,
                    requests = usage.requests + excluded.requests,
                    estimated = usage.estimated + excluded.estimated",
                &[&source],
            )?;
            tx.execute("DELETE FROM usage_imports WHERE source = $1", &[&source])?;
            tx.execute(
                "INSERT INTO usage_imports SELECT $1, * FROM incoming",
                &[&source],
            )?;
            Ok(rows.len())
        })
    }

    /// Whether the batch `batch_id` was applied already (tests and `store migrate`).
    pub fn batch_applied(&self, batch_id: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            Ok(c.query_opt(
                "SELECT 1 FROM usage_batches WHERE batch_id = $1",
                &[&batch_id],
            )?
            .is_some())
        })
    }
}

/// Connects with the password file and, when the URL asks for TLS, rustls.
fn connect(cfg: &PgStoreConfig) -> Result<Client, StoreError> {
    let url = cfg.display_url();
    let bad = |problem: String, fix: String| StoreError::StoreConfig {
        url: url.clone(),
        problem,
        fix,
    };
    let mut pc = PgClientConfig::from_str(&cfg.url).map_err(|e| {
        bad(
            format!("the URL does not parse: {e}"),
            "fix [store] url".into(),
        )
    })?;
    if let Some(pf) = &cfg.password_file {
        pc.password(read_password(pf).map_err(|(p, f)| bad(p, f))?);
    }
    pc.connect_timeout(CONNECT_TIMEOUT);
    pc.keepalives(true);
    pc.keepalives_idle(Duration::from_secs(10));
    pc.application_name("modelgate");
    pc.options(&format!(
        "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c client_min_messages=warning"
    ));
    let result = if pc.get_ssl_mode() == postgres::config::SslMode::Disable {
        pc.connect(NoTls)
    } else {
        let tls = tls_connector(cfg.ca_file.as_deref()).map_err(|(p, f)| bad(p, f))?;
        pc.connect(tls)
    };
    result.map_err(|source| StoreError::Postgres { url, source })
}

/// Reads the password file: it must be 0600 (or stricter) and hold one line.
fn read_password(path: &Path) -> Result<String, (String, String)> {
    let meta = fs::metadata(path).map_err(|e| {
        (
            format!("cannot read password_file {}: {e}", path.display()),
            "create it with the password on one line, mode 0600".into(),
        )
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err((
            format!(
                "password_file {} has mode {mode:04o}: other users can read it",
                path.display()
            ),
            format!("chmod 600 {}", path.display()),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| {
        (
            format!("cannot read password_file {}: {e}", path.display()),
            "check the file's owner and mode".into(),
        )
    })?;
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}

fn tls_connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, (String, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(p) => {
            let pem = fs::read(p).map_err(|e| {
                (
                    format!("cannot read ca_file {}: {e}", p.display()),
                    "point ca_file at the PEM of the CA that signed the server's certificate"
                        .into(),
                )
            })?;
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| {
                    (
                        format!("ca_file {}: {e}", p.display()),
                        "it must hold PEM certificates".into(),
                    )
                })?;
                roots.add(c).map_err(|e| {
                    (
                        format!("ca_file {}: {e}", p.display()),
                        "it must hold CA certificates".into(),
                    )
                })?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| (format!("TLS setup: {e}"), "report this bug".into()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl Backend for PgBackend {
    fn location(&self) -> &Path {
        &self.location
    }

    fn change_stamp(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            Ok(
                c.query_one("SELECT generation FROM keys_generation WHERE id = 1", &[])?
                    .get(0),
            )
        })
    }

    fn check_fingerprint(&mut self, fingerprint: &str) -> Result<(), StoreError> {
        let url = self.cfg.display_url();
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO modelgate_meta VALUES ('secret_fingerprint', $1)
                 ON CONFLICT (k) DO NOTHING",
                &[&fingerprint],
            )?;
            let stored: String = tx
                .query_one(
                    "SELECT v FROM modelgate_meta WHERE k = 'secret_fingerprint'",
                    &[],
                )?
                .get(0);
            if stored != fingerprint {
                return Err(TxError::Store(StoreError::SecretMismatch { url }));
            }
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn heartbeat(&mut self, id: &str, now_ms: i64, window_ms: i64) -> Result<u32, StoreError> {
        self.write_tx(|tx| {
            tx.execute(
                "INSERT INTO appliances VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
                &[&id, &now_ms],
            )?;
            let n: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM appliances WHERE seen_at > $1",
                    &[&(now_ms - window_ms)],
                )?
                .get(0);
            Ok(u32::try_from(n.max(1)).unwrap_or(u32::MAX))
        })
    }
}

fn read_row(r: &Row) -> KeyRow {
    KeyRow {
        id: r.get(0),
        name: r.get(1),
        created_at: r.get(2),
        expires_at: r.get(3),
        revoked_at: r.get(4),
        rotated_at: r.get(5),
        previous_valid_until: r.get(6),
        policy: r.get(7),
        secret_hash: r.get(8),
        previous_hash: r.get(9),
    }
}

/// The id of the non-revoked key named `name`, else of the non-revoked key with id `name`,
/// locked for the rest of the transaction.
fn active_id(tx: &mut Transaction<'_>, name: &str) -> Result<String, TxError> {
    // Serialise key changes across appliances: the generation row is every writer's first lock.
    tx.execute("SELECT 1 FROM keys_generation WHERE id = 1 FOR UPDATE", &[])?;
    if let Some(r) = tx.query_opt(
        "SELECT id FROM keys WHERE (name = $1 OR id = $1) AND revoked_at IS NULL
         ORDER BY (name = $1) DESC LIMIT 1",
        &[&name],
    )? {
        return Ok(r.get(0));
    }
    let revoked = tx
        .query_opt(
            "SELECT 1 FROM keys WHERE name = $1 OR id = $1 LIMIT 1",
            &[&name],
        )?
        .is_some();
    Err(if revoked {
        StoreError::Revoked(name.to_string())
    } else {
        StoreError::NotFound(name.to_string())
    }
    .into())
}

impl KeyBackend for PgBackend {
    fn insert_key(
        &mut self,
        row: &NewKeyRow<'_>,
        mint: &mut dyn FnMut() -> Minted,
    ) -> Result<Minted, StoreError> {
        self.write_tx(|tx| {
            tx.execute("SELECT 1 FROM keys_generation WHERE id = 1 FOR UPDATE", &[])?;
            let exists = tx
                .query_opt(
                    "SELECT 1 FROM keys WHERE name = $1 AND revoked_at IS NULL",
                    &[&row.name],
                )?
                .is_some();
            if exists {
                return Err(StoreError::NameExists(row.name.to_string()).into());
            }
            let minted = loop {
                let m = mint();
                if tx
                    .query_opt("SELECT 1 FROM keys WHERE id = $1", &[&m.id()])?
                    .is_none()
                {
                    break m;
                }
            };
            tx.execute(
                "INSERT INTO keys (id, name, created_at, expires_at, policy, secret_hash)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &minted.id(),
                    &row.name,
                    &to_ms(row.created_at),
                    &row.expires_at.map(to_ms),
                    &row.policy_json,
                    &&minted.hash()[..],
                ],
            )?;
            Ok(minted)
        })
    }

    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        let rows = self.read(|c| {
            Ok(
                c.query(&format!("{SELECT} ORDER BY created_at, name, id"), &[])?
                    .iter()
                    .map(read_row)
                    .collect::<Vec<_>>(),
            )
        })?;
        rows.into_iter()
            .map(|r| r.into_record(&self.location))
            .collect()
    }

    fn find_key(&self, name_or_id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = self.read(|c| {
            Ok(c.query_opt(
                &format!(
                    "{SELECT} WHERE name = $1 OR id = $1
                     ORDER BY (name = $1) DESC, (revoked_at IS NULL) DESC,
                              revoked_at DESC NULLS LAST LIMIT 1"
                ),
                &[&name_or_id],
            )?
            .as_ref()
            .map(read_row))
        })?;
        row.map(|r| r.into_record(&self.location)).transpose()
    }

    fn revoke_key(&mut self, name_or_id: &str, at: SystemTime) -> Result<KeyRecord, StoreError> {
        let row = self.write_tx(|tx| {
            let id = active_id(tx, name_or_id)?;
            tx.execute(
                // Later than every earlier revocation of a key of the same name, even within
                // one millisecond: `find_key` shows the most recently revoked one.
                "UPDATE keys SET revoked_at = GREATEST($2, COALESCE(
                     (SELECT MAX(k.revoked_at) + 1 FROM keys k WHERE k.name = keys.name), 0)),
                   previous_hash = NULL, previous_valid_until = NULL
                 WHERE id = $1",
                &[&id, &to_ms(at)],
            )?;
            Ok(read_row(
                &tx.query_one(&format!("{SELECT} WHERE id = $1"), &[&id])?,
            ))
        })?;
        row.into_record(&self.location)
    }

    fn rotate_key(
        &mut self,
        name_or_id: &str,
        at: SystemTime,
        decide: &mut dyn FnMut(&KeyRecord) -> Result<Rotation, StoreError>,
    ) -> Result<KeyRecord, StoreError> {
        let location = self.location.clone();
        self.write_tx(|tx| {
            let id = active_id(tx, name_or_id)?;
            let rec = read_row(&tx.query_one(&format!("{SELECT} WHERE id = $1"), &[&id])?)
                .into_record(&location)?;
            let r = decide(&rec)?;
            let previous_hash = r.previous.as_ref().map(|(h, _)| h.to_vec());
            tx.execute(
                "UPDATE keys SET secret_hash = $2, previous_hash = $3, previous_valid_until = $4,
                                 rotated_at = $5
                 WHERE id = $1",
                &[
                    &rec.id,
                    &&r.hash[..],
                    &previous_hash,
                    &r.previous.map(|(_, until)| to_ms(until)),
                    &to_ms(at),
                ],
            )?;
            Ok(rec)
        })
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count(r: &Row, i: usize) -> u64 {
    r.get::<_, i64>(i).max(0) as u64
}

/// Writes `rows` in `tx` unless the batch `batch_id` was applied before; `true` when written.
fn apply_batch(
    tx: &mut Transaction<'_>,
    batch_id: Option<&str>,
    rows: &MinuteRows,
) -> Result<bool, TxError> {
    if let Some(id) = batch_id {
        let fresh = tx.execute(
            "INSERT INTO usage_batches VALUES ($1, $2) ON CONFLICT (batch_id) DO NOTHING",
            &[&id, &to_ms(SystemTime::now())],
        )?;
        if fresh == 0 {
            return Ok(false);
        }
    }
    let stmt = tx.prepare(UPSERT)?;
    for ((key, start), t) in rows {
        tx.execute(
            &stmt,
            &[
                &&**key,
                start,
                &MINUTE_MS,
                &to_i64(t.prompt_tokens),
                &to_i64(t.completion_tokens),
                &to_i64(t.requests),
                &to_i64(t.estimated),
            ],
        )?;
    }
    Ok(true)
}

impl LedgerBackend for PgBackend {
    fn prepare_ledger(&mut self) -> Result<(), StoreError> {
        Ok(())
    }

    fn add_usage(&mut self, rows: &MinuteRows) -> Result<(), StoreError> {
        self.write_tx(|tx| apply_batch(tx, None, rows)).map(|_| ())
    }

    fn add_usage_batch(&mut self, batch_id: &str, rows: &MinuteRows) -> Result<bool, StoreError> {
        self.write_tx(|tx| apply_batch(tx, Some(batch_id), rows))
    }

    fn sum_usage(&self, key_id: &str, from: i64, to: i64) -> Result<UsageTotals, StoreError> {
        self.read(|c| {
            let r = c.query_one(
                "SELECT COALESCE(SUM(prompt_tokens), 0)::BIGINT,
                        COALESCE(SUM(completion_tokens), 0)::BIGINT,
                        COALESCE(SUM(requests), 0)::BIGINT, COALESCE(SUM(estimated), 0)::BIGINT
                 FROM usage WHERE key_id = $1 AND bucket_start >= $2 AND bucket_start < $3",
                &[&key_id, &from, &to],
            )?;
            Ok(UsageTotals {
                prompt_tokens: count(&r, 0),
                completion_tokens: count(&r, 1),
                requests: count(&r, 2),
                estimated: count(&r, 3),
            })
        })
    }

    fn period_tokens(
        &self,
        (d0, d1): (i64, i64),
        (m0, m1): (i64, i64),
    ) -> Result<Vec<(String, u64, u64)>, StoreError> {
        self.read(|c| {
            Ok(c.query(
                "SELECT key_id,
                    COALESCE(SUM(CASE WHEN bucket_start >= $1 AND bucket_start < $2
                                 THEN prompt_tokens + completion_tokens ELSE 0 END), 0)::BIGINT,
                    COALESCE(SUM(prompt_tokens + completion_tokens), 0)::BIGINT
                 FROM usage WHERE bucket_start >= $3 AND bucket_start < $4
                 GROUP BY key_id ORDER BY key_id",
                &[&d0, &d1, &m0, &m1],
            )?
            .iter()
            .map(|r| (r.get::<_, String>(0), count(r, 1), count(r, 2)))
            .collect())
        })
    }

    fn compact_usage(&mut self, cutoff: i64) -> Result<usize, StoreError> {
        self.write_tx(|tx| {
            // One compactor at a time across appliances.
            tx.execute("SELECT pg_advisory_xact_lock(7236478122)", &[])?;
            tx.execute(
                "INSERT INTO usage
                    (key_id, bucket_start, bucket_ms, prompt_tokens, completion_tokens, requests,
                     estimated)
                 SELECT key_id, (bucket_start / $2) * $2, $2, SUM(prompt_tokens),
                        SUM(completion_tokens), SUM(requests), SUM(estimated)
                 FROM usage WHERE bucket_ms = $3 AND bucket_start >= 0 AND bucket_start < $1
                 GROUP BY key_id, bucket_start / $2
                 ON CONFLICT (key_id, bucket_start, bucket_ms) DO UPDATE SET
                    prompt_tokens = usage.prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = usage.completion_tokens + excluded.completion_tokens,
                    requests = usage.requests + excluded.requests,
                    estimated = usage.estimated + excluded.estimated",
                &[&cutoff, &DAY_MS, &MINUTE_MS],
            )?;
            let folded = tx.execute(
                "DELETE FROM usage WHERE bucket_ms = $2 AND bucket_start >= 0 AND bucket_start < $1",
                &[&cutoff, &MINUTE_MS],
            )?;
            // Batch ids older than a week can no longer come back from a spool.
            tx.execute(
                "DELETE FROM usage_batches WHERE applied_at < $1",
                &[&(to_ms(SystemTime::now()) - 7 * DAY_MS)],
            )?;
            Ok(folded as usize)
        })
    }

    fn usage_row_count(&self) -> Result<u64, StoreError> {
        self.read(|c| Ok(count(&c.query_one("SELECT COUNT(*) FROM usage", &[])?, 0)))
    }

    fn lease_budgets(
        &mut self,
        appliance: &str,
        now_ms: i64,
        expiry_ms: i64,
        asks: &[crate::keys::ledger::LeaseAsk],
    ) -> Result<Vec<(u64, u64)>, StoreError> {
        // Keys in id order, so two appliances' transactions lock them in the same order.
        let mut order: Vec<usize> = (0..asks.len()).collect();
        order.sort_by(|&a, &b| asks[a].key_id.cmp(&asks[b].key_id));
        self.write_tx(|tx| {
            let mut out = vec![(0u64, 0u64); asks.len()];
            for i in order {
                let a = &asks[i];
                // One leaser per key at a time, across every appliance.
                tx.execute(
                    "SELECT pg_advisory_xact_lock(7236479, hashtext($1))",
                    &[&a.key_id],
                )?;
                let used = count(
                    &tx.query_one(
                        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0)::BIGINT
                         FROM usage WHERE key_id = $1 AND bucket_start >= $2 AND bucket_start < $3",
                        &[&a.key_id, &a.period.0, &a.period.1],
                    )?,
                    0,
                );
                let others = count(
                    &tx.query_one(
                        "SELECT COALESCE(SUM(GREATEST(granted - flushed, 0)), 0)::BIGINT
                         FROM budget_leases WHERE key_id = $1 AND period_start = $2
                           AND appliance <> $3 AND expires_at > $4",
                        &[&a.key_id, &a.period.0, &appliance, &now_ms],
                    )?,
                    0,
                );
                let mine = a.granted.saturating_sub(a.flushed);
                let left = a
                    .budget
                    .saturating_sub(used)
                    .saturating_sub(others)
                    .saturating_sub(mine);
                let add = a.want.min(left);
                let granted = a.granted.saturating_add(add);
                tx.execute(
                    "INSERT INTO budget_leases VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (key_id, period_start, appliance) DO UPDATE SET
                        granted = excluded.granted, flushed = excluded.flushed,
                        expires_at = excluded.expires_at",
                    &[
                        &a.key_id,
                        &a.period.0,
                        &appliance,
                        &to_i64(granted),
                        &to_i64(a.flushed),
                        &(now_ms + expiry_ms),
                    ],
                )?;
                out[i] = (granted, left - add);
            }
            // Leases of past periods and long-dead appliances.
            tx.execute(
                "DELETE FROM budget_leases WHERE expires_at < $1",
                &[&(now_ms - DAY_MS)],
            )?;
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_checks() {
        assert!(PgStoreConfig::check_url("postgres://mg@db:5432/mg?sslmode=require").is_ok());
        let e = PgStoreConfig::check_url("postgres://mg:hunter2@db/mg").unwrap_err();
        assert!(e.0.contains("password"), "{e:?}");
        assert!(PgStoreConfig::check_url("mysql://db/x").is_err());
        let c = PgStoreConfig {
            url: "postgres://mg:hunter2@db/mg".into(),
            password_file: None,
            ca_file: None,
        };
        assert_eq!(c.display_url(), "postgres://mg:****@db/mg");
        assert!(!c.display_url().contains("hunter2"));
    }
}
