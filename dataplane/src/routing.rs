//! Capability-indexed target selection.
//!
//! A worker routes with two pieces of state:
//!
//! - the installed [`TableGeneration`]: immutable, shared as an `Arc`, swapped only between
//!   event-loop iterations. It carries the policy. Until the control plane pushes generations,
//!   the gateway installs [`TableGeneration::standalone`], which lets every authenticated agent
//!   invoke every capability.
//! - the live overlay ([`Router`]): the agents attached to this gateway, indexed by capability.
//!   Each worker holds its own copy, updated from attach and detach messages, so selection reads
//!   only worker-local memory and takes no lock.
//!
//! Selection is one hash lookup (capability name to candidate set), one policy check, then a
//! power-of-two-choices pick by outstanding requests among the candidates this worker reaches
//! directly (through a lane), falling back to candidates that need a hand-off to another
//! worker only when no direct one exists.

use std::sync::Arc;

use hashbrown::HashMap;
use smallvec::SmallVec;

use dmsc_protocol::spiffe::SpiffeId;
use dmsc_protocol::table::{allowed, Column, GroupSet, Limit, Relation, Table};

use crate::slab::{Key, Slab};

use dmsc_protocol::control::SessionId;

/// The gateway's own count of table installs: 0 is the table it started with, each install
/// adds one. The table's content name is [`TableGeneration::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Generation(pub u64);

/// Invocation policy of a table generation.
#[derive(Debug, Clone)]
pub enum Policy {
    /// Every authenticated agent of the domain may invoke every capability (standalone mode).
    AllowAll,
    /// The compiled policy of a control plane: callers' groups and per-capability columns
    /// decide (`docs/CONTROL.md`).
    Table(Arc<Table>),
}

/// An immutable routing and policy table, as installed on every worker.
#[derive(Debug, Clone)]
pub struct TableGeneration {
    /// Which generation this is.
    pub generation: Generation,
    /// Who may invoke what.
    pub policy: Policy,
}

impl TableGeneration {
    /// The table a gateway runs with before (or without) a control plane.
    pub fn standalone() -> Arc<Self> {
        Arc::new(Self {
            generation: Generation(0),
            policy: Policy::AllowAll,
        })
    }

    /// A generation enforcing `table`.
    pub fn compiled(generation: Generation, table: Arc<Table>) -> Arc<Self> {
        Arc::new(Self {
            generation,
            policy: Policy::Table(table),
        })
    }

    /// The content name of the compiled table (its SHA-256), if this generation has one.
    pub fn name(&self) -> Option<dmsc_protocol::table::Generation> {
        match &self.policy {
            Policy::AllowAll => None,
            Policy::Table(table) => Some(table.generation()),
        }
    }

    /// Whether gateway `id` is one of the table's gateways (never under
    /// [`Policy::AllowAll`]: a standalone gateway has no domain to trunk with).
    pub fn lists_gateway(&self, id: &str) -> bool {
        match &self.policy {
            Policy::AllowAll => false,
            Policy::Table(table) => table
                .parts()
                .gateways
                .binary_search_by(|g| g.as_str().cmp(id))
                .is_ok(),
        }
    }

    /// The groups of the caller with SPIFFE ID `id` (computed once per connection). Empty
    /// under [`Policy::AllowAll`], where groups do not matter, and for an unparsable ID.
    pub fn groups_of(&self, id: &str) -> GroupSet {
        match &self.policy {
            Policy::AllowAll => GroupSet::EMPTY,
            Policy::Table(table) => SpiffeId::parse(id)
                .map(|id| table.groups_of(&id))
                .unwrap_or(GroupSet::EMPTY),
        }
    }

    /// Whether a caller in `groups` is a bridge, which may invoke on behalf of another
    /// identity. Standalone (everything allowed): every caller.
    pub fn is_bridge(&self, groups: &GroupSet) -> bool {
        match &self.policy {
            Policy::AllowAll => true,
            Policy::Table(table) => table.bridges().intersects(groups),
        }
    }

    /// The rate limit of a caller in `groups` (`None`: unlimited).
    pub fn rate_limit_of(&self, groups: &GroupSet) -> Option<Limit> {
        match &self.policy {
            Policy::AllowAll => None,
            Policy::Table(table) => table.rate_limit_of(groups),
        }
    }

    /// The column deciding `relation` for `capability` (computed once per capability, when it
    /// first appears or a generation is installed); `None` when everything is allowed.
    pub fn column(&self, relation: Relation, capability: &str) -> Option<Column> {
        match &self.policy {
            Policy::AllowAll => None,
            Policy::Table(table) => Some(table.column(relation, capability)),
        }
    }
}

/// Whether a caller in `groups` passes `column` (`None`: no policy applies). Bit operations.
#[inline]
pub fn permits(groups: &GroupSet, column: Option<&Column>) -> bool {
    column.is_none_or(|c| allowed(groups, c))
}

/// Names a worker (a core) of the gateway: 0 to `workers - 1`, at most 256 workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u16);

impl WorkerId {
    /// The worker's position, for tables indexed by worker.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Every worker of a gateway with `workers` workers.
    pub fn all(workers: usize) -> impl Iterator<Item = WorkerId> {
        (0..workers).map(|w| WorkerId(w as u16))
    }
}

/// The key tag of agents in a [`Router`].
#[derive(Debug)]
pub enum AgentTag {}

/// Names an agent in a worker's [`Router`]: a slot and the generation of its occupant, so an
/// index kept after the agent left (and another took the slot) is recognised as stale.
pub type AgentIdx = Key<AgentTag>;

/// The metrics slot of a capability: its index in [`Router::metric_names`], or
/// [`MetricSlot::OTHER`] once the bounded set of named capabilities is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MetricSlot(pub u16);

impl MetricSlot {
    /// Capabilities beyond the cardinality bound share this slot (`capability="_other"`).
    pub const OTHER: MetricSlot = MetricSlot(u16::MAX);
}

/// The outcome of [`Router::select`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Forward to this agent over a connection this worker holds.
    Local(AgentIdx, MetricSlot),
    /// Forward to this agent through its home worker (a cross-core hand-off).
    Handoff(AgentIdx, MetricSlot),
    /// No attached agent offers the capability.
    NoRoute,
    /// Policy forbids the call (the capability's metrics slot, to count it there).
    Denied(MetricSlot),
    /// Every candidate is at its concurrency limit.
    Overloaded,
}

/// What a worker knows of one attached agent.
#[derive(Debug)]
pub struct AgentEntry<C> {
    /// The agent's session.
    pub session: SessionId,
    /// The worker that holds the agent's primary connection.
    pub home: WorkerId,
    /// The connection through which this worker reaches the agent directly, if any.
    pub local: Option<C>,
    /// Requests this worker has in flight to the agent.
    pub outstanding: u32,
    /// Most requests this worker may have in flight to the agent.
    pub limit: u32,
    /// Capabilities the agent offers (skill ids of its card).
    pub capabilities: Arc<[Box<str>]>,
}

/// Power of two choices in `pool`: two candidates at random, the one with fewer outstanding
/// requests wins; candidates at their limit are skipped (scanning the pool if both sampled are
/// full). `None` when every candidate is full.
#[inline]
fn pick<C>(pool: &[AgentIdx], agents: &Agents<C>, rng: u64) -> Option<AgentIdx> {
    let load = |i: AgentIdx| match agents.get(i).map(|s| &s.entry) {
        Some(e) if e.outstanding < e.limit => Some(e.outstanding),
        _ => None,
    };
    match pool.len() {
        0 => None,
        1 => load(pool[0]).map(|_| pool[0]),
        n => {
            let a = (rng % n as u64) as usize;
            let b = (a + 1 + ((rng >> 32) % (n as u64 - 1)) as usize) % n;
            let (ia, ib) = (pool[a], pool[b]);
            match (load(ia), load(ib)) {
                (Some(la), Some(lb)) => Some(if lb < la { ib } else { ia }),
                (Some(_), None) => Some(ia),
                (None, Some(_)) => Some(ib),
                (None, None) => pool.iter().copied().find(|&i| load(i).is_some()),
            }
        }
    }
}

/// The candidates for `capability` if `caller` may invoke it: `NoRoute` if nobody offers
/// it, `Denied` if policy forbids. Recomputes the capability's policy column once per install.
#[inline]
fn admit<'a>(
    by_capability: &'a mut HashMap<Box<str>, Candidates>,
    table: &TableGeneration,
    installs: u64,
    caller: &GroupSet,
    capability: &str,
) -> Result<&'a Candidates, Selection> {
    let Some(cands) = by_capability.get_mut(capability) else {
        return Err(Selection::NoRoute);
    };
    if cands.column_for != installs {
        cands.column = table.column(Relation::Invoke, capability);
        cands.column_for = installs;
    }
    if !permits(caller, cands.column.as_ref()) {
        return Err(Selection::Denied(cands.metric));
    }
    Ok(cands)
}

#[derive(Debug)]
struct Candidates {
    /// Agents offering the capability that this worker reaches directly.
    direct: SmallVec<[AgentIdx; 4]>,
    /// Agents offering it that this worker reaches through a hand-off.
    remote: SmallVec<[AgentIdx; 4]>,
    /// Where this capability's metrics go.
    metric: MetricSlot,
    /// Which groups may invoke it under the installed table (`None`: everyone).
    column: Option<Column>,
    /// The install (`Router::installs`) `column` was computed under; a column from an older
    /// table is recomputed at the capability's next request, once.
    column_for: u64,
}

impl Candidates {
    fn len(&self) -> usize {
        self.direct.len() + self.remote.len()
    }
}

/// An agent and where it sits in the candidate lists.
#[derive(Debug)]
struct Indexed<C> {
    entry: AgentEntry<C>,
    /// For each capability of `entry`, in order, the agent's position in that capability's
    /// candidate list, so removal needs no search.
    positions: SmallVec<[u32; 4]>,
}

type Agents<C> = Slab<Indexed<C>, AgentTag>;

/// The live overlay of attached agents on one worker, indexed by capability.
///
/// Mutated only between requests (attach, detach, lane up or down); read per request by
/// [`Router::select`]. `C` is the worker's connection handle type.
#[derive(Debug)]
pub struct Router<C> {
    table: Arc<TableGeneration>,
    /// Tables installed since the router was made; stamps each capability's column.
    installs: u64,
    by_capability: HashMap<Box<str>, Candidates>,
    agents: Agents<C>,
    by_session: HashMap<SessionId, AgentIdx>,
    metric_slots: HashMap<Box<str>, MetricSlot>,
    metric_names: Vec<Box<str>>,
    max_metric_names: usize,
    rng: u64,
}

impl<C: Copy> Router<C> {
    /// An empty overlay under `table`; `seed` seeds the choice of candidates. At most
    /// `max_metric_names` capabilities get metrics of their own; the rest share
    /// [`MetricSlot::OTHER`].
    pub fn new(table: Arc<TableGeneration>, seed: u64, max_metric_names: usize) -> Self {
        Self {
            table,
            installs: 0,
            by_capability: HashMap::new(),
            agents: Slab::default(),
            by_session: HashMap::new(),
            metric_slots: HashMap::new(),
            metric_names: Vec::new(),
            max_metric_names: max_metric_names.min(u16::MAX as usize - 1),
            rng: seed | 1,
        }
    }

    /// Names of the capabilities with metrics of their own, by slot.
    pub fn metric_names(&self) -> &[Box<str>] {
        &self.metric_names
    }

    /// The installed table.
    pub fn table(&self) -> &Arc<TableGeneration> {
        &self.table
    }

    /// Installs a new table generation. Call between event-loop iterations only. It costs the
    /// same whatever the number of capabilities: each capability's policy column is recomputed
    /// at its first request under the new table (once per capability per table, never per
    /// request), so an install never stalls the worker for a large overlay.
    pub fn install(&mut self, table: Arc<TableGeneration>) {
        self.table = table;
        self.installs += 1;
    }

    /// Picks a target for `capability` on behalf of `caller`, and counts the request as
    /// outstanding on it (release it with [`Router::finish`]).
    #[inline]
    pub fn select(&mut self, caller: &GroupSet, capability: &str) -> Selection {
        let cands = match admit(
            &mut self.by_capability,
            &self.table,
            self.installs,
            caller,
            capability,
        ) {
            Ok(cands) => cands,
            Err(refusal) => return refusal,
        };
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let rng = self.rng;
        let metric = cands.metric;
        // Direct targets first; a hand-off only when none of them has room.
        if let Some(idx) = pick(&cands.direct, &self.agents, rng) {
            self.take(idx);
            return Selection::Local(idx, metric);
        }
        if let Some(idx) = pick(&cands.remote, &self.agents, rng) {
            self.take(idx);
            return Selection::Handoff(idx, metric);
        }
        Selection::Overloaded
    }

    /// Like [`Router::select`], but only the agent of `session` may serve: `NoRoute` if it is
    /// not attached or does not offer `capability`, `Overloaded` if it is at its limit. The
    /// policy check is the same.
    pub fn select_session(
        &mut self,
        caller: &GroupSet,
        capability: &str,
        session: SessionId,
    ) -> Selection {
        let metric = match admit(
            &mut self.by_capability,
            &self.table,
            self.installs,
            caller,
            capability,
        ) {
            Ok(cands) => cands.metric,
            Err(refusal) => return refusal,
        };
        let Some(idx) = self.find(session) else {
            return Selection::NoRoute;
        };
        let Some(entry) = self.agent(idx) else {
            return Selection::NoRoute;
        };
        if !entry.capabilities.iter().any(|c| &**c == capability) {
            return Selection::NoRoute;
        }
        if entry.outstanding >= entry.limit {
            return Selection::Overloaded;
        }
        let local = entry.local.is_some();
        self.take(idx);
        if local {
            Selection::Local(idx, metric)
        } else {
            Selection::Handoff(idx, metric)
        }
    }

    fn take(&mut self, idx: AgentIdx) {
        if let Some(entry) = self.entry_mut(idx) {
            entry.outstanding += 1;
        }
    }

    fn entry_mut(&mut self, idx: AgentIdx) -> Option<&mut AgentEntry<C>> {
        Some(&mut self.agents.get_mut(idx)?.entry)
    }

    /// The metrics slot of `capability`, if an attached agent offers it.
    pub fn metric_slot(&self, capability: &str) -> Option<MetricSlot> {
        Some(self.by_capability.get(capability)?.metric)
    }

    /// Releases a request counted by [`Router::select`] or [`Router::begin`]; returns the
    /// agent's session, or `None` if `idx` is stale (the agent left), when nothing is released.
    #[inline]
    pub fn finish(&mut self, idx: AgentIdx) -> Option<SessionId> {
        let e = self.entry_mut(idx)?;
        e.outstanding = e.outstanding.saturating_sub(1);
        Some(e.session)
    }

    /// Counts a request as outstanding on `idx` without selection (hand-off arrivals: the
    /// handing worker applied the limit of its own count); false, counting nothing, when the
    /// agent is gone or takes no requests (detaching: limit 0).
    pub fn begin(&mut self, idx: AgentIdx) -> bool {
        match self.entry_mut(idx) {
            Some(e) if e.limit > 0 => {
                e.outstanding += 1;
                true
            }
            _ => false,
        }
    }

    /// The agent at `idx`, unless `idx` is stale.
    pub fn agent(&self, idx: AgentIdx) -> Option<&AgentEntry<C>> {
        Some(&self.agents.get(idx)?.entry)
    }

    /// The agent of `session`.
    pub fn find(&self, session: SessionId) -> Option<AgentIdx> {
        self.by_session.get(&session).copied()
    }

    /// Number of attached agents.
    pub fn len(&self) -> usize {
        self.by_session.len()
    }

    /// Whether no agent is attached.
    pub fn is_empty(&self) -> bool {
        self.by_session.is_empty()
    }

    /// Every attached agent.
    pub fn agents(&self) -> impl Iterator<Item = (AgentIdx, &AgentEntry<C>)> {
        self.agents.iter().map(|(idx, a)| (idx, &a.entry))
    }

    /// Adds (or replaces) an agent and indexes its capabilities.
    ///
    /// Costs in proportion to the agent's capabilities, never to the number of agents that
    /// share them.
    pub fn insert(&mut self, entry: AgentEntry<C>) -> AgentIdx {
        if let Some(old) = self.find(entry.session) {
            // A card update: keep the slot (and its outstanding count and lane), re-index.
            self.unindex(old);
            if let Some(slot) = self.entry_mut(old) {
                slot.capabilities = entry.capabilities;
                slot.limit = entry.limit;
            }
            self.index(old);
            return old;
        }
        let session = entry.session;
        let idx = self.agents.insert(Indexed {
            entry,
            positions: SmallVec::new(),
        });
        self.by_session.insert(session, idx);
        self.index(idx);
        idx
    }

    /// Removes the agent of `session`; returns its entry. Indices of it go stale.
    pub fn remove(&mut self, session: SessionId) -> Option<AgentEntry<C>> {
        let idx = self.by_session.remove(&session)?;
        self.unindex(idx);
        Some(self.agents.remove(idx)?.entry)
    }

    /// Records that this worker reaches `session` directly through `conn` (or no longer does).
    pub fn set_local(&mut self, session: SessionId, conn: Option<C>) {
        let Some(idx) = self.find(session) else {
            return;
        };
        self.unindex(idx);
        if let Some(e) = self.entry_mut(idx) {
            e.local = conn;
        }
        self.index(idx);
    }

    /// The metrics slot of capability `name`, given one if there is room (capabilities behind
    /// other gateways are counted where they are asked for too).
    pub fn intern_metric(&mut self, name: &str) -> MetricSlot {
        if let Some(&m) = self.metric_slots.get(name) {
            return m;
        }
        if self.metric_names.len() >= self.max_metric_names {
            return MetricSlot::OTHER;
        }
        let m = MetricSlot(self.metric_names.len() as u16);
        self.metric_names.push(name.into());
        self.metric_slots.insert(name.into(), m);
        m
    }

    fn index(&mut self, idx: AgentIdx) {
        let Some(slot) = self.agents.get_mut(idx) else {
            return;
        };
        let e = &slot.entry;
        let direct = e.local.is_some();
        slot.positions.clear();
        for cap in e.capabilities.iter() {
            let c = match self.by_capability.get_mut(&**cap) {
                Some(c) => c,
                None => {
                    let metric = match self.metric_slots.get(&**cap) {
                        Some(&m) => m,
                        None if self.metric_names.len() < self.max_metric_names => {
                            let m = MetricSlot(self.metric_names.len() as u16);
                            self.metric_names.push(cap.clone());
                            self.metric_slots.insert(cap.clone(), m);
                            m
                        }
                        None => MetricSlot::OTHER,
                    };
                    let c = Candidates {
                        direct: SmallVec::new(),
                        remote: SmallVec::new(),
                        metric,
                        column: self.table.column(Relation::Invoke, cap),
                        column_for: self.installs,
                    };
                    self.by_capability.entry(cap.clone()).or_insert(c)
                }
            };
            let list = if direct { &mut c.direct } else { &mut c.remote };
            slot.positions.push(list.len() as u32);
            list.push(idx);
        }
    }

    fn unindex(&mut self, idx: AgentIdx) {
        let Some(slot) = self.agents.get(idx) else {
            return;
        };
        let e = &slot.entry;
        let direct = e.local.is_some();
        let capabilities = e.capabilities.clone();
        let positions = slot.positions.clone();
        for (cap, &pos) in capabilities.iter().zip(&positions) {
            let Some(c) = self.by_capability.get_mut(&**cap) else {
                continue;
            };
            let list = if direct { &mut c.direct } else { &mut c.remote };
            let pos = pos as usize;
            if list.get(pos) != Some(&idx) {
                continue;
            }
            list.swap_remove(pos);
            // The agent moved into `pos` records its new position for this capability.
            if let Some(&moved) = list.get(pos) {
                if let Some(m) = self.agents.get_mut(moved) {
                    if let Some(k) = m.entry.capabilities.iter().position(|x| x == cap) {
                        if let Some(p) = m.positions.get_mut(k) {
                            *p = pos as u32;
                        }
                    }
                }
            }
            if c.len() == 0 {
                self.by_capability.remove(&**cap);
            }
        }
        if let Some(slot) = self.agents.get_mut(idx) {
            slot.positions.clear();
        }
    }

    /// Capability names and their providers, for discovery: `(capability, providers)`.
    pub fn capabilities(&self) -> impl Iterator<Item = (&str, usize)> {
        self.by_capability
            .iter()
            .map(|(name, c)| (&**name, c.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(session: u64, caps: &[&str], local: Option<u8>, limit: u32) -> AgentEntry<u8> {
        AgentEntry {
            session: SessionId(session),
            home: WorkerId(0),
            local,
            outstanding: 0,
            limit,
            capabilities: caps.iter().map(|c| Box::<str>::from(*c)).collect(),
        }
    }

    #[test]
    fn unknown_capability_has_no_route() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 7, 16);
        assert_eq!(r.select(&GroupSet::EMPTY, "nope"), Selection::NoRoute);
        r.insert(entry(1, &["echo"], Some(0), 4));
        assert_eq!(r.select(&GroupSet::EMPTY, "nope"), Selection::NoRoute);
        assert!(matches!(
            r.select(&GroupSet::EMPTY, "echo"),
            Selection::Local(_, MetricSlot(0))
        ));
    }

    #[test]
    fn a_targeted_session_is_the_only_candidate() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 3, 16);
        let a = r.insert(entry(1, &["echo"], Some(0), 1));
        let b = r.insert(entry(2, &["echo", "other"], None, 4));
        let groups = GroupSet::EMPTY;
        for _ in 0..3 {
            assert!(matches!(
                r.select_session(&groups, "echo", SessionId(2)),
                Selection::Handoff(x, _) if x == b
            ));
        }
        assert!(matches!(
            r.select_session(&groups, "echo", SessionId(1)),
            Selection::Local(x, _) if x == a
        ));
        // At its limit: overloaded, never another agent instead.
        assert_eq!(
            r.select_session(&groups, "echo", SessionId(1)),
            Selection::Overloaded
        );
        // Gone, or not offering the capability: no route.
        assert_eq!(
            r.select_session(&groups, "echo", SessionId(9)),
            Selection::NoRoute
        );
        assert_eq!(
            r.select_session(&groups, "other", SessionId(1)),
            Selection::NoRoute
        );
        assert_eq!(
            r.select_session(&groups, "nope", SessionId(2)),
            Selection::NoRoute
        );
    }

    #[test]
    fn direct_targets_are_preferred_over_handoff() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 7, 16);
        let remote = r.insert(entry(1, &["echo"], None, 100));
        let local = r.insert(entry(2, &["echo"], Some(3), 100));
        for _ in 0..50 {
            assert!(
                matches!(r.select(&GroupSet::EMPTY, "echo"), Selection::Local(a, _) if a == local)
            );
        }
        r.set_local(SessionId(2), None);
        assert!(
            matches!(r.select(&GroupSet::EMPTY, "echo"), Selection::Handoff(i, _) if i == remote || i == local)
        );
    }

    #[test]
    fn a_full_direct_target_falls_back_to_a_handoff() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 5, 16);
        let local = r.insert(entry(1, &["echo"], Some(0), 1));
        let remote = r.insert(entry(2, &["echo"], None, 1));
        assert!(matches!(r.select(&GroupSet::EMPTY, "echo"), Selection::Local(a, _) if a == local));
        assert!(
            matches!(r.select(&GroupSet::EMPTY, "echo"), Selection::Handoff(x, _) if x == remote)
        );
        assert_eq!(r.select(&GroupSet::EMPTY, "echo"), Selection::Overloaded);
    }

    #[test]
    fn load_is_spread_and_limits_are_respected() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 99, 16);
        let a = r.insert(entry(1, &["echo"], Some(0), 10));
        let b = r.insert(entry(2, &["echo"], Some(1), 10));
        for _ in 0..20 {
            assert!(matches!(
                r.select(&GroupSet::EMPTY, "echo"),
                Selection::Local(..)
            ));
        }
        assert_eq!(r.agent(a).unwrap().outstanding, 10);
        assert_eq!(r.agent(b).unwrap().outstanding, 10);
        assert_eq!(r.select(&GroupSet::EMPTY, "echo"), Selection::Overloaded);
        r.finish(b);
        assert!(matches!(r.select(&GroupSet::EMPTY, "echo"), Selection::Local(x, _) if x == b));
    }

    #[test]
    fn removal_and_card_update_reindex() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 1, 16);
        r.insert(entry(1, &["a", "b"], Some(0), 4));
        r.insert(entry(1, &["b", "c"], Some(0), 4));
        assert_eq!(r.select(&GroupSet::EMPTY, "a"), Selection::NoRoute);
        assert!(matches!(
            r.select(&GroupSet::EMPTY, "c"),
            Selection::Local(..)
        ));
        assert!(r.remove(SessionId(1)).is_some());
        assert_eq!(r.select(&GroupSet::EMPTY, "b"), Selection::NoRoute);
        assert!(r.is_empty());
        assert_eq!(r.capabilities().count(), 0);
    }

    #[test]
    fn metric_names_are_bounded() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 1, 2);
        r.insert(entry(1, &["a", "b", "c"], Some(0), 4));
        assert_eq!(r.metric_names().len(), 2);
        let slots: Vec<MetricSlot> = ["a", "b", "c"]
            .iter()
            .map(|c| match r.select(&GroupSet::EMPTY, c) {
                Selection::Local(_, m) => m,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(slots, [MetricSlot(0), MetricSlot(1), MetricSlot::OTHER]);
        // A capability that goes away and comes back keeps its slot.
        r.remove(SessionId(1));
        r.insert(entry(2, &["b"], Some(0), 4));
        assert!(matches!(
            r.select(&GroupSet::EMPTY, "b"),
            Selection::Local(_, MetricSlot(1))
        ));
    }

    /// Defect 5: an index kept after its agent left (and another took the slot) is stale.
    #[test]
    fn a_stale_index_releases_nothing_of_the_agent_that_took_the_slot() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 3, 16);
        r.insert(entry(1, &["echo"], Some(0), 4));
        let Selection::Local(old, _) = r.select(&GroupSet::EMPTY, "echo") else {
            panic!("routed")
        };
        r.remove(SessionId(1));
        let new = r.insert(entry(2, &["echo"], Some(0), 4));
        assert!(matches!(r.select(&GroupSet::EMPTY, "echo"), Selection::Local(x, _) if x == new));
        assert_eq!(r.agent(new).unwrap().outstanding, 1);
        assert!(r.agent(old).is_none());
        assert_eq!(r.finish(old), None, "the stale index releases nothing");
        assert_eq!(r.agent(new).unwrap().outstanding, 1);
        assert_eq!(r.finish(new), Some(SessionId(2)));
        assert!(!r.begin(old));
    }

    /// Defect 9: many agents sharing capabilities come and go in any order; every candidate
    /// list stays exact (removal swaps in O(1) and records the moved agent's new position).
    #[test]
    fn many_agents_sharing_capabilities_index_and_unindex_exactly() {
        let mut r: Router<u8> = Router::new(TableGeneration::standalone(), 11, 16);
        let n = 2_000u64;
        for s in 0..n {
            let local = (s % 3 == 0).then_some(0);
            r.insert(entry(
                s,
                &["shared", if s % 2 == 0 { "even" } else { "odd" }],
                local,
                1,
            ));
        }
        // Remove in a scrambled order, move some between direct and hand-off, re-card others.
        let mut order: Vec<u64> = (0..n).collect();
        order.sort_by_key(|s| (s * 7919) % n);
        for (i, &s) in order.iter().enumerate() {
            match i % 4 {
                0 => {
                    r.remove(SessionId(s));
                }
                1 => r.set_local(SessionId(s), Some(1)),
                2 => {
                    r.insert(entry(s, &["shared"], None, 1));
                }
                _ => {}
            }
        }
        let mut expect: HashMap<String, usize> = HashMap::new();
        for (_, e) in r.agents() {
            for c in e.capabilities.iter() {
                *expect.entry(c.to_string()).or_default() += 1;
            }
        }
        let got: HashMap<String, usize> =
            r.capabilities().map(|(c, n)| (c.to_owned(), n)).collect();
        assert_eq!(got, expect);
        // Every agent is selectable exactly up to its limit of one.
        let mut picked = 0;
        while let Selection::Local(..) | Selection::Handoff(..) =
            r.select(&GroupSet::EMPTY, "shared")
        {
            picked += 1;
        }
        assert_eq!(picked, expect["shared"]);
    }
}
