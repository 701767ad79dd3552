//! Micro-benchmarks of the control plane's table compiler and of the table evaluation steps a
//! gateway runs per connection (`groups_of`), per new capability (`policy_column`) and per
//! request (a capability lookup and `allowed`). See docs/CONTROL.md for the model.
//!
//! The domain: 100,000 agents with 10 capabilities each. Each agent is one exact membership
//! pattern (`spiffe://bench.local/agent/agent-NNNNNN`) in one of 200 team groups, plus a prefix
//! pattern that puts every agent in the group `all`. Its capabilities are exact `advertise`
//! entries of its team: agent `i` offers `cap-((10 i + k) mod 100,000)`, `k < 10`, so the table
//! interns 100,000 capability names, each offered by ten agents (1,000,000 advertise entries
//! before deduplication). Invocation: `all` may invoke everything, odd teams are denied
//! `cap-09*`, and every team is denied one exact capability; each team has a rate limit.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hashbrown::HashMap;

use dmsc_controlplane::compile::compile;
use dmsc_controlplane::config::{
    DomainConfig, DomainSection, Effect, GroupConfig, InvokeRule, RateLimitConfig, Spanned,
};
use dmsc_protocol::spiffe::SpiffeId;
use dmsc_protocol::table::{allowed, Column, Table};

const DOMAIN: &str = "bench.local";
const AGENTS: usize = 100_000;
const CAPS_PER_AGENT: usize = 10;
const CAPABILITIES: usize = 100_000;
const TEAMS: usize = 200;

fn s(v: impl Into<String>) -> Spanned<String> {
    Spanned::new(0..0, v.into())
}

fn cap(i: usize) -> String {
    format!("cap-{i:06}")
}

fn domain() -> DomainConfig {
    let mut groups = std::collections::BTreeMap::new();
    let mut teams: Vec<GroupConfig> = (0..TEAMS).map(|_| GroupConfig::default()).collect();
    for i in 0..AGENTS {
        let team = &mut teams[i % TEAMS];
        team.members
            .push(s(format!("spiffe://{DOMAIN}/agent/agent-{i:06}")));
        for k in 0..CAPS_PER_AGENT {
            team.advertise
                .push(s(cap((CAPS_PER_AGENT * i + k) % CAPABILITIES)));
        }
    }
    let mut invoke = vec![InvokeRule {
        effect: Effect::Allow,
        groups: vec![s("all")],
        capabilities: vec![s("*")],
    }];
    for (t, mut team) in teams.into_iter().enumerate() {
        team.discover.push(s("*"));
        team.rate_limit = Some(Spanned::new(
            0..0,
            RateLimitConfig {
                per_second: 100 + t as u32,
                burst: None,
            },
        ));
        let name = format!("team-{t:03}");
        let mut denied = vec![s(cap(t * 7))];
        if t % 2 == 1 {
            denied.push(s("cap-09*"));
        }
        invoke.push(InvokeRule {
            effect: Effect::Deny,
            groups: vec![s(name.clone())],
            capabilities: denied,
        });
        groups.insert(s(name), team);
    }
    groups.insert(
        s("all"),
        GroupConfig {
            members: vec![s(format!("spiffe://{DOMAIN}/agent/*"))],
            ..Default::default()
        },
    );
    DomainConfig {
        domain: DomainSection {
            name: s(DOMAIN),
            trust_anchor: s("ca.pem"),
        },
        gateway: vec![dmsc_controlplane::config::GatewayConfig { id: s("gw1") }],
        groups,
        invoke,
        capabilities: Vec::new(),
    }
}

fn compile_and_decode(c: &mut Criterion, config: &DomainConfig, table: &Table) {
    let mut g = c.benchmark_group("table");
    g.sample_size(10);
    g.bench_function("compile_100k_agents_x10", |b| {
        b.iter(|| black_box(compile(black_box(config)).unwrap().generation()))
    });
    g.bench_function("decode_validate_100k_agents_x10", |b| {
        b.iter(|| {
            black_box(
                Table::decode(black_box(table.encoded()))
                    .unwrap()
                    .generation(),
            )
        })
    });
    g.finish();
}

fn evaluate(c: &mut Criterion, table: &Table) {
    let mut g = c.benchmark_group("table_eval");
    g.throughput(Throughput::Elements(1));
    let caller = SpiffeId::agent(DOMAIN, "agent-054321").unwrap();
    g.bench_function("groups_of", |b| {
        b.iter(|| black_box(table.groups_of(black_box(&caller))))
    });
    g.bench_function("policy_column_new_capability", |b| {
        b.iter(|| black_box(table.policy_column(black_box("cap-new-never-seen"))))
    });
    g.bench_function("policy_column_interned_capability", |b| {
        b.iter(|| black_box(table.policy_column(black_box("cap-054321"))))
    });
    let groups = table.groups_of(&caller);
    let column = table.policy_column("cap-012345");
    g.bench_function("allowed", |b| {
        b.iter(|| black_box(allowed(black_box(&groups), black_box(&column))))
    });
    // What a worker does per request once columns are cached: one hash lookup by capability
    // name among 100,000, then the bit test.
    let columns: HashMap<Box<str>, Column> = table
        .parts()
        .capabilities
        .iter()
        .map(|name| (name.as_str().into(), table.policy_column(name)))
        .collect();
    let names: Vec<String> = (0..1024).map(|i| cap((i * 977) % CAPABILITIES)).collect();
    let mut n = 0;
    g.bench_function("lookup_and_allowed_100k_capabilities", |b| {
        b.iter(|| {
            n = (n + 1) & 1023;
            let col = columns.get(names[n].as_str());
            black_box(col.is_some_and(|col| allowed(&groups, col)))
        })
    });
    // The same lookups without the bit test, to separate the two costs.
    g.bench_function("lookup_only_100k_capabilities", |b| {
        b.iter(|| {
            n = (n + 1) & 1023;
            black_box(columns.get(names[n].as_str()).is_some())
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let config = domain();
    let table = compile(&config).unwrap();
    eprintln!(
        "table: {} bytes, {} capabilities, {} members, {} exact rules, {} wildcard rules",
        table.encoded().len(),
        table.parts().capabilities.len(),
        table.parts().members.len(),
        table.parts().exact_rules.len(),
        table.parts().wildcard_rules.len(),
    );
    compile_and_decode(c, &config, &table);
    evaluate(c, &table);
}

criterion_group!(table_benches, benches);
criterion_main!(table_benches);
