//! A PostgreSQL server for the bench's shared-store cells: `initdb` into a temporary directory and
//! `postgres` on a free loopback port, as the package's `postgres` user when run as root; with
//! fsync on (the default), as an operator runs it, so the figures include the database's fsync.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn command(program: PathBuf) -> Command {
    if rustix::process::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl Postgres {
    /// `None` (with the reason printed) where PostgreSQL is not installed.
    pub async fn start() -> Option<Postgres> {
        let Some(bin) = bin_dir() else {
            println!("PostgreSQL is not installed: the postgres cells are left out");
            return None;
        };
        let dir = tempfile::Builder::new()
            .prefix("bench-pg-")
            .tempdir()
            .unwrap();
        if rustix::process::geteuid().is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap()
                .success();
            assert!(ok, "chown failed");
        }
        let data = dir.path().join("data");
        let out = command(bin.join("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-U", "relay", "--auth=trust", "-E", "UTF8", "--no-locale"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = command(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(dir.path())
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pg = Postgres { dir, port, child };
        let url = pg.url();
        for _ in 0..600 {
            if let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return Some(pg);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the bench's PostgreSQL did not come up");
    }

    pub fn url(&self) -> String {
        format!("postgres://relay@127.0.0.1:{}/postgres", self.port)
    }

    /// Each cell starts from empty tables (the relay creates them again).
    pub async fn reset(&self) {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public;")
            .await
            .unwrap();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next()?.trim().parse::<i32>().ok());
        if let Some(pid) = pid {
            let _ = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .status();
        }
        let _ = self.child.wait();
    }
}
