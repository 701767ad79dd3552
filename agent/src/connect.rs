//! Opening connections to the gateway: the QUIC transport settings, the handshake, then the
//! request that makes the connection useful (`ATTACH` for the primary, `LANE` for a lane).
//!
//! # Keep-alive
//!
//! A QUIC connection closes after the *effective* idle timeout without traffic: the smaller
//! of the two peers' `max_idle_timeout` (RFC 9000, section 10.1). The gateway never pings, so
//! the agent must send something more often than that; PROTOCOL.md section 2.5 asks for a
//! ping when nothing was sent for 5 s, and in any case more often than half the effective
//! idle timeout. The SDK pings after [`keep_alive_interval`] of silence on every connection
//! (primary and lanes): a third of the agent's own idle timeout, at most 5 s, at least
//! 250 ms. A third leaves room for a lost ping and its retransmission.
//!
//! The rule uses the agent's value because that is all it knows: quinn does not expose the
//! peer's transport parameters, and `ATTACH_OK` does not carry the gateway's idle timeout.
//! With the default 30 s, the SDK pings every 5 s, which suits gateways whose idle timeout is
//! 15 s or more; for a lower gateway value, configure [`AgentConfig::idle_timeout`] to at most
//! that value.
//!
//! [`AgentConfig::idle_timeout`]: crate::AgentConfig::idle_timeout

use std::net::SocketAddr;
use std::time::Duration;

use dmsc_protocol::control::ControlFrame;
use quinn::{Connection, IdleTimeout, TransportConfig, VarInt};
use tokio::time::timeout;

use crate::control::{answer_name, close_code, ControlStream, RequestError};
use crate::error::AgentError;
use crate::handle::Shared;
use crate::tls::SERVER_NAME;

/// Longest interval between keep-alive pings (PROTOCOL.md section 2.5).
const MAX_KEEP_ALIVE: Duration = Duration::from_secs(5);
/// Shortest interval between keep-alive pings.
const MIN_KEEP_ALIVE: Duration = Duration::from_millis(250);

/// How long a connection may stay silent before the SDK pings, for an agent whose idle timeout
/// is `idle_timeout` (see the module documentation).
pub(crate) fn keep_alive_interval(idle_timeout: Duration) -> Duration {
    (idle_timeout / 3).clamp(MIN_KEEP_ALIVE, MAX_KEEP_ALIVE)
}

/// Ack-eliciting packets the gateway may receive before it must acknowledge (QUIC ACK
/// frequency extension).
const ACK_ELICITING_THRESHOLD: u32 = 8;
/// Longest the gateway may delay an acknowledgement.
const MAX_ACK_DELAY: Duration = Duration::from_millis(1);

/// The QUIC transport settings of every connection to the gateway.
pub(crate) fn transport_config(
    max_concurrent: u32,
    idle_timeout: Duration,
) -> Result<TransportConfig, AgentError> {
    let idle = IdleTimeout::try_from(idle_timeout)
        .map_err(|_| AgentError::Config("idle_timeout is too large".into()))?;
    let mut transport = TransportConfig::default();
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(Some(keep_alive_interval(idle_timeout)))
        // Twice the concurrency limit in stream credit: the gateway enforces `max_concurrent`
        // itself, and a finished stream's credit only returns once its FIN is acknowledged and
        // MAX_STREAMS has arrived; without the headroom a target at its limit would see spurious
        // OVERLOADED answers in that window (PROTOCOL.md section 2.5).
        .max_concurrent_bidi_streams(VarInt::from_u32(max_concurrent.saturating_mul(2)))
        .max_concurrent_uni_streams(VarInt::from_u32(0));
    // Ask the gateway to acknowledge every 8th ack-eliciting packet (or after 1 ms) instead of
    // every 2nd, as the gateway asks of its peers: most acknowledgements ride on answers, and
    // the ACK-only packets left cost both ends a packet each. The 1 ms bound (not more) keeps
    // stream credit and send buffers from waiting on a delayed acknowledgement at the end of a
    // burst (docs/BENCHMARKS.md, issue 10).
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(ACK_ELICITING_THRESHOLD))
        .max_ack_delay(Some(MAX_ACK_DELAY));
    transport.ack_frequency_config(Some(ack));
    Ok(transport)
}

/// Connects to `addr`, then sends `request` on a new control stream and waits for the answer
/// `accept` takes (see [`ControlStream::request`]). Each step is bounded by `connect_timeout`.
/// On failure the connection is closed.
pub(crate) async fn handshake<T>(
    shared: &Shared,
    addr: SocketAddr,
    request: &ControlFrame,
    accept: impl Fn(ControlFrame) -> Result<T, ControlFrame>,
) -> Result<(Connection, ControlStream, T), AgentError> {
    let connection = connect(shared, addr).await?;
    let exchange = async {
        let mut control = ControlStream::open(&connection).await?;
        let answer = control.request(request, accept).await?;
        Ok::<_, RequestError>((control, answer))
    };
    let error = match timeout(shared.settings.connect_timeout, exchange).await {
        Ok(Ok((control, answer))) => return Ok((connection, control, answer)),
        Ok(Err(e)) => e,
        Err(_) => RequestError::Timeout {
            waiting: answer_name(request).1,
        },
    };
    connection.close(close_code(error.close_code()), error.close_reason());
    Err(error.into())
}

/// Opens a QUIC connection to `addr`, bounded by `connect_timeout`.
async fn connect(shared: &Shared, addr: SocketAddr) -> Result<Connection, AgentError> {
    let connecting = shared
        .endpoint
        .connect(addr, SERVER_NAME)
        .map_err(|source| AgentError::Connect { addr, source })?;
    match timeout(shared.settings.connect_timeout, connecting).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(AgentError::Handshake { addr, source }),
        Err(_) => Err(AgentError::Timeout("connecting to the gateway")),
    }
}

/// Lowers the stream credit of `connection` to twice the gateway's per-worker limit when that
/// is below ours (the headroom covers credit still on its way back; PROTOCOL.md section 2.5).
pub(crate) fn limit_streams(connection: &Connection, ours: u32, gateway: u64) {
    if gateway > 0 && gateway < u64::from(ours) {
        if let Ok(limit) = VarInt::from_u64(gateway.saturating_mul(2)) {
            connection.set_max_concurrent_bi_streams(limit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_is_a_third_of_the_idle_timeout_within_bounds() {
        let secs = Duration::from_secs;
        let millis = Duration::from_millis;
        assert_eq!(keep_alive_interval(secs(30)), secs(5));
        assert_eq!(keep_alive_interval(secs(3600)), secs(5));
        assert_eq!(keep_alive_interval(secs(12)), secs(4));
        assert_eq!(keep_alive_interval(millis(1500)), millis(500));
        assert_eq!(keep_alive_interval(millis(1200)), millis(400));
        assert_eq!(keep_alive_interval(millis(300)), millis(250));
        // Always well under half of the idle timeout, for every accepted value.
        for ms in (1_000..=60_000).step_by(250) {
            let idle = millis(ms);
            assert!(keep_alive_interval(idle) * 2 < idle, "{idle:?}");
        }
    }
}
