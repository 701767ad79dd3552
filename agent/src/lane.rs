//! Lanes: one extra connection per other gateway worker, bound to the session with `LANE`.
//!
//! Each lane has a task of its own ([`run_lane`]) that opens the lane, registers it in the
//! [`ConnSet`], serves it, and reopens it with backoff when it fails; a lane failing never
//! affects the attachment. The session task stops the lane tasks when the attachment ends.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use dmsc_protocol::control::{ControlFrame, LaneToken, SessionId};
use quinn::Connection;
use tokio::task::JoinSet;
use tokio::time::{sleep, Instant};

use crate::connect::{handshake, limit_streams};
use crate::control::{close_code, ControlStream};
use crate::error::AgentError;
use crate::handle::{ConnSet, Shared};
use crate::serve::{accept_loop, Server};

/// A lane open this long resets its reopening backoff.
const STABLE_LANE: Duration = Duration::from_secs(10);

/// What every lane of a session needs to bind to it, from `ATTACH_OK`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    pub(crate) session: SessionId,
    pub(crate) lane_token: LaneToken,
    /// The per-connection concurrency limit the gateway announced (0: none).
    pub(crate) gateway_limit: u64,
}

/// Spawns one lane task on `tasks` for each address in `addresses` (index = worker), except
/// the `home` worker that holds the primary connection. Addresses that do not resolve are
/// logged and skipped.
pub(crate) fn spawn_lanes(
    tasks: &mut JoinSet<()>,
    server: &Arc<Server>,
    set: &Arc<ConnSet>,
    home: u64,
    addresses: &[String],
    ticket: Ticket,
) {
    let gateway = set.primary.remote_address();
    for (index, address) in addresses.iter().enumerate() {
        let worker = index as u64;
        if worker == home {
            continue;
        }
        match lane_address(address, gateway) {
            Ok(addr) => {
                tasks.spawn(run_lane(server.clone(), set.clone(), worker, addr, ticket));
            }
            Err(reason) => {
                tracing::warn!(lane = worker, address = %address, reason, "lane not opened");
            }
        }
    }
}

/// Keeps one lane open: opens it, serves it until it closes, reopens it with backoff.
async fn run_lane(
    server: Arc<Server>,
    set: Arc<ConnSet>,
    worker: u64,
    addr: SocketAddr,
    ticket: Ticket,
) {
    let shared = &server.shared;
    let mut attempt: u32 = 0;
    loop {
        match open_lane(shared, addr, ticket).await {
            Ok((connection, mut control)) => {
                tracing::debug!(lane = worker, %addr, "lane open");
                let opened = Instant::now();
                set.add_lane(worker, connection.clone());
                tokio::spawn(accept_loop(server.clone(), connection.clone()));
                loop {
                    tokio::select! {
                        _ = connection.closed() => break,
                        frame = control.next() => match frame {
                            Ok(ControlFrame::Drain { .. }) => {
                                // Stop starting invocations here; in-flight ones finish and
                                // the gateway closes the lane.
                                set.remove_lane(worker);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                connection.close(close_code(e.close_code()), b"lane control failed");
                                break;
                            }
                        },
                    }
                }
                set.remove_lane(worker);
                tracing::debug!(lane = worker, reason = ?connection.close_reason(), "lane closed");
                if opened.elapsed() >= STABLE_LANE {
                    attempt = 0;
                }
            }
            Err(e) => tracing::debug!(lane = worker, %addr, error = %e, "lane failed"),
        }
        sleep(shared.settings.reconnect.next_delay(attempt)).await;
        attempt = attempt.saturating_add(1);
    }
}

/// Opens a lane connection to `addr` and binds it to the session.
async fn open_lane(
    shared: &Shared,
    addr: SocketAddr,
    ticket: Ticket,
) -> Result<(Connection, ControlStream), AgentError> {
    let request = ControlFrame::Lane {
        session: ticket.session,
        lane_token: ticket.lane_token,
    };
    let (connection, control, ()) = handshake(shared, addr, &request, |frame| match frame {
        ControlFrame::LaneOk { .. } => Ok(()),
        other => Err(other),
    })
    .await?;
    limit_streams(
        &connection,
        shared.settings.max_concurrent,
        ticket.gateway_limit,
    );
    Ok((connection, control))
}

/// The socket address of a lane: `ip:port`, where an unspecified IP (`0.0.0.0`, `::`) means
/// the gateway's own address.
fn lane_address(address: &str, gateway: SocketAddr) -> Result<SocketAddr, &'static str> {
    let mut addr: SocketAddr = address.parse().map_err(|_| "not an ip:port address")?;
    if addr.ip().is_unspecified() {
        addr.set_ip(gateway.ip());
    }
    let family_matches = matches!(
        (addr.ip(), gateway.ip()),
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_))
    );
    if !family_matches {
        return Err("address family differs from the gateway's");
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_addresses_resolve_against_the_gateway() {
        let gw: SocketAddr = "10.0.0.7:4433".parse().unwrap();
        assert_eq!(
            lane_address("0.0.0.0:4501", gw).unwrap(),
            "10.0.0.7:4501".parse().unwrap()
        );
        assert_eq!(
            lane_address("10.0.0.8:4502", gw).unwrap(),
            "10.0.0.8:4502".parse().unwrap()
        );
        assert!(lane_address("gateway.example:4501", gw).is_err());
        assert!(lane_address("[::1]:4501", gw).is_err());
        let gw6: SocketAddr = "[fd00::7]:4433".parse().unwrap();
        assert_eq!(
            lane_address("[::]:4501", gw6).unwrap(),
            "[fd00::7]:4501".parse().unwrap()
        );
    }
}
