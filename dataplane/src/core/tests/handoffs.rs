//! Hand-off and control-stream cases found by reviewing the core: late messages from a twin,
//! the home worker's count, progress seen only as acknowledgements, and answers that must not
//! pile up.

use std::time::Duration;

use quinn_proto::{TransportConfig, VarInt};

use dmsc_protocol::card::{AgentCard, Skill};
use dmsc_protocol::control::ControlFrame;
use dmsc_protocol::{Status, StreamCode};

use super::config;
use super::harness::{Harness, Invocation, Serve};
use crate::config::Limits;

/// The caller's worker answered DEADLINE_EXCEEDED (still queued: the caller reads slowly) when
/// the home's message with the target's late answer arrives: it is dropped, never appended to
/// the gateway's answer (a gateway answer carries no payload, PROTOCOL.md 7.5).
#[test]
fn a_twin_s_late_answer_is_not_appended_to_a_deadline_answer() {
    let mut h = Harness::new(2, config(Limits::default()));
    let b = h.agent("b", &["echo"], 1);
    let mut small = TransportConfig::default();
    small.stream_receive_window(VarInt::from_u32(16));
    let a = h.agent_with("a", &["other"], 0, small);
    h.run();
    h.agents[b].serve = Serve::Hold;
    h.agents[a].read_responses = false;
    let call = h.invoke_with(
        a,
        &Invocation {
            deadline_ms: 100,
            ..Invocation::new("echo", b"payload-of-the-request")
        },
    );
    h.run();
    assert_eq!(h.agents[b].incoming.len(), 1);
    // The home reads the target's answer and posts it; the caller's worker has not taken it.
    h.nodes[0].paused = true;
    h.agents[b].serve = Serve::Echo;
    h.run();
    let late: Vec<_> = h.nodes[0].inbox.drain(..).collect();
    assert!(!late.is_empty());
    h.nodes[0].paused = false;
    h.advance(Duration::from_millis(150));
    h.nodes[0].inbox.extend(late);
    h.run();
    h.agents[a].read_responses = true;
    assert!(h.run_until(Duration::from_secs(2), |h| h.agents[a].calls[call].finished));
    let c = &h.agents[a].calls[call];
    assert_eq!(c.status(), Some(Status::DeadlineExceeded));
    assert!(c.payload().is_empty(), "{:?}", c.payload());
}

/// PROTOCOL.md 6.2: the home worker accepts a hand-off even when its own count for the agent is
/// at the limit (the handing worker applied the limit to its own count).
#[test]
fn the_home_worker_accepts_a_hand_off_at_its_own_limit() {
    let mut h = Harness::new(2, config(Limits::default()));
    let b = h.agent("b", &["echo"], 1);
    h.agents[b].max_concurrent = 1;
    let c = h.agent("c", &["other"], 1);
    let a = h.agent("a", &["other2"], 0);
    h.run();
    h.agents[b].serve = Serve::Hold;
    let _held = h.invoke(c, "echo", b"x");
    h.run();
    assert_eq!(h.agents[b].incoming.len(), 1);
    let handed = h.invoke(a, "echo", b"y");
    h.run();
    assert_eq!(
        h.agents[b].incoming.len(),
        2,
        "{:?}",
        h.agents[a].calls[handed]
    );
}

/// A caller that reads a big answer slowly (some bytes every 400 ms) is not stalled, whether
/// the target is reached over a lane or by hand-off, where the target's side sees the caller's
/// progress only as acknowledgements.
#[test]
fn a_slow_but_steady_reader_is_not_ended_as_stalled() {
    for lanes in [true, false] {
        let limits = Limits {
            stall_timeout_ms: 1_000,
            ..Limits::default()
        };
        let mut h = Harness::new(2, config(limits));
        let b = h.agent("b", &["echo"], 1);
        let mut small = TransportConfig::default();
        small.stream_receive_window(VarInt::from_u32(32 * 1024));
        let a = h.agent_with("a", &["other"], 0, small);
        h.run();
        if lanes {
            h.open_lanes(b);
            h.run();
        }
        h.agents[b].serve = Serve::Begin(400 * 1024);
        h.agents[a].read_responses = false;
        let call = h.invoke(a, "echo", b"");
        h.run();
        for _ in 0..12 {
            h.advance(Duration::from_millis(400));
            h.agents[a].read_responses = true;
            h.step();
            h.agents[a].read_responses = false;
            h.run();
        }
        let c = &h.agents[a].calls[call];
        assert_ne!(c.reset, Some(StreamCode::Stalled.code()), "lanes={lanes}");
        assert!(
            c.response.len() > 350 * 1024,
            "lanes={lanes}: {}",
            c.response.len()
        );
    }
}

/// Pipelined DISCOVERs with large answers: the gateway holds at most one answer for an agent
/// that does not read, whatever the answers' size.
#[test]
fn pipelined_discovers_with_large_answers_hold_one_answer_at_most() {
    let mut h = Harness::new(1, config(Limits::default()));
    let description = "d".repeat(1_000);
    for i in 0..8 {
        let card = (0..32).fold(AgentCard::new(format!("big{i}"), "d", "1"), |card, j| {
            let id = format!("capability-{i}-{j}");
            card.with_skill(Skill::new(id.clone(), id).with_description(description.clone()))
        });
        h.agent_with_card(&format!("big{i}"), card, 0, TransportConfig::default());
    }
    let mut small = TransportConfig::default();
    small.stream_receive_window(VarInt::from_u32(4096));
    let flooder = h.agent_with("flood", &["f"], 0, small);
    h.run();
    h.agents[flooder].read_control = false;
    h.send_discovers(flooder, 16);
    h.advance(Duration::from_millis(200));
    let backlog = h.nodes[0].core.control_backlog();
    // One answer is about 260 KB here (256 entries of 1 KB descriptions).
    assert!(
        backlog < 300_000,
        "{backlog} bytes of answers queued in the gateway"
    );
    h.agents[flooder].read_control = true;
    assert!(h.run_until(Duration::from_secs(10), |h| {
        h.agents[flooder].discover_answers() == 16
    }));
}

/// Frames that follow a refused ATTACH in the same read are not acted on: the connection is
/// closing with the refusal. (Seen from another worker: no attach is ever announced to it.)
#[test]
fn frames_after_a_refused_attach_are_ignored() {
    let mut h = Harness::new(2, config(Limits::default()));
    h.run();
    h.nodes[1].paused = true;
    let bad = AgentCard::new("bad", "d", "1");
    let b = h.agent_with_card("bad", bad, 0, TransportConfig::default());
    let good = AgentCard::new("bad", "d", "1").with_skill(Skill::new("sneaky", "sneaky"));
    h.agents[b].queue_after_attach(&ControlFrame::Attach {
        max_concurrent: 0,
        card: good.to_json(),
    });
    h.advance(Duration::from_millis(100));
    assert!(h.agents[b].session.is_none());
    let announced = h.nodes[1]
        .inbox
        .iter()
        .filter(|m| matches!(m, crate::msg::WorkerMsg::AgentUp(_)))
        .count();
    assert_eq!(announced, 0, "the pipelined ATTACH was acted on");
}
