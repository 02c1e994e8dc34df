//! The CLI's side of the control socket: one HTTP/1.1 request per connection, bounded in time
//! and size, with errors that name the socket and the fix.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use super::{ReloadReport, StatusReport};

/// A status answer comes at once; a reload waits for the daemon to apply the config.
pub const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(90);
/// Largest answer accepted (a status with thousands of peers fits easily).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the modelgate daemon at {}: {source}; fix: start it (`systemctl start modelgate`, or `modelgate run`), or pass the --config whose server.control_socket the running daemon uses", path.display())]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("cannot use the control socket {}: permission denied; fix: run as root or as a member of group modelgate", path.display())]
    PermissionDenied { path: PathBuf },
    #[error("the daemon at {} did not answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("unexpected answer from the daemon at {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
}

/// `GET /v1/status`.
pub async fn status(socket: &Path) -> Result<StatusReport, ClientError> {
    let (_, body) = request(socket, Method::GET, "/v1/status", STATUS_TIMEOUT).await?;
    decode(socket, &body)
}

/// `POST /v1/reload`: the daemon's verdict, applied or refused (both are answers).
pub async fn reload(socket: &Path) -> Result<ReloadReport, ClientError> {
    let (_, body) = request(socket, Method::POST, "/v1/reload", RELOAD_TIMEOUT).await?;
    decode(socket, &body)
}

fn decode<T: serde::de::DeserializeOwned>(socket: &Path, body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| ClientError::Protocol {
        path: socket.to_path_buf(),
        message: format!("{e}"),
    })
}

async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), ClientError> {
    let proto = |message: String| ClientError::Protocol {
        path: socket.to_path_buf(),
        message,
    };
    let stream = UnixStream::connect(socket).await.map_err(|e| {
        if e.kind() == io::ErrorKind::PermissionDenied {
            ClientError::PermissionDenied {
                path: socket.to_path_buf(),
            }
        } else {
            ClientError::NotRunning {
                path: socket.to_path_buf(),
                source: e,
            }
        }
    })?;
    let work = async {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| proto(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "modelgate")
            .body(Empty::<Bytes>::new())
            .map_err(|e| proto(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| proto(e.to_string()))?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| proto(e.to_string()))?
            .to_bytes();
        if status == 404 || status == 405 {
            return Err(proto(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        Ok((status, body.to_vec()))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ClientError::Timeout {
            path: socket.to_path_buf(),
            timeout,
        })?
}
