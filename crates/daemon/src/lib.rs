//! triremed: the Trireme node daemon.
//!
//! Owns: configuration, the data directory (node identity, lock, volume
//! catalog), wiring the NBD server to volumes, the gRPC admin API, metrics,
//! and orderly startup and shutdown. With the `failpoints` feature, also
//! fault injection in the running process ([`failpoints`]).
//! Driven by: `main.rs` (signals, the process) and integration tests.
//! Must never depend on: NBD or storage internals beyond their public
//! traits; the CLI (it talks to us only over gRPC).

pub mod admin;
pub mod catalog;
pub mod config;
pub mod error;
pub mod failpoints;
pub mod group;
pub mod liveness;
pub mod logwriter;
pub mod node;
pub mod peer;
pub mod telemetry;
pub mod volume;

pub use config::{Config, Overrides};
pub use error::{DaemonError, Result};
pub use node::Node;
