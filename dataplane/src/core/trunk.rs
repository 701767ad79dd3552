//! Trunks: this worker's connections to the other gateways of the domain (`dmsc-peer/1`,
//! `docs/TRUNK.md`), and the domain routes that say which gateway offers what.
//!
//! Each worker owns its trunks, like lanes: worker `w` of this gateway connects to worker
//! `w mod n` of each peer gateway (its `n` trunk addresses come in the routes), and a peer's
//! worker keeps what arrives on the core it arrived on. The routes ([`DomainRoutes`]) are
//! shared by every worker as an `Arc`, installed between iterations like tables; each worker
//! keeps its own peer state (connection, requests in flight, counters) in [`Trunks`].
//!
//! Selection ([`Core::select_remote`]): a capability no local agent serves goes to the peer
//! gateway, among those offering it that the request has not visited and whose trunk from
//! this worker is connected, with the fewest requests this worker has in flight over that
//! trunk per agent the gateway reports (reported load, then the gateway's position in the
//! routes, break ties). A request for a session (`target_session`) of another gateway goes to
//! the gateways whose tag (bits 32 to 47 of the session id) it carries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use smallvec::SmallVec;
use tracing::{debug, warn};

use dmsc_protocol::domain::{Provider, Routes, Skill};
use dmsc_protocol::table::{Column, GroupSet, Relation};
use dmsc_protocol::ConnectionCode;

use super::conn::Role;
use super::{ConnIdx, Core};
use crate::routing::{permits, MetricSlot};
use crate::stats::WorkerStats;

/// First delay before reconnecting a failed trunk; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest delay between two attempts to connect a trunk.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Requests a peer gateway's worker may have open at once on its trunk to this worker.
pub(crate) const TRUNK_MAX_STREAMS: u32 = 4096;

/// A capability offered behind other gateways.
#[derive(Debug)]
pub(crate) struct RemoteCapability {
    /// One provider's skill, for discovery.
    pub(crate) skill: Skill,
    /// The gateways offering it (indices into [`DomainRoutes::gateways`]), this one excluded.
    pub(crate) providers: SmallVec<[Provider; 2]>,
    /// Agents offering it across those gateways.
    pub(crate) agents: u64,
}

/// A gateway of the domain as the routes name it.
#[derive(Debug)]
pub(crate) struct RouteGateway {
    pub(crate) id: Arc<str>,
    /// Its tag in the session ids it hands out.
    pub(crate) tag: u16,
    /// Its trunk addresses, one per worker (those that did not parse are left out).
    pub(crate) addresses: Vec<SocketAddr>,
}

/// The domain's routes as a worker uses them: built once per `ROUTES` on the control thread.
#[derive(Debug)]
pub struct DomainRoutes {
    pub(crate) epoch: u64,
    pub(crate) version: u64,
    pub(crate) gateways: Vec<RouteGateway>,
    /// By name, in name order (discovery reads prefix ranges).
    pub(crate) capabilities: BTreeMap<Box<str>, RemoteCapability>,
}

impl DomainRoutes {
    /// The routes `routes` as seen from gateway `own_id`: its own agents are left out (they
    /// are served locally).
    pub fn new(routes: Routes, own_id: &str) -> Self {
        let gateways: Vec<RouteGateway> = routes
            .gateways
            .into_iter()
            .map(|g| RouteGateway {
                addresses: g.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                tag: super::gateway_tag(&g.id),
                id: g.id.into(),
            })
            .collect();
        let own = gateways.iter().position(|g| &*g.id == own_id);
        let capabilities = routes
            .capabilities
            .into_iter()
            .filter_map(|c| {
                let providers: SmallVec<[Provider; 2]> = c
                    .providers
                    .into_iter()
                    .filter(|p| Some(p.gateway as usize) != own && p.agents > 0)
                    .collect();
                if providers.is_empty() {
                    return None;
                }
                let agents = providers
                    .iter()
                    .fold(0u64, |sum, p| sum.saturating_add(p.agents));
                let name: Box<str> = c.skill.id.as_str().into();
                Some((
                    name,
                    RemoteCapability {
                        skill: c.skill,
                        providers,
                        agents,
                    },
                ))
            })
            .collect();
        Self {
            epoch: routes.epoch,
            version: routes.version,
            gateways,
            capabilities,
        }
    }

    /// The routes' epoch and version.
    pub fn version(&self) -> (u64, u64) {
        (self.epoch, self.version)
    }

    /// Capabilities offered behind other gateways.
    pub fn remote_capabilities(&self) -> usize {
        self.capabilities.len()
    }
}

/// One peer gateway, from this worker's side.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) id: Arc<str>,
    /// The address this worker connects to (`None`: the routes give none that parses).
    addr: Option<SocketAddr>,
    /// Listed in the routes now installed.
    listed: bool,
    /// The trunk connection, connecting or connected.
    pub(crate) conn: Option<ConnIdx>,
    /// The handshake completed and the peer is the gateway it should be.
    pub(crate) connected: bool,
    /// Requests in flight over the trunk from this worker.
    pub(crate) outstanding: u32,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// Requests forwarded over the trunk, and those that ended in an error.
    pub(crate) requests: u64,
    pub(crate) errors: u64,
}

/// This worker's trunks and its copy of the domain routes.
#[derive(Default)]
pub(crate) struct Trunks {
    pub(crate) routes: Option<Arc<DomainRoutes>>,
    /// Peer slots; a gateway keeps its slot for the worker's lifetime.
    pub(crate) peers: Vec<Peer>,
    by_id: HashMap<Arc<str>, usize>,
    /// For each gateway index of the installed routes, its peer slot (`None`: this gateway).
    slot_of: Vec<Option<usize>>,
    /// The invoke policy column and metrics slot of each remote capability under the
    /// installed table.
    columns: HashMap<Box<str>, (Option<Column>, MetricSlot)>,
    /// How this worker connects to peers (`None`: trunks are off, e.g. no lanes).
    pub(crate) client: Option<quinn_proto::ClientConfig>,
}

/// The outcome of [`Core::select_remote`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RemoteSelection {
    /// Forward over this peer slot's trunk connection (the capability's metrics slot).
    Peer(usize, ConnIdx, MetricSlot),
    /// No other gateway offers the capability.
    NoRoute,
    /// Policy forbids the call (the capability's metrics slot).
    Denied(MetricSlot),
    /// Every gateway offering it was already visited by this request.
    Loop,
    /// Gateways offer it, but no trunk to any of them is connected from this worker.
    Unavailable,
}

impl Trunks {
    /// The invoke column and metrics slot of `capability`, if it is offered remotely.
    fn column(&self, capability: &str) -> Option<&(Option<Column>, MetricSlot)> {
        self.columns.get(capability)
    }

    /// The next time a trunk should be (re)connected: only peers without a connection wait
    /// for one (a connection in progress decides its own fate).
    pub(crate) fn next_retry(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter(|p| p.conn.is_none())
            .filter_map(|p| p.retry_at)
            .min()
    }
}

impl Core {
    /// Installs new domain routes: peers appear and go, their trunks are opened or closed.
    pub(crate) fn install_routes(&mut self, routes: Arc<DomainRoutes>, now: Instant) {
        let shared = self.shared.clone();
        let own = &*shared.config.gateway_id;
        let worker = self.index.index();
        let mut slot_of = Vec::with_capacity(routes.gateways.len());
        for p in &mut self.trunks.peers {
            p.listed = false;
        }
        for g in &routes.gateways {
            if &*g.id == own {
                slot_of.push(None);
                continue;
            }
            let addr = (!g.addresses.is_empty()).then(|| g.addresses[worker % g.addresses.len()]);
            let slot = match self.trunks.by_id.get(&g.id) {
                Some(&s) => s,
                None => {
                    self.trunks.peers.push(Peer {
                        id: g.id.clone(),
                        addr,
                        listed: true,
                        conn: None,
                        connected: false,
                        outstanding: 0,
                        retry_at: Some(now),
                        backoff: MIN_BACKOFF,
                        requests: 0,
                        errors: 0,
                    });
                    let s = self.trunks.peers.len() - 1;
                    self.trunks.by_id.insert(g.id.clone(), s);
                    s
                }
            };
            let peer = &mut self.trunks.peers[slot];
            peer.listed = true;
            if peer.addr != addr {
                // Moved: reconnect to the new address.
                peer.addr = addr;
                if let Some(ci) = peer.conn.take() {
                    peer.connected = false;
                    self.close_conn(ci, now, ConnectionCode::NoError, "peer moved");
                }
                let peer = &mut self.trunks.peers[slot];
                peer.retry_at = Some(now);
            }
            slot_of.push(Some(slot));
        }
        for slot in 0..self.trunks.peers.len() {
            let peer = &mut self.trunks.peers[slot];
            if !peer.listed {
                peer.retry_at = None;
                peer.connected = false;
                if let Some(ci) = peer.conn.take() {
                    self.close_conn(ci, now, ConnectionCode::NoError, "peer left the domain");
                }
            }
        }
        self.trunks.slot_of = slot_of;
        self.trunks.routes = Some(routes);
        self.recompute_remote_columns();
        self.connect_trunks(now);
    }

    /// Recomputes the invoke column of every remote capability (a new table or new routes).
    pub(crate) fn recompute_remote_columns(&mut self) {
        let table = self.router.table().clone();
        let Some(routes) = &self.trunks.routes else {
            self.trunks.columns.clear();
            return;
        };
        // Capabilities that stay keep their entry (no new key per install); the rest go.
        self.trunks
            .columns
            .retain(|name, _| routes.capabilities.contains_key(name));
        for name in routes.capabilities.keys() {
            let column = table.column(Relation::Invoke, name);
            match self.trunks.columns.get_mut(name) {
                Some(entry) => entry.0 = column,
                None => {
                    let metric = self.router.intern_metric(name);
                    self.trunks.columns.insert(name.clone(), (column, metric));
                }
            }
        }
    }

    /// Opens the trunks that are due: listed peers without a connection whose retry time came.
    pub(crate) fn connect_trunks(&mut self, now: Instant) {
        let Some(client) = self.trunks.client.clone() else {
            return;
        };
        if !self.accepting {
            // Draining: no new trunks.
            for peer in &mut self.trunks.peers {
                peer.retry_at = None;
            }
            return;
        }
        for slot in 0..self.trunks.peers.len() {
            let peer = &mut self.trunks.peers[slot];
            if !peer.listed || peer.conn.is_some() || peer.retry_at.is_none_or(|t| t > now) {
                continue;
            }
            // The attempt's outcome sets the next one: `trunk_gone` after the backoff.
            peer.retry_at = None;
            let Some(addr) = peer.addr else {
                continue;
            };
            let Some(socket) = self.trunk_socket else {
                return;
            };
            match self.endpoint.connect(now, client.clone(), addr, "gateway") {
                Ok((ch, quic)) => {
                    // From this worker's own trunk socket, so the answers come back here.
                    self.add_conn(ch, quic, socket, now);
                    let ci = ConnIdx::from(ch);
                    if let Some(conn) = self.conns.get_mut(ci) {
                        conn.role = Role::TrunkOut(slot);
                        conn.attach_deadline = None;
                    }
                    self.update_conn_timer(ci);
                    self.trunks.peers[slot].conn = Some(ci);
                    debug!(peer = %self.trunks.peers[slot].id, %addr, "connecting trunk");
                }
                Err(e) => {
                    warn!(peer = %peer.id, %addr, error = %e, "cannot connect trunk");
                    peer.retry_at = Some(now + MAX_BACKOFF);
                }
            }
        }
    }

    /// The trunk to peer `slot` completed its handshake: usable once the peer proved to be
    /// that gateway.
    pub(crate) fn trunk_connected(&mut self, ci: ConnIdx, slot: usize, now: Instant) {
        let domain = &self.shared.config.domain;
        let Some(peer) = self.trunks.peers.get_mut(slot) else {
            return;
        };
        let expected = dmsc_protocol::spiffe::SpiffeId::gateway(domain, &peer.id)
            .map(|id| id.as_str().to_owned())
            .ok();
        let got = self
            .conns
            .get(ci)
            .and_then(|c| crate::tls::peer_spiffe_id(&c.quic));
        if got.is_none() || got != expected {
            warn!(peer = %peer.id, presented = ?got, "trunk peer is not the gateway the routes name");
            return self.close_conn(ci, now, ConnectionCode::Unauthenticated, "wrong gateway");
        }
        peer.connected = true;
        peer.backoff = MIN_BACKOFF;
        peer.retry_at = None;
        debug!(peer = %peer.id, "trunk connected");
    }

    /// The trunk connection of peer `slot` is gone: its gateway is unavailable from this
    /// worker at once, and a new connection is tried after the backoff.
    pub(crate) fn trunk_gone(&mut self, ci: ConnIdx, slot: usize, now: Instant) {
        let Some(peer) = self.trunks.peers.get_mut(slot) else {
            return;
        };
        if peer.conn != Some(ci) {
            return;
        }
        peer.conn = None;
        peer.connected = false;
        if peer.listed {
            // 50 ms after a failure, doubling with every attempt that fails, up to 2 s; a
            // handshake that completes resets it.
            peer.retry_at = Some(now + peer.backoff);
            peer.backoff = (peer.backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Picks the gateway to forward `capability` to for a caller in `groups`, skipping the
    /// gateways in `visited`, and with `tag` only a gateway with that session tag (a request
    /// for a session of another gateway). See the module documentation for the rule.
    pub(crate) fn select_remote(
        &self,
        groups: &GroupSet,
        capability: &str,
        visited: &[&str],
        tag: Option<u16>,
    ) -> RemoteSelection {
        let Some(routes) = &self.trunks.routes else {
            return RemoteSelection::NoRoute;
        };
        let Some(cap) = routes.capabilities.get(capability) else {
            return RemoteSelection::NoRoute;
        };
        let (column, metric) = match self.trunks.column(capability) {
            Some((column, metric)) => (column.as_ref(), *metric),
            None => (None, MetricSlot::OTHER),
        };
        if !permits(groups, column) {
            return RemoteSelection::Denied(metric);
        }
        let mut best: Option<(u64, u64, usize, ConnIdx)> = None;
        let (mut matched, mut unvisited) = (false, false);
        for p in &cap.providers {
            let Some(Some(slot)) = self.trunks.slot_of.get(p.gateway as usize) else {
                continue;
            };
            if tag.is_some_and(|t| routes.gateways[p.gateway as usize].tag != t) {
                continue;
            }
            matched = true;
            let peer = &self.trunks.peers[*slot];
            if visited.contains(&&*peer.id) {
                continue;
            }
            unvisited = true;
            let (true, Some(ci)) = (peer.connected, peer.conn) else {
                continue;
            };
            // In flight per agent, scaled to keep integer precision.
            let score = u64::from(peer.outstanding) * 1024 / p.agents.max(1);
            let key = (score, p.load, *slot, ci);
            if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                best = Some(key);
            }
        }
        match best {
            Some((_, _, slot, ci)) => RemoteSelection::Peer(slot, ci, metric),
            None if !matched => RemoteSelection::NoRoute,
            None if !unvisited => RemoteSelection::Loop,
            None => RemoteSelection::Unavailable,
        }
    }

    /// The figures of this worker's trunks to the peers the routes list.
    pub(crate) fn trunk_views(&self) -> Vec<crate::metrics::TrunkView> {
        self.trunks
            .peers
            .iter()
            .filter(|p| p.listed)
            .map(|p| crate::metrics::TrunkView {
                gateway: p.id.to_string(),
                connected: p.connected,
                outstanding: p.outstanding,
                requests: p.requests,
                errors: p.errors,
            })
            .collect()
    }

    /// After a table install: trunks from gateways the new table no longer lists are closed
    /// with `UNAUTHENTICATED` (their requests end as when any caller's connection closes).
    pub(crate) fn close_unlisted_trunks(&mut self) {
        let now = self.now;
        let unlisted: SmallVec<[ConnIdx; 4]> = self
            .conns
            .iter()
            .filter(|(_, c)| c.role == Role::TrunkIn)
            .filter(|(_, c)| {
                let gateway = c.identity.as_deref().and_then(|id| id.rsplit('/').next());
                !gateway.is_some_and(|g| self.is_domain_gateway(g))
            })
            .map(|(ci, _)| ci)
            .collect();
        for ci in unlisted {
            debug!("closing a trunk from a gateway the new table does not list");
            WorkerStats::add(&self.stats.trunks_refused, 1);
            self.close_conn(
                ci,
                now,
                ConnectionCode::Unauthenticated,
                "not a gateway of this domain's table",
            );
        }
    }

    /// Whether gateway `id` is one of the installed table's gateways (trunks from others are
    /// refused). Without a compiled table no trunk is accepted.
    pub(crate) fn is_domain_gateway(&self, id: &str) -> bool {
        self.router.table().lists_gateway(id)
    }
}

#[cfg(test)]
mod tests {
    use dmsc_protocol::domain::{RouteCapability, RouteGateway as Gw};

    use super::*;

    fn skill(id: &str) -> Skill {
        Skill {
            id: id.into(),
            ..Skill::default()
        }
    }

    #[test]
    fn routes_leave_out_this_gateway_and_its_agents() {
        let routes = Routes {
            version: 3,
            epoch: 9,
            gateways: vec![
                Gw {
                    id: "gw1".into(),
                    addresses: vec!["127.0.0.1:5000".into(), "not an address".into()],
                },
                Gw {
                    id: "gw2".into(),
                    addresses: vec!["127.0.0.1:6000".into()],
                },
            ],
            capabilities: vec![
                RouteCapability {
                    skill: skill("both"),
                    providers: vec![
                        Provider {
                            gateway: 0,
                            agents: 2,
                            load: 0,
                        },
                        Provider {
                            gateway: 1,
                            agents: 3,
                            load: 1,
                        },
                    ],
                },
                RouteCapability {
                    skill: skill("mine"),
                    providers: vec![Provider {
                        gateway: 1,
                        agents: 1,
                        load: 0,
                    }],
                },
            ],
        };
        let seen = DomainRoutes::new(routes, "gw2");
        assert_eq!(seen.version(), (9, 3));
        // gw2's own agents are served locally: `mine` is not remote, `both` only at gw1.
        assert_eq!(seen.remote_capabilities(), 1);
        let both = &seen.capabilities["both"];
        assert_eq!(both.agents, 2);
        assert_eq!(both.providers.len(), 1);
        assert_eq!(both.providers[0].gateway, 0);
        // Addresses that do not parse are left out.
        assert_eq!(seen.gateways[0].addresses.len(), 1);
        assert_eq!(seen.gateways[0].tag, super::super::gateway_tag("gw1"));
    }

    #[test]
    fn a_session_id_names_its_gateway() {
        let tag = super::super::gateway_tag("gw1");
        // The first two bytes of SHA-256("gw1") (docs/TRUNK.md section 6).
        let digest = dmsc_protocol::table::Generation::of(b"gw1").0;
        assert_eq!(tag, u16::from_be_bytes([digest[0], digest[1]]));
        let session = (3u64 << 48) | (u64::from(tag) << 32) | 17;
        assert_eq!(super::super::session_gateway_tag(session), tag);
        assert_ne!(
            super::super::gateway_tag("gw1"),
            super::super::gateway_tag("gw2")
        );
    }
}
