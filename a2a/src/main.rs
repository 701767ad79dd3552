//! `dmsc-a2a`: the A2A front door (`front`) and adapter (`adapt`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use dmsc_a2a::adapt::{self, AdaptConfig};
use dmsc_a2a::front::{self, ClientIdentity, FrontConfig};
use dmsc_agent::{Agent, AgentCard, AgentConfig};
use dmsc_identity::{PrincipalKind, SpiffeId, SpiffeVerifier};

/// Unmodified A2A clients and agents, through a DMSC gateway, by capability.
#[derive(Debug, Parser)]
#[command(name = "dmsc-a2a", version)]
struct Cli {
    /// Threads serving HTTP and dmsc/1 (1: a single-threaded runtime, the cheapest per
    /// request; more for CPU-heavy JSON at high load on machines with cores to spare).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every capability of the domain as a virtual A2A agent over HTTP.
    Front(FrontArgs),
    /// Attach an A2A agent (JSON-RPC of A2A 1.x or 0.3, or HTTP+JSON 1.x) to a gateway with its
    /// own card.
    Adapt(AdaptArgs),
}

/// How to reach the gateway, and who we are.
#[derive(Debug, Args)]
struct GatewayArgs {
    /// The gateway's `dmsc/1` address.
    #[arg(long, default_value = "127.0.0.1:4433")]
    gateway: SocketAddr,
    /// This process's certificate chain (PEM): an agent identity of the domain.
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// The domain's CA (PEM).
    #[arg(long)]
    ca: PathBuf,
}

impl GatewayArgs {
    fn config(&self, card: AgentCard) -> anyhow::Result<AgentConfig> {
        AgentConfig::from_files(self.gateway, &self.cert, &self.key, &self.ca, card)
            .context("loading the identity files")
    }
}

#[derive(Debug, Args)]
struct FrontArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// HTTP address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The URL clients reach this front door at (written into cards); default http://<listen>.
    #[arg(long)]
    public_url: Option<String>,
    /// Largest request body accepted, in bytes (larger: HTTP 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Largest answer or streamed event accepted from an agent, in bytes.
    #[arg(long, default_value_t = dmsc_a2a::binding::DEFAULT_MAX_MESSAGE_BYTES)]
    max_answer_bytes: usize,
    /// Requests forwarded at once; beyond it callers get OVERLOADED (HTTP 503).
    #[arg(long, default_value_t = 1024)]
    max_concurrent: usize,
    /// Milliseconds an agent has to begin its answer.
    #[arg(long, default_value_t = 60_000)]
    request_timeout_ms: u64,
    /// HTTP connections served at once; more are closed at once.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Development mode: every HTTP client is this agent identity of the domain (a SPIFFE ID)
    /// for policy. Only on a loopback listener.
    #[arg(long, conflicts_with = "tls_cert")]
    client_identity: Option<String>,
    /// Serve HTTPS with this certificate chain (PEM), and require every client to present a
    /// certificate of the domain: its SPIFFE ID is who policy judges. Needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The HTTPS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to; default: --ca.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
    /// Serve /metrics (Prometheus) and /healthz on this address; none by default.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
}

#[derive(Debug, Args)]
struct AdaptArgs {
    #[command(flatten)]
    gateway: GatewayArgs,
    /// The A2A agent's base URL (its card is at <URL>/.well-known/agent-card.json).
    #[arg(long)]
    agent_url: String,
    /// Where to send JSON-RPC calls (A2A 1.x); default: the card's first JSON-RPC 1.x
    /// interface, else its first JSON-RPC 0.x one (spoken in v0.3).
    #[arg(long)]
    rpc_url: Option<String>,
    /// Milliseconds between card reads (each one is also a health check).
    #[arg(long, default_value_t = 30_000)]
    card_interval_ms: u64,
    /// Failed card reads in a row after which the agent's capabilities are withdrawn.
    #[arg(long, default_value_t = 3)]
    unhealthy_after: u32,
    /// Milliseconds the agent has to begin its answer (or the caller's deadline, if shorter).
    #[arg(long, default_value_t = 60_000)]
    upstream_timeout_ms: u64,
    /// Largest answer or streamed event accepted from the agent, in bytes.
    #[arg(long, default_value_t = dmsc_a2a::binding::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Requests each gateway worker may have in flight to the agent at once (the agent's
    /// `dmsc/1` stream limit per connection; the adapter has one connection per worker).
    #[arg(long, default_value_t = 64)]
    max_concurrent: u32,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(64)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DMSC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let threads = cli.threads.max(1);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("dmsc-a2a: error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Front(args) => run_front(args).await,
            Command::Adapt(args) => run_adapt(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmsc-a2a: error: {e:#}");
            if e.downcast_ref::<Usage>().is_some() {
                ExitCode::from(64)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// A flag value that cannot work as given: exit status 64, as for a command-line error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn run_front(args: FrontArgs) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let local = listener.local_addr()?;
    let mut config = FrontConfig::new(
        args.public_url
            .clone()
            .unwrap_or_else(|| front::default_public_url(local)),
    );
    config.max_body_bytes = args.max_body_bytes;
    config.max_answer_bytes = args.max_answer_bytes;
    config.max_concurrent = args.max_concurrent.max(1);
    config.request_timeout = Duration::from_millis(args.request_timeout_ms);
    let mut agent_config = args.gateway.config(front::own_card())?;
    // Streams of events may pause for long; the request timeout bounds the start of answers.
    agent_config.request_timeout = config.request_timeout.max(Duration::from_secs(300));
    agent_config.max_response_bytes = config.max_answer_bytes;
    let agent = Agent::attach(agent_config, front::own_handlers())
        .await
        .with_context(|| format!("attaching to the gateway at {}", args.gateway.gateway))?;
    let domain = agent.identity().trust_domain().to_owned();
    config.max_connections = args.max_connections.max(1);
    let mut tls = None;
    if let Some(identity) = &args.client_identity {
        if !local.ip().is_loopback() {
            return Err(Usage(
                "--client-identity maps every client to one identity: only on a loopback \
                 listener (use --tls-cert for clients with their own identities)"
                    .into(),
            )
            .into());
        }
        check_client_identity(identity, &domain)?;
        config.clients = ClientIdentity::Fixed(identity.clone());
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let client_ca = args.client_ca.as_ref().unwrap_or(&args.gateway.ca);
        tls = Some(https_config(cert, key, client_ca, &domain)?);
        config.clients = ClientIdentity::Certificate;
        if args.public_url.is_none() {
            config.public_url = format!("https://{local}");
        }
    }
    println!("dmsc-a2a front attached to {}", args.gateway.gateway);
    match &config.clients {
        ClientIdentity::FrontDoor => {
            println!("dmsc-a2a front: clients act as {}", agent.identity())
        }
        ClientIdentity::Fixed(id) => {
            println!("dmsc-a2a front: clients act as {id} (development mode)")
        }
        ClientIdentity::Certificate => {
            println!("dmsc-a2a front: clients act as their certificates' identities")
        }
    }
    println!(
        "dmsc-a2a front listening on {} (catalog: {}/.well-known/api-catalog)",
        config.public_url, config.public_url
    );
    if let Some(addr) = args.admin_listen {
        let admin = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--admin-listen {addr}"))?;
        println!(
            "dmsc-a2a front: admin endpoint http://{}/metrics",
            admin.local_addr()?
        );
        let routes = front::admin_router(config.metrics.clone(), agent.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(admin, routes).await {
                tracing::warn!("the admin endpoint stopped: {e}");
            }
        });
    }
    front::serve(listener, tls, agent.clone(), config, shutdown_signal()).await?;
    agent.detach().await?;
    Ok(())
}

/// A `--client-identity` must be an agent identity of the front door's domain.
fn check_client_identity(identity: &str, domain: &str) -> Result<(), Usage> {
    let agent_of_domain = SpiffeId::parse(identity)
        .is_ok_and(|id| id.trust_domain() == domain && id.kind() == PrincipalKind::Agent);
    if !agent_of_domain {
        return Err(Usage(format!(
            "--client-identity {identity:?} must be an agent identity of {domain} \
             (spiffe://{domain}/agent/<name>)"
        )));
    }
    Ok(())
}

/// HTTPS presenting `cert`/`key`, requiring client certificates of `domain`'s agents that
/// chain to `client_ca`.
fn https_config(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
    domain: &str,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let chain = dmsc_identity::load_cert_chain(cert).context("--tls-cert")?;
    let key = dmsc_identity::load_private_key(key).context("--tls-key")?;
    let anchors = dmsc_identity::load_trust_anchors(client_ca).context("the client CA")?;
    let verifier = SpiffeVerifier::new(&anchors, &[PrincipalKind::Agent], &[domain])
        .context("the client certificate verifier")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .context("--tls-cert and --tls-key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn run_adapt(args: AdaptArgs) -> anyhow::Result<()> {
    let mut config = AdaptConfig::new(args.agent_url);
    config.rpc_url = args.rpc_url;
    config.card_interval = Duration::from_millis(args.card_interval_ms.max(10));
    config.unhealthy_after = args.unhealthy_after;
    config.upstream_timeout = Duration::from_millis(args.upstream_timeout_ms);
    config.max_message_bytes = args.max_message_bytes;
    // A URL that can never work is a usage error, found before anything starts.
    adapt::Upstream::new(config.clone()).map_err(|e| Usage(format!("{e}")))?;
    let gateway = args.gateway;
    let max = config.max_message_bytes;
    let max_concurrent = args.max_concurrent.max(1);
    adapt::run(
        config,
        |card| {
            let mut c = gateway.config(card)?;
            c.max_request_bytes = max;
            c.max_concurrent = max_concurrent;
            Ok(c)
        },
        shutdown_signal(),
    )
    .await
}
