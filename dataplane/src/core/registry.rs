//! What this worker knows of agents attached anywhere in the gateway, and detach counting.
//!
//! The worker that holds an agent's primary connection (its *home*) broadcasts `AgentUp` when
//! it attaches or replaces its card, and `AgentDown` when its primary connection is gone; every
//! worker indexes the agent in its own routing overlay. A detach is counted: the home sends
//! `AgentDetaching` to every other worker, each answers `DetachDone` once it has nothing in
//! flight to the agent, and the home sends `DETACHED` when all have (see docs/DATAPLANE.md).

use std::sync::Arc;
use std::time::Instant;

use dmsc_protocol::control::{ControlFrame, SessionId};
use dmsc_protocol::ConnectionCode;

use super::conn::Role;
use super::{ConnIdx, Core};
use crate::metrics::{AgentView, Known, WorkerReport};
use crate::msg::{AgentInfo, WorkerMsg};
use crate::routing::{AgentEntry, WorkerId};

impl Core {
    /// Queues `make()` for every other worker.
    pub(super) fn broadcast(&mut self, make: impl Fn() -> WorkerMsg) {
        for w in WorkerId::all(self.shared.workers()) {
            if w != self.index {
                self.outboxes.push(w, make());
            }
        }
    }

    /// Queues `msg` for worker `to`.
    pub(super) fn post(&mut self, to: WorkerId, msg: WorkerMsg) {
        self.outboxes.push(to, msg);
    }

    /// An agent attached on another worker (or replaced its card there).
    pub(super) fn remote_agent_up(&mut self, info: Arc<AgentInfo>) {
        let session = info.session;
        let lane = self.session_conn(session, Role::Lane(session));
        self.agent_up(info);
        let routed = self
            .router
            .find(session)
            .and_then(|i| self.router.agent(i))
            .is_some_and(|a| a.local.is_some());
        if let (Some(ci), false) = (lane, routed) {
            self.router.set_local(session, Some(ci));
        }
    }

    pub(super) fn agent_up(&mut self, info: Arc<AgentInfo>) {
        let withdrawn = self.detach_watch.contains(&info.session)
            || self.detach_waiting.contains_key(&info.session);
        if let Some(old) = self.agents.get(&info.session) {
            self.catalog.remove(old.session, &old.capabilities);
        }
        if !withdrawn {
            self.catalog.add(info.session, &info.capabilities);
        }
        self.router.insert(AgentEntry {
            session: info.session,
            home: info.home,
            local: None,
            outstanding: 0,
            limit: info.limit,
            capabilities: if withdrawn {
                Arc::from([])
            } else {
                info.capabilities.clone()
            },
        });
        self.agents.insert(info.session, info);
    }

    pub(super) fn agent_detaching(&mut self, session: SessionId) {
        self.detach_watch.insert(session);
        if let Some(info) = self.agents.get(&session) {
            self.catalog.remove(session, &info.capabilities);
            let home = info.home;
            self.router.insert(AgentEntry {
                session,
                home,
                local: None,
                outstanding: 0,
                limit: 0,
                capabilities: Arc::from([]),
            });
        }
        self.check_detach(session);
    }

    /// Reports this worker done with a detaching `session` once nothing is in flight to it.
    pub(super) fn check_detach(&mut self, session: SessionId) {
        if !self.detach_watch.contains(&session) {
            return;
        }
        let idle = self
            .router
            .find(session)
            .and_then(|i| self.router.agent(i))
            .is_none_or(|a| a.outstanding == 0);
        if !idle {
            return;
        }
        self.detach_watch.remove(&session);
        let home = self.agents.get(&session).map_or(self.index, |a| a.home);
        if home == self.index {
            self.detach_done(session);
        } else {
            self.post(home, WorkerMsg::DetachDone { session });
        }
    }

    /// This worker's connection of `session` with `role`, if any.
    pub(super) fn session_conn(&self, session: SessionId, role: Role) -> Option<ConnIdx> {
        self.session_conns
            .get(&session)?
            .iter()
            .copied()
            .find(|&ci| self.conns.get(ci).is_some_and(|c| c.role == role))
    }

    pub(super) fn detach_done(&mut self, session: SessionId) {
        let Some(left) = self.detach_waiting.get_mut(&session) else {
            return;
        };
        *left -= 1;
        if *left > 0 {
            return;
        }
        self.detach_waiting.remove(&session);
        if let Some(ci) = self.session_conn(session, Role::Primary(session)) {
            self.write_control(ci, &ControlFrame::Detached);
        }
    }

    /// The session is over: forget the agent and close its lanes on this worker.
    pub(super) fn agent_down(&mut self, session: SessionId, now: Instant) {
        for ci in self.session_conns.remove(&session).unwrap_or_default() {
            let lane = self
                .conns
                .get(ci)
                .is_some_and(|c| c.role == Role::Lane(session));
            if lane {
                self.close_conn(ci, now, ConnectionCode::NoError, "session ended");
            }
        }
        self.router.remove(session);
        if let Some(info) = self.agents.remove(&session) {
            self.catalog.remove(session, &info.capabilities);
        }
        self.detach_watch.remove(&session);
        self.detach_waiting.remove(&session);
    }

    /// The metrics that changed since `known`, and the agents whose home this worker is.
    pub(super) fn report(&self, known: &Known) -> WorkerReport {
        let agents = self
            .agents
            .values()
            .filter(|a| a.home == self.index)
            .map(|a| {
                let entry = self
                    .router
                    .find(a.session)
                    .and_then(|i| self.router.agent(i));
                AgentView {
                    session: a.session.0,
                    identity: a.identity.to_string(),
                    name: a.card.name.clone(),
                    capabilities: entry
                        .map(|e| e.capabilities.iter().map(|c| c.to_string()).collect())
                        .unwrap_or_default(),
                    home_worker: a.home.index(),
                    max_concurrent: a.limit,
                    detaching: self.detach_waiting.contains_key(&a.session),
                }
            })
            .collect();
        WorkerReport {
            worker: self.index.index(),
            generation: self.router.table().generation.0,
            table: self.router.table().name(),
            changes: self.metrics.changes(self.router.metric_names(), known),
            agents,
            trunks: self.trunk_views(),
            routes: self.trunks.routes.as_ref().map(|r| r.version()),
            remote_capabilities: self
                .trunks
                .routes
                .as_ref()
                .map_or(0, |r| r.remote_capabilities()),
        }
    }
}
