//! The command line as an operator uses it: hash-password, check, import-token, accounts, and admin
//! commands against a running `serve` (through its control socket).

use std::path::Path;
use std::process::{Command, Stdio};

use std::io::Write;

const BIN: &str = env!("CARGO_BIN_EXE_xoauth-relay");

fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Stops the child even when an assertion fails first.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hash() -> String {
    let (ok, out, err) = run(&["hash-password"], "pw\n");
    assert!(ok, "{err}");
    out.trim().to_string()
}

fn config(dir: &Path, accounts: &str, provider_extra: &str) -> String {
    let text = format!(
        r#"
[server]
data_dir = "{dir}/data"

[[listeners]]
address = "127.0.0.1:0"
tls = "none"

[providers.corp]
token_url = "http://127.0.0.1:9/token"
client_id = "relay"
smtp_host = "localhost"
smtp_port = 2525
smtp_tls = "none"
{provider_extra}
{accounts}
"#,
        dir = dir.display()
    );
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("relay-{n}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn account(name: &str, login: &str, hash: &str) -> String {
    format!("[[accounts]]\nname = \"{name}\"\nlogin = \"{login}\"\npassword_hash = \"{hash}\"\nprovider = \"corp\"\nmailbox = \"{name}@example.com\"\n")
}

#[test]
fn hash_password_reads_stdin_without_the_trailing_newline() {
    use argon2::{PasswordHash, PasswordVerifier};
    let h = hash();
    assert!(h.starts_with("$argon2id$v=19$"), "{h}");
    let parsed = PasswordHash::new(&h).unwrap();
    assert!(argon2::Argon2::default()
        .verify_password(b"pw", &parsed)
        .is_ok());
    assert!(argon2::Argon2::default()
        .verify_password(b"pw\n", &parsed)
        .is_err());
}

#[test]
fn check_names_the_key_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = hash();
    let cases: Vec<(String, &str)> = vec![
        (
            config(d, &(account("a", "a", &h) + "colour = \"red\"\n"), ""),
            "unknown field `colour`",
        ),
        (
            config(d, &account("a", "a", &h).replace("corp", "nope"), ""),
            "provider `nope` is not defined",
        ),
        (
            config(
                d,
                "[[accounts]]\nname = \"a\"\nprovider = \"corp\"\nmailbox = \"a@x.org\"\n",
                "",
            ),
            "`password_hash` is missing; create one with `xoauth-relay hash-password`",
        ),
        (
            config(
                d,
                &(account("a", "same", &h) + &account("b", "same", &h)),
                "",
            ),
            "login `same` is already used",
        ),
        (
            config(
                d,
                &account("a", "a", &h),
                "client_secret_file = \"/nonexistent/secret\"",
            ),
            "`client_secret_file` /nonexistent/secret",
        ),
        (
            config(
                d,
                &account("a", "a", &h),
                "client_secret_env = \"XR_TEST_UNSET_VAR\"",
            ),
            "XR_TEST_UNSET_VAR, which is not set",
        ),
        (
            config(
                d,
                &account("a", "a", &h),
                "revocation_url = \"http://example.com/revoke\"",
            ),
            "`revocation_url` must be an https URL",
        ),
    ];
    let bad_pattern =
        account("a", "a", &h).replace("mailbox", "allowed_senders = [\"news@*\"]\nmailbox");
    let cases = [
        cases,
        vec![(
            config(d, &bad_pattern, ""),
            "allowed_senders entry \"news@*\" is neither",
        )],
    ]
    .concat();
    for (path, expected) in cases {
        for cmd in ["check", "serve"] {
            let (ok, _, err) = run(&["--config", &path, cmd], "");
            assert!(!ok, "{cmd} accepted a bad config ({expected})");
            assert!(
                err.contains(expected),
                "{cmd}: expected `{expected}` in: {err}"
            );
        }
    }
    let (ok, out, err) = run(&["--config", "config/relay.example.toml", "check"], "");
    assert!(ok, "the example config must pass: {err}");
    assert!(
        out.contains("ok (2 listener(s), 1 provider(s), 1 account(s))"),
        "{out}"
    );
}

#[test]
fn check_reports_every_error_at_once_and_warns_about_the_published_password() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = hash();
    let accounts = account("a", "same", &h).replace("corp", "nope")
        + &account("b", "x", &h)
        + &account("c", "x", &h);
    let path = config(
        d,
        &accounts,
        "revocation_url = \"http://example.com/revoke\"",
    );
    let (ok, _, err) = run(&["--config", &path, "check"], "");
    assert!(!ok);
    for expected in [
        "`revocation_url` must be an https URL",
        "login `x` is already used by account `b`",
    ] {
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
    }

    let (ok, _, err) = run(&["--config", "config/relay.example.toml", "check"], "");
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: account `newsletter`: password_hash is the example's published one"),
        "{err}"
    );
    // On a listener other machines can reach, `serve` refuses it.
    let example = std::fs::read_to_string("config/relay.example.toml").unwrap();
    let public = example
        .replace("127.0.0.1:587", "0.0.0.0:0")
        .replace("127.0.0.1:465", "127.0.0.1:0")
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}/data\"", d.display()),
        );
    let public_path = d.join("public.toml");
    std::fs::write(&public_path, public).unwrap();
    let (ok, _, err) = run(&["--config", public_path.to_str().unwrap(), "serve"], "");
    assert!(!ok);
    assert!(
        err.contains("still has the example config's published password"),
        "{err}"
    );
}

#[test]
fn import_token_and_accounts_with_and_without_a_running_relay() {
    let dir = tempfile::tempdir().unwrap();
    let h = hash();
    let path = config(
        dir.path(),
        &(account("news", "news", &h) + &account("crm", "crm", &h)),
        "",
    );

    // A listing with no relay and no database (run from the wrong directory, say) creates none.
    let (ok, _, err) = run(&["--config", &path, "accounts"], "");
    assert!(!ok);
    assert!(err.contains("there is no database at"), "{err}");
    assert!(!dir.path().join("data").exists());

    let (ok, out, err) = run(
        &["--config", &path, "import-token", "news"],
        "rt-imported-SECRET\n",
    );
    assert!(ok, "{err}");
    assert_eq!(
        out.trim(),
        "account `news`: grant stored; the next session uses it"
    );
    let (ok, table, err) = run(&["--config", &path, "accounts"], "");
    assert!(ok, "{err}");
    let row = |t: &str, name: &str| {
        t.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        row(&table, "news ").contains("refresh_token  ok"),
        "{table}"
    );
    assert!(
        row(&table, "crm ").contains("needs authorization"),
        "{table}"
    );

    // sled allows one process: with `serve` running, admin commands go through its control socket.
    let mut serve = KillOnDrop(
        Command::new(BIN)
            .args(["--config", &path, "serve"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = std::io::BufReader::new(serve.0.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut stderr, &mut line).unwrap() > 0,
            "serve exited early"
        );
    }
    let (ok, out, err) = run(&["--config", &path, "import-token", "crm"], "rt-crm-SECRET");
    assert!(ok, "{err}");
    assert!(out.contains("grant stored"));
    let (ok, table, err) = run(&["--config", &path, "accounts"], "");
    assert!(ok, "{err}");
    assert!(row(&table, "crm ").contains("refresh_token  ok"), "{table}");
    let (ok, out, _) = run(&["--config", &path, "revoke", "crm"], "");
    assert!(ok);
    assert!(out.contains("grant deleted"), "{out}");
    // A second relay on the same data dir is refused with a clear message.
    let (ok, _, err) = run(&["--config", &path, "serve"], "");
    assert!(!ok);
    assert!(err.contains("already running"), "{err}");
    // `reload` as systemd's ExecReload runs it: success when taken, non-zero with the reason when
    // the file is refused (the relay keeps running on the old one).
    let (ok, out, err) = run(&["--config", &path, "reload"], "");
    assert!(ok, "{err}");
    assert!(out.contains("config reloaded"), "{out}");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        good.replace("[server]", "[server]\nhostname = \"elsewhere\""),
    )
    .unwrap();
    let (ok, _, err) = run(&["--config", &path, "reload"], "");
    assert!(!ok);
    assert!(
        err.contains("[server] hostname changed, which needs a restart"),
        "{err}"
    );
    std::fs::write(&path, "[server\n").unwrap();
    let (ok, _, err) = run(&["--config", &path, "reload"], "");
    assert!(!ok);
    assert!(err.contains("nothing reloaded"), "{err}");
    std::fs::write(&path, &good).unwrap();
    let sent = std::process::Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    assert!(
        serve.0.wait().unwrap().success(),
        "serve stops cleanly on SIGTERM"
    );

    use std::os::unix::fs::PermissionsExt;
    let key = dir.path().join("master.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let mut stack = vec![dir.path().join("data")];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let bytes = std::fs::read(&p).unwrap();
            for secret in [&b"rt-imported-SECRET"[..], b"rt-crm-SECRET"] {
                assert!(
                    !bytes.windows(secret.len()).any(|w| w == secret),
                    "token in clear in {}",
                    p.display()
                );
            }
        }
    }
}

#[test]
fn serve_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let h = hash();
    let path = config(dir.path(), &account("a", "a", &h), "");
    let socket_path = dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    // A bound on the wait, not a pause: recv returns as soon as the relay writes.
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let serve = KillOnDrop(
        Command::new(BIN)
            .args(["--config", &path, "serve"])
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    assert_eq!(&buf[..n], b"READY=1\n");
    let sent = Command::new("kill")
        .args(["-TERM", &serve.0.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let n = socket.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(&buf[..n], b"STOPPING=1\n");
}

#[test]
fn a_database_without_its_key_is_refused_before_anything_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), &account("news", "news", &hash()), "");
    let (ok, _, err) = run(&["--config", &path, "import-token", "news"], "rt-1\n");
    assert!(ok, "{err}");
    let key = dir.path().join("master.key");
    std::fs::remove_file(&key).unwrap();

    let (ok, _, err) = run(&["--config", &path, "accounts"], "");
    assert!(!ok);
    assert!(err.contains("has no key at"), "{err}");
    // Refused before the token is read: nothing asked for is thrown away, and no new key is made.
    let (ok, _, err) = run(&["--config", &path, "import-token", "news"], "rt-2\n");
    assert!(!ok);
    assert!(err.contains("Restore the key from its backup"), "{err}");
    assert!(!key.exists());
}
