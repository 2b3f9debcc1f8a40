//! Behaviour every store shares (run against both [`MemLog`] and
//! [`EngineLog`], each also after a restart), then what is particular to each.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};

use bytes::Bytes;

use crate::*;

fn entry(index: u64, term: u64) -> Entry {
    Entry {
        index,
        term,
        data: Bytes::from(format!("group data {index}@{term} ").repeat(8)),
        ..Default::default()
    }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|i| entry(i, term)).collect()
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

fn append(group: u64, es: Vec<Entry>) -> GroupWrite {
    GroupWrite {
        group,
        entries: es,
        ..Default::default()
    }
}

fn indexes(state: &GroupState) -> Vec<(u64, u64)> {
    state.entries.iter().map(|e| (e.index, e.term)).collect()
}

fn load<S: RaftLogStore>(s: &S, group: u64) -> GroupState {
    s.load(group)
        .unwrap()
        .unwrap_or_else(|| panic!("group {group} missing"))
}

// ---------------------------------------------------------------------------
// Shared behaviour. `open` returns the store as a restarted process would
// find it: everything written before is expected to be there.

fn round_trip<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    assert_eq!(s.groups().unwrap(), Vec::<u64>::new());
    let mut batch = Vec::new();
    for g in [7u64, 3, 1 << 40] {
        batch.push(GroupWrite {
            group: g,
            entries: entries(1..=5, 2),
            hard_state: Some(hard_state(2, g % 5, 4)),
            conf_state: Some(ConfState::from((vec![1, 2, 3], vec![g]))),
            destaged_index: Some(3),
            compact_to: None,
        });
    }
    s.write_batch(batch).unwrap();
    let check = |s: &S| {
        assert_eq!(s.groups().unwrap(), vec![3, 7, 1 << 40]);
        for g in [7u64, 3, 1 << 40] {
            let st = load(s, g);
            assert_eq!(st.hard_state, hard_state(2, g % 5, 4));
            assert_eq!(st.conf_state, ConfState::from((vec![1, 2, 3], vec![g])));
            assert_eq!(st.destaged_index, 3);
            assert_eq!(st.entries, entries(1..=5, 2));
        }
        assert!(s.load(99).unwrap().is_none());
    };
    check(&s);
    drop(s);
    check(&open());
}

fn values_alone_create_a_group<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![GroupWrite {
        group: 4,
        hard_state: Some(hard_state(1, 1, 0)),
        ..Default::default()
    }])
    .unwrap();
    drop(s);
    let s = open();
    let st = load(&s, 4);
    assert_eq!(st.hard_state, hard_state(1, 1, 0));
    assert_eq!(st.conf_state, ConfState::default());
    assert_eq!(st.destaged_index, 0);
    assert!(st.entries.is_empty());
    // Later values replace earlier ones; absent ones are kept.
    s.write_batch(vec![GroupWrite {
        group: 4,
        destaged_index: Some(9),
        ..Default::default()
    }])
    .unwrap();
    let st = load(&s, 4);
    assert_eq!((st.hard_state, st.destaged_index), (hard_state(1, 1, 0), 9));
    // An empty write is fine and stores nothing.
    s.write_batch(vec![GroupWrite {
        group: 5,
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(s.groups().unwrap(), vec![4]);
}

fn truncation<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![append(1, entries(1..=10, 1))]).unwrap();
    // A new leader (term 2) overwrites from index 7: 9 and 10 must go.
    s.write_batch(vec![append(1, entries(7..=8, 2))]).unwrap();
    let want: Vec<Entry> = entries(1..=6, 1).into_iter().chain(entries(7..=8, 2)).collect();
    assert_eq!(load(&s, 1).entries, want);
    drop(s);
    let s = open();
    assert_eq!(load(&s, 1).entries, want);
    // Appending right after the end continues the log.
    s.write_batch(vec![append(1, entries(9..=9, 2))]).unwrap();
    assert_eq!(load(&s, 1).entries.len(), 9);
}

fn same_group_twice_in_one_batch<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![
        append(1, entries(1..=3, 1)),
        append(2, entries(1..=1, 1)),
        append(1, entries(4..=5, 1)),
        append(1, entries(5..=6, 2)),
    ])
    .unwrap();
    drop(s);
    let s = open();
    assert_eq!(
        indexes(&load(&s, 1)),
        vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]
    );
}

fn compaction<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![append(1, entries(1..=10, 1))]).unwrap();
    s.write_batch(vec![GroupWrite {
        group: 1,
        compact_to: Some(5),
        destaged_index: Some(4),
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(load(&s, 1).entries, entries(5..=10, 1));
    // Entries first, then compaction, in one write.
    s.write_batch(vec![GroupWrite {
        group: 1,
        entries: entries(11..=12, 1),
        compact_to: Some(8),
        ..Default::default()
    }])
    .unwrap();
    drop(s);
    let s = open();
    let st = load(&s, 1);
    assert_eq!(st.entries, entries(8..=12, 1));
    assert_eq!(st.destaged_index, 4);
    // Compacting below the first entry changes nothing.
    s.write_batch(vec![GroupWrite {
        group: 1,
        compact_to: Some(3),
        ..Default::default()
    }])
    .unwrap();
    assert_eq!(load(&s, 1).entries, entries(8..=12, 1));
    // Rewriting compacted entries is refused.
    let err = s.write_batch(vec![append(1, entries(6..=7, 2))]).unwrap_err();
    assert!(
        matches!(
            err,
            LogError::BelowCompacted {
                group: 1,
                index: 6,
                first_index: 8
            }
        ),
        "{err}"
    );
    // Compacting past the end empties the log but keeps the group.
    s.write_batch(vec![GroupWrite {
        group: 1,
        compact_to: Some(13),
        ..Default::default()
    }])
    .unwrap();
    drop(s);
    let s = open();
    let st = load(&s, 1);
    assert!(st.entries.is_empty());
    assert_eq!(s.groups().unwrap(), vec![1]);
    s.write_batch(vec![append(1, entries(13..=14, 3))]).unwrap();
    assert_eq!(load(&s, 1).entries, entries(13..=14, 3));
}

fn snapshot_jump<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![append(1, entries(1..=5, 1))]).unwrap();
    let err = s.write_batch(vec![append(1, entries(100..=101, 4))]).unwrap_err();
    assert!(
        matches!(
            err,
            LogError::Gap {
                group: 1,
                index: 100,
                last_index: 5
            }
        ),
        "{err}"
    );
    // With compaction up to the new entries, the jump is a snapshot install.
    s.write_batch(vec![GroupWrite {
        group: 1,
        entries: entries(100..=101, 4),
        compact_to: Some(100),
        hard_state: Some(hard_state(4, 0, 99)),
        ..Default::default()
    }])
    .unwrap();
    drop(s);
    let s = open();
    let st = load(&s, 1);
    assert_eq!(st.entries, entries(100..=101, 4));
    assert_eq!(st.hard_state.commit, 99);
    s.write_batch(vec![append(1, entries(102..=102, 4))]).unwrap();
    assert_eq!(load(&s, 1).entries.len(), 3);
}

fn refusals_store_nothing<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![append(1, entries(1..=3, 1))]).unwrap();
    let refused = |s: &S, batch: Vec<GroupWrite>| {
        // A valid write to another group rides along: it must not land either.
        let mut all = vec![append(2, entries(1..=2, 1))];
        all.extend(batch);
        s.write_batch(all).unwrap_err()
    };
    let err = refused(&s, vec![append(1, vec![entry(4, 1), entry(6, 1)])]);
    assert!(
        matches!(
            err,
            LogError::NotContiguous {
                group: 1,
                index: 6,
                expected: 5
            }
        ),
        "{err}"
    );
    let err = refused(&s, vec![append(1, vec![entry(0, 1)])]);
    assert!(matches!(err, LogError::NotContiguous { index: 0, .. }), "{err}");
    let err = refused(&s, vec![append(1, entries(5..=5, 1))]);
    assert!(matches!(err, LogError::Gap { .. }), "{err}");

    let mut big = entry(4, 1);
    big.data = Bytes::from(vec![0u8; MAX_ENTRY_BYTES + 1]);
    let err = refused(&s, vec![append(1, vec![big])]);
    assert!(
        matches!(
            err,
            LogError::EntryTooLarge {
                group: 1,
                index: 4,
                max: MAX_ENTRY_BYTES,
                ..
            }
        ),
        "{err}"
    );
    let chunk = Bytes::from(vec![7u8; 30 * 1024 * 1024]);
    let many: Vec<Entry> = (4..=6)
        .map(|i| {
            let mut e = entry(i, 1);
            e.data = chunk.clone();
            e
        })
        .collect();
    let err = refused(&s, vec![append(1, many)]);
    assert!(
        matches!(
            err,
            LogError::BatchTooLarge {
                max: MAX_BATCH_BYTES,
                ..
            }
        ),
        "{err}"
    );

    drop(s);
    let s = open();
    assert_eq!(s.groups().unwrap(), vec![1]);
    assert_eq!(load(&s, 1).entries, entries(1..=3, 1));
}

fn big_entries_fit<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    let mut e = entry(1, 1);
    e.data = Bytes::from(vec![0x5au8; 32 * 1024 * 1024 + 4096]);
    s.write_batch(vec![append(1, vec![e.clone()])]).unwrap();
    drop(s);
    let s = open();
    assert_eq!(load(&s, 1).entries, vec![e]);
}

fn remove_group<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch(vec![
        GroupWrite {
            group: 1,
            entries: entries(1..=4, 1),
            hard_state: Some(hard_state(1, 1, 4)),
            destaged_index: Some(2),
            ..Default::default()
        },
        append(2, entries(1..=2, 1)),
    ])
    .unwrap();
    s.remove_group(1).unwrap();
    assert!(s.load(1).unwrap().is_none());
    drop(s);
    let s = open();
    assert_eq!(s.groups().unwrap(), vec![2]);
    assert!(s.load(1).unwrap().is_none());
    assert_eq!(load(&s, 2).entries, entries(1..=2, 1));
    // The replica moves back: the same group id starts over from nothing.
    s.write_batch(vec![append(1, entries(1..=1, 5))]).unwrap();
    drop(s);
    let s = open();
    let st = load(&s, 1);
    assert_eq!(st.entries, entries(1..=1, 5));
    assert_eq!(st.hard_state, HardState::default());
    assert_eq!(st.destaged_index, 0);
    // Removing an unknown group is fine.
    s.remove_group(42).unwrap();
}

fn sync_count_grows<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    let before = s.sync_count();
    s.write_batch(vec![append(1, entries(1..=1, 1)), append(2, entries(1..=1, 1))])
        .unwrap();
    assert_eq!(s.sync_count(), before + 1, "one batch, one fdatasync");
}

/// The log writer's pipeline: write unsynced, then sync (while the next
/// round is written). Whatever was written before a sync survives a restart.
fn unsynced_writes_then_sync<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let s = open();
    s.write_batch_unsynced(vec![append(1, entries(1..=2, 1))]).unwrap();
    s.write_batch_unsynced(vec![GroupWrite {
        group: 1,
        entries: entries(3..=3, 1),
        hard_state: Some(hard_state(1, 1, 2)),
        ..Default::default()
    }])
    .unwrap();
    let before = s.sync_count();
    s.sync().unwrap();
    assert!(s.sync_count() > before, "a sync is an fdatasync");
    drop(s);
    let s = open();
    let st = load(&s, 1);
    assert_eq!(st.entries, entries(1..=3, 1));
    assert_eq!(st.hard_state, hard_state(1, 1, 2));
}

fn faults_surface<S: RaftLogStore>(open: &mut dyn FnMut() -> S) {
    let (s, faults) = FaultyLog::new(open());
    s.write_batch(vec![append(1, entries(1..=2, 1))]).unwrap();
    faults.fail_next_writes(2);
    for i in 3..=4 {
        let err = s.write_batch(vec![append(1, entries(i..=i, 1))]).unwrap_err();
        assert!(matches!(err, LogError::Io { op: "write_batch", .. }), "{err}");
        assert!(err.to_string().contains("injected"), "{err}");
    }
    assert!(matches!(s.remove_group(1), Ok(())), "faults are used up");
    s.write_batch(vec![append(1, entries(1..=2, 1))]).unwrap();
    assert_eq!(faults.injected(), 2);
    assert_eq!(load(&s, 1).entries, entries(1..=2, 1), "failed writes did not land");

    // The disk dies after one more write.
    faults.fail_after_writes(1);
    s.write_batch(vec![append(1, entries(3..=3, 1))]).unwrap();
    for _ in 0..3 {
        assert!(s.write_batch(vec![append(1, entries(4..=4, 1))]).is_err());
    }
    assert!(s.remove_group(1).is_err());
    faults.heal();

    // A write that reached the disk but whose fdatasync failed: the caller
    // still sees the error.
    faults.set_failed_writes_land(true);
    faults.fail_next_writes(1);
    assert!(s.write_batch(vec![append(1, entries(4..=4, 1))]).is_err());
    assert_eq!(load(&s, 1).entries, entries(1..=4, 1));
    assert_eq!(faults.injected(), 7);
}

macro_rules! shared_tests {
    ($modname:ident, $fresh:expr) => {
        mod $modname {
            use super::*;

            #[test]
            fn round_trip_of_several_groups() {
                let mut f = $fresh;
                round_trip(&mut f.opener());
            }
            #[test]
            fn values_alone() {
                let mut f = $fresh;
                values_alone_create_a_group(&mut f.opener());
            }
            #[test]
            fn truncation_replaces_the_tail() {
                let mut f = $fresh;
                truncation(&mut f.opener());
            }
            #[test]
            fn one_group_twice_in_a_batch() {
                let mut f = $fresh;
                same_group_twice_in_one_batch(&mut f.opener());
            }
            #[test]
            fn compact_to() {
                let mut f = $fresh;
                compaction(&mut f.opener());
            }
            #[test]
            fn snapshot_install_jumps_ahead() {
                let mut f = $fresh;
                snapshot_jump(&mut f.opener());
            }
            #[test]
            fn bad_writes_are_refused_whole() {
                let mut f = $fresh;
                refusals_store_nothing(&mut f.opener());
            }
            #[test]
            fn a_32_mib_entry_fits() {
                let mut f = $fresh;
                big_entries_fit(&mut f.opener());
            }
            #[test]
            fn remove_group_then_reuse_it() {
                let mut f = $fresh;
                remove_group(&mut f.opener());
            }
            #[test]
            fn one_sync_per_batch() {
                let mut f = $fresh;
                sync_count_grows(&mut f.opener());
            }
            #[test]
            fn unsynced_writes_are_durable_after_a_sync() {
                let mut f = $fresh;
                unsynced_writes_then_sync(&mut f.opener());
            }
            #[test]
            fn faulty_log_errors_surface() {
                let mut f = $fresh;
                faults_surface(&mut f.opener());
            }
        }
    };
}

/// A MemLog "restart" is a crash: only what was synced survives, which for
/// `write_batch` is everything.
struct MemFixture(Arc<MemLog>);

impl MemFixture {
    fn opener(&mut self) -> impl FnMut() -> Arc<MemLog> + '_ {
        || {
            self.0.crash();
            self.0.clone()
        }
    }
}

struct EngineFixture {
    dir: tempfile::TempDir,
    config: EngineLogConfig,
}

impl EngineFixture {
    fn new() -> EngineFixture {
        EngineFixture::with(small_files())
    }

    fn with(config: EngineLogConfig) -> EngineFixture {
        EngineFixture {
            dir: tempfile::tempdir().unwrap(),
            config,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("raft-log")
    }

    fn open(&self) -> Result<EngineLog, LogError> {
        EngineLog::open_with(self.path(), self.config.clone())
    }

    fn opener(&mut self) -> impl FnMut() -> EngineLog + '_ {
        || self.open().unwrap()
    }
}

/// Small files, so tests span several of them.
fn small_files() -> EngineLogConfig {
    EngineLogConfig {
        target_file_size: 16 * 1024,
        purge_threshold: 64 * 1024,
        ..EngineLogConfig::default()
    }
}

shared_tests!(mem, MemFixture(Arc::new(MemLog::new())));
shared_tests!(engine, EngineFixture::new());

// ---------------------------------------------------------------------------
// MemLog

#[test]
fn mem_crash_loses_only_unsynced_writes() {
    let m = MemLog::new();
    m.write_batch(vec![append(1, entries(1..=3, 1))]).unwrap();
    m.write_unsynced(vec![append(1, entries(4..=5, 1))]).unwrap();
    m.write_unsynced(vec![append(2, entries(1..=1, 1))]).unwrap();
    assert_eq!(m.unsynced_writes(), 2);
    assert_eq!(load(&m, 1).entries.len(), 5, "readers see unsynced writes");
    m.crash();
    assert_eq!(load(&m, 1).entries, entries(1..=3, 1));
    assert!(m.load(2).unwrap().is_none());
    assert_eq!(m.unsynced_writes(), 0);

    // A removal that was not synced does not happen either.
    m.write_unsynced(vec![append(1, entries(4..=4, 1))]).unwrap();
    m.sync();
    m.write_unsynced(vec![append(1, entries(5..=5, 1))]).unwrap();
    m.write_unsynced(vec![append(1, entries(6..=6, 1))]).unwrap();
    m.crash_keeping(1);
    assert_eq!(
        load(&m, 1).entries,
        entries(1..=5, 1),
        "a prefix of the unsynced writes survives"
    );
}

// ---------------------------------------------------------------------------
// EngineLog: files, recovery, group commit, failures

fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "raftlog"))
        .collect();
    v.sort();
    v
}

/// Writes `n` batches of one entry each (about 2 KiB) to group 1.
fn fill(s: &EngineLog, n: u64) {
    for i in 1..=n {
        let mut e = entry(i, 1);
        e.data = Bytes::from(format!("payload-{i:06}-").repeat(128));
        s.write_batch(vec![GroupWrite {
            group: 1,
            entries: vec![e],
            hard_state: Some(hard_state(1, 1, i)),
            ..Default::default()
        }])
        .unwrap();
    }
}

fn flip(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, offset).unwrap();
    for x in &mut b {
        *x ^= 0xa5;
    }
    f.write_all_at(&b, offset).unwrap();
}

fn find(path: &Path, needle: &[u8]) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in file") as u64
}

#[test]
fn several_files_and_reopen() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    fill(&s, 40);
    drop(s);
    assert!(log_files(&f.path()).len() >= 3, "small files rotate");
    let s = f.open().unwrap();
    let st = load(&s, 1);
    assert_eq!(st.entries.len(), 40);
    assert_eq!(st.hard_state.commit, 40);
}

#[test]
fn torn_tail_is_dropped() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    fill(&s, 40);
    drop(s);
    let last = log_files(&f.path()).pop().unwrap();
    let len = std::fs::metadata(&last).unwrap().len();
    // A crash cut the last write short.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let report = crate::verify::verify_dir(&f.path()).unwrap();
    assert_eq!(report.torn.len(), 1);
    assert!(!report.torn[0].zeroes && report.torn[0].file == last);
    let s = f.open().unwrap();
    let st = load(&s, 1);
    assert_eq!(indexes(&st), (1..=39).map(|i| (i, 1)).collect::<Vec<_>>());
    assert_eq!(st.hard_state.commit, 39, "the torn batch's hard state went with it");
    // The log goes on from there.
    fill_from(&s, 40, 41);
    drop(s);
    assert_eq!(load(&f.open().unwrap(), 1).entries.len(), 41);
}

fn fill_from(s: &EngineLog, from: u64, to: u64) {
    for i in from..=to {
        s.write_batch(vec![append(1, vec![entry(i, 1)])]).unwrap();
    }
}

#[test]
fn crash_image_opens_with_everything_synced() {
    // Copy the directory while the engine runs: what a power cut leaves,
    // including the zero-filled preallocated tail of the active file.
    let f = EngineFixture::with(EngineLogConfig {
        target_file_size: 1024 * 1024,
        ..small_files()
    });
    let s = f.open().unwrap();
    fill(&s, 10);
    let image = tempfile::tempdir().unwrap();
    for p in log_files(&f.path()) {
        std::fs::copy(&p, image.path().join(p.file_name().unwrap())).unwrap();
    }
    let active = log_files(image.path()).pop().unwrap();
    let bytes = std::fs::read(&active).unwrap();
    assert_eq!(bytes.last(), Some(&0), "the active file is preallocated with zeroes");
    let report = crate::verify::verify_dir(image.path()).unwrap();
    assert!(report.torn.len() == 1 && report.torn[0].zeroes, "{report:?}");
    let s2 = EngineLog::open(image.path()).unwrap();
    assert_eq!(load(&s2, 1).entries.len(), 10);
    drop(s);
}

#[test]
fn corruption_in_an_earlier_file_is_refused_with_file_and_offset() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    fill(&s, 40);
    drop(s);
    let files = log_files(&f.path());
    let first = &files[0];
    let len = std::fs::metadata(first).unwrap().len();
    flip(first, len / 2);
    let err = f.open().err().expect("corruption refused");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    let name = first.file_name().unwrap().to_str().unwrap();
    assert!(matches!(err, LogError::Corrupt { .. }), "{msg}");
    assert!(msg.contains(name) && msg.contains("offset"), "{msg}");
}

#[test]
fn damaged_entry_data_mid_file_is_refused_at_open() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    fill(&s, 40);
    drop(s);
    let files = log_files(&f.path());
    let second = &files[1];
    let at = find(second, b"payload-0000");
    flip(second, at + 40);

    // raft-engine alone opens this log: it checks entries only when read.
    let unverified = EngineLog::open_with(
        f.path(),
        EngineLogConfig {
            verify_on_open: false,
            ..small_files()
        },
    )
    .unwrap();
    let err = unverified.load(1).unwrap_err();
    eprintln!("raft-engine alone: {err}");
    assert!(matches!(err, LogError::ReadEntries { group: 1, .. }), "{err}");
    drop(unverified);

    let err = f.open().err().expect("corruption refused");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(msg.contains(second.file_name().unwrap().to_str().unwrap()), "{msg}");
    assert!(msg.contains("entries checksum mismatch"), "{msg}");
}

#[test]
fn corruption_before_valid_batches_in_the_last_file_is_not_a_torn_tail() {
    let f = EngineFixture::with(EngineLogConfig {
        target_file_size: 1024 * 1024,
        ..small_files()
    });
    let s = f.open().unwrap();
    fill(&s, 10);
    drop(s);
    let files = log_files(&f.path());
    assert_eq!(files.len(), 1);
    let at = find(&files[0], b"payload-000004");
    flip(&files[0], at + 100);
    let err = f.open().err().expect("refused");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(msg.contains("not a torn tail"), "{msg}");
    assert!(msg.contains(files[0].file_name().unwrap().to_str().unwrap()), "{msg}");
}

/// A log in one file with preallocated zeroes after its batches (a crash
/// image), as the daemon's 64 MiB files usually are.
fn one_file_crash_image() -> (EngineFixture, tempfile::TempDir, PathBuf) {
    let f = EngineFixture::with(EngineLogConfig {
        target_file_size: 1024 * 1024,
        ..small_files()
    });
    let s = f.open().unwrap();
    fill(&s, 10);
    let image = tempfile::tempdir().unwrap();
    for p in log_files(&f.path()) {
        std::fs::copy(&p, image.path().join(p.file_name().unwrap())).unwrap();
    }
    drop(s);
    let file = log_files(image.path()).pop().unwrap();
    (f, image, file)
}

fn poke(path: &Path, offset: u64, xor: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= xor;
    f.write_all_at(&b, offset).unwrap();
}

/// The batch header has no checksum: a damaged length in the first batch
/// of the last file used to send the search for a following batch past
/// every real one (into the preallocated zeroes), and the whole file was
/// dropped as a torn tail.
#[test]
fn a_damaged_batch_length_in_the_last_file_is_not_a_torn_tail() {
    use std::os::unix::fs::FileExt;
    let (_f, image, file) = one_file_crash_image();
    let bytes = std::fs::read(&file).unwrap();
    let spans = fuzz::batch_spans(&bytes);
    let valid_end = spans.last().unwrap().1;
    assert!(spans.len() > 5 && valid_end + 1000 < bytes.len() as u64);
    // The first batch (at 69, after the v2 file header) now claims to end
    // in the zeroes past the last batch: the length is the top 56 bits of
    // its first u64, the compression type the low 8.
    let first = spans[0].0;
    let len_and_type = ((valid_end + 16 - first) << 8) | u64::from(bytes[first as usize + 7]);
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&len_and_type.to_be_bytes(), first).unwrap();
    drop(f);
    let err = EngineLog::open(image.path()).err().expect("refused");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(matches!(err, LogError::Corrupt { offset: 69, .. }), "{msg}");
    assert!(msg.contains("not a torn tail"), "{msg}");
}

/// Version 2 -> 1 (one byte, two bits) made the walk expect unsigned
/// batches, so the search found none of the signed ones that follow.
#[test]
fn a_damaged_version_field_in_the_last_file_is_not_a_torn_tail() {
    let (_f, image, file) = one_file_crash_image();
    poke(&file, 53 + 7, 0x03);
    let err = EngineLog::open(image.path()).err().expect("refused");
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(matches!(err, LogError::Corrupt { .. }), "{msg}");
    assert!(
        msg.contains(file.to_str().unwrap()) && msg.contains("not a torn tail"),
        "{msg}"
    );
}

#[test]
fn a_second_process_on_the_same_directory_is_refused() {
    let f = EngineFixture::new();
    let _s = f.open().unwrap();
    let err = f.open().err().expect("locked");
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn group_commit_merges_concurrent_writers() {
    let f = EngineFixture::with(EngineLogConfig {
        target_file_size: 64 * 1024 * 1024,
        ..EngineLogConfig::default()
    });
    let s = Arc::new(f.open().unwrap());
    let threads = 8u64;
    let calls = 25u64;
    let before = s.sync_count();
    let start = Arc::new(Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let s = s.clone();
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                for i in 1..=calls {
                    s.write_batch(vec![GroupWrite {
                        group: t,
                        entries: vec![entry(i, 1)],
                        hard_state: Some(hard_state(1, 0, i)),
                        ..Default::default()
                    }])
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let syncs = s.sync_count() - before;
    eprintln!(
        "group commit: {} write_batch calls, {syncs} fdatasyncs",
        threads * calls
    );
    assert!(syncs < threads * calls, "{syncs} syncs for {} calls", threads * calls);
    for t in 0..threads {
        assert_eq!(load(&*s, t).entries.len() as u64, calls);
    }
}

#[test]
fn a_failed_fdatasync_fails_every_later_request_until_restart() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    s.write_batch(vec![append(1, entries(1..=2, 1))]).unwrap();
    s.fail_syncs(true);
    let err = s.write_batch(vec![append(1, entries(3..=3, 1))]).unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("fdatasync"), "{err}");
    // What reached the disk is unknown: the log takes nothing more.
    let err = s.write_batch(vec![append(1, entries(3..=3, 1))]).unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    assert!(s.load(1).is_err() && s.remove_group(1).is_err());
    // Closing syncs (and fails) again: dropping must not panic.
    drop(s);
    // A restart recovers from the disk: at least what was acknowledged.
    let s = f.open().unwrap();
    let got = load(&s, 1).entries;
    assert!(got.starts_with(&entries(1..=2, 1)), "{:?}", got.len());
}

#[test]
fn a_failed_sync_fails_every_later_request() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    s.write_batch(vec![append(1, entries(1..=2, 1))]).unwrap();
    s.write_batch_unsynced(vec![append(1, entries(3..=3, 1))]).unwrap();
    s.fail_syncs(true);
    let err = s.sync().unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    assert!(err.to_string().contains("injected fdatasync failure"), "{err}");
    // The handle now answers Ok to raft-engine; the store must still refuse.
    let err = s.sync().unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
    let err = s.write_batch_unsynced(vec![append(1, entries(4..=4, 1))]).unwrap_err();
    assert!(matches!(err, LogError::Failed { .. }), "{err}");
}

/// Unsynced appends that rotate through several files: one sync must cover
/// each file written since the last, not only the active one. A copy of the
/// directory taken after the sync (a power cut) holds every entry.
#[test]
fn a_sync_covers_every_file_written_since_the_last() {
    let f = EngineFixture::with(recycled_files());
    let s = f.open().unwrap();
    s.sync().unwrap();
    let files_before = log_files(&f.path()).len();
    for i in 1..=30u64 {
        let mut e = entry(i, 1);
        e.data = Bytes::from(format!("rotating-{i:06}-").repeat(150));
        s.write_batch_unsynced(vec![append(1, vec![e])]).unwrap();
    }
    let files = log_files(&f.path()).len() - files_before + 1;
    assert!(files >= 3, "the appends span {files} files");
    let before = s.sync_count();
    s.sync().unwrap();
    // raft-engine syncs a file as it rotates away from it; ours syncs each
    // again, so at least one per file written, plus the active one.
    assert!(
        s.sync_count() - before >= 2,
        "{} syncs for {files} files",
        s.sync_count() - before
    );
    let image = tempfile::tempdir().unwrap();
    for p in log_files(&f.path()) {
        std::fs::copy(&p, image.path().join(p.file_name().unwrap())).unwrap();
    }
    let s2 = EngineLog::open(image.path()).unwrap();
    assert_eq!(load(&s2, 1).entries.len(), 30);
    drop(s);
}

/// Appends inside a written file end on a page boundary (zero-padded, see
/// writer.rs), and a crash image of such a file opens with every entry: the
/// padding is a torn tail of zeroes, never a break between batches. A
/// recycled file shows it: its stale batches go on after the padding.
#[test]
fn appends_are_padded_to_a_page_and_a_crash_image_opens() {
    let f = EngineFixture::with(recycled_files());
    let s = f.open().unwrap();
    // ~2 KiB entries, compacted and purged as they go: 200 of them cycle
    // through the recycled 16 KiB files several times.
    for i in 1..=201u64 {
        steady_append(&s, i, "padded");
        s.purge().unwrap();
    }
    let active = log_files(&f.path()).pop().unwrap();
    let bytes = std::fs::read(&active).unwrap();
    let end = fuzz::batch_spans(&bytes).last().unwrap().1 as usize;
    let page_end = end.next_multiple_of(4096).min(bytes.len());
    assert!(
        bytes[end..page_end].iter().all(|&b| b == 0),
        "padded with zeroes from {end} to {page_end}"
    );
    assert!(
        bytes[page_end..].iter().any(|&b| b != 0),
        "a reused file holds stale batches past the padding"
    );
    let image = tempfile::tempdir().unwrap();
    for p in log_files(&f.path()) {
        std::fs::copy(&p, image.path().join(p.file_name().unwrap())).unwrap();
    }
    let s2 = EngineLog::open(image.path()).unwrap();
    assert_eq!(indexes(&load(&s2, 1)), (198..=201).map(|i| (i, 1)).collect::<Vec<_>>());
    drop(s);
}

#[test]
fn purge_reclaims_compacted_files() {
    let f = EngineFixture::new();
    let s = f.open().unwrap();
    fill(&s, 120);
    let files_before = log_files(&f.path()).len();
    s.write_batch(vec![GroupWrite {
        group: 1,
        compact_to: Some(118),
        ..Default::default()
    }])
    .unwrap();
    s.purge().unwrap();
    fill_from(&s, 121, 122);
    drop(s);
    let s = f.open().unwrap();
    let st = load(&s, 1);
    assert_eq!(indexes(&st).first(), Some(&(118, 1)));
    assert_eq!(st.entries.len(), 5);
    assert_eq!(st.hard_state.commit, 120);
    eprintln!(
        "purge: {files_before} files before, {} live after",
        log_files(&f.path()).len()
    );
}

/// Appends entry `i` (about 2 KiB, tagged) to group 1 with its commit,
/// compacting to keep the last three entries: a log under steady writes.
fn steady_append(s: &EngineLog, i: u64, tag: &str) {
    let mut e = entry(i, 1);
    e.data = Bytes::from(format!("{tag}-{i:06}-").repeat(150));
    s.write_batch(vec![GroupWrite {
        group: 1,
        entries: vec![e],
        hard_state: Some(hard_state(1, 1, i)),
        compact_to: (i > 3).then(|| i - 3),
        ..Default::default()
    }])
    .unwrap();
}

/// Small files with prefilled files for recycling, as the daemon runs it.
fn recycled_files() -> EngineLogConfig {
    EngineLogConfig {
        prefill_bytes: 64 * 1024,
        ..small_files()
    }
}

shared_tests!(engine_recycled, EngineFixture::with(recycled_files()));

/// Files purged and reused hold stale batches past their new data; a
/// restart must verify them, load exactly what was written since, and never
/// mistake the stale tail for corruption.
#[test]
fn recycled_files_survive_restarts() {
    let f = EngineFixture::with(recycled_files());
    let mut next = 1;
    for round in 0..6u64 {
        let s = f.open().unwrap();
        // ~2 KiB entries: each round spans several 16 KiB files.
        for i in next..next + 40 {
            let mut e = entry(i, 1);
            e.data = Bytes::from(format!("round-{round}-payload-{i:06}-").repeat(100));
            s.write_batch(vec![append(1, vec![e])]).unwrap();
        }
        next += 40;
        s.write_batch(vec![GroupWrite {
            group: 1,
            hard_state: Some(hard_state(1, 1, next - 1)),
            compact_to: Some(next - 3),
            ..Default::default()
        }])
        .unwrap();
        s.purge().unwrap();
        drop(s);
        let s = f.open().unwrap_or_else(|e| panic!("restart after round {round}: {e}"));
        let st = load(&s, 1);
        assert_eq!(indexes(&st).first(), Some(&(next - 3, 1)), "round {round}");
        assert_eq!(st.entries.len(), 3, "round {round}");
        assert_eq!(st.hard_state.commit, next - 1, "round {round}");
    }
    let names: Vec<String> = std::fs::read_dir(f.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("recycling: files after 6 rounds: {names:?}");
}

/// With recycling on, a new append file is zero-filled and synced before
/// raft-engine writes to it, so appends overwrite written blocks (a grown,
/// fallocated file makes each append's fdatasync commit the journal).
#[test]
fn new_append_files_are_written_through_before_use() {
    let f = EngineFixture::with(recycled_files());
    let s = f.open().unwrap();
    assert!(s.new_files() >= 1, "the first append file is zero-filled");
    let first = log_files(&f.path()).pop().unwrap();
    let size = std::fs::metadata(&first).unwrap().len();
    assert!(
        size >= 16 * 1024,
        "{} is {size} bytes, not a whole file",
        first.display()
    );
    fill(&s, 40);
    drop(s);
    let s = f.open().unwrap();
    assert_eq!(load(&s, 1).entries.len(), 40);

    // Without recycling nothing is zero-filled (raft-engine grows files).
    let plain = EngineFixture::new();
    assert_eq!(plain.open().unwrap().new_files(), 0);
}

/// Purged promptly, a log under steady appends and compaction lives in its
/// recycled files: no new file (and no zero-fill) after the first. Left
/// unpurged, it must grow new ones, which the count shows.
#[test]
fn a_promptly_purged_log_creates_no_new_files() {
    for purge in [true, false] {
        let f = EngineFixture::with(recycled_files());
        let s = f.open().unwrap();
        let at_open = s.new_files();
        // ~2 KiB entries: 200 of them span ~25 of the 16 KiB files.
        for i in 1..=200u64 {
            steady_append(&s, i, "steady");
            if purge {
                s.purge().unwrap();
            }
        }
        let created = s.new_files() - at_open;
        if purge {
            assert_eq!(created, 0, "a purged log created {created} new files");
        } else {
            assert!(created > 0, "an unpurged log grew without new files");
        }
        assert_eq!(load(&s, 1).entries.len(), 4);
    }
}

/// A crash after a new file was zero-filled but before raft-engine wrote
/// its header leaves a last file of zeroes: a torn tail holding nothing
/// acknowledged, so the open keeps everything before it.
#[test]
fn a_zero_filled_file_cut_before_its_header_is_a_torn_tail() {
    let f = EngineFixture::with(recycled_files());
    let s = f.open().unwrap();
    fill(&s, 40);
    drop(s);
    let last = log_files(&f.path()).pop().unwrap();
    let seq: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let next = f.path().join(format!("{:016}.raftlog", seq + 1));
    std::fs::write(&next, vec![0u8; 16 * 1024]).unwrap();
    let s = f.open().unwrap();
    let st = load(&s, 1);
    assert_eq!(st.entries.len(), 40);
    assert_eq!(st.hard_state.commit, 40);
    fill_from(&s, 41, 60);
    drop(s);
    assert_eq!(load(&f.open().unwrap(), 1).entries.len(), 60);
}

// ---------------------------------------------------------------------------
// Hostile input: the verifier and the value decoder against random files
// and random damage to valid ones. `PROPTEST_CASES=20000 cargo test -p
// trireme-raftlog fuzz` runs them longer.

mod fuzz {
    use super::*;
    use crate::verify::{Report, TornTail, verify_dir};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// `default` cases, or `PROPTEST_CASES` for a long run.
    fn cases(default: u32) -> ProptestConfig {
        let n = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok());
        ProptestConfig::with_cases(n.unwrap_or(default))
    }

    /// raft-engine 0.4's v2 file header: magic, version, alignment.
    const FILE_HEADER: u64 = 53 + 8 + 8;

    fn be_u64(b: &[u8]) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[..8]);
        u64::from_be_bytes(a)
    }

    /// The batches of a valid file, (start, end), from its framing.
    pub(super) fn batch_spans(bytes: &[u8]) -> Vec<(u64, u64)> {
        let mut spans = Vec::new();
        let mut off = FILE_HEADER;
        while off + 16 <= bytes.len() as u64 {
            let len = be_u64(&bytes[off as usize..]) >> 8;
            if len < 16 || off + len > bytes.len() as u64 {
                break;
            }
            spans.push((off, off + len));
            off += len;
        }
        spans
    }

    /// A valid log, as its files' names and bytes, and what it holds.
    struct Pristine {
        files: Vec<(String, Vec<u8>)>,
        entries: Vec<Entry>,
    }

    impl Pristine {
        /// Where the batches of file `i` end (a crash image's last file
        /// continues with preallocated zeroes).
        fn valid_end(&self, i: usize) -> u64 {
            batch_spans(&self.files[i].1).last().map_or(FILE_HEADER, |s| s.1)
        }
    }

    fn build(config: EngineLogConfig, batches: u64, crash_image: bool) -> Pristine {
        let f = EngineFixture::with(config);
        let s = f.open().unwrap();
        fill(&s, batches);
        let entries = load(&s, 1).entries;
        if !crash_image {
            drop(s);
        }
        let files = log_files(&f.path())
            .into_iter()
            .map(|p| {
                let name = p.file_name().unwrap().to_str().unwrap().to_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        Pristine { files, entries }
    }

    /// Closed cleanly: several files, each ending with its last batch.
    fn clean() -> &'static Pristine {
        static P: OnceLock<Pristine> = OnceLock::new();
        P.get_or_init(|| {
            let p = build(small_files(), 24, false);
            assert!(p.files.len() >= 3, "{} files", p.files.len());
            for (i, (name, bytes)) in p.files.iter().enumerate() {
                assert_eq!(p.valid_end(i), bytes.len() as u64, "{name} is framed end to end");
            }
            p
        })
    }

    /// Copied while running: the last file ends in preallocated zeroes.
    fn crash_image() -> &'static Pristine {
        static P: OnceLock<Pristine> = OnceLock::new();
        P.get_or_init(|| {
            let config = EngineLogConfig {
                target_file_size: 32 * 1024,
                ..small_files()
            };
            let p = build(config, 24, true);
            let last = p.files.len() - 1;
            let (name, bytes) = &p.files[last];
            assert!(
                p.files.len() >= 2 && p.valid_end(last) < bytes.len() as u64,
                "{name}: no zero tail"
            );
            assert!(bytes[p.valid_end(last) as usize..].iter().all(|b| *b == 0));
            p
        })
    }

    #[derive(Debug, Clone)]
    enum Damage {
        Flip { mask: u8 },
        Truncate,
        Overwrite { bytes: Vec<u8> },
    }

    /// Where to damage a file: anywhere, or near the places a parser is
    /// most likely to get wrong (the file header, batch headers).
    #[derive(Debug, Clone)]
    enum Spot {
        Anywhere(prop::sample::Index),
        FileHeader(u64),
        /// Near the start of batch i (an offset into its 16-byte header
        /// and the bytes around it).
        Batch(prop::sample::Index, i64),
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            3 => (1u8..=255).prop_map(|mask| Damage::Flip { mask }),
            1 => Just(Damage::Truncate),
            1 => prop::collection::vec(any::<u8>(), 1..24).prop_map(|bytes| Damage::Overwrite { bytes }),
        ]
    }

    fn spot() -> impl Strategy<Value = Spot> {
        prop_oneof![
            2 => any::<prop::sample::Index>().prop_map(Spot::Anywhere),
            1 => (0..FILE_HEADER).prop_map(Spot::FileHeader),
            2 => (any::<prop::sample::Index>(), -2i64..20).prop_map(|(i, d)| Spot::Batch(i, d)),
        ]
    }

    fn position(bytes: &[u8], spot: &Spot) -> u64 {
        let len = bytes.len() as u64;
        let at = match spot {
            Spot::Anywhere(i) => i.index(bytes.len()) as u64,
            Spot::FileHeader(o) => *o,
            Spot::Batch(i, d) => {
                let spans = batch_spans(bytes);
                if spans.is_empty() {
                    FILE_HEADER
                } else {
                    spans[i.index(spans.len())].0.saturating_add_signed(*d)
                }
            }
        };
        at.min(len - 1)
    }

    /// Writes the files to a fresh directory.
    fn write_dir(files: &[(String, Vec<u8>)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in files {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        dir
    }

    fn corrupt_at(err: &LogError) -> Option<(String, u64)> {
        match err {
            LogError::Corrupt { file, offset, .. } => {
                Some((file.file_name().unwrap().to_str().unwrap().to_owned(), *offset))
            }
            _ => None,
        }
    }

    /// The damaged log opens (raft-engine drops the torn tail) with a
    /// prefix of what was written, of at least `keep` entries.
    fn opens_with_a_prefix(dir: &Path, p: &Pristine, keep: usize) -> Result<(), TestCaseError> {
        let s = EngineLog::open_with(dir, small_files()).map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
        let got = s.load(1).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let got = got.map(|g| g.entries).unwrap_or_default();
        prop_assert!(
            p.entries.starts_with(&got),
            "loaded entries are not a prefix of those written"
        );
        prop_assert!(got.len() >= keep, "{} entries loaded, {} expected", got.len(), keep);
        Ok(())
    }

    fn check_damage(p: &Pristine, file: usize, spot: &Spot, d: &Damage) -> Result<(), TestCaseError> {
        let mut files = p.files.clone();
        let last = files.len() - 1;
        let old = &p.files[file].1;
        let bytes = &mut files[file].1;
        let at = position(bytes, spot) as usize;
        match d {
            Damage::Flip { mask } => bytes[at] ^= mask,
            Damage::Truncate => bytes.truncate(at),
            Damage::Overwrite { bytes: with } => {
                for (slot, x) in bytes[at..].iter_mut().zip(with) {
                    *slot = *x;
                }
            }
        }
        let new = &files[file].1;
        // The first and the last byte that changed (a cut changes all the
        // bytes it removes).
        let Some(first) = (0..old.len()).find(|&i| old.get(i) != new.get(i)) else {
            return Ok(());
        };
        let last_changed = (0..old.len())
            .rev()
            .find(|&i| old.get(i) != new.get(i))
            .unwrap_or(first);
        let (first, last_changed) = (first as u64, last_changed as u64);
        let spans = batch_spans(old);
        let valid_end = p.valid_end(file);
        let name = files[file].0.clone();
        let dir = write_dir(&files);
        let verdict = verify_dir(dir.path());
        // The batch the damage starts in.
        let batch = spans.iter().position(|s| s.0 <= first && first < s.1);
        let start = batch.map(|b| spans[b].0);
        // Entries before the damaged batch; each `fill` batch holds one.
        let before = p.files[..file].iter().map(|f| batch_spans(&f.1).len()).sum::<usize>() + batch.unwrap_or(0);
        let cut_at_boundary = matches!(d, Damage::Truncate) && spans.iter().any(|s| s.0 == first);

        if first >= valid_end {
            // Only the zero tail of a crash image was touched: a torn
            // tail, dropped, and nothing that was written is lost.
            let report: Report = verdict.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
            prop_assert!(
                report
                    .torn
                    .iter()
                    .all(|t| t.file.ends_with(&name) && t.offset == valid_end)
            );
            return opens_with_a_prefix(dir.path(), p, p.entries.len());
        }
        if file == last && spans.last().is_some_and(|s| last_changed >= s.0) {
            // The damage reaches the last batch of the last file: nothing
            // valid follows it, so it is a torn tail (the writer syncs each
            // batch before the next, and only the last write can be torn).
            let report = verdict.map_err(|e| TestCaseError::fail(format!("refused: {e}")))?;
            if !cut_at_boundary {
                let want = TornTail {
                    file: dir.path().join(&name),
                    offset: start.unwrap_or(0),
                    bytes: 0,
                    zeroes: false,
                };
                prop_assert_eq!(
                    report.torn.first().map(|t| (&t.file, t.offset)),
                    Some((&want.file, want.offset))
                );
            }
            return opens_with_a_prefix(dir.path(), p, before);
        }
        if cut_at_boundary {
            // Known limit: a file cut exactly between two batches ends
            // cleanly, and the verifier reads one file at a time. raft-engine
            // refuses the log if the cut leaves a hole in a group's entries
            // ("memtable has a hole"); a cut that only drops a group's
            // oldest entries looks like a compaction. The process must
            // survive either way.
            if verdict.is_ok() {
                let _ = EngineLog::open_with(dir.path(), small_files()).map(|s| s.groups());
            }
            return Ok(());
        }
        // Anything else is damage inside a batch that other valid
        // batches follow: refused, naming the file and the offset.
        let err = match verdict {
            Ok(report) => {
                return Err(TestCaseError::fail(format!(
                    "damage at offsets {first}..={last_changed} of {name} (batch {batch:?} of {}, file {file} of {}) accepted: {report:?}",
                    spans.len(),
                    last + 1
                )));
            }
            Err(e) => e,
        };
        let msg = err.to_string();
        let (f, offset) = corrupt_at(&err).ok_or_else(|| TestCaseError::fail(format!("not a corruption: {msg}")))?;
        prop_assert_eq!(&f, &name, "{}", msg);
        prop_assert!(
            msg.contains(&name) && msg.contains(&format!("offset {offset}")),
            "{}",
            msg
        );
        match start {
            Some(s) => prop_assert_eq!(offset, s, "{}", msg),
            // In the file header: refused at the header (or where a
            // misread header makes the first batch start).
            None => prop_assert!(offset <= FILE_HEADER, "{}", msg),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(cases(256))]

        /// Damage to a valid log closed cleanly: in the last batch of the
        /// last file it is a torn tail; anywhere else it is refused with
        /// the file and the offset of the damaged batch.
        #[test]
        fn fuzz_damaged_log_is_refused_or_a_torn_tail(
            file in any::<prop::sample::Index>(),
            spot in spot(),
            damage in damage(),
        ) {
            let p = clean();
            let file = file.index(p.files.len());
            check_damage(p, file, &spot, &damage)?;
        }

        /// The same on a crash image, whose last file ends in preallocated
        /// zeroes.
        #[test]
        fn fuzz_damaged_crash_image_is_refused_or_a_torn_tail(
            file in any::<prop::sample::Index>(),
            spot in spot(),
            damage in damage(),
        ) {
            let p = crash_image();
            let file = file.index(p.files.len());
            check_damage(p, file, &spot, &damage)?;
        }

        /// Arbitrary files under log file names: never a panic; a refusal
        /// names one of the files and an offset inside it; what is
        /// accepted, raft-engine opens without panicking.
        #[test]
        fn fuzz_random_log_files(
            files in prop::collection::vec(
                (
                    1u64..6,
                    any::<bool>(),
                    prop_oneof![
                        Just(Vec::new()),
                        prop::collection::vec(any::<u8>(), 0..200),
                        // A valid v2 header, then anything.
                        prop::collection::vec(any::<u8>(), 0..300).prop_map(|rest| {
                            let mut v = clean().files[0].1[..FILE_HEADER as usize].to_vec();
                            v.extend_from_slice(&rest);
                            v
                        }),
                        // A prefix of a real file, then anything.
                        (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(i, rest)| {
                            let f = &clean().files[0].1;
                            let mut v = f[..i.index(f.len())].to_vec();
                            v.extend_from_slice(&rest);
                            v
                        }),
                    ],
                ),
                1..4,
            ),
        ) {
            let named: Vec<(String, Vec<u8>)> = files
                .into_iter()
                .map(|(seq, rewrite, bytes)| {
                    let suffix = if rewrite { "rewrite" } else { "raftlog" };
                    (format!("{seq:016}.{suffix}"), bytes)
                })
                .collect();
            let dir = write_dir(&named);
            match verify_dir(dir.path()) {
                Ok(report) => {
                    for t in &report.torn {
                        let size = std::fs::metadata(&t.file).unwrap().len();
                        prop_assert!(t.offset <= size && t.offset + t.bytes == size, "{:?}", t);
                    }
                    // raft-engine itself must not take the process down.
                    if let Ok(s) = EngineLog::open_with(dir.path(), small_files()) {
                        let _ = s.groups();
                    }
                }
                Err(err) => {
                    let (file, offset) = corrupt_at(&err)
                        .ok_or_else(|| TestCaseError::fail(format!("not a corruption: {err}")))?;
                    let size = std::fs::metadata(dir.path().join(&file)).unwrap().len();
                    prop_assert!(offset <= size, "{}", err);
                    prop_assert!(err.to_string().contains(&file), "{}", err);
                }
            }
        }

        /// The stored values (hard state, conf state, destaged index):
        /// never a panic, damage always refused naming the group and value.
        #[test]
        fn fuzz_stored_values(
            term: u64, vote: u64, commit: u64, index: u64,
            which in 0usize..3,
            at in any::<prop::sample::Index>(),
            mask in 1u8..=255,
            cut: bool,
            junk in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            use crate::codec::*;
            let hs = hard_state(term, vote, commit);
            let cs = ConfState::from((vec![vote, 2, 3], vec![term]));
            let good = match which {
                0 => encode_hard_state(9, &hs).unwrap(),
                1 => encode_conf_state(9, &cs).unwrap(),
                _ => encode_destaged(index),
            };
            let decode = |raw: &[u8]| -> Result<(), LogError> {
                match which {
                    0 => decode_hard_state(9, raw).map(|v| assert_eq!(v, hs)),
                    1 => decode_conf_state(9, raw).map(|v| assert_eq!(v, cs)),
                    _ => decode_destaged(9, raw).map(|v| assert_eq!(v, index)),
                }
            };
            prop_assert!(decode(&good).is_ok());
            let mut bad = good.clone();
            if cut {
                bad.truncate(at.index(bad.len()));
            } else {
                let i = at.index(bad.len());
                bad[i] ^= mask;
            }
            let err = decode(&bad).expect_err("damage refused");
            prop_assert!(err.to_string().contains("group 9"), "{}", err);
            // Arbitrary bytes: refused or (never, in practice) accepted, but no panic.
            let _ = decode_hard_state(9, &junk);
            let _ = decode_conf_state(9, &junk);
            let _ = decode_destaged(9, &junk);
        }
    }
}
