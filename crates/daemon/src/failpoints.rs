//! Fault injection in a running triremed, for fault-injection tests (a
//! Jepsen-style nemesis driving real processes through `trireme fault`).
//!
//! Owns: the one list of failpoint names ([`KNOWN`]; the points sit in the
//! log, the storage layer and the daemon, each behind its crate's feature),
//! the crash points of the daemon, and what the `trireme.v1.FaultService`
//! does: configure failpoints (the `fail` crate) and the transport's
//! injected network faults.
//!
//! Built only with the `failpoints` cargo feature (which also turns on
//! `trireme-transport/faults`, `trireme-raftlog/failpoints` and
//! `trireme-storage/failpoints`). Without it no point is compiled into any
//! hot path, and every FaultService call is refused with
//! [`NOT_BUILT`]. Release builds of the benchmarks build without it.

use trireme_raftlog::failpoints as log_points;
use trireme_storage::failpoints as storage_points;

/// Why every FaultService call fails in a build without the feature.
pub const NOT_BUILT: &str = "triremed was built without the `failpoints` feature";

pub const LOG_WRITE: &str = log_points::LOG_WRITE;
pub const LOG_FSYNC: &str = log_points::LOG_FSYNC;
pub const IMAGE_WRITE: &str = storage_points::IMAGE_WRITE;
pub const IMAGE_FSYNC: &str = storage_points::IMAGE_FSYNC;
pub const STATE_WRITE: &str = storage_points::STATE_WRITE;
pub const CRASH_LOG_AFTER_WRITE: &str = log_points::CRASH_LOG_AFTER_WRITE;
pub const CRASH_LOG_AFTER_SYNC: &str = "crash::log_after_sync";
pub const CRASH_DESTAGE_AFTER_IMAGE_WRITE: &str = "crash::destage_after_image_write";
pub const CRASH_AFTER_APPLY: &str = "crash::after_apply";
pub const CRASH_SNAPSHOT_MID_COPY: &str = "crash::snapshot_mid_copy";

/// Every failpoint a client may configure: name and what it does. I/O
/// points take `return` (EIO) or `return(enospc)` (ENOSPC); crash points
/// abort the process (`return` or `panic`) after logging
/// "failpoint NAME: crashing". Both accept the fail crate's `N*` and `P%`
/// modifiers; `sleep(ms)` or `pause` hold the thread at the point instead.
pub const KNOWN: &[(&str, &str)] = &[
    (
        LOG_WRITE,
        "the node-wide Raft log write fails before its fdatasync; triremed exits",
    ),
    (LOG_FSYNC, "the Raft log's fdatasync fails; triremed exits"),
    (
        IMAGE_WRITE,
        "a write to a volume image fails (destage, snapshot copy); triremed exits",
    ),
    (
        IMAGE_FSYNC,
        "a volume image's fdatasync fails (destage, snapshot copy); triremed exits",
    ),
    (
        STATE_WRITE,
        "writing a state file fails: volume.state (triremed exits) or volume.meta (the admin call fails)",
    ),
    (
        CRASH_LOG_AFTER_WRITE,
        "abort once the Raft log is written, before its fdatasync",
    ),
    (
        CRASH_LOG_AFTER_SYNC,
        "abort once the Raft log write is durable, before raft hears of it and its messages go out",
    ),
    (
        CRASH_DESTAGE_AFTER_IMAGE_WRITE,
        "abort once a destage is written and synced to the image, before volume.state records it",
    ),
    (
        CRASH_AFTER_APPLY,
        "abort once a client write is applied, before its reply is sent",
    ),
    (
        CRASH_SNAPSHOT_MID_COPY,
        "abort after the first chunk of a snapshot copy into a rebuilding replica's image",
    ),
];

/// Aborts the process at once if the crash point fires (`return`, or a
/// `panic` action: a crash point must crash, not unwind through a task).
#[cfg(feature = "failpoints")]
pub fn crash_point(name: &'static str) {
    // fail::eval, not fail_point!: see trireme_raftlog::failpoints.
    let fired = std::panic::catch_unwind(|| fail::eval(name, |_| ()).is_some());
    if fired.unwrap_or(true) {
        tracing::error!("failpoint {name}: crashing");
        std::process::abort();
    }
}

pub use imp::{clear_failpoints, clear_net_faults, faults, set_failpoint, set_net_fault};

#[cfg(feature = "failpoints")]
mod imp {
    use trireme_proto::v1 as pb;
    use trireme_transport::{NetRule, Transport, TransportError};

    use super::KNOWN;
    use crate::error::{DaemonError, Result};

    fn known_names() -> String {
        KNOWN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }

    /// Replaces the rule towards each of the request's peers.
    pub fn set_net_fault(transport: &Transport, req: &pb::SetNetFaultRequest) -> Result<()> {
        let rule = NetRule {
            drop: req.drop,
            loss_percent: req.loss_percent,
            delay_ms: req.delay_ms,
            dup_percent: req.dup_percent,
        };
        transport.net_faults().set(&req.peers, rule).map_err(|e| match e {
            TransportError::FaultRule(m) => DaemonError::InvalidArgument(m),
            other => DaemonError::InvalidArgument(other.to_string()),
        })?;
        if rule.is_clear() {
            tracing::warn!(peers = ?req.peers, "injected network fault removed");
        } else {
            tracing::warn!(peers = ?req.peers, ?rule, "injected network fault set");
        }
        Ok(())
    }

    pub fn clear_net_faults(transport: &Transport) -> Result<()> {
        transport.net_faults().clear();
        tracing::warn!("every injected network fault removed");
        Ok(())
    }

    /// Configures one known failpoint; "off" removes it.
    pub fn set_failpoint(name: &str, actions: &str) -> Result<()> {
        let Some((name, _)) = KNOWN.iter().find(|(n, _)| *n == name) else {
            return Err(DaemonError::InvalidArgument(format!(
                "unknown failpoint \"{name}\"; known: {}",
                known_names()
            )));
        };
        let actions = actions.trim();
        if actions.is_empty() {
            return Err(DaemonError::InvalidArgument(format!(
                "failpoint {name}: actions must not be empty (\"off\" removes it)"
            )));
        }
        if actions == "off" {
            fail::remove(name);
            tracing::warn!("failpoint {name} removed");
            return Ok(());
        }
        fail::cfg(*name, actions).map_err(|e| {
            DaemonError::InvalidArgument(format!("failpoint {name}: actions \"{actions}\" refused: {e}"))
        })?;
        tracing::warn!("failpoint {name} set to \"{actions}\"");
        Ok(())
    }

    pub fn clear_failpoints() -> Result<()> {
        for (name, _) in KNOWN {
            fail::remove(name);
        }
        tracing::warn!("every failpoint removed");
        Ok(())
    }

    /// The rules and failpoints in force.
    pub fn faults(transport: &Transport) -> Result<pb::GetFaultsResponse> {
        let net = transport
            .net_faults()
            .rules()
            .into_iter()
            .map(|(peer, r)| pb::NetFault {
                peer,
                drop: r.drop,
                loss_percent: r.loss_percent,
                delay_ms: r.delay_ms,
                dup_percent: r.dup_percent,
            })
            .collect();
        let mut failpoints: Vec<pb::Failpoint> = fail::list()
            .into_iter()
            .filter(|(name, _)| KNOWN.iter().any(|(n, _)| n == name))
            .map(|(name, actions)| pb::Failpoint { name, actions })
            .collect();
        failpoints.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(pb::GetFaultsResponse { net, failpoints })
    }
}

#[cfg(not(feature = "failpoints"))]
mod imp {
    use trireme_proto::v1 as pb;
    use trireme_transport::Transport;

    use super::NOT_BUILT;
    use crate::error::{DaemonError, Result};

    fn not_built<T>() -> Result<T> {
        Err(DaemonError::FailedPrecondition(NOT_BUILT.into()))
    }

    pub fn set_net_fault(_: &Transport, _: &pb::SetNetFaultRequest) -> Result<()> {
        not_built()
    }

    pub fn clear_net_faults(_: &Transport) -> Result<()> {
        not_built()
    }

    pub fn set_failpoint(_: &str, _: &str) -> Result<()> {
        not_built()
    }

    pub fn clear_failpoints() -> Result<()> {
        not_built()
    }

    pub fn faults(_: &Transport) -> Result<pb::GetFaultsResponse> {
        not_built()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_described() {
        let mut names: Vec<&str> = KNOWN.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), KNOWN.len(), "a failpoint is listed twice");
        assert!(KNOWN.iter().all(|(n, d)| n.contains("::") && !d.is_empty()));
    }

    // Only refusals: unit tests share the process, and a configured point
    // would fire in the other tests' logs and images.
    #[cfg(feature = "failpoints")]
    #[test]
    fn unknown_names_and_bad_actions_are_refused_and_configure_nothing() {
        let e = set_failpoint("log::nope", "return").unwrap_err().to_string();
        assert!(
            e.contains("unknown failpoint \"log::nope\"") && e.contains(LOG_FSYNC),
            "{e}"
        );
        let e = set_failpoint(CRASH_SNAPSHOT_MID_COPY, "retrun")
            .unwrap_err()
            .to_string();
        assert!(e.contains("refused") && e.contains("unrecognized command"), "{e}");
        let e = set_failpoint(CRASH_SNAPSHOT_MID_COPY, " ").unwrap_err().to_string();
        assert!(e.contains("must not be empty"), "{e}");
        assert!(fail::list().iter().all(|(n, _)| n != CRASH_SNAPSHOT_MID_COPY));
    }
}
