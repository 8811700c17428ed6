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
