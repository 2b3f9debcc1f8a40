//! Generated types and service stubs for the `trireme.v1` admin API.
//!
//! Owns nothing but the generated code from `proto/trireme/v1/*.proto`.
//! Must never depend on any other Trireme crate: the daemon and the CLI both
//! depend on it, and the wire format is the contract between them.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("trireme.v1");
}
