//! Routing a request once its header has arrived: the checks a caller's request passes (on an
//! agent's connection, or from another gateway over a trunk), then the choice of a target (a
//! local agent, directly or through a hand-off) or of a peer gateway, and the header written
//! to it. The relaying that follows is [`super::exchange`]'s.

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use smallvec::SmallVec;

use dmsc_protocol::control::SessionId;
use dmsc_protocol::header::RequestHeader;
use dmsc_protocol::peer::PeerHeader;
use dmsc_protocol::spiffe::{Principal, SpiffeId};
use dmsc_protocol::table::GroupSet;
use dmsc_protocol::{DecodeError, Status};
use hashbrown::HashMap;

use super::exchange::{Half, Leg, LegState, Phase};
use super::trunk::RemoteSelection;
use super::{after, ConnIdx, Core, HEADER_ARENA, MAX_DELEGATED_IDENTITIES};
use crate::msg::{ExKey, HandoffEvent, HandoffId, ToHome, WorkerMsg};
use crate::routing::{MetricSlot, Router, Selection};
use crate::stats::WorkerStats;

impl Core {
    /// The header `decoded` from a request stream, or the request answered: `BAD_REQUEST` for
    /// a malformed header (`what` names it) or a stream that ended inside it, `UNAVAILABLE`
    /// while the gateway drains. On success the exchange is routed from now on.
    fn accept_header<H>(
        &mut self,
        key: ExKey,
        decoded: Result<Option<(H, usize)>, DecodeError>,
        what: &str,
    ) -> Option<H> {
        let header = match decoded {
            Ok(Some((h, _))) => h,
            Ok(None) => {
                self.answer(key, Status::BadRequest, "stream ended inside the header");
                return None;
            }
            Err(e) => {
                let msg = format!("malformed {what}: {e}");
                self.answer(key, Status::BadRequest, &msg);
                return None;
            }
        };
        self.ex(key)?.phase = Phase::Routed;
        if self.drain_deadline.is_some() {
            self.answer(key, Status::Unavailable, "gateway is draining");
            return None;
        }
        Some(header)
    }

    pub(super) fn header_arrived(&mut self, key: ExKey, now: Instant) {
        let limit = self.shared.config.limits.max_header_bytes;
        let Some(x) = self.ex(key) else {
            return;
        };
        let raw = match x.header_raw.take() {
            Some(raw) => raw,
            None if x.down.recv == Half::Closed => {
                return self.answer(key, Status::BadRequest, "stream ended inside the header")
            }
            None => return,
        };
        let Leg::Local { conn: ci, .. } = x.down.leg else {
            return;
        };
        let Some(conn) = self.conns.get(ci) else {
            return;
        };
        if conn.role == super::conn::Role::TrunkIn {
            return self.trunk_header_arrived(key, &raw, now);
        }
        let decoded = RequestHeader::decode(&raw, limit);
        let Some(header) = self.accept_header(key, decoded, "request header") else {
            return;
        };
        let limits = &self.shared.config.limits;
        if u64::from(header.hop_count) >= u64::from(limits.max_hops) {
            return self.answer(key, Status::LoopDetected, "hop limit reached");
        }
        let Some(conn) = self.conns.get(ci) else {
            return;
        };
        let Some(caller) = conn.identity.clone() else {
            return self.answer(key, Status::Denied, "no caller identity");
        };
        let groups = conn.groups;
        let bridge = conn.bridge;
        if conn.rate_limited {
            let within = match self.per_identity.get_mut(&*caller) {
                Some(super::Principal {
                    bucket: Some(bucket),
                    ..
                }) => bucket.take(now),
                _ => true,
            };
            if !within {
                // Counted under the capability, if it is offered.
                if let Some(slot) = self.router.metric_slot(header.capability) {
                    self.count_under(key, slot, now);
                }
                return self.answer(key, Status::RateLimited, "over the caller's rate limit");
            }
        }
        // A bridge's request on behalf of another identity: policy and the target see that
        // identity; the bridge is stamped as `via`. (Rate limits stay the bridge's own.)
        let (groups, stamped, via) = if header.on_behalf_of.is_empty() {
            (groups, &*caller, "")
        } else if !bridge {
            let why = "only a bridge may invoke on behalf of another identity";
            return self.answer(key, Status::Denied, why);
        } else {
            let domain = &self.shared.config.domain;
            match delegated_groups(
                &mut self.delegated,
                &self.router,
                domain,
                header.on_behalf_of,
            ) {
                Some(delegated) => (delegated, header.on_behalf_of, &*caller),
                None => {
                    let why = "on_behalf_of is not an agent identity of this domain";
                    return self.answer(key, Status::BadRequest, why);
                }
            }
        };
        let forwarded = RequestHeader {
            caller: stamped,
            // Passed to `route` on its own: a session here is consumed, one of another gateway
            // is forwarded there.
            target_session: 0,
            on_behalf_of: "",
            via,
            ..header
        };
        self.route(key, forwarded, header.target_session, groups, &[], now);
    }

    /// The header of a request another gateway forwarded over a trunk: the caller it stamped
    /// is trusted (the trunk peer is an authenticated gateway of the table), loops and the hop
    /// limit end here, and the request is routed like a local one.
    fn trunk_header_arrived(&mut self, key: ExKey, raw: &[u8], now: Instant) {
        let limit = self.shared.config.limits.max_header_bytes;
        WorkerStats::add(&self.stats.trunk_requests_in, 1);
        let decoded = PeerHeader::decode(raw, limit);
        let Some(peer) = self.accept_header(key, decoded, "trunk header") else {
            return;
        };
        let limits = &self.shared.config.limits;
        let header = peer.request;
        if peer.has_visited(&self.shared.config.gateway_id) {
            return self.answer(
                key,
                Status::LoopDetected,
                "request already visited this gateway",
            );
        }
        if u64::from(header.hop_count) >= u64::from(limits.max_hops) {
            return self.answer(key, Status::LoopDetected, "hop limit reached");
        }
        if !header.on_behalf_of.is_empty() {
            let why = "a trunk request carries no on_behalf_of";
            return self.answer(key, Status::BadRequest, why);
        }
        // The sender lists itself last: a peer cannot pass a request off as another's.
        let last = peer.visited().last().copied().unwrap_or_default();
        let sender = match self.exchanges.get(key).map(|x| x.down.leg) {
            Some(Leg::Local { conn, .. }) => {
                self.conns.get(conn).and_then(|c| c.identity.as_deref())
            }
            _ => None,
        };
        if sender.is_none_or(|id| id.rsplit('/').next() != Some(last)) {
            let why = "the last visited gateway is not the trunk's peer";
            return self.answer(key, Status::BadRequest, why);
        }
        let domain = &self.shared.config.domain;
        if !header.via.is_empty() && !is_domain_agent(domain, header.via) {
            let why = "via is not an agent identity of this domain";
            return self.answer(key, Status::BadRequest, why);
        }
        let Some(groups) =
            delegated_groups(&mut self.delegated, &self.router, domain, header.caller)
        else {
            let why = "the stamped caller is not an agent identity of this domain";
            return self.answer(key, Status::BadRequest, why);
        };
        let target_session = header.target_session;
        self.route(key, header, target_session, groups, peer.visited(), now);
    }

    /// Routes a request whose caller is settled (`header.caller` stamped, its policy groups
    /// `groups`): to a local agent, else over a trunk to a gateway not in `visited`.
    fn route(
        &mut self,
        key: ExKey,
        header: RequestHeader<'_>,
        target_session: u64,
        groups: GroupSet,
        visited: &[&str],
        now: Instant,
    ) {
        let limits = &self.shared.config.limits;
        let deadline_ms = match header.deadline_ms {
            0 => limits.default_deadline_ms,
            d => d.min(limits.max_deadline_ms),
        };
        let selection = match target_session {
            0 => self.router.select(&groups, header.capability),
            session => self
                .router
                .select_session(&groups, header.capability, SessionId(session)),
        };
        let (target, local, metric) = match selection {
            Selection::Local(t, m) => (t, true, m),
            Selection::Handoff(t, m) => (t, false, m),
            Selection::NoRoute if target_session != 0 => {
                let tag = super::session_gateway_tag(target_session);
                if tag != self.shared.gateway_tag {
                    // A session of another gateway of the domain: forward it there.
                    let to = Remote {
                        tag: Some(tag),
                        target_session,
                        overloaded: None,
                    };
                    return self.forward_remote(key, header, deadline_ms, groups, visited, to, now);
                }
                let why = "the target session is not attached or does not offer this capability";
                return self.answer(key, Status::NoRoute, why);
            }
            Selection::NoRoute => {
                let to = Remote::default();
                return self.forward_remote(key, header, deadline_ms, groups, visited, to, now);
            }
            Selection::Denied(slot) => {
                self.count_under(key, slot, now);
                return self.answer(key, Status::Denied, "policy denies this call");
            }
            Selection::Overloaded if target_session == 0 => {
                // Every local candidate is at its limit: another gateway may have room.
                let to = Remote {
                    overloaded: Some("every candidate is at its limit"),
                    ..Remote::default()
                };
                return self.forward_remote(key, header, deadline_ms, groups, visited, to, now);
            }
            Selection::Overloaded => {
                return self.answer(key, Status::Overloaded, "every candidate is at its limit")
            }
        };
        let forwarded = RequestHeader {
            deadline_ms,
            hop_count: header.hop_count + 1,
            // Consumed here: the target is the session itself.
            target_session: 0,
            ..header
        };
        let encoded = encode_header(&mut self.scratch, &mut self.arena, &forwarded);
        let Some(x) = self.ex(key) else {
            self.router.finish(target);
            return;
        };
        x.target = Some(target);
        x.metric = Some(metric);
        x.started = Some(now);
        self.set_deadline(key, after(now, deadline_ms));
        self.residence_batch.push(metric);
        let Some(entry) = self.router.agent(target) else {
            return;
        };
        let session = entry.session;
        if local {
            let Some(tci) = entry.local else {
                return self.answer(key, Status::TargetFailed, "target unreachable");
            };
            match self.open_up(key, tci, encoded) {
                true => WorkerStats::add(&self.stats.forwarded_local, 1),
                false => self.answer(key, Status::Overloaded, "target has no stream capacity"),
            }
        } else {
            let home = entry.home;
            if !self.outboxes.has_room(home) {
                return self.answer(key, Status::Overloaded, "the target's worker is busy");
            }
            let id = HandoffId {
                origin: self.index,
                key,
            };
            if let Some(x) = self.ex(key) {
                x.up = Some(LegState::new(Leg::Remote { worker: home, id }));
            }
            WorkerStats::add(&self.stats.handoffs, 1);
            self.post(
                home,
                WorkerMsg::Handoff {
                    id,
                    event: HandoffEvent::ToHome(ToHome::Open {
                        session,
                        header: encoded,
                    }),
                },
            );
        }
    }

    /// No local agent can take the request: forward it over a trunk to another gateway that
    /// offers the capability (for `to.target_session`, the gateway holding that session), or
    /// answer.
    #[allow(clippy::too_many_arguments)]
    fn forward_remote(
        &mut self,
        key: ExKey,
        header: RequestHeader<'_>,
        deadline_ms: u64,
        groups: GroupSet,
        visited: &[&str],
        to: Remote,
        now: Instant,
    ) {
        let selection = self.select_remote(&groups, header.capability, visited, to.tag);
        let (slot, tci, metric) = match selection {
            RemoteSelection::Peer(slot, ci, metric) => (slot, ci, metric),
            _ if to.overloaded.is_some() => {
                return self.answer(key, Status::Overloaded, to.overloaded.unwrap_or_default())
            }
            RemoteSelection::NoRoute if to.target_session != 0 => {
                let why = "the target session is not attached or does not offer this capability";
                return self.answer(key, Status::NoRoute, why);
            }
            RemoteSelection::NoRoute => {
                return self.answer(key, Status::NoRoute, "no agent offers this capability")
            }
            RemoteSelection::Denied(metric) => {
                self.count_under(key, metric, now);
                return self.answer(key, Status::Denied, "policy denies this call");
            }
            RemoteSelection::Loop => {
                let why = "every gateway offering this capability was already visited";
                return self.answer(key, Status::LoopDetected, why);
            }
            RemoteSelection::Unavailable => {
                let why = "no trunk to a gateway offering this capability is connected";
                return self.answer(key, Status::Unavailable, why);
            }
        };
        // Local agents exist but are all at their limit: whatever stops the forward, the
        // answer is that (docs/TRUNK.md section 6).
        let refuse = |status: Status| match to.overloaded {
            Some(_) => Status::Overloaded,
            None => status,
        };
        if visited.len() >= dmsc_protocol::peer::MAX_VISITED {
            return self.answer(
                key,
                refuse(Status::LoopDetected),
                "too many gateways visited",
            );
        }
        // The peer starts its own clock when the header arrives: half the trunk's round trip
        // is already spent by then.
        let transit_ms = self.conns.get(tci).map_or(1, |c| {
            (c.quic.rtt().as_micros() as u64).div_ceil(2000).max(1)
        });
        if deadline_ms <= transit_ms {
            let status = refuse(Status::DeadlineExceeded);
            return self.answer(key, status, "no time left to forward");
        }
        let forwarded = RequestHeader {
            deadline_ms: deadline_ms - transit_ms,
            hop_count: header.hop_count + 1,
            target_session: to.target_session,
            ..header
        };
        // The visited list gains this gateway (room checked above).
        let encoded = {
            let mut path: SmallVec<[&str; 4]> = SmallVec::from_slice(visited);
            path.push(&self.shared.config.gateway_id);
            PeerHeader::new(forwarded, &path).and_then(|peer_header| {
                encode_peer_header(
                    &mut self.scratch,
                    &mut self.peer_scratch,
                    &mut self.arena,
                    &peer_header,
                )
            })
        };
        let Some(encoded) = encoded else {
            let status = refuse(Status::BadRequest);
            return self.answer(key, status, "request cannot be forwarded");
        };
        if !self.open_up(key, tci, encoded) {
            return self.answer(key, Status::Overloaded, "the trunk has no stream capacity");
        }
        if let Some(x) = self.ex(key) {
            x.trunk = Some(slot);
            x.metric = Some(metric);
            x.started = Some(now);
        }
        self.residence_batch.push(metric);
        self.set_deadline(key, after(now, deadline_ms));
        let peer = &mut self.trunks.peers[slot];
        peer.outstanding += 1;
        peer.requests += 1;
        WorkerStats::add(&self.stats.forwarded_trunk, 1);
    }

    /// Counts exchange `key`'s outcome under metrics slot `slot` (a capability) when it ends.
    fn count_under(&mut self, key: ExKey, slot: MetricSlot, now: Instant) {
        if let Some(x) = self.ex(key) {
            x.metric = Some(slot);
            x.started = Some(now);
        }
    }
}

/// Encodes `header` and splits it off the shared arena, so forwarding a request does not
/// allocate per request (one allocation per [`HEADER_ARENA`] bytes of headers).
fn encode_header(scratch: &mut Vec<u8>, arena: &mut BytesMut, header: &RequestHeader<'_>) -> Bytes {
    scratch.clear();
    if header.encode(scratch).is_err() {
        // Every field was decoded under the same limits, and caller ids are bounded by the
        // certificate verifier; fall back to an empty caller rather than fail.
        scratch.clear();
        let _ = RequestHeader {
            caller: "",
            ..*header
        }
        .encode(scratch);
    }
    if arena.capacity() < scratch.len() {
        *arena = BytesMut::with_capacity(HEADER_ARENA.max(scratch.len()));
    }
    arena.extend_from_slice(scratch);
    arena.split().freeze()
}

/// Where [`Core::forward_remote`] may send a request.
#[derive(Debug, Default, Clone, Copy)]
struct Remote {
    /// Only gateways with this session tag (a request for another gateway's session).
    tag: Option<u16>,
    /// The session the request names, forwarded as is (0: none).
    target_session: u64,
    /// Local agents offer the capability but are all at their limit: the answer when no other
    /// gateway can take it.
    overloaded: Option<&'static str>,
}

/// Encodes a trunk header like [`encode_header`] (`fields` is working space); `None` if a
/// field is over its limit.
fn encode_peer_header(
    scratch: &mut Vec<u8>,
    fields: &mut Vec<u8>,
    arena: &mut BytesMut,
    header: &PeerHeader<'_>,
) -> Option<Bytes> {
    scratch.clear();
    header.encode(fields, scratch).ok()?;
    if arena.capacity() < scratch.len() {
        *arena = BytesMut::with_capacity(HEADER_ARENA.max(scratch.len()));
    }
    arena.extend_from_slice(scratch);
    Some(arena.split().freeze())
}

/// Whether `identity` is an agent SPIFFE ID of trust domain `domain`.
fn is_domain_agent(domain: &str, identity: &str) -> bool {
    SpiffeId::parse(identity).is_ok_and(|id| {
        id.trust_domain() == domain && matches!(id.principal(), Principal::Agent(_))
    })
}

/// The policy groups of `identity`, for a request a bridge sent on its behalf: from the
/// worker's cache, else computed (and cached, the cache emptied when full). `None` if it is
/// not an agent SPIFFE ID of `domain`.
pub(super) fn delegated_groups(
    cache: &mut HashMap<Box<str>, GroupSet>,
    router: &Router<ConnIdx>,
    domain: &str,
    identity: &str,
) -> Option<GroupSet> {
    if let Some(groups) = cache.get(identity) {
        return Some(*groups);
    }
    if !is_domain_agent(domain, identity) {
        return None;
    }
    let groups = router.table().groups_of(identity);
    if cache.len() >= MAX_DELEGATED_IDENTITIES {
        cache.clear();
    }
    cache.insert(identity.into(), groups);
    Some(groups)
}
