use super::*;
use crate::delivery::queue::disk::Os;

fn envelope(id: &str) -> Envelope {
    Envelope {
        id: id.into(),
        account: "news".into(),
        sender: "a@example.com".into(),
        recipients: vec!["b@example.org".into()],
        ..Envelope::default()
    }
}

#[tokio::test]
async fn a_message_moved_to_a_file_before_a_crash_never_comes_back_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let (spool, opened) = LocalSpool::open(dir.path(), Arc::new(Os)).unwrap();
    assert!(opened.stored.is_empty());
    let mut env = envelope("A1");
    let mut writer = spool.incoming(&env);
    writer.push(b"Subject: x\r\n\r\nbody\r\n").await;
    writer.commit(&mut env).await.unwrap();
    assert!(env.logged.is_some(), "small messages go to the log");
    // The move to a file got as far as the file; the crash came before the done record.
    let mut head = serde_json::to_vec(&env).unwrap();
    head.push(b'\n');
    head.extend_from_slice(b"Subject: x\r\n\r\nbody\r\n");
    std::fs::write(dir.path().join("queue/msg/A1"), head).unwrap();
    drop(spool);

    let (spool, opened) = LocalSpool::open(dir.path(), Arc::new(Os)).unwrap();
    let stored = opened.stored;
    assert_eq!(stored.len(), 1, "the file wins, once");
    assert!(stored[0].envelope.logged.is_none());
    spool.remove(&stored[0].envelope).await.unwrap();
    drop(spool);
    let (_spool, opened) = LocalSpool::open(dir.path(), Arc::new(Os)).unwrap();
    assert!(
        opened.stored.is_empty(),
        "delivered and gone, also from the log"
    );
}
