//! A short nemesis run of each kind against a real 3-node cluster (see
//! `trireme_tests::nemesis`): clients record every NBD operation while one
//! kind of fault is injected over and over, then the history is checked.
//! Each test prints its figures; any lost write, stale or impossible read,
//! or non-linearizable block fails it. `tests/soak.sh` runs the same for as
//! long as you like, with every kind of fault.

use std::time::Duration;

use anyhow::{Result, ensure};
use trireme_tests::nemesis::{self, Config, Fault};

/// Each test injects its fault this many times...
const FAULTS: usize = 3;
/// ...unless this much time runs out first (recovery is slow on a busy
/// machine); then at least two must have happened.
const RUN_AT_MOST: Duration = Duration::from_secs(90);

fn run_kind(test: &str, fault: Fault) -> Result<()> {
    run_kind_times(test, fault, FAULTS)
}

fn run_kind_times(test: &str, fault: Fault, times: usize) -> Result<()> {
    let seed = trireme_tests::seed()?;
    let mut cluster = nemesis::start_cluster(test, &[fault])?;
    let mut cfg = Config::new(vec![fault], RUN_AT_MOST, seed);
    cfg.max_faults = times;
    cfg.hold = Duration::from_secs(3);
    cfg.interval = Duration::from_secs(2);
    let report = nemesis::run(&mut cluster, &cfg)?;
    println!("nemesis {} (seed {seed}):\n{}", fault.name(), report.table());
    if !report.ok() {
        // The node logs are the evidence; a passing run's dir is not kept
        // (a full suite of them would fill the disk).
        cluster.keep_dir_on_drop();
    }
    ensure!(
        report.ok(),
        "the {} nemesis found problems (seed {seed}):\n{}\n{:#?}",
        fault.name(),
        report.table(),
        report.problems
    );
    ensure!(
        report.faults.get(fault.name()).copied().unwrap_or(0) >= 2,
        "the {} fault was injected fewer than twice",
        fault.name()
    );
    ensure!(
        report.writes_acknowledged > 50 && report.reads_ok > 50,
        "too little work was done for the check to mean anything:\n{}",
        report.table()
    );
    Ok(())
}

#[test]
fn nemesis_kill() -> Result<()> {
    run_kind("nemesis-kill", Fault::Kill)
}

#[test]
fn nemesis_stop() -> Result<()> {
    run_kind("nemesis-stop", Fault::Stop)
}

#[test]
fn nemesis_isolate() -> Result<()> {
    run_kind("nemesis-isolate", Fault::Isolate)
}

#[test]
fn nemesis_one_way() -> Result<()> {
    run_kind("nemesis-one-way", Fault::OneWay)
}

#[test]
fn nemesis_bridge() -> Result<()> {
    run_kind("nemesis-bridge", Fault::Bridge)
}

#[test]
fn nemesis_slow_network() -> Result<()> {
    run_kind("nemesis-slow", Fault::Slow)
}

#[test]
fn nemesis_disk_full() -> Result<()> {
    run_kind("nemesis-disk-full", Fault::DiskFull)
}

#[test]
fn nemesis_fsync_error() -> Result<()> {
    run_kind("nemesis-fsync-error", Fault::FsyncError)
}

#[test]
fn nemesis_crash_points() -> Result<()> {
    // One round per crash point.
    run_kind_times("nemesis-crash-point", Fault::CrashPoint, 5)
}
