//! One `dmsc-ctl/1` session per gateway: accepting the connection, checking who it is, the
//! `HELLO`, the pushes and their answers, the gateway's reports, and the writer task that sends
//! the session's frames and the domain's routes (`docs/CONTROL.md` sections 6 and 7).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use dmsc_identity::{Principal, SpiffeId};
use dmsc_protocol::ctl::{self, CloseCode, Frame, NackCode, Push, PushBody, HELLO_TIMEOUT};
use dmsc_protocol::domain::Report;
use dmsc_protocol::table::sections::{diff, SectionVersion};
use dmsc_protocol::table::{Generation, Table};
use tokio::sync::{mpsc, watch};

use crate::routes::Published;

use super::{
    GatewayEntry, Hub, RejectedView, MAX_CONNECTIONS, MAX_QUEUED_FRAMES, MAX_REMEMBERED_REFUSALS,
};

pub(super) async fn accept(endpoint: quinn::Endpoint, hub: Arc<Hub>) {
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = open.clone().try_acquire_owned() else {
            hub.metrics
                .refused
                .get_or_create(&crate::metrics::Reason {
                    reason: "connection_limit",
                })
                .inc();
            incoming.refuse();
            continue;
        };
        let hub = hub.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(%remote, error = %e, "control handshake failed");
                    hub.metrics
                        .refused
                        .get_or_create(&crate::metrics::Reason {
                            reason: "handshake",
                        })
                        .inc();
                    return;
                }
            };
            session(hub, conn).await;
        });
    }
}

/// The gateway id of the connection's peer certificate (the verifier accepted only gateways
/// of the domain).
fn peer_gateway(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let id: SpiffeId = dmsc_identity::spiffe_id_from_cert(certs.first()?).ok()?;
    match id.principal() {
        Principal::Gateway(g) => Some(g.to_owned()),
        _ => None,
    }
}

fn close(conn: &quinn::Connection, code: CloseCode, reason: &str) {
    conn.close(code.code().into(), reason.as_bytes());
}

async fn session(hub: Arc<Hub>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let Some(id) = peer_gateway(&conn) else {
        close(&conn, CloseCode::NotListed, "not a gateway identity");
        return;
    };
    {
        let mut s = hub.lock();
        if !s.listed.contains(&id) {
            hub.metrics
                .refused
                .get_or_create(&crate::metrics::Reason {
                    reason: "not_listed",
                })
                .inc();
            if s.refused.len() < MAX_REMEMBERED_REFUSALS && s.refused.insert(id.clone()) {
                tracing::warn!(gateway = %id, %remote, "refusing a gateway not listed in the configuration (logged once per gateway)");
            }
            drop(s);
            close(
                &conn,
                CloseCode::NotListed,
                "gateway not listed in the domain configuration",
            );
            return;
        }
    }
    let hello_by = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let accepted = tokio::time::timeout_at(hello_by, conn.accept_bi()).await;
    let Ok(Ok((send, recv))) = accepted else {
        close(&conn, CloseCode::Timeout, "no session stream");
        return;
    };
    // The writer sends while the session keeps reading: a gateway writing a long report while
    // the control plane writes long routes never waits on a control plane waiting on it.
    let (out, queue) = mpsc::channel(MAX_QUEUED_FRAMES);
    let writer = tokio::spawn(writer(
        hub.clone(),
        id.clone(),
        send,
        queue,
        hub.routes.subscribe(),
    ));
    let mut s = Session {
        hub: hub.clone(),
        id: id.clone(),
        conn: conn.clone(),
        out,
        recv,
        buf: Vec::with_capacity(4096),
        nonce: 0,
        held: None,
        held_sections: Vec::new(),
        pending: None,
        session: 0,
        snapshot_retried: None,
    };
    let result = s.run(hello_by).await;
    let session_id = s.session;
    drop(s);
    writer.abort();
    match &result {
        Ok(()) => {}
        Err(End::Closed(code, reason)) => {
            tracing::warn!(gateway = %id, %remote, code = code.as_str(), %reason, "closing control session");
            hub.metrics
                .refused
                .get_or_create(&crate::metrics::Reason {
                    reason: code.as_str(),
                })
                .inc();
            close(&conn, *code, reason);
        }
        Err(End::Lost(e)) => {
            tracing::info!(gateway = %id, %remote, error = %e, "control session ended")
        }
    }
    // A gateway that closed with SHUTTING_DOWN is gone for good: its agents leave the routes
    // at once. Any other end keeps them for the grace period.
    let shutting_down = matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code.into_inner() == u64::from(CloseCode::ShuttingDown.code())
    );
    let mut st = hub.lock();
    let mut ended = false;
    if let Some(e) = st.gateways.get_mut(&id) {
        if e.session == Some(session_id) && session_id != 0 {
            e.session = None;
            e.conn = None;
            e.pending = None;
            hub.metrics.gateways_connected.dec();
            ended = true;
        }
    }
    if ended {
        if shutting_down {
            tracing::info!(gateway = %id, "gateway shutting down; its agents leave the routes");
            st.domain.remove(&id);
        } else {
            st.domain.session_ended(&id, Instant::now());
        }
    }
    drop(st);
    if ended {
        hub.routes_changed.notify_one();
    }
    hub.changed.notify_waiters();
}

/// The push a session waits for an answer to.
struct Pending {
    nonce: u64,
    generation: Generation,
    /// The table pushed; `None` for a confirmation (an empty delta of what the gateway holds).
    table: Option<Arc<Table>>,
    /// Whether it went as a delta.
    delta: bool,
    sent: Instant,
}

enum End {
    Closed(CloseCode, String),
    Lost(String),
}

/// Writes a session's frames: those the session queues, in order, and after the first of them
/// (the session's first push) the current routes, then each newer version of the routes as it
/// is published (only the newest, if several were published during a write).
async fn writer(
    hub: Arc<Hub>,
    id: String,
    mut send: quinn::SendStream,
    mut queue: mpsc::Receiver<Vec<u8>>,
    mut routes: watch::Receiver<Option<Arc<Published>>>,
) {
    let Some(first) = queue.recv().await else {
        return;
    };
    if send.write_all(&first).await.is_err() {
        return;
    }
    let mut next = routes.borrow_and_update().clone();
    loop {
        if let Some(r) = next.take() {
            tracing::debug!(gateway = %id, version = r.routes.version, bytes = r.frame.len(), "routes");
            hub.metrics.routes_pushes.inc();
            if send.write_all(&r.frame).await.is_err() {
                return;
            }
        }
        tokio::select! {
            biased;
            frame = queue.recv() => {
                let Some(frame) = frame else { return };
                if send.write_all(&frame).await.is_err() {
                    return;
                }
            }
            changed = routes.changed() => {
                if changed.is_err() {
                    return;
                }
                next = routes.borrow_and_update().clone();
            }
        }
    }
}

struct Session {
    hub: Arc<Hub>,
    id: String,
    conn: quinn::Connection,
    /// Frames for the writer task.
    out: mpsc::Sender<Vec<u8>>,
    recv: quinn::RecvStream,
    buf: Vec<u8>,
    nonce: u64,
    held: Option<Generation>,
    held_sections: Vec<(u64, SectionVersion)>,
    /// The push awaiting an answer.
    pending: Option<Pending>,
    session: u64,
    /// The generation last retried as a snapshot after its delta was refused.
    snapshot_retried: Option<Generation>,
}

impl Session {
    async fn next_frame(&mut self) -> Result<Frame<'static>, End> {
        loop {
            match ctl::decode_frame_within(&self.buf, ctl::MAX_FRAME_BYTES) {
                Err(e) => return Err(End::Closed(e.close_code(), e.to_string())),
                Ok(Some((frame, used))) => {
                    let frame = frame.into_owned().map_err(|_| {
                        End::Closed(CloseCode::UnexpectedFrame, "PUSH from a gateway".into())
                    })?;
                    self.buf.drain(..used);
                    return Ok(frame);
                }
                Ok(None) => {}
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.recv.read(&mut chunk).await {
                Ok(Some(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(None) => return Err(End::Lost("the gateway finished its stream".into())),
                Err(e) => return Err(End::Lost(e.to_string())),
            }
        }
    }

    async fn run(&mut self, hello_by: tokio::time::Instant) -> Result<(), End> {
        let hello = loop {
            match tokio::time::timeout_at(hello_by, self.next_frame()).await {
                Err(_) => return Err(End::Closed(CloseCode::Timeout, "no HELLO in time".into())),
                Ok(frame) => match frame? {
                    Frame::Hello(h) => break h,
                    // Extension frames are skipped in any state.
                    Frame::Unknown(_) => continue,
                    _ => {
                        return Err(End::Closed(
                            CloseCode::UnexpectedFrame,
                            "first frame is not HELLO".into(),
                        ))
                    }
                },
            }
        };
        if hello.version != ctl::VERSION {
            return Err(End::Closed(
                CloseCode::UnsupportedVersion,
                format!("version {}", hello.version),
            ));
        }
        if hello.domain != self.hub.domain {
            return Err(End::Closed(
                CloseCode::WrongDomain,
                format!("domain {:?}", hello.domain),
            ));
        }
        if hello.gateway_id != self.id {
            return Err(End::Closed(
                CloseCode::IdentityMismatch,
                format!(
                    "HELLO says {:?}, the certificate {:?}",
                    hello.gateway_id, self.id
                ),
            ));
        }
        self.held = hello.held;
        self.held_sections = hello.sections;
        self.register();
        tracing::info!(gateway = %self.id, addr = %self.conn.remote_address(), held = ?self.held.map(|g| g.to_string()), "gateway connected");
        let mut desired = self.hub.desired.subscribe();
        // The first push always goes, even when the gateway holds the current generation (then
        // as an empty delta): its acknowledgement tells the gateway it is in sync.
        let first = desired.borrow_and_update().clone();
        let rejected = self.rejected_generation() == Some(first.generation());
        match self.held {
            // It rejected the current generation before: confirm what it holds instead of
            // pushing the same table again.
            Some(held) if rejected => self.confirm(held).await?,
            _ => self.push(first, true).await?,
        }
        // The writer follows the first push with the current routes.
        loop {
            tokio::select! {
                frame = self.next_frame() => self.on_frame(frame?).await?,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    if self.pending.is_none() {
                        let table = desired.borrow_and_update().clone();
                        self.push(table, false).await?;
                    }
                }
            }
        }
    }

    fn register(&mut self) {
        let mut s = self.hub.lock();
        s.next_session += 1;
        self.session = s.next_session;
        let entry = s.gateways.entry(self.id.clone()).or_default();
        if let Some(old) = entry.conn.replace(self.conn.clone()) {
            tracing::warn!(
                gateway = %self.id,
                old = %old.remote_address(),
                new = %self.conn.remote_address(),
                "a second session for this gateway id replaces the first (two gateways with one id?)"
            );
            old.close(
                CloseCode::NoError.code().into(),
                b"replaced by a newer session",
            );
        } else {
            self.hub.metrics.gateways_connected.inc();
        }
        entry.session = Some(self.session);
        entry.addr = Some(self.conn.remote_address());
        entry.connected_since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        entry.sessions += 1;
        // Nothing is known held until the gateway acknowledges a push on this session.
        entry.acked = None;
        entry.pending = None;
        // Its earlier reports stay only if this session reports afresh in time.
        s.domain.session_started(&self.id, Instant::now());
        drop(s);
        self.hub.routes_changed.notify_one();
        self.hub.changed.notify_waiters();
    }

    fn update(&self, f: impl FnOnce(&mut GatewayEntry)) {
        let mut s = self.hub.lock();
        if let Some(e) = s
            .gateways
            .get_mut(&self.id)
            .filter(|e| e.session == Some(self.session))
        {
            f(e);
        }
        drop(s);
        self.hub.changed.notify_waiters();
    }

    fn rejected_generation(&self) -> Option<Generation> {
        let s = self.hub.lock();
        let rejected = s.gateways.get(&self.id)?.rejected.as_ref()?;
        let current = self.hub.current().generation();
        (rejected.generation == current.to_string()).then_some(current)
    }

    /// Pushes an empty delta of the generation the gateway holds: its acknowledgement confirms
    /// the gateway is in sync with what the control plane is willing to give it.
    async fn confirm(&mut self, held: Generation) -> Result<(), End> {
        let body = PushBody::Delta {
            base: held,
            upserts: Vec::new(),
            removes: Vec::new(),
        };
        let out = self.encode(held, body);
        self.send(out, held, None, true).await
    }

    /// Pushes `table` unless the gateway holds it (or rejected it) already; `always` pushes
    /// even then (the session's first push). A delta against what the gateway holds when that
    /// is smaller, else (or when nothing is known held) a snapshot.
    async fn push(&mut self, table: Arc<Table>, always: bool) -> Result<(), End> {
        let generation = table.generation();
        if !always {
            if self.held == Some(generation) {
                return Ok(());
            }
            let rejected = {
                let s = self.hub.lock();
                s.gateways.get(&self.id).and_then(|e| e.rejected.clone())
            };
            if rejected.is_some_and(|r| r.generation == generation.to_string()) {
                return Ok(());
            }
        }
        let (upserts, removes) = diff(&self.held_sections, &table);
        let delta_len: usize =
            upserts.iter().map(|s| s.body.len() + 12).sum::<usize>() + removes.len() * 8;
        let body = match self.held {
            Some(base) if delta_len < table.encoded().len() => PushBody::Delta {
                base,
                upserts,
                removes,
            },
            _ => PushBody::Snapshot(table.encoded()),
        };
        let delta = matches!(body, PushBody::Delta { .. });
        let out = self.encode(generation, body);
        self.send(out, generation, Some(table), delta).await
    }

    /// The next `PUSH` of this session, encoded.
    fn encode(&mut self, generation: Generation, body: PushBody<'_>) -> Vec<u8> {
        self.nonce += 1;
        let mut out = Vec::new();
        ctl::encode_frame(
            &Frame::Push(Push {
                nonce: self.nonce,
                generation,
                body,
            }),
            &mut out,
        );
        out
    }

    /// Sends the encoded push just made and records it as the one awaiting an answer.
    async fn send(
        &mut self,
        out: Vec<u8>,
        generation: Generation,
        table: Option<Arc<Table>>,
        delta: bool,
    ) -> Result<(), End> {
        let kind = if delta { "delta" } else { "snapshot" };
        self.hub
            .metrics
            .pushes
            .get_or_create(&crate::metrics::Kind { kind })
            .inc();
        tracing::debug!(gateway = %self.id, %generation, kind, bytes = out.len(), "push");
        self.pending = Some(Pending {
            nonce: self.nonce,
            generation,
            table,
            delta,
            sent: Instant::now(),
        });
        self.update(|e| e.pending = Some(generation));
        self.write(out).await
    }

    /// Queues encoded frames for the writer.
    async fn write(&self, frames: Vec<u8>) -> Result<(), End> {
        self.out
            .send(frames)
            .await
            .map_err(|_| End::Lost("the session's stream can no longer be written".into()))
    }

    /// Applies a `REPORT` and answers refused agents with `REPORT_REJECTED`.
    async fn on_report(&mut self, report: Report) -> Result<(), End> {
        self.hub.metrics.reports.inc();
        let applied = {
            let mut s = self.hub.lock();
            // A session replaced by a newer one reports no more.
            if s.gateways.get(&self.id).and_then(|e| e.session) != Some(self.session) {
                return Ok(());
            }
            s.domain.report(&self.id, report)
        };
        if applied.batch_ended {
            self.hub.routes_changed.notify_one();
        }
        if applied.rejected.is_empty() {
            return Ok(());
        }
        let mut out = Vec::new();
        for (over, rejected) in applied.rejected {
            self.hub
                .metrics
                .report_rejections
                .get_or_create(&crate::metrics::Reason {
                    reason: over.as_str(),
                })
                .inc();
            tracing::debug!(gateway = %self.id, session = rejected.session, reason = %rejected.reason, "reported agent refused");
            ctl::encode_frame(&Frame::ReportRejected(rejected), &mut out);
        }
        // Refusals only inform (they are counted here): while the writer is behind, new ones
        // are dropped rather than stopping this session from reading the gateway, which could
        // be blocked writing its reports while the writer waits for it to read the routes.
        match self.out.try_send(out) {
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(End::Lost(
                "the session's stream can no longer be written".into(),
            )),
        }
    }

    async fn on_frame(&mut self, frame: Frame<'static>) -> Result<(), End> {
        match frame {
            Frame::Status(status) => {
                self.update(|e| e.status = status);
                Ok(())
            }
            Frame::Report(report) => self.on_report(report).await,
            Frame::Trunks(trunks) => {
                self.update(|e| e.trunks = Some((trunks, Instant::now())));
                Ok(())
            }
            Frame::Routes(_) | Frame::ReportRejected(_) => Err(End::Closed(
                CloseCode::UnexpectedFrame,
                "ROUTES or REPORT_REJECTED from a gateway".into(),
            )),
            Frame::Unknown(_) => Ok(()),
            Frame::Ack { nonce, generation } => {
                let Pending { table, sent, .. } = self.answered(nonce, generation)?;
                let took = sent.elapsed();
                self.hub.metrics.acks.inc();
                self.held = Some(generation);
                // A confirmation (no table) says the gateway is in sync with what it holds; it
                // neither clears a rejection of the current generation nor times a push.
                let pushed = table.is_some();
                if let Some(table) = table {
                    self.held_sections = table.section_versions();
                    self.hub
                        .metrics
                        .push_ack_seconds
                        .observe(took.as_secs_f64());
                }
                self.update(|e| {
                    e.acked = Some(generation);
                    e.pending = None;
                    if pushed {
                        e.rejected = None;
                        e.last_ack_ms = Some(took.as_secs_f64() * 1e3);
                    }
                });
                tracing::debug!(gateway = %self.id, %generation, took_ms = took.as_secs_f64() * 1e3, "acknowledged");
                self.push_newest().await
            }
            Frame::Nack {
                nonce,
                generation,
                code,
                rejections,
            } => {
                let answered = self.answered(nonce, generation)?;
                self.hub
                    .metrics
                    .rejections
                    .get_or_create(&crate::metrics::Reason {
                        reason: code.as_str(),
                    })
                    .inc();
                let view = RejectedView {
                    generation: generation.to_string(),
                    code: code.as_str(),
                    reasons: rejections
                        .iter()
                        .map(|r| match r.resource {
                            0 => r.reason.clone(),
                            s => format!("section {s:#04x}: {}", r.reason),
                        })
                        .collect(),
                };
                // A delta the gateway could not turn into the announced table: our view of its
                // sections may be wrong; a snapshot settles it (once per generation).
                let stale_view = matches!(code, NackCode::GenerationMismatch | NackCode::Invalid)
                    && answered.delta
                    && self.snapshot_retried != Some(generation);
                if stale_view {
                    self.snapshot_retried = Some(generation);
                }
                if code == NackCode::BaseMismatch || stale_view {
                    // The gateway does not hold what it said (or what we thought): start over
                    // from a snapshot.
                    tracing::info!(gateway = %self.id, code = code.as_str(), "delta refused; sending a snapshot");
                    // Nothing known held: the next push is a snapshot.
                    self.held = None;
                    self.held_sections.clear();
                    self.update(|e| e.pending = None);
                    let table = self.hub.current();
                    return self.push(table, true).await;
                }
                tracing::warn!(gateway = %self.id, %generation, code = code.as_str(), reasons = ?view.reasons, "gateway rejected a push; it keeps its last good table");
                self.update(|e| {
                    e.pending = None;
                    e.rejected = Some(view);
                });
                self.push_newest().await
            }
            Frame::Hello(_) | Frame::Push(_) => Err(End::Closed(
                CloseCode::UnexpectedFrame,
                "HELLO after the session began".into(),
            )),
        }
    }

    fn answered(&mut self, nonce: u64, generation: Generation) -> Result<Pending, End> {
        match self.pending.take() {
            Some(p) if p.nonce == nonce && p.generation == generation => Ok(p),
            other => {
                self.pending = other;
                Err(End::Closed(
                    CloseCode::UnexpectedFrame,
                    format!("answer to push {nonce}, which is not the pending one"),
                ))
            }
        }
    }

    /// After an answer: pushes the newest generation if the gateway does not hold it (changes
    /// made while a push was pending are merged into this one).
    async fn push_newest(&mut self) -> Result<(), End> {
        let table = self.hub.current();
        self.push(table, false).await
    }
}
