//! Random sequences of operations against three cores, from fixed seeds so every failure
//! replays: agents attach with random capabilities, open lanes or not, invoke each other with
//! random sizes and deadlines, change how they serve, stop reading, die silently, close; workers
//! stall and resume; time jumps. Whatever happens, every invocation a live caller made ends
//! (with a status or a reset), nothing panics, and once every agent has gone the cores hold no
//! exchange, no connection, no agent and no queued message.

use std::time::Duration;

use super::harness::{Harness, Invocation, Serve};
use super::{config, Limits};

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const CAPABILITIES: [&str; 4] = ["alpha", "beta", "gamma", "nobody"];
const SIZES: [usize; 5] = [0, 10, 1_500, 20_000, 300_000];
const DEADLINES: [u64; 4] = [0, 150, 600, 2_500];

fn add_agent(h: &mut Harness, rng: &mut Rng, n: usize) -> usize {
    let first = *rng.pick(&CAPABILITIES[..3]);
    let second = *rng.pick(&CAPABILITIES[..3]);
    let caps: Vec<&str> = if first == second {
        vec![first]
    } else {
        vec![first, second]
    };
    let home = rng.below(h.nodes.len());
    h.agent(&format!("agent{n}"), &caps, home)
}

fn soak(seed: u64) {
    let limits = Limits {
        default_deadline_ms: 1_000,
        max_deadline_ms: 2_000,
        peer_timeout_ms: 1_500,
        stall_timeout_ms: 1_000,
        handoff_queue: 32,
        ..Limits::default()
    };
    let mut h = Harness::new(3, config(limits));
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut agents: Vec<usize> = Vec::new();
    for n in 0..6 {
        agents.push(add_agent(&mut h, &mut rng, n));
    }
    h.run();
    let mut lanes_opened = Vec::new();
    let payload = vec![0x5a; *SIZES.iter().max().unwrap()];
    for _ in 0..120 {
        let a = *rng.pick(&agents);
        match rng.below(100) {
            0..=44 => {
                if h.agents[a].dead || h.agents[a].session.is_none() {
                    continue;
                }
                let size = *rng.pick(&SIZES);
                let capability = *rng.pick(&CAPABILITIES);
                let mut request = Invocation::new(capability, &payload[..size]);
                request.deadline_ms = *rng.pick(&DEADLINES);
                request.fin = rng.below(10) != 0;
                if rng.below(3) == 0 && lanes_opened.contains(&a) {
                    request.lane = Some(rng.below(h.nodes.len()));
                }
                h.invoke_with(a, &request);
            }
            45..=56 => {
                let modes = [
                    Serve::Echo,
                    Serve::Echo,
                    Serve::Bytes(5_000),
                    Serve::Hold,
                    Serve::Ignore,
                    Serve::Reset(0x42),
                    Serve::Finish,
                    Serve::Begin(100),
                ];
                h.agents[a].serve = *rng.pick(&modes);
            }
            57..=61 => {
                if h.agents[a].session.is_some() && !lanes_opened.contains(&a) {
                    h.open_lanes(a);
                    lanes_opened.push(a);
                }
            }
            62..=63 => h.agents[a].dead = true,
            64..=65 => h.close(a),
            66..=68 => {
                let w = rng.below(h.nodes.len());
                h.nodes[w].paused = !h.nodes[w].paused;
            }
            69..=71 => h.agents[a].read_responses = !h.agents[a].read_responses,
            72..=73 => {
                let n = agents.len();
                agents.push(add_agent(&mut h, &mut rng, n));
            }
            _ => h.advance(Duration::from_millis(1 + rng.below(400) as u64)),
        }
        h.run();
    }
    // Heal: every worker runs, every live agent reads and answers, time passes beyond every
    // deadline, peer timeout and stall timeout.
    for node in &mut h.nodes {
        node.paused = false;
    }
    for &a in &agents {
        h.agents[a].read_responses = true;
        h.agents[a].serve = Serve::Echo;
    }
    h.advance(Duration::from_secs(8));
    for &a in &agents {
        if h.agents[a].dead {
            continue;
        }
        for (i, call) in h.agents[a].calls.iter().enumerate() {
            if call.was_sent() {
                assert!(
                    call.finished,
                    "seed {seed}: call {i} of agent {a} never ended: {call:?}"
                );
            }
        }
    }
    // Everyone leaves; the gateway must be back to empty.
    for &a in &agents {
        h.close(a);
    }
    // Closing connections drain for three PTOs, and a stalled worker inflates RTT estimates.
    h.advance(Duration::from_secs(30));
    for (w, node) in h.nodes.iter_mut().enumerate() {
        if node.core.connections() != 0 {
            eprintln!("{:#?}", node.core.describe_connections());
        }
        let core = &node.core;
        assert_eq!(
            core.exchanges_len(),
            0,
            "seed {seed}: worker {w} holds exchanges"
        );
        assert_eq!(
            core.connections(),
            0,
            "seed {seed}: worker {w} holds connections"
        );
        assert!(
            !core.has_messages(),
            "seed {seed}: worker {w} holds messages"
        );
    }
    assert_eq!(
        h.shared.agents.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "seed {seed}: agents still counted"
    );
}

/// Twelve seeds by default; `DMSC_SOAK_SEEDS=N` runs seeds 1 to N (a longer hunt).
#[test]
fn random_operation_sequences_lose_nothing_and_leave_nothing_behind() {
    let seeds = std::env::var("DMSC_SOAK_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(12u64);
    for seed in 1..=seeds {
        soak(seed);
    }
}
