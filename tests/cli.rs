//! The command line as an operator uses it: hash-password, check, import-token, accounts, and admin
//! commands against a running `serve` (through its control socket).

use std::path::Path;
use std::process::{Command, Stdio};

use std::io::Write;

const BIN: &str = env!("CARGO_BIN_EXE_xoauth-relay");

fn run(args: &[&str], stdin: &str) -> (bool, String, String) {
    run_in(Path::new("."), args, stdin)
}

/// [`run`] from another working directory.
fn run_in(cwd: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(BIN)
        .current_dir(cwd)
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
        .replace("127.0.0.1:2587", "0.0.0.0:0")
        .replace("127.0.0.1:2465", "127.0.0.1:0")
        .replace(
            "data_dir = \"../data\"",
            &format!("data_dir = \"{}/data\"", d.display()),
        );
    let public_path = d.join("public.toml");
    std::fs::write(&public_path, public).unwrap();
    // `check` says the same, with the same exit code: it means "serve would start".
    for cmd in ["serve", "check"] {
        let (ok, _, err) = run(&["--config", public_path.to_str().unwrap(), cmd], "");
        assert!(!ok, "{cmd}");
        assert!(
            err.contains("still has the example config's published password"),
            "{cmd}: {err}"
        );
    }
    assert!(
        !d.join("data").exists(),
        "check and a refused serve create nothing"
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
        format!("account `news`: grant stored; no relay is running, `xoauth-relay --config {path} serve` uses it when it starts")
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
    // The fix as it must be typed: this file is not the default one, and the provider has no
    // consent page (no authorize_url), so `authorize` would fail.
    assert!(
        table.contains(&format!(
            "run `xoauth-relay --config {path} import-token crm < refresh-token.txt`"
        )),
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
    let pid = serve.0.id();
    assert!(
        err.contains(&format!(
            "another relay is already running with this config (pid {pid}"
        )),
        "{err}"
    );
    // `reload` as systemd's ExecReload runs it: success when taken, non-zero with the reason when
    // the file is refused (the relay keeps running on the old one).
    let (ok, out, err) = run(&["--config", &path, "reload"], "");
    assert!(ok, "{err}");
    assert!(
        out.contains(&format!("config reloaded from {path}: ")),
        "{out}"
    );
    let good = std::fs::read_to_string(&path).unwrap();
    // Another file than the one the relay reads: refused, naming both.
    let second = dir.path().join("second.toml");
    std::fs::write(&second, &good).unwrap();
    let (ok, _, err) = run(&["--config", second.to_str().unwrap(), "reload"], "");
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "nothing reloaded: the running relay reads {path}, not {}",
            second.display()
        )),
        "{err}"
    );
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
    // Half-edited: reload is refused, but the running relay still answers health and accounts.
    std::fs::write(&path, good.clone() + "\n[limits\nmax_recipients = \n").unwrap();
    let (ok, _, err) = run(&["--config", &path, "reload"], "");
    assert!(!ok);
    assert!(
        err.contains("config not reloaded, the running one stays"),
        "{err}"
    );
    let (ok, out, err) = run(&["--config", &path, "health"], "");
    assert!(ok, "{err}");
    assert_eq!(out, format!("ready: relay running (pid {pid})\n"));
    let (ok, table, err) = run(&["--config", &path, "accounts"], "");
    assert!(ok, "{err}");
    assert!(
        row(&table, "news ").contains("refresh_token  ok"),
        "{table}"
    );
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

#[test]
fn check_refuses_what_serve_would_refuse_and_suggests_the_key_meant() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = hash();
    let base = config(d, &account("a", "a", &h), "");
    // A copy of the base config with one edit.
    let edited = |name: &str, edit: &dyn Fn(String) -> String| {
        let path = d.join(name);
        std::fs::write(&path, edit(std::fs::read_to_string(&base).unwrap())).unwrap();
        path.display().to_string()
    };
    // A data_dir nobody can create: both refuse, naming the key, the path and the user.
    let data_dir = format!("data_dir = \"{}/data\"", d.display());
    let nope = edited("nope.toml", &|t| {
        t.replace(&data_dir, "data_dir = \"/proc/nope/data\"")
    });
    for cmd in ["check", "serve"] {
        let (ok, _, err) = run(&["--config", &nope, cmd], "");
        assert!(!ok, "{cmd} accepted an uncreatable data_dir");
        assert!(
            err.contains("[server] data_dir /proc/nope/data: cannot create it as "),
            "{cmd}: {err}"
        );
    }
    // A typo gets the key it was meant to be.
    let typo = edited("typo.toml", &|t| {
        t + "\n[limits]\nmax_recipents = 10\nmax_conections = 5\n"
    });
    let (ok, _, err) = run(&["--config", &typo, "check"], "");
    assert!(!ok);
    // Every typo at once, each with the key meant.
    for (typo, meant) in [
        ("max_recipents", "max_recipients"),
        ("max_conections", "max_connections"),
    ] {
        assert!(
            err.contains(&format!("unknown field `{typo}`, expected one of"))
                && err.contains(&format!("(did you mean `{meant}`?)")),
            "{typo}: {err}"
        );
    }
    // The example's placeholders: a warning from check, a refusal from authorize.
    let placeholder = config(
        d,
        &account("a", "a", &h),
        "client_secret = \"replace-with-the-client-secret\"\nauthorize_url = \"http://127.0.0.1:9/auth\"",
    );
    let (ok, _, err) = run(&["--config", &placeholder, "check"], "");
    assert!(ok, "{err}");
    assert!(
        err.contains("warning: [providers.corp]: client_secret \"replace-with-the-client-secret\" is the example's placeholder"),
        "{err}"
    );
    let (ok, _, err) = run(
        &["--config", &placeholder, "authorize", "a", "--manual"],
        "",
    );
    assert!(!ok);
    assert!(err.contains("is the example's placeholder"), "{err}");
    // A privileged port without the privilege: a warning naming the capability.
    let low = edited("low.toml", &|t| t.replace("127.0.0.1:0", "127.0.0.1:587"));
    let (ok, _, err) = run(&["--config", &low, "check"], "");
    assert!(ok, "{err}");
    let unprivileged = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 10) == 0);
    let low_ports_privileged =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
            .is_none_or(|start| start > 587);
    // A key file that is no key: both refuse before anything is created.
    std::fs::write(d.join("master.key"), "not a key\n").unwrap();
    for cmd in ["check", "serve"] {
        let (ok, _, err) = run(&["--config", &base, cmd], "");
        assert!(!ok, "{cmd}");
        assert!(
            err.contains(&format!(
                "[server] key_file {}/master.key is not a base64 key; restore the key from its backup",
                d.display()
            )),
            "{cmd}: {err}"
        );
    }
    assert!(!d.join("data").exists());
    if unprivileged && low_ports_privileged {
        assert!(
            err.contains("127.0.0.1:587: ports below 1024 need root or CAP_NET_BIND_SERVICE"),
            "{err}"
        );
    }
}

#[test]
fn relative_paths_are_taken_from_the_config_directory_wherever_a_command_runs() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let text = std::fs::read_to_string(config(dir.path(), &account("news", "news", &hash()), ""))
        .unwrap()
        .replace(
            &format!("data_dir = \"{}/data\"", dir.path().display()),
            "data_dir = \"state\"",
        );
    std::fs::write(conf.join("relay.toml"), &text).unwrap();
    // From the parent directory, through a relative --config: the store lands beside the file.
    let (ok, out, err) = run_in(
        dir.path(),
        &["--config", "conf/relay.toml", "import-token", "news"],
        "rt-1\n",
    );
    assert!(ok, "{err}");
    assert!(out.contains("grant stored"), "{out}");
    assert!(conf.join("state").is_dir(), "the database is in conf/state");
    assert!(
        conf.join("master.key").exists(),
        "the key is beside the file"
    );
    assert!(!dir.path().join("state").exists());
    // From inside conf/, the same store answers.
    let (ok, table, err) = run_in(&conf, &["--config", "relay.toml", "accounts"], "");
    assert!(ok, "{err}");
    assert!(table.contains("refresh_token  ok"), "{table}");

    // An upgrade where the data still sits at the old place (the working directory): refused,
    // naming both paths, before anything new is created.
    let other = tempfile::tempdir().unwrap();
    let old_conf = other.path().join("etc");
    std::fs::create_dir(&old_conf).unwrap();
    std::fs::write(old_conf.join("relay.toml"), &text).unwrap();
    std::fs::create_dir(other.path().join("state")).unwrap();
    for cmd in ["check", "serve", "accounts"] {
        let (ok, _, err) = run_in(other.path(), &["--config", "etc/relay.toml", cmd], "");
        assert!(!ok, "{cmd}");
        assert!(
            err.contains(&format!(
                "[server] data_dir: {}/state exists but {}/etc/state does not",
                other.path().display(),
                other.path().display()
            )),
            "{cmd}: {err}"
        );
    }
    assert!(!old_conf.join("state").exists());
}

#[test]
fn with_json_logs_a_fatal_error_is_a_json_line_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(
        dir.path(),
        &(account("a", "a", &hash()) + "colour = \"red\"\n"),
        "",
    );
    let (ok, _, err) = run(&["--log-format", "json", "--config", &path, "serve"], "");
    assert!(!ok);
    let lines: Vec<serde_json::Value> = err
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let last = lines.last().expect("a line");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown field `colour`")),
        "{last}"
    );
    assert!(
        !err.contains("listening") && !err.contains("serving"),
        "a failed start claims nothing: {err}"
    );
}

#[test]
fn queue_retry_without_a_target_names_the_three_ways() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), &account("a", "a", &hash()), "");
    let (ok, _, err) = run(&["--config", &path, "queue", "retry"], "");
    assert!(!ok);
    for form in [
        "queue retry ID`",
        "queue retry --all`",
        "queue retry --account NAME`",
    ] {
        assert!(err.contains(form), "{form} in: {err}");
    }
    assert!(
        err.contains(&format!("xoauth-relay --config {path} queue retry")),
        "{err}"
    );
}

#[test]
fn a_new_store_is_made_only_on_a_fresh_install_or_with_init() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), &account("news", "news", &hash()), "");
    // `test` would need a store: it asks for --init instead of making one.
    let (ok, _, err) = run(&["--config", &path, "test", "news"], "");
    assert!(!ok);
    assert!(err.contains("run the command again with --init"), "{err}");
    assert!(!dir.path().join("data").exists());
    // A fresh install: storing a grant creates the store.
    let (ok, _, err) = run(&["--config", &path, "import-token", "news"], "rt-1\n");
    assert!(ok, "{err}");
    // The database gone but its key still there (a moved data_dir?): not silently started over.
    std::fs::remove_dir_all(dir.path().join("data")).unwrap();
    let (ok, _, err) = run(&["--config", &path, "import-token", "news"], "rt-2\n");
    assert!(!ok);
    assert!(err.contains("although the key at"), "{err}");
    assert!(err.contains("--init"), "{err}");
    assert!(!dir.path().join("data").exists());
    let (ok, out, err) = run(
        &["--config", &path, "import-token", "news", "--init"],
        "rt-2\n",
    );
    assert!(ok, "{err}");
    assert!(out.contains("grant stored"), "{out}");
}
