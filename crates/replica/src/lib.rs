//! One replica of one volume.
//!
//! Owns: the raft-rs `RawNode` of a volume's group, the volume state machine
//! it applies (writer epoch and attached node for fencing, the write-back
//! cache of committed writes), the checksummed entry format, and the Ready
//! handling that turns raft's wishes into an [`Output`] for a driver.
//! Driven by: the daemon's replica driver (and the simulator in tests), which
//! ticks it, feeds it peer messages and proposals, persists its log, sends
//! its messages and destages its cache.
//! Must never depend on: sockets, files, clocks, threads or async runtimes.
//! Everything here is deterministic given its inputs, so a seeded simulator
//! can drive many replicas in one thread.

pub mod cache;
pub mod core;
pub mod op;

pub use crate::core::{
    ApplyError, Completion, MAX_ATTACH_HISTORY, Output, PersistTask, Proposal, ProposeError, Replica, ReplicaConfig,
    SnapshotInstall, VolumeState, decode_snapshot_epoch, encode_snapshot_epoch, receipt_of,
};
pub use cache::{ExtentData, Segment, WriteCache};
pub use op::{EntryOp, VolumeOp};
pub use raft;

/// raft-rs logs through slog; this drain re-emits its records as tracing
/// events under the `raft` target, so one subscriber sees everything.
struct TracingDrain;

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        struct Kv(String);
        impl slog::Serializer for Kv {
            fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
                use std::fmt::Write as _;
                let _ = write!(self.0, " {key}={val}");
                Ok(())
            }
        }
        let mut kv = Kv(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut kv);
        let _ = slog::KV::serialize(values, record, &mut kv);
        let msg = record.msg();
        match record.level() {
            slog::Level::Critical | slog::Level::Error => tracing::error!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Warning => tracing::warn!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Info => tracing::info!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Debug => tracing::debug!(target: "raft", "{msg}{}", kv.0),
            slog::Level::Trace => tracing::trace!(target: "raft", "{msg}{}", kv.0),
        }
        Ok(())
    }
}

pub(crate) fn raft_logger(replica_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("replica" => replica_id))
}
