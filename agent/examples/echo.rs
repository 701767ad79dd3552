//! A minimal DMSC agent: serves `echo`, invokes it once through the gateway, and detaches.
//!
//! ```text
//! cargo run -p dmsc-agent --example echo -- \
//!     --gateway 127.0.0.1:4433 --cert agent.pem --key agent.key --ca ca.pem \
//!     [--message "hello"] [--serve NAME] [--stay]
//! ```
//!
//! Each flag can also come from the environment: `DMSC_GATEWAY`, `DMSC_CERT`, `DMSC_KEY`,
//! `DMSC_CA`. The certificate must carry the agent's identity as a URI SAN
//! `spiffe://<domain>/agent/<name>` (a development PKI issues one). With `--stay` the agent
//! keeps serving `echo` until SIGTERM or SIGINT (Ctrl-C), then detaches, so the gateway stops
//! routing to it at once; requests in flight get up to 5 s to finish. Set
//! `RUST_LOG=dmsc_agent=debug` to watch the connection, lanes and reconnects. `--serve NAME`
//! offers the echo handler as capability `NAME` instead of `echo` while still invoking `echo`:
//! in a domain of gateways, an instance serving `ping` on one gateway reaches an `echo` agent
//! attached to another (local agents come first, so it must not offer `echo` itself).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use dmsc_agent::{Agent, AgentCard, AgentConfig, HandlerError, Handlers, Request, Response, Skill};

/// How long requests in flight may take to finish once the agent is asked to stop.
const GRACE: Duration = Duration::from_secs(5);

struct Args {
    gateway: String,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    message: String,
    serve: String,
    stay: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut gateway = std::env::var("DMSC_GATEWAY").ok();
    let mut cert = std::env::var_os("DMSC_CERT").map(PathBuf::from);
    let mut key = std::env::var_os("DMSC_KEY").map(PathBuf::from);
    let mut ca = std::env::var_os("DMSC_CA").map(PathBuf::from);
    let mut message = "hello through the gateway".to_owned();
    let mut stay = false;
    let mut serve = "echo".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--gateway" => gateway = Some(value()?),
            "--cert" => cert = Some(value()?.into()),
            "--key" => key = Some(value()?.into()),
            "--ca" => ca = Some(value()?.into()),
            "--message" => message = value()?,
            "--stay" => stay = true,
            "--serve" => serve = value()?,
            "-h" | "--help" => {
                println!(
                    "usage: echo --gateway HOST:PORT --cert PEM --key PEM --ca PEM \
                     [--message TEXT] [--serve NAME] [--stay]\n\
                     (or DMSC_GATEWAY, DMSC_CERT, DMSC_KEY, DMSC_CA)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    Ok(Args {
        gateway: gateway.context("--gateway (or DMSC_GATEWAY) is required")?,
        cert: cert.context("--cert (or DMSC_CERT) is required")?,
        key: key.context("--key (or DMSC_KEY) is required")?,
        ca: ca.context("--ca (or DMSC_CA) is required")?,
        message,
        serve,
        stay,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "dmsc_agent=info".into()),
        )
        .init();
    let args = parse_args()?;
    let gateway = tokio::net::lookup_host(&args.gateway)
        .await
        .with_context(|| format!("resolving {}", args.gateway))?
        .next()
        .with_context(|| format!("{} resolves to no address", args.gateway))?;

    let card = AgentCard::new("echo-example", "Answers with what it is sent", "1.0.0").with_skill(
        Skill::new(args.serve.as_str(), "Echo")
            .with_description("Returns the request payload unchanged")
            .with_tags(["example"]),
    );
    let config = AgentConfig::from_files(gateway, &args.cert, &args.key, &args.ca, card)?;
    let handlers = Handlers::new().on(args.serve.as_str(), |mut req: Request| async move {
        let payload = req.payload().await?;
        println!("echo: {} bytes from {}", payload.len(), req.caller);
        Ok::<_, HandlerError>(Response::ok(payload).with_content_type(req.content_type))
    });

    let agent = Agent::attach(config, handlers).await?;
    println!(
        "attached as {} (session {:?}) to {gateway}",
        agent.identity(),
        agent.session().map(|s| s.0)
    );

    let started = Instant::now();
    let reply = agent
        .request("echo")
        .content_type("text/plain")
        .deadline(Duration::from_secs(5))
        .send(args.message.clone())
        .await?;
    println!(
        "reply in {:?}: {} {:?}",
        started.elapsed(),
        reply.status,
        String::from_utf8_lossy(&reply.payload)
    );
    if !reply.is_ok() {
        println!("gateway said: {}", reply.message);
    }

    if args.stay {
        println!("serving {}; Ctrl-C or SIGTERM to leave", args.serve);
        agent.serve_until_signal(GRACE).await?;
    } else {
        agent.detach().await?;
    }
    println!("detached");
    Ok(())
}
