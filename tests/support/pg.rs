//! A throwaway PostgreSQL cluster for one test: `initdb` into the test's own directory, then
//! `postgres` on a free loopback port with its socket in that directory, stopped by PID (never
//! by name). As root, both run as the `postgres` user (`setpriv`), since PostgreSQL refuses
//! root. Password authentication (scram-sha-256) for TCP, so the store's `password_file` is
//! what logs in.
#![allow(dead_code)]

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
pub const USER: &str = "mg";
pub const PASSWORD: &str = "pg-test-password";

pub struct Pg {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    /// TLS on (server.crt signed by `ca.pem` in `dir`, for `localhost` and 127.0.0.1).
    tls: bool,
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `cmd` run as the `postgres` user when we are root.
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ]);
        c.arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Whether the PostgreSQL binaries are installed (`None`) or why not.
pub fn missing() -> Option<String> {
    if !Path::new(BIN).join("postgres").exists() {
        return Some(format!(
            "{BIN}/postgres not found; fix: apt-get install postgresql-15"
        ));
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Pg {
    /// initdb + start; panics with the server's log on failure.
    pub fn start() -> Pg {
        Pg::start_with(false)
    }

    /// [`Pg::start`] with TLS: a test CA (`ca_file()`) signs the server's certificate.
    pub fn start_tls() -> Pg {
        Pg::start_with(true)
    }

    /// The test CA's PEM (with [`Pg::start_tls`]).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_with(tls: bool) -> Pg {
        let dir = tempfile::Builder::new().prefix("mg-pg-").tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).unwrap();
        let pwfile = dir.path().join("initdb.pw");
        std::fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&pwfile, std::fs::Permissions::from_mode(0o644)).unwrap();
        if is_root() {
            let chown = |p: &Path| {
                let st = Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(p)
                    .status()
                    .unwrap();
                assert!(st.success());
            };
            chown(&data);
            chown(&sock);
            chown(&pwfile);
        }
        let out = as_pg_user(&Path::new(BIN).join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if tls {
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            ca.distinguished_name
                .push(rcgen::DnType::CommonName, "modelgate test PostgreSQL CA");
            ca.key_usages = vec![
                rcgen::KeyUsagePurpose::KeyCertSign,
                rcgen::KeyUsagePurpose::CrlSign,
            ];
            let ca_cert = ca.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca, ca_key);
            let leaf_key = rcgen::KeyPair::generate().unwrap();
            let leaf = rcgen::CertificateParams::new(vec![
                "localhost".to_string(),
                "127.0.0.1".to_string(),
            ])
            .unwrap();
            let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
            let (crt, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::write(&crt, leaf_cert.pem()).unwrap();
            std::fs::write(&key, leaf_key.serialize_pem()).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut pg = Pg {
            dir,
            port: free_port(),
            child: None,
            tls,
        };
        pg.launch();
        pg
    }

    /// The Unix socket directory (owned by the server's user).
    pub fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server on the same directory and port (after [`Pg::kill`]).
    pub fn launch(&mut self) {
        assert!(self.child.is_none());
        let mut tls_args: Vec<String> = Vec::new();
        if self.tls {
            for f in ["server.crt", "server.key"] {
                let to = self.data().join(f);
                if !to.exists() {
                    std::fs::copy(self.dir.path().join(f), &to).unwrap();
                    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
                    if is_root() {
                        let _ = Command::new("chown")
                            .arg("postgres:postgres")
                            .arg(&to)
                            .status();
                    }
                }
            }
            tls_args = [
                "-c",
                "ssl=on",
                "-c",
                "ssl_cert_file=server.crt",
                "-c",
                "ssl_key_file=server.key",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        if is_root() {
            let _ = Command::new("chown")
                .arg("postgres:postgres")
                .arg(self.dir.path().join("server.log"))
                .status();
        }
        let child = as_pg_user(&Path::new(BIN).join("postgres"))
            .arg("-D")
            .arg(self.data())
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1"])
            .arg("-k")
            .arg(self.sock())
            .args(["-c", "fsync=off", "-c", "max_connections=100"])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.sock().join(format!(".s.PGSQL.{}", self.port)).exists()
            {
                // Accepting connections once the socket exists and startup finished.
                let ok = Command::new(Path::new(BIN).join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                    .stdout(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if ok {
                    return;
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postgres exited ({st}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// SIGKILLs the server (by PID) and waits for it. The next [`Pg::launch`] recovers.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGKILL by PID (as root the child is setpriv, which exec'd postgres: same PID).
            let _ = c.kill();
            let _ = c.wait();
            // The postmaster's children die with it (they notice the postmaster is gone);
            // give them a moment so the port and shared memory are free.
            let deadline = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Creates database `name`.
    pub fn createdb(&self, name: &str) {
        let st = Command::new(Path::new(BIN).join("createdb"))
            .args(["-h"])
            .arg(self.sock())
            .args(["-p", &self.port.to_string(), "-U", USER, name])
            .status()
            .unwrap();
        assert!(st.success(), "createdb {name}");
    }

    /// The store URL of database `db` over TLS, verified against the server's name.
    pub fn tls_url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}@localhost:{}/{db}?sslmode=require",
            self.port
        )
    }

    /// The store URL of database `db` (no password: that is in [`Pg::password_file`]).
    pub fn url(&self, db: &str) -> String {
        format!(
            "postgres://{USER}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// Writes the password into `dir/pg.pw`, mode 0600, and returns its path.
    pub fn password_file(&self, dir: &Path) -> PathBuf {
        let p = dir.join("pg.pw");
        std::fs::write(&p, format!("{PASSWORD}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.kill();
    }
}
