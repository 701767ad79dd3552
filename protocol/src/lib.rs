//! Wire formats of the DMSC gateway, sans-IO.
//!
//! This crate holds everything that crosses a wire between DMSC processes, as plain encoders,
//! decoders and data types:
//!
//! - [`varint`]: QUIC variable-length integers (RFC 9000 section 16), the integer encoding used
//!   by every DMSC frame.
//! - [`header`]: the request and response headers at the start of every invocation stream.
//! - [`control`]: the frames of the agent control stream (attach, lanes, capability updates,
//!   discovery, detach and drain).
//! - [`ctl`]: the frames of `dmsc-ctl/1`, the session on which the control plane pushes tables
//!   to a gateway.
//! - [`peer`]: the header of `dmsc-peer/1` trunk streams between gateways.
//! - [`domain`]: the `dmsc-ctl/1` frames by which gateways report their agents and the control
//!   plane pushes the domain's routes.
//! - [`status`]: response status codes and the QUIC stream and connection error codes.
//! - [`card`]: the A2A agent-card model, parsed from the JSON agents publish.
//! - [`spiffe`]: SPIFFE IDs, the identities in certificates and in the caller field (parsing and
//!   building only; certificates themselves are the business of `dmsc-identity`).
//! - [`table`]: the compiled routing and policy tables the control plane pushes to gateways,
//!   their canonical encoding, and the evaluation helpers a gateway applies per connection,
//!   per capability and per request.
//! - [`limits`]: every length limit of the protocol.
//!
//! It opens no sockets, reads no clock, touches no file, starts no threads and holds no
//! certificate machinery; its one cryptographic primitive is SHA-256 (from `ring`), which names
//! table generations by content: callers pass bytes in and get values or typed errors
//! back, so every decoder can be driven by tests and fuzzers directly.
//! The normative description of the formats is `docs/PROTOCOL.md`.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod card;
pub mod control;
pub mod ctl;
pub mod domain;
pub mod header;
pub mod limits;
pub mod peer;
pub mod spiffe;
pub mod status;
pub mod table;
pub mod varint;

mod codec;

pub use codec::DecodeError;
pub use status::{ConnectionCode, Status, StreamCode};

/// ALPN protocol identifier for agent <-> gateway connections.
pub const ALPN_AGENT: &[u8] = b"dmsc/1";
/// ALPN protocol identifier for gateway <-> gateway trunks.
pub const ALPN_PEER: &[u8] = b"dmsc-peer/1";
/// ALPN protocol identifier for control-plane sessions.
pub const ALPN_CONTROL: &[u8] = b"dmsc-ctl/1";
