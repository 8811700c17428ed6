//! A PostgreSQL server of the test's own: `initdb` into a temporary directory, `postgres` on a free
//! loopback port, stopped (immediate shutdown) when dropped. As root (CI), both run as the
//! package's `postgres` user: initdb refuses root. The bench uses it too, with fsync on.
//!
//! Where no PostgreSQL is installed the test is skipped with a printed reason, unless
//! `XOAUTH_RELAY_REQUIRE_POSTGRES` is set (`.ci/run` sets it after installing the package): then
//! a missing server fails the test instead of passing silently.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    child: Option<std::process::Child>,
    /// Off for the tests (speed); on for the bench (an operator's server syncs its commits).
    fsync: bool,
}

/// The directory holding `initdb` and `postgres`, if PostgreSQL is installed.
fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    if let Some(newest) = found.pop() {
        return Some(newest);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find(|p| p.join("initdb").exists() && p.join("postgres").exists())
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `program args...`, as the `postgres` user when this process is root.
fn command(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    /// A running server, or `None` (with the reason printed) where PostgreSQL is not installed
    /// and CI did not ask for it.
    pub async fn start() -> Option<Postgres> {
        Postgres::start_with(false).await
    }

    /// [`Postgres::start`], with `fsync` on or off.
    pub async fn start_with(fsync: bool) -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            let why =
                "PostgreSQL is not installed (no initdb under /usr/lib/postgresql or in PATH)";
            if std::env::var_os("XOAUTH_RELAY_REQUIRE_POSTGRES").is_some() {
                panic!("{why}, and XOAUTH_RELAY_REQUIRE_POSTGRES is set");
            }
            eprintln!("skipped: {why}; install the postgresql package to run this test");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("xoauth-pg-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        if is_root() {
            // The server's user must own its directory (and reach it).
            let chown = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(
                chown.success(),
                "chown of the test database directory failed"
            );
        }
        let out = command(&bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "relay",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--no-locale",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            dir,
            bin,
            port: free_port(),
            child: None,
            fsync,
        };
        pg.spawn();
        pg.until_up().await;
        Some(pg)
    }

    fn spawn(&mut self) {
        let child = command(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(self.dir.path())
            // Room for several relays' pools.
            .args(["-c", "max_connections=200"])
            .args(if self.fsync { &[][..] } else { &["-F"][..] })
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Starts the server again after [`Postgres::stop`], on the same port and data.
    pub async fn restart(&mut self) {
        self.spawn();
        self.until_up().await;
    }

    pub fn url(&self) -> String {
        format!("postgres://relay@127.0.0.1:{}/postgres", self.port)
    }

    /// Waits until the server accepts a query.
    pub async fn until_up(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((client, conn)) =
                tokio_postgres::connect(&self.url(), tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the test PostgreSQL did not come up within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Empty tables: the next relay creates them again (the bench, between cells).
    pub async fn reset(&self) {
        self.client()
            .await
            .batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
            .await
            .unwrap();
    }

    /// A client for the test's own queries.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    }

    /// The postmaster's pid, from its pid file.
    fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Stops the server at once (as a crash would), keeping its data for [`Postgres::restart`].
    pub fn stop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        // The pid file goes when the postmaster is gone.
        let _ = std::fs::remove_file(self.dir.path().join("data/postmaster.pid"));
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}
