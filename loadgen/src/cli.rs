//! The command line: flags, their help text, and their validation into a [`Plan`].
//!
//! Everything is checked here, before a key is generated or a process started, so a bad flag
//! costs nothing and says what is wrong.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

use crate::units::parse_duration;

/// Largest request or response payload: both are held in memory whole.
pub const MAX_PAYLOAD_BYTES: usize = 16 * 1024 * 1024;

/// Load generator for the DMSC gateway.
///
/// With no arguments: creates a throwaway PKI, starts a gateway and echo agents as separate
/// processes, drives 10 s of closed-loop load (64 requests in flight) through the gateway after
/// a 2 s warm-up, prints throughput, errors, latency percentiles and CPU per request, and
/// writes latency.hgrm, latency.hlog and latency.svg to loadgen-out/. Exits non-zero if any
/// request failed or none completed. See docs/LOADGEN.md.
#[derive(Debug, Parser)]
#[command(name = "dmsc-loadgen", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do; without a command, one run in the mode given by --mode.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// The load (used when no command is given).
    #[command(flatten)]
    pub load: LoadArgs,
    /// An existing gateway to drive instead of starting one.
    #[command(flatten)]
    pub external: ExternalArgs,
    /// Where requests go: `gateway` (through the gateway) or `direct` (straight to the echo
    /// agents' own QUIC listeners, no gateway started).
    #[arg(long, value_enum, default_value_t = Route::Gateway)]
    pub mode: Route,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the same load through the gateway and directly to the same agents, in interleaved
    /// rounds (gateway, direct, gateway, direct, ...), and print both summaries and their
    /// ratios.
    Compare(CompareArgs),
    /// Measure the gateway's attach rate and its resident memory per idle attached agent:
    /// open --agents connections that each attach (mutual TLS handshake, control stream,
    /// ATTACH, ATTACH_OK) and then stay idle, and read the gateway's CPU and VmRSS.
    Attach(AttachArgs),
    /// (internal) Run a gateway; prints `listening ADDR`; exits when stdin closes.
    #[command(hide = true)]
    ServeGateway(ServeGatewayArgs),
    /// (internal) Run echo agents; prints `direct ADDR` per agent, then `ready`; exits when
    /// stdin closes.
    #[command(hide = true)]
    ServeAgents(ServeAgentsArgs),
    /// (internal) Run a control plane; prints `listening ADDR`, `admin ADDR` and
    /// `generation G`; exits when stdin closes.
    #[command(hide = true)]
    ServeControl(ServeControlArgs),
    /// (internal) Run a trivial A2A agent, its adapter and an A2A front door; prints
    /// `dmsc-a2a adapt: attached: ...` and `front URL`; exits when stdin closes.
    #[command(hide = true)]
    ServeA2a(ServeA2aArgs),
}

/// `serve-a2a` flags.
#[derive(Debug, Args)]
pub struct ServeA2aArgs {
    /// The gateway.
    #[arg(long)]
    pub gateway: SocketAddr,
    /// The domain CA.
    #[arg(long)]
    pub ca: PathBuf,
    /// The adapter's certificate and key.
    #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
    pub adapter: Vec<PathBuf>,
    /// The front door's certificate and key.
    #[arg(long, num_args = 2, value_names = ["CERT", "KEY"])]
    pub front: Vec<PathBuf>,
}

/// Where the load goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Route {
    /// Through the gateway, which routes each request by capability to an attached agent.
    Gateway,
    /// Straight to the agents' own QUIC listeners, round-robin over the agents.
    Direct,
    /// Through two gateways of one domain (`--gateways 2`): the callers attach to one, the
    /// agents to the other, and every request crosses a trunk. Chosen by `--gateways 2`, not
    /// by `--mode`.
    #[value(skip)]
    TwoGateways,
}

impl Route {
    /// The name used in reports and file names.
    pub fn name(self) -> &'static str {
        match self {
            Route::Gateway => "gateway",
            Route::Direct => "direct",
            Route::TwoGateways => "two-gateways",
        }
    }
}

/// `compare` flags.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The load of each mode.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Rounds per mode; each round lasts --duration divided by --rounds, so each mode is
    /// measured for --duration in total.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub rounds: u32,
}

/// The flags that select an existing gateway (a single run only).
#[derive(Debug, Clone, Args)]
pub struct ExternalArgs {
    /// Drive an existing gateway at ADDR (host:port) instead of starting one; requires --cert,
    /// --key and --ca. Requests go to whatever agents are attached.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with_all = ["agents", "gateway_workers", "pin_gateway"]
    )]
    pub gateway: Option<String>,
    /// With --gateway: the callers' certificate (PEM), an agent identity
    /// `spiffe://<domain>/agent/<name>`.
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub cert: Option<PathBuf>,
    /// With --gateway: the private key of --cert (PEM).
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub key: Option<PathBuf>,
    /// With --gateway: the domain CA certificate(s) the gateway's certificate chains to (PEM).
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub ca: Option<PathBuf>,
}

/// The flags that describe a load, shared by a single run and `compare`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// Capability every request invokes.
    #[arg(long, default_value = "echo", value_name = "NAME")]
    pub capability: String,
    /// Request payload size, bytes.
    #[arg(long, default_value_t = 100, value_name = "BYTES")]
    pub request_bytes: usize,
    /// Response payload size, bytes (the started agents echo the request when both sizes are
    /// equal, and answer this many bytes otherwise).
    #[arg(long, default_value_t = 100, value_name = "BYTES")]
    pub response_bytes: usize,
    /// Echo agents to start (each is one SDK agent attached to the gateway, with its own direct
    /// QUIC listener; all run in one agents process, one thread each).
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub agents: usize,
    /// Caller threads, each with its own QUIC endpoint on a single-threaded runtime.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub callers: usize,
    /// Connections per caller thread (and per mode). Through the gateway, connections come in
    /// attached sessions with one connection per gateway worker (a primary and its lanes, as
    /// the SDK opens them): the count is rounded up to whole sessions.
    #[arg(long, default_value_t = 4, value_name = "N")]
    pub connections: usize,
    /// Closed loop: keep N requests in flight in total, each sent as soon as the previous one
    /// on its slot completed [default: 64].
    #[arg(long, value_name = "N", conflicts_with = "rate")]
    pub concurrency: Option<u32>,
    /// Open loop: send R requests per second in total on a fixed schedule; latency counts from
    /// each request's intended send time (wrk2-style, no coordinated omission).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// Measured time (per mode, for `compare`): 500ms, 5s, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub duration: Duration,
    /// Unmeasured load before measuring (per mode, for `compare`).
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub warmup: Duration,
    /// Per-request timeout; also sent as the request's deadline. A request that times out is
    /// an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Gateway worker threads [default: one per core].
    #[arg(long, value_name = "N")]
    pub gateway_workers: Option<usize>,
    /// Gateways to start: 1, or 2 for a domain of two gateways under the control plane, the
    /// callers attached to one and the echo agents to the other, so that every request crosses
    /// a `dmsc-peer/1` trunk. With `compare`, three modes run side by side: through two
    /// gateways, through one (callers and agents on the agents' gateway) and direct.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub gateways: usize,
    /// Install a new table generation on the gateway every this many milliseconds while the
    /// load runs (the loadgen edits its domain.toml and applies it through the control plane);
    /// 0: never. Measures what live policy changes cost the request path.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub swap_tables_ms: u64,
    /// Serve direct requests with the agents' bare reference path (read the request, write
    /// the answer) instead of the SDK's handler dispatch that serves the requests coming
    /// through the gateway. Without a gateway (`--mode direct`) the bare path is the only one.
    #[arg(long)]
    pub bare_direct: bool,
    /// The gateway's `busy_poll_us`: before sleeping, each worker keeps polling for work this
    /// many microseconds (0: off, at most 1000).
    #[arg(long, default_value_t = 0, value_name = "US")]
    pub gateway_busy_poll_us: u64,
    /// Pin gateway worker i to core i (the gateway's own default; off here because the
    /// callers and agents share the cores with it).
    #[arg(long)]
    pub pin_gateway: bool,
    /// Run every thread of the gateway (both gateways with `--gateways 2`) on this CPU only,
    /// as the OS numbers CPUs. With `--load-cpu`, gives the gateway a core of its own while the
    /// callers and agents share another, in every mode of `compare` alike.
    #[arg(long, value_name = "CPU", conflicts_with = "pin_gateway")]
    pub gateway_cpu: Option<usize>,
    /// Run the loadgen's callers, the agents and the control plane on this CPU only, as the OS
    /// numbers CPUs (the gateway too, unless `--gateway-cpu` moves it).
    #[arg(long, value_name = "CPU")]
    pub load_cpu: Option<usize>,
    /// After the measured run, drive the A2A path for this long: an A2A v1.0 client (HTTP,
    /// JSON-RPC `SendMessage`, 16 in flight) through the A2A front door, the gateway and the
    /// adapter to a trivial A2A agent (one more process). 0s: skip. Self-contained runs through
    /// the gateway only (not `compare`).
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub a2a: Duration,
    /// Also write the summary as JSON to FILE (schema in docs/LOADGEN.md).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Directory for latency.hgrm, latency.hlog and latency.svg (created if missing).
    #[arg(long, default_value = "loadgen-out", value_name = "DIR")]
    pub out: PathBuf,
}

/// `attach` flags.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Agents to attach; each is one QUIC connection with one control stream, no lanes, kept
    /// open (and idle) until the end.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub agents: usize,
    /// Attaches in progress at once, in total (from the connect to ATTACH_OK).
    #[arg(long, default_value_t = 256, value_name = "N")]
    pub concurrency: usize,
    /// Threads opening the connections, each on a single-threaded runtime.
    #[arg(long, default_value_t = 2, value_name = "N")]
    pub callers: usize,
    /// Client QUIC endpoints (one UDP socket each) in total, shared out over the threads; a
    /// thread spreads its connections over its endpoints round-robin. The gateway's workers
    /// share the port through SO_REUSEPORT, which sends all of one socket's connections to the
    /// same worker: more endpoints spread the agents more evenly over the workers.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub endpoints: usize,
    /// Give each agent a capability of its own (`cap_<i>`); with `false`, every agent offers
    /// `cap_shared`.
    #[arg(
        long,
        default_value_t = true,
        action = ArgAction::Set,
        value_name = "BOOL"
    )]
    pub distinct_capabilities: bool,
    /// How long the agents stay idle after the last attach before the gateway's memory is read
    /// again.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub idle: Duration,
    /// Bound on the attach phase: attaches not started by then count as NOT_STARTED, and
    /// attaches still in progress are abandoned as TIMEOUT.
    #[arg(long, default_value = "120s", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Gateway worker threads [default: one per core].
    #[arg(long, value_name = "N")]
    pub gateway_workers: Option<usize>,
    /// Gateways to start: 1, or 2 for a domain of two gateways under the control plane, the
    /// callers attached to one and the echo agents to the other, so that every request crosses
    /// a `dmsc-peer/1` trunk. With `compare`, three modes run side by side: through two
    /// gateways, through one (callers and agents on the agents' gateway) and direct.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub gateways: usize,
    /// Pin gateway worker i to core i.
    #[arg(long)]
    pub pin_gateway: bool,
    /// The gateway's `limits.max_streams_per_connection` [default: the gateway's, 100]. QUIC
    /// (quinn) sets up the state of every stream a peer may open when the connection starts, so
    /// this limit weighs on the memory of every idle agent.
    #[arg(long, value_name = "N")]
    pub max_streams_per_connection: Option<u32>,
    /// Also write the result as JSON to FILE (schema in docs/LOADGEN.md).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// `serve-gateway` flags.
#[derive(Debug, Args)]
pub struct ServeGatewayArgs {
    /// Listen address.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Worker threads.
    #[arg(long)]
    pub workers: usize,
    /// The process's identity files.
    #[command(flatten)]
    pub files: IdentityFiles,
    /// Trust domain.
    #[arg(long)]
    pub domain: String,
    /// Pin workers to cores.
    #[arg(long)]
    pub pin: bool,
    /// `limits.max_streams_per_connection` [default: the gateway's].
    #[arg(long)]
    pub max_streams_per_connection: Option<u32>,
    /// `limits.max_agents` [default: the gateway's].
    #[arg(long)]
    pub max_agents: Option<usize>,
    /// `limits.max_connections_per_worker` [default: the gateway's].
    #[arg(long)]
    pub max_connections_per_worker: Option<usize>,
    /// `limits.max_connections_per_identity`: raised from the gateway's 64, because every
    /// connection of the loadgen has the same identity.
    #[arg(long, default_value_t = 1 << 16)]
    pub max_connections_per_identity: usize,
    /// The control plane to take tables from (`--control` of `dmsc-gateway`).
    #[arg(long)]
    pub control: Option<SocketAddr>,
    /// State directory (where the gateway saves its last good table).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Serve the admin endpoint on a free loopback port and print `admin ADDR` (the parent
    /// reads the gateway's datagram counters there).
    #[arg(long)]
    pub admin: bool,
    /// The gateway's `busy_poll_us`.
    #[arg(long, default_value_t = 0)]
    pub busy_poll_us: u64,
    /// Run every thread of the gateway on this CPU only.
    #[arg(long)]
    pub cpu: Option<usize>,
    /// The gateway's id (its certificate must be `spiffe://<domain>/gateway/<id>`).
    #[arg(long, default_value = "loadgen")]
    pub gateway_id: String,
}

/// The identity files every child process is started with.
#[derive(Debug, Args)]
pub struct IdentityFiles {
    /// Certificate chain (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    /// Private key (PEM).
    #[arg(long)]
    pub key: PathBuf,
    /// Domain CA (PEM).
    #[arg(long)]
    pub ca: PathBuf,
}

/// `serve-control` flags.
#[derive(Debug, Args)]
pub struct ServeControlArgs {
    /// The domain configuration.
    #[arg(long)]
    pub config: PathBuf,
    /// The process's identity files.
    #[command(flatten)]
    pub files: IdentityFiles,
}

/// `serve-agents` flags.
#[derive(Debug, Args)]
pub struct ServeAgentsArgs {
    /// Number of agents.
    #[arg(long)]
    pub agents: usize,
    /// Gateway to attach to; without it the agents only serve their direct listeners.
    #[arg(long)]
    pub gateway: Option<SocketAddr>,
    /// Lanes each agent should have opened before `ready` is printed.
    #[arg(long, default_value_t = 0)]
    pub expect_lanes: usize,
    /// The process's identity files.
    #[command(flatten)]
    pub files: IdentityFiles,
    /// Capability served.
    #[arg(long)]
    pub capability: String,
    /// Response payload size.
    #[arg(long)]
    pub response_bytes: usize,
    /// Serve the direct listeners with the bare reference path even when the SDK agent runs.
    #[arg(long)]
    pub bare_direct: bool,
}

/// How much load, and how it is paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// Closed loop: this many requests in flight in total.
    Closed {
        /// Requests in flight.
        concurrency: u32,
    },
    /// Open loop: this many requests per second in total, on a fixed schedule.
    Open {
        /// Requests per second.
        rate: f64,
    },
}

/// Where the gateway and agents come from.
#[derive(Debug, Clone)]
pub enum Deployment {
    /// Started by the loadgen, as child processes, with a throwaway PKI.
    SelfContained {
        /// Echo agents.
        agents: usize,
        /// Gateway workers.
        gateway_workers: usize,
        /// Pin the gateway's workers.
        pin_gateway: bool,
    },
    /// An existing gateway and the caller identity to use with it.
    External {
        /// The gateway.
        gateway: SocketAddr,
        /// Caller certificate.
        cert: PathBuf,
        /// Caller key.
        key: PathBuf,
        /// Domain CA.
        ca: PathBuf,
    },
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// One mode.
    Single(Route),
    /// Both modes, interleaved in this many rounds each.
    Compare {
        /// Rounds per mode.
        rounds: u32,
    },
}

/// A validated run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where the gateway and agents come from.
    pub deployment: Deployment,
    /// One mode or both.
    pub runs: Runs,
    /// Capability invoked.
    pub capability: String,
    /// Request payload bytes.
    pub request_bytes: usize,
    /// Response payload bytes.
    pub response_bytes: usize,
    /// Caller threads.
    pub callers: usize,
    /// Connections per caller thread.
    pub connections: usize,
    /// The load.
    pub load: Load,
    /// Measured time per mode.
    pub duration: Duration,
    /// Warm-up per mode.
    pub warmup: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
    /// JSON summary file.
    pub json: Option<PathBuf>,
    /// Output directory.
    pub out: PathBuf,
    /// Table swap interval (`None`: no swaps).
    pub swap_tables: Option<Duration>,
    /// Direct requests take the agents' bare path even when the SDK path is available.
    pub bare_direct: bool,
    /// The gateway's busy polling, µs.
    pub gateway_busy_poll_us: u64,
    /// The only CPU the gateway's threads run on.
    pub gateway_cpu: Option<usize>,
    /// The only CPU the callers, agents and control plane run on.
    pub load_cpu: Option<usize>,
    /// How long to drive the A2A path after the run (`None`: not at all).
    pub a2a: Option<Duration>,
    /// Gateways started (1 or 2).
    pub gateways: usize,
}

impl Plan {
    /// The modes this plan runs, in the order each round runs them.
    pub fn routes(&self) -> Vec<Route> {
        match (self.runs, self.gateways) {
            (Runs::Single(route), _) => vec![route],
            (Runs::Compare { .. }, 2) => vec![Route::TwoGateways, Route::Gateway, Route::Direct],
            (Runs::Compare { .. }, _) => vec![Route::Gateway, Route::Direct],
        }
    }

    /// Validates a single run's flags.
    pub fn single(load: &LoadArgs, external: &ExternalArgs, route: Route) -> anyhow::Result<Plan> {
        let plan = Plan::from_load(load, Some(external), Runs::Single(route))?;
        if route == Route::Direct && matches!(plan.deployment, Deployment::External { .. }) {
            bail!(
                "--mode direct needs the loadgen's own agents (their direct listeners); it cannot \
                 be combined with --gateway"
            );
        }
        if route == Route::Direct && plan.swap_tables.is_some() {
            bail!(
                "--swap-tables-ms swaps the gateway's tables; it needs --mode gateway or compare"
            );
        }
        Ok(plan)
    }

    /// Validates `compare`'s flags.
    pub fn compare(args: &CompareArgs) -> anyhow::Result<Plan> {
        if args.rounds == 0 || args.rounds > 1000 {
            bail!("--rounds must be between 1 and 1000");
        }
        let plan = Plan::from_load(
            &args.load,
            None,
            Runs::Compare {
                rounds: args.rounds,
            },
        )?;
        if plan.duration / args.rounds < Duration::from_millis(100) {
            bail!(
                "--duration / --rounds must be at least 100ms (got {} / {})",
                crate::units::format_duration(plan.duration),
                args.rounds
            );
        }
        Ok(plan)
    }

    /// Checks what both kinds of run share.
    fn from_load(
        a: &LoadArgs,
        external: Option<&ExternalArgs>,
        runs: Runs,
    ) -> anyhow::Result<Plan> {
        dmsc_protocol::card::validate_capability_name(&a.capability)
            .map_err(|e| anyhow::anyhow!("--capability {:?}: {e}", a.capability))?;
        for (flag, value) in [
            ("--request-bytes", a.request_bytes),
            ("--response-bytes", a.response_bytes),
        ] {
            if value > MAX_PAYLOAD_BYTES {
                bail!("{flag} must be at most {MAX_PAYLOAD_BYTES} (16 MiB), got {value}");
            }
        }
        in_range("--callers", a.callers, 1, 64)?;
        in_range("--connections", a.connections, 1, 256)?;
        in_range("--agents", a.agents, 1, 64)?;
        in_range("--gateways", a.gateways, 1, 2)?;
        let runs = match (runs, a.gateways) {
            (Runs::Single(Route::Gateway), 2) => Runs::Single(Route::TwoGateways),
            (Runs::Single(Route::Direct), 2) => {
                bail!("--gateways 2 needs gateways: use --mode gateway or compare")
            }
            (runs, _) => runs,
        };
        let load = match (a.concurrency, a.rate) {
            (_, Some(rate)) => {
                if !rate.is_finite() || rate <= 0.0 || rate > 10_000_000.0 {
                    bail!("--rate must be above 0 and at most 10000000 requests/s, got {rate}");
                }
                Load::Open { rate }
            }
            (concurrency, None) => {
                let concurrency = concurrency.unwrap_or(64);
                in_range("--concurrency", concurrency as usize, 1, 100_000)?;
                Load::Closed { concurrency }
            }
        };
        if a.duration < Duration::from_millis(100) {
            bail!("--duration must be at least 100ms");
        }
        if a.warmup > Duration::from_secs(3600) {
            bail!("--warmup must be at most 1h (60m)");
        }
        if a.timeout < Duration::from_millis(1) {
            bail!("--timeout must be at least 1ms");
        }
        for (flag, cpu) in [("--gateway-cpu", a.gateway_cpu), ("--load-cpu", a.load_cpu)] {
            if let Some(cpu) = cpu {
                if external.is_some_and(|e| e.gateway.is_some()) {
                    bail!("{flag}: only for a self-contained run (not with --gateway)");
                }
                let allowed = crate::affinity::allowed();
                if !allowed.contains(&cpu) {
                    bail!(
                        "{flag} {cpu}: not a CPU this process may run on (it may use {allowed:?})"
                    );
                }
            }
        }
        let deployment = match external.and_then(|e| e.gateway.as_ref().map(|g| (e, g))) {
            Some((e, gateway)) => {
                let (Some(cert), Some(key), Some(ca)) = (&e.cert, &e.key, &e.ca) else {
                    bail!("--gateway needs the callers' identity: --cert, --key and --ca");
                };
                let gateway = gateway
                    .to_socket_addrs()
                    .with_context(|| format!("--gateway {gateway:?}: expected host:port"))?
                    .next()
                    .with_context(|| format!("--gateway {gateway:?}: no address"))?;
                for (flag, path) in [("--cert", cert), ("--key", key), ("--ca", ca)] {
                    if !path.is_file() {
                        bail!("{flag} {}: no such file", path.display());
                    }
                }
                Deployment::External {
                    gateway,
                    cert: cert.clone(),
                    key: key.clone(),
                    ca: ca.clone(),
                }
            }
            None => Deployment::SelfContained {
                agents: a.agents,
                gateway_workers: gateway_workers(a.gateway_workers)?,
                pin_gateway: a.pin_gateway,
            },
        };
        if a.out.is_file() {
            bail!("--out {}: is a file, expected a directory", a.out.display());
        }
        if a.gateway_busy_poll_us > 1000 {
            bail!("--gateway-busy-poll-us: at most 1000");
        }
        if a.swap_tables_ms > 0 && matches!(deployment, Deployment::External { .. }) {
            bail!("--swap-tables-ms needs the loadgen's own control plane; it cannot be combined with --gateway");
        }
        if a.gateways == 2 && matches!(deployment, Deployment::External { .. }) {
            bail!("--gateways 2 starts its own gateways; it cannot be combined with --gateway");
        }
        let a2a = (!a.a2a.is_zero()
            && matches!(deployment, Deployment::SelfContained { .. })
            && matches!(
                runs,
                Runs::Single(Route::Gateway) | Runs::Single(Route::TwoGateways)
            ))
        .then_some(a.a2a);
        Ok(Plan {
            deployment,
            runs,
            capability: a.capability.clone(),
            request_bytes: a.request_bytes,
            response_bytes: a.response_bytes,
            callers: a.callers,
            connections: a.connections,
            load,
            duration: a.duration,
            warmup: a.warmup,
            timeout: a.timeout,
            json: a.json.clone(),
            out: a.out.clone(),
            swap_tables: (a.swap_tables_ms > 0).then(|| Duration::from_millis(a.swap_tables_ms)),
            bare_direct: a.bare_direct,
            gateway_busy_poll_us: a.gateway_busy_poll_us,
            gateway_cpu: a.gateway_cpu,
            load_cpu: a.load_cpu,
            a2a,
            gateways: a.gateways,
        })
    }
}

/// A validated `attach` run.
#[derive(Debug, Clone)]
pub struct AttachPlan {
    /// Agents to attach.
    pub agents: usize,
    /// Attaches in progress at once, in total.
    pub concurrency: usize,
    /// Threads.
    pub callers: usize,
    /// Client endpoints in total.
    pub endpoints: usize,
    /// One capability per agent, or one shared by all.
    pub distinct_capabilities: bool,
    /// Idle time before the second memory reading.
    pub idle: Duration,
    /// Bound on the attach phase.
    pub timeout: Duration,
    /// Gateway workers.
    pub gateway_workers: usize,
    /// Pin the gateway's workers.
    pub pin_gateway: bool,
    /// The gateway's `limits.max_streams_per_connection`.
    pub max_streams_per_connection: u32,
    /// JSON result file.
    pub json: Option<PathBuf>,
}

impl AttachPlan {
    /// Validates `attach`'s flags.
    pub fn new(a: &AttachArgs) -> anyhow::Result<AttachPlan> {
        in_range("--agents", a.agents, 1, 100_000)?;
        in_range("--callers", a.callers, 1, 64)?;
        in_range("--concurrency", a.concurrency, 1, 10_000)?;
        in_range("--endpoints", a.endpoints, 1, 1024)?;
        for (flag, value) in [
            ("--concurrency", a.concurrency),
            ("--endpoints", a.endpoints),
        ] {
            if value < a.callers {
                bail!(
                    "{flag} ({value}) must be at least --callers ({}): each caller thread needs \
                     one",
                    a.callers
                );
            }
        }
        let max_streams_per_connection = a
            .max_streams_per_connection
            .unwrap_or(dmsc_dataplane::Limits::default().max_streams_per_connection);
        in_range(
            "--max-streams-per-connection",
            max_streams_per_connection as usize,
            1,
            100_000,
        )?;
        if a.idle > Duration::from_secs(600) {
            bail!("--idle must be at most 10m");
        }
        if a.timeout < Duration::from_secs(1) || a.timeout > Duration::from_secs(3600) {
            bail!("--timeout must be between 1s and 1h (60m)");
        }
        if let Some(json) = &a.json {
            let parent = json.parent().filter(|p| !p.as_os_str().is_empty());
            if json.is_dir() || parent.is_some_and(|p| !p.is_dir()) {
                bail!(
                    "--json {}: not a file in an existing directory",
                    json.display()
                );
            }
        }
        Ok(AttachPlan {
            agents: a.agents,
            concurrency: a.concurrency,
            callers: a.callers,
            endpoints: a.endpoints,
            distinct_capabilities: a.distinct_capabilities,
            idle: a.idle,
            timeout: a.timeout,
            gateway_workers: gateway_workers(a.gateway_workers)?,
            pin_gateway: a.pin_gateway,
            max_streams_per_connection,
            json: a.json.clone(),
        })
    }
}

/// `--gateway-workers`, checked, or one per core.
fn gateway_workers(flag: Option<usize>) -> anyhow::Result<usize> {
    match flag {
        Some(n) => {
            in_range("--gateway-workers", n, 1, 256)?;
            Ok(n)
        }
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

fn in_range(flag: &str, value: usize, min: usize, max: usize) -> anyhow::Result<()> {
    if value < min || value > max {
        bail!("{flag} must be between {min} and {max}, got {value}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("dmsc-loadgen").chain(args.iter().copied()))
    }

    fn attach_plan(args: &[&str]) -> anyhow::Result<AttachPlan> {
        let cli = parse(args).map_err(|e| anyhow::anyhow!("{e}"))?;
        match &cli.command {
            Some(Command::Attach(a)) => AttachPlan::new(a),
            other => panic!("not attach: {other:?}"),
        }
    }

    fn plan(args: &[&str]) -> anyhow::Result<Plan> {
        let cli = parse(args).map_err(|e| anyhow::anyhow!("{e}"))?;
        match &cli.command {
            None => Plan::single(&cli.load, &cli.external, cli.mode),
            Some(Command::Compare(c)) => Plan::compare(c),
            Some(_) => unreachable!("attach and internal commands are not planned here"),
        }
    }

    #[test]
    fn defaults_are_a_closed_loop_through_a_started_gateway() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.runs, Runs::Single(Route::Gateway));
        assert_eq!(p.load, Load::Closed { concurrency: 64 });
        assert_eq!(p.duration, Duration::from_secs(10));
        assert_eq!(p.warmup, Duration::from_secs(2));
        assert_eq!((p.request_bytes, p.response_bytes), (100, 100));
        assert_eq!((p.callers, p.connections), (2, 4));
        assert!(matches!(
            p.deployment,
            Deployment::SelfContained { agents: 2, .. }
        ));
        assert_eq!(p.out, PathBuf::from("loadgen-out"));
    }

    #[test]
    fn the_documented_compare_invocation_parses() {
        let p = plan(&[
            "compare",
            "--concurrency",
            "64",
            "--request-bytes",
            "100",
            "--response-bytes",
            "100",
            "--duration",
            "5s",
            "--json",
            "/tmp/x.json",
        ])
        .unwrap();
        assert_eq!(p.runs, Runs::Compare { rounds: 3 });
        assert_eq!(p.duration, Duration::from_secs(5));
        assert_eq!(p.json, Some(PathBuf::from("/tmp/x.json")));
    }

    #[test]
    fn rate_makes_an_open_loop_and_excludes_concurrency() {
        let p = plan(&["--rate", "5000", "--duration", "500ms"]).unwrap();
        assert_eq!(p.load, Load::Open { rate: 5000.0 });
        assert!(parse(&["--rate", "5", "--concurrency", "3"]).is_err());
    }

    #[test]
    fn bad_flags_are_refused_with_the_flag_named() {
        for (args, needle) in [
            (&["--callers", "0"][..], "--callers"),
            (&["--concurrency", "0"], "--concurrency"),
            (&["--rate", "0"], "--rate"),
            (&["--request-bytes", "99999999"], "--request-bytes"),
            (&["--capability", "has space"], "--capability"),
            (&["--duration", "10ms"], "--duration"),
            (
                &["--mode", "direct", "--gateway", "127.0.0.1:1"],
                "--gateway",
            ),
            (&["compare", "--rounds", "0"], "--rounds"),
            (&["compare", "--gateway", "127.0.0.1:1"], "--gateway"),
            (
                &["compare", "--duration", "200ms", "--rounds", "3"],
                "--rounds",
            ),
        ] {
            let err = plan(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        // Durations without a unit are refused by the parser.
        assert!(parse(&["--duration", "5"]).is_err());
        // An identity only makes sense with an external gateway.
        assert!(parse(&["--cert", "x.pem"]).is_err());
        // Agents are whatever is attached to an external gateway.
        assert!(parse(&["--gateway", "127.0.0.1:1", "--agents", "3"]).is_err());
    }

    #[test]
    fn cpus_must_exist_and_need_a_started_gateway() {
        let first = crate::affinity::allowed()[0].to_string();
        let p = plan(&["compare", "--gateway-cpu", &first, "--load-cpu", &first]).unwrap();
        assert_eq!(p.gateway_cpu, p.load_cpu);
        assert!(p.gateway_cpu.is_some());
        let beyond = (crate::affinity::allowed().last().unwrap() + 1).to_string();
        for flag in ["--gateway-cpu", "--load-cpu"] {
            let err = plan(&["compare", flag, &beyond]).unwrap_err().to_string();
            assert!(err.contains(flag) && err.contains("may use"), "{err}");
        }
        let err = plan(&[
            "--gateway",
            "127.0.0.1:1",
            "--cert",
            "c",
            "--key",
            "k",
            "--ca",
            "a",
            "--load-cpu",
            "0",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("self-contained"), "{err}");
        // Pinning workers one per core and holding them all on one CPU contradict each other.
        assert!(parse(&["--pin-gateway", "--gateway-cpu", "0"]).is_err());
    }

    #[test]
    fn attach_defaults_are_ten_thousand_agents_with_their_own_capabilities() {
        let p = attach_plan(&["attach"]).unwrap();
        assert_eq!(p.agents, 10_000);
        assert_eq!((p.concurrency, p.callers, p.endpoints), (256, 2, 32));
        assert!(p.distinct_capabilities);
        assert_eq!(p.idle, Duration::from_secs(2));
        assert_eq!(p.timeout, Duration::from_secs(120));
        assert_eq!(
            p.max_streams_per_connection,
            dmsc_dataplane::Limits::default().max_streams_per_connection
        );
        assert_eq!(p.json, None);
        let p = attach_plan(&[
            "attach",
            "--distinct-capabilities",
            "false",
            "--max-streams-per-connection",
            "64",
        ])
        .unwrap();
        assert!(!p.distinct_capabilities);
        assert_eq!(p.max_streams_per_connection, 64);
    }

    #[test]
    fn bad_attach_flags_are_refused_with_the_flag_named() {
        for (args, needle) in [
            (&["attach", "--agents", "0"][..], "--agents"),
            (&["attach", "--agents", "100001"], "--agents"),
            (
                &["attach", "--callers", "4", "--concurrency", "3"],
                "--concurrency",
            ),
            (
                &["attach", "--callers", "4", "--endpoints", "2"],
                "--endpoints",
            ),
            (&["attach", "--timeout", "500ms"], "--timeout"),
            (&["attach", "--idle", "11m"], "--idle"),
            (&["attach", "--gateway-workers", "0"], "--gateway-workers"),
            (&["attach", "--json", "/nonexistent-dir/x.json"], "--json"),
            (&["attach", "--json", "/tmp"], "--json"),
            (
                &["attach", "--max-streams-per-connection", "0"],
                "--max-streams-per-connection",
            ),
        ] {
            let err = attach_plan(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        assert!(parse(&["attach", "--distinct-capabilities", "maybe"]).is_err());
        // The top-level load flags belong to the default command.
        assert!(parse(&["--duration", "1s", "attach"]).is_err());
    }
}
