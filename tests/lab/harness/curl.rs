//! `curl` from the client namespace as a plain HTTPS client of the gateway: the key is read from
//! a header file (never argv) and the answer's status, headers and body come back whole.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};

use super::lab::Lab;
use super::proc::text;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One HTTP answer as curl saw it.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Lower-cased names, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// POSTs `body` (JSON) to `url` from the client namespace with `Authorization: Bearer KEY`,
/// trusting only `cert`. Panics when curl got no HTTP answer at all.
pub fn post(lab: &Lab, cert: &Path, key: &str, url: &str, body: &str) -> Response {
    let dir = lab.dir.path();
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let (hdr_in, body_in, hdr_out, body_out) = (
        dir.join(format!("curl{n}.auth")),
        dir.join(format!("curl{n}.json")),
        dir.join(format!("curl{n}.headers")),
        dir.join(format!("curl{n}.body")),
    );
    std::fs::write(&hdr_in, format!("Authorization: Bearer {key}\n")).unwrap();
    std::fs::write(&body_in, body).unwrap();
    let p = |p: &Path| p.to_str().unwrap().to_string();
    let out = lab.exec(
        &lab.client,
        &[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--cacert",
            &p(cert),
            "-H",
            &format!("@{}", p(&hdr_in)),
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", p(&body_in)),
            "-D",
            &p(&hdr_out),
            "-o",
            &p(&body_out),
            "-w",
            "%{http_code}",
            url,
        ],
    );
    let status: u16 = text(&out.stdout).trim().parse().unwrap_or(0);
    assert!(
        status != 0,
        "curl got no HTTP response ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let headers = std::fs::read_to_string(&hdr_out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = std::fs::read_to_string(&body_out).unwrap_or_default();
    Response {
        status,
        headers,
        body,
    }
}
