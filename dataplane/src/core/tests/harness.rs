//! A deterministic harness: several [`Core`]s and in-memory QUIC agents, driven with a virtual
//! clock until nothing is left to do (after quinn-proto's test `Pair`).
//!
//! The network is a FIFO queue of datagrams between virtual addresses on 127.0.0.0/8; nothing
//! touches a socket. Datagrams to the shared listen address are steered to core
//! `source port % cores` (standing in for the kernel's `SO_REUSEPORT` hash), datagrams to a
//! worker's lane address go to that worker. Messages between cores are queued in unbounded
//! inboxes (the harness plays the channels) unless a core is paused.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hashbrown::HashMap;
use quinn_proto::{
    ClientConfig, ConnectionHandle, DatagramEvent, Dir, Endpoint, EndpointConfig, Event, ReadError,
    ServerConfig, StreamEvent, StreamId, TransportConfig, VarInt,
};

use dmsc_identity::{
    CertificateAuthority, Credentials, PrincipalKind, Resumption, SpiffeId, SpiffeVerifier,
};
use dmsc_protocol::card::{AgentCard, Skill};
use dmsc_protocol::control::{ControlFrame, FrameBuffer, LaneToken, SessionId};
use dmsc_protocol::header::{RequestHeader, ResponseHeader};
use dmsc_protocol::Status;

use crate::config::Config;
use crate::core::{Core, Random, Shared, SocketCaps};
use crate::msg::WorkerMsg;
use crate::routing::{TableGeneration, WorkerId};
use crate::stats::WorkerStats;

use super::alloc::counted;

const DOMAIN: &str = "harness.test";
/// Iterations of `run` before the harness gives up on reaching quiet (a livelock).
const MAX_ROUNDS: usize = 200_000;

/// A deterministic generator for lane tokens and selection seeds.
struct SeededRandom(u64);

impl Random for SeededRandom {
    fn fill(&mut self, buf: &mut [u8]) -> bool {
        for b in buf {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (self.0 >> 56) as u8;
        }
        true
    }
}

pub(super) struct Node {
    pub(super) core: Core,
    pub(super) inbox: VecDeque<WorkerMsg>,
    listen: SocketAddr,
    lane: SocketAddr,
    /// A paused core takes no input and produces nothing (a stalled worker thread).
    pub(super) paused: bool,
    /// The core finished draining: its thread would have ended.
    pub(super) stopped: bool,
}

struct Datagram {
    from: SocketAddr,
    to: SocketAddr,
    data: Vec<u8>,
}

/// How a test agent answers the requests the gateway forwards to it. The mode in force when a
/// request arrives decides what the agent does with it; for [`Serve::Echo`] and
/// [`Serve::Hold`], the mode in force when the request is complete does (so switching a holding
/// agent to `Echo` answers what it holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Serve {
    /// Reads the whole request, answers OK with the payload.
    Echo,
    /// Answers OK with this many bytes, without waiting for the request body.
    Bytes(usize),
    /// Reads nothing and answers nothing.
    Ignore,
    /// Reads the request and answers nothing (a target that is slow to answer).
    Hold,
    /// Fails before answering: resets its response and stops the request, both with this
    /// stream code, without reading anything.
    Reset(u64),
    /// Reads the request and ends its response (FIN) without writing a byte.
    Finish,
    /// Answers an OK header and this many payload bytes at once and leaves the response open,
    /// without reading the request; end it with [`Harness::reset_response`] (a target that
    /// fails mid-answer).
    Begin(usize),
}

/// An invocation made by a test agent.
#[derive(Debug, Default)]
pub(super) struct Call {
    conn: Option<ConnectionHandle>,
    stream: Option<StreamId>,
    pub(super) response: Vec<u8>,
    pub(super) finished: bool,
    /// The `RESET_STREAM` code the answer ended with (`u64::MAX`: the connection was lost).
    pub(super) reset: Option<u64>,
    /// The `STOP_SENDING` code the gateway sent for the request.
    pub(super) stopped: Option<u64>,
}

impl Call {
    /// Whether the request went out (the agent had a connection and stream credit).
    pub(super) fn was_sent(&self) -> bool {
        self.stream.is_some()
    }

    /// The answer's status, once its header is complete.
    pub(super) fn status(&self) -> Option<Status> {
        ResponseHeader::decode(&self.response, 16 * 1024)
            .ok()
            .flatten()
            .map(|(h, _)| h.status)
    }

    /// The answer's payload (after the header).
    pub(super) fn payload(&self) -> &[u8] {
        match ResponseHeader::decode(&self.response, 16 * 1024) {
            Ok(Some((_, used))) => &self.response[used..],
            _ => &[],
        }
    }
}

/// A request the gateway forwarded to a test agent: a stream the gateway opened to it.
#[derive(Debug, Default)]
pub(super) struct Incoming {
    /// The request bytes read so far, header included (the agent reads only in the modes that
    /// say so).
    pub(super) request: Vec<u8>,
    /// The request ended (FIN) and all of it was read.
    pub(super) fin: bool,
    /// The `RESET_STREAM` code the request was reset with.
    pub(super) reset: Option<u64>,
    /// The `STOP_SENDING` code the gateway sent for the response.
    pub(super) stopped: Option<u64>,
    /// The agent answered, or ended or reset its response.
    answered: bool,
}

impl Incoming {
    /// The request header as the gateway forwarded it, once it was read.
    pub(super) fn header(&self) -> Option<RequestHeader<'_>> {
        RequestHeader::decode(&self.request, 16 * 1024)
            .ok()
            .flatten()
            .map(|(h, _)| h)
    }
}

/// An invocation a test agent makes ([`Harness::invoke_with`]): the request header's fields
/// that tests vary, and how the request is written.
#[derive(Debug, Clone)]
pub(super) struct Invocation<'a> {
    pub(super) capability: &'a str,
    pub(super) payload: &'a [u8],
    /// Sent on the agent's lane to this worker; on its primary connection when `None`.
    pub(super) lane: Option<usize>,
    /// The request header's `deadline_ms` (0: the gateway's default).
    pub(super) deadline_ms: u64,
    /// The request (header and payload) is written this many bytes per round, so that it
    /// arrives in that many packets.
    pub(super) piece: usize,
    /// The request ends (FIN) after the payload; when false the caller is still sending.
    pub(super) fin: bool,
    /// The request header's `on_behalf_of` (a bridge acting for this identity).
    pub(super) on_behalf_of: &'a str,
}

impl<'a> Invocation<'a> {
    /// A complete request for `capability` with `payload`, on the primary connection, in one
    /// piece, with the gateway's default deadline.
    pub(super) fn new(capability: &'a str, payload: &'a [u8]) -> Self {
        Self {
            capability,
            payload,
            lane: None,
            deadline_ms: 0,
            piece: usize::MAX,
            fin: true,
            on_behalf_of: "",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Primary,
    Lane,
}

#[derive(Debug, Clone, Copy)]
enum StreamRole {
    /// An invocation the agent made: an index into [`TestAgent::calls`].
    Call(usize),
    /// A request forwarded to the agent: an index into [`TestAgent::incoming`].
    Serve(usize),
}

struct ClientConn {
    quic: quinn_proto::Connection,
    kind: Kind,
    control: Option<StreamId>,
    ctl_in: FrameBuffer,
    streams: HashMap<StreamId, StreamRole>,
    /// Pieces and fin still to write, per stream; one piece is written per round.
    pending: HashMap<StreamId, (VecDeque<Vec<u8>>, bool)>,
}

pub(super) struct TestAgent {
    pub(super) addr: SocketAddr,
    endpoint: Endpoint,
    client: ClientConfig,
    conns: HashMap<ConnectionHandle, ClientConn>,
    card: Vec<u8>,
    /// Control frames written right behind `ATTACH`, in the same write (pipelined).
    after_attach: Vec<u8>,
    pub(super) serve: Serve,
    /// The `max_concurrent` the agent sends in its `ATTACH` (0: the gateway's default). Set it
    /// before the first [`Harness::run`] after [`Harness::agent`].
    pub(super) max_concurrent: u64,
    /// Whether the agent reads its control stream.
    pub(super) read_control: bool,
    /// Whether the agent reads the answers to its calls.
    pub(super) read_responses: bool,
    /// A dead agent sends and receives nothing.
    pub(super) dead: bool,
    pub(super) session: Option<(SessionId, LaneToken)>,
    lane_addrs: Vec<String>,
    pub(super) frames: Vec<ControlFrame>,
    pub(super) calls: Vec<Call>,
    /// The requests the gateway forwarded to the agent, in the order they arrived.
    pub(super) incoming: Vec<Incoming>,
    /// Requests answered with a response header so far.
    pub(super) served: usize,
    /// Connection-close codes received from the gateway.
    pub(super) closed: Vec<u64>,
}

pub(super) struct Harness {
    pub(super) now: Instant,
    pub(super) nodes: Vec<Node>,
    pub(super) agents: Vec<TestAgent>,
    net: VecDeque<Datagram>,
    ca: CertificateAuthority,
    pub(super) shared: Arc<Shared>,
    /// Datagrams delivered so far.
    pub(super) delivered: usize,
    /// Cross-core messages delivered so far.
    pub(super) messages: usize,
    /// Single datagrams the gateway sent that were under 64 bytes (room for a short header, an
    /// ACK frame and the AEAD tag, not for a payload).
    pub(super) small_sent: usize,
}

impl Harness {
    /// `workers` cores under `config` (its worker count is overridden).
    pub(super) fn new(workers: usize, mut config: Config) -> Self {
        config.workers = workers;
        config.domain = DOMAIN.into();
        config.validate().expect("harness config is valid");
        let ca = CertificateAuthority::generate(DOMAIN).expect("dev CA");
        let gw = ca
            .issue(&SpiffeId::gateway(DOMAIN, "gw1").unwrap(), &["localhost"])
            .expect("gateway identity");
        let (crypto, _verifier) = crate::tls::server_crypto(
            gw.cert_chain(),
            gw.private_key(),
            vec![ca.cert_der()],
            DOMAIN,
        )
        .expect("server crypto");
        let mut server = ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(crate::gateway::transport(&config)));
        server.migration(false);
        let server = Arc::new(server);
        let lane_addrs = (0..workers)
            .map(|w| addr(1, 5000 + w as u16).to_string())
            .collect();
        let shared = Arc::new(Shared::new(config, lane_addrs));
        let now = Instant::now();
        let nodes = (0..workers)
            .map(|w| {
                let endpoint = Endpoint::new(
                    Arc::new(EndpointConfig::default()),
                    Some(server.clone()),
                    true,
                    None,
                );
                let caps = vec![
                    SocketCaps {
                        max_gso_segments: 1
                    };
                    2
                ];
                Node {
                    core: Core::new(
                        WorkerId(w as u16),
                        shared.clone(),
                        endpoint,
                        server.clone(),
                        caps,
                        TableGeneration::standalone(),
                        Box::new(SeededRandom(w as u64 + 1)),
                        now,
                    ),
                    inbox: VecDeque::new(),
                    listen: addr(1, 4433),
                    lane: addr(1, 5000 + w as u16),
                    paused: false,
                    stopped: false,
                }
            })
            .collect();
        Self {
            now,
            nodes,
            agents: Vec::new(),
            net: VecDeque::new(),
            ca,
            shared,
            delivered: 0,
            messages: 0,
            small_sent: 0,
        }
    }

    /// Counters of worker `w`.
    pub(super) fn stats(&self, w: usize) -> &WorkerStats {
        &self.shared.stats[w]
    }

    /// Adds an agent named `name` offering `capabilities`, whose primary connection lands on
    /// worker `home`; it connects and attaches (call [`Harness::run`] to let it).
    pub(super) fn agent(&mut self, name: &str, capabilities: &[&str], home: usize) -> usize {
        self.agent_with(name, capabilities, home, TransportConfig::default())
    }

    /// As [`Harness::agent`], with the agent's own QUIC transport settings.
    pub(super) fn agent_with(
        &mut self,
        name: &str,
        capabilities: &[&str],
        home: usize,
        transport: TransportConfig,
    ) -> usize {
        let mut card = AgentCard::new(name, "test agent", "1.0.0");
        for c in capabilities {
            card = card.with_skill(Skill::new(*c, *c));
        }
        self.agent_with_card(name, card, home, transport)
    }

    /// An agent named `name` attaching with `card`.
    pub(super) fn agent_with_card(
        &mut self,
        name: &str,
        card: AgentCard,
        home: usize,
        transport: TransportConfig,
    ) -> usize {
        let n = self.agents.len();
        let workers = self.nodes.len() as u16;
        // A source port that the steering sends to `home`.
        let port = 20_000 + (n as u16) * workers;
        let port = port - port % workers + home as u16;
        let identity = self
            .ca
            .issue(&SpiffeId::agent(DOMAIN, name).unwrap(), &[])
            .expect("agent identity");
        let verifier =
            SpiffeVerifier::new(&[self.ca.cert_der()], &[PrincipalKind::Gateway], &[DOMAIN])
                .expect("gateway verifier");
        let credentials = Credentials {
            cert_chain: identity.cert_chain(),
            private_key: identity.private_key(),
        };
        let crypto = dmsc_identity::client_config(
            dmsc_protocol::ALPN_AGENT,
            credentials,
            Arc::new(verifier),
            Resumption::Off,
        )
        .expect("client crypto");
        let mut client = ClientConfig::new(Arc::new(crypto));
        client.transport_config(Arc::new(transport));
        let mut agent = TestAgent {
            addr: addr(2, port),
            endpoint: Endpoint::new(Arc::new(EndpointConfig::default()), None, true, None),
            client,
            conns: HashMap::new(),
            card: card.to_json(),
            after_attach: Vec::new(),
            serve: Serve::Echo,
            max_concurrent: 0,
            read_control: true,
            read_responses: true,
            dead: false,
            session: None,
            lane_addrs: Vec::new(),
            frames: Vec::new(),
            calls: Vec::new(),
            incoming: Vec::new(),
            served: 0,
            closed: Vec::new(),
        };
        let listen = self.nodes[0].listen;
        agent.connect(self.now, listen, Kind::Primary);
        self.agents.push(agent);
        n
    }

    /// Opens lanes from agent `a` to every worker (after it attached).
    pub(super) fn open_lanes(&mut self, a: usize) {
        let lanes: Vec<SocketAddr> = self.agents[a]
            .lane_addrs
            .iter()
            .filter_map(|l| l.parse().ok())
            .collect();
        for lane in lanes {
            self.agents[a].connect(self.now, lane, Kind::Lane);
        }
    }

    /// Agent `a` invokes `capability` with `payload` on its primary connection.
    pub(super) fn invoke(&mut self, a: usize, capability: &str, payload: &[u8]) -> usize {
        self.invoke_on(a, None, capability, payload)
    }

    /// Agent `a` invokes `capability`, on its lane to `worker` when given.
    pub(super) fn invoke_on(
        &mut self,
        a: usize,
        worker: Option<usize>,
        capability: &str,
        payload: &[u8],
    ) -> usize {
        self.invoke_in_pieces(a, worker, capability, payload, usize::MAX)
    }

    /// Agent `a` invokes `capability`, writing the request `piece` bytes per round, so that it
    /// arrives in that many packets.
    pub(super) fn invoke_in_pieces(
        &mut self,
        a: usize,
        worker: Option<usize>,
        capability: &str,
        payload: &[u8],
        piece: usize,
    ) -> usize {
        let request = Invocation {
            lane: worker,
            piece,
            ..Invocation::new(capability, payload)
        };
        self.invoke_with(a, &request)
    }

    /// Agent `a` makes the invocation `request`; returns its index in the agent's calls. The
    /// call stays empty if the agent has no such connection or no stream credit.
    pub(super) fn invoke_with(&mut self, a: usize, request: &Invocation<'_>) -> usize {
        let lane = request.lane.map(|w| self.nodes[w].lane);
        let agent = &mut self.agents[a];
        let mut bytes = Vec::new();
        RequestHeader {
            deadline_ms: request.deadline_ms,
            on_behalf_of: request.on_behalf_of,
            ..RequestHeader::new(request.capability)
        }
        .encode(&mut bytes)
        .unwrap();
        bytes.extend_from_slice(request.payload);
        let bytes: VecDeque<Vec<u8>> = bytes
            .chunks(request.piece.max(1))
            .map(<[u8]>::to_vec)
            .collect();
        let id = agent.calls.len();
        agent.calls.push(Call::default());
        let ch = agent.conns.iter().find_map(|(&ch, c)| {
            let want = match lane {
                None => c.kind == Kind::Primary,
                Some(l) => c.kind == Kind::Lane && c.quic.remote_address() == l,
            };
            want.then_some(ch)
        });
        let Some(ch) = ch else {
            return id;
        };
        let conn = agent.conns.get_mut(&ch).unwrap();
        let Some(stream) = conn.quic.streams().open(Dir::Bi) else {
            return id;
        };
        conn.streams.insert(stream, StreamRole::Call(id));
        conn.pending.insert(stream, (bytes, request.fin));
        agent.calls[id].conn = Some(ch);
        agent.calls[id].stream = Some(stream);
        id
    }

    /// Agent `a` sends `frame` on its primary connection's control stream.
    pub(super) fn send_control(&mut self, a: usize, frame: &ControlFrame) {
        let agent = &mut self.agents[a];
        let mut bytes = Vec::new();
        frame.encode(&mut bytes).unwrap();
        agent.write_control(Kind::Primary, bytes);
    }

    /// Agent `a` pipelines `n` `DISCOVER`s for everything (query ids 0 to `n - 1`).
    pub(super) fn send_discovers(&mut self, a: usize, n: u64) {
        for query_id in 0..n {
            let frame = ControlFrame::Discover {
                query_id,
                prefix: String::new(),
                tag: String::new(),
                on_behalf_of: String::new(),
            };
            self.send_control(a, &frame);
        }
    }

    /// Agent `a` closes all its connections (as an agent that exits does). Its own calls still
    /// open end as lost (`reset` = `u64::MAX`): QUIC reports no loss for a close of one's own.
    pub(super) fn close(&mut self, a: usize) {
        let now = self.now;
        let agent = &mut self.agents[a];
        for c in agent.conns.values_mut() {
            c.quic.close(now, VarInt::from_u32(0), bytes::Bytes::new());
            for role in c.streams.values() {
                if let StreamRole::Call(id) = *role {
                    let call = &mut agent.calls[id];
                    if !call.finished {
                        call.finished = true;
                        call.reset = Some(u64::MAX);
                    }
                }
            }
        }
    }

    /// Agent `a` resets its response to its `i`th incoming request with `code` (a target that
    /// fails mid-answer, after [`Serve::Begin`]).
    pub(super) fn reset_response(&mut self, a: usize, i: usize, code: u64) {
        let agent = &mut self.agents[a];
        for c in agent.conns.values_mut() {
            let found = c
                .streams
                .iter()
                .find_map(|(&s, &r)| matches!(r, StreamRole::Serve(j) if j == i).then_some(s));
            if let Some(stream) = found {
                c.pending.remove(&stream);
                let _ = c
                    .quic
                    .send_stream(stream)
                    .reset(VarInt::from_u64(code).unwrap());
                agent.incoming[i].answered = true;
                return;
            }
        }
        panic!("agent {a} has no open incoming request {i}");
    }

    /// Delivers everything and lets every core and agent act until nothing is left to do at
    /// the current time.
    pub(super) fn run(&mut self) {
        for _ in 0..MAX_ROUNDS {
            if !self.step() {
                return;
            }
        }
        panic!("the harness did not reach quiet: a livelock");
    }

    /// Advances the virtual clock by `by`, firing timers as they come due.
    pub(super) fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            self.run();
            let next = self.next_timeout();
            match next {
                Some(t) if t <= end => self.now = self.now.max(t),
                _ => {
                    self.now = end;
                    self.run();
                    return;
                }
            }
        }
    }

    /// Runs until `done` holds, advancing time in small steps, for at most `limit`.
    pub(super) fn run_until(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Harness) -> bool,
    ) -> bool {
        let end = self.now + limit;
        self.run();
        while !done(self) {
            if self.now >= end {
                return false;
            }
            self.advance(Duration::from_millis(5));
        }
        true
    }

    fn next_timeout(&mut self) -> Option<Instant> {
        let cores = self
            .nodes
            .iter()
            .filter(|n| !n.paused && !n.stopped)
            .filter_map(|n| n.core.poll_timeout());
        let agents = self
            .agents
            .iter_mut()
            .filter(|a| !a.dead)
            .flat_map(|a| a.conns.values_mut().filter_map(|c| c.quic.poll_timeout()));
        cores.chain(agents).min()
    }

    /// One round over the network, the cores and the agents; true if anything happened.
    pub(super) fn step(&mut self) -> bool {
        let now = self.now;
        let mut progress = false;
        let mut later = VecDeque::new();
        while let Some(d) = self.net.pop_front() {
            if let Some(w) = self.node_for(d.from, d.to) {
                if self.nodes[w].stopped {
                    continue;
                }
                if self.nodes[w].paused {
                    later.push_back(d);
                    continue;
                }
                let socket = usize::from(d.to == self.nodes[w].lane);
                let data = BytesMut::from(&d.data[..]);
                let core = &mut self.nodes[w].core;
                counted(|| core.handle_datagram(now, socket, d.from, Some(d.to.ip()), None, data));
            } else if let Some(a) = self.agents.iter_mut().find(|a| a.addr == d.to) {
                if !a.dead {
                    a.receive(now, d.from, d.data);
                }
            }
            self.delivered += 1;
            progress = true;
        }
        self.net = later;
        let mut buf = Vec::new();
        for w in 0..self.nodes.len() {
            if self.nodes[w].paused || self.nodes[w].stopped {
                continue;
            }
            while let Some(msg) = self.nodes[w].inbox.pop_front() {
                let core = &mut self.nodes[w].core;
                counted(|| core.handle_message(now, msg));
                self.messages += 1;
                progress = true;
            }
            let node = &mut self.nodes[w];
            counted(|| node.core.handle_timeout(now));
            while let Some(t) = counted(|| node.core.poll_transmit(now, &mut buf, |_| true)) {
                if t.segment_size.is_none() && t.size < 64 {
                    self.small_sent += 1;
                }
                let from = if t.socket == 1 {
                    node.lane
                } else {
                    node.listen
                };
                self.net.push_back(Datagram {
                    from,
                    to: t.destination,
                    data: buf[..t.size].to_vec(),
                });
                progress = true;
            }
            for to in 0..self.nodes.len() {
                let dest = WorkerId(to as u16);
                while let Some(msg) = counted(|| self.nodes[w].core.poll_message(dest)) {
                    self.nodes[to].inbox.push_back(msg);
                    progress = true;
                }
            }
            let node = &mut self.nodes[w];
            node.stopped = counted(|| node.core.end_iteration(now));
            if node.core.poll_timeout().is_some_and(|t| t <= now) {
                progress = true;
            }
        }
        for a in &mut self.agents {
            if a.dead {
                continue;
            }
            progress |= a.act(now, &mut self.net);
        }
        progress
    }

    /// Agent `who` asks `DISCOVER` (query `query_id`, filters `prefix` and `tag`, on behalf of
    /// `on_behalf_of` or itself when empty); the entries of the answer to that query.
    pub(super) fn discover(
        &mut self,
        who: usize,
        query_id: u64,
        prefix: &str,
        tag: &str,
        on_behalf_of: &str,
    ) -> Vec<dmsc_protocol::control::DiscoveryEntry> {
        let frame = ControlFrame::Discover {
            query_id,
            prefix: prefix.into(),
            tag: tag.into(),
            on_behalf_of: on_behalf_of.into(),
        };
        self.send_control(who, &frame);
        self.run();
        self.agents[who]
            .frames
            .iter()
            .find_map(|f| match f {
                ControlFrame::DiscoverResult {
                    query_id: q,
                    entries,
                    ..
                } if *q == query_id => Some(entries.clone()),
                _ => None,
            })
            .expect("an answer")
    }

    /// The core a datagram goes to: by source port for the shared listen address (the
    /// `SO_REUSEPORT` hash), by address for a lane.
    fn node_for(&self, from: SocketAddr, to: SocketAddr) -> Option<usize> {
        if to == self.nodes[0].listen {
            return Some(usize::from(from.port()) % self.nodes.len());
        }
        self.nodes.iter().position(|node| node.lane == to)
    }
}

impl TestAgent {
    /// `DISCOVER_RESULT`s received so far.
    pub(super) fn discover_answers(&self) -> usize {
        self.frames
            .iter()
            .filter(|f| matches!(f, ControlFrame::DiscoverResult { .. }))
            .count()
    }

    /// Pipelines `frame` right behind the `ATTACH` this agent sends when it connects.
    pub(super) fn queue_after_attach(&mut self, frame: &ControlFrame) {
        frame.encode(&mut self.after_attach).unwrap();
    }

    fn connect(&mut self, now: Instant, remote: SocketAddr, kind: Kind) {
        let (ch, quic) = self
            .endpoint
            .connect(now, self.client.clone(), remote, "localhost")
            .expect("connect");
        self.conns.insert(
            ch,
            ClientConn {
                quic,
                kind,
                control: None,
                ctl_in: FrameBuffer::new(dmsc_protocol::limits::MAX_CONTROL_FRAME_BYTES),
                streams: HashMap::new(),
                pending: HashMap::new(),
            },
        );
    }

    fn write_control(&mut self, kind: Kind, bytes: Vec<u8>) {
        let Some(conn) = self.conns.values_mut().find(|c| c.kind == kind) else {
            return;
        };
        let Some(control) = conn.control else {
            return;
        };
        let entry = conn.pending.entry(control).or_default();
        entry.0.push_back(bytes);
    }

    fn receive(&mut self, now: Instant, from: SocketAddr, data: Vec<u8>) {
        let mut buf = Vec::new();
        match self
            .endpoint
            .handle(now, from, None, None, BytesMut::from(&data[..]), &mut buf)
        {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(c) = self.conns.get_mut(&ch) {
                    c.quic.handle_event(ev);
                }
            }
            Some(DatagramEvent::Response(_)) | Some(DatagramEvent::NewConnection(_)) | None => {}
        }
    }

    /// Handles events, plays the agent's part, queues transmits; true if anything happened.
    fn act(&mut self, now: Instant, net: &mut VecDeque<Datagram>) -> bool {
        let mut progress = false;
        let handles: Vec<ConnectionHandle> = self.conns.keys().copied().collect();
        for ch in handles {
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            if c.quic.poll_timeout().is_some_and(|t| t <= now) {
                c.quic.handle_timeout(now);
            }
            while let Some(ev) = c.quic.poll_endpoint_events() {
                if let Some(back) = self.endpoint.handle_event(ch, ev) {
                    c.quic.handle_event(back);
                }
            }
            let mut events = Vec::new();
            while let Some(ev) = c.quic.poll() {
                events.push(ev);
            }
            for ev in events {
                progress = true;
                self.on_event(ch, ev);
            }
            progress |= self.pump(ch);
            let Some(c) = self.conns.get_mut(&ch) else {
                continue;
            };
            let mut buf = Vec::new();
            while let Some(t) = c.quic.poll_transmit(now, 1, &mut buf) {
                net.push_back(Datagram {
                    from: self.addr,
                    to: t.destination,
                    data: buf[..t.size].to_vec(),
                });
                buf.clear();
                progress = true;
            }
            if c.quic.is_drained() {
                self.conns.remove(&ch);
            }
        }
        progress
    }

    fn on_event(&mut self, ch: ConnectionHandle, ev: Event) {
        let session = self.session;
        let card = self.card.clone();
        let max_concurrent = self.max_concurrent;
        let Some(c) = self.conns.get_mut(&ch) else {
            return;
        };
        match ev {
            Event::Connected => {
                let Some(stream) = c.quic.streams().open(Dir::Bi) else {
                    return;
                };
                c.control = Some(stream);
                let frame = match (c.kind, session) {
                    (Kind::Lane, Some((session, lane_token))) => ControlFrame::Lane {
                        session,
                        lane_token,
                    },
                    _ => ControlFrame::Attach {
                        max_concurrent,
                        card,
                    },
                };
                let mut bytes = Vec::new();
                frame.encode(&mut bytes).unwrap();
                if c.kind == Kind::Primary {
                    bytes.append(&mut self.after_attach);
                }
                c.pending.insert(stream, (VecDeque::from([bytes]), false));
            }
            Event::ConnectionLost { reason } => {
                if let quinn_proto::ConnectionError::ApplicationClosed(close) = reason {
                    self.closed.push(close.error_code.into_inner());
                }
                for (_, role) in c.streams.drain() {
                    if let StreamRole::Call(id) = role {
                        self.calls[id].finished = true;
                        self.calls[id].reset.get_or_insert(u64::MAX);
                    }
                }
            }
            Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                while let Some(id) = c.quic.streams().accept(Dir::Bi) {
                    let i = self.incoming.len();
                    let mut incoming = Incoming::default();
                    c.streams.insert(id, StreamRole::Serve(i));
                    // The answers that do not wait for the request.
                    let answer = |n: usize| {
                        let mut out = Vec::new();
                        ok_header(&mut out);
                        out.resize(out.len() + n, b'x');
                        VecDeque::from([out])
                    };
                    match self.serve {
                        Serve::Bytes(n) => {
                            c.pending.insert(id, (answer(n), true));
                            incoming.answered = true;
                            self.served += 1;
                        }
                        Serve::Begin(n) => {
                            c.pending.insert(id, (answer(n), false));
                            incoming.answered = true;
                            self.served += 1;
                        }
                        Serve::Reset(code) => {
                            let code = VarInt::from_u64(code).unwrap();
                            let _ = c.quic.send_stream(id).reset(code);
                            let _ = c.quic.recv_stream(id).stop(code);
                            incoming.answered = true;
                        }
                        Serve::Finish => {
                            let _ = c.quic.send_stream(id).finish();
                            incoming.answered = true;
                        }
                        Serve::Echo | Serve::Hold | Serve::Ignore => {}
                    }
                    self.incoming.push(incoming);
                }
            }
            Event::Stream(StreamEvent::Stopped { id, error_code }) => {
                // RFC 9000 3.5: answered with a RESET_STREAM carrying the same code.
                let _ = c.quic.send_stream(id).reset(error_code);
                c.pending.remove(&id);
                let code = Some(error_code.into_inner());
                match c.streams.get(&id) {
                    Some(&StreamRole::Call(i)) => self.calls[i].stopped = code,
                    Some(&StreamRole::Serve(i)) => {
                        self.incoming[i].stopped = code;
                        self.incoming[i].answered = true;
                    }
                    None => {}
                }
            }
            _ => {}
        }
    }

    /// Reads what can be read and writes what waits on connection `ch`.
    fn pump(&mut self, ch: ConnectionHandle) -> bool {
        let Some(c) = self.conns.get_mut(&ch) else {
            return false;
        };
        let mut progress = false;
        // Control stream.
        if let (Some(control), true) = (c.control, self.read_control) {
            let mut recv = c.quic.recv_stream(control);
            let read = recv.read(true);
            if let Ok(mut chunks) = read {
                while let Ok(Some(chunk)) = chunks.next(usize::MAX) {
                    c.ctl_in.extend(&chunk.bytes);
                    progress = true;
                }
                let _ = chunks.finalize();
            }
            while let Ok(Some(frame)) = c.ctl_in.next_frame() {
                match &frame {
                    ControlFrame::AttachOk {
                        session,
                        lane_token,
                        lanes,
                        ..
                    } => {
                        self.session = Some((*session, *lane_token));
                        self.lane_addrs = lanes.clone();
                    }
                    ControlFrame::Drain { .. } | ControlFrame::Detached => {}
                    _ => {}
                }
                self.frames.push(frame);
            }
        }
        // Streams.
        let streams: Vec<(StreamId, StreamRole)> =
            c.streams.iter().map(|(&s, &r)| (s, r)).collect();
        for (stream, role) in streams {
            match role {
                StreamRole::Call(id) if self.read_responses => {
                    let call = &mut self.calls[id];
                    let end = read_stream(&mut c.quic, stream, &mut call.response, &mut progress);
                    match end {
                        StreamEnd::Open => {}
                        StreamEnd::Finished => call.finished = true,
                        StreamEnd::Reset(code) => {
                            call.finished = true;
                            call.reset = Some(code);
                        }
                    }
                }
                StreamRole::Call(_) => {}
                StreamRole::Serve(i) => {
                    let reads = matches!(self.serve, Serve::Echo | Serve::Hold | Serve::Finish);
                    let incoming = &mut self.incoming[i];
                    if reads && !incoming.fin && incoming.reset.is_none() {
                        let into = &mut incoming.request;
                        match read_stream(&mut c.quic, stream, into, &mut progress) {
                            StreamEnd::Open => {}
                            StreamEnd::Finished => incoming.fin = true,
                            StreamEnd::Reset(code) => incoming.reset = Some(code),
                        }
                    }
                    if self.serve == Serve::Echo && incoming.fin && !incoming.answered {
                        let payload = match RequestHeader::decode(&incoming.request, 16 * 1024) {
                            Ok(Some((_, used))) => &incoming.request[used..],
                            _ => &[],
                        };
                        let mut out = Vec::new();
                        ok_header(&mut out);
                        out.extend_from_slice(payload);
                        c.pending.insert(stream, (VecDeque::from([out]), true));
                        incoming.answered = true;
                        self.served += 1;
                        progress = true;
                    }
                }
            }
        }
        // Writes.
        let waiting: Vec<StreamId> = c.pending.keys().copied().collect();
        for stream in waiting {
            let Some((pieces, fin)) = c.pending.get_mut(&stream) else {
                continue;
            };
            let mut send = c.quic.send_stream(stream);
            if let Some(piece) = pieces.front_mut() {
                match send.write(piece) {
                    Ok(n) => {
                        piece.drain(..n);
                        progress |= n > 0;
                        if piece.is_empty() {
                            pieces.pop_front();
                            progress = true;
                        }
                    }
                    Err(quinn_proto::WriteError::Blocked) => continue,
                    Err(_) => {
                        c.pending.remove(&stream);
                        continue;
                    }
                }
            }
            if pieces.is_empty() {
                if *fin {
                    let _ = send.finish();
                }
                c.pending.remove(&stream);
            }
        }
        progress
    }
}

/// How a read of a stream left it.
enum StreamEnd {
    /// More may come.
    Open,
    /// The peer finished it.
    Finished,
    /// The peer reset it with this code.
    Reset(u64),
}

/// Reads what `stream` holds into `into`; `progress` is set if anything happened.
fn read_stream(
    quic: &mut quinn_proto::Connection,
    stream: StreamId,
    into: &mut Vec<u8>,
    progress: &mut bool,
) -> StreamEnd {
    let mut recv = quic.recv_stream(stream);
    let Ok(mut chunks) = recv.read(true) else {
        return StreamEnd::Open;
    };
    let end = loop {
        match chunks.next(usize::MAX) {
            Ok(Some(chunk)) => {
                into.extend_from_slice(&chunk.bytes);
                *progress = true;
            }
            Ok(None) => {
                *progress = true;
                break StreamEnd::Finished;
            }
            Err(ReadError::Reset(code)) => {
                *progress = true;
                break StreamEnd::Reset(code.into_inner());
            }
            Err(ReadError::Blocked) => break StreamEnd::Open,
        }
    };
    let _ = chunks.finalize();
    end
}

fn ok_header(out: &mut Vec<u8>) {
    ResponseHeader {
        status: Status::Ok,
        content_type: "",
        message: "",
    }
    .encode(out)
    .unwrap();
}

/// A virtual address: 127.0.0.`host`:`port`.
fn addr(host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), port)
}
