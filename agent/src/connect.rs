//! Opening connections to the gateway: the QUIC handshake, then the request that makes the
//! connection useful (`ATTACH` for the primary, `LANE` for a lane).

use std::net::SocketAddr;

use dmsc_protocol::control::ControlFrame;
use quinn::{Connection, VarInt};
use tokio::time::timeout;

use crate::control::{answer_name, close_code, ControlStream, RequestError};
use crate::error::AgentError;
use crate::handle::Shared;
use crate::tls::SERVER_NAME;

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
