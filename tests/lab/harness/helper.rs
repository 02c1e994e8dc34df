//! Client side of the lab, run inside a namespace: the test binary re-executes itself with
//! `ip netns exec NS <test-exe> helper_entry --exact --ignored` and the command in
//! `MODELGATE_LAB_HELPER` (a std-only way to own sockets in another namespace, no setns/unsafe).
//! [`run`] and [`spawn`] start it; `helper_entry` in `main.rs` calls [`run_from_env`].
//!
//! Each command prints its results as `HELPER …` lines on stdout; every loop is bounded by a
//! count and a deadline.
//!
//! | command | prints |
//! |---|---|
//! | `wait-accept ADDR MS` | `ok ELAPSED_MS` or `timeout` |
//! | `tcp-connect ADDR MS` | `connect ok` or `connect err KIND MESSAGE` |
//! | `http-get ADDR PATH COUNT MS` | per response on one keep-alive connection: `response STATUS LEN FNV64HEX` |
//! | `http-get-retry ADDR PATH MS` | `ok ELAPSED_MS ATTEMPTS` or `timeout ATTEMPTS LAST_ERROR` |
//! | `http-stream ADDR PATH MS` | `chunk I MS_SINCE_REQUEST` per SSE event, then `done STATUS` |
//! | `udp-garbage ADDR COUNT` | `sent N` |
//! | `udp-drive ADDR COUNT INTERVAL_MS` | `sent N` |
//! | `listen tcp:PORT… udp:PORT…` | `in-use tcp:PORT` per port taken, then `ready`; serves ≤ 600 s |
//! | `probe-tcp ADDR MS` | `open`, `refused` or `timeout` |
//! | `probe-udp ADDR MS` | `reply` (the echo), `other`, `refused` or `timeout` |
//! | `probe-wg ADDR PRIVATE PUBLIC MS` | `handshake` (a real WireGuard handshake) or `timeout` |

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::proc::{self, Proc};

const ENV: &str = "MODELGATE_LAB_HELPER";

/// The libtest arguments that select the helper's entry point and nothing else.
const ENTRY_ARGS: [&str; 6] = [
    "helper_entry",
    "--exact",
    "--ignored",
    "--nocapture",
    "--test-threads=1",
    "--quiet",
];

/// Output lines of one helper run, without the `HELPER ` prefix.
#[derive(Debug)]
pub struct HelperOutput {
    pub lines: Vec<String>,
}

impl HelperOutput {
    pub fn first(&self) -> &str {
        self.lines.first().map(String::as_str).unwrap_or("")
    }
}

/// Runs the helper command `args` inside `ns` to completion. Panics when the helper fails.
pub fn run(ns: &str, args: &[&str]) -> HelperOutput {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .arg(exe)
        .args(ENTRY_ARGS)
        .env(ENV, args.join(" "))
        .output()
        .expect("run helper");
    let stdout = proc::text(&out.stdout);
    assert!(
        out.status.success(),
        "helper {args:?} in {ns} failed ({}):\n{stdout}\n{}",
        out.status,
        proc::text(&out.stderr)
    );
    HelperOutput {
        lines: stdout
            .lines()
            .filter_map(|l| l.strip_prefix("HELPER "))
            .map(str::to_string)
            .collect(),
    }
}

/// Starts the helper command `args` in `ns` in the background (traffic that must run meanwhile,
/// listeners), logging to `dir/NAME.log`.
pub fn spawn(dir: &Path, name: &str, ns: &str, args: &[&str]) -> Proc {
    let exe = std::env::current_exe().expect("current exe");
    let mut argv = vec![exe.to_str().unwrap()];
    argv.extend(ENTRY_ARGS);
    proc::spawn(dir, name, Some(ns), &argv, &[(ENV, &args.join(" "))])
}

/// Runs the helper command from the environment, if any (in the child).
pub fn run_from_env() {
    let Ok(cmd) = std::env::var(ENV) else {
        return;
    };
    let args: Vec<&str> = cmd.split_whitespace().collect();
    match args.as_slice() {
        ["wait-accept", addr, ms] => wait_accept(parse(addr), ms_arg(ms)),
        ["tcp-connect", addr, ms] => tcp_connect(parse(addr), ms_arg(ms)),
        ["http-get", addr, path, count, ms] => {
            http_get(parse(addr), path, count.parse().unwrap(), ms_arg(ms))
        }
        ["http-get-retry", addr, path, ms] => http_get_retry(parse(addr), path, ms_arg(ms)),
        ["http-stream", addr, path, ms] => http_stream(parse(addr), path, ms_arg(ms)),
        ["udp-garbage", addr, count] => udp_garbage(parse(addr), count.parse().unwrap()),
        ["udp-drive", addr, count, ms] => {
            udp_drive(parse(addr), count.parse().unwrap(), ms_arg(ms))
        }
        ["listen", specs @ ..] => listen(specs),
        ["probe-tcp", to, ms] => say(probe_tcp(parse(to), ms_arg(ms))),
        ["probe-udp", to, ms] => say(probe_udp(parse(to), ms_arg(ms))),
        ["probe-wg", to, private, public, ms] => {
            say(probe_wg(parse(to), private, public, ms_arg(ms)))
        }
        _ => panic!("unknown helper command {cmd:?}"),
    }
}

fn parse(addr: &str) -> SocketAddr {
    addr.parse()
        .unwrap_or_else(|_| panic!("{addr:?} is not IP:PORT"))
}

fn ms_arg(ms: &str) -> Duration {
    Duration::from_millis(ms.parse().expect("milliseconds"))
}

fn say(line: &str) {
    println!("HELPER {line}");
    let _ = io::stdout().flush();
}

/// FNV-1a 64: a cheap checksum to compare bodies without printing them.
pub fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn wait_accept(addr: SocketAddr, timeout: Duration) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            say(&format!("ok {}", start.elapsed().as_millis()));
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    say("timeout");
}

fn tcp_connect(addr: SocketAddr, timeout: Duration) {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => say("connect ok"),
        Err(e) => say(&format!("connect err {:?} {e}", e.kind())),
    }
}

fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(BufReader::new(s))
}

fn send_get(conn: &mut BufReader<TcpStream>, path: &str, close: bool) -> io::Result<()> {
    let connection = if close { "close" } else { "keep-alive" };
    write!(
        conn.get_mut(),
        "GET {path} HTTP/1.1\r\nHost: model\r\nConnection: {connection}\r\n\r\n"
    )
}

/// Reads one HTTP/1.1 response (Content-Length or chunked). `on_chunk` sees each chunk of a
/// chunked body as soon as it is complete.
fn read_response(
    conn: &mut BufReader<TcpStream>,
    mut on_chunk: impl FnMut(&[u8]),
) -> io::Result<(u16, Vec<u8>)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(bad("connection closed before the status line"));
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("bad status line {line:?}")))?;
    let mut length = None;
    let mut chunked = false;
    for _ in 0..100 {
        line.clear();
        conn.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        for _ in 0..100_000 {
            line.clear();
            conn.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad(&format!("bad chunk size {line:?}")))?;
            if size == 0 {
                line.clear();
                conn.read_line(&mut line)?; // final CRLF (no trailers from our server)
                break;
            }
            let mut chunk = vec![0; size];
            conn.read_exact(&mut chunk)?;
            on_chunk(&chunk);
            body.extend_from_slice(&chunk);
            let mut crlf = [0; 2];
            conn.read_exact(&mut crlf)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        conn.read_exact(&mut body)?;
    } else {
        conn.read_to_end(&mut body)?;
    }
    Ok((status, body))
}

fn http_get(addr: SocketAddr, path: &str, count: usize, timeout: Duration) {
    let mut conn = connect(addr, timeout).expect("connect");
    for i in 0..count {
        send_get(&mut conn, path, i + 1 == count).expect("send request");
        let (status, body) = read_response(&mut conn, |_| {}).expect("read response");
        say(&format!(
            "response {status} {} {:016x}",
            body.len(),
            fnv64(&body)
        ));
    }
}

fn http_get_retry(addr: SocketAddr, path: &str, timeout: Duration) {
    let start = Instant::now();
    let mut attempts = 0;
    let mut last = String::from("none");
    while start.elapsed() < timeout && attempts < 1000 {
        attempts += 1;
        let per_try = (timeout - start.elapsed()).min(Duration::from_secs(3));
        let result = connect(addr, per_try).and_then(|mut c| {
            send_get(&mut c, path, true)?;
            read_response(&mut c, |_| {})
        });
        match result {
            Ok((200, _)) => {
                say(&format!("ok {} {attempts}", start.elapsed().as_millis()));
                return;
            }
            Ok((status, _)) => last = format!("status-{status}"),
            Err(e) => last = format!("{:?}", e.kind()),
        }
        thread::sleep(Duration::from_millis(200));
    }
    say(&format!("timeout {attempts} {last}"));
}

fn http_stream(addr: SocketAddr, path: &str, timeout: Duration) {
    let mut conn = connect(addr, timeout).expect("connect");
    let start = Instant::now();
    send_get(&mut conn, path, true).expect("send request");
    let mut pending = Vec::new();
    let (status, _) = read_response(&mut conn, |chunk| {
        let at = start.elapsed().as_secs_f64() * 1000.0;
        pending.extend_from_slice(chunk);
        // One line per complete SSE event ("data: chunk I\n\n").
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 2);
            let i = event.trim_start_matches("data: chunk ");
            say(&format!("chunk {i} {at:.1}"));
        }
    })
    .expect("read streamed response");
    say(&format!("done {status}"));
}

/// A tiny xorshift PRNG seeded from the OS: the content is irrelevant, only its variety.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).expect("getrandom");
        Rng(u64::from_le_bytes(seed) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

/// Sends `count` datagrams that are noise or look like WireGuard messages (types 1–4 with the
/// right or wrong sizes, random receiver indices and MACs), in bursts of 100.
fn udp_garbage(addr: SocketAddr, count: usize) {
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    let mut rng = Rng::new();
    let mut sent = 0;
    for i in 0..count {
        let (ty, len) = match i % 8 {
            0 => (0u8, (rng.next() % 1500) as usize),
            1 => (1, 148),                               // handshake initiation size
            2 => (2, 92),                                // handshake response size
            3 => (3, 64),                                // cookie reply size
            4 => (4, 32 + (rng.next() % 1400) as usize), // transport data
            5 => (1 + (rng.next() % 4) as u8, (rng.next() % 200) as usize), // wrong sizes
            6 => (4, 16),                                // truncated data header
            _ => (0, 1 + (rng.next() % 8) as usize),
        };
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        if ty != 0 && len >= 4 {
            buf[..4].copy_from_slice(&[ty, 0, 0, 0]);
        }
        if sock.send_to(&buf, addr).is_ok() {
            sent += 1;
        }
        if i % 100 == 99 {
            thread::sleep(Duration::from_millis(5));
        }
    }
    say(&format!("sent {sent}"));
}

/// Sends `count` small datagrams, `interval` apart: traffic that makes a WireGuard peer notice
/// that its session is dead and handshake again.
fn udp_drive(addr: SocketAddr, count: usize, interval: Duration) {
    let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
    let mut sent = 0;
    for _ in 0..count {
        if sock.send_to(b"drive", addr).is_ok() {
            sent += 1;
        }
        thread::sleep(interval);
    }
    say(&format!("sent {sent}"));
}

/// `tcp:PORT` listeners that accept and close, `udp:PORT` echo sockets; all on `[::]`
/// (dual-stack). A TCP port already in use (the daemon's metrics listener) is reported and
/// skipped. Serves until killed; bounded: the test kills it long before 600 s.
fn listen(specs: &[&str]) {
    for spec in specs {
        let (proto, port) = spec.split_once(':').expect("PROTO:PORT");
        let port: u16 = port.parse().unwrap();
        let bind = SocketAddr::from(([0u16; 8], port));
        match proto {
            "tcp" => match TcpListener::bind(bind) {
                Ok(l) => {
                    thread::spawn(move || {
                        for s in l.incoming().flatten() {
                            drop(s);
                        }
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                    say(&format!("in-use tcp:{port}"));
                }
                Err(e) => panic!("bind tcp {port}: {e}"),
            },
            "udp" => {
                let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind udp {port}: {e}"));
                thread::spawn(move || {
                    let mut buf = [0u8; 1500];
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                });
            }
            _ => panic!("bad listener {spec}"),
        }
    }
    say("ready");
    thread::sleep(Duration::from_secs(600));
}

fn probe_tcp(to: SocketAddr, timeout: Duration) -> &'static str {
    match TcpStream::connect_timeout(&to, timeout) {
        Ok(_) => "open",
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
        Err(e) if e.kind() == io::ErrorKind::TimedOut => "timeout",
        Err(e) => panic!("tcp {to}: {e}"),
    }
}

fn probe_udp(to: SocketAddr, timeout: Duration) -> &'static str {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    s.send_to(b"probe", to).unwrap();
    let mut buf = [0u8; 64];
    match s.recv_from(&mut buf) {
        Ok((n, from)) if from == to && &buf[..n] == b"probe" => "reply",
        Ok(_) => "other",
        // An ICMP port unreachable surfaces as ECONNREFUSED on the next receive.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => "refused",
        Err(_) => "timeout",
    }
}

/// A real WireGuard handshake: initiation with the peer's `private` key to the appliance's
/// `public` key, and a response that completes the handshake within `timeout`.
fn probe_wg(to: SocketAddr, private: &str, public: &str, timeout: Duration) -> &'static str {
    let private: modelgate::wgkey::PrivateKey = private.parse().expect("private key");
    let public: modelgate::wgkey::PublicKey = public.parse().expect("public key");
    let mut tunn =
        boringtun::noise::Tunn::new(private.to_dalek(), public.to_dalek(), None, None, 7, None);
    let s = UdpSocket::bind("0.0.0.0:0").unwrap();
    let mut out = vec![0u8; 2048];
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + timeout;
    if let boringtun::noise::TunnResult::WriteToNetwork(p) =
        tunn.format_handshake_initiation(&mut out, false)
    {
        s.send_to(p, to).unwrap();
    } else {
        panic!("no handshake initiation");
    }
    while Instant::now() < deadline {
        s.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let Ok((n, from)) = s.recv_from(&mut buf) else {
            break;
        };
        if from != to {
            continue;
        }
        let mut dst = vec![0u8; 2048];
        let _ = tunn.decapsulate(Some(from.ip()), &buf[..n], &mut dst);
        if tunn.stats().0.is_some() {
            return "handshake";
        }
    }
    "timeout"
}
