//! Orchestration: start (or find) the gateway and agents, connect the callers, run the warm-up
//! and measured phases, then report and write the files.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use dmsc_identity::PrincipalKind;
use dmsc_protocol::header::RequestHeader;

use crate::caller::{CallerPool, CallerSetup, PhaseSpec};
use crate::children::{ChildProcess, STARTUP_TIMEOUT};
use crate::cli::{Deployment, Load, Plan, Route, Runs};
use crate::counters;
use crate::cpu;
use crate::output::{interval_log, percentile_distribution};
use crate::pki::{TempPki, DOMAIN};
use crate::report::{
    errors_text, Comparison, ModeStats, PhaseMeasurement, RoleCpu, RunInfo, Summary,
};
use crate::svg::{percentile_spectrum, Series};
use crate::tls::{client_config, Credentials, Resumption};
use crate::units::{format_duration, thousands};

/// Pause between handing a phase to the callers and its start, so every thread starts
/// together.
const PHASE_LEAD: Duration = Duration::from_millis(20);

/// How a run ended, for the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Failed requests, warm-up included.
    pub failed: u64,
    /// Requests completed in the measured windows of each mode.
    pub completed: Vec<(Route, u64)>,
    /// Child processes (`gateway`, `agents`, `control plane`) that exited during the run.
    pub died: Vec<&'static str>,
    /// Table swaps (`--swap-tables-ms`) that were not acknowledged.
    pub failed_swaps: u64,
    /// The A2A phase (`--a2a`): (answered, failed), if it ran.
    pub a2a: Option<(u64, u64)>,
}

impl Verdict {
    /// Whether every request succeeded, every mode completed some, and no child died.
    pub fn passed(&self) -> bool {
        self.failed == 0
            && self.completed.iter().all(|&(_, n)| n > 0)
            && self.died.is_empty()
            && self.failed_swaps == 0
            && self
                .a2a
                .is_none_or(|(answered, failed)| answered > 0 && failed == 0)
    }
}

/// Runs `plan` and reports; `Err` only for setup and runtime failures, failed requests are
/// in the verdict.
pub fn run(plan: &Plan) -> anyhow::Result<Verdict> {
    let routes = plan.routes();
    let mut env = Environment::start(
        plan,
        routes.contains(&Route::Gateway) || routes.contains(&Route::TwoGateways),
    )?;
    let setup = CallerSetup {
        gateway: match env.gateway_addr {
            Some(addr) if routes.contains(&Route::Gateway) => Some((
                addr,
                client_config(&env.caller, PrincipalKind::Gateway, Resumption::Allowed)?,
            )),
            _ => None,
        },
        ingress: match env.ingress_addr {
            Some(addr) if routes.contains(&Route::TwoGateways) => Some((
                addr,
                client_config(&env.caller, PrincipalKind::Gateway, Resumption::Allowed)?,
            )),
            _ => None,
        },
        direct: if routes.contains(&Route::Direct) {
            Some((
                env.direct.clone(),
                client_config(&env.caller, PrincipalKind::Agent, Resumption::Allowed)?,
            ))
        } else {
            None
        },
        connections: plan.connections,
        request: request_bytes(plan)?,
        expected_response_bytes: env.self_contained().then_some(plan.response_bytes),
        timeout: plan.timeout,
    };
    let pool = CallerPool::start(Arc::new(setup), plan.callers)?;
    // Every process has loaded its certificates: the keys need not outlive this point, even
    // if the run is interrupted. (The domain configuration and the gateway's saved table stay
    // until the end of the run.)
    if let Some(pki) = &env.pki {
        pki.remove_keys();
    }
    eprintln!(
        "dmsc-loadgen: {} caller threads x {} connections connected",
        plan.callers, plan.connections
    );

    let mut stats: BTreeMap<Route, ModeStats> =
        routes.iter().map(|&r| (r, ModeStats::new(r))).collect();
    let mut warmup_errors: BTreeMap<String, u64> = BTreeMap::new();
    if !plan.warmup.is_zero() {
        for &route in &routes {
            let m = phase(&pool, &env, plan, route, plan.warmup, "warm-up")?;
            for r in &m.results {
                for (name, n) in &r.errors {
                    *warmup_errors.entry(name.clone()).or_default() += n;
                }
            }
        }
    }
    let swapper = match (plan.swap_tables, &env.control, &env.pki) {
        (Some(every), Some(control), Some(pki)) => Some(Swapper::start(pki, control.admin, every)?),
        _ => None,
    };
    match plan.runs {
        Runs::Single(route) => {
            let m = phase(&pool, &env, plan, route, plan.duration, "measure")?;
            if let Some(s) = stats.get_mut(&route) {
                s.add(m);
            }
        }
        Runs::Compare { rounds } => {
            let per_round = plan.duration / rounds;
            for round in 1..=rounds {
                for &route in &routes {
                    let label = format!("round {round}/{rounds}");
                    let m = phase(&pool, &env, plan, route, per_round, &label)?;
                    if let Some(s) = stats.get_mut(&route) {
                        s.add(m);
                    }
                }
            }
        }
    }
    let swaps = swapper.map(Swapper::finish);
    pool.shutdown();
    let a2a = match (plan.a2a, &env.a2a_url) {
        (Some(duration), Some(url)) => {
            eprintln!(
                "dmsc-loadgen: A2A path for {} ({} in flight)",
                format_duration(duration),
                crate::a2a::CONCURRENCY
            );
            Some(crate::a2a::drive(url, duration, plan.timeout)?)
        }
        _ => None,
    };
    let died = env.exited();
    let table_generation = env.control.as_ref().map(|c| {
        c.acknowledged()
            .unwrap_or_else(|| format!("{} (not acknowledged)", c.generation))
    });

    let info = RunInfo {
        load: plan.load,
        request_bytes: plan.request_bytes,
        response_bytes: plan.response_bytes,
        callers: plan.callers,
        connections: plan.connections,
        agents: match plan.deployment {
            Deployment::SelfContained { agents, .. } => Some(agents),
            Deployment::External { .. } => None,
        },
        gateway_workers: env.gateway_workers,
        placement: crate::report::Placement {
            gateway_busy_poll_us: plan.gateway_busy_poll_us,
            gateway_cpu: plan.gateway_cpu,
            load_cpu: plan.load_cpu,
        },
        self_contained: env.self_contained(),
        table_generation,
        table_swaps: swaps,
        direct_path: env.self_contained().then_some(
            if (routes.contains(&Route::Gateway) || routes.contains(&Route::TwoGateways))
                && !plan.bare_direct
            {
                "sdk"
            } else {
                "bare"
            },
        ),
    };
    let summaries: Vec<(Route, Summary)> = stats
        .values()
        .map(|s| (s.route, Summary::of(s, &info)))
        .collect();
    println!();
    for (_, summary) in &summaries {
        println!("{}", summary.text(&info));
    }
    let failed_warmup: u64 = warmup_errors.values().sum();
    if failed_warmup > 0 {
        println!(
            "warm-up errors (not in the figures above, but they fail the run): {}\n",
            errors_text(&warmup_errors)
        );
    }
    if let Some(a2a) = &a2a {
        println!("{}\n", a2a.text());
    }
    let mut json = match (plan.runs, summaries.as_slice()) {
        (Runs::Compare { rounds }, [(Route::Gateway, g), (Route::Direct, d)]) => {
            let comparison = Comparison::of(g, d);
            println!("{}", comparison.text(g, d, rounds));
            comparison.to_json(g.to_json(&info), d.to_json(&info), rounds)
        }
        (
            Runs::Compare { rounds },
            [(Route::Gateway, g), (Route::Direct, d), (Route::TwoGateways, t)],
        ) => {
            let comparison = Comparison::of(g, d);
            println!("{}", comparison.text(g, d, rounds));
            let two_vs_one = Comparison::of(t, g);
            println!(
                "{}",
                two_vs_one.text_labeled(("two gateways", "one gateway"), t, g, rounds)
            );
            let two_vs_direct = Comparison::of(t, d);
            println!(
                "{}",
                two_vs_direct.text_labeled(("two gateways", "direct"), t, d, rounds)
            );
            let mut json = comparison.to_json(g.to_json(&info), d.to_json(&info), rounds);
            if let Some(object) = json.as_object_mut() {
                object.insert("two_gateways".into(), t.to_json(&info));
                object.insert("two_gateways_vs_one".into(), two_vs_one.ratios_json());
                object.insert("two_gateways_vs_direct".into(), two_vs_direct.ratios_json());
            }
            json
        }
        (_, [(_, s)]) => s.to_json(&info),
        _ => bail!("internal error: unexpected set of summaries"),
    };
    if let (Some(a2a), Some(object)) = (&a2a, json.as_object_mut()) {
        object.insert("a2a".into(), a2a.to_json());
    }
    let files = write_files(&plan.out, plan.runs, &stats)?;
    if let Some(path) = &plan.json {
        let text = serde_json::to_string_pretty(&json)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    println!(
        "files: {}{}",
        files.join(", "),
        plan.json
            .as_ref()
            .map_or_else(String::new, |p| format!(", {}", p.display()))
    );
    Ok(Verdict {
        failed: failed_warmup + stats.values().map(ModeStats::failed).sum::<u64>(),
        completed: stats.values().map(|s| (s.route, s.requests)).collect(),
        died,
        failed_swaps: swaps.map_or(0, |(_, failed)| failed),
        a2a: a2a.map(|r| (r.requests(), r.errors())),
    })
}

/// The request every caller sends: the header (empty caller, deadline = timeout) and the
/// payload.
fn request_bytes(plan: &Plan) -> anyhow::Result<Bytes> {
    let mut request = Vec::with_capacity(64 + plan.request_bytes);
    RequestHeader {
        deadline_ms: u64::try_from(plan.timeout.as_millis()).unwrap_or(u64::MAX),
        ..RequestHeader::new(&plan.capability)
    }
    .encode(&mut request)?;
    request.resize(request.len() + plan.request_bytes, b'q');
    Ok(Bytes::from(request))
}

/// Runs one phase on every caller thread, printing progress once a second, and measures the
/// CPU of every role over it.
fn phase(
    pool: &CallerPool,
    env: &Environment,
    plan: &Plan,
    route: Route,
    duration: Duration,
    label: &str,
) -> anyhow::Result<PhaseMeasurement> {
    let cpu_before = env.cpu();
    let counts_before = env.counters();
    let start = Instant::now() + PHASE_LEAD;
    let wall_start = SystemTime::now() + PHASE_LEAD;
    pool.begin(PhaseSpec {
        route,
        load: plan.load,
        start,
        duration,
    })?;
    // Requests started in the window may take up to the timeout; then the threads answer.
    let deadline = start + duration + plan.timeout + Duration::from_secs(10);
    let mut results = Vec::with_capacity(pool.threads());
    let mut next_tick = start + Duration::from_secs(1);
    let (mut last_completed, _) = pool.live();
    while results.len() < pool.threads() {
        let now = Instant::now();
        if now >= deadline {
            bail!("the caller threads did not finish the {label} phase in time");
        }
        if now >= next_tick {
            let (completed, failed) = pool.live();
            let second = (now - start).as_secs();
            let total = duration.as_secs_f64().ceil() as u64;
            if second <= total {
                eprintln!(
                    "  {:<7} {label:<11} {second:>3}/{total}s  {:>10} req/s  errors {}",
                    route.name(),
                    thousands(completed - last_completed),
                    thousands(failed),
                );
            } else if second == total + 1 {
                eprintln!(
                    "  {:<7} {label:<11} waiting for the requests still in flight (at most \
                     --timeout {})",
                    route.name(),
                    format_duration(plan.timeout)
                );
            }
            last_completed = completed;
            next_tick += Duration::from_secs(1);
            continue;
        }
        if let Some(result) = pool.next_result(next_tick.min(deadline) - now)? {
            results.push(result);
        }
    }
    let elapsed = start.elapsed();
    let cpu_after = env.cpu();
    let callers_datagrams = results.iter().fold((0, 0), |(s, r), res| {
        (s + res.datagrams.0, r + res.datagrams.1)
    });
    let counts = env
        .counters()
        .since(&counts_before, Some(callers_datagrams));
    let delta =
        |after: Option<cpu::CpuTime>, before: Option<cpu::CpuTime>| Some(after?.since(before?));
    Ok(PhaseMeasurement {
        wall_start,
        duration,
        elapsed,
        results,
        cpu: RoleCpu {
            callers: delta(cpu_after.0, cpu_before.0),
            gateway: delta(cpu_after.1, cpu_before.1),
            agents: delta(cpu_after.2, cpu_before.2),
        },
        counts,
    })
}

/// Writes the histogram files and the chart; returns their paths.
fn write_files(
    out: &Path,
    runs: Runs,
    stats: &BTreeMap<Route, ModeStats>,
) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut files = Vec::new();
    let mut write = |name: String, bytes: &[u8]| -> anyhow::Result<()> {
        let path = out.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        files.push(path.display().to_string());
        Ok(())
    };
    for s in stats.values() {
        let stem = match runs {
            Runs::Single(_) => "latency",
            Runs::Compare { .. } => s.route.name(),
        };
        write(
            format!("{stem}.hgrm"),
            percentile_distribution(&s.latency).as_bytes(),
        )?;
        let comment = format!(
            "[dmsc-loadgen {} mode: latency of successful requests in microseconds, one \
             histogram per second of measurement]",
            s.route.name()
        );
        write(
            format!("{stem}.hlog"),
            &interval_log(&s.intervals, &comment)?,
        )?;
    }
    let series: Vec<Series<'_>> = stats
        .values()
        .map(|s| Series {
            label: s.route.name(),
            histogram: &s.latency,
        })
        .collect();
    let title = match runs {
        Runs::Single(route) => format!("dmsc-loadgen: latency by percentile ({})", route.name()),
        Runs::Compare { .. } => "dmsc-loadgen: latency by percentile, gateway vs direct".into(),
    };
    write(
        "latency.svg".into(),
        percentile_spectrum(&title, &series).as_bytes(),
    )?;
    Ok(files)
}

/// The gateway and agents the callers talk to, and the callers' identity.
struct Environment {
    // Children first: fields drop in order, and the processes should go before their PKI.
    a2a: Option<ChildProcess>,
    /// `--gateways 2`: the gateway the callers attach to for the two-gateway route (the
    /// agents attach to `gateway`).
    ingress: Option<ChildProcess>,
    ingress_addr: Option<SocketAddr>,
    /// The front door's URL for the A2A phase's capability.
    a2a_url: Option<String>,
    agents: Option<ChildProcess>,
    gateway: Option<ChildProcess>,
    control: Option<ControlChild>,
    gateway_addr: Option<SocketAddr>,
    gateway_workers: Option<usize>,
    gateway_admin: Option<SocketAddr>,
    direct: Vec<SocketAddr>,
    caller: Credentials,
    pki: Option<TempPki>,
}

impl Environment {
    fn start(plan: &Plan, with_gateway: bool) -> anyhow::Result<Environment> {
        match &plan.deployment {
            Deployment::External {
                gateway,
                cert,
                key,
                ca,
            } => Ok(Environment {
                a2a: None,
                ingress: None,
                ingress_addr: None,
                a2a_url: None,
                agents: None,
                gateway: None,
                control: None,
                gateway_addr: Some(*gateway),
                gateway_workers: None,
                gateway_admin: None,
                direct: Vec::new(),
                caller: Credentials::load(cert, key, ca)
                    .context("loading the callers' identity")?,
                pki: None,
            }),
            Deployment::SelfContained {
                agents,
                gateway_workers,
                pin_gateway,
            } => {
                if let Some(cpu) = plan.load_cpu {
                    // Before anything starts: the callers, the agents and the control plane
                    // inherit it, and so does the gateway unless `--gateway-cpu` moves it.
                    crate::affinity::run_on(cpu)?;
                }
                let mut pki = TempPki::create()?;
                if plan.gateways == 2 {
                    pki.set_gateways(2)?;
                }
                let deadline = Instant::now() + STARTUP_TIMEOUT;
                let mut env = Environment {
                    a2a: None,
                    ingress: None,
                    ingress_addr: None,
                    a2a_url: None,
                    agents: None,
                    gateway: None,
                    control: None,
                    gateway_addr: None,
                    gateway_workers: None,
                    gateway_admin: None,
                    direct: Vec::new(),
                    caller: Credentials::load(&pki.caller.cert, &pki.caller.key, &pki.ca)?,
                    pki: None,
                };
                if with_gateway {
                    let control = ControlChild::start(&pki)?;
                    // With two gateways the agents attach to the second one.
                    let gateway = GatewayChild::start(
                        &pki,
                        plan.gateways,
                        *gateway_workers,
                        *pin_gateway,
                        &gateway_flags(plan),
                        Some(control.addr),
                    )?;
                    env.control = Some(control);
                    env.gateway_addr = Some(gateway.addr);
                    env.gateway_workers = Some(gateway.workers);
                    env.gateway_admin = gateway.admin;
                    env.gateway = Some(gateway.process);
                }
                let mut args = os_args(&[
                    "serve-agents",
                    "--agents",
                    &agents.to_string(),
                    "--capability",
                    &plan.capability,
                    "--response-bytes",
                    &plan.response_bytes.to_string(),
                ]);
                push_files(&mut args, &pki.agent.cert, &pki.agent.key, &pki.ca);
                if plan.bare_direct {
                    args.push("--bare-direct".into());
                }
                if let (Some(addr), Some(workers)) = (env.gateway_addr, env.gateway_workers) {
                    args.extend(os_args(&[
                        "--gateway",
                        &addr.to_string(),
                        "--expect-lanes",
                        &workers.saturating_sub(1).to_string(),
                    ]));
                }
                let mut child = ChildProcess::spawn("agents", &args)?;
                loop {
                    let line = child.next_line("ready", deadline)?;
                    if let Some(addr) = line.strip_prefix("direct ") {
                        env.direct
                            .push(addr.trim().parse().context("direct listener address")?);
                    } else if line == "ready" {
                        break;
                    } else {
                        println!("agents: {line}");
                    }
                }
                env.agents = Some(child);
                if plan.gateways == 2 && with_gateway {
                    if let Some(control) = &env.control {
                        let ingress = GatewayChild::start(
                            &pki,
                            1,
                            *gateway_workers,
                            *pin_gateway,
                            &gateway_flags(plan),
                            Some(control.addr),
                        )?;
                        wait_for_trunks(&ingress, deadline)?;
                        env.ingress_addr = Some(ingress.addr);
                        env.ingress = Some(ingress.process);
                    }
                }
                if let (Some(_), Some(gateway)) = (plan.a2a, env.gateway_addr) {
                    let (child, url) = start_a2a(&pki, gateway, deadline)?;
                    env.a2a = Some(child);
                    env.a2a_url = Some(url);
                }
                eprintln!(
                    "dmsc-loadgen: {}{agents} echo agents (pid {}), direct listeners {}",
                    match (
                        &env.gateway,
                        env.gateway_addr,
                        env.gateway_workers,
                        &env.control
                    ) {
                        (Some(g), Some(addr), Some(w), Some(c)) => format!(
                            "control plane {} (pid {}, generation {}), gateway {addr} ({w} \
                             workers, pid {}), ",
                            c.addr,
                            c.process.pid(),
                            short(&c.generation),
                            g.pid()
                        ),
                        (Some(g), Some(addr), Some(w), None) =>
                            format!("gateway {addr} ({w} workers, pid {}), ", g.pid()),
                        _ => String::new(),
                    },
                    env.agents.as_ref().map_or(0, ChildProcess::pid),
                    env.direct
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                let _ = std::io::stderr().flush();
                env.pki = Some(pki);
                Ok(env)
            }
        }
    }

    fn self_contained(&self) -> bool {
        self.agents.is_some()
    }

    /// CPU so far of this process, the gateway and the agents.
    fn cpu(
        &self,
    ) -> (
        Option<cpu::CpuTime>,
        Option<cpu::CpuTime>,
        Option<cpu::CpuTime>,
    ) {
        let of = |child: &Option<ChildProcess>| child.as_ref().and_then(|c| cpu::process(c.pid()));
        // Both gateways count as the gateway role (the first one idles in one-gateway rounds).
        let gateways = match (of(&self.gateway), &self.ingress) {
            (Some(g), Some(_)) => of(&self.ingress).map(|i| g.plus(i)),
            (g, _) => g,
        };
        (cpu::this_process(), gateways, of(&self.agents))
    }

    /// The packet and wake-up counters of every role now.
    fn counters(&self) -> counters::Snapshot {
        counters::Snapshot::take(
            self.gateway.as_ref().map(|g| (g.pid(), self.gateway_admin)),
            self.agents.as_ref().map(ChildProcess::pid),
        )
    }

    /// The child processes that are no longer running.
    fn exited(&mut self) -> Vec<&'static str> {
        [
            self.gateway.as_mut(),
            self.ingress.as_mut(),
            self.agents.as_mut(),
            self.control.as_mut().map(|c| &mut c.process),
            self.a2a.as_mut(),
        ]
        .into_iter()
        .flatten()
        .filter_map(|child| (!child.is_running()).then(|| child.role()))
        .collect()
    }
}

/// Starts `serve-a2a` against `gateway`; returns it with the front door's URL for the trivial
/// agent's capability, once the adapter has attached and the front door listens.
fn start_a2a(
    pki: &TempPki,
    gateway: SocketAddr,
    deadline: Instant,
) -> anyhow::Result<(ChildProcess, String)> {
    let mut args = os_args(&["serve-a2a", "--gateway", &gateway.to_string(), "--ca"]);
    args.push(pki.ca.clone().into());
    args.push("--adapter".into());
    args.push(pki.a2a_agent.cert.clone().into());
    args.push(pki.a2a_agent.key.clone().into());
    args.push("--front".into());
    args.push(pki.a2a_front.cert.clone().into());
    args.push(pki.a2a_front.key.clone().into());
    let mut child = ChildProcess::spawn("a2a", &args)?;
    let (mut attached, mut front) = (false, None);
    while !attached || front.is_none() {
        let line = child.next_line("the A2A front door and adapter", deadline)?;
        if line.starts_with("dmsc-a2a adapt: attached:") {
            attached = true;
        } else if let Some(url) = line.strip_prefix("front ") {
            front = Some(url.trim().to_owned());
        } else {
            println!("a2a: {line}");
        }
    }
    let url = format!("{}/a2a/c/a2a-echo", front.unwrap_or_default());
    eprintln!(
        "dmsc-loadgen: A2A front door, adapter and agent (pid {}): {url}",
        child.pid()
    );
    Ok((child, url))
}

/// Waits until `ingress` (gateway 1 of `--gateways 2`) holds routes to capabilities behind
/// gateway 2 and a connected trunk to it from every worker, reading its admin metrics.
fn wait_for_trunks(ingress: &GatewayChild, deadline: Instant) -> anyhow::Result<()> {
    let Some(admin) = ingress.admin else {
        bail!("the first gateway serves no admin endpoint");
    };
    let url = format!("http://{admin}/metrics");
    loop {
        let text = ureq::get(&url)
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        let sum = |name: &str| -> f64 {
            text.lines()
                .filter(|l| l.starts_with(name) && !l.starts_with('#'))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        let remote = sum("dmsc_domain_remote_capabilities");
        let connected = sum("dmsc_trunk_connected");
        if remote >= 1.0 && connected >= ingress.workers as f64 {
            eprintln!(
                "dmsc-loadgen: gateway 1 routes {remote} capabilities over {connected} trunks to \
                 gateway 2"
            );
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "gateway 1 did not learn gateway 2's capabilities in time (remote capabilities \
                 {remote}, connected trunks {connected})"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `serve-gateway` flags a plan sets: busy polling, and the CPU of `--gateway-cpu`.
fn gateway_flags(plan: &Plan) -> Vec<(&'static str, usize)> {
    let mut flags = vec![("--busy-poll-us", plan.gateway_busy_poll_us as usize)];
    if let Some(cpu) = plan.gateway_cpu {
        flags.push(("--cpu", cpu));
    }
    flags
}

/// A gateway process started with the loadgen's PKI (`serve-gateway`).
#[derive(Debug)]
pub struct GatewayChild {
    /// The process.
    pub process: ChildProcess,
    /// Its listen address.
    pub addr: SocketAddr,
    /// Its worker threads.
    pub workers: usize,
    /// Its admin endpoint, when it serves one.
    pub admin: Option<SocketAddr>,
}

impl GatewayChild {
    /// Starts a gateway on a free loopback port with `workers` workers (pinned if `pin`), with
    /// the gateway identity of `pki`; `limits` are extra `serve-gateway` flags and their
    /// values (`--max-agents` ...). Returns once it listens.
    pub fn start(
        pki: &TempPki,
        number: usize,
        workers: usize,
        pin: bool,
        limits: &[(&str, usize)],
        control: Option<SocketAddr>,
    ) -> anyhow::Result<GatewayChild> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let id = crate::pki::gateway_id(number);
        let mut args = os_args(&[
            "serve-gateway",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            &workers.to_string(),
            "--domain",
            DOMAIN,
            "--gateway-id",
            id,
        ]);
        let files = if number == 2 {
            &pki.gateway2
        } else {
            &pki.gateway
        };
        push_files(&mut args, &files.cert, &files.key, &pki.ca);
        if pin {
            args.push("--pin".into());
        }
        for (flag, value) in limits {
            args.push(flag.into());
            args.push(value.to_string().into());
        }
        if let Some(control) = control {
            args.extend(os_args(&["--control", &control.to_string(), "--state-dir"]));
            args.push(pki.dir().join(format!("{id}-state")).into());
            args.push("--admin".into());
        }
        let role = if number == 2 { "gateway 2" } else { "gateway" };
        let mut process = ChildProcess::spawn(role, &args)?;
        if control.is_some() {
            process.expect("generation", deadline)?;
        }
        let addr = process
            .expect("listening", deadline)?
            .parse()
            .context("gateway address")?;
        let workers = process
            .expect("workers", deadline)?
            .parse()
            .context("workers")?;
        let admin = match control {
            Some(_) => Some(
                process
                    .expect("admin", deadline)?
                    .parse()
                    .context("gateway admin address")?,
            ),
            None => None,
        };
        Ok(GatewayChild {
            process,
            addr,
            workers,
            admin,
        })
    }
}

/// A control plane process (`serve-control`) serving the loadgen's domain configuration.
#[derive(Debug)]
pub struct ControlChild {
    /// The process.
    pub process: ChildProcess,
    /// Its `dmsc-ctl/1` address.
    pub addr: SocketAddr,
    /// Its admin address.
    pub admin: SocketAddr,
    /// The generation it compiled at start.
    pub generation: String,
}

impl ControlChild {
    /// Starts a control plane for `pki`'s domain configuration; returns once it listens.
    pub fn start(pki: &TempPki) -> anyhow::Result<ControlChild> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut args = os_args(&["serve-control", "--config"]);
        args.push(pki.domain_toml.clone().into());
        push_files(&mut args, &pki.control.cert, &pki.control.key, &pki.ca);
        let mut process = ChildProcess::spawn("control plane", &args)?;
        let addr = process
            .expect("listening", deadline)?
            .parse()
            .context("control plane address")?;
        let admin = process
            .expect("admin", deadline)?
            .parse()
            .context("control plane admin address")?;
        let generation = process.expect("generation", deadline)?;
        Ok(ControlChild {
            process,
            addr,
            admin,
            generation,
        })
    }

    /// The generation every listed gateway has acknowledged, if they all agree.
    pub fn acknowledged(&self) -> Option<String> {
        let body = ureq::get(&format!("http://{}/status", self.admin))
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        let status: serde_json::Value = serde_json::from_str(&body).ok()?;
        let gateways = status["gateways"].as_array()?;
        let first = gateways.first()?["acked_generation"].as_str()?.to_owned();
        gateways
            .iter()
            .all(|g| g["acked_generation"] == first.as_str())
            .then_some(first)
    }
}

/// Installs a new table generation every `every` until stopped: rewrites the domain
/// configuration and applies it through the control plane, waiting for the gateway's ACK.
struct Swapper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
}

impl Swapper {
    fn start(pki: &TempPki, admin: SocketAddr, every: Duration) -> anyhow::Result<Swapper> {
        let stop = Arc::new(AtomicBool::new(false));
        let domain_toml = pki.domain_toml.clone();
        let ca = pki.ca.clone();
        let gateways = pki.gateways();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("table-swapper".into())
            .spawn(move || {
                let (mut acked, mut failed) = (0u64, 0u64);
                let mut version = 1u64;
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                let url = format!("http://{admin}/apply?wait_ms=5000");
                while !flag.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let ok = TempPki::write_domain_at(&domain_toml, &ca, version, gateways).is_ok()
                        && agent.post(&url).send_empty().is_ok_and(|mut r| {
                            r.status() == 200
                                && r.body_mut().read_to_string().is_ok_and(|b| {
                                    b.contains("\"acked\"") && !b.contains("\"pending\"")
                                })
                        });
                    if ok {
                        acked += 1;
                    } else {
                        failed += 1;
                    }
                    version += 1;
                    std::thread::sleep(every.saturating_sub(started.elapsed()));
                }
                (acked, failed)
            })
            .context("starting the table swapper")?;
        Ok(Swapper { stop, thread })
    }

    /// Stops and returns (generations acknowledged, swaps that failed).
    fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

/// The first 12 hex digits of a generation.
pub fn short(generation: &str) -> &str {
    &generation[..generation.len().min(12)]
}

fn os_args(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn push_files(args: &mut Vec<OsString>, cert: &Path, key: &Path, ca: &Path) {
    for (flag, path) in [("--cert", cert), ("--key", key), ("--ca", ca)] {
        args.push(flag.into());
        args.push(path.into());
    }
}

/// A one-line description of the load, for messages.
pub fn describe(load: Load) -> String {
    match load {
        Load::Closed { concurrency } => format!("{concurrency} in flight"),
        Load::Open { rate } => format!("{rate} requests/s"),
    }
}

/// Printed before the run starts.
pub fn banner(plan: &Plan) -> String {
    let what = match plan.runs {
        Runs::Single(route) => format!("{} mode", route.name()),
        Runs::Compare { rounds } => format!("compare, {rounds} rounds per mode"),
    };
    format!(
        "dmsc-loadgen: {what}, {}, {} B -> {} B, warm-up {}, measure {}",
        describe(plan.load),
        plan.request_bytes,
        plan.response_bytes,
        format_duration(plan.warmup),
        format_duration(plan.duration)
    )
}
