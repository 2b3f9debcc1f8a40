//! `nemesis`: runs the nemesis suite against a fresh local 3-node cluster
//! for as long as asked (a soak), and exits non-zero on any lost write,
//! stale or impossible read, non-linearizable block, or a cluster that does
//! not recover. `tests/soak.sh` builds what it needs and runs it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use trireme_tests::nemesis::{self, Config, Fault};

fn usage() -> &'static str {
    "usage: nemesis [--duration 20m] [--faults all|kill,stop,isolate,one-way,bridge,slow,disk-full,fsync-error,crash-point]\n\
     \x20              [--interval 3s] [--hold 4s] [--blocks 256] [--seed N] [--json FILE]"
}

/// "90", "90s", "20m", "2h".
fn parse_duration(s: &str) -> Result<Duration> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("bad duration {s:?} (examples: 90s, 20m, 2h)"))?;
    if n == 0 {
        bail!("duration {s:?} must be positive");
    }
    Ok(Duration::from_secs(n * mult))
}

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nemesis: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut duration = Duration::from_secs(20 * 60);
    let mut faults = Fault::ALL.to_vec();
    let mut interval = Duration::from_secs(3);
    let mut hold = Duration::from_secs(4);
    // Many blocks keep each block's history short enough to search, hours
    // into a soak.
    let mut blocks: u64 = 256;
    let mut seed = trireme_tests::seed()?;
    let mut json: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value\n{}", usage()));
        match a.as_str() {
            "--duration" => duration = parse_duration(&value()?)?,
            "--faults" => faults = Fault::parse_list(&value()?)?,
            "--interval" => interval = parse_duration(&value()?)?,
            "--hold" => hold = parse_duration(&value()?)?,
            "--seed" => seed = value()?.parse().context("--seed needs a number")?,
            "--blocks" => {
                blocks = value()?.parse().context("--blocks needs a number")?;
                if blocks == 0 || blocks > 1024 {
                    bail!("--blocks must be 1 to 1024 (64 KiB apart in the 64 MiB volume)");
                }
            }
            "--json" => json = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{}", usage());
                return Ok(true);
            }
            other => bail!("unknown argument {other:?}\n{}", usage()),
        }
    }
    let mut cluster = nemesis::start_cluster("nemesis-soak", &faults)?;
    let mut cfg = Config::new(faults, duration, seed);
    cfg.interval = interval;
    cfg.hold = hold;
    cfg.blocks = blocks;
    eprintln!("nemesis: {duration:?} of faults, seed {seed}");
    let report = nemesis::run(&mut cluster, &cfg)?;
    println!("{}", report.table());
    if let Some(path) = json {
        nemesis::write_report(&path, &report)?;
    }
    if !report.ok() {
        eprintln!("nemesis: problems found (seed {seed}):");
        for p in &report.problems {
            eprintln!("  {p}");
        }
        return Ok(false);
    }
    Ok(true)
}
