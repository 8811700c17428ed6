use super::*;

const TEXT: &str = r#"
[[listeners]]
address = "127.0.0.1:587"
tls = "none"

[providers.corp]
token_url = "https://login.example.com/token"
client_id = "c"
client_secret = "client-SECRET-inline"
smtp_host = "smtp.example.com"

[providers.envy]
token_url = "https://login.example.com/token"
client_id = "c"
client_secret_env = "XR_UNIT_SECRET"
smtp_host = "smtp.example.com"

[[accounts]]
name = "news"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U"
provider = "corp"
mailbox = "news@example.com"

[[accounts]]
name = "other"
password_hash = "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U"
provider = "envy"
mailbox = "other@example.com"
"#;

struct FakeEnv;

impl Env for FakeEnv {
    fn var(&self, name: &str) -> Option<String> {
        (name == "XR_UNIT_SECRET").then(|| "env-SECRET-value".to_string())
    }
    fn read_secret(&self, _: &Path) -> std::io::Result<String> {
        Err(std::io::ErrorKind::NotFound.into())
    }
    fn exists(&self, _: &Path) -> bool {
        false
    }
}

#[test]
fn parsing_names_secrets_and_resolving_reads_them_through_the_env() {
    let parsed = Config::parse(TEXT, Path::new("relay.toml")).unwrap();
    let envy = &parsed.providers["envy"];
    assert_eq!(
        envy.secret_source,
        Some(SecretSource::Env("XR_UNIT_SECRET".into()))
    );
    assert!(envy.client_secret.is_none(), "parse reads no environment");
    let config = parsed.resolve(&FakeEnv).unwrap();
    assert_eq!(
        config.providers["envy"]
            .client_secret
            .as_ref()
            .unwrap()
            .expose(),
        "env-SECRET-value"
    );
    // Accounts point at the resolved provider.
    assert!(config
        .account("other")
        .unwrap()
        .provider
        .client_secret
        .is_some());
}

#[test]
fn the_key_defaults_beside_the_config_and_an_old_one_in_data_dir_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let text = TEXT.replace(
        "[[listeners]]",
        &format!(
            "[server]\ndata_dir = \"{}/data\"\n\n[[listeners]]",
            dir.path().display()
        ),
    );
    let config = Config::parse(&text, &dir.path().join("relay.toml")).unwrap();
    assert_eq!(config.key_file(), dir.path().join("master.key"));
    assert!(!config
        .warnings()
        .iter()
        .any(|w| w.contains("inside data_dir")));
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/master.key"), "old").unwrap();
    assert_eq!(config.key_file(), dir.path().join("data/master.key"));
    assert!(config
        .warnings()
        .iter()
        .any(|w| w.contains("inside data_dir")));
}

#[test]
fn debug_output_shows_no_secret_or_password_hash() {
    let config = Config::parse(TEXT, Path::new("relay.toml"))
        .unwrap()
        .resolve(&FakeEnv)
        .unwrap();
    let debug = format!("{config:?}");
    assert!(debug.contains("news"), "{debug}");
    for secret in ["SECRET", "argon2id"] {
        assert!(!debug.contains(secret), "{secret} in {debug}");
    }
}

/// A config with one provider table `p` (its keys given) and an account on it.
fn with_provider(keys: &str) -> Result<Config, ConfigError> {
    let text = format!(
        "[[listeners]]\naddress = \"127.0.0.1:587\"\ntls = \"none\"\n\n[providers.p]\n{keys}\n\n[[accounts]]\n\
         name = \"news\"\npassword_hash = \"$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U\"\n\
         provider = \"p\"\nmailbox = \"news@example.com\"\n"
    );
    Config::parse(&text, Path::new("relay.toml"))
}

#[test]
fn an_api_transport_takes_its_family_from_the_preset_and_its_defaults_from_the_transport() {
    let c = with_provider("preset = \"microsoft\"\ntransport = \"graph\"\ntenant = \"contoso.com\"\nclient_id = \"c\"")
        .unwrap();
    let a = &c.accounts[0];
    let p = &a.provider;
    assert_eq!(
        (p.family, p.transport),
        (Family::Microsoft, TransportKind::Graph)
    );
    assert!(p
        .token_url
        .starts_with("https://login.microsoftonline.com/contoso.com/"));
    assert_eq!(p.api_url, "https://graph.microsoft.com/v1.0");
    assert_eq!(
        p.scopes,
        ["https://graph.microsoft.com/Mail.Send", "offline_access"]
    );
    assert_eq!(
        a.max_upstream_connections, 4,
        "Outlook's 4 concurrent requests"
    );
    assert_eq!(a.pacing.max_messages_per_minute, 30);
    assert_eq!(a.header_recipients, HeaderRecipients::Refuse);
    assert_eq!(a.endpoint(), "https://graph.microsoft.com/v1.0");

    let c = with_provider(
        "preset = \"microsoft\"\ntransport = \"graph\"\ntenant = \"contoso.com\"\nclient_id = \"c\"\n\
         grant = \"client_credentials\"\nclient_secret = \"s\"",
    )
    .unwrap();
    assert_eq!(
        c.accounts[0].provider.scopes,
        ["https://graph.microsoft.com/.default"]
    );

    let c = with_provider(
        "preset = \"google\"\ntransport = \"gmail_api\"\nclient_id = \"c\"\nclient_secret = \"s\"\n\
         header_recipients = \"strip\"",
    )
    .unwrap();
    let a = &c.accounts[0];
    assert_eq!(
        a.provider.scopes,
        ["https://www.googleapis.com/auth/gmail.send"]
    );
    assert_eq!(a.provider.api_url, "https://gmail.googleapis.com");
    assert_eq!(a.max_upstream_connections, 10);
    assert_eq!(
        (
            a.pacing.max_messages_per_minute,
            a.pacing.max_recipients_per_message
        ),
        (150, 100)
    );
    assert_eq!(a.header_recipients, HeaderRecipients::Strip);
}

#[test]
fn api_transport_mistakes_are_named_with_the_fix() {
    let e = with_provider("preset = \"yahoo\"\nclient_id = \"c\"")
        .unwrap_err()
        .0;
    assert!(
        e.contains("preset = \"yahoo\"") && e.contains("\"google\" or \"microsoft\""),
        "{e}"
    );
    let e = with_provider(
        "preset = \"microsoft\"\ntransport = \"graph\"\nclient_id = \"c\"\napi_url = \"http://graph.example.com/v1.0\"",
    )
    .unwrap_err()
    .0;
    assert!(e.contains("`api_url` must be an https URL"), "{e}");
    let e = with_provider("token_url = \"https://login.example.com/token\"\nclient_id = \"c\"")
        .unwrap_err()
        .0;
    assert!(
        e.contains("`smtp_host` is missing") && e.contains("transport"),
        "{e}"
    );
    // A loopback API (the tests' fakes) may be plain http; an API provider needs no smtp_host.
    let c = with_provider(
        "token_url = \"https://login.example.com/token\"\nclient_id = \"c\"\ntransport = \"gmail_api\"\n\
         api_url = \"http://127.0.0.1:8080/\"",
    )
    .unwrap();
    assert_eq!(c.accounts[0].provider.api_url, "http://127.0.0.1:8080");
    let e = with_provider(
        "preset = \"google\"\ntransport = \"graph\"\nclient_id = \"c\"\nclient_secret = \"s\"",
    )
    .unwrap_err()
    .0;
    assert!(e.contains("use preset = \"microsoft\""), "{e}");
    let e =
        with_provider("preset = \"microsoft\"\nclient_id = \"c\"\nheader_recipients = \"strip\"")
            .unwrap_err()
            .0;
    assert!(
        e.contains("apply to transport = \"graph\" or \"gmail_api\" only"),
        "{e}"
    );
}

#[test]
fn device_sources_belong_to_one_account_and_never_to_everyone() {
    let device = |name: &str, sources: &str| {
        format!(
            "\n[[accounts]]\nname = \"{name}\"\nprovider = \"corp\"\nmailbox = \"{name}@example.com\"\nsources = {sources}\n"
        )
    };
    let parse = |extra: String| Config::parse(&format!("{TEXT}{extra}"), Path::new("t.toml"));
    // An account of devices only: no login, no password; nobody logs in as it.
    let c = parse(device("scanner", r#"["192.168.10.0/24", "10.1.2.3"]"#)).unwrap();
    let scanner = c.account("scanner").unwrap();
    assert!(scanner.password_hash.is_none());
    assert_eq!(scanner.sources.len(), 2);
    assert!(scanner.sources[1].contains(&"10.1.2.3".parse::<std::net::IpAddr>().unwrap()));
    // Two accounts for one address.
    let e = parse(
        device("scanner", r#"["192.168.10.0/24"]"#) + &device("printer", r#"["192.168.10.7"]"#),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("account `scanner` source 192.168.10.0/24 and account `printer` source 192.168.10.7/32 overlap"),
        "{e}"
    );
    for everyone in ["0.0.0.0/0", "::/0"] {
        let e = parse(device("scanner", &format!("[\"{everyone}\"]")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is every address"), "{e}");
    }
    // Two halves make everyone too.
    let e = parse(device("scanner", r#"["0.0.0.0/1", "128.0.0.0/1"]"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is far too wide"), "{e}");
    // An IPv4-mapped entry matches the IPv4 peer it names.
    let c = parse(device("scanner", r#"["::ffff:10.1.2.3"]"#)).unwrap();
    assert_eq!(
        c.account("scanner").unwrap().sources[0].to_string(),
        "10.1.2.3/32"
    );
    let e = parse(device("scanner", r#"["printer.local"]"#))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is neither an address"), "{e}");
    // A login without a password is still refused.
    let e = parse(
        device("scanner", r#"["10.1.2.3"]"#)
            .replace("name = \"scanner\"", "name = \"scanner\"\nlogin = \"scan\""),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("`password_hash` is missing"), "{e}");
}
