//! Deterministic tests of the core: several cores and in-memory QUIC agents on a virtual clock.

mod alloc;
mod handoffs;
mod harness;
mod soak;
mod statuses;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use quinn_proto::{TransportConfig, VarInt};

use dmsc_protocol::control::ControlFrame;
use dmsc_protocol::{ConnectionCode, Status, StreamCode};

use crate::config::{Config, Limits};
use harness::{Harness, Serve};

/// One core with nothing attached, for tests of the I/O shell.
pub(crate) fn single_core() -> (super::Core, std::sync::Arc<crate::stats::WorkerStats>) {
    let mut h = Harness::new(1, Config::default());
    let stats = h.shared.stats[0].clone();
    (h.nodes.remove(0).core, stats)
}

fn config(limits: Limits) -> Config {
    Config {
        limits,
        ..Config::default()
    }
}

/// Two cores; `b` offers `echo` with its primary on core 1, `a` calls from core 0.
fn pair(limits: Limits) -> (Harness, usize, usize) {
    let mut h = Harness::new(2, config(limits));
    let b = h.agent("b", &["echo"], 1);
    let a = h.agent("a", &["other"], 0);
    h.run();
    assert!(h.agents[a].session.is_some() && h.agents[b].session.is_some());
    (h, a, b)
}

#[test]
fn a_request_crosses_cores_by_hand_off_until_the_target_opens_lanes() {
    let (mut h, a, b) = pair(Limits::default());
    let call = h.invoke(a, "echo", b"hello");
    h.run();
    let c = &h.agents[a].calls[call];
    assert_eq!(c.status(), Some(Status::Ok));
    assert_eq!(c.payload(), b"hello");
    assert_eq!(h.stats(0).handoffs.load(Relaxed), 1);

    h.open_lanes(b);
    h.run();
    let call = h.invoke(a, "echo", b"again");
    h.run();
    assert_eq!(h.agents[a].calls[call].payload(), b"again");
    assert_eq!(h.stats(0).handoffs.load(Relaxed), 1, "the lane carries it");
    assert_eq!(h.stats(0).forwarded_local.load(Relaxed), 1);
}

#[test]
fn large_bodies_cross_a_hand_off_within_the_credit_window_and_in_batches() {
    let (mut h, a, _b) = pair(Limits::default());
    let body: Vec<u8> = (0..3 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let before = h.messages;
    let call = h.invoke(a, "echo", &body);
    assert!(
        h.run_until(Duration::from_secs(10), |h| h.agents[a].calls[call]
            .finished)
    );
    let c = &h.agents[a].calls[call];
    assert_eq!(c.status(), Some(Status::Ok));
    assert!(c.payload() == &body[..], "the body arrives byte-exact");
    // 6 MiB crossed in both directions; chunks read together travel together.
    let messages = h.messages - before;
    assert!(messages < 2_000, "{messages} hand-off messages for 6 MiB");
}

#[test]
fn gateway_answers_no_route_and_bad_request() {
    let (mut h, a, _b) = pair(Limits::default());
    let call = h.invoke(a, "nobody", b"");
    h.run();
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::NoRoute));
}

/// Defect 1: an agent that pipelines `DISCOVER`s and never reads its control stream must not
/// grow the gateway's memory: the gateway stops reading its control stream.
#[test]
fn a_discover_flood_from_an_agent_that_does_not_read_is_bounded() {
    let mut h = Harness::new(1, config(Limits::default()));
    let mut small = TransportConfig::default();
    small.stream_receive_window(VarInt::from_u32(4096));
    let flooder = h.agent_with("flood", &["f"], 0, small);
    for i in 0..20 {
        h.agent(
            &format!("x{i}"),
            &[&format!("capability-with-a-long-name-{i}")],
            0,
        );
    }
    h.run();
    h.agents[flooder].read_control = false;
    h.send_discovers(flooder, 2_000);
    h.advance(Duration::from_millis(200));
    let backlog = h.nodes[0].core.control_backlog();
    assert!(
        backlog < 64 * 1024,
        "{backlog} bytes of answers queued in the gateway"
    );
    assert!(h.agents[flooder].closed.is_empty(), "the connection stays");
    // Others are still served meanwhile.
    let other = h.agent("other", &["echo"], 0);
    h.run();
    let call = h.invoke(other, "echo", b"x");
    h.run();
    assert_eq!(h.agents[other].calls[call].status(), Some(Status::Ok));
    // Once the agent reads, every query is answered.
    h.agents[flooder].read_control = true;
    assert!(h.run_until(Duration::from_secs(5), |h| {
        h.agents[flooder].discover_answers() == 2_000
    }));
}

/// Defect 2: a caller that does not read its answers holds only its own stream's share of the
/// target connection's window, and its exchange ends with `STALLED` after the stall timeout.
#[test]
fn a_caller_that_does_not_read_cannot_block_other_callers_and_is_ended_as_stalled() {
    let limits = Limits {
        stall_timeout_ms: 2_000,
        ..Limits::default()
    };
    let mut h = Harness::new(1, config(limits));
    let target = h.agent("big", &["big"], 0);
    h.agents[target].serve = Serve::Bytes(1024 * 1024);
    let mut small = TransportConfig::default();
    small.stream_receive_window(VarInt::from_u32(64 * 1024));
    let slow = h.agent_with("slow", &["slow"], 0, small);
    let fast = h.agent("fast", &["fast"], 0);
    h.run();
    h.agents[slow].read_responses = false;
    let stuck: Vec<usize> = (0..20).map(|_| h.invoke(slow, "big", b"")).collect();
    h.advance(Duration::from_millis(100));
    let call = h.invoke(fast, "big", b"");
    assert!(
        h.run_until(Duration::from_secs(1), |h| h.agents[fast].calls[call]
            .finished)
    );
    assert_eq!(h.agents[fast].calls[call].payload().len(), 1024 * 1024);
    // The stuck exchanges end with STALLED once the stall timeout passes.
    h.advance(Duration::from_secs(3));
    assert_eq!(h.stats(0).stalled.load(Relaxed), stuck.len() as u64);
    h.agents[slow].read_responses = true;
    h.run();
    for id in stuck {
        let c = &h.agents[slow].calls[id];
        assert_eq!(c.reset, Some(StreamCode::Stalled.code()), "{c:?}");
    }
}

/// Defect 3: an agent that dies without closing is detected by the gateway's keep-alives
/// within the peer timeout; its requests fail with `TARGET_FAILED` then, not at their deadline.
#[test]
fn a_silent_agent_is_detected_and_its_requests_fail_at_once() {
    let limits = Limits {
        peer_timeout_ms: 1_500,
        ..Limits::default()
    };
    let (mut h, a, b) = pair(limits);
    h.agents[b].dead = true;
    let call = h.invoke(a, "echo", b"are you there");
    let start = h.now;
    assert!(
        h.run_until(Duration::from_secs(10), |h| h.agents[a].calls[call]
            .finished)
    );
    let took = h.now - start;
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::TargetFailed));
    assert!(took <= Duration::from_millis(2_000), "took {took:?}");
    assert_eq!(h.stats(1).unresponsive_peers.load(Relaxed), 1);
    // It is no longer routable.
    let call = h.invoke(a, "echo", b"");
    h.run();
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::NoRoute));
}

/// Defect 4: right after the gateway closes an agent's connection, requests get `NO_ROUTE`
/// (not `OVERLOADED`), and the identity may reconnect at once.
#[test]
fn a_connection_the_gateway_closes_is_unrouted_and_uncounted_at_once() {
    let limits = Limits {
        max_connections_per_identity: 1,
        ..Limits::default()
    };
    let mut h = Harness::new(1, config(limits));
    let b = h.agent("b", &["echo"], 0);
    let a = h.agent("a", &["a"], 0);
    h.run();
    // A second ATTACH on an attached connection is refused without closing; an unexpected
    // frame (LANE_OK from an agent) is a protocol violation that closes the connection.
    h.send_control(b, &ControlFrame::LaneOk { worker: 0 });
    let call = h.invoke(a, "echo", b"");
    h.run();
    assert_eq!(
        h.agents[b].closed,
        vec![ConnectionCode::ProtocolViolation.code()]
    );
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::NoRoute));
    // The same identity attaches again at once.
    let again = h.agent("b", &["echo"], 0);
    h.run();
    assert!(
        h.agents[again].session.is_some(),
        "{:?}",
        h.agents[again].closed
    );
}

/// Defect 6 (core side): work left by a budget is visible in the poll timeout.
#[test]
fn control_work_over_the_budget_is_deferred_and_resumed() {
    let mut h = Harness::new(1, config(Limits::default()));
    let a = h.agent("a", &["x"], 0);
    h.run();
    h.send_discovers(a, 600);
    h.run();
    let answers = h.agents[a].discover_answers();
    assert_eq!(answers, 600);
}

/// Defect 7: a worker whose inbox is not drained delays only hand-offs to itself; new ones get
/// `OVERLOADED` once its outbox is full, and hand-offs to other workers go on.
#[test]
fn a_stalled_worker_delays_only_its_own_hand_offs() {
    let limits = Limits {
        handoff_queue: 16,
        ..Limits::default()
    };
    let mut h = Harness::new(3, config(limits));
    let on1 = h.agent("one", &["one"], 1);
    let on2 = h.agent("two", &["two"], 2);
    let caller = h.agent("caller", &["caller"], 0);
    h.run();
    let _ = (on1, on2);
    h.nodes[1].paused = true;
    let to1: Vec<usize> = (0..40).map(|_| h.invoke(caller, "one", b"")).collect();
    h.advance(Duration::from_millis(50));
    let overloaded = to1
        .iter()
        .filter(|&&c| h.agents[caller].calls[c].status() == Some(Status::Overloaded))
        .count();
    assert!(
        overloaded > 0,
        "new hand-offs to the full outbox are refused"
    );
    let call = h.invoke(caller, "two", b"still");
    h.run();
    assert_eq!(h.agents[caller].calls[call].payload(), b"still");
    // The worker resumes: every request accepted for it is answered.
    h.nodes[1].paused = false;
    assert!(h.run_until(Duration::from_secs(5), |h| to1
        .iter()
        .all(|&c| h.agents[caller].calls[c].finished)));
    let ok = to1
        .iter()
        .filter(|&&c| h.agents[caller].calls[c].status() == Some(Status::Ok))
        .count();
    assert_eq!(ok + overloaded, to1.len(), "nothing accepted is lost");
}

/// Defect 8: above the threshold, a new connection is asked to validate its address first.
#[test]
fn new_connections_above_the_threshold_get_a_retry_and_still_attach() {
    let limits = Limits {
        retry_above_connections: 0,
        ..Limits::default()
    };
    let mut h = Harness::new(1, config(limits));
    let a = h.agent("a", &["x"], 0);
    h.run();
    assert!(h.agents[a].session.is_some());
    assert_eq!(h.stats(0).retries.load(Relaxed), 1);
}

/// Detach is counted across workers: `DETACHED` comes once every worker is done with the agent.
#[test]
fn detach_waits_for_requests_in_flight_on_every_worker() {
    let (mut h, a, b) = pair(Limits::default());
    h.open_lanes(b);
    h.run();
    h.agents[b].serve = Serve::Ignore;
    let call = h.invoke(a, "echo", b"");
    h.run();
    h.send_control(b, &ControlFrame::Detach);
    h.run();
    let detached = |h: &Harness| {
        h.agents[b]
            .frames
            .iter()
            .any(|f| matches!(f, ControlFrame::Detached))
    };
    assert!(!detached(&h), "a request is still in flight on worker 0");
    // New requests no longer reach it.
    let late = h.invoke(a, "echo", b"");
    h.run();
    assert_eq!(h.agents[a].calls[late].status(), Some(Status::NoRoute));
    // The request in flight ends (its deadline), then DETACHED follows.
    h.advance(Duration::from_secs(31));
    assert_eq!(
        h.agents[a].calls[call].status(),
        Some(Status::DeadlineExceeded)
    );
    assert!(detached(&h));
}

/// Drain: no new requests, in-flight ones finish, then every connection closes.
#[test]
fn drain_finishes_in_flight_requests_then_closes() {
    let (mut h, a, b) = pair(Limits::default());
    h.agents[b].serve = Serve::Ignore;
    let call = h.invoke(a, "echo", b"");
    h.run();
    for w in 0..2 {
        h.nodes[w].core.handle_message(
            h.now,
            crate::msg::WorkerMsg::Drain {
                grace: Duration::from_secs(1),
            },
        );
    }
    h.run();
    assert!(h.agents[b]
        .frames
        .iter()
        .any(|f| matches!(f, ControlFrame::Drain { .. })));
    let refused = h.invoke(a, "echo", b"");
    h.run();
    assert_eq!(
        h.agents[a].calls[refused].status(),
        Some(Status::Unavailable)
    );
    h.advance(Duration::from_secs(2));
    assert!(h.agents[a].calls[call].finished);
    assert!(h.agents[a]
        .closed
        .contains(&ConnectionCode::ShuttingDown.code()));
}

/// A request header split across many packets is reassembled.
#[test]
fn a_header_split_across_packets_is_reassembled() {
    let (mut h, a, _b) = pair(Limits::default());
    let call = h.invoke_in_pieces(a, None, "echo", b"payload", 3);
    h.run();
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::Ok));
    assert_eq!(h.agents[a].calls[call].payload(), b"payload");
}

/// Heap allocations the gateway's cores (quinn-proto included) make per forwarded request,
/// pinned so that a change that adds one shows up. Measured over many small requests on a
/// warm gateway, local path (lanes) and hand-off path.
#[test]
fn allocations_per_forwarded_request_are_pinned() {
    for lanes in [true, false] {
        let (mut h, a, b) = pair(Limits::default());
        if lanes {
            h.open_lanes(b);
            h.run();
        }
        let payload = [7u8; 100];
        let mut calls = Vec::new();
        for _ in 0..50 {
            calls.push(h.invoke(a, "echo", &payload));
            h.run();
        }
        let before = alloc::count();
        let n = 200;
        for _ in 0..n {
            calls.push(h.invoke(a, "echo", &payload));
            h.run();
        }
        let per_request = (alloc::count() - before) as f64 / n as f64;
        assert!(calls
            .iter()
            .all(|&c| h.agents[a].calls[c].status() == Some(Status::Ok)));
        eprintln!("lanes={lanes}: {per_request:.1} allocations per forwarded request");
        let ceiling = 16.0;
        assert!(
            per_request <= ceiling,
            "lanes={lanes}: {per_request:.1} per request"
        );
    }
}

/// `dmsc_ack_only_sent_total` counts the packets that carried only an acknowledgement: the
/// harness's peers do not ask for a lower acknowledgement frequency, so a run of sequential
/// requests leaves the gateway some ACK-only packets to send, and every one it counts is a
/// datagram too small to carry anything else.
#[test]
fn ack_only_packets_are_counted() {
    let (mut h, a, _b) = pair(Limits::default());
    let payload = [7u8; 100];
    let mut calls = Vec::new();
    for _ in 0..100 {
        calls.push(h.invoke(a, "echo", &payload));
        h.run();
    }
    h.advance(Duration::from_millis(50));
    h.run();
    assert!(calls
        .iter()
        .all(|&c| h.agents[a].calls[c].status() == Some(Status::Ok)));
    let ack_only: u64 = (0..h.nodes.len())
        .map(|w| h.stats(w).ack_only_sent.load(Relaxed))
        .sum();
    assert!(ack_only > 0, "no ACK-only packet counted");
    assert!(
        ack_only as usize <= h.small_sent,
        "{ack_only} counted, only {} datagrams small enough",
        h.small_sent
    );
}

#[test]
fn ack_only_is_an_ack_frame_and_nothing_else() {
    use quinn_proto::FrameStats;
    let is_ack_only = |before: &FrameStats, after: &FrameStats| {
        super::FramesSent::of(after).ack_only_since(super::FramesSent::of(before))
    };
    let before = FrameStats::default();
    let mut ack = before;
    ack.acks += 1;
    assert!(is_ack_only(&before, &ack));
    let mut ack_and_data = ack;
    ack_and_data.stream += 1;
    assert!(!is_ack_only(&before, &ack_and_data));
    let mut ack_and_credit = ack;
    ack_and_credit.max_streams_bidi += 1;
    assert!(!is_ack_only(&before, &ack_and_credit));
    let mut data = before;
    data.stream += 2;
    assert!(!is_ack_only(&before, &data));
    assert!(!is_ack_only(&before, &before));
}

/// An agent that closes its connection is unrouted at once.
#[test]
fn an_agent_that_closes_is_unrouted() {
    let (mut h, a, b) = pair(Limits::default());
    h.close(b);
    h.run();
    let call = h.invoke(a, "echo", b"");
    h.run();
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::NoRoute));
    assert_eq!(h.shared.agents.load(Relaxed), 1);
}

/// Discovery answers from the catalog: prefix and tag filters, providers counted, a detaching
/// agent's capabilities withdrawn, names in order.
#[test]
fn discovery_filters_by_prefix_and_tag_and_withdraws_detaching_agents() {
    use dmsc_protocol::card::{AgentCard, Skill};
    let mut h = Harness::new(2, config(Limits::default()));
    let card = |name: &str, skills: &[(&str, &[&str])]| {
        skills
            .iter()
            .fold(AgentCard::new(name, "d", "1"), |c, (id, tags)| {
                c.with_skill(Skill::new(*id, *id).with_tags(tags.iter().copied()))
            })
    };
    let t = TransportConfig::default;
    let a = h.agent_with_card(
        "a",
        card("a", &[("translate", &["text"]), ("trace", &[])]),
        0,
        t(),
    );
    let b = h.agent_with_card("b", card("b", &[("translate", &["text", "fast"])]), 1, t());
    let _c = h.agent_with_card("c", card("c", &[("summarize", &["text"])]), 0, t());
    h.run();
    let ask = |h: &mut Harness, q: u64, prefix: &str, tag: &str| {
        h.discover(a, q, prefix, tag, "")
            .into_iter()
            .map(|e| (e.capability, e.providers))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ask(&mut h, 1, "tr", ""),
        vec![("trace".into(), 1), ("translate".into(), 2)]
    );
    assert_eq!(
        ask(&mut h, 2, "", "text"),
        vec![("summarize".into(), 1), ("translate".into(), 2)]
    );
    assert_eq!(ask(&mut h, 3, "", "fast"), vec![("translate".into(), 1)]);
    assert!(ask(&mut h, 4, "zzz", "").is_empty());
    h.send_control(b, &ControlFrame::Detach);
    h.run();
    assert_eq!(
        ask(&mut h, 5, "translate", ""),
        vec![("translate".into(), 1)]
    );
}

/// A target that begins its answer and then goes quiet (alive, acknowledging, sending nothing)
/// holds the exchange for the stall timeout at most.
#[test]
fn a_target_that_goes_quiet_mid_answer_is_ended_as_stalled() {
    let limits = Limits {
        stall_timeout_ms: 2_000,
        ..Limits::default()
    };
    let (mut h, a, b) = pair(limits);
    h.agents[b].serve = Serve::Begin(10);
    let call = h.invoke(a, "echo", b"");
    h.advance(Duration::from_millis(500));
    assert!(!h.agents[a].calls[call].finished);
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::Ok));
    assert!(h.run_until(Duration::from_secs(3), |h| h.agents[a].calls[call].finished));
    assert_eq!(
        h.agents[a].calls[call].reset,
        Some(StreamCode::Stalled.code())
    );
}

/// Agent `name` is a member of group `group`.
fn member(name: &str, group: u16) -> dmsc_protocol::table::Membership {
    use dmsc_protocol::spiffe::PrincipalKind;
    use dmsc_protocol::table::{GroupId, IdentityPattern, Membership, NameMatch};
    Membership {
        pattern: IdentityPattern {
            kind: PrincipalKind::Agent,
            name_match: NameMatch::Exact,
            name: name.into(),
        },
        group: GroupId(group),
    }
}

/// A three-group table: agent `a` is a caller allowed to invoke and discover `echo` (with a rate
/// limit if given), agent `c` is in another group with no rule, agent `b` is a provider that may
/// advertise anything.
fn policy_table(rate: Option<(u32, u32)>) -> std::sync::Arc<crate::routing::TableGeneration> {
    policy_table_with(rate, false)
}

/// As [`policy_table`]; with `advertise`, the `callers` group may also advertise `echo` (and
/// nothing else).
fn policy_table_with(
    rate: Option<(u32, u32)>,
    advertise: bool,
) -> std::sync::Arc<crate::routing::TableGeneration> {
    use std::sync::Arc;

    use dmsc_protocol::table::{
        CapabilityId, Effect, ExactRule, GroupId, PatternId, RateLimit, Relation, Table,
        TableParts, WildcardRule,
    };

    use crate::routing::{Generation, TableGeneration};

    let allow = |relation| ExactRule {
        relation,
        capability: CapabilityId(0),
        group: GroupId(0),
        effect: Effect::Allow,
    };
    let mut exact_rules = vec![allow(Relation::Invoke)];
    if advertise {
        exact_rules.push(allow(Relation::Advertise));
    }
    exact_rules.push(allow(Relation::Discover));
    let parts = TableParts {
        domain: "harness.test".into(),
        groups: vec!["callers".into(), "others".into(), "providers".into()],
        members: vec![member("a", 0), member("b", 2), member("c", 1)],
        capabilities: vec!["echo".into()],
        patterns: vec![String::new()],
        exact_rules,
        wildcard_rules: vec![WildcardRule {
            relation: Relation::Advertise,
            pattern: PatternId(0),
            group: GroupId(2),
            effect: Effect::Allow,
        }],
        rate_limits: rate
            .map(|(per_second, burst)| RateLimit {
                group: GroupId(0),
                per_second,
                burst,
            })
            .into_iter()
            .collect(),
        ..TableParts::default()
    };
    TableGeneration::compiled(Generation(1), Arc::new(Table::new(parts).unwrap()))
}

/// Installs `table` on every core of `h`.
fn install(h: &mut Harness, table: &std::sync::Arc<crate::routing::TableGeneration>) {
    let now = h.now;
    for node in &mut h.nodes {
        node.core.handle_message(
            now,
            crate::msg::WorkerMsg::Install {
                table: table.clone(),
                done: None,
            },
        );
    }
    h.run();
}

/// A compiled policy installed on every worker: DENIED for callers no group allows, discovery
/// shows only what the caller's groups may see, and requests of allowed callers go on. Groups
/// are computed per connection when the table is installed, columns per capability.
#[test]
fn an_installed_policy_denies_and_hides_what_it_does_not_allow() {
    let (mut h, a, _b) = pair(Limits::default());
    let c = h.agent("c", &["other"], 0);
    h.run();
    install(&mut h, &policy_table(None));
    let allowed = h.invoke(a, "echo", b"hi");
    let denied = h.invoke(c, "echo", b"hi");
    h.run();
    assert_eq!(h.agents[a].calls[allowed].payload(), b"hi");
    assert_eq!(h.agents[c].calls[denied].status(), Some(Status::Denied));
    // Denials are counted under the capability (both callers sit on worker 0).
    let (tx, rx) = crossbeam_channel::bounded(1);
    let now = h.now;
    h.nodes[0].core.handle_message(
        now,
        crate::msg::WorkerMsg::Snapshot {
            known: crate::metrics::Known::default(),
            reply: tx,
        },
    );
    let report = rx.try_recv().expect("a report");
    let echo = report
        .changes
        .iter()
        .find(|c| c.name == "echo")
        .expect("echo's metrics");
    assert_eq!(echo.metrics.statuses[Status::Denied.code() as usize], 1);
    assert_eq!(echo.metrics.statuses[Status::Ok.code() as usize], 1);
    let discover = |h: &mut Harness, who: usize| {
        h.discover(who, 7, "", "", "")
            .into_iter()
            .map(|e| e.capability)
            .collect::<Vec<_>>()
    };
    assert_eq!(discover(&mut h, a), vec!["echo".to_owned()]);
    assert!(discover(&mut h, c).is_empty());
}

/// A rate limit from the installed table: each worker allows its share of the group's rate
/// and burst; over it, RATE_LIMITED.
#[test]
fn a_caller_over_its_rate_limit_gets_rate_limited() {
    let (mut h, a, _b) = pair(Limits::default());
    h.run();
    // 10 per second with a burst of 2, over 2 workers: 5 per second and 1 at once per worker.
    install(&mut h, &policy_table(Some((10, 2))));
    let burst: Vec<usize> = (0..3).map(|_| h.invoke(a, "echo", b"x")).collect();
    h.run();
    let statuses: Vec<_> = burst
        .iter()
        .map(|&c| h.agents[a].calls[c].status())
        .collect();
    let ok = statuses.iter().filter(|s| **s == Some(Status::Ok)).count();
    let limited = statuses
        .iter()
        .filter(|s| **s == Some(Status::RateLimited))
        .count();
    assert_eq!((ok, limited), (1, 2), "{statuses:?}");
    // Then one request every 100 ms for 2 s: about one in two passes (5 per second).
    let mut passed = 0;
    for _ in 0..20 {
        h.advance(Duration::from_millis(100));
        let call = h.invoke(a, "echo", b"x");
        h.run();
        if h.agents[a].calls[call].status() == Some(Status::Ok) {
            passed += 1;
        }
    }
    assert!((9..=11).contains(&passed), "{passed} of 20 passed");
}

/// Admission under an installed table: an agent is attached with only the capabilities its
/// groups may advertise, told which were refused in ATTACH_OK, and refused outright
/// (NOT_PERMITTED) when none is left.
#[test]
fn an_agent_advertises_only_what_its_groups_may() {
    let mut h = Harness::new(1, config(Limits::default()));
    h.run();
    install(&mut h, &policy_table_with(None, true));
    // `a` is in `callers`, which may advertise `echo` only.
    let a = h.agent("a", &["echo", "secret"], 0);
    // `c` is in `others`, which may advertise nothing.
    let c = h.agent("c", &["echo"], 0);
    h.run();
    let refused = h.agents[a].frames.iter().find_map(|f| match f {
        ControlFrame::AttachOk { refused, .. } => Some(refused.clone()),
        _ => None,
    });
    assert_eq!(refused, Some(vec!["secret".to_owned()]));
    assert!(h.agents[c].session.is_none());
    assert!(h.agents[c].frames.iter().any(|f| matches!(
        f,
        ControlFrame::AttachRefused {
            refusal: dmsc_protocol::control::Refusal::NotPermitted,
            ..
        }
    )));
    let echo = h.invoke(a, "echo", b"e");
    let secret = h.invoke(a, "secret", b"s");
    h.run();
    assert_eq!(h.agents[a].calls[echo].payload(), b"e");
    assert_eq!(h.agents[a].calls[secret].status(), Some(Status::NoRoute));
}

/// A new table that narrows what an attached agent may advertise withdraws the capabilities at
/// once, on every worker, and tells the agent (CAPABILITIES_REFUSED); one that widens it again
/// restores them.
#[test]
fn a_new_policy_withdraws_and_restores_attached_capabilities() {
    let (mut h, c, _b) = pair(Limits::default());
    // `a` attaches (no policy yet) offering echo and secret, with its home on worker 1.
    let a = h.agent("a", &["echo", "secret"], 1);
    h.run();
    let call = h.invoke(c, "secret", b"1");
    h.run();
    assert_eq!(h.agents[c].calls[call].status(), Some(Status::Ok));
    // A table under which `a` may advertise echo only; `a` is also the one caller it lets
    // invoke echo, so `a` checks the routing itself.
    install(&mut h, &policy_table_with(None, true));
    let told = h.agents[a].frames.iter().find_map(|f| match f {
        ControlFrame::CapabilitiesRefused { refused } => Some(refused.clone()),
        _ => None,
    });
    assert_eq!(told, Some(vec!["secret".to_owned()]));
    let secret = h.invoke(a, "secret", b"2");
    let echo = h.invoke(a, "echo", b"3");
    h.run();
    assert_eq!(h.agents[a].calls[secret].status(), Some(Status::NoRoute));
    assert_eq!(h.agents[a].calls[echo].payload(), b"3");
    // Back to no policy: everything is advertised again, and the agent is told nothing is
    // refused.
    install(&mut h, &crate::routing::TableGeneration::standalone());
    let last = h.agents[a].frames.iter().rev().find_map(|f| match f {
        ControlFrame::CapabilitiesRefused { refused } => Some(refused.clone()),
        _ => None,
    });
    assert_eq!(last, Some(Vec::new()));
    let again = h.invoke(c, "secret", b"4");
    h.run();
    assert_eq!(h.agents[c].calls[again].payload(), b"4");
}

/// Datagrams from another address than the peer's (a NAT rebinding; migration is off, so quinn
/// drops them) do not keep a connection alive: it is closed as UNRESPONSIVE after the peer
/// timeout, and the agent is unroutable.
#[test]
fn packets_from_a_new_address_do_not_keep_a_connection_alive() {
    let limits = Limits {
        peer_timeout_ms: 1_500,
        ..Limits::default()
    };
    let mut h = Harness::new(2, config(limits));
    let mut chatty = TransportConfig::default();
    chatty.keep_alive_interval(Some(Duration::from_millis(300)));
    let b = h.agent_with("b", &["echo"], 1, chatty);
    let a = h.agent("a", &["other"], 0);
    h.run();
    // `b`'s address changes under it (its NAT rebinds): it keeps sending (its own keep-alives),
    // from elsewhere.
    let rebound = std::net::SocketAddr::new(h.agents[b].addr.ip(), h.agents[b].addr.port() + 2);
    h.agents[b].addr = rebound;
    h.advance(Duration::from_secs(3));
    assert_eq!(h.stats(1).unresponsive_peers.load(Relaxed), 1);
    let call = h.invoke(a, "echo", b"");
    h.run();
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::NoRoute));
}

/// A table with a bridge: `f` is in `bridges` (no rights of its own), `a` in `callers` (may
/// invoke `echo`), `c` in `others` (nothing), `b` in `providers` (may advertise anything).
fn bridge_table() -> std::sync::Arc<crate::routing::TableGeneration> {
    use std::sync::Arc;

    use dmsc_protocol::table::{
        CapabilityId, Effect, ExactRule, GroupId, PatternId, Relation, Table, TableParts,
        WildcardRule,
    };

    use crate::routing::{Generation, TableGeneration};

    let parts = TableParts {
        domain: "harness.test".into(),
        groups: ["bridges", "callers", "others", "providers"]
            .map(String::from)
            .to_vec(),
        members: vec![
            member("a", 1),
            member("b", 3),
            member("c", 2),
            member("f", 0),
        ],
        capabilities: vec!["echo".into()],
        patterns: vec![String::new()],
        exact_rules: [Relation::Invoke, Relation::Discover]
            .map(|relation| ExactRule {
                relation,
                capability: CapabilityId(0),
                group: GroupId(1),
                effect: Effect::Allow,
            })
            .to_vec(),
        wildcard_rules: vec![WildcardRule {
            relation: Relation::Advertise,
            pattern: PatternId(0),
            group: GroupId(3),
            effect: Effect::Allow,
        }],
        bridges: vec![GroupId(0)],
        ..TableParts::default()
    };
    TableGeneration::compiled(Generation(2), Arc::new(Table::new(parts).unwrap()))
}

/// A bridge invokes on behalf of another identity: policy judges that identity, the target
/// sees it as the caller and the bridge as `via`. Anyone else asking is DENIED; an identity
/// that is not an agent of the domain is BAD_REQUEST.
#[test]
fn a_bridge_invokes_on_behalf_of_another_identity() {
    let mut h = Harness::new(2, config(Limits::default()));
    let b = h.agent("b", &["echo"], 1);
    let a = h.agent("a", &["other"], 0);
    let c = h.agent("c", &["other"], 0);
    let f = h.agent("f", &["other"], 1);
    h.run();
    install(&mut h, &bridge_table());
    let as_id = |name: &str| format!("spiffe://harness.test/agent/{name}");
    let (for_a, for_c) = (as_id("a"), as_id("c"));
    let invoke_for = |h: &mut Harness, who: usize, identity: &str| {
        let call = h.invoke_with(
            who,
            &harness::Invocation {
                on_behalf_of: identity,
                ..harness::Invocation::new("echo", b"hi")
            },
        );
        h.run();
        h.agents[who].calls[call].status()
    };
    assert_eq!(invoke_for(&mut h, f, &for_a), Some(Status::Ok));
    let header = h.agents[b].incoming[0].header().expect("forwarded");
    assert_eq!(header.caller, for_a);
    assert_eq!(header.via, as_id("f"));
    assert_eq!(header.on_behalf_of, "", "not forwarded");
    // Policy judges the identity acted for, not the bridge.
    assert_eq!(invoke_for(&mut h, f, &for_c), Some(Status::Denied));
    assert_eq!(invoke_for(&mut h, f, ""), Some(Status::Denied));
    // Only a bridge may ask.
    assert_eq!(invoke_for(&mut h, a, &for_a), Some(Status::Denied));
    assert_eq!(invoke_for(&mut h, c, &for_a), Some(Status::Denied));
    // Not an agent identity of this domain.
    for bad in [
        "spiffe://elsewhere.test/agent/a",
        "spiffe://harness.test/gateway/gw1",
        "not a spiffe id",
    ] {
        assert_eq!(
            invoke_for(&mut h, f, bad),
            Some(Status::BadRequest),
            "{bad}"
        );
    }
    // A request on its own behalf still carries no `via`.
    let call = h.invoke(a, "echo", b"x");
    h.run();
    assert_eq!(h.agents[a].calls[call].status(), Some(Status::Ok));
    let last = h.agents[b]
        .incoming
        .last()
        .and_then(|i| i.header())
        .unwrap();
    assert_eq!((last.caller, last.via), (for_a.as_str(), ""));
}

/// A bridge discovers what another identity may see; anyone else asking so sees nothing.
#[test]
fn a_bridge_discovers_on_behalf_of_another_identity() {
    let mut h = Harness::new(1, config(Limits::default()));
    h.agent("b", &["echo"], 0);
    let a = h.agent("a", &["other"], 0);
    let f = h.agent("f", &["other"], 0);
    h.run();
    install(&mut h, &bridge_table());
    let mut next = 100;
    let mut discover = |h: &mut Harness, who: usize, on_behalf_of: &str| {
        next += 1;
        h.discover(who, next, "", "", on_behalf_of)
            .into_iter()
            .map(|e| e.capability)
            .collect::<Vec<_>>()
    };
    let id = |name: &str| format!("spiffe://harness.test/agent/{name}");
    let echo = vec!["echo".to_owned()];
    assert_eq!(discover(&mut h, f, &id("a")), echo, "the bridge, for a");
    assert!(
        discover(&mut h, f, &id("c")).is_empty(),
        "the bridge, for c"
    );
    assert!(discover(&mut h, f, "").is_empty(), "the bridge itself");
    assert!(discover(&mut h, f, "not an id").is_empty());
    assert_eq!(discover(&mut h, a, ""), echo, "a itself");
    assert!(discover(&mut h, a, &id("a")).is_empty(), "a is no bridge");
}
