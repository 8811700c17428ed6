use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::store::memory::MemoryStore;
use crate::util::clock::{Clock, ManualClock};
use crate::util::BoxFuture;

/// Answers every request with `answer`, counting them; rotates the refresh token when asked.
struct Scripted {
    calls: AtomicUsize,
    answer: Mutex<Result<u64, ProviderError>>,
    rotate: bool,
}

impl Scripted {
    fn new(answer: Result<u64, ProviderError>) -> Arc<Scripted> {
        Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            answer: Mutex::new(answer),
            rotate: false,
        })
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Issuer for Scripted {
    fn issue<'a>(
        &'a self,
        _account: &'a Account,
        _refresh_token: Option<&'a Secret>,
    ) -> BoxFuture<'a, Result<TokenSet, ProviderError>> {
        Box::pin(async move {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            // Let every waiter pile up behind the single flight.
            tokio::task::yield_now().await;
            let answer = lock(&self.answer).clone();
            answer.map(|lifetime| TokenSet {
                access_token: Secret::new(format!("at-{n}")),
                expires_in: Some(Duration::from_secs(lifetime)),
                refresh_expires_in: None,
                scope: None,
                refresh_token: self.rotate.then(|| Secret::new(format!("rt-{n}"))),
            })
        })
    }
}

/// Whether `event` fired once for `news` (no channel configured: the metric tells).
fn fired(tokens: &TokenManager, event: &str) -> bool {
    let text = tokens.observer.metrics.encode(&|_| {});
    text.contains(&format!(
        "xoauth_relay_alerts_total{{account=\"news\",event=\"{event}\"}} 1"
    ))
}

struct Fixture {
    tokens: Arc<TokenManager>,
    clock: Arc<ManualClock>,
    store: Store,
}

fn fixture(issuer: Arc<Scripted>) -> Fixture {
    fixture_alerting(issuer, crate::config::AlertsConfig::default())
}

/// With these alert thresholds (no channel: fired alerts show in the metrics).
fn fixture_alerting(issuer: Arc<Scripted>, alerts: crate::config::AlertsConfig) -> Fixture {
    // Any valid PHC string: these tests never verify a password.
    let config = crate::config::one_account(
            "news",
            "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U",
        );
    let store = Store::new(MemoryStore::default());
    let clock = ManualClock::new(1_000_000);
    let tokens = Arc::new(TokenManager::new(
        store.clone(),
        issuer,
        clock.clone(),
        Duration::from_secs(300),
        &config.accounts,
        TaskTracker::new(),
        Observer::new(&alerts, clock.clone()).unwrap(),
    ));
    Fixture {
        tokens,
        clock,
        store,
    }
}

/// An account with a grant whose token endpoint is unreachable, alerting after `secs`.
async fn endpoint_down_alerting_after(secs: u64) -> (Arc<Scripted>, Fixture) {
    let issuer = Scripted::new(Err(ProviderError::Unreachable("down".into())));
    let alerts = crate::config::AlertsConfig {
        alert_after_secs: secs,
        ..Default::default()
    };
    let f = fixture_alerting(issuer.clone(), alerts);
    with_grant(&f).await;
    (issuer, f)
}

async fn with_grant(f: &Fixture) {
    let grant = Grant {
        refresh_token: Some(Secret::new("rt-0")),
        obtained_at: f.clock.unix(),
        ..Grant::default()
    };
    f.store.put("news", grant).await.unwrap();
}

#[tokio::test]
async fn a_crowd_after_expiry_causes_one_request_and_the_token_is_cached_until_the_margin() {
    let issuer = Scripted::new(Ok(3600));
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    let crowd: Vec<_> = (0..50)
        .map(|_| {
            let t = f.tokens.clone();
            tokio::spawn(async move { t.token("news").await.map(|t| t.secret) })
        })
        .collect();
    for task in crowd {
        assert_eq!(task.await.unwrap().unwrap().expose(), "at-1");
    }
    assert_eq!(issuer.calls(), 1);
    // 3600 s lifetime, 300 s margin: good for 3299 s, refreshed after 3300.
    f.clock.advance(Duration::from_secs(3299));
    assert_eq!(
        f.tokens.token("news").await.unwrap().secret.expose(),
        "at-1"
    );
    assert_eq!(issuer.calls(), 1);
    f.clock.advance(Duration::from_secs(2));
    // Inside the margin: the cached token still serves while the refresh runs behind it.
    assert_eq!(
        f.tokens.token("news").await.unwrap().secret.expose(),
        "at-1"
    );
    after_refresh(&f, &issuer, 2).await;
    assert_eq!(
        f.tokens.token("news").await.unwrap().secret.expose(),
        "at-2"
    );
    assert_eq!(issuer.calls(), 2);
    let stored = f.store.get("news").unwrap().unwrap();
    assert_eq!(stored.access_token.unwrap().expose(), "at-2");
    assert_eq!(stored.access_expires_at, Some(f.clock.unix() + 3600));
}

#[tokio::test]
async fn a_failure_is_remembered_for_the_backoff_then_retried() {
    let issuer = Scripted::new(Err(ProviderError::Unreachable("down".into())));
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    for _ in 0..5 {
        let e = f.tokens.token("news").await.unwrap_err();
        assert!(matches!(e, TokenError::Unreachable { .. }), "{e}");
    }
    assert_eq!(issuer.calls(), 1);
    assert!(f.store.status("news").last_error.is_some());
    f.clock.advance(FAILURE_BACKOFF + Duration::from_secs(1));
    *lock(&issuer.answer) = Ok(3600);
    assert_eq!(
        f.tokens.token("news").await.unwrap().secret.expose(),
        "at-2"
    );
    assert_eq!(f.store.status("news").last_error, None);
}

#[tokio::test]
async fn refresh_failing_fires_once_the_endpoint_has_failed_for_alert_after_secs() {
    let (issuer, f) = endpoint_down_alerting_after(2).await;
    let fired = |f: &Fixture| fired(&f.tokens, "refresh_failing");
    assert!(f.tokens.token("news").await.is_err());
    assert!(!fired(&f), "one failure is no outage yet");
    // The next try comes after the backoff, longer than the threshold: still the same outage.
    f.clock.advance(FAILURE_BACKOFF + Duration::from_secs(1));
    assert!(f.tokens.token("news").await.is_err());
    assert_eq!(issuer.calls(), 2);
    assert!(fired(&f), "failing for longer than alert_after_secs");
}

#[tokio::test]
async fn invalid_grant_marks_the_grant_revoked_and_stops_asking() {
    let issuer = Scripted::new(Err(ProviderError::InvalidGrant(
        "Token has been revoked".into(),
    )));
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    let e = f.tokens.token("news").await.unwrap_err();
    assert!(
        e.to_string().contains("run `xoauth-relay authorize news`"),
        "{e}"
    );
    f.clock.advance(Duration::from_secs(3600));
    assert!(matches!(
        f.tokens.token("news").await.unwrap_err(),
        TokenError::Revoked { .. }
    ));
    assert_eq!(issuer.calls(), 1, "a revoked grant is never retried");
    assert!(f.store.status("news").revoked);
}

#[tokio::test]
async fn a_rotated_refresh_token_is_stored_before_the_access_token_is_used() {
    let issuer = Arc::new(Scripted {
        rotate: true,
        ..Arc::try_unwrap(Scripted::new(Ok(3600))).ok().unwrap()
    });
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    let token = f.tokens.token("news").await.unwrap();
    assert_eq!(token.secret.expose(), "at-1");
    let stored = f.store.get("news").unwrap().unwrap();
    assert_eq!(stored.refresh_token.unwrap().expose(), "rt-1");
    // A rejected token is replaced even though it has not expired.
    let again = f
        .tokens
        .token_after_rejection("news", &token.secret)
        .await
        .unwrap();
    assert_eq!(again.secret.expose(), "at-2");
    assert_eq!(issuer.calls(), 2);
}

/// Until the background refresh has asked the provider `calls` times in all, and finished.
async fn after_refresh(f: &Fixture, issuer: &Scripted, calls: usize) {
    while issuer.calls() < calls {
        tokio::task::yield_now().await;
    }
    f.tokens.settled("news").await;
}

#[tokio::test]
async fn a_quiet_grant_is_refreshed_once_after_keepalive_days() {
    let issuer = Scripted::new(Ok(3600));
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    let week = Duration::from_secs(7 * 86_400);
    f.tokens.keep_alive(week).await;
    assert_eq!(issuer.calls(), 0, "used today");
    f.clock.advance(Duration::from_secs(8 * 86_400));
    f.tokens.keep_alive(week).await;
    assert_eq!(issuer.calls(), 1, "unused for 8 days");
    f.tokens.keep_alive(week).await;
    assert_eq!(issuer.calls(), 1, "just refreshed");
}

#[tokio::test]
async fn a_refresh_token_the_provider_says_dies_soon_raises_grant_expiring() {
    let f = fixture(Scripted::new(Ok(3600)));
    let grant = Grant {
        refresh_token: Some(Secret::new("rt-0")),
        obtained_at: f.clock.unix(),
        refresh_expires_at: Some(f.clock.unix() + 7 * 86_400),
        ..Grant::default()
    };
    f.store.put("news", grant).await.unwrap();
    let fired = |f: &Fixture| fired(&f.tokens, "grant_expiring");
    let week = Duration::from_secs(7 * 86_400);
    f.tokens.keep_alive(week).await;
    assert!(!fired(&f), "7 days left");
    f.clock.advance(Duration::from_secs(5 * 86_400 + 60));
    f.tokens.keep_alive(week).await;
    assert!(fired(&f), "under 2 days left");
}

#[tokio::test]
async fn a_short_lived_token_is_used_for_two_thirds_of_its_life() {
    let issuer = Scripted::new(Ok(5));
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    f.tokens.token("news").await.unwrap();
    f.clock.advance(Duration::from_millis(3300));
    f.tokens.token("news").await.unwrap();
    assert_eq!(
        issuer.calls(),
        1,
        "5 s token, 300 s margin: still fresh at 3.3 s"
    );
    f.clock.advance(Duration::from_millis(100));
    f.tokens.token("news").await.unwrap();
    after_refresh(&f, &issuer, 2).await;
    assert_eq!(
        issuer.calls(),
        2,
        "refreshed once a third of its life is left"
    );
}

#[tokio::test]
async fn an_outage_near_expiry_keeps_the_cached_token_until_it_expires() {
    let issuer = Scripted::new(Ok(3600));
    let f = fixture(issuer.clone());
    with_grant(&f).await;
    assert_eq!(
        f.tokens.token("news").await.unwrap().secret.expose(),
        "at-1"
    );
    *lock(&issuer.answer) = Err(ProviderError::Unreachable("down".into()));
    // Two minutes before expiry (inside the 300 s margin): the refresh fails, the token serves.
    f.clock.advance(Duration::from_secs(3480));
    for _ in 0..3 {
        assert_eq!(
            f.tokens.token("news").await.unwrap().secret.expose(),
            "at-1"
        );
        after_refresh(&f, &issuer, 2).await;
    }
    assert_eq!(issuer.calls(), 2, "one failed refresh, then the backoff");
    // Once it has expired, the outage shows.
    f.clock.advance(Duration::from_secs(121));
    assert!(matches!(
        f.tokens.token("news").await.unwrap_err(),
        TokenError::Unreachable { .. }
    ));
}

#[tokio::test]
async fn no_grant_means_authorize() {
    let issuer = Scripted::new(Ok(3600));
    let f = fixture(issuer.clone());
    let e = f.tokens.token("news").await.unwrap_err();
    assert!(matches!(e, TokenError::NeedsAuthorization { .. }), "{e}");
    assert_eq!(issuer.calls(), 0);
}

/// The endpoint fails from the start; sessions come 3.5 s apart, the second answered from the
/// remembered failure: the upkeep still asks at the threshold, and `refresh_failing` fires.
#[tokio::test]
async fn refresh_failing_fires_at_the_threshold_however_sessions_space_their_tries() {
    let (issuer, f) = endpoint_down_alerting_after(3).await;
    let fired = |f: &Fixture| fired(&f.tokens, "refresh_failing");
    let account = f.tokens.slot("news").unwrap().account.load_full();
    assert!(f.tokens.token("news").await.is_err());
    f.clock.advance(Duration::from_millis(3500));
    assert!(f.tokens.token("news").await.is_err());
    assert_eq!(issuer.calls(), 1, "answered from the remembered failure");
    assert!(!fired(&f));
    assert!(
        f.tokens.next_upkeep().is_some_and(|t| t <= f.clock.now()),
        "the upkeep has the threshold due"
    );
    f.tokens.upkeep();
    after_refresh(&f, &issuer, 2).await;
    assert!(fired(&f), "failing for longer than alert_after_secs");
    assert!(!f.tokens.grant_ok(&account), "grant_ok says 0 meanwhile");
}

/// A fixture on tokio's clock (paused by the test), and the upkeep running as in the relay.
fn paused_fixture(issuer: Arc<Scripted>) -> (Arc<TokenManager>, Store) {
    let config = crate::config::one_account(
            "news",
            "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U",
        );
    let store = Store::new(MemoryStore::default());
    let clock = crate::util::clock::system();
    let tokens = Arc::new(TokenManager::new(
        store.clone(),
        issuer,
        clock.clone(),
        Duration::from_secs(300),
        &config.accounts,
        TaskTracker::new(),
        Observer::quiet(clock),
    ));
    tokio::spawn(
        tokens
            .clone()
            .run_upkeep(tokio_util::sync::CancellationToken::new()),
    );
    (tokens, store)
}

#[tokio::test(start_paused = true)]
async fn a_token_in_use_is_refreshed_before_it_expires_whatever_its_lifetime() {
    for lifetime in [4u64, 12, 3600] {
        let issuer = Scripted::new(Ok(lifetime));
        let (tokens, store) = paused_fixture(issuer.clone());
        let grant = Grant {
            refresh_token: Some(Secret::new("rt-0")),
            obtained_at: crate::util::clock::now_unix(),
            ..Grant::default()
        };
        store.put("news", grant).await.unwrap();
        // Used once, then no mailer at all.
        assert_eq!(tokens.token("news").await.unwrap().secret.expose(), "at-1");
        tokio::time::sleep(Duration::from_millis(lifetime * 1000 - 10)).await;
        assert_eq!(
            issuer.calls(),
            2,
            "{lifetime} s token: refreshed before expiry"
        );
        let left = tokens.cached_for("news").unwrap();
        assert!(
            left > Duration::from_millis(lifetime * 1000 / 2),
            "{lifetime} s: {left:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_revoked_while_nobody_sends_is_reported_within_the_token_lifetime() {
    let issuer = Scripted::new(Ok(12));
    let (tokens, store) = paused_fixture(issuer.clone());
    let grant = Grant {
        refresh_token: Some(Secret::new("rt-0")),
        obtained_at: crate::util::clock::now_unix(),
        ..Grant::default()
    };
    store.put("news", grant).await.unwrap();
    tokens.token("news").await.unwrap();
    *lock(&issuer.answer) = Err(ProviderError::InvalidGrant("revoked".into()));
    tokio::time::sleep(Duration::from_millis(11_900)).await;
    assert!(fired(&tokens, "grant_revoked"));
    assert!(store.status("news").revoked);
}

#[tokio::test]
async fn a_rotated_refresh_token_that_cannot_be_saved_raises_an_alert_and_is_saved_later() {
    let issuer = Arc::new(Scripted {
        rotate: true,
        ..Arc::try_unwrap(Scripted::new(Ok(3600))).ok().unwrap()
    });
    let memory = Arc::new(MemoryStore::default());
    let store = Store::new(SharedMemory(memory.clone()));
    let config = crate::config::one_account(
            "news",
            "$argon2id$v=19$m=19456,t=2,p=1$8uLpBtLr7xHax5eifcWBXA$QKTwp/o3Eg0VHq7aeAVpq5nU6VsxKM0bSk9xdcSnc0U",
        );
    let clock = ManualClock::new(1_000_000);
    let tokens = Arc::new(TokenManager::new(
        store.clone(),
        issuer.clone(),
        clock.clone(),
        Duration::from_secs(300),
        &config.accounts,
        TaskTracker::new(),
        Observer::quiet(clock.clone()),
    ));
    let grant = Grant {
        refresh_token: Some(Secret::new("rt-0")),
        obtained_at: clock.unix(),
        ..Grant::default()
    };
    store.put("news", grant).await.unwrap();
    memory.full.store(true, Ordering::SeqCst);
    assert_eq!(tokens.token("news").await.unwrap().secret.expose(), "at-1");
    let text = tokens.observer.metrics.encode(&|_| {});
    assert!(
        text.contains("xoauth_relay_alerts_total{account=\"news\",event=\"grant_save_failed\"} 1"),
        "{text}"
    );
    assert_eq!(stored_refresh_token(&store), "rt-0");
    tokens.save_unsaved().await;
    assert_eq!(stored_refresh_token(&store), "rt-0", "still full");
    memory.full.store(false, Ordering::SeqCst);
    tokens.save_unsaved().await;
    assert_eq!(
        stored_refresh_token(&store),
        "rt-1",
        "the rotated refresh token reached the store"
    );
}

/// The refresh token of `news` in the store, as the next start would read it.
fn stored_refresh_token(store: &Store) -> String {
    let grant = store.get("news").unwrap().expect("a stored grant");
    grant
        .refresh_token
        .expect("a refresh token")
        .expose()
        .to_string()
}

/// A [`MemoryStore`] the test keeps a handle on.
struct SharedMemory(Arc<MemoryStore>);

impl crate::store::GrantStore for SharedMemory {
    fn get(&self, account: &str) -> Result<Option<Grant>, crate::store::StoreError> {
        self.0.get(account)
    }
    fn put(&self, account: &str, grant: &Grant) -> Result<(), crate::store::StoreError> {
        self.0.put(account, grant)
    }
    fn remove(&self, account: &str) -> Result<bool, crate::store::StoreError> {
        self.0.remove(account)
    }
    fn status(&self, account: &str) -> crate::store::Status {
        self.0.status(account)
    }
    fn update_status(&self, account: &str, f: &dyn Fn(&mut crate::store::Status)) {
        self.0.update_status(account, f)
    }
    fn flush(&self) -> Result<(), crate::store::StoreError> {
        self.0.flush()
    }
}
