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
        let mut pg = Pg {
            dir,
            port: free_port(),
            child: None,
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
