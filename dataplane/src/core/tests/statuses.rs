//! The statuses that depend on time or on a target failing (PROTOCOL.md sections 7.5, 7.8 and
//! 7.9), on the virtual clock: `DEADLINE_EXCEEDED`, `OVERLOADED` and `TARGET_FAILED`, each for a
//! target the caller's core reaches over a lane and for one it reaches by a hand-off.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use dmsc_protocol::{Status, StreamCode};

use super::config;
use super::harness::{Harness, Invocation, Serve};
use crate::config::Limits;

/// How the caller's core reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// Over the lane the target bound to the caller's core.
    Lane,
    /// By handing the request to the target's home core (the target opened no lanes).
    Handoff,
}

const PATHS: [Path; 2] = [Path::Lane, Path::Handoff];

/// A request body the caller is still sending: no FIN, more than one packet.
const UNFINISHED: [u8; 16 * 1024] = [7; 16 * 1024];

/// Two cores: `b` offers `echo` with its primary connection on core 1 and attaches with
/// `max_concurrent` (0: the default), `a` calls from core 0 and reaches `b` by `path`.
fn setup(path: Path, limits: Limits, max_concurrent: u64) -> (Harness, usize, usize) {
    let mut h = Harness::new(2, config(limits));
    let b = h.agent("b", &["echo"], 1);
    h.agents[b].max_concurrent = max_concurrent;
    let a = h.agent("a", &["other"], 0);
    h.run();
    assert!(h.agents[a].session.is_some() && h.agents[b].session.is_some());
    if path == Path::Lane {
        h.open_lanes(b);
        h.run();
    }
    (h, a, b)
}

/// Asserts that core 0 reached the target by `path`, and only so.
fn assert_path(h: &Harness, path: Path) {
    let handoffs = h.stats(0).handoffs.load(Relaxed);
    let local = h.stats(0).forwarded_local.load(Relaxed);
    match path {
        Path::Lane => assert!(
            local > 0 && handoffs == 0,
            "{local} local, {handoffs} hand-offs"
        ),
        Path::Handoff => assert!(
            local == 0 && handoffs > 0,
            "{local} local, {handoffs} hand-offs"
        ),
    }
}

/// Answers the gateway generated with `status`, on any core (after a hand-off the home core
/// may write the answer the caller's core relays).
fn answered(h: &Harness, status: Status) -> u64 {
    (0..h.nodes.len())
        .map(|w| h.stats(w).answered[status.code() as usize].load(Relaxed))
        .sum()
}

/// The request `a` sends: complete, or with a body it is still sending.
fn request(fin: bool) -> Invocation<'static> {
    let payload: &[u8] = if fin { b"request" } else { &UNFINISHED };
    Invocation {
        fin,
        ..Invocation::new("echo", payload)
    }
}

/// Section 7.8: the caller gets `DEADLINE_EXCEEDED` when its deadline passes before the answer
/// begins, not before; the target stream is cancelled with `DEADLINE_EXCEEDED` (`STOP_SENDING`,
/// and `RESET_STREAM` while the request is still being relayed). After a hand-off the caller's
/// core keeps the timer and has the home core cancel the target stream.
#[test]
fn deadline_exceeded_when_the_answer_does_not_begin_in_time() {
    let deadline = StreamCode::DeadlineExceeded.code();
    for path in PATHS {
        for fin in [true, false] {
            let case = format!("{path:?}, request finished: {fin}");
            let (mut h, a, b) = setup(path, Limits::default(), 0);
            h.agents[b].serve = Serve::Hold;
            let call = h.invoke_with(
                a,
                &Invocation {
                    deadline_ms: 200,
                    ..request(fin)
                },
            );
            h.run();
            assert_path(&h, path);
            assert_eq!(h.agents[b].incoming.len(), 1, "{case}: the target has it");
            let header = h.agents[b].incoming[0].header().expect("forwarded header");
            assert_eq!(header.deadline_ms, 200, "{case}: the deadline is forwarded");

            h.advance(Duration::from_millis(199));
            let c = &h.agents[a].calls[call];
            assert!(c.response.is_empty() && !c.finished, "{case}: early: {c:?}");
            assert_eq!(h.agents[b].incoming[0].stopped, None, "{case}: early");

            h.advance(Duration::from_millis(1));
            let c = &h.agents[a].calls[call];
            assert_eq!(c.status(), Some(Status::DeadlineExceeded), "{case}: {c:?}");
            assert!(
                c.finished && c.reset.is_none(),
                "{case}: a whole answer: {c:?}"
            );
            assert_eq!(answered(&h, Status::DeadlineExceeded), 1, "{case}");
            let target = &h.agents[b].incoming[0];
            assert_eq!(target.stopped, Some(deadline), "{case}: {target:?}");
            if fin {
                // The whole request was relayed: no RESET_STREAM for it.
                assert!(target.fin && target.reset.is_none(), "{case}: {target:?}");
                assert_eq!(c.stopped, None, "{case}");
            } else {
                assert_eq!(target.reset, Some(deadline), "{case}: {target:?}");
                // The caller is told to stop sending the rest.
                assert_eq!(c.stopped, Some(StreamCode::Cancelled.code()), "{case}");
            }
        }
    }
}

/// Section 7.8: a `deadline_ms` above `limits.max_deadline_ms` is cut to it, in the forwarded
/// header and in the gateway's timer.
#[test]
fn a_deadline_over_the_maximum_is_cut_to_it() {
    let limits = Limits {
        default_deadline_ms: 500,
        max_deadline_ms: 1_000,
        ..Limits::default()
    };
    for path in PATHS {
        let (mut h, a, b) = setup(path, limits.clone(), 0);
        h.agents[b].serve = Serve::Hold;
        let call = h.invoke_with(
            a,
            &Invocation {
                deadline_ms: 60_000,
                ..Invocation::new("echo", b"")
            },
        );
        h.run();
        let header = h.agents[b].incoming[0].header().expect("forwarded header");
        assert_eq!(header.deadline_ms, 1_000, "{path:?}");
        h.advance(Duration::from_millis(999));
        assert_eq!(h.agents[a].calls[call].status(), None, "{path:?}");
        h.advance(Duration::from_millis(1));
        assert_eq!(
            h.agents[a].calls[call].status(),
            Some(Status::DeadlineExceeded),
            "{path:?}"
        );
    }
}

/// Section 7.5 step 6: with every candidate at its `max_concurrent`, the next request gets
/// `OVERLOADED` without reaching the target; once the request in flight completes there is
/// room again.
#[test]
fn overloaded_when_every_candidate_is_at_its_limit() {
    for path in PATHS {
        let (mut h, a, b) = setup(path, Limits::default(), 1);
        h.agents[b].serve = Serve::Hold;
        let held = h.invoke(a, "echo", b"held");
        h.run();
        assert_eq!(h.agents[b].incoming.len(), 1, "{path:?}");
        assert_eq!(h.agents[a].calls[held].status(), None, "{path:?}");

        let refused = h.invoke(a, "echo", b"refused");
        h.run();
        let c = &h.agents[a].calls[refused];
        assert_eq!(c.status(), Some(Status::Overloaded), "{path:?}: {c:?}");
        assert!(c.finished, "{path:?}");
        assert_eq!(h.agents[b].incoming.len(), 1, "{path:?}: not forwarded");
        assert_eq!(answered(&h, Status::Overloaded), 1, "{path:?}");

        // The held request completes; then a new one is forwarded.
        h.agents[b].serve = Serve::Echo;
        h.run();
        assert_eq!(h.agents[a].calls[held].status(), Some(Status::Ok));
        assert_eq!(h.agents[a].calls[held].payload(), b"held");
        let again = h.invoke(a, "echo", b"again");
        h.run();
        assert_eq!(
            h.agents[a].calls[again].status(),
            Some(Status::Ok),
            "{path:?}"
        );
        assert_eq!(h.agents[a].calls[again].payload(), b"again", "{path:?}");
        assert_path(&h, path);
    }
}

/// Section 7.9: a target that resets its stream before answering gets the caller
/// `TARGET_FAILED`, and `STOP_SENDING(CANCELLED)` if the caller is still sending its request
/// (after a hand-off as with a local target).
#[test]
fn target_failed_when_the_target_resets_before_answering() {
    for path in PATHS {
        for fin in [true, false] {
            let case = format!("{path:?}, request finished: {fin}");
            let (mut h, a, b) = setup(path, Limits::default(), 0);
            h.agents[b].serve = Serve::Reset(StreamCode::TargetFailed.code());
            let call = h.invoke_with(a, &request(fin));
            h.run();
            assert_path(&h, path);
            assert_eq!(h.agents[b].incoming.len(), 1, "{case}: the target had it");
            let c = &h.agents[a].calls[call];
            assert_eq!(c.status(), Some(Status::TargetFailed), "{case}: {c:?}");
            assert!(
                c.finished && c.reset.is_none(),
                "{case}: a whole answer: {c:?}"
            );
            let stopped = (!fin).then_some(StreamCode::Cancelled.code());
            assert_eq!(c.stopped, stopped, "{case}");
            assert_eq!(answered(&h, Status::TargetFailed), 1, "{case}");
        }
    }
}

/// Section 7.7 rule 8: a target that ends its stream (FIN) without a response byte gets the
/// caller `TARGET_FAILED`; a request still being relayed is reset towards the target with
/// `CANCELLED` and the caller is told to stop sending.
#[test]
fn target_failed_when_the_target_ends_its_stream_without_answering() {
    for path in PATHS {
        for fin in [true, false] {
            let case = format!("{path:?}, request finished: {fin}");
            let (mut h, a, b) = setup(path, Limits::default(), 0);
            h.agents[b].serve = Serve::Finish;
            let call = h.invoke_with(a, &request(fin));
            h.run();
            assert_path(&h, path);
            let c = &h.agents[a].calls[call];
            assert_eq!(c.status(), Some(Status::TargetFailed), "{case}: {c:?}");
            assert!(
                c.finished && c.reset.is_none(),
                "{case}: a whole answer: {c:?}"
            );
            let target = &h.agents[b].incoming[0];
            if fin {
                assert_eq!(c.stopped, None, "{case}");
            } else {
                let cancelled = Some(StreamCode::Cancelled.code());
                assert_eq!(c.stopped, cancelled, "{case}");
                assert_eq!(target.reset, cancelled, "{case}: {target:?}");
            }
        }
    }
}

/// Section 7.9: a target whose connection closes while a request to it is in flight gets the
/// caller `TARGET_FAILED` at once (no waiting for a deadline), and it is no longer routable.
#[test]
fn target_failed_when_the_target_connection_closes_mid_request() {
    for path in PATHS {
        let (mut h, a, b) = setup(path, Limits::default(), 0);
        h.agents[b].serve = Serve::Hold;
        let call = h.invoke(a, "echo", b"are you there");
        h.run();
        assert_eq!(h.agents[b].incoming.len(), 1, "{path:?}");
        assert_eq!(h.agents[a].calls[call].status(), None, "{path:?}");
        let before = h.now;
        h.close(b);
        h.run();
        assert_eq!(h.now, before, "no time passed");
        let c = &h.agents[a].calls[call];
        assert_eq!(c.status(), Some(Status::TargetFailed), "{path:?}: {c:?}");
        assert!(c.finished, "{path:?}");
        assert_path(&h, path);
        let late = h.invoke(a, "echo", b"");
        h.run();
        assert_eq!(h.agents[a].calls[late].status(), Some(Status::NoRoute));
    }
}

/// Section 7.9: once response bytes were relayed no status can be sent, so a target reset
/// (whatever its code) resets the caller's stream with `TARGET_FAILED`, and sends
/// `STOP_SENDING(TARGET_FAILED)` if the request is still arriving.
#[test]
fn a_target_reset_after_the_answer_began_resets_the_callers_stream() {
    let target_failed = StreamCode::TargetFailed.code();
    for path in PATHS {
        for fin in [true, false] {
            let case = format!("{path:?}, request finished: {fin}");
            let (mut h, a, b) = setup(path, Limits::default(), 0);
            h.agents[b].serve = Serve::Begin(5);
            let call = h.invoke_with(a, &request(fin));
            h.run();
            let c = &h.agents[a].calls[call];
            assert_eq!(c.status(), Some(Status::Ok), "{case}: the answer began");
            assert_eq!(c.payload(), b"xxxxx", "{case}");
            assert!(!c.finished, "{case}");

            h.reset_response(b, 0, 0x42);
            h.run();
            let c = &h.agents[a].calls[call];
            assert!(c.finished, "{case}");
            assert_eq!(c.reset, Some(target_failed), "{case}: {c:?}");
            let stopped = (!fin).then_some(target_failed);
            assert_eq!(c.stopped, stopped, "{case}");
            // Nothing is answered in-band once the response began.
            assert_eq!(answered(&h, Status::TargetFailed), 0, "{case}");
            assert_path(&h, path);
        }
    }
}
