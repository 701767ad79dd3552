//! The child processes of a self-contained run: `serve-control`, `serve-gateway` and
//! `serve-agents`.
//!
//! Each prints what the parent needs on stdout (`listening ADDR`; `direct ADDR` per agent, then
//! `ready`) and runs until its stdin closes (see [`crate::children`]).

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use dmsc_agent::{Agent, AgentCard, AgentConfig, HandlerError, Handlers, Request, Response, Skill};
use dmsc_controlplane::config::DomainConfig;
use dmsc_controlplane::serve::ServeSettings;
use dmsc_dataplane::routing::{Generation, TableGeneration};
use dmsc_dataplane::{dev_identity, Config, ControlClient, ControlSettings, Gateway};
use dmsc_protocol::header::{RequestHeader, ResponseHeader};
use dmsc_protocol::limits::MAX_HEADER_BYTES;
use dmsc_protocol::{Status, StreamCode};

use crate::children::wait_for_parent;
use crate::cli::{
    ServeA2aArgs, ServeAgentsArgs, ServeControlArgs, ServeGatewayArgs, MAX_PAYLOAD_BYTES,
};
use crate::tls::{direct_server_config, Credentials};

/// Requests an echo agent serves at once per connection, through the gateway (`ATTACH`'s
/// `max_concurrent`) and on its direct listener alike: high enough that the agents never limit
/// the loads the loadgen accepts.
const AGENT_MAX_CONCURRENT: u32 = 1024;
/// How long `serve-agents` waits for every agent's lanes before reporting `ready` anyway.
const LANES_TIMEOUT: Duration = Duration::from_secs(5);

/// `serve-gateway`: a gateway on the given address with the given identity.
pub fn gateway(args: &ServeGatewayArgs) -> anyhow::Result<()> {
    init_logging();
    if let Some(cpu) = args.cpu {
        // Before the gateway starts: its workers and runtimes inherit it.
        crate::affinity::run_on(cpu)?;
    }
    let mut config = Config {
        listen: args.listen,
        workers: args.workers,
        pin_workers: args.pin,
        domain: args.domain.clone(),
        gateway_id: args.gateway_id.clone(),
        cert: Some(args.files.cert.clone()),
        key: Some(args.files.key.clone()),
        ca: Some(args.files.ca.clone()),
        // The default admin port is fixed (4480): a second gateway on the machine could not
        // start. The loadgen reads nothing from it.
        admin_listen: None,
        ..Config::default()
    };
    // Every connection of the loadgen has the same identity; the default limit of 64 per
    // worker would cap --callers x --connections, and `attach`'s agents.
    config.limits.max_connections_per_identity = args.max_connections_per_identity;
    if let Some(max) = args.max_streams_per_connection {
        config.limits.max_streams_per_connection = max;
    }
    if let Some(max) = args.max_agents {
        config.limits.max_agents = max;
    }
    if let Some(max) = args.max_connections_per_worker {
        config.limits.max_connections_per_worker = max;
    }
    if let Some(dir) = &args.state_dir {
        config.state_dir = dir.clone();
    }
    config.control = args.control;
    config.busy_poll_us = args.busy_poll_us;
    if args.admin {
        config.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    config.validate()?;
    let (identity, _) = dev_identity(&config).context("loading the gateway identity")?;
    let (table, client) = match config.control {
        None => (TableGeneration::standalone(), None),
        Some(addr) => {
            let client =
                ControlClient::start(ControlSettings::for_gateway(addr, &config, &identity))?;
            let table = client
                .wait_first(Duration::from_secs(20))
                .context("no table from the control plane within 20 s")?;
            println!("generation {}", table.generation());
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
    println!("listening {}", gateway.local_addr());
    println!("workers {}", gateway.workers());
    if let Some(admin) = gateway.admin_addr() {
        println!("admin {admin}");
    }
    std::io::stdout().flush()?;
    wait_for_parent();
    // No drain: the parent has finished with us. Exiting stops the worker threads.
    std::process::exit(0);
}

/// `serve-control`: a control plane serving `args.config` on loopback ports it picks.
pub fn control(args: &ServeControlArgs) -> anyhow::Result<()> {
    init_logging();
    let config = DomainConfig::load(&args.config)?;
    let files = &args.files;
    let creds = Credentials::load(&files.cert, &files.key, &files.ca)?;
    let settings = ServeSettings {
        config_path: Some(args.config.clone()),
        config,
        listen: "127.0.0.1:0".parse()?,
        admin_listen: "127.0.0.1:0".parse()?,
        credentials: creds.identity(),
        trust_anchors: creds.anchors.clone(),
        debounce: Duration::from_millis(100),
        routes: Default::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (server, run) = runtime.block_on(dmsc_controlplane::serve::start(settings))?;
    runtime.spawn(run);
    println!("listening {}", server.listen);
    println!("admin {}", server.admin);
    println!("generation {}", server.generation);
    std::io::stdout().flush()?;
    wait_for_parent();
    std::process::exit(0);
}

/// `serve-agents`: `args.agents` echo agents, one thread and one single-threaded runtime each
/// (as separate agent processes would have), each attached to the gateway through the SDK when
/// one is given, and each with its own direct QUIC listener.
pub fn agents(args: &ServeAgentsArgs) -> anyhow::Result<()> {
    init_logging();
    if args.response_bytes > MAX_PAYLOAD_BYTES {
        bail!("--response-bytes: at most {MAX_PAYLOAD_BYTES}");
    }
    let files = &args.files;
    let creds = Arc::new(Credentials::load(&files.cert, &files.key, &files.ca)?);
    let (tx, rx) = mpsc::channel::<anyhow::Result<Event>>();
    for index in 0..args.agents {
        let tx = tx.clone();
        let creds = creds.clone();
        let agent = AgentSpec {
            bare_direct: args.bare_direct,
            gateway: args.gateway,
            expect_lanes: args.expect_lanes,
            capability: args.capability.clone(),
            response: Bytes::from(vec![b'r'; args.response_bytes]),
        };
        std::thread::Builder::new()
            .name(format!("agent-{index}"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                runtime.block_on(run_agent(index, agent, creds, tx));
            })
            .context("starting an agent thread")?;
    }
    drop(tx);
    let mut direct = vec![None; args.agents];
    let mut ready = 0;
    while ready < args.agents {
        match rx.recv() {
            Ok(Ok(Event::Direct(index, addr))) => direct[index] = Some(addr),
            Ok(Ok(Event::Ready)) => ready += 1,
            Ok(Err(e)) => return Err(e),
            Err(_) => bail!("an agent thread ended before it was ready"),
        }
    }
    for addr in direct.into_iter().flatten() {
        println!("direct {addr}");
    }
    println!("ready");
    std::io::stdout().flush()?;
    wait_for_parent();
    std::process::exit(0);
}

/// What one agent thread reports.
enum Event {
    /// Agent `.0`'s direct listener is bound to `.1`.
    Direct(usize, SocketAddr),
    /// An agent is attached (with its lanes) and listening.
    Ready,
}

/// What one agent does.
struct AgentSpec {
    /// Serve direct connections with the bare path even when the SDK agent runs.
    bare_direct: bool,
    gateway: Option<SocketAddr>,
    expect_lanes: usize,
    capability: String,
    response: Bytes,
}

async fn run_agent(
    index: usize,
    spec: AgentSpec,
    creds: Arc<Credentials>,
    tx: mpsc::Sender<anyhow::Result<Event>>,
) {
    let spec = Arc::new(spec);
    let endpoint = match direct_listener(&creds) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            let _ = tx.send(Err(e.context("starting a direct listener")));
            return;
        }
    };
    match endpoint.local_addr() {
        Ok(addr) => {
            let _ = tx.send(Ok(Event::Direct(index, addr)));
        }
        Err(e) => {
            let _ = tx.send(Err(e.into()));
            return;
        }
    }
    // Keep the SDK agent alive for as long as the process runs.
    let agent = match &spec.gateway {
        Some(gateway) => match attach(index, *gateway, &spec, &creds).await {
            Ok(agent) => Some(agent),
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        },
        None => None,
    };
    // Direct requests go through the same SDK serving path as the gateway's, unless asked
    // for the bare reference path (or there is no SDK agent).
    let sdk = agent.clone().filter(|_| !spec.bare_direct);
    tokio::spawn(accept_direct(endpoint, spec.clone(), sdk));
    let _ = tx.send(Ok(Event::Ready));
    std::future::pending::<()>().await;
}

/// Attaches an SDK agent serving the capability, and waits (a bounded time) for its lanes.
async fn attach(
    index: usize,
    gateway: SocketAddr,
    spec: &Arc<AgentSpec>,
    creds: &Credentials,
) -> anyhow::Result<Agent> {
    let card = AgentCard::new(
        format!("loadgen-echo-{index}"),
        "dmsc-loadgen echo",
        "1.0.0",
    )
    .with_skill(Skill::new(spec.capability.clone(), "Echo"));
    let mut config = AgentConfig::new(
        gateway,
        creds.chain.clone(),
        creds.key.clone_key(),
        creds.anchors.clone(),
        card,
    );
    config.max_concurrent = AGENT_MAX_CONCURRENT;
    let handler_spec = spec.clone();
    let handlers = Handlers::new().on(spec.capability.clone(), move |mut req: Request| {
        let spec = handler_spec.clone();
        async move {
            let payload = req.payload().await?;
            Ok::<_, HandlerError>(Response::ok(answer(&spec, payload)))
        }
    });
    let agent = Agent::attach(config, handlers)
        .await
        .with_context(|| format!("agent {index} attaching to {gateway}"))?;
    let deadline = Instant::now() + LANES_TIMEOUT;
    while agent.lanes() < spec.expect_lanes && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if agent.lanes() < spec.expect_lanes {
        eprintln!(
            "dmsc-loadgen: warning: agent {index} has {} of {} lanes after {}s; requests on \
             other workers are handed off between cores",
            agent.lanes(),
            spec.expect_lanes,
            LANES_TIMEOUT.as_secs()
        );
    }
    Ok(agent)
}

/// The response payload: the request itself when it has the response's size, else the
/// prepared response.
fn answer(spec: &AgentSpec, payload: Bytes) -> Bytes {
    if payload.len() == spec.response.len() {
        payload
    } else {
        spec.response.clone()
    }
}

fn direct_listener(creds: &Credentials) -> anyhow::Result<quinn::Endpoint> {
    let config = direct_server_config(creds)?;
    Ok(quinn::Endpoint::server(
        config,
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )?)
}

async fn accept_direct(endpoint: quinn::Endpoint, spec: Arc<AgentSpec>, sdk: Option<Agent>) {
    while let Some(incoming) = endpoint.accept().await {
        let spec = spec.clone();
        let sdk = sdk.clone();
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            if let Some(agent) = sdk {
                return agent.serve_connection(connection).await;
            }
            while let Ok((send, recv)) = connection.accept_bi().await {
                tokio::spawn(serve_direct(spec.clone(), send, recv));
            }
        });
    }
}

/// The bare reference path (`--bare-direct`, and direct-only runs): serves one invocation on a
/// direct listener with the same framing as through the gateway (request header, payload,
/// FIN; response header, payload, FIN) and the same handler logic as the SDK agent (read the
/// whole payload, answer), but none of the SDK's dispatch.
async fn serve_direct(
    spec: Arc<AgentSpec>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let limit = MAX_HEADER_BYTES + 16 + MAX_PAYLOAD_BYTES;
    let Ok(request) = recv.read_to_end(limit).await else {
        let cancelled = quinn::VarInt::from_u64(StreamCode::Cancelled.code());
        let _ = send.reset(cancelled.unwrap_or(quinn::VarInt::from_u32(0)));
        return;
    };
    let request = Bytes::from(request);
    let (status, payload) = match RequestHeader::decode(&request, MAX_HEADER_BYTES) {
        Ok(Some((header, used))) if header.capability == spec.capability => {
            (Status::Ok, answer(&spec, request.slice(used..)))
        }
        Ok(Some(_)) => (Status::NoRoute, Bytes::new()),
        Ok(None) | Err(_) => (Status::BadRequest, Bytes::new()),
    };
    let mut header = Vec::with_capacity(8);
    if ResponseHeader::new(status).encode(&mut header).is_err() {
        return;
    }
    let mut chunks = [Bytes::from(header), payload];
    if send.write_all_chunks(&mut chunks).await.is_ok() {
        let _ = send.finish();
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DMSC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// `serve-a2a`: a trivial A2A agent on loopback, its adapter attached to the gateway, and an
/// A2A front door; prints the adapter's `dmsc-a2a adapt: attached: ...` line and `front URL`,
/// then serves until stdin closes.
pub fn a2a(args: &ServeA2aArgs) -> anyhow::Result<()> {
    let [adapter_cert, adapter_key] = args.adapter.as_slice() else {
        bail!("--adapter takes CERT KEY");
    };
    let [front_cert, front_key] = args.front.as_slice() else {
        bail!("--front takes CERT KEY");
    };
    // The adapter's identity, loaded once: the loadgen deletes the key files after start-up,
    // and the adapter attaches again (with a fresh copy) if its agent was ever withdrawn.
    let chain = dmsc_identity::load_cert_chain(adapter_cert)?;
    let key = dmsc_identity::load_private_key(adapter_key)?;
    let anchors = dmsc_identity::load_trust_anchors(&args.ca)?;
    // Stdin is watched on a plain thread, so that a failed start-up can end the runtime.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        wait_for_parent();
        let _ = stop_tx.send(true);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let agent_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let agent_url = format!("http://{}", agent_listener.local_addr()?);
        tokio::spawn(dmsc_a2a::echo::serve(agent_listener, "a2a-echo"));
        let gateway = args.gateway;
        let adapter = dmsc_a2a::adapt::run(
            dmsc_a2a::adapt::AdaptConfig::new(agent_url),
            move |card| {
                let (chain, key, anchors) = (chain.clone(), key.clone_key(), anchors.clone());
                Ok(AgentConfig::new(gateway, chain, key, anchors, card))
            },
            stopped(stop_rx.clone()),
        );
        tokio::spawn(async move {
            if let Err(e) = adapter.await {
                eprintln!("serve-a2a: the adapter stopped: {e:#}");
            }
        });
        let front_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let front_url = format!("http://{}", front_listener.local_addr()?);
        let config = AgentConfig::from_files(
            gateway,
            front_cert,
            front_key,
            &args.ca,
            dmsc_a2a::front::own_card(),
        )?;
        let agent = Agent::attach(config, dmsc_a2a::front::own_handlers()).await?;
        println!("front {front_url}");
        std::io::stdout().flush()?;
        let front = dmsc_a2a::front::FrontConfig::new(front_url);
        dmsc_a2a::front::serve(front_listener, None, agent.clone(), front, stopped(stop_rx))
            .await?;
        agent.detach().await?;
        Ok(())
    })
}
