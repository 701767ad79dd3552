//! The domain's routes: what each gateway reports of its attached agents (`REPORT`), compiled
//! into the `ROUTES` every gateway of the domain receives (`docs/CONTROL.md` section 7).
//!
//! Sans-IO: `Domain` takes reports, session ends and the time as arguments and answers with
//! decisions (refusals to send, whether routes are due); the server ([`crate::serve`]) does the
//! I/O and the timing. The calling contract:
//!
//! - `report` for every `REPORT` of a gateway's current session, `session_ended` or `remove`
//!   when that session ends;
//! - the router, one task, calls `expire` and then `prepare` at most once per routes interval;
//!   if `prepare` hands back `Inputs`, it calls `merge` on them without holding the lock
//!   and gives the result to `install`;
//! - `next_deadline` says when the router must run even if nothing is reported (a grace period
//!   or the start-up hold ends).
//!
//! A gateway's reports are applied at once to its *live* state, but the compiler sees only its
//! *snapshot*, taken from the live state when the router runs and no batch of the gateway is
//! open (`more`), so routes never show half a batch.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dmsc_protocol::ctl::{self, Frame};
use dmsc_protocol::domain::{
    AgentChange, AgentReport, Provider, Report, ReportRejected, RouteCapability, RouteGateway,
    Routes, Skill, MAX_REPORT_SKILLS, MAX_ROUTES_BYTES, MAX_ROUTE_CAPABILITIES, MAX_ROUTE_GATEWAYS,
};

/// Default for [`Limits::agents_per_gateway`].
pub const DEFAULT_MAX_AGENTS_PER_GATEWAY: usize = 65_536;
/// Default for [`Limits::skills_per_agent`].
pub const DEFAULT_MAX_AGENT_SKILLS: usize = 256;
/// Default for [`Limits::card_bytes`].
pub const DEFAULT_MAX_CARD_BYTES: u64 = 262_144;
/// Versions whose publication time is kept, to tell how long a gateway has been behind.
const PUBLISHED_HISTORY: usize = 1024;

/// What one gateway may report; an agent over a limit is refused with `REPORT_REJECTED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most agents one gateway may have reported at once.
    pub agents_per_gateway: usize,
    /// Most skills (capabilities) per reported agent; at most [`MAX_REPORT_SKILLS`].
    pub skills_per_agent: usize,
    /// Largest `card_bytes` of a reported agent.
    pub card_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            agents_per_gateway: DEFAULT_MAX_AGENTS_PER_GATEWAY,
            skills_per_agent: DEFAULT_MAX_AGENT_SKILLS.min(MAX_REPORT_SKILLS),
            card_bytes: DEFAULT_MAX_CARD_BYTES,
        }
    }
}

/// Which limit refused an agent (the `reason` label of the rejection metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The gateway has as many agents as it may.
    AgentsPerGateway,
    /// The agent has too many skills.
    AgentSkills,
    /// The agent's card is too large.
    CardBytes,
}

impl Over {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Over::AgentsPerGateway => "agents_per_gateway",
            Over::AgentSkills => "agent_skills",
            Over::CardBytes => "card_bytes",
        }
    }
}

/// What applying one `REPORT` produced.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Refusals to send back, in the order of the changes.
    pub(crate) rejected: Vec<(Over, ReportRejected)>,
    /// The frame ended a batch (`more` clear): the router should run.
    pub(crate) batch_ended: bool,
}

/// A compiled, encoded `ROUTES`, shared by every session that sends it.
#[derive(Debug)]
pub(crate) struct Published {
    /// The routes.
    pub(crate) routes: Routes,
    /// The whole `ROUTES` frame, encoded once.
    pub(crate) frame: Vec<u8>,
    /// Agents in the routes, summed over gateways.
    pub(crate) agents: u64,
}

/// One capability of a gateway's snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotCapability {
    name: Arc<str>,
    agents: u64,
    load: u64,
    /// The skill of the gateway's lowest session offering it.
    skill: Arc<Skill>,
}

/// What the compiler sees of one gateway.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    addresses: Vec<String>,
    agents: u64,
    /// Ascending by name.
    capabilities: Vec<SnapshotCapability>,
}

/// One reported agent, as kept.
#[derive(Debug)]
struct Agent {
    load: u64,
    /// Trimmed, each id once, in the order reported.
    skills: Vec<Arc<Skill>>,
}

/// A capability of a gateway's live state.
#[derive(Debug, Default)]
struct LiveCapability {
    load: u64,
    sessions: BTreeSet<u64>,
}

/// Everything known of one gateway's reports.
#[derive(Debug, Default)]
struct Reported {
    addresses: Vec<String>,
    agents: HashMap<u64, Agent>,
    capabilities: BTreeMap<Arc<str>, LiveCapability>,
    /// A frame with `more` set came and the batch has not ended.
    batch_open: bool,
    /// The open batch began with (or contains) a reset.
    batch_reset: bool,
    /// The live state differs from the snapshot.
    changed: bool,
    /// A batch with a reset has ended in this run: the gateway's report is complete.
    complete: bool,
    /// What the compiler uses; `None` until the gateway's first batch ended.
    snapshot: Option<Arc<Snapshot>>,
    /// When its session ended; its agents go once the grace period has passed since.
    gone_since: Option<Instant>,
    /// `REPORT_REJECTED` sent to it.
    rejections: u64,
}

impl Reported {
    fn clear(&mut self) {
        self.agents.clear();
        self.capabilities.clear();
        self.addresses.clear();
    }

    fn remove_agent(&mut self, session: u64) -> bool {
        let Some(agent) = self.agents.remove(&session) else {
            return false;
        };
        for skill in &agent.skills {
            if let Some(cap) = self.capabilities.get_mut(skill.id.as_str()) {
                cap.sessions.remove(&session);
                cap.load = cap.load.saturating_sub(agent.load);
                if cap.sessions.is_empty() {
                    self.capabilities.remove(skill.id.as_str());
                }
            }
        }
        true
    }

    fn insert_agent(&mut self, report: AgentReport) {
        let session = report.session;
        let mut skills: Vec<Arc<Skill>> = Vec::with_capacity(report.skills.len());
        for skill in report.skills {
            if skills.iter().any(|s| s.id == skill.id) {
                continue;
            }
            skills.push(Arc::new(skill.trimmed()));
        }
        for skill in &skills {
            let cap = match self.capabilities.get_mut(skill.id.as_str()) {
                Some(cap) => cap,
                None => self
                    .capabilities
                    .entry(Arc::from(skill.id.as_str()))
                    .or_default(),
            };
            cap.sessions.insert(session);
            cap.load = cap.load.saturating_add(report.load);
        }
        self.agents.insert(
            session,
            Agent {
                load: report.load,
                skills,
            },
        );
    }

    fn take_snapshot(&self) -> Snapshot {
        let capabilities = self
            .capabilities
            .iter()
            .filter_map(|(name, cap)| {
                let first = cap.sessions.first()?;
                let skill = self
                    .agents
                    .get(first)?
                    .skills
                    .iter()
                    .find(|s| s.id.as_str() == &**name)?
                    .clone();
                Some(SnapshotCapability {
                    name: name.clone(),
                    agents: cap.sessions.len() as u64,
                    load: cap.load,
                    skill,
                })
            })
            .collect();
        Snapshot {
            addresses: self.addresses.clone(),
            agents: self.agents.len() as u64,
            capabilities,
        }
    }
}

/// The state of the start-up hold: no `ROUTES` until every listed gateway reported in full or
/// the grace period has passed since start.
#[derive(Debug, Clone, Copy)]
enum Hold {
    Until(Instant),
    Released,
}

/// The domain's reports and routes. See the module docs for the calling contract.
#[derive(Debug)]
pub(crate) struct Domain {
    limits: Limits,
    grace: Duration,
    epoch: u64,
    /// The last version installed (0: none yet).
    version: u64,
    gateways: BTreeMap<String, Reported>,
    listed: Vec<String>,
    hold: Hold,
    /// Something the compiler sees may have changed since the last `prepare`.
    dirty: bool,
    current: Option<Arc<Published>>,
    /// When recent versions were installed, oldest first.
    published: VecDeque<(u64, Instant)>,
    /// Why the last compile was not published, until one is.
    last_error: Option<String>,
    compiles: u64,
}

/// What the router merges outside the lock.
#[derive(Debug)]
pub(crate) struct Inputs {
    version: u64,
    epoch: u64,
    gateways: Vec<(String, Arc<Snapshot>)>,
    current: Option<Arc<Published>>,
}

/// How one gateway's reports stand, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct GatewayReportView {
    /// `none` (nothing reported), `reporting` (a batch is open), `complete` or `grace` (its
    /// session ended; its agents stay until the grace period ends).
    pub(crate) state: &'static str,
    /// Milliseconds left of its grace period.
    pub(crate) grace_left_ms: Option<u64>,
    pub(crate) agents: u64,
    pub(crate) capability_count: u64,
    /// Sorted; at most `max_names`.
    pub(crate) capabilities: Vec<String>,
    pub(crate) addresses: Vec<String>,
    pub(crate) rejections: u64,
}

impl Domain {
    /// A domain with no reports, holding its routes until the gateways in `listed` reported or
    /// `grace` has passed since `now`. `epoch` names this run: nonzero, at most
    /// [`dmsc_protocol::varint::MAX`].
    pub(crate) fn new(
        limits: Limits,
        grace: Duration,
        epoch: u64,
        listed: Vec<String>,
        now: Instant,
    ) -> Self {
        Self {
            limits,
            grace,
            epoch,
            version: 0,
            gateways: BTreeMap::new(),
            listed,
            hold: Hold::Until(now + grace),
            dirty: false,
            current: None,
            published: VecDeque::new(),
            last_error: None,
            compiles: 0,
        }
    }

    /// The listed gateways changed (a reload): they are the ones the start-up hold waits for.
    pub(crate) fn set_listed(&mut self, listed: Vec<String>) {
        self.listed = listed;
    }

    /// Applies one `REPORT` from gateway `id`'s current session.
    pub(crate) fn report(&mut self, id: &str, report: Report) -> Applied {
        let limits = self.limits;
        let g = match self.gateways.get_mut(id) {
            Some(g) => g,
            None => self.gateways.entry(id.to_owned()).or_default(),
        };
        let mut applied = Applied::default();
        if report.reset {
            g.clear();
            g.addresses = report.addresses;
            g.batch_reset = true;
            // It is back: its agents are its own again, not leftovers of a lost session.
            g.gone_since = None;
            g.changed = true;
        }
        for change in report.changes {
            g.changed = true;
            match change {
                AgentChange::Down { session } => {
                    g.remove_agent(session);
                }
                AgentChange::Up(agent) => {
                    let session = agent.session;
                    let over = if agent.skills.len() > limits.skills_per_agent {
                        Some((
                            Over::AgentSkills,
                            format!(
                                "{} skills, over the limit of {} per agent",
                                agent.skills.len(),
                                limits.skills_per_agent
                            ),
                        ))
                    } else if agent.card_bytes > limits.card_bytes {
                        Some((
                            Over::CardBytes,
                            format!(
                                "card of {} bytes, over the limit of {}",
                                agent.card_bytes, limits.card_bytes
                            ),
                        ))
                    } else if !g.agents.contains_key(&session)
                        && g.agents.len() >= limits.agents_per_gateway
                    {
                        Some((
                            Over::AgentsPerGateway,
                            format!(
                                "the gateway has {} agents reported, the limit",
                                limits.agents_per_gateway
                            ),
                        ))
                    } else {
                        None
                    };
                    // Refused or replaced, the earlier report of the session goes: the routes
                    // never keep an agent as its gateway no longer describes it.
                    g.remove_agent(session);
                    match over {
                        Some((over, reason)) => {
                            g.rejections += 1;
                            applied.rejected.push((
                                over,
                                ReportRejected {
                                    session,
                                    reason: ctl::reason(&reason),
                                },
                            ));
                        }
                        None => g.insert_agent(agent),
                    }
                }
            }
        }
        if report.more {
            g.batch_open = true;
        } else {
            g.batch_open = false;
            if g.batch_reset {
                g.complete = true;
                g.batch_reset = false;
            }
            applied.batch_ended = true;
            // An empty snapshot is one too: a gateway that reported no agent is in the routes,
            // with its addresses.
            if g.changed || g.snapshot.is_none() {
                self.dirty = true;
            }
        }
        applied
    }

    /// A session of gateway `id` began at `now`: what the gateway reported before stays for
    /// the grace period (counted from the end of its last session, if that came first) unless
    /// the new session reports afresh (a reset).
    pub(crate) fn session_started(&mut self, id: &str, now: Instant) {
        if let Some(g) = self.gateways.get_mut(id) {
            g.gone_since.get_or_insert(now);
        }
    }

    /// Gateway `id`'s session ended at `now`: its agents stay for the grace period.
    pub(crate) fn session_ended(&mut self, id: &str, now: Instant) {
        if let Some(g) = self.gateways.get_mut(id) {
            g.gone_since = Some(now);
        }
    }

    /// Gateway `id` is gone for good (it closed with `SHUTTING_DOWN`): its agents go now.
    pub(crate) fn remove(&mut self, id: &str) {
        if let Some(g) = self.gateways.remove(id) {
            if g.snapshot.is_some() {
                self.dirty = true;
            }
        }
    }

    /// Removes the gateways whose grace period has passed at `now`; whether any was.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        let grace = self.grace;
        let gone: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, g)| g.gone_since.is_some_and(|t| now >= t + grace))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.remove(id);
        }
        !gone.is_empty()
    }

    /// The next time the router must run though nothing is reported.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        let hold = match self.hold {
            Hold::Until(t) => Some(t),
            Hold::Released => None,
        };
        self.gateways
            .values()
            .filter_map(|g| g.gone_since.map(|t| t + self.grace))
            .chain(hold)
            .min()
    }

    /// Whether routes are still held back at `now` (releases the hold when its time has come).
    pub(crate) fn held(&mut self, now: Instant) -> bool {
        if let Hold::Until(t) = self.hold {
            let all_reported = self
                .listed
                .iter()
                .all(|id| self.gateways.get(id).is_some_and(|g| g.complete));
            if now >= t || all_reported {
                self.hold = Hold::Released;
            }
        }
        matches!(self.hold, Hold::Until(_))
    }

    /// The compiler's inputs if routes are due: not held, and something changed (or nothing
    /// was published yet). Refreshes the snapshots of gateways with no open batch.
    pub(crate) fn prepare(&mut self, now: Instant) -> Option<Inputs> {
        if self.held(now) || (!self.dirty && self.current.is_some()) {
            return None;
        }
        self.dirty = false;
        self.compiles += 1;
        for g in self.gateways.values_mut() {
            if !g.batch_open && (g.changed || g.snapshot.is_none()) {
                g.snapshot = Some(Arc::new(g.take_snapshot()));
                g.changed = false;
            }
        }
        Some(Inputs {
            version: self.version + 1,
            epoch: self.epoch,
            gateways: self
                .gateways
                .iter()
                .filter_map(|(id, g)| Some((id.clone(), g.snapshot.clone()?)))
                .collect(),
            current: self.current.clone(),
        })
    }

    /// Makes `published` the current routes (it was merged from the last `prepare`).
    pub(crate) fn install(&mut self, published: Arc<Published>, now: Instant) {
        self.version = published.routes.version;
        self.last_error = None;
        self.published.push_back((self.version, now));
        if self.published.len() > PUBLISHED_HISTORY {
            self.published.pop_front();
        }
        self.current = Some(published);
    }

    /// The last compile could not be published.
    pub(crate) fn failed(&mut self, error: String) {
        self.last_error = Some(error);
    }

    pub(crate) fn current(&self) -> Option<Arc<Published>> {
        self.current.clone()
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn compiles(&self) -> u64 {
        self.compiles
    }

    pub(crate) fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    pub(crate) fn is_held(&self) -> bool {
        matches!(self.hold, Hold::Until(_))
    }

    /// The listed gateways the start-up hold still waits for.
    pub(crate) fn waiting_for(&self) -> Vec<String> {
        if !self.is_held() {
            return Vec::new();
        }
        self.listed
            .iter()
            .filter(|id| !self.gateways.get(*id).is_some_and(|g| g.complete))
            .cloned()
            .collect()
    }

    /// How long a gateway holding routes `epoch`/`version` has been behind the current ones at
    /// `now`: 0 when it holds them (or none are published), else the time since the first
    /// version it lacks was published.
    pub(crate) fn behind(&self, epoch: u64, version: u64, now: Instant) -> Duration {
        let Some(current) = &self.current else {
            return Duration::ZERO;
        };
        let held = if epoch == self.epoch { version } else { 0 };
        if held >= current.routes.version {
            return Duration::ZERO;
        }
        let since = self
            .published
            .iter()
            .find(|(v, _)| *v > held)
            .map(|(_, t)| *t);
        since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    /// Gateway `id`'s reports, for `status`, naming at most `max_names` capabilities.
    pub(crate) fn view(&self, id: &str, max_names: usize, now: Instant) -> GatewayReportView {
        let Some(g) = self.gateways.get(id) else {
            return GatewayReportView {
                state: "none",
                ..Default::default()
            };
        };
        let grace_left = g
            .gone_since
            .map(|t| (t + self.grace).saturating_duration_since(now));
        GatewayReportView {
            state: if grace_left.is_some() {
                "grace"
            } else if g.batch_open {
                "reporting"
            } else {
                "complete"
            },
            grace_left_ms: grace_left.map(|d| d.as_millis() as u64),
            agents: g.agents.len() as u64,
            capability_count: g.capabilities.len() as u64,
            capabilities: g
                .capabilities
                .keys()
                .take(max_names)
                .map(|c| c.to_string())
                .collect(),
            addresses: g.addresses.clone(),
            rejections: g.rejections,
        }
    }
}

/// Merges the gateways' snapshots into routes of `inputs.version`; `Ok(None)` when they equal
/// the current routes, `Err` when they cannot be sent (over the protocol's limits).
pub(crate) fn merge(inputs: &Inputs) -> Result<Option<Published>, String> {
    if inputs.gateways.len() > MAX_ROUTE_GATEWAYS {
        return Err(format!(
            "{} gateways reported, over the limit of {MAX_ROUTE_GATEWAYS}",
            inputs.gateways.len()
        ));
    }
    let mut gateways = Vec::with_capacity(inputs.gateways.len());
    let mut merged: BTreeMap<&str, RouteCapability> = BTreeMap::new();
    let mut agents = 0u64;
    // Gateways ascending by id: providers come out ascending by index, and the first provider
    // of a capability (whose skill describes it) is its lowest gateway id.
    for (index, (id, snapshot)) in inputs.gateways.iter().enumerate() {
        gateways.push(RouteGateway {
            id: id.clone(),
            addresses: snapshot.addresses.clone(),
        });
        agents += snapshot.agents;
        for cap in &snapshot.capabilities {
            let entry = merged.entry(&cap.name).or_insert_with(|| RouteCapability {
                skill: (*cap.skill).clone(),
                providers: Vec::new(),
            });
            entry.providers.push(Provider {
                gateway: index as u32,
                agents: cap.agents,
                // Each load is a varint; their sum may not be.
                load: cap.load.min(dmsc_protocol::varint::MAX),
            });
        }
        if merged.len() > MAX_ROUTE_CAPABILITIES {
            return Err(format!(
                "over {MAX_ROUTE_CAPABILITIES} capabilities in the domain"
            ));
        }
    }
    let routes = Routes {
        version: inputs.version,
        epoch: inputs.epoch,
        gateways,
        capabilities: merged.into_values().collect(),
    };
    if let Some(current) = &inputs.current {
        if current.routes.epoch == routes.epoch
            && current.routes.gateways == routes.gateways
            && current.routes.capabilities == routes.capabilities
        {
            return Ok(None);
        }
    }
    let frame_value = Frame::Routes(routes);
    let mut frame = Vec::new();
    ctl::encode_frame(&frame_value, &mut frame);
    // Invariant: `frame_value` was made as `Frame::Routes` just above.
    let Frame::Routes(routes) = frame_value else {
        unreachable!("made as ROUTES")
    };
    // The frame is its type (one byte, 0x07), its payload length, then the payload.
    let payload = match dmsc_protocol::varint::decode(&frame[1..]) {
        Ok(Some((len, _))) => len,
        _ => u64::MAX,
    };
    if payload > MAX_ROUTES_BYTES as u64 {
        return Err(format!(
            "the routes take {payload} bytes, over the limit of {MAX_ROUTES_BYTES}"
        ));
    }
    Ok(Some(Published {
        routes,
        frame,
        agents,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skill(id: &str, description: &str) -> Skill {
        Skill {
            id: id.into(),
            description: description.into(),
            ..Default::default()
        }
    }

    fn agent(session: u64, load: u64, skills: &[&str]) -> AgentChange {
        AgentChange::Up(AgentReport {
            session,
            identity: format!("spiffe://d/agent/a{session}"),
            card_bytes: 100,
            load,
            limit: 8,
            skills: skills
                .iter()
                .map(|s| skill(s, &format!("{s} by {session}")))
                .collect(),
            ..Default::default()
        })
    }

    fn full(addresses: &[&str], changes: Vec<AgentChange>) -> Report {
        Report {
            reset: true,
            more: false,
            addresses: addresses.iter().map(|a| a.to_string()).collect(),
            changes,
        }
    }

    fn changes(changes: Vec<AgentChange>, more: bool) -> Report {
        Report {
            reset: false,
            more,
            addresses: vec![],
            changes,
        }
    }

    fn domain(listed: &[&str], now: Instant) -> Domain {
        Domain::new(
            Limits::default(),
            Duration::from_secs(3),
            77,
            listed.iter().map(|s| s.to_string()).collect(),
            now,
        )
    }

    /// Runs the router once: the new routes, if any were due and differ.
    fn compile(d: &mut Domain, now: Instant) -> Option<Routes> {
        d.expire(now);
        let inputs = d.prepare(now)?;
        let published = Arc::new(merge(&inputs).unwrap()?);
        d.install(published.clone(), now);
        Some(published.routes.clone())
    }

    #[test]
    fn routes_list_gateways_and_capabilities_in_order_with_providers_per_gateway() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1", "gw2"], t0);
        d.report(
            "gw2",
            full(
                &["10.0.0.2:4433"],
                vec![agent(9, 3, &["b", "a"]), agent(4, 1, &["a"])],
            ),
        );
        d.report(
            "gw1",
            full(
                &["10.0.0.1:4433", "10.0.0.1:4434"],
                vec![agent(7, 5, &["a"])],
            ),
        );
        let r = compile(&mut d, t0).expect("both listed gateways reported: routes are due");
        assert_eq!((r.version, r.epoch), (1, 77));
        let ids: Vec<&str> = r.gateways.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, ["gw1", "gw2"]);
        assert_eq!(r.gateways[0].addresses, ["10.0.0.1:4433", "10.0.0.1:4434"]);
        let names: Vec<&str> = r.capabilities.iter().map(|c| c.skill.id.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // "a": gw1 (index 0) one agent, load 5; gw2 two agents, load 3 + 1. Its skill comes
        // from the lowest gateway id, then the lowest session.
        assert_eq!(
            r.capabilities[0].providers,
            [
                Provider {
                    gateway: 0,
                    agents: 1,
                    load: 5
                },
                Provider {
                    gateway: 1,
                    agents: 2,
                    load: 4
                }
            ]
        );
        assert_eq!(r.capabilities[0].skill.description, "a by 7");
        assert_eq!(r.capabilities[1].skill.description, "b by 9");
        assert_eq!(r.capabilities[1].providers.len(), 1);
        // Nothing changed: no new version.
        assert!(compile(&mut d, t0).is_none());
        // gw1's agent goes: "a" keeps gw2 only, now index 1 still (gw1 still reported).
        d.report(
            "gw1",
            changes(vec![AgentChange::Down { session: 7 }], false),
        );
        let r = compile(&mut d, t0).unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(r.gateways.len(), 2, "a gateway with no agents stays listed");
        assert_eq!(r.capabilities[0].providers[0].gateway, 1);
        assert_eq!(r.capabilities[0].skill.description, "a by 4");
    }

    #[test]
    fn load_sums_stay_encodable() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1"], t0);
        let max = dmsc_protocol::varint::MAX;
        d.report(
            "gw1",
            full(&[], vec![agent(1, max, &["a"]), agent(2, max, &["a"])]),
        );
        let r = compile(&mut d, t0).unwrap();
        assert_eq!(r.capabilities[0].providers[0].load, max);
    }

    #[test]
    fn skills_are_trimmed_and_counted_once_per_agent() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1"], t0);
        let long = "x".repeat(1000);
        d.report(
            "gw1",
            full(
                &[],
                vec![AgentChange::Up(AgentReport {
                    session: 1,
                    load: 2,
                    skills: vec![skill("a", &long), skill("a", "again")],
                    ..Default::default()
                })],
            ),
        );
        let r = compile(&mut d, t0).unwrap();
        assert_eq!(r.capabilities.len(), 1);
        assert_eq!(r.capabilities[0].providers[0].agents, 1);
        assert_eq!(r.capabilities[0].providers[0].load, 2);
        assert_eq!(
            r.capabilities[0].skill.description.len(),
            dmsc_protocol::domain::MAX_SKILL_DESCRIPTION_BYTES
        );
    }

    #[test]
    fn an_open_batch_is_not_compiled_until_it_ends() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1"], t0);
        d.report("gw1", full(&["a:1"], vec![agent(1, 0, &["x"])]));
        assert_eq!(compile(&mut d, t0).unwrap().capabilities.len(), 1);
        // A new full report in two frames: after the first, the routes still show the old one.
        d.report(
            "gw1",
            Report {
                reset: true,
                more: true,
                addresses: vec!["a:1".into()],
                changes: vec![agent(2, 0, &["y"])],
            },
        );
        assert!(compile(&mut d, t0).is_none(), "half a batch is never shown");
        d.report("gw1", changes(vec![agent(3, 0, &["z"])], false));
        let r = compile(&mut d, t0).unwrap();
        let names: Vec<&str> = r.capabilities.iter().map(|c| c.skill.id.as_str()).collect();
        assert_eq!(names, ["y", "z"]);
    }

    #[test]
    fn agents_over_a_limit_are_refused_one_by_one() {
        let t0 = Instant::now();
        let mut d = Domain::new(
            Limits {
                agents_per_gateway: 2,
                skills_per_agent: 2,
                card_bytes: 1000,
            },
            Duration::from_secs(3),
            1,
            vec!["gw1".into()],
            t0,
        );
        let big_card = AgentChange::Up(AgentReport {
            session: 3,
            card_bytes: 1001,
            skills: vec![skill("c", "")],
            ..Default::default()
        });
        let applied = d.report(
            "gw1",
            full(
                &[],
                vec![
                    agent(1, 0, &["a"]),
                    agent(2, 0, &["a", "b", "c"]),
                    big_card,
                    agent(4, 0, &["d"]),
                    agent(5, 0, &["e"]),
                ],
            ),
        );
        let refused: Vec<(Over, u64)> = applied
            .rejected
            .iter()
            .map(|(o, r)| (*o, r.session))
            .collect();
        assert_eq!(
            refused,
            [
                (Over::AgentSkills, 2),
                (Over::CardBytes, 3),
                (Over::AgentsPerGateway, 5)
            ]
        );
        let r = compile(&mut d, t0).unwrap();
        let names: Vec<&str> = r.capabilities.iter().map(|c| c.skill.id.as_str()).collect();
        assert_eq!(names, ["a", "d"]);
        // Replacing an agent at the limit is no new agent; a refused update removes the old one.
        let applied = d.report(
            "gw1",
            changes(
                vec![agent(4, 0, &["f"]), agent(1, 0, &["a", "b", "c"])],
                false,
            ),
        );
        assert_eq!(applied.rejected.len(), 1);
        let r = compile(&mut d, t0).unwrap();
        let names: Vec<&str> = r.capabilities.iter().map(|c| c.skill.id.as_str()).collect();
        assert_eq!(names, ["f"]);
        assert_eq!(d.view("gw1", 10, t0).rejections, 4);
    }

    #[test]
    fn routes_are_held_until_every_listed_gateway_reported_or_the_grace_passed() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1", "gw2"], t0);
        d.report("gw1", full(&[], vec![agent(1, 0, &["a"])]));
        assert!(compile(&mut d, t0).is_none(), "gw2 has not reported");
        // A batch of gw2 that has not ended does not count.
        d.report(
            "gw2",
            Report {
                reset: true,
                more: true,
                ..Default::default()
            },
        );
        assert!(compile(&mut d, t0 + Duration::from_secs(1)).is_none());
        assert_eq!(d.waiting_for(), ["gw2"]);
        d.report("gw2", changes(vec![agent(1, 0, &["b"])], false));
        let r = compile(&mut d, t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(r.capabilities.len(), 2);

        // Alone, gw1's report is published once the grace period has passed since start.
        let mut d = domain(&["gw1", "gw2"], t0);
        d.report("gw1", full(&[], vec![agent(1, 0, &["a"])]));
        assert_eq!(d.next_deadline(), Some(t0 + Duration::from_secs(3)));
        assert!(compile(&mut d, t0 + Duration::from_millis(2999)).is_none());
        let r = compile(&mut d, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!(r.gateways.len(), 1);
        assert_eq!(d.next_deadline(), None);

        // With no gateway reporting at all, empty routes go out after the grace period.
        let mut d = domain(&["gw1"], t0);
        let r = compile(&mut d, t0 + Duration::from_secs(3)).unwrap();
        assert_eq!((r.version, r.gateways.len()), (1, 0));
    }

    #[test]
    fn a_gone_gateway_keeps_its_agents_for_the_grace_period_unless_it_reports_again() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1", "gw2"], t0);
        d.report("gw1", full(&[], vec![agent(1, 0, &["a"])]));
        d.report("gw2", full(&[], vec![agent(1, 0, &["b"])]));
        compile(&mut d, t0).unwrap();
        let t1 = t0 + Duration::from_secs(10);
        d.session_ended("gw2", t1);
        assert_eq!(d.next_deadline(), Some(t1 + Duration::from_secs(3)));
        assert_eq!(d.view("gw2", 10, t1).state, "grace");
        assert!(compile(&mut d, t1 + Duration::from_secs(2)).is_none());
        let r = compile(&mut d, t1 + Duration::from_secs(3)).unwrap();
        assert_eq!(r.gateways.len(), 1);
        assert_eq!(r.capabilities[0].skill.id, "a");

        // Back within the grace period with a full report: nothing is removed.
        d.session_ended("gw1", t1);
        d.session_started("gw1", t1 + Duration::from_secs(1));
        assert_eq!(d.next_deadline(), Some(t1 + Duration::from_secs(3)));
        d.report("gw1", full(&[], vec![agent(1, 0, &["a"])]));
        assert_eq!(d.next_deadline(), None);
        assert!(
            compile(&mut d, t1 + Duration::from_secs(60)).is_none(),
            "the same agents again: the same routes, no new version"
        );

        // A session replacing a live one must report afresh within the grace period too.
        let t2 = t1 + Duration::from_secs(60);
        d.session_started("gw1", t2);
        assert_eq!(d.next_deadline(), Some(t2 + Duration::from_secs(3)));
        d.report("gw1", full(&[], vec![agent(1, 0, &["a"])]));
        assert_eq!(d.next_deadline(), None);

        // SHUTTING_DOWN: removed at once.
        d.remove("gw1");
        let r = compile(&mut d, t1 + Duration::from_secs(60)).unwrap();
        assert!(r.gateways.is_empty() && r.capabilities.is_empty());
    }

    #[test]
    fn staleness_counts_from_the_first_version_a_gateway_lacks() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1"], t0);
        assert_eq!(d.behind(0, 0, t0), Duration::ZERO, "nothing published yet");
        d.report("gw1", full(&[], vec![agent(1, 0, &["a"])]));
        compile(&mut d, t0).unwrap();
        let t1 = t0 + Duration::from_millis(100);
        d.report("gw1", changes(vec![agent(2, 0, &["b"])], false));
        compile(&mut d, t1).unwrap();
        let t2 = t0 + Duration::from_millis(300);
        d.report("gw1", changes(vec![agent(3, 0, &["c"])], false));
        compile(&mut d, t2).unwrap();
        let now = t0 + Duration::from_millis(1000);
        assert_eq!(d.behind(77, 3, now), Duration::ZERO);
        assert_eq!(d.behind(77, 2, now), Duration::from_millis(700));
        assert_eq!(d.behind(77, 1, now), Duration::from_millis(900));
        // Routes of another run, or none: behind since version 1.
        assert_eq!(d.behind(5, 3, now), Duration::from_millis(1000));
        assert_eq!(d.behind(0, 0, now), Duration::from_millis(1000));
    }

    #[test]
    fn published_routes_decode_to_what_was_compiled() {
        let t0 = Instant::now();
        let mut d = domain(&["gw1"], t0);
        d.report("gw1", full(&["h:1"], vec![agent(1, 9, &["a", "b"])]));
        d.expire(t0);
        let inputs = d.prepare(t0).unwrap();
        let published = merge(&inputs).unwrap().unwrap();
        let (frame, used) = ctl::decode_frame(&published.frame).unwrap().unwrap();
        assert_eq!(used, published.frame.len());
        assert_eq!(frame, Frame::Routes(published.routes.clone()));
        assert_eq!(published.agents, 1);
    }
}
