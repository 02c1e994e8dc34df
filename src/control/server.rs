//! The daemon's side of the control socket: binding it safely (stale files, another daemon,
//! mode and group), serving the protocol of [`super`] (through the bounded loop of
//! [`crate::accept`]), and removing the socket on stop.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::UnixListener;
use tokio::sync::watch;

use super::{ReloadReport, StatusReport};

/// Socket file mode: owner and group read/write (connect needs write), nobody else.
pub const SOCKET_MODE: u32 = 0o660;
/// Group given the socket when it exists.
pub const SOCKET_GROUP: &str = "modelgate";
pub const MAX_CONNECTIONS: usize = 16;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A reload answers within this (it reads files; the daemon bounds each step).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_HEAD_BYTES: usize = 16 * 1024;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the daemon answers with.
pub trait ControlApi: Send + Sync + 'static {
    fn status(&self) -> BoxFut<'_, StatusReport>;
    /// Runs a reload to its end (serialised with SIGHUP reloads).
    fn reload(&self) -> BoxFut<'_, ReloadReport>;
}

/// The bound socket file; removed on drop if it is still ours (same inode), so a daemon that
/// stops never deletes the socket of one that replaced it.
#[derive(Debug)]
pub struct SocketGuard {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if m.ino() == self.ino {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// The gid of `group` (NSS, as `getent group` sees it), if it exists.
pub fn group_gid(group: &str) -> Option<u32> {
    nix::unistd::Group::from_name(group)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// Binds the control socket at `path`.
///
/// A leftover socket file nobody answers on (a daemon that was killed) is replaced; if a daemon
/// answers on it, this refuses (two daemons would fight over the tunnel's UDP port anyway). A
/// path that exists and is not a socket is never deleted. The socket is bound under a
/// temporary name, given mode 0660 and group `modelgate` (when that group exists), and only
/// then renamed into place, so it is never reachable with looser permissions.
pub fn bind(path: &Path) -> Result<(UnixListener, SocketGuard), String> {
    let shown = path.display();
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| {
        format!(
            "control socket {shown}: cannot create {}: {e}; fix: create it writable by the daemon (systemd: RuntimeDirectory=modelgate) or change server.control_socket",
            parent.display()
        )
    })?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(format!(
                    "control socket {shown}: another modelgate daemon answers on it; fix: stop that daemon first (`systemctl stop modelgate`), or give this one another server.control_socket"
                ))
            }
            Err(_) => {
                tracing::info!(socket = %shown, "removing a stale control socket");
                std::fs::remove_file(path).map_err(|e| {
                    format!("control socket {shown}: stale socket cannot be removed: {e}; fix: remove it by hand")
                })?;
            }
        },
        Ok(_) => {
            return Err(format!(
                "control socket {shown}: exists and is not a socket; fix: move that file away or change server.control_socket"
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("control socket {shown}: {e}")),
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "control.sock".into());
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let std_listener = std::os::unix::net::UnixListener::bind(&tmp)
        .map_err(|e| format!("control socket {shown}: cannot bind: {e}; fix: check that {} is writable by the daemon, or change server.control_socket", parent.display()))?;
    let cleanup = |e: String| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| cleanup(format!("control socket {shown}: chmod: {e}")))?;
    if let Some(gid) = group_gid(SOCKET_GROUP) {
        if let Err(e) = std::os::unix::fs::chown(&tmp, None, Some(gid)) {
            tracing::warn!(socket = %shown, error = %e, "cannot give the control socket to group {SOCKET_GROUP}; only the daemon's user and root can use it");
        }
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        cleanup(format!(
            "control socket {shown}: cannot move into place: {e}"
        ))
    })?;
    let ino = std::fs::symlink_metadata(path)
        .map_err(|e| format!("control socket {shown}: {e}"))?
        .ino();
    let guard = SocketGuard {
        path: path.to_path_buf(),
        ino,
    };
    std_listener
        .set_nonblocking(true)
        .map_err(|e| format!("control socket {shown}: {e}"))?;
    let listener =
        UnixListener::from_std(std_listener).map_err(|e| format!("control socket {shown}: {e}"))?;
    Ok((listener, guard))
}

/// Serves the control protocol on `listener` until `stop` turns true; the socket file is
/// removed when this returns (or is cancelled), through `guard`.
pub async fn serve(
    listener: UnixListener,
    guard: SocketGuard,
    api: Arc<dyn ControlApi>,
    stop: watch::Receiver<bool>,
) {
    let _guard = guard;
    crate::accept::run(
        &listener,
        "control socket",
        MAX_CONNECTIONS,
        stop,
        |(stream, _)| {
            let api = api.clone();
            async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let api = api.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(answer(req, api.as_ref()).await)
                    }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
            }
        },
    )
    .await
}

fn json(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default(),
    )
}

async fn answer(req: Request<Incoming>, api: &dyn ControlApi) -> Response<Full<Bytes>> {
    match (req.uri().path(), req.method()) {
        ("/v1/status", &Method::GET) => {
            let s = api.status().await;
            json(
                StatusCode::OK,
                serde_json::to_vec_pretty(&s).unwrap_or_default(),
            )
        }
        ("/v1/reload", &Method::POST) => {
            let r = api.reload().await;
            let status = if r.applied {
                StatusCode::OK
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            json(status, serde_json::to_vec_pretty(&r).unwrap_or_default())
        }
        ("/v1/status", _) => error(StatusCode::METHOD_NOT_ALLOWED, "use GET /v1/status"),
        ("/v1/reload", _) => error(StatusCode::METHOD_NOT_ALLOWED, "use POST /v1/reload"),
        _ => error(
            StatusCode::NOT_FOUND,
            "unknown path: GET /v1/status or POST /v1/reload",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::client;
    use crate::control::InterfaceStatus;
    use std::sync::atomic::{AtomicU32, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Fake {
        reloads: AtomicU32,
    }

    impl ControlApi for Fake {
        fn status(&self) -> BoxFut<'_, StatusReport> {
            Box::pin(async {
                StatusReport {
                    version: "test".into(),
                    pid: 1,
                    uptime_seconds: 2,
                    config: "/etc/modelgate/modelgate.toml".into(),
                    interface: InterfaceStatus {
                        public_key: "pk".into(),
                        listen: "0.0.0.0:51820".into(),
                        listen_port: 51820,
                        address: "10.99.0.1/24".into(),
                    },
                    peers: Vec::new(),
                    upstreams: Vec::new(),
                    models: Vec::new(),
                    https: None,
                    metrics_listen: None,
                    streams: Vec::new(),
                    store: None,
                }
            })
        }
        fn reload(&self) -> BoxFut<'_, ReloadReport> {
            Box::pin(async {
                let n = self.reloads.fetch_add(1, Ordering::SeqCst);
                ReloadReport {
                    applied: n == 0,
                    errors: if n == 0 { vec![] } else { vec!["bad".into()] },
                    ..ReloadReport::default()
                }
            })
        }
    }

    async fn raw(path: &Path, req: &[u8]) -> String {
        let mut s = tokio::net::UnixStream::connect(path).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn socket_mode_stale_replacement_protocol_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/control.sock");
        // A stale socket (bound, listener gone) is replaced.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (listener, guard) = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        // A second daemon is refused while the first answers.
        let err = bind(&path).unwrap_err();
        assert!(err.contains("another modelgate daemon"), "{err}");

        let (stop_tx, stop) = watch::channel(false);
        let api = Arc::new(Fake {
            reloads: AtomicU32::new(0),
        });
        let task = tokio::spawn(serve(listener, guard, api, stop));

        let s = client::status(&path).await.unwrap();
        assert_eq!(s.interface.listen_port, 51820);
        let r = client::reload(&path).await.unwrap();
        assert!(r.applied);
        let r = client::reload(&path).await.unwrap();
        assert!(!r.applied);
        assert_eq!(r.errors, vec!["bad".to_string()]);

        let nf = raw(
            &path,
            b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(nf.starts_with("HTTP/1.1 404"), "{nf}");
        let m = raw(
            &path,
            b"DELETE /v1/reload HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(m.starts_with("HTTP/1.1 405"), "{m}");
        let g = raw(&path, b"\xff\xfe\x00garbage\r\n\r\n").await;
        assert!(g.is_empty() || g.starts_with("HTTP/1.1 400"), "{g}");
        let mut huge = b"GET /v1/status HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', 64 * 1024));
        let h = raw(&path, &huge).await;
        assert!(
            h.is_empty() || h.starts_with("HTTP/1.1 431") || h.starts_with("HTTP/1.1 400"),
            "{h}"
        );
        // Still serving after the garbage.
        assert!(client::status(&path).await.is_ok());

        stop_tx.send(true).unwrap();
        task.await.unwrap();
        assert!(!path.exists(), "socket removed on stop");
        let e = client::status(&path).await.unwrap_err();
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }

    #[test]
    fn a_file_that_is_not_a_socket_is_never_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        std::fs::write(&path, "precious").unwrap();
        let err = bind(&path).unwrap_err();
        assert!(err.contains("not a socket"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }

    #[test]
    fn group_lookup_through_nss() {
        assert_eq!(group_gid("root"), Some(0));
        assert_eq!(group_gid("no-such-group-modelgate-test"), None);
    }
}
