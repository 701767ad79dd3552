//! The DMSC gateway data plane.
//!
//! A thread-per-core QUIC gateway: agents attach over `dmsc/1` with mutual TLS and an A2A agent
//! card, and invoke each other by capability. Each worker thread is an I/O shell (its sockets,
//! one shared with the other workers through `SO_REUSEPORT` and one of its own for lanes, a
//! `mio::Poll`, its inbox and the clock) around a sans-IO core that owns a
//! `quinn_proto::Endpoint` with its connections and its copy of the routing state; workers
//! share nothing mutable on the request path and talk through bounded channels. The admin
//! endpoint (Prometheus metrics, agents, health) runs on a thread of its own. The internals are
//! described in `docs/DATAPLANE.md`.
//!
//! What it does not do (yet): policy beyond "any agent of the domain may call any capability"
//! (the control plane will push table generations for that), and trunks to other gateways.
//!
//! Start one with [`Gateway::start`]; the `dmsc-gateway` binary wraps that with flags, a config
//! file, a development PKI and signal handling.

#![warn(missing_docs)]

pub mod config;
pub mod routing;
pub mod slab;

mod admin;
mod bootstrap;
mod control;
mod core;
mod gateway;
mod metrics;
mod msg;
mod stats;
mod tls;
mod worker;

pub use bootstrap::{dev_identity, DevIdentityPaths};
pub use config::{Config, ConfigError, Limits};
pub use control::{
    load_saved, ControlClient, ControlError, ControlLink, ControlSettings, ControlState,
    InstallError, SAVED_TABLE,
};
pub use gateway::{Gateway, GatewayHandle, GatewayIdentity, StartError};
pub use metrics::{AgentView, CapabilityMetrics, WorkerSnapshot};
pub use stats::{StatsSnapshot, WorkerStats};
pub use tls::TlsError;
