use super::*;
use crate::delivery::queue::disk::Os;
use std::os::unix::fs::FileExt;

/// A log in `dir` that counts every segment already there as live (nothing is deleted).
fn log(dir: &Path) -> Log {
    let live = numbers(dir).unwrap().into_iter().map(|n| (n, 1)).collect();
    Log::open(dir, Arc::new(Os), live, BTreeSet::new()).unwrap()
}

fn message<'a>(env: &'a [u8], body: &'a [u8]) -> Rec<'a> {
    Rec::Message {
        envelope: env,
        body,
    }
}

/// What a scan finds: ("M", envelope, body) and ("D", id, "") rows, and the damage.
fn found(dir: &Path) -> (Vec<(String, String, String)>, Vec<Damage>) {
    let corrupt = dir.parent().unwrap().join("corrupt");
    let scan = scan(dir, &corrupt, &Os).unwrap();
    let rows = scan
        .found
        .iter()
        .map(|f| match &f.record {
            Record::Message {
                envelope,
                body,
                len,
            } => (
                "M".to_string(),
                String::from_utf8_lossy(envelope).into_owned(),
                String::from_utf8_lossy(&read_at(dir, *body, *len).unwrap()).into_owned(),
            ),
            Record::Done { id, .. } => ("D".into(), id.clone(), String::new()),
        })
        .collect();
    (rows, scan.damage)
}

fn rows(list: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    list.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[test]
fn records_survive_a_reopen_and_a_torn_tail_is_cut_off() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("seg");
    std::fs::create_dir(&dir).unwrap();
    let mut log = log(&dir);
    let at = log
        .append(&[message(b"e1", b"one"), message(b"e2", b"two")])
        .unwrap();
    assert_eq!(read_at(&dir, at[1], 3).unwrap(), b"two");
    log.append(&[Rec::Done {
        segment: 0,
        id: "A1",
    }])
    .unwrap();
    drop(log);
    // A crash in the middle of the next append.
    let mut wire = Vec::new();
    let sync: [u8; 8] = std::fs::read(segment_path(&dir, 0)).unwrap()[8..16]
        .try_into()
        .unwrap();
    encode(&message(b"e3", b"three"), &sync, &mut wire);
    let f = OpenOptions::new()
        .append(true)
        .open(segment_path(&dir, 0))
        .unwrap();
    f.write_all_at(&wire[..30], f.metadata().unwrap().len())
        .unwrap();
    let (got, damage) = found(&dir);
    assert_eq!(
        got,
        rows(&[("M", "e1", "one"), ("M", "e2", "two"), ("D", "A1", "")])
    );
    assert!(damage.is_empty(), "a torn tail is no damage");
    // Cut off; the next start appends to a new segment, and everything reads back.
    let mut log = Log::open(
        &dir,
        Arc::new(Os),
        BTreeMap::from([(0, 1)]),
        BTreeSet::new(),
    )
    .unwrap();
    assert_eq!(log.active(), 1);
    log.append(&[message(b"e4", b"four")]).unwrap();
    assert_eq!(found(&dir).0.len(), 4);
}

#[test]
fn segments_go_oldest_first_once_nothing_in_them_is_live() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = log(dir.path());
    log.append(&[message(b"e", b"a")]).unwrap();
    log.rotate().unwrap();
    log.append(&[message(b"e", b"b")]).unwrap();
    log.rotate().unwrap();
    // The second segment's message is done, but the first still has a live one: both stay.
    log.release(1);
    assert_eq!(numbers(dir.path()).unwrap(), [0, 1, 2]);
    log.release(0);
    assert_eq!(numbers(dir.path()).unwrap(), [2]);
}

/// Writes `n` messages into one segment and closes it; returns the segment's bytes.
fn segment_with(dir: &Path, n: usize) -> Vec<u8> {
    let mut log = log(dir);
    for i in 0..n {
        let env = format!("env{i}");
        let body = format!("body {i} ").repeat(i + 1);
        log.append(&[message(env.as_bytes(), body.as_bytes())])
            .unwrap();
    }
    log.append(&[Rec::Done {
        segment: 0,
        id: "X",
    }])
    .unwrap();
    drop(log);
    std::fs::read(segment_path(dir, 0)).unwrap()
}

#[test]
fn a_damaged_record_costs_only_itself_and_is_kept_aside() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("seg");
    std::fs::create_dir(&dir).unwrap();
    let clean = segment_with(&dir, 5);
    // A later segment, so that the first is not the last (no torn tail there).
    log(&dir).append(&[message(b"later", b"x")]).unwrap();
    let (want, _) = found(&dir);
    // Every octet of the first segment past its header, flipped in turn: at most the record
    // it falls in is lost, and that record's bytes are kept aside.
    for at in (16..clean.len()).step_by(3) {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x40;
        std::fs::write(segment_path(&dir, 0), &bytes).unwrap();
        let _ = std::fs::remove_dir_all(root.path().join("corrupt"));
        let (got, damage) = found(&dir);
        assert_eq!(damage.len(), 1, "flip at {at}: {damage:?}");
        assert!(
            got.len() + 1 == want.len(),
            "flip at {at}: {} of {} records left",
            got.len(),
            want.len()
        );
        assert!(got.iter().all(|r| want.contains(r)), "flip at {at}");
        let d = &damage[0];
        let kept = std::fs::read(d.kept.as_ref().unwrap()).unwrap();
        assert_eq!(kept, &bytes[d.offset as usize..(d.offset + d.len) as usize]);
        // A damaged body whose envelope survived says whose it was.
        if let Some(env) = &d.envelope {
            assert!(env.starts_with(b"env"), "{env:?}");
        }
    }
}

#[test]
fn a_first_release_segment_still_loads_and_resyncs() {
    let dir = tempfile::tempdir().unwrap();
    let seg = dir.path().join("seg");
    std::fs::create_dir(&seg).unwrap();
    // The first release's format, as it wrote it.
    let v1 = |kind: u8, payload: &[u8]| {
        let mut body = vec![kind];
        body.extend_from_slice(payload);
        let mut out = (body.len() as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    };
    let mut bytes = Vec::new();
    bytes.extend(v1(KIND_MESSAGE, b"{\"id\":\"A\"}\nbody A\r\n"));
    let second = bytes.len();
    bytes.extend(v1(KIND_MESSAGE, b"{\"id\":\"B\"}\nbody B\r\n"));
    bytes.extend(v1(KIND_MESSAGE, b"{\"id\":\"C\"}\nbody C\r\n"));
    let mut done = 0u64.to_le_bytes().to_vec();
    done.extend_from_slice(b"A");
    bytes.extend(v1(KIND_DONE, &done));
    std::fs::write(segment_path(&seg, 0), &bytes).unwrap();
    let (got, damage) = found(&seg);
    assert_eq!(
        got,
        rows(&[
            ("M", "{\"id\":\"A\"}", "body A\r\n"),
            ("M", "{\"id\":\"B\"}", "body B\r\n"),
            ("M", "{\"id\":\"C\"}", "body C\r\n"),
            ("D", "A", ""),
        ])
    );
    assert!(damage.is_empty());
    // Its second record's length damaged: the rest still loads.
    bytes[second + 1] ^= 0x10;
    std::fs::write(segment_path(&seg, 0), &bytes).unwrap();
    log(&seg); // a later segment
    let (got, damage) = found(&seg);
    assert_eq!(damage.len(), 1);
    assert_eq!(
        got,
        rows(&[
            ("M", "{\"id\":\"A\"}", "body A\r\n"),
            ("M", "{\"id\":\"C\"}", "body C\r\n"),
            ("D", "A", ""),
        ])
    );
}
