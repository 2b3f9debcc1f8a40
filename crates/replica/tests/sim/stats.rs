//! Figures of a run, summed over seeds and printed as a table.

macro_rules! stats {
    ($($field:ident: $label:expr,)*) => {
        #[derive(Default, Debug, Clone, Copy)]
        pub struct Stats {
            $(pub $field: u64,)*
        }

        impl Stats {
            pub fn add(&mut self, o: &Stats) {
                $(self.$field += o.$field;)*
            }

            pub fn rows(&self) -> Vec<(&'static str, u64)> {
                vec![$(($label, self.$field),)*]
            }
        }
    };
}

stats! {
    seeds: "seeds run",
    groups_of_3: "  groups of 3 replicas",
    groups_of_5: "  groups of 5 replicas",
    unstamped_snapshot_groups: "  leaders not stamping snapshots (older version)",
    rounds: "rounds (incl. settling)",
    writes_proposed: "writes proposed",
    writes_acked: "  acknowledged (client got the reply)",
    writes_unknown: "  indeterminate (no reply)",
    writes_fenced: "  fenced when applied (stale epoch)",
    writes_superseded: "  superseded",
    writes_indeterminate: "  outcome unknown after a snapshot (EIO)",
    writes_refused_stale: "writes refused at once (stale epoch)",
    attaches: "attaches (new epochs)",
    reads_issued: "reads issued",
    reads_checked: "  served and checked",
    reads_from_followers: "  of which served by followers",
    reads_expired: "  given up (ReadIndex timeout)",
    final_reads: "final reads of the settled group",
    lin_ops: "operations checked for linearizability",
    lin_states: "  search configurations explored",
    acked_in_logs: "acknowledged writes found in all durable logs",
    leaders_elected: "leaders elected",
    msgs_sent: "messages sent",
    msgs_delivered: "  delivered",
    msgs_dropped: "  dropped",
    msgs_lost_to_partitions: "  lost to partitions",
    msgs_duplicated: "  duplicated",
    msgs_delayed: "  delayed 1-6 rounds",
    msgs_delayed_long: "  delayed 30-300 rounds",
    partitions_isolate: "partitions: isolate one node",
    partitions_one_way: "partitions: one-way link",
    partitions_bridge: "partitions: bridge",
    partitions_split: "partitions: majority/minority",
    crashes: "crashes (kill / power loss)",
    fsync_errors: "fsync errors (node stops)",
    fsync_errors_kept: "  failed batch found on disk",
    fsync_errors_lost: "  failed batch lost",
    torn_tails: "torn tail batches dropped at a crash",
    tails_kept: "unacknowledged tail batches kept at a crash",
    unsynced_batches_lost: "unsynced batches lost at a crash",
    queued_jobs_lost: "queued log jobs lost at a crash",
    destages_torn: "crashes mid-destage (image partly written)",
    pauses: "pauses (SIGSTOP / GC)",
    skewed_clocks: "nodes ticking >10% off nominal",
    log_batches: "log batches written",
    multi_job_batches: "  holding several log jobs",
    unsynced_batches: "  written without fdatasync",
    destages: "destages",
    compactions_past_follower: "compactions past a lagging follower",
    snapshots_sent: "snapshots sent",
    installs_started: "snapshot installs started",
    installs_finished: "snapshots installed",
    installs_epoch_stamped: "  epoch stamped on the snapshot",
    installs_epoch_asked: "  epoch asked of the replicas",
    restarts: "restarts",
    restarts_from_compacted_log: "  from a compacted log",
    failed_c1: "seeds losing an acknowledged write (C1)",
    failed_c2: "seeds with a non-linearizable read (C2)",
    failed_other: "seeds failing otherwise",
}

impl Stats {
    pub fn table(&self, wall: std::time::Duration) -> String {
        let mut rows: Vec<(String, String)> = self
            .rows()
            .into_iter()
            .map(|(label, v)| (label.to_string(), v.to_string()))
            .collect();
        rows.push(("wall time".to_string(), format!("{:.1} s", wall.as_secs_f64())));
        let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        let vwidth = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (l, v) in rows {
            out.push_str(&format!("  {l:<width$}  {v:>vwidth$}\n"));
        }
        out
    }
}
