//! Prometheus metrics: the exporter, and the per-volume handles the group
//! drivers update. Every series carries the global label `node`; per-volume
//! series add `volume` (the name), per-follower series `replica` (its node
//! id), I/O series `op`. No label takes a value from client data (offsets,
//! handles, messages), so the series count is a fixed number per volume and
//! per replica.
//!
//! Handles are created once per volume (label lookup and allocation happen
//! there, not per request), which is why the recorder must be installed
//! before any replica starts.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Latency buckets (seconds): 50 us to 10 s.
const LATENCY_BUCKETS_S: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Batch sizes (entries or groups per log write).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0];
/// Batch sizes in bytes: 4 KiB to 32 MiB.
const BATCH_BYTES_BUCKETS: &[f64] = &[
    4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 33554432.0,
];

/// Installs the Prometheus recorder and its HTTP listener on `addr`.
pub fn install(addr: SocketAddr, node_id: u64) -> Result<(), String> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("node", node_id.to_string())
        .set_buckets(LATENCY_BUCKETS_S)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_entries".into()), BATCH_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_groups".into()), BATCH_BUCKETS))
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_batch_bytes".into()), BATCH_BYTES_BUCKETS))
        .map_err(|e| e.to_string())?
        .install()
        .map_err(|e| e.to_string())
}

/// The replication states a follower's `trireme_replica_state` reports.
pub const REPLICA_STATES: [&str; 4] = ["replicating", "probing", "snapshot", "down"];

struct FollowerGauges {
    lag_entries: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge,
    state: [Gauge; 4],
}

/// One volume's series on this node.
pub struct GroupMetrics {
    volume: String,
    pub proposals: Counter,
    /// Writes acknowledged on quorum receipt, before quorum fdatasync.
    pub receipt_acks: Counter,
    /// Leader reads served under the read lease, without a ReadIndex round.
    pub lease_reads: Counter,
    pub commit_duration: Histogram,
    pub leader_changes: Counter,
    pub elections: Counter,
    pub snapshot_sends: Counter,
    pub snapshot_receives: Counter,
    pub destage_errors: Counter,
    term: Gauge,
    leader: Gauge,
    is_leader: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    rpo_exposure: Gauge,
    replicas_in_sync: Gauge,
    replicas: Gauge,
    pub failover_pause: Gauge,
    cache_dirty: Gauge,
    cache_limit: Gauge,
    destage_lag: Gauge,
    checkpoint_lag_entries: Gauge,
    checkpoint_lag_bytes: Gauge,
    pub checkpoints: Counter,
    hibernating: Gauge,
    followers: HashMap<u64, FollowerGauges>,
}

/// What [`GroupMetrics::publish`] needs from a driver.
pub struct GroupSample<'a> {
    pub term: u64,
    pub leader: u64,
    pub is_leader: bool,
    pub commit_index: u64,
    pub applied_index: u64,
    pub rpo_exposure_s: f64,
    pub replicas_in_sync: u64,
    pub replicas: u64,
    pub cache_dirty_bytes: u64,
    pub cache_limit_bytes: u64,
    /// Applied entries not yet written into the image file.
    pub destage_lag_entries: u64,
    /// Applied entries, and bytes of log, since the last checkpoint: what a
    /// restart would replay.
    pub checkpoint_lag_entries: u64,
    pub checkpoint_lag_bytes: u64,
    pub hibernating: bool,
    /// (node, lag entries, lag bytes, lag seconds, state), leader only.
    pub followers: &'a [FollowerSample],
}

#[derive(Debug, Clone, PartialEq)]
pub struct FollowerSample {
    pub node: u64,
    pub lag_entries: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    /// One of [`REPLICA_STATES`].
    pub state: &'static str,
}

impl GroupMetrics {
    pub fn new(volume: &str) -> GroupMetrics {
        let v = volume.to_string();
        let c = |name: &'static str| metrics::counter!(name, "volume" => v.clone());
        let g = |name: &'static str| metrics::gauge!(name, "volume" => v.clone());
        GroupMetrics {
            proposals: c("trireme_raft_proposals_total"),
            receipt_acks: c("trireme_writes_acked_on_receipt_total"),
            lease_reads: c("trireme_reads_on_lease_total"),
            commit_duration: metrics::histogram!("trireme_raft_commit_duration_seconds", "volume" => v.clone()),
            leader_changes: c("trireme_raft_leader_changes_total"),
            elections: c("trireme_raft_elections_total"),
            snapshot_sends: c("trireme_snapshot_sends_total"),
            snapshot_receives: c("trireme_snapshot_receives_total"),
            destage_errors: metrics::counter!("trireme_disk_errors_total", "volume" => v.clone(), "kind" => "destage"),
            term: g("trireme_raft_term"),
            leader: g("trireme_raft_leader"),
            is_leader: g("trireme_raft_is_leader"),
            commit_index: g("trireme_raft_commit_index"),
            applied_index: g("trireme_raft_applied_index"),
            rpo_exposure: g("trireme_rpo_exposure_seconds"),
            replicas_in_sync: g("trireme_replicas_in_sync"),
            replicas: g("trireme_volume_replicas"),
            failover_pause: g("trireme_failover_pause_seconds"),
            cache_dirty: g("trireme_cache_dirty_bytes"),
            cache_limit: g("trireme_cache_limit_bytes"),
            destage_lag: g("trireme_destage_lag_entries"),
            checkpoint_lag_entries: g("trireme_checkpoint_lag_entries"),
            checkpoint_lag_bytes: g("trireme_checkpoint_lag_bytes"),
            checkpoints: c("trireme_checkpoints_total"),
            hibernating: g("trireme_raft_hibernating"),
            followers: HashMap::new(),
            volume: v,
        }
    }

    /// Per-follower series exist only where the group leads; a replica that
    /// stops leading zeroes its own, so `max by (volume, replica)` across
    /// nodes always reads the current leader's view.
    pub fn publish(&mut self, s: &GroupSample<'_>) {
        self.term.set(s.term as f64);
        self.leader.set(s.leader as f64);
        self.is_leader.set(if s.is_leader { 1.0 } else { 0.0 });
        self.commit_index.set(s.commit_index as f64);
        self.applied_index.set(s.applied_index as f64);
        self.replicas.set(s.replicas as f64);
        self.cache_dirty.set(s.cache_dirty_bytes as f64);
        self.cache_limit.set(s.cache_limit_bytes as f64);
        self.destage_lag.set(s.destage_lag_entries as f64);
        self.checkpoint_lag_entries.set(s.checkpoint_lag_entries as f64);
        self.checkpoint_lag_bytes.set(s.checkpoint_lag_bytes as f64);
        self.hibernating.set(if s.hibernating { 1.0 } else { 0.0 });
        if s.is_leader {
            self.rpo_exposure.set(s.rpo_exposure_s);
            self.replicas_in_sync.set(s.replicas_in_sync as f64);
        } else {
            self.rpo_exposure.set(0.0);
            self.replicas_in_sync.set(0.0);
        }
        for f in s.followers {
            let volume = &self.volume;
            let gauges = self.followers.entry(f.node).or_insert_with(|| {
                let r = f.node.to_string();
                let g = |name: &'static str| metrics::gauge!(name, "volume" => volume.clone(), "replica" => r.clone());
                FollowerGauges {
                    lag_entries: g("trireme_replica_lag_entries"),
                    lag_bytes: g("trireme_replica_lag_bytes"),
                    lag_seconds: g("trireme_replica_lag_seconds"),
                    state: REPLICA_STATES.map(|st| {
                        metrics::gauge!("trireme_replica_state", "volume" => volume.clone(), "replica" => r.clone(), "state" => st)
                    }),
                }
            });
            gauges.lag_entries.set(f.lag_entries as f64);
            gauges.lag_bytes.set(f.lag_bytes as f64);
            gauges.lag_seconds.set(f.lag_seconds);
            for (i, st) in REPLICA_STATES.iter().enumerate() {
                gauges.state[i].set(if *st == f.state { 1.0 } else { 0.0 });
            }
        }
        if !s.is_leader {
            for g in self.followers.values() {
                g.lag_entries.set(0.0);
                g.lag_bytes.set(0.0);
                g.lag_seconds.set(0.0);
                for st in &g.state {
                    st.set(0.0);
                }
            }
        }
    }
}

/// Node-wide gauges, refreshed every [`NODE_GAUGES_EVERY`]: peer nodes up,
/// local replicas, how many lead an under-replicated volume, rebuilds in
/// progress and their progress, hibernating groups, log and image sizes.
pub async fn run_node_gauges(
    catalog: std::sync::Arc<crate::catalog::Catalog>,
    liveness: std::sync::Arc<crate::liveness::Liveness>,
    log_dir: std::path::PathBuf,
) {
    let replicas = metrics::gauge!("trireme_replicas");
    let under_replicated = metrics::gauge!("trireme_volumes_under_replicated");
    let rebuilds = metrics::gauge!("trireme_rebuilds_in_progress");
    let hibernating = metrics::gauge!("trireme_groups_hibernating");
    let log_size = metrics::gauge!("trireme_log_size_bytes");
    metrics::gauge!("trireme_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    let process = ProcessGauges::new();
    let mut every = tokio::time::interval(NODE_GAUGES_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        for (peer, up) in liveness.peers() {
            metrics::gauge!("trireme_node_up", "peer" => peer.to_string()).set(if up { 1.0 } else { 0.0 });
        }
        let (mut count, mut under, mut rebuilding, mut idle) = (0u64, 0u64, 0u64, 0u64);
        for v in catalog.list() {
            let Some(s) = v.local_status() else { continue };
            count += 1;
            let meta = v.meta();
            let name = meta.name;
            if s.role == "leader" && s.replicas_in_sync < u64::from(meta.replica_count) {
                under += 1;
            }
            let progress = match s.rebuild_progress {
                Some((done, total)) if total > 0 => {
                    rebuilding += 1;
                    done as f64 / total as f64
                }
                _ if s.recovering => {
                    rebuilding += 1;
                    0.0
                }
                _ => 1.0,
            };
            metrics::gauge!("trireme_rebuild_progress_ratio", "volume" => name.clone()).set(progress);
            if s.hibernating {
                idle += 1;
            }
            metrics::gauge!("trireme_volume_size_bytes", "volume" => name.clone()).set(v.size_bytes() as f64);
            metrics::gauge!("trireme_image_allocated_bytes", "volume" => name).set(v.allocated_bytes() as f64);
        }
        replicas.set(count as f64);
        under_replicated.set(under as f64);
        rebuilds.set(rebuilding as f64);
        hibernating.set(idle as f64);
        process.refresh();
        let dir = log_dir.clone();
        if let Ok(bytes) = tokio::task::spawn_blocking(move || dir_bytes(&dir)).await {
            log_size.set(bytes as f64);
        }
    }
}

pub const NODE_GAUGES_EVERY: Duration = Duration::from_secs(2);

/// The process series every Prometheus client library exports (CPU,
/// memory, descriptors, start time), read from /proc/self.
struct ProcessGauges {
    cpu_seconds: Counter,
    resident_bytes: Gauge,
    virtual_bytes: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    start_time: Gauge,
}

impl ProcessGauges {
    fn new() -> ProcessGauges {
        let g = ProcessGauges {
            cpu_seconds: metrics::counter!("process_cpu_seconds_total"),
            resident_bytes: metrics::gauge!("process_resident_memory_bytes"),
            virtual_bytes: metrics::gauge!("process_virtual_memory_bytes"),
            open_fds: metrics::gauge!("process_open_fds"),
            max_fds: metrics::gauge!("process_max_fds"),
            threads: metrics::gauge!("process_threads"),
            start_time: metrics::gauge!("process_start_time_seconds"),
        };
        if let Ok(since_epoch) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            // Close enough: the recorder starts with the process.
            g.start_time.set(since_epoch.as_secs_f64());
        }
        g
    }

    fn refresh(&self) {
        use nix::unistd::{SysconfVar, sysconf};
        let conf = |v| sysconf(v).ok().flatten().filter(|x| *x > 0).unwrap_or(1) as f64;
        let ticks = conf(SysconfVar::CLK_TCK);
        let page = conf(SysconfVar::PAGE_SIZE);
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the command name, which is in parentheses.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, r)| r.split_whitespace().collect())
                .unwrap_or_default();
            let num = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
            // state is field 3 (index 0 here): utime 14, stime 15, threads 20, vsize 23, rss 24.
            if let (Some(u), Some(s)) = (num(11), num(12)) {
                self.cpu_seconds.absolute(((u + s) / ticks) as u64);
            }
            if let Some(t) = num(17) {
                self.threads.set(t);
            }
            if let Some(v) = num(20) {
                self.virtual_bytes.set(v);
            }
            if let Some(r) = num(21) {
                self.resident_bytes.set(r * page);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(fds.count() as f64);
        }
        if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
            self.max_fds.set(soft as f64);
        }
    }
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// When recent log indexes were proposed, on the leader: enough to tell
/// the age of the oldest entry a follower lacks. Sampled at most once per
/// [`IndexClock::RESOLUTION`], so a sample's time is at most that much
/// later than the entry's (an age is never under-reported by more), and
/// bounded: at capacity the second-oldest sample goes, which only makes
/// ages older, never younger.
#[derive(Debug, Default)]
pub struct IndexClock {
    samples: std::collections::VecDeque<(u64, Instant)>,
}

impl IndexClock {
    pub const RESOLUTION: Duration = Duration::from_millis(10);
    pub const CAPACITY: usize = 65_536;

    /// `index` was proposed at `now`.
    pub fn record(&mut self, index: u64, now: Instant) {
        if let Some(&(_, t)) = self.samples.back()
            && now.duration_since(t) < Self::RESOLUTION
        {
            return;
        }
        if self.samples.len() >= Self::CAPACITY {
            self.samples.remove(1);
        }
        self.samples.push_back((index, now));
    }

    /// Forgets samples no longer needed once every replica holds `index`.
    pub fn prune(&mut self, index: u64) {
        while self.samples.len() > 1 && self.samples[1].0 <= index + 1 {
            self.samples.pop_front();
        }
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// Age of entry `index`: the time since the latest sample at or before
    /// it (or the oldest sample, for an index older than every sample).
    pub fn age_s(&self, index: u64, now: Instant) -> f64 {
        let k = self.samples.partition_point(|(i, _)| *i <= index);
        let t = match k {
            0 => self.samples.front().map(|(_, t)| *t),
            k => Some(self.samples[k - 1].1),
        };
        t.map(|t| now.saturating_duration_since(t).as_secs_f64()).unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_clock_reports_the_age_of_the_oldest_missing_entry() {
        let t0 = Instant::now();
        let mut c = IndexClock::default();
        c.record(10, t0);
        c.record(11, t0 + Duration::from_millis(1)); // within resolution: skipped
        c.record(20, t0 + Duration::from_millis(100));
        c.record(30, t0 + Duration::from_millis(200));
        let now = t0 + Duration::from_millis(1000);
        assert!((c.age_s(10, now) - 1.0).abs() < 1e-9);
        assert!(
            (c.age_s(15, now) - 1.0).abs() < 1e-9,
            "an entry between samples takes the older one"
        );
        assert!((c.age_s(20, now) - 0.9).abs() < 1e-9);
        assert!(
            (c.age_s(5, now) - 1.0).abs() < 1e-9,
            "older than every sample: the oldest"
        );
        c.prune(19);
        assert!(
            (c.age_s(20, now) - 0.9).abs() < 1e-9,
            "the sample covering index 20 is kept"
        );
        c.prune(29);
        assert!((c.age_s(30, now) - 0.8).abs() < 1e-9);
        c.clear();
        assert_eq!(c.age_s(30, now), 0.0);
    }

    #[test]
    fn index_clock_is_bounded_and_keeps_its_oldest_sample() {
        let t0 = Instant::now();
        let mut c = IndexClock::default();
        for i in 0..(IndexClock::CAPACITY as u64 + 100) {
            c.record(i, t0 + IndexClock::RESOLUTION * i as u32);
        }
        assert_eq!(c.samples.len(), IndexClock::CAPACITY);
        assert_eq!(c.samples[0].0, 0);
    }
}
