//! `dmsc-gateway`: the DMSC gateway binary. Wiring only: flags and config file, identity,
//! logging, signals. The gateway itself is the `dmsc_dataplane` library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use dmsc_dataplane::routing::{Generation, TableGeneration};
use dmsc_dataplane::{dev_identity, Config, ControlClient, ControlSettings, Gateway};

/// The DMSC gateway: agents attach over QUIC with mutual TLS and invoke each other by
/// capability. With no flags it listens on 127.0.0.1:4433 and creates a development PKI under
/// ./dmsc-state on first run.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; flags override its keys (see docs/OPERATIONS.md).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// Address agents connect to [default: 127.0.0.1:4433].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Worker threads; 0 = one per core [default: 0].
    #[arg(long)]
    workers: Option<usize>,
    /// First per-worker lane port (worker i uses base + i); 0 = any free port [default: 0].
    #[arg(long)]
    lane_base_port: Option<u16>,
    /// Offer no lanes (requests cross cores through hand-offs instead).
    #[arg(long)]
    no_lanes: bool,
    /// First per-worker trunk port for other gateways of the domain (worker i uses base + i);
    /// 0 = any free port [default: 0].
    #[arg(long)]
    trunk_base_port: Option<u16>,
    /// Take no part in trunks: bind no trunk sockets, accept and open none (the gateway then
    /// serves only its own agents).
    #[arg(long)]
    no_trunks: bool,
    /// IP put in lane addresses sent to agents and in the trunk addresses reported to the
    /// control plane [default: the listen IP].
    #[arg(long)]
    advertise_ip: Option<IpAddr>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// Before sleeping, a worker keeps polling for work this long, microseconds, yielding the
    /// core between polls; lowers latency at the cost of CPU; use no more polling workers than
    /// cores the gateway has to itself (0 = off, at most 1000) [default: 0].
    #[arg(long)]
    busy_poll_us: Option<u64>,
    /// Gateway id, as in `spiffe://<domain>/gateway/<id>` [default: gw1].
    #[arg(long)]
    gateway_id: Option<String>,
    /// Trust domain [default: dmsc.local].
    #[arg(long)]
    domain: Option<String>,
    /// State directory for the development PKI [default: dmsc-state].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Gateway certificate chain, PEM (with --key and --ca; otherwise the development PKI).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Gateway private key, PEM.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Domain CA certificate(s) agents must chain to, PEM.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Largest request header, bytes [default: 4096].
    #[arg(long)]
    max_header_bytes: Option<usize>,
    /// Largest agent card, bytes [default: 65536].
    #[arg(long)]
    max_card_bytes: Option<usize>,
    /// Concurrent request streams per agent connection [default: 100].
    #[arg(long)]
    max_streams_per_connection: Option<u32>,
    /// Requests in flight to one agent per worker [default: 1024].
    #[arg(long)]
    max_inflight_per_agent: Option<u32>,
    /// Agents attached at once [default: 16384].
    #[arg(long)]
    max_agents: Option<usize>,
    /// Connections per worker [default: 32768].
    #[arg(long)]
    max_connections_per_worker: Option<usize>,
    /// Connections per agent identity per worker [default: 64].
    #[arg(long)]
    max_connections_per_identity: Option<usize>,
    /// Idle timeout, ms [default: 30000].
    #[arg(long)]
    idle_timeout_ms: Option<u64>,
    /// Time allowed between handshake and ATTACH/LANE, ms [default: 5000].
    #[arg(long)]
    attach_timeout_ms: Option<u64>,
    /// Time a caller has to send a whole request header, ms [default: 5000].
    #[arg(long)]
    header_timeout_ms: Option<u64>,
    /// An attached agent silent this long (keep-alives every third of it) is dropped as
    /// UNRESPONSIVE; 0 = off, ms [default: 5000].
    #[arg(long)]
    peer_timeout_ms: Option<u64>,
    /// A request whose bytes a leg refuses this long after the answer began ends as STALLED,
    /// ms [default: 10000].
    #[arg(long)]
    stall_timeout_ms: Option<u64>,
    /// Connections per worker above which new addresses get a QUIC Retry first; 0 = always
    /// [default: 4096].
    #[arg(long)]
    retry_above_connections: Option<usize>,
    /// Deadline for requests that carry none, ms [default: 30000].
    #[arg(long)]
    default_deadline_ms: Option<u64>,
    /// Longest deadline honoured, ms [default: 300000].
    #[arg(long)]
    max_deadline_ms: Option<u64>,
    /// Hop count at which requests are refused with LOOP_DETECTED [default: 8].
    #[arg(long)]
    max_hops: Option<u8>,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT, ms [default: 10000].
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Per-stream receive window, bytes; a connection's window is this times
    /// max_streams_per_connection [default: 262144].
    #[arg(long)]
    stream_window_bytes: Option<u32>,
    /// Capacity of each worker's cross-worker inbox, messages [default: 8192].
    #[arg(long)]
    handoff_queue: Option<usize>,
    /// Admin HTTP endpoint (/metrics, /agents, /healthz) [default: 127.0.0.1:4480].
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Do not serve the admin endpoint.
    #[arg(long)]
    no_admin: bool,
    /// The control plane's dmsc-ctl/1 address: serve the tables it pushes (and, while it is
    /// unreachable, the last one saved under the state directory) [default: none, standalone].
    #[arg(long)]
    control: Option<SocketAddr>,
    /// With --control: how long to wait for the first pushed table before starting from the
    /// saved one, ms [default: 10000].
    #[arg(long)]
    control_timeout_ms: Option<u64>,
    /// Capabilities with metrics of their own, per worker [default: 64].
    #[arg(long)]
    max_metric_capabilities: Option<usize>,
    /// Print the effective configuration as TOML-like text and exit.
    #[arg(long)]
    print_config: bool,
}

/// Exit code for an invalid command line or configuration (`EX_USAGE` of sysexits.h).
const EX_USAGE: i32 = 64;

fn main() {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            // --help and --version go to stdout and succeed; anything else is a usage error.
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EX_USAGE } else { 0 });
        }
    };
    let config = match config_from(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("dmsc-gateway: error: {}", chain(&e));
            std::process::exit(EX_USAGE);
        }
    };
    if let Err(e) = run(&args, config) {
        eprintln!("dmsc-gateway: error: {}", chain(&e));
        std::process::exit(1);
    }
}

fn run(args: &Args, config: Config) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DMSC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if args.print_config {
        println!("{config:#?}");
        return Ok(());
    }
    let (identity, dev) = dev_identity(&config).context("loading the gateway identity")?;
    if let Some(dev) = &dev {
        println!("development PKI (trust domain {}):", config.domain);
        println!("  CA certificate:  {}", dev.ca.display());
        println!(
            "  gateway cert:    {} (key {})",
            dev.gateway.0.display(),
            dev.gateway.1.display()
        );
        for (name, cert, key) in &dev.agents {
            println!(
                "  agent {name:<8}  {} (key {})",
                cert.display(),
                key.display()
            );
        }
    }
    let drain = Duration::from_millis(config.limits.drain_timeout_ms);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handler")?;
    }
    let (table, client) = match config.control {
        None => (TableGeneration::standalone(), None),
        Some(addr) => {
            let client =
                ControlClient::start(ControlSettings::for_gateway(addr, &config, &identity))?;
            let Some(table) = first_table(&client, &config, &stop) else {
                return Ok(());
            };
            println!("table generation:  {}", table.generation());
            (
                TableGeneration::compiled(Generation(0), table),
                Some(client),
            )
        }
    };
    let gateway = Gateway::start_with(config, identity, table)?;
    if let Some(client) = &client {
        client.attach(gateway.control_link());
    }
    if let Some(admin) = gateway.admin_addr() {
        println!("admin endpoint:    http://{admin}/metrics  /agents  /healthz");
    }
    let list = |addrs: &[String]| {
        if addrs.is_empty() {
            "off".to_owned()
        } else {
            addrs.join(", ")
        }
    };
    println!(
        "dmsc-gateway listening on {} with {} workers (lanes: {}; trunks: {})",
        gateway.local_addr(),
        gateway.workers(),
        list(gateway.lane_addrs()),
        list(gateway.trunk_addrs())
    );

    while !stop.load(Ordering::Relaxed) && !gateway.is_finished() {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!(grace_ms = drain.as_millis() as u64, "draining");
    gateway.shutdown(drain);
    if let Some(client) = client {
        client.shutdown();
    }
    tracing::info!("stopped");
    Ok(())
}

/// The table to start with: the first one the control plane pushes; if none arrives within
/// `control_timeout_ms`, the last good one saved on disk; with neither, keep waiting for the
/// control plane (agents are not accepted meanwhile). `None` when stopped while waiting.
fn first_table(
    client: &ControlClient,
    config: &Config,
    stop: &AtomicBool,
) -> Option<Arc<dmsc_protocol::table::Table>> {
    let timeout = Duration::from_millis(config.control_timeout_ms);
    let started = std::time::Instant::now();
    let mut warned = false;
    while !stop.load(Ordering::Relaxed) {
        if let Some(table) = client.wait_first(Duration::from_millis(100)) {
            return Some(table);
        }
        if started.elapsed() < timeout {
            continue;
        }
        if let Some(saved) = client.saved() {
            tracing::warn!(
                generation = %saved.generation(),
                "no table from the control plane within {} ms; starting from the saved table",
                config.control_timeout_ms
            );
            return Some(saved.clone());
        }
        if !warned {
            tracing::warn!(
                "no table from the control plane and none saved; waiting for the control plane before accepting agents"
            );
            warned = true;
        }
    }
    None
}

/// The error and its causes on one line, leaving out causes a message already quotes (typed
/// errors often include their source in their own text).
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// The configuration from the file and the flags, validated: any error here is a usage error.
fn config_from(args: &Args) -> anyhow::Result<Config> {
    let mut c = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    macro_rules! set {
        ($($field:ident).+ <- $arg:expr) => {
            if let Some(v) = $arg.clone() {
                c.$($field).+ = v;
            }
        };
    }
    set!(listen <- args.listen);
    set!(workers <- args.workers);
    set!(lane_base_port <- args.lane_base_port);
    set!(trunk_base_port <- args.trunk_base_port);
    if args.no_trunks {
        c.trunks = false;
    }
    if args.no_lanes {
        c.lanes = false;
    }
    if args.advertise_ip.is_some() {
        c.advertise_ip = args.advertise_ip;
    }
    if args.no_pin {
        c.pin_workers = false;
    }
    set!(busy_poll_us <- args.busy_poll_us);
    set!(gateway_id <- args.gateway_id);
    set!(domain <- args.domain);
    set!(state_dir <- args.state_dir);
    if args.cert.is_some() || args.key.is_some() || args.ca.is_some() {
        c.cert = args.cert.clone();
        c.key = args.key.clone();
        c.ca = args.ca.clone();
    }
    set!(limits.max_header_bytes <- args.max_header_bytes);
    set!(limits.max_card_bytes <- args.max_card_bytes);
    set!(limits.max_streams_per_connection <- args.max_streams_per_connection);
    set!(limits.max_inflight_per_agent <- args.max_inflight_per_agent);
    set!(limits.max_agents <- args.max_agents);
    set!(limits.max_connections_per_worker <- args.max_connections_per_worker);
    set!(limits.max_connections_per_identity <- args.max_connections_per_identity);
    set!(limits.idle_timeout_ms <- args.idle_timeout_ms);
    set!(limits.attach_timeout_ms <- args.attach_timeout_ms);
    set!(limits.header_timeout_ms <- args.header_timeout_ms);
    set!(limits.peer_timeout_ms <- args.peer_timeout_ms);
    set!(limits.stall_timeout_ms <- args.stall_timeout_ms);
    set!(limits.retry_above_connections <- args.retry_above_connections);
    set!(limits.default_deadline_ms <- args.default_deadline_ms);
    set!(limits.max_deadline_ms <- args.max_deadline_ms);
    set!(limits.max_hops <- args.max_hops);
    set!(limits.drain_timeout_ms <- args.drain_timeout_ms);
    set!(limits.stream_window_bytes <- args.stream_window_bytes);
    set!(limits.handoff_queue <- args.handoff_queue);
    set!(limits.max_metric_capabilities <- args.max_metric_capabilities);
    if args.admin_listen.is_some() {
        c.admin_listen = args.admin_listen;
    }
    if args.no_admin {
        c.admin_listen = None;
    }
    if args.control.is_some() {
        c.control = args.control;
    }
    set!(control_timeout_ms <- args.control_timeout_ms);
    c.validate()?;
    Ok(c)
}
