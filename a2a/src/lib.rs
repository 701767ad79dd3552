//! The A2A front door and adapter: unmodified A2A clients and agents (the official `a2a-sdk`,
//! or any other implementation of A2A v1.0 or v0.3 over HTTP) collaborate through a DMSC
//! gateway, routed by capability.
//!
//! - [`front`]: an HTTP server on which each capability of the domain is a virtual A2A agent
//!   with its own card; its requests become `dmsc/1` invocations of the capability.
//! - [`adapt`]: attaches an A2A agent to a gateway with its own card, and turns invocations
//!   into A2A calls on it.
//! - [`binding`]: the A2A binding on `dmsc/1` both speak (a native `dmsc/1` agent can serve
//!   A2A callers by speaking it too). Normative text: `docs/A2A.md`.
//!
//! Inside the domain everything is A2A v1.0; [`convert`] turns v0.3 requests into v1.0 and
//! answers back, so each caller is answered in its own version.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod adapt;
pub mod binding;
pub mod convert;
pub mod echo;
pub mod error;
pub mod front;
pub mod load;
pub mod method;
pub mod metrics;
pub mod sse;
pub mod task_id;
