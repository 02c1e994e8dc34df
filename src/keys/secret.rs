//! The server secret: `<state_dir>/keys.secret`, the HMAC key of every stored key hash.
//!
//! Owns creating, reading and checking that file (32 random bytes, mode 0600) and the keyed
//! hash [`hash_secret`]. The secret is kept apart from the database on purpose: a copy of the
//! database alone does not let anyone authenticate or test guesses offline. Never logs or
//! prints the secret (`Debug` is masked); never replaces an existing file (a new secret would
//! invalidate every key).

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::format::{self, Secret};
use super::types::StoreError;

/// File name of the server secret inside the state directory.
pub const SECRET_FILE: &str = "keys.secret";

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The 32-byte HMAC key of `keys.secret`. `Debug` is masked.
#[derive(Clone)]
pub struct ServerSecret([u8; 32]);

impl fmt::Debug for ServerSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServerSecret(****)")
    }
}

impl ServerSecret {
    /// A fresh random secret (tests and [`super::KeyRing::for_tests`]).
    pub fn generate() -> ServerSecret {
        let mut k = [0u8; 32];
        getrandom::fill(&mut k).expect("the operating system's random number generator failed");
        ServerSecret(k)
    }

    /// The keyed HMAC, ready to clone per use (cloning skips re-deriving the inner/outer pads).
    pub(crate) fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        <HmacSha256 as Mac>::new_from_slice(&self.0).expect("HMAC takes any key length")
    }

    /// A keyed digest that identifies the secret without revealing it (hex): what a shared
    /// store records to refuse an appliance with another secret.
    pub(crate) fn fingerprint(&self) -> String {
        let mut m = self.mac();
        m.update(b"modelgate server secret fingerprint v1");
        let d = m.finalize().into_bytes();
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> [u8; 32] {
        self.0
    }
}

/// `HMAC-SHA-256(server secret, id ":" secret)`. Binding the id means a hash copied onto another
/// row does not authenticate that row's id.
pub(crate) fn hash_secret(mac: &HmacSha256, id: &str, secret: &str) -> [u8; 32] {
    let mut m = mac.clone();
    m.update(id.as_bytes());
    m.update(b":");
    m.update(secret.as_bytes());
    m.finalize().into_bytes().into()
}

/// Reads `keys.secret`, or creates it (32 random bytes, 0600) on first use.
///
/// Creation is atomic and never clobbers: the bytes go to a private temporary file which is then
/// hard-linked to the final name. If two processes race, `link(2)` fails for the loser with
/// `EEXIST` and it reads the winner's file, so both end up with the same secret and no reader
/// ever sees a partial file.
pub(super) fn load_or_create(path: &Path) -> Result<ServerSecret, StoreError> {
    match read(path) {
        Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let io_err = |action, p: &Path| {
        let p = p.to_path_buf();
        move |source| StoreError::Io {
            action,
            path: p,
            source,
        }
    };
    let secret = ServerSecret::generate();
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{SECRET_FILE}.{}.{}.tmp",
        std::process::id(),
        format::new_id()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(&secret.0)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("write", &tmp)(e));
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("sync", dir))?;
            Ok(secret)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(io_err("create", path)(e)),
    }
}

/// Reads and checks `keys.secret`: no access for group or others, exactly 32 bytes.
fn read(path: &Path) -> Result<ServerSecret, StoreError> {
    let io_err = |source| StoreError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(io_err)?;
    let mode = f.metadata().map_err(io_err)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::SecretMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let mut buf = Vec::with_capacity(33);
    f.take(1024).read_to_end(&mut buf).map_err(io_err)?;
    let bytes: [u8; 32] = buf
        .as_slice()
        .try_into()
        .map_err(|_| StoreError::SecretLength {
            path: path.to_path_buf(),
            len: buf.len(),
        })?;
    Ok(ServerSecret(bytes))
}

/// A freshly generated key and its hash, on its way into the store. A backend reads the id and
/// the hash; only the store gets the secret back out.
pub(crate) struct Minted {
    secret: Secret,
    hash: [u8; 32],
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("id", &self.id())
            .finish_non_exhaustive()
    }
}

impl Minted {
    /// A new secret for the key `id` (a fresh id when `None`), hashed with `mac`.
    pub(crate) fn new(mac: &HmacSha256, id: Option<&str>) -> Minted {
        let secret = match id {
            Some(id) => format::generate_for(id),
            None => format::generate(),
        };
        let parsed = format::parse(secret.expose()).expect("generated keys parse");
        let hash = hash_secret(mac, parsed.id(), parsed.secret());
        Minted { secret, hash }
    }

    pub fn id(&self) -> &str {
        self.secret.id()
    }

    pub fn hash(&self) -> &[u8; 32] {
        &self.hash
    }

    /// The whole key, for the one time it is shown; only the store takes it.
    pub(crate) fn into_secret(self) -> Secret {
        self.secret
    }
}
