//! Starting, observing and stopping a gateway: binds the sockets, starts one worker thread per
//! core, and hands back a [`GatewayHandle`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::bounded;
use mio::{Poll, Token, Waker};
use quinn_proto::{Endpoint, EndpointConfig, IdleTimeout, ServerConfig, TransportConfig, VarInt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use socket2::{Domain, Protocol, Socket as RawSocket, Type};

use crate::config::Config;
use crate::core::{Core, OsRandom, Shared, SocketCaps};
use crate::msg::WorkerMsg;
use crate::routing::{TableGeneration, WorkerId};
use crate::stats::StatsSnapshot;
use crate::worker::{Mailboxes, Socket, Worker};

/// The gateway's TLS identity and the trust anchors of its domain.
#[derive(Debug)]
pub struct GatewayIdentity {
    /// Certificate chain, leaf first; the leaf carries `spiffe://<domain>/gateway/<id>`.
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub private_key: PrivateKeyDer<'static>,
    /// CA certificates agents' certificates must chain to.
    pub trust_anchors: Vec<CertificateDer<'static>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The TLS identity could not be used.
    #[error("TLS setup: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// A socket could not be created or bound.
    #[error("cannot bind {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A worker's poller or thread could not be created.
    #[error("cannot start worker {worker}")]
    Worker {
        /// The worker index.
        worker: usize,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A running gateway.
///
/// Dropping the handle does not stop the gateway; call [`GatewayHandle::shutdown`].
#[derive(Debug)]
pub struct GatewayHandle {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shared: Arc<Shared>,
    mailboxes: Arc<Mailboxes>,
    verifier: Arc<dmsc_identity::SpiffeVerifier>,
    snapshots: Arc<crate::admin::SnapshotCache>,
    control: crate::control::ControlSlot,
    installs: Arc<std::sync::atomic::AtomicU64>,
    current: Arc<std::sync::Mutex<Option<dmsc_protocol::table::Generation>>>,
    threads: Vec<JoinHandle<()>>,
}

/// Entry point: see [`Gateway::start`].
#[derive(Debug)]
pub struct Gateway;

impl Gateway {
    /// Validates `config`, binds every socket, and starts the workers.
    ///
    /// Returns once all sockets are bound, so the gateway is reachable when this returns.
    /// Every authenticated agent may invoke everything ([`TableGeneration::standalone`]) until
    /// a table is installed.
    pub fn start(config: Config, identity: GatewayIdentity) -> Result<GatewayHandle, StartError> {
        Self::start_with(config, identity, TableGeneration::standalone())
    }

    /// [`Gateway::start`] with every worker holding `table` from its first iteration (a
    /// table pushed by the control plane, or the last good one saved on disk).
    pub fn start_with(
        config: Config,
        identity: GatewayIdentity,
        table: Arc<TableGeneration>,
    ) -> Result<GatewayHandle, StartError> {
        config.validate()?;
        let workers = config.worker_count();
        // Trunks have sockets of their own, one per worker: other gateways are accepted there
        // (gateway identities only), and this worker's own trunks leave from it, so that their
        // packets come back to the worker that owns them.
        let trunk_tls = if config.trunks {
            let client = crate::tls::trunk_client(
                identity.cert_chain.clone(),
                identity.private_key.clone_key(),
                identity.trust_anchors.clone(),
                &config.domain,
                transport(&config),
            )?;
            let crypto = crate::tls::peer_server_crypto(
                identity.cert_chain.clone(),
                identity.private_key.clone_key(),
                identity.trust_anchors.clone(),
                &config.domain,
            )?;
            let mut server = ServerConfig::with_crypto(Arc::new(crypto));
            server.transport_config(Arc::new(transport(&config)));
            let mut tokens = quinn_proto::ValidationTokenConfig::default();
            tokens.log(Arc::new(quinn_proto::NoneTokenLog)).sent(0);
            server.validation_token_config(tokens);
            server.migration(false);
            Some((client, Arc::new(server)))
        } else {
            None
        };
        let (crypto, verifier) = crate::tls::server_crypto(
            identity.cert_chain,
            identity.private_key,
            identity.trust_anchors,
            &config.domain,
        )?;
        let mut server = ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport(&config)));
        server.max_incoming(4096);
        // Address-validation tokens are not used (Retry is stateless and NEW_TOKEN is not
        // sent), and no token log is kept: the default log is a mutex shared by every worker
        // when quinn's `bloom` feature is on, which any crate in the graph could turn on.
        let mut tokens = quinn_proto::ValidationTokenConfig::default();
        tokens.log(Arc::new(quinn_proto::NoneTokenLog)).sent(0);
        server.validation_token_config(tokens);
        // The shared SO_REUSEPORT socket steers by address: a migrated connection's packets
        // could land on another worker, so migration is not offered.
        server.migration(false);
        let server = Arc::new(server);

        // SO_REUSEPORT would let a second gateway on the same address silently take half the
        // connections: first check that nobody holds the address.
        if config.listen.port() != 0 {
            drop(bind(config.listen, false)?);
        }
        // Bind everything first (worker 0 picks the port when the config says 0).
        let mut listen = config.listen;
        let mut sockets = Vec::with_capacity(workers);
        let mut lane_addrs = Vec::with_capacity(workers);
        let mut trunk_addrs = Vec::with_capacity(workers);
        let advertise = config.advertise_ip.unwrap_or(config.listen.ip());
        if advertise.is_unspecified() && (config.lanes || config.trunks) {
            tracing::warn!(
                %advertise,
                "lane and trunk addresses would name the wildcard address, which agents and other \
                 gateways cannot reach: set advertise_ip (--advertise-ip)"
            );
        }
        for w in 0..workers {
            let shared = bind(listen, true)?;
            listen = shared.local_addr().map_err(|source| StartError::Bind {
                addr: listen,
                source,
            })?;
            let mut pair = vec![shared];
            // A socket of worker `w`'s own (a lane or a trunk): port `base + w` (the config
            // checks it fits), or a free one when `base` is 0; and the address others reach.
            let own = |base: u16| -> Result<(std::net::UdpSocket, String), StartError> {
                let port = if base == 0 { 0 } else { base + w as u16 };
                let addr = SocketAddr::new(config.listen.ip(), port);
                let socket = bind(addr, false)?;
                let bound = socket
                    .local_addr()
                    .map_err(|source| StartError::Bind { addr, source })?;
                Ok((socket, SocketAddr::new(advertise, bound.port()).to_string()))
            };
            if config.lanes {
                let (lane, addr) = own(config.lane_base_port)?;
                lane_addrs.push(addr);
                pair.push(lane);
            }
            if trunk_tls.is_some() {
                let (trunk, addr) = own(config.trunk_base_port)?;
                trunk_addrs.push(addr);
                pair.push(trunk);
            }
            sockets.push(pair);
        }

        let admin = match config.admin_listen {
            Some(addr) => Some(
                std::net::TcpListener::bind(addr)
                    .map_err(|source| StartError::Bind { addr, source })?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());

        let mut polls = Vec::with_capacity(workers);
        let mut senders = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        let mut wakers = Vec::with_capacity(workers);
        for w in 0..workers {
            let poll = Poll::new().map_err(|source| StartError::Worker { worker: w, source })?;
            let waker = Waker::new(poll.registry(), Token(usize::MAX))
                .map_err(|source| StartError::Worker { worker: w, source })?;
            let (tx, rx) = bounded(config.limits.handoff_queue);
            polls.push(poll);
            senders.push(tx);
            receivers.push(rx);
            wakers.push(Arc::new(waker));
        }
        let mailboxes = Arc::new(Mailboxes { senders, wakers });
        let mut shared = Shared::new(config, lane_addrs);
        shared.trunk_addrs = trunk_addrs;
        let shared = Arc::new(shared);
        let cores = if shared.config.pin_workers {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut threads = Vec::with_capacity(workers);
        for (w, ((poll, socks), inbox)) in polls.into_iter().zip(sockets).zip(receivers).enumerate()
        {
            let socks = socks
                .into_iter()
                .map(|s| {
                    let io = mio::net::UdpSocket::from_std(s);
                    Socket::new(io).map_err(|source| StartError::Worker { worker: w, source })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let endpoint = Endpoint::new(
                Arc::new(EndpointConfig::default()),
                Some(server.clone()),
                true,
                None,
            );
            let caps: Vec<SocketCaps> = socks
                .iter()
                .map(|s| SocketCaps {
                    max_gso_segments: s.state.max_gso_segments(),
                })
                .collect();
            let caps_len = caps.len();
            let mut core = Core::new(
                WorkerId(w as u16),
                shared.clone(),
                endpoint,
                server.clone(),
                caps,
                table.clone(),
                Box::new(OsRandom),
                std::time::Instant::now(),
            );
            if let Some((client, server)) = &trunk_tls {
                // The trunk socket is the worker's last.
                core.enable_trunks(caps_len - 1, server.clone(), client.clone());
            }
            let worker = Worker::new(
                core,
                shared.stats[w].clone(),
                poll,
                socks,
                inbox,
                mailboxes.clone(),
                Duration::from_micros(shared.config.busy_poll_us),
            );
            let core = (!cores.is_empty()).then(|| cores[w % cores.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("dmsc-worker-{w}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    worker.run();
                })
                .map_err(|source| StartError::Worker { worker: w, source })?;
            threads.push(thread);
        }
        let snapshots = Arc::new(crate::admin::SnapshotCache::default());
        let control = crate::control::ControlSlot::default();
        if let Some(listener) = admin {
            let sources = crate::admin::Sources {
                shared: shared.clone(),
                mailboxes: mailboxes.clone(),
                verifier: verifier.clone(),
                cache: snapshots.clone(),
                control: control.clone(),
            };
            std::thread::Builder::new()
                .name("dmsc-admin".into())
                .spawn(move || crate::admin::serve(listener, sources))
                .map_err(|source| StartError::Worker {
                    worker: workers,
                    source,
                })?;
        }
        Ok(GatewayHandle {
            addr: listen,
            admin_addr,
            shared,
            mailboxes,
            verifier,
            snapshots,
            control,
            installs: Arc::new(std::sync::atomic::AtomicU64::new(table.generation.0)),
            current: Arc::new(std::sync::Mutex::new(table.name())),
            threads,
        })
    }
}

impl GatewayHandle {
    /// The address agents connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin HTTP endpoint's address, if enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Per-worker metrics and agents, collected from the workers between their iterations.
    pub fn snapshot(&self) -> Vec<crate::metrics::WorkerSnapshot> {
        crate::admin::snapshots(&self.mailboxes, &self.snapshots)
    }

    /// The Prometheus text the admin endpoint serves at `/metrics`.
    pub fn metrics_text(&self) -> String {
        crate::admin::render_metrics(
            &self.snapshot(),
            &self.stats(),
            &self.verifier.refusals(),
            self.control.get().map(|s| &**s),
        )
    }

    /// The per-worker lane addresses offered to agents.
    pub fn lane_addrs(&self) -> &[String] {
        &self.shared.lane_addrs
    }

    /// The per-worker trunk addresses other gateways of the domain connect to (empty with
    /// trunks off).
    pub fn trunk_addrs(&self) -> &[String] {
        &self.shared.trunk_addrs
    }

    /// Number of workers.
    pub fn workers(&self) -> usize {
        self.threads.len()
    }

    /// Counters summed over all workers.
    pub fn stats(&self) -> StatsSnapshot {
        StatsSnapshot::of_gateway(&self.shared)
    }

    /// Installs a table generation on every worker (between their event-loop iterations),
    /// without waiting for them; [`ControlLink::install`](crate::ControlLink::install) waits.
    pub fn install(&self, table: Arc<TableGeneration>) {
        *self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table.name();
        for w in 0..self.shared.workers() {
            self.mailboxes.send_blocking(
                w,
                WorkerMsg::Install {
                    table: table.clone(),
                    done: None,
                },
            );
        }
    }

    /// What the control-plane client needs of this gateway (see [`crate::ControlClient`]).
    pub fn control_link(&self) -> crate::ControlLink {
        crate::ControlLink {
            mailboxes: self.mailboxes.clone(),
            workers: self.shared.workers(),
            installs: self.installs.clone(),
            snapshots: self.snapshots.clone(),
            state: self.control.clone(),
            current: self.current.clone(),
            shared: self.shared.clone(),
        }
    }

    /// Starts draining: no new connections or requests; agents are told to go; in-flight
    /// requests get up to `grace` to finish; then connections close with `SHUTTING_DOWN`.
    pub fn drain(&self, grace: Duration) {
        for w in 0..self.shared.workers() {
            self.mailboxes.send_blocking(w, WorkerMsg::Drain { grace });
        }
    }

    /// Whether every worker has stopped.
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Drains with `grace` and waits for every worker to stop.
    pub fn shutdown(self, grace: Duration) {
        self.drain(grace);
        self.join();
    }

    /// Waits for every worker to stop.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub(crate) fn transport(config: &Config) -> TransportConfig {
    let l = &config.limits;
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(l.max_streams_per_connection));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    // Ask peers to acknowledge every 8th ack-eliciting packet (or after 1 ms) instead of every
    // 2nd: request/response traffic piggybacks most acknowledgements anyway, and ACK-only
    // packets are a large share of the packets a relay encrypts and decrypts. A longer delay
    // (5 ms) held stream credit and send buffers at the end of bursts: p99 at 256 in flight
    // was 2.7x direct against 1.7x with 1 ms (docs/BENCHMARKS.md).
    let mut ack = quinn_proto::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(VarInt::from_u32(8))
        .max_ack_delay(Some(std::time::Duration::from_millis(1)));
    t.ack_frequency_config(Some(ack));
    t.max_idle_timeout(IdleTimeout::try_from(l.idle_timeout()).ok());
    // Every stream may fill its whole window without taking another's share of the
    // connection's: one request whose reader stalls cannot block the others.
    t.stream_receive_window(VarInt::from_u32(l.stream_window_bytes));
    t.receive_window(VarInt::from_u64(l.connection_window_bytes()).unwrap_or(VarInt::MAX));
    t.send_window(l.connection_window_bytes());
    // The gateway's own keep-alives make a silent agent visible within the peer timeout.
    t.keep_alive_interval(l.keep_alive_interval());
    t
}

fn bind(addr: SocketAddr, reuse_port: bool) -> Result<std::net::UdpSocket, StartError> {
    let err = |source| StartError::Bind { addr, source };
    let socket =
        RawSocket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(true);
    }
    // Large buffers absorb bursts; best effort (the kernel caps them).
    let _ = socket.set_recv_buffer_size(4 << 20);
    let _ = socket.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}
