//! The failpoints of the storage layer (the `failpoints` feature; triremed
//! lists them with every other one and configures them at runtime).
//! Without the feature only the names are compiled in.

/// A write or zeroing of a volume image ([`crate::uring::UringStore`])
/// fails: `return(enospc)` with ENOSPC, any other `return` with EIO.
pub const IMAGE_WRITE: &str = "image::write";
/// An fdatasync of a volume image fails (ENOSPC or EIO, as above).
pub const IMAGE_FSYNC: &str = "image::fsync";
/// Writing a state file ([`crate::statefile::write_atomic`]: volume.state,
/// volume.meta) fails (ENOSPC or EIO, as above).
pub const STATE_WRITE: &str = "state::write";

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
