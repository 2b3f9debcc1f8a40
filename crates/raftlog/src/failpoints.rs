//! The failpoints of the log (the `failpoints` feature; triremed lists them
//! with every other one and configures them at runtime). Without the
//! feature only the names are compiled in.

/// The batch write fails before its fdatasync: `return(enospc)` fails it
/// with ENOSPC, any other `return` with EIO.
pub const LOG_WRITE: &str = "log::write";
/// The log's fdatasync fails (ENOSPC or EIO, as for [`LOG_WRITE`]).
pub const LOG_FSYNC: &str = "log::fsync";
/// The process aborts when the log is written and its fdatasync is about
/// to be issued.
pub const CRASH_LOG_AFTER_WRITE: &str = "crash::log_after_write";

/// The error an I/O failpoint injects, if it is configured to fire now.
///
/// `fail::eval` rather than `fail_point!`: the macro needs the fail crate's
/// own `failpoints` feature, which would switch on raft-engine's failpoints
/// too (and break its build without raft-engine's feature).
#[cfg(feature = "failpoints")]
pub(crate) fn injected_io_error(name: &'static str) -> Option<std::io::Error> {
    fail::eval(name, |arg| {
        let errno = match arg.as_deref() {
            Some(a) if a.eq_ignore_ascii_case("enospc") => libc::ENOSPC,
            _ => libc::EIO,
        };
        let e = std::io::Error::from_raw_os_error(errno);
        tracing::warn!("failpoint {name}: injecting {e}");
        e
    })
}

/// Aborts the process at once if the crash point fires (`return`, or a
/// `panic` action: the point must crash, not unwind through the writer).
#[cfg(feature = "failpoints")]
pub(crate) fn crash_point(name: &'static str) {
    let fired = std::panic::catch_unwind(|| fail::eval(name, |_| ()).is_some());
    if fired.unwrap_or(true) {
        tracing::error!("failpoint {name}: crashing");
        std::process::abort();
    }
}
