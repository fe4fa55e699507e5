//! Stand-in Mixpanel and Kameleoon servers for tests, the local demo and
//! benchmarks.
//!
//! Each stand-in serves the real service's paths, parameters, authentication,
//! status codes and JSON shapes on a loopback address, enforces its limits,
//! records every request, and accepts faults on demand. Tests in the same
//! process drive them through [`MixpanelStandin`] and [`KameleoonStandin`];
//! other processes use the `standins` binary and the JSON control API under
//! `/_standin/` on each server (see the crate README).

#![allow(
    clippy::result_large_err,
    reason = "handlers return early responses as axum `Response` values on cold paths"
)]

mod control;
pub mod faults;
pub mod kameleoon;
pub mod limits;
pub mod mixpanel;
pub mod record;
pub mod seed;
mod server;
mod util;

use std::net::SocketAddr;

pub use faults::{ActiveFault, Fault, FaultAction, Route};
pub use kameleoon::{KameleoonConfig, KameleoonStandin};
pub use mixpanel::{MixpanelConfig, MixpanelStandin};
pub use record::RequestRecord;
pub use seed::Seed;

/// Errors of starting or controlling a stand-in.
#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    #[error("failed to read seed file {path}: {source}")]
    SeedRead {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid seed: {0}")]
    InvalidSeed(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error(
        "refusing to listen on {0}: stand-ins listen only on loopback addresses such as 127.0.0.1"
    )]
    NotLoopback(SocketAddr),
    #[error("failed to listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}
