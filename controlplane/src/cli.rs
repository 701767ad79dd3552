//! The `serve`, `apply` and `status` subcommands. `serve` runs the server ([`crate::serve`]);
//! `apply` and `status` are HTTP clients (ureq) of its admin endpoint.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use dmsc_identity::{
    load_cert_chain, load_private_key, load_trust_anchors, Credentials, DevPki, SpiffeId,
};

use crate::config::DomainConfig;
use crate::routes::Limits;
use crate::serve::{RoutesSettings, ServeSettings};
use crate::CommandError;

/// Default `dmsc-ctl/1` address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:4440";
/// Default admin address.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:4481";

/// Arguments of `serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// The domain configuration (`domain.toml`, docs/CONTROL.md); reloaded by `apply` and
    /// SIGHUP. Without it, the embedded development domain.
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Address gateways connect to (QUIC, ALPN dmsc-ctl/1).
    #[arg(long, default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Admin HTTP address: /status, /metrics, POST /apply, /healthz. Not authenticated: keep
    /// it on loopback or a management network.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin_listen: SocketAddr,
    /// State directory: the development PKI is under DIR/pki (the control identity is issued
    /// there when --cert and --key are not given).
    #[arg(long, default_value = "dmsc-state")]
    pub state_dir: PathBuf,
    /// Control-plane certificate chain, PEM (spiffe://DOMAIN/control; with --key).
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// Control-plane private key, PEM (with --cert).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    /// Reloads within this many milliseconds of the last compile are merged into one.
    #[arg(long, default_value_t = 100)]
    pub debounce_ms: u64,
    /// The domain's routes are compiled and pushed at most once per this many milliseconds:
    /// a reported change waits this long, and every change within it goes in the same push.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub routes_interval_ms: u64,
    /// A gateway whose session ends keeps its agents in the routes this many milliseconds,
    /// unless it reconnects and reports again; at start, routes are held back at most this
    /// long for every listed gateway to report.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(0..=3_600_000))]
    pub gateway_grace_ms: u64,
    /// Most agents one gateway may report; an agent beyond is refused (REPORT_REJECTED).
    #[arg(long, default_value_t = crate::routes::DEFAULT_MAX_AGENTS_PER_GATEWAY as u64, value_parser = clap::value_parser!(u64).range(0..=16_777_216))]
    pub max_agents_per_gateway: u64,
    /// Most capabilities (skills) one reported agent may offer; an agent with more is refused.
    #[arg(long, default_value_t = crate::routes::DEFAULT_MAX_AGENT_SKILLS as u64, value_parser = clap::value_parser!(u64).range(0..=dmsc_protocol::domain::MAX_REPORT_SKILLS as u64))]
    pub max_agent_skills: u64,
    /// Largest agent card (bytes, as reported) of an agent; an agent with a larger one is
    /// refused.
    #[arg(long, default_value_t = crate::routes::DEFAULT_MAX_CARD_BYTES)]
    pub max_card_bytes: u64,
}

/// Arguments of `apply`.
#[derive(Debug, Clone, Args)]
pub struct ApplyArgs {
    /// The running control plane's admin address.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// How long to wait for the gateways' acknowledgements, ms.
    #[arg(long, default_value_t = 5000)]
    pub wait_ms: u64,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// The running control plane's admin address.
    #[arg(long, default_value = DEFAULT_ADMIN)]
    pub admin: SocketAddr,
    /// Print the status as JSON (the admin endpoint's /status).
    #[arg(long)]
    pub json: bool,
}

/// `dmsc-control serve`.
pub fn serve(args: ServeArgs, out: &mut dyn Write) -> Result<(), CommandError> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DMSC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .try_init()
        .ok();
    let config = match &args.config {
        Some(path) => DomainConfig::load(path)?,
        None => DomainConfig::development(),
    };
    let domain = config.domain.name.get_ref().clone();
    let pki = DevPki::new(args.state_dir.join("pki"));
    let trust_anchors = match &args.config {
        Some(path) => {
            let anchor = std::path::Path::new(config.domain.trust_anchor.get_ref());
            load_trust_anchors(anchor).map_err(|e| {
                CommandError::Refused(format!(
                    "{}: [domain].trust_anchor {}: {e}",
                    path.display(),
                    anchor.display()
                ))
            })?
        }
        None => {
            pki.init(&domain)?;
            load_trust_anchors(&pki.ca_cert_path())?
        }
    };
    let credentials = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => Credentials {
            cert_chain: load_cert_chain(cert)?,
            private_key: load_private_key(key)?,
        },
        _ => {
            let ca = pki.init(&domain)?;
            if !trust_anchors.contains(&ca.cert_der()) {
                tracing::warn!(
                    ca = %pki.ca_cert_path().display(),
                    "the control identity comes from the development CA under --state-dir, which \
                     is not the configured trust anchor: gateways will refuse it (give --cert \
                     and --key)"
                );
            }
            let (cert, key) = pki.ensure(
                &ca,
                &SpiffeId::control(&domain).map_err(dmsc_identity::IdentityError::from)?,
            )?;
            writeln!(
                out,
                "development PKI:   {} (control identity {})",
                pki.ca_cert_path().display(),
                cert.display()
            )?;
            Credentials {
                cert_chain: load_cert_chain(&cert)?,
                private_key: load_private_key(&key)?,
            }
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("dmsc-control")
        .enable_all()
        .build()?;
    let settings = ServeSettings {
        config_path: args.config.clone(),
        config,
        listen: args.listen,
        admin_listen: args.admin_listen,
        credentials,
        trust_anchors,
        debounce: Duration::from_millis(args.debounce_ms),
        routes: RoutesSettings {
            interval: Duration::from_millis(args.routes_interval_ms),
            grace: Duration::from_millis(args.gateway_grace_ms),
            limits: Limits {
                agents_per_gateway: args.max_agents_per_gateway as usize,
                skills_per_agent: args.max_agent_skills as usize,
                card_bytes: args.max_card_bytes,
            },
        },
    };
    runtime.block_on(async move {
        let (server, run) = crate::serve::start(settings).await?;
        writeln!(out, "dmsc-control serving trust domain {domain}")?;
        writeln!(out, "generation:        {}", server.generation)?;
        writeln!(out, "dmsc-ctl/1 on      {}", server.listen)?;
        writeln!(
            out,
            "admin endpoint:    http://{}/status  /metrics  POST /apply",
            server.admin
        )?;
        out.flush()?;
        let hub = server.hub.clone();
        let run = tokio::spawn(run);
        wait_for_signals(&hub).await;
        tracing::info!("stopping");
        hub.shut_down();
        // Let the endpoint send its CONNECTION_CLOSE frames.
        tokio::time::sleep(Duration::from_millis(100)).await;
        run.abort();
        Ok(())
    })
}

#[cfg(unix)]
async fn wait_for_signals(hub: &std::sync::Arc<crate::serve::Hub>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut hup), Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let hub = hub.clone();
                tokio::spawn(async move {
                    let outcome = hub.request_reload().await;
                    tracing::info!(generation = %outcome.generation, changed = outcome.changed, error = ?outcome.error, "SIGHUP reload");
                });
            }
            _ = term.recv() => return,
            _ = int.recv() => return,
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

fn admin_error(admin: SocketAddr, e: impl std::fmt::Display) -> CommandError {
    CommandError::Admin(format!(
        "cannot reach the control plane's admin endpoint at {admin}: {e} (is `dmsc-control serve` running? see --admin)"
    ))
}

/// `dmsc-control apply`.
pub fn apply(args: ApplyArgs, out: &mut dyn Write) -> Result<(), CommandError> {
    let url = format!("http://{}/apply?wait_ms={}", args.admin, args.wait_ms);
    let mut response = agent(Duration::from_millis(args.wait_ms) + Duration::from_secs(30))
        .post(&url)
        .send_empty()
        .map_err(|e| admin_error(args.admin, e))?;
    let code = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| admin_error(args.admin, e))?;
    let answer: serde_json::Value = serde_json::from_str(&body)
        .map_err(|e| CommandError::Admin(format!("unexpected answer from {url} ({code}): {e}")))?;
    if args.json {
        writeln!(out, "{body}")?;
    }
    let str_of = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    if let Some(error) = answer.get("error").and_then(|e| e.as_str()) {
        return Err(CommandError::Refused(format!(
            "{error}\ngeneration {} stays in force",
            str_of(&answer["generation"])
        )));
    }
    let gateways = answer["gateways"].as_array().cloned().unwrap_or_default();
    if !args.json {
        writeln!(
            out,
            "generation {} ({})",
            str_of(&answer["generation"]),
            if answer["changed"].as_bool() == Some(true) {
                "new"
            } else {
                "unchanged"
            }
        )?;
        for g in &gateways {
            let mut line = format!("  {:<16} {}", str_of(&g["id"]), str_of(&g["result"]));
            if let Some(r) = g["rejected"].as_object() {
                line.push_str(&format!(
                    ": {} {}",
                    r.get("code").and_then(|c| c.as_str()).unwrap_or_default(),
                    r.get("reasons").map(|r| r.to_string()).unwrap_or_default()
                ));
            }
            writeln!(out, "{line}")?;
        }
        writeln!(
            out,
            "took {:.1} ms",
            answer["elapsed_ms"].as_f64().unwrap_or_default()
        )?;
    }
    let bad: Vec<String> = gateways
        .iter()
        .filter(|g| g["result"] != "acked")
        .map(|g| format!("{} {}", str_of(&g["id"]), str_of(&g["result"])))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CommandError::NotAcknowledged(format!(
            "not acknowledged by every listed gateway: {}",
            bad.join(", ")
        )))
    }
}

/// Fetches `/status` from a running control plane.
pub fn fetch_status(admin: SocketAddr) -> Result<(String, StatusViewOwned), CommandError> {
    let url = format!("http://{admin}/status");
    let mut response = agent(Duration::from_secs(10))
        .get(&url)
        .call()
        .map_err(|e| admin_error(admin, e))?;
    let body = response
        .body_mut()
        .read_to_string()
        .map_err(|e| admin_error(admin, e))?;
    let view = serde_json::from_str(&body)
        .map_err(|e| CommandError::Admin(format!("unexpected answer from {url}: {e}")))?;
    Ok((body, view))
}

/// `/status` as read back by a client.
pub type StatusViewOwned = serde_json::Value;

/// `dmsc-control status`.
pub fn status(args: StatusArgs, out: &mut dyn Write) -> Result<(), CommandError> {
    let (body, view) = fetch_status(args.admin)?;
    if args.json {
        writeln!(out, "{body}")?;
        return Ok(());
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let current = s(&view["generation"]);
    writeln!(out, "domain      {}", s(&view["domain"]))?;
    writeln!(
        out,
        "config      {}",
        view["config"].as_str().unwrap_or("(development domain)")
    )?;
    writeln!(out, "generation  {current}")?;
    if let Some(e) = view["last_error"].as_str() {
        writeln!(out, "last reload refused: {e}")?;
    }
    let routes = &view["routes"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let current_routes = n(&routes["version"]);
    if routes["held"].as_bool() == Some(true) {
        let waiting: Vec<String> = routes["waiting_for"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        writeln!(
            out,
            "routes      held at start, waiting for reports from {}",
            waiting.join(", ")
        )?;
    } else {
        writeln!(
            out,
            "routes      version {current_routes} (epoch {}): {} gateways, {} agents, {} capabilities, {} bytes; {} pushes",
            s(&routes["epoch"]),
            n(&routes["gateways"]),
            n(&routes["agents"]),
            n(&routes["capabilities"]),
            n(&routes["bytes"]),
            n(&routes["pushes"]),
        )?;
    }
    if let Some(e) = routes["last_error"].as_str() {
        writeln!(out, "routes not sent: {e}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<16} {:<9} {:<14} {:>6} {:>6}  last ack",
        "GATEWAY", "STATE", "GENERATION", "AGENTS", "CAPS"
    )?;
    for g in view["gateways"].as_array().into_iter().flatten() {
        let state = if g["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "down"
        };
        let acked = g["acked_generation"].as_str().map(|a| {
            let short = &a[..a.len().min(12)];
            if a == current {
                format!("{short} ok")
            } else {
                format!("{short} old")
            }
        });
        writeln!(
            out,
            "{:<16} {:<9} {:<14} {:>6} {:>6}  {}",
            s(&g["id"]),
            state,
            acked.unwrap_or_else(|| "-".into()),
            g["agents"].as_u64().unwrap_or(0),
            g["capabilities"].as_u64().unwrap_or(0),
            g["last_push_to_ack_ms"]
                .as_f64()
                .map(|m| format!("{m:.1} ms"))
                .unwrap_or_else(|| "-".into()),
        )?;
        if let Some(r) = g["rejected"].as_object() {
            writeln!(
                out,
                "    rejected {} ({}): {}",
                r.get("generation")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default(),
                r.get("code").and_then(|v| v.as_str()).unwrap_or_default(),
                r.get("reasons").map(|v| v.to_string()).unwrap_or_default()
            )?;
        }
        gateway_routes(out, g, current_routes)?;
    }
    Ok(())
}

/// The lines of one gateway's reports, routes and trunks in `status`.
fn gateway_routes(
    out: &mut dyn Write,
    g: &serde_json::Value,
    current_routes: u64,
) -> Result<(), CommandError> {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let report = &g["report"];
    let state = report["state"].as_str().unwrap_or("none");
    if state != "none" {
        let names: Vec<&str> = report["capabilities"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c.as_str())
            .collect();
        let count = n(&report["capability_count"]);
        let more = if count > names.len() as u64 {
            format!(" (+{} more)", count - names.len() as u64)
        } else {
            String::new()
        };
        let state = match report["grace_left_ms"].as_u64() {
            Some(ms) if state == "grace" => format!("grace, {ms} ms left"),
            _ => state.to_owned(),
        };
        writeln!(
            out,
            "    reported {} agents ({state}), {} refused; capabilities: {}{more}",
            n(&report["agents"]),
            n(&report["rejections"]),
            if names.is_empty() {
                "-".to_owned()
            } else {
                names.join(" ")
            },
        )?;
    }
    if g["routes_version"].is_null() && g["connected"].as_bool() != Some(true) {
        return Ok(());
    }
    let held = match g["routes_version"].as_u64() {
        None => "no TRUNKS yet".to_owned(),
        Some(v) => format!("holds version {v}"),
    };
    if g["routes_current"].as_bool() == Some(true) {
        writeln!(out, "    routes   {held}, current")?;
    } else {
        writeln!(
            out,
            "    routes   {held}, current is {current_routes}: behind for {} ms",
            n(&g["routes_behind_ms"])
        )?;
    }
    for t in g["trunks"].as_array().into_iter().flatten() {
        writeln!(
            out,
            "    trunk    {:<16} {} connected, {} requests, {} errors",
            t["peer"].as_str().unwrap_or("-"),
            n(&t["connected"]),
            n(&t["requests"]),
            n(&t["errors"]),
        )?;
    }
    Ok(())
}
