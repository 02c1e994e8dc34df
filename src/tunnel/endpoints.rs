//! The endpoint store: `state_dir/endpoints.json`, every peer's last authenticated endpoint, so
//! a restarted appliance can handshake its peers at once (see `restart.rs`).
//!
//! The one file the tunnel writes. Written atomically ([`crate::fsutil::write_atomic`], 0600)
//! by a background task ([`EndpointWriter`]) that the driver hands snapshots to — never on the
//! packet path, at most once per [`WRITE_EVERY`] (the latest snapshot wins), and only when an
//! endpoint changed. Read once at start; a missing file is an empty store, a broken one is
//! logged and ignored (the tunnel then waits for the peers as before), never fatal. It holds
//! addresses and public keys only: nothing secret.
//!
//! ```json
//! {"version": 1, "peers": {"<public key>": {"endpoint": "198.51.100.2:53737",
//!   "local": "192.0.2.1" | null, "learned_unix": 1795000000, "configured": null}}}
//! ```

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::LearnedEndpoint;
use crate::wgkey::PublicKey;

/// The file name inside the state directory.
pub const FILE_NAME: &str = "endpoints.json";
/// Writes are at least this far apart; changes in between are coalesced into the next one.
pub const WRITE_EVERY: Duration = Duration::from_secs(1);
/// How long shutdown waits for the last write.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Serialize, Deserialize)]
struct File {
    version: u32,
    peers: BTreeMap<String, Record>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    endpoint: SocketAddr,
    #[serde(default)]
    local: Option<IpAddr>,
    learned_unix: u64,
    #[serde(default)]
    configured: Option<SocketAddr>,
}

/// Where the endpoints live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStore {
    path: PathBuf,
}

impl EndpointStore {
    /// The store in `state_dir`.
    pub fn in_dir(state_dir: &Path) -> EndpointStore {
        EndpointStore {
            path: state_dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record; an absent file is empty. Leftover temporary files of a write that a
    /// `kill -9` interrupted (another process's: they carry its PID) are removed.
    pub fn load(&self) -> io::Result<Vec<LearnedEndpoint>> {
        self.remove_stale_temporaries();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let file: File = serde_json::from_str(&text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let mut out = Vec::with_capacity(file.peers.len());
        for (key, rec) in file.peers {
            let Ok(public_key) = key.parse::<PublicKey>() else {
                continue;
            };
            out.push(LearnedEndpoint {
                public_key,
                endpoint: rec.endpoint,
                local: rec.local,
                learned: UNIX_EPOCH + Duration::from_secs(rec.learned_unix),
                configured: rec.configured,
            });
        }
        Ok(out)
    }

    /// [`EndpointStore::load`], logging (never failing) when the file cannot be used.
    pub fn load_logged(&self) -> Vec<LearnedEndpoint> {
        match self.load() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(
                    file = %self.path.display(),
                    error = %e,
                    "stored peer endpoints ignored; the peers are handshaken when they dial again (the file is rewritten at the next change)"
                );
                Vec::new()
            }
        }
    }

    /// Replaces the file with `endpoints`, atomically.
    pub fn save(&self, endpoints: &[LearnedEndpoint]) -> io::Result<()> {
        let file = File {
            version: 1,
            peers: endpoints
                .iter()
                .map(|e| {
                    (
                        e.public_key.to_base64(),
                        Record {
                            endpoint: e.endpoint,
                            local: e.local,
                            learned_unix: e
                                .learned
                                .duration_since(UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                            configured: e.configured,
                        },
                    )
                })
                .collect(),
        };
        let mut text = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        text.push(b'\n');
        crate::fsutil::write_atomic(&self.path, &text, 0o600)
    }

    fn remove_stale_temporaries(&self) {
        let (Some(dir), Some(name)) = (self.path.parent(), self.path.file_name()) else {
            return;
        };
        let prefix = format!(".{}.", name.to_string_lossy());
        // `write_atomic` names them `.NAME.PID.RANDOM.tmp`; this process's own are in flight.
        let own = format!("{prefix}{}.", std::process::id());
        let Ok(entries) = std::fs::read_dir(if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        }) else {
            return;
        };
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&prefix) && n.ends_with(".tmp") && !n.starts_with(&own) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The background writer of an [`EndpointStore`]: [`EndpointWriter::offer`] never blocks and
/// never allocates beyond the snapshot it is given; the task writes the newest snapshot at
/// most once per [`WRITE_EVERY`].
pub struct EndpointWriter {
    tx: watch::Sender<Option<Vec<LearnedEndpoint>>>,
    task: JoinHandle<()>,
}

impl EndpointWriter {
    /// Starts the writer task on the current runtime.
    pub fn start(store: EndpointStore) -> EndpointWriter {
        let (tx, rx) = watch::channel(None);
        let task = tokio::spawn(write_loop(store, rx));
        EndpointWriter { tx, task }
    }

    /// Hands over the newest endpoints (replacing one not yet written).
    pub fn offer(&self, endpoints: Vec<LearnedEndpoint>) {
        self.tx.send_replace(Some(endpoints));
    }

    /// Writes what is pending and ends (bounded wait).
    pub async fn finish(self) {
        let EndpointWriter { tx, task } = self;
        drop(tx);
        if tokio::time::timeout(FINAL_WRITE_TIMEOUT, task)
            .await
            .is_err()
        {
            tracing::warn!("peer endpoint store: the last write did not finish in time");
        }
    }
}

async fn write_loop(store: EndpointStore, mut rx: watch::Receiver<Option<Vec<LearnedEndpoint>>>) {
    let mut pending = false;
    loop {
        // A change made just before the sender went away is still reported before the close.
        if !pending && rx.changed().await.is_err() {
            return;
        }
        let snapshot = rx.borrow_and_update().clone();
        if let Some(snapshot) = snapshot {
            write(&store, snapshot).await;
        }
        // The pause between writes; what arrives meanwhile is written after it, or at once
        // when the driver stops (the sender goes away).
        pending = false;
        let resume = tokio::time::Instant::now() + WRITE_EVERY;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(resume) => break,
                r = rx.changed() => match r {
                    Ok(()) => pending = true,
                    Err(_) => {
                        let last = rx.borrow_and_update().clone();
                        if let (true, Some(last)) = (pending, last) {
                            write(&store, last).await;
                        }
                        return;
                    }
                },
            }
        }
    }
}

async fn write(store: &EndpointStore, snapshot: Vec<LearnedEndpoint>) {
    let s = store.clone();
    match tokio::task::spawn_blocking(move || s.save(&snapshot)).await {
        Ok(Ok(())) => tracing::debug!(file = %store.path.display(), "peer endpoints stored"),
        Ok(Err(e)) => tracing::warn!(
            file = %store.path.display(),
            error = %e,
            "cannot store the peer endpoints; after a restart the peers are handshaken only when they dial again (fix: make the state directory writable for the daemon's user)"
        ),
        Err(e) => tracing::warn!(error = %e, "peer endpoint writer failed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wgkey::PrivateKey;

    fn rec(port: u16, configured: Option<&str>) -> LearnedEndpoint {
        LearnedEndpoint {
            public_key: PrivateKey::generate().public_key(),
            endpoint: SocketAddr::from(([198, 51, 100, 2], port)),
            local: Some("192.0.2.1".parse().unwrap()),
            learned: UNIX_EPOCH + Duration::from_secs(1_795_000_000),
            configured: configured.map(|c| c.parse().unwrap()),
        }
    }

    fn sorted(mut v: Vec<LearnedEndpoint>) -> Vec<LearnedEndpoint> {
        v.sort_by_key(|e| e.public_key.to_base64());
        v
    }

    /// What is saved loads back exactly (whole seconds), the file is 0600, a write replaces
    /// the file atomically (no temporary left behind), and an absent file is an empty store.
    #[test]
    fn round_trip_atomic_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::in_dir(dir.path());
        assert!(store.load().unwrap().is_empty(), "no file: empty");
        let first = vec![rec(53737, None), rec(40000, Some("203.0.113.7:51820"))];
        store.save(&first).unwrap();
        assert_eq!(sorted(store.load().unwrap()), sorted(first.clone()));
        let mode = std::fs::metadata(store.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let second = vec![rec(1, None)];
        store.save(&second).unwrap();
        assert_eq!(
            store.load().unwrap(),
            second,
            "the new file replaced the old"
        );
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec![FILE_NAME.to_string()], "only the file itself");
    }

    /// A temporary file left by a killed write is removed at load; a broken file is an error
    /// for `load` and an empty store for `load_logged`; records with a bad key are skipped.
    #[test]
    fn leftovers_and_broken_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::in_dir(dir.path());
        let stale = dir.path().join(".endpoints.json.4242.a1b2c3.tmp");
        std::fs::write(&stale, b"{").unwrap();
        std::fs::write(store.path(), b"not json").unwrap();
        assert!(store.load().is_err());
        assert!(!stale.exists(), "the leftover temporary is removed");
        assert!(store.load_logged().is_empty());

        let good = rec(53737, None);
        let text = format!(
            r#"{{"version":1,"peers":{{"not-a-key":{{"endpoint":"192.0.2.9:1","learned_unix":1}},"{}":{{"endpoint":"198.51.100.2:53737","local":"192.0.2.1","learned_unix":1795000000}}}}}}"#,
            good.public_key.to_base64()
        );
        std::fs::write(store.path(), text).unwrap();
        assert_eq!(store.load().unwrap(), vec![good]);
    }

    /// The writer stores the newest snapshot it was offered, coalesces a burst into at most
    /// a first and a last write, and writes what is pending when it finishes.
    #[tokio::test]
    async fn writer_stores_the_latest_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = EndpointStore::in_dir(dir.path());
        let w = EndpointWriter::start(store.clone());
        let snapshots: Vec<Vec<LearnedEndpoint>> = (1..=50).map(|p| vec![rec(p, None)]).collect();
        for s in &snapshots {
            w.offer(s.clone());
        }
        w.finish().await;
        let stored = store.load().unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(
            stored[0].endpoint.port(),
            50,
            "the last snapshot is on disk"
        );
    }
}
