//! The agent session on a connection's control stream: `ATTACH`, `LANE`, card updates,
//! discovery, `DETACH`.
//!
//! Control work is bounded so that one agent cannot grow the gateway's memory or hold its
//! worker: the gateway handles a connection's control frames one at a time and reads the next
//! only once the answer to the previous one has been handed to QUIC (an agent that does not
//! read its answers stops being read, QUIC flow control pushes back on it, and the gateway
//! holds at most one answer for it); it handles at most [`FRAMES_PER_READ`] frames per read;
//! and a worker does at most [`CONTROL_BUDGET`] units of control work per iteration, deferring
//! the rest to the next.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn_proto::{ReadError, WriteError};
use tracing::{debug, warn};

use dmsc_protocol::card::AgentCard;
use dmsc_protocol::control::{ControlFrame, DiscoveryEntry, LaneToken, Refusal, SessionId};
use dmsc_protocol::limits::{
    MAX_CONTROL_FRAME_BYTES, MAX_DISCOVERY_ENTRIES, MAX_DISCOVERY_STRING_BYTES, MAX_LIST_ITEMS,
    MAX_MESSAGE_BYTES,
};
use dmsc_protocol::table::{GroupSet, Relation};
use dmsc_protocol::ConnectionCode;

use super::conn::Role;
use super::{mark_dirty, ConnIdx, Core};
use crate::msg::{AgentInfo, AttachEvent, WorkerMsg};
use crate::routing::permits;
use crate::stats::WorkerStats;

/// Control frames decoded per read of one control stream.
pub(super) const FRAMES_PER_READ: usize = 16;
/// Control frames a worker handles per iteration; `DISCOVER` counts as [`DISCOVER_COST`].
pub(super) const CONTROL_BUDGET: usize = 256;
/// What one `DISCOVER` costs of [`CONTROL_BUDGET`] (it scans the worker's agents).
const DISCOVER_COST: usize = 32;
/// Bytes of control stream read per chunk.
const CONTROL_READ_BYTES: usize = 16 * 1024;

/// What follows an `ATTACH_REFUSED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AfterRefusal {
    /// The connection stays (the refusal concerns one frame).
    KeepOpen,
    /// The connection closes once the refusal is delivered.
    Close,
}

impl Core {
    /// Reads and handles what arrived on connection `ci`'s control stream, a frame at a time,
    /// within the bounds described in the module docs: it stops as soon as an answer cannot
    /// be handed to QUIC at once (and resumes from `flush_control` when it has been).
    pub(super) fn read_control(&mut self, ci: ConnIdx, now: Instant) {
        let mut handled = 0;
        let mut finished = false;
        loop {
            let Some(conn) = self.conns.get_mut(ci) else {
                return;
            };
            let Some(id) = conn.control else {
                return;
            };
            if !conn.ctl_out.is_empty() {
                // An answer is still waiting: read more once it is out (`flush_control`).
                conn.control_stalled = true;
                break;
            }
            if conn.close_after.is_some() || conn.quic.is_closed() {
                // Refused, or closing: nothing more the agent says is acted on.
                return;
            }
            if self.control_work >= CONTROL_BUDGET || handled >= FRAMES_PER_READ {
                self.defer_control(ci);
                break;
            }
            match conn.ctl_in.next_frame() {
                Ok(Some(frame)) => {
                    handled += 1;
                    self.control_work += match frame {
                        ControlFrame::Discover { .. } => DISCOVER_COST,
                        _ => 1,
                    };
                    self.on_control(ci, frame, now);
                    self.write_control_out(ci);
                    continue;
                }
                Ok(None) if finished => {
                    // The agent closed its control stream: it is leaving.
                    return self.close_conn(
                        ci,
                        now,
                        ConnectionCode::NoError,
                        "control stream closed",
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(parent: &conn.span, error = %e, "malformed control frame");
                    let frame_too_long =
                        matches!(e, dmsc_protocol::DecodeError::TooLong { what: "frame", .. });
                    let code = if frame_too_long {
                        ConnectionCode::FrameTooLarge
                    } else {
                        ConnectionCode::ProtocolViolation
                    };
                    return self.close_conn(ci, now, code, "malformed control frame");
                }
            }
            // No whole frame buffered: read one more piece of the stream.
            let mut got = false;
            let mut transmit = false;
            {
                let mut recv = conn.quic.recv_stream(id);
                let read = recv.read(true);
                if let Ok(mut chunks) = read {
                    match chunks.next(CONTROL_READ_BYTES) {
                        Ok(Some(chunk)) => {
                            conn.ctl_in.extend(&chunk.bytes);
                            got = true;
                        }
                        Ok(None) | Err(ReadError::Reset(_)) => {
                            finished = true;
                            got = true;
                        }
                        Err(ReadError::Blocked) => {}
                    }
                    transmit = chunks.finalize().should_transmit();
                }
            }
            if transmit {
                mark_dirty(&mut self.dirty, conn, ci);
            }
            if !got {
                break;
            }
        }
        self.write_control_out(ci);
    }

    /// Reads connection `ci`'s control stream again in a later iteration.
    fn defer_control(&mut self, ci: ConnIdx) {
        if let Some(conn) = self.conns.get_mut(ci) {
            if !conn.control_deferred {
                conn.control_deferred = true;
                self.control_deferred.push_back(ci);
            }
        }
    }

    /// Resumes control streams deferred by the per-iteration budget; true if any was read.
    pub(super) fn resume_control(&mut self, now: Instant) -> bool {
        let mut any = false;
        while self.control_work < CONTROL_BUDGET {
            let Some(ci) = self.control_deferred.pop_front() else {
                break;
            };
            if let Some(conn) = self.conns.get_mut(ci) {
                conn.control_deferred = false;
                self.read_control(ci, now);
                any = true;
            }
        }
        any
    }

    pub(super) fn write_control(&mut self, ci: ConnIdx, frame: &ControlFrame) {
        if let Some(conn) = self.conns.get_mut(ci) {
            if let Err(e) = frame.encode(&mut conn.ctl_out) {
                warn!(error = %e, "control frame not encodable");
            }
            mark_dirty(&mut self.dirty, conn, ci);
        }
    }

    /// Hands what waits on connection `ci`'s control stream to QUIC; reads the stream again
    /// if it had stopped for the backlog and the backlog is gone.
    pub(super) fn flush_control(&mut self, ci: ConnIdx, now: Instant) {
        if self.write_control_out(ci) {
            let stalled = self
                .conns
                .get_mut(ci)
                .is_some_and(|c| std::mem::take(&mut c.control_stalled));
            if stalled {
                self.read_control(ci, now);
            }
        }
    }

    /// Writes what waits on connection `ci`'s control stream into QUIC; true when nothing
    /// waits any more. After a refusal, finishes the stream once everything is written.
    fn write_control_out(&mut self, ci: ConnIdx) -> bool {
        let Some(conn) = self.conns.get_mut(ci) else {
            return false;
        };
        let Some(id) = conn.control else {
            return false;
        };
        if conn.ctl_out.is_empty() && conn.close_after.is_none() {
            return true;
        }
        match conn.quic.send_stream(id).write(&conn.ctl_out) {
            Ok(n) => {
                conn.ctl_out.drain(..n);
                if n > 0 {
                    mark_dirty(&mut self.dirty, conn, ci);
                }
            }
            Err(WriteError::Blocked) => {}
            Err(_) => conn.ctl_out.clear(),
        }
        if !conn.ctl_out.is_empty() {
            return false;
        }
        // Give back the memory of a large answer.
        if conn.ctl_out.capacity() > 4096 {
            conn.ctl_out = Vec::new();
        }
        if conn.close_after.is_some() {
            // Nothing more will be said; the close follows when the peer has it all.
            if conn.quic.send_stream(id).finish().is_ok() {
                mark_dirty(&mut self.dirty, conn, ci);
            }
            return false;
        }
        true
    }

    pub(super) fn refuse(
        &mut self,
        ci: ConnIdx,
        refusal: Refusal,
        reason: String,
        now: Instant,
        after: AfterRefusal,
    ) {
        if let Some(conn) = self.conns.get(ci) {
            debug!(parent: &conn.span, ?refusal, %reason, "attach refused");
        }
        self.write_control(ci, &ControlFrame::AttachRefused { refusal, reason });
        if after == AfterRefusal::Close {
            if let Some(conn) = self.conns.get_mut(ci) {
                // Close once the refusal has been delivered (or after a short bound), so the
                // agent learns why.
                conn.close_after = Some((ConnectionCode::AttachRefused, "attach refused"));
                conn.attach_deadline = Some(now + Duration::from_secs(2));
            }
        }
        self.flush_control(ci, now);
    }

    fn on_control(&mut self, ci: ConnIdx, frame: ControlFrame, now: Instant) {
        let Some(conn) = self.conns.get_mut(ci) else {
            return;
        };
        if conn.quic.is_closed() || conn.close_after.is_some() {
            // Closing, or refused with a close to follow: the agent's later frames are moot.
            return;
        }
        let role = conn.role;
        let detaching = conn.detaching;
        let Some(identity) = conn.identity.clone() else {
            return self.close_conn(ci, now, ConnectionCode::Unauthenticated, "no identity");
        };
        match (role, frame) {
            (Role::Pending, ControlFrame::Attach { .. } | ControlFrame::Lane { .. })
                if self.drain_deadline.is_some() =>
            {
                self.refuse(
                    ci,
                    Refusal::Draining,
                    "gateway is draining".into(),
                    now,
                    AfterRefusal::Close,
                )
            }
            (
                Role::Pending,
                ControlFrame::Attach {
                    max_concurrent,
                    card,
                },
            ) => self.attach(ci, identity, max_concurrent, &card, now),
            (
                Role::Pending,
                ControlFrame::Lane {
                    session,
                    lane_token,
                },
            ) => self.bind_lane(ci, identity, session, lane_token, now),
            (Role::Primary(_), ControlFrame::UpdateCard { .. }) if detaching => {
                self.write_control(
                    ci,
                    &ControlFrame::UpdateResult {
                        refusal: Some(Refusal::NotPermitted),
                        reason: "the agent is detaching".into(),
                    },
                );
            }
            (Role::Primary(session), ControlFrame::UpdateCard { card }) => {
                let groups = self.conns.get(ci).map_or(GroupSet::EMPTY, |c| c.groups);
                let raw = card;
                let (refusal, reason) = match self.parse_card(&raw) {
                    Ok(card) => {
                        let (capabilities, refused) = self.admit(&groups, &card);
                        match self.agents.get(&session) {
                            _ if capabilities.is_empty() => {
                                (Some(Refusal::NotPermitted), not_permitted(&refused))
                            }
                            Some(old) => {
                                let (card_digest, card_bytes) = AgentInfo::digest(&raw);
                                let info = Arc::new(AgentInfo {
                                    session,
                                    home: self.index,
                                    identity: old.identity.clone(),
                                    lane_token: old.lane_token,
                                    limit: old.limit,
                                    capabilities,
                                    card,
                                    card_digest,
                                    card_bytes,
                                });
                                self.broadcast(|| WorkerMsg::AgentUp(info.clone()));
                                self.shared.report_attach(AttachEvent::Up(info.clone()));
                                self.agent_up(info);
                                (None, partly_refused(&refused))
                            }
                            None => (None, String::new()),
                        }
                    }
                    Err(reason) => (Some(Refusal::BadCard), reason),
                };
                self.write_control(ci, &ControlFrame::UpdateResult { refusal, reason });
            }
            (
                Role::Primary(_) | Role::Lane(_),
                ControlFrame::Discover {
                    query_id,
                    prefix,
                    tag,
                    on_behalf_of,
                },
            ) => {
                let (own, bridge) = self
                    .conns
                    .get(ci)
                    .map_or((GroupSet::EMPTY, false), |c| (c.groups, c.bridge));
                // A bridge may ask for another identity; anyone else asking so sees nothing,
                // and so does an identity that is not an agent of the domain.
                let groups = match (on_behalf_of.is_empty(), bridge) {
                    (true, _) => own,
                    (false, true) => super::route::delegated_groups(
                        &mut self.delegated,
                        &self.router,
                        &self.shared.config.domain,
                        &on_behalf_of,
                    )
                    .unwrap_or(GroupSet::EMPTY),
                    (false, false) => GroupSet::EMPTY,
                };
                let frame = self.discover(&groups, query_id, &prefix, &tag);
                self.write_control(ci, &frame);
            }
            (Role::Primary(session), ControlFrame::Detach) => {
                if detaching {
                    return;
                }
                if let Some(conn) = self.conns.get_mut(ci) {
                    conn.detaching = true;
                    debug!(parent: &conn.span, ?session, "detaching");
                }
                let workers = self.shared.workers();
                self.detach_waiting.insert(session, workers);
                self.broadcast(|| WorkerMsg::AgentDetaching { session });
                self.shared.report_attach(AttachEvent::Down(session));
                self.agent_detaching(session);
            }
            (_, ControlFrame::Unknown { .. }) => {}
            (_, ControlFrame::Attach { .. } | ControlFrame::Lane { .. }) => self.refuse(
                ci,
                Refusal::AlreadyAttached,
                "already attached".into(),
                now,
                AfterRefusal::KeepOpen,
            ),
            (_, _) => self.close_conn(
                ci,
                now,
                ConnectionCode::ProtocolViolation,
                "unexpected control frame",
            ),
        }
    }

    fn parse_card(&self, json: &[u8]) -> Result<AgentCard, String> {
        let max = self.shared.config.limits.max_card_bytes;
        if json.len() > max {
            return Err(format!(
                "card is {} bytes, over the gateway's limit of {max} (limits.max_card_bytes)",
                json.len(),
            ));
        }
        AgentCard::from_json(json).map_err(|e| e.to_string())
    }

    fn attach(
        &mut self,
        ci: ConnIdx,
        identity: Arc<str>,
        max_concurrent: u64,
        card: &[u8],
        now: Instant,
    ) {
        let card_json = card;
        let card = match self.parse_card(card) {
            Ok(card) => card,
            Err(reason) => {
                return self.refuse(ci, Refusal::BadCard, reason, now, AfterRefusal::Close)
            }
        };
        let groups = self.conns.get(ci).map_or(GroupSet::EMPTY, |c| c.groups);
        let (capabilities, refused) = self.admit(&groups, &card);
        if capabilities.is_empty() {
            let reason = not_permitted(&refused);
            return self.refuse(ci, Refusal::NotPermitted, reason, now, AfterRefusal::Close);
        }
        let limits = &self.shared.config.limits;
        let attached = self.shared.agents.fetch_add(1, Ordering::Relaxed);
        if attached >= limits.max_agents {
            self.shared.agents.fetch_sub(1, Ordering::Relaxed);
            let reason = format!("gateway holds its maximum of {} agents", limits.max_agents);
            return self.refuse(ci, Refusal::GatewayFull, reason, now, AfterRefusal::Close);
        }
        let limit = match max_concurrent {
            0 => limits.max_inflight_per_agent,
            n => n.min(u64::from(limits.max_inflight_per_agent)) as u32,
        };
        // Worker, gateway tag, sequence: unique on this gateway, and which gateway of the
        // domain holds it can be told from the id (cross-gateway follow-ups, docs/TRUNK.md 6).
        self.session_seq = (self.session_seq + 1) & 0xffff_ffff;
        let session = SessionId(
            (u64::from(self.index.0) << 48)
                | (u64::from(self.shared.gateway_tag) << 32)
                | self.session_seq,
        );
        let mut token = [0u8; 16];
        if !self.random.fill(&mut token) {
            self.shared.agents.fetch_sub(1, Ordering::Relaxed);
            return self.close_conn(ci, now, ConnectionCode::InternalError, "no randomness");
        }
        let (card_digest, card_bytes) = AgentInfo::digest(card_json);
        let info = Arc::new(AgentInfo {
            session,
            home: self.index,
            identity,
            lane_token: LaneToken(token),
            limit,
            capabilities,
            card,
            card_digest,
            card_bytes,
        });
        self.session_conns.entry(session).or_default().push(ci);
        if let Some(conn) = self.conns.get_mut(ci) {
            conn.role = Role::Primary(session);
            conn.attach_deadline = None;
            debug!(parent: &conn.span, ?session, identity = %info.identity,
                capabilities = info.capabilities.len(), "agent attached");
        }
        WorkerStats::add(&self.stats.agents, 1);
        self.broadcast(|| WorkerMsg::AgentUp(info.clone()));
        self.shared.report_attach(AttachEvent::Up(info.clone()));
        self.agent_up(info);
        self.router.set_local(session, Some(ci));
        let lanes = if self.shared.config.lanes {
            self.shared.lane_addrs.clone()
        } else {
            Vec::new()
        };
        self.write_control(
            ci,
            &ControlFrame::AttachOk {
                session,
                lane_token: LaneToken(token),
                worker: u64::from(self.index.0),
                lanes,
                max_concurrent: u64::from(limit),
                refused,
            },
        );
        self.update_conn_timer(ci);
    }

    fn bind_lane(
        &mut self,
        ci: ConnIdx,
        identity: Arc<str>,
        session: SessionId,
        token: LaneToken,
        now: Instant,
    ) {
        let home = self.agents.get(&session).map(|a| a.home);
        let ok = self
            .agents
            .get(&session)
            .is_some_and(|a| constant_time_eq(&a.lane_token.0, &token.0) && a.identity == identity);
        if !ok {
            let reason = "no such session for this identity".into();
            return self.refuse(
                ci,
                Refusal::UnknownSession,
                reason,
                now,
                AfterRefusal::Close,
            );
        }
        self.session_conns.entry(session).or_default().push(ci);
        if let Some(conn) = self.conns.get_mut(ci) {
            conn.role = Role::Lane(session);
            conn.attach_deadline = None;
            debug!(parent: &conn.span, ?session, "lane bound");
        }
        WorkerStats::add(&self.stats.lanes, 1);
        // On the agent's home worker the primary connection stays the route.
        if home != Some(self.index)
            && !self.detach_watch.contains(&session)
            && !self.detach_waiting.contains_key(&session)
        {
            self.router.set_local(session, Some(ci));
        }
        self.write_control(
            ci,
            &ControlFrame::LaneOk {
                worker: u64::from(self.index.0),
            },
        );
        self.update_conn_timer(ci);
    }

    /// The capabilities of `card` an agent in `groups` may advertise under the installed
    /// table (all of them without one), and the names of the others.
    pub(super) fn admit(
        &self,
        groups: &GroupSet,
        card: &AgentCard,
    ) -> (Arc<[Box<str>]>, Vec<String>) {
        let table = self.router.table();
        let mut refused = Vec::new();
        let capabilities = card
            .capabilities()
            .filter(|c| {
                let ok = permits(groups, table.column(Relation::Advertise, c).as_ref());
                if !ok {
                    refused.push((*c).to_owned());
                }
                ok
            })
            .map(Box::from)
            .collect();
        (capabilities, refused)
    }

    /// Answers a `DISCOVER` from the catalog: only capabilities matching the prefix are read,
    /// and only those the caller's groups may see under the installed table are shown.
    fn discover(&self, groups: &GroupSet, query_id: u64, prefix: &str, tag: &str) -> ControlFrame {
        let mut entries: Vec<DiscoveryEntry> = Vec::new();
        let mut truncated = false;
        let table = self.router.table();
        for (capability, providers) in self.catalog.matching(prefix) {
            if !permits(
                groups,
                table.column(Relation::Discover, capability).as_ref(),
            ) {
                continue;
            }
            // The providers whose skill carries the tag (all of them without one), and the
            // skill of one of them to describe the capability.
            let mut described = None;
            let mut count = 0;
            for session in providers {
                let Some(info) = self.agents.get(session) else {
                    continue;
                };
                let Some(skill) = info.card.skills.iter().find(|s| s.id == capability) else {
                    continue;
                };
                if !tag.is_empty() && !skill.tags.iter().any(|t| t == tag) {
                    continue;
                }
                count += 1;
                described.get_or_insert((info, skill));
            }
            let Some((info, skill)) = described else {
                continue;
            };
            if entries.len() >= MAX_DISCOVERY_ENTRIES {
                truncated = true;
                break;
            }
            let clip = |v: &[String]| -> Vec<String> {
                v.iter()
                    .take(MAX_LIST_ITEMS)
                    .map(|s| truncate(s, MAX_DISCOVERY_STRING_BYTES))
                    .collect()
            };
            entries.push(DiscoveryEntry {
                capability: skill.id.clone(),
                description: truncate(&skill.description, MAX_DISCOVERY_STRING_BYTES),
                providers: count,
                tags: clip(&skill.tags),
                input_modes: clip(skill.effective_input_modes(&info.card)),
                output_modes: clip(skill.effective_output_modes(&info.card)),
            });
        }
        self.merge_remote_discovery(&mut entries, &mut truncated, groups, prefix, tag);
        // Keep the frame under the control-frame limit.
        let mut size = 0;
        let mut keep = entries.len();
        for (i, e) in entries.iter().enumerate() {
            size += 16
                + e.capability.len()
                + e.description.len()
                + e.tags
                    .iter()
                    .chain(&e.input_modes)
                    .chain(&e.output_modes)
                    .map(|s| s.len() + 4)
                    .sum::<usize>();
            if size > MAX_CONTROL_FRAME_BYTES - 1024 {
                keep = i;
                truncated = true;
                break;
            }
        }
        entries.truncate(keep);
        ControlFrame::DiscoverResult {
            query_id,
            truncated,
            entries,
        }
    }
}

impl Core {
    /// Adds to `entries` (local, in name order) what agents behind other gateways offer:
    /// the domain routes answer for the whole domain, under the same discovery policy.
    fn merge_remote_discovery(
        &self,
        entries: &mut Vec<DiscoveryEntry>,
        truncated: &mut bool,
        groups: &GroupSet,
        prefix: &str,
        tag: &str,
    ) {
        let Some(routes) = self.trunks.routes.as_ref() else {
            return;
        };
        let table = self.router.table();
        let range = routes
            .capabilities
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(name, _)| name.starts_with(prefix));
        for (name, remote) in range {
            if !tag.is_empty() && !remote.skill.tags.iter().any(|t| t == tag) {
                continue;
            }
            if !permits(groups, table.column(Relation::Discover, name).as_ref()) {
                continue;
            }
            let providers = remote.agents;
            match entries.binary_search_by(|e| e.capability.as_str().cmp(name)) {
                Ok(i) => entries[i].providers = entries[i].providers.saturating_add(providers),
                Err(i) => {
                    if entries.len() >= MAX_DISCOVERY_ENTRIES {
                        *truncated = true;
                        if i >= entries.len() {
                            break;
                        }
                        entries.pop();
                    }
                    let skill = &remote.skill;
                    entries.insert(
                        i,
                        DiscoveryEntry {
                            capability: skill.id.clone(),
                            description: skill.description.clone(),
                            providers,
                            tags: skill.tags.clone(),
                            input_modes: skill.input_modes.clone(),
                            output_modes: skill.output_modes.clone(),
                        },
                    );
                }
            }
        }
    }
}

/// The reason of a card none of whose capabilities the agent may advertise.
fn not_permitted(refused: &[String]) -> String {
    listed(
        "the domain's policy lets this agent advertise none of: ",
        refused,
    )
}

/// The reason of an accepted card update some of whose capabilities were refused (empty when
/// none was).
fn partly_refused(refused: &[String]) -> String {
    if refused.is_empty() {
        return String::new();
    }
    listed("accepted without (the domain's policy): ", refused)
}

/// `intro` followed by `names`, cut to fit a reason's limit.
fn listed(intro: &str, names: &[String]) -> String {
    let mut reason = String::from(intro);
    for (i, name) in names.iter().enumerate() {
        if reason.len() + name.len() + 7 > MAX_MESSAGE_BYTES {
            reason.push_str(", ...");
            break;
        }
        if i > 0 {
            reason.push_str(", ");
        }
        reason.push_str(name);
    }
    reason
}

/// Compares two lane tokens without an early exit, so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8; 16], b: &[u8; 16]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}
