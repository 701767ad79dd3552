#!/usr/bin/env python3
"""Edge-case probes: does the gateway behave as docs/PROTOCOL.md says in the cases an SDK
would never produce (misbehaving agents, timeouts, refusals, limits)?

Each probe prints PASS/FAIL with what was observed. Exit 0 when all pass.

    python3 spec_probes.py --gateway 127.0.0.1:4433 --cert a.pem --key a.key --ca ca.pem [--slow]

``--slow`` adds the attach-timeout probe (waits ``limits.attach_timeout_ms``, 5 s by default).
Lane probes run only when the gateway offers lanes to other workers (``--workers`` >= 2).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dmsc_agent as d  # noqa: E402

FAILURES: list[str] = []


def check(name: str, cond: bool, detail: str = "") -> bool:
    print(f"{'PASS' if cond else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
    if not cond:
        FAILURES.append(name)
    return cond


def vint(value: int, size: int) -> bytes:
    """A non-minimal varint of ``size`` bytes."""
    prefix = {1: 0, 2: 0x40, 4: 0x80, 8: 0xC0}[size]
    raw = value.to_bytes(size, "big")
    return bytes([raw[0] | prefix]) + raw[1:]


class Probe:
    def __init__(self, gateway, creds):
        self.gateway = gateway
        self.creds = creds
        self.card = d.make_card("probe", [f"probe_{os.getpid()}"])

    async def raw(self, max_streams: int = 16, address=None, on_incoming=None) -> d.DmscConnection:
        return await d.connect(
            address or self.gateway, self.creds, label="probe", max_streams=max_streams,
            on_incoming=on_incoming or (lambda c, s: None),
        )

    async def attached(self, max_concurrent: int = 16, card: bytes | None = None, **kw) -> tuple[d.DmscConnection, d.AttachOk]:
        conn = await self.raw(**kw)
        conn.send_control(d.encode_attach(max_concurrent, card or self.card))
        answer = await asyncio.wait_for(asyncio.shield(conn.first_answer), 5)
        assert isinstance(answer, d.AttachOk), answer
        return conn, answer

    @staticmethod
    async def closed(conn: d.DmscConnection, timeout: float = 3.0) -> d.CloseInfo | None:
        try:
            await asyncio.wait_for(conn.closed_event.wait(), timeout)
        except asyncio.TimeoutError:
            return None
        return conn.close_info

    @staticmethod
    async def first(conn: d.DmscConnection, timeout: float = 3.0):
        try:
            return await asyncio.wait_for(asyncio.shield(conn.first_answer), timeout)
        except (asyncio.TimeoutError, d.ConnectionLost) as exc:
            return exc


async def run(args) -> int:
    gw = d.parse_address(args.gateway)
    creds = d.Credentials(args.cert, args.key, args.ca)
    p = Probe(gw, creds)

    # --- section 4.1: framing ---------------------------------------------------------------
    conn = await p.raw()
    conn.send_control(bytes.fromhex("3f02aabb") + d.encode_attach(8, p.card))
    a = await p.first(conn)
    check("unknown frame before ATTACH is skipped (4.1 rule 1)", isinstance(a, d.AttachOk), repr(a))
    await conn.close_and_wait()

    conn = await p.raw()
    payload = vint(8, 4) + vint(len(p.card), 8) + p.card
    conn.send_control(vint(1, 2) + vint(len(payload), 8) + payload)
    a = await p.first(conn)
    check("non-minimal varints everywhere in ATTACH are accepted (1.3)", isinstance(a, d.AttachOk), repr(a))
    await conn.close_and_wait()

    conn = await p.raw()
    conn.send_control(d.encode_frame(d.FrameType.ATTACH, d.encode_varint(8) + d.encode_bytes(p.card, d.MAX_CARD) + b"\x01\x02"))
    a = await p.first(conn)
    check("trailing bytes after ATTACH's fields (4.1 rule 2: ignored)", isinstance(a, d.AttachOk), repr(a))
    await conn.close_and_wait()

    conn = await p.raw()
    conn.send_control(d.encode_varint(1) + d.encode_varint(70000))
    c = await p.closed(conn)
    check("control frame length above max_card_bytes+1024 closes FRAME_TOO_LARGE at once (4.1 rule 4)",
          c is not None and c.is_app(d.ConnCode.FRAME_TOO_LARGE), c.describe() if c else "no close")

    conn = await p.raw()
    conn.send_control(d.encode_discover(1))
    c = await p.closed(conn)
    check("DISCOVER while PENDING closes PROTOCOL_VIOLATION (4.5)",
          c is not None and c.is_app(d.ConnCode.PROTOCOL_VIOLATION), c.describe() if c else "no close")

    conn = await p.raw()
    conn.send_control(d.encode_frame(d.FrameType.ATTACH, d.encode_varint(8)))  # card missing
    c = await p.closed(conn)
    check("ATTACH ending inside a field closes PROTOCOL_VIOLATION (4.1 rule 3)",
          c is not None and c.is_app(d.ConnCode.PROTOCOL_VIOLATION), c.describe() if c else "no close")

    conn = await p.raw()
    conn.send_control(d.encode_frame(d.FrameType.DRAIN, d.encode_varint(1)))
    c = await p.closed(conn)
    check("a gateway-only frame (DRAIN) from the agent closes PROTOCOL_VIOLATION (4.5)",
          c is not None and c.is_app(d.ConnCode.PROTOCOL_VIOLATION), c.describe() if c else "no close")

    # --- section 6.1 / 6.2: attach -------------------------------------------------------------
    conn, ok = await p.attached(max_concurrent=0)
    check("ATTACH max_concurrent 0: the gateway chooses (default 1024) (6.2)", ok.max_concurrent == 1024, str(ok.max_concurrent))
    await conn.close_and_wait()
    conn, ok = await p.attached(max_concurrent=5000)
    check("ATTACH max_concurrent 5000 is capped at 1024 (6.2)", ok.max_concurrent == 1024, str(ok.max_concurrent))
    check("ATTACH_OK.session has worker << 48 (6.2, informative)", ok.session >> 48 == ok.worker, f"0x{ok.session:016x}")
    conn.send_control(d.encode_lane(ok.session, ok.lane_token))
    late = await asyncio.wait_for(conn.late_refusals.get(), 3)
    check("LANE on a primary connection: ALREADY_ATTACHED, connection stays (4.5)",
          late.refusal == d.Refusal.ALREADY_ATTACHED and conn.close_info is None, repr(late))
    conn.send_control(d.encode_detach())
    await asyncio.wait_for(conn.detached.wait(), 3)
    conn.detached.clear()
    conn.send_control(d.encode_detach())
    await asyncio.sleep(0.3)
    check("a repeated DETACH is ignored (10)", conn.close_info is None and not conn.detached.is_set(),
          f"closed={conn.close_info} second DETACHED={conn.detached.is_set()}")
    await conn.close_and_wait()

    for name, card in [
        ("not JSON", b"{nope"),
        ("no skills", json.dumps({"name": "x", "skills": []}).encode()),
        ("duplicate skill id", json.dumps({"name": "x", "skills": [{"id": "a", "name": "a"}, {"id": "a", "name": "b"}]}).encode()),
    ]:
        conn = await p.raw()
        conn.send_control(d.encode_attach(8, card))
        a = await p.first(conn)
        c = await p.closed(conn)
        frame_seen = isinstance(a, d.AttachRefused)
        check(f"ATTACH with a bad card ({name}) closes ATTACH_REFUSED (4.5)",
              c is not None and c.is_app(d.ConnCode.ATTACH_REFUSED),
              f"frame={'BAD_CARD ' + repr(a.reason) if frame_seen and a.refusal == 1 else repr(a)}; close={c.describe() if c else None}")

    card = json.dumps({
        "name": "v1", "supportedInterfaces": [{"url": "https://x", "protocolBinding": "JSONRPC"}],
        "skills": [{"id": "übersetzen", "name": "t", "tags": ["x"], "inputModes": ["a/b"]}],
        "capabilities": {"streaming": True}, "someFutureMember": [1, 2, 3],
    }).encode()
    conn = await p.raw()
    conn.send_control(d.encode_attach(8, card))
    a = await p.first(conn)
    check("A2A v1.0 card with a non-ASCII skill id and unknown members is accepted (5)", isinstance(a, d.AttachOk), repr(a))
    await conn.close_and_wait()

    # --- section 4: streams before ATTACH_OK --------------------------------------------------
    conn = await p.raw()
    conn.send_control(b"")  # nothing on stream 0 yet would not open it; send ATTACH after
    s = d.Stream(conn, 4)
    conn.streams[4] = s
    conn.quic.send_stream_data(4, d.RequestHeader("py_echo").encode() + b"x", end_stream=True)
    conn.transmit()
    try:
        await asyncio.wait_for(s.read_to_end(1 << 20), 3)
        got = "no reset"
    except d.StreamReset as exc:
        got = exc.code
    except asyncio.TimeoutError:
        got = "timeout"
    check("invocation stream while PENDING is reset PROTOCOL_VIOLATION (4)", got == d.StreamCode.PROTOCOL_VIOLATION,
          f"reset code {got}, stop_sending {s.stop_sending_code}")
    await conn.close_and_wait()

    # --- section 4.1: end of the control stream -----------------------------------------------
    conn, ok = await p.attached()
    conn.quic.send_stream_data(0, b"", end_stream=True)
    conn.transmit()
    c = await p.closed(conn)
    check("agent FIN on the control stream: gateway closes NO_ERROR (4.1)",
          c is not None and c.is_app(d.ConnCode.NO_ERROR), c.describe() if c else "no close")

    conn, ok = await p.attached()
    conn.quic.stop_stream(0, 0)
    conn.transmit()
    c = await p.closed(conn)
    check("agent STOP_SENDING on the control stream: gateway closes PROTOCOL_VIOLATION (4.1)",
          c is not None and c.is_app(d.ConnCode.PROTOCOL_VIOLATION), c.describe() if c else "no close")

    # --- section 7: invocations with a hand-written target ------------------------------------
    cap = f"probe_target_{os.getpid()}"
    observed: dict[str, object] = {}
    mode = {"value": ""}

    def on_incoming(c: d.DmscConnection, s: d.Stream) -> None:
        async def serve():
            try:
                block = await s.read_header()
                h = d.RequestHeader.decode_block(block)
                observed["header"] = h
                m = mode["value"]
                if m == "reset-before":
                    s.reset(d.StreamCode.TARGET_FAILED)
                    return
                if m == "reset-after":
                    s.send(d.ResponseHeader(0, "text/plain").encode() + b"partial")
                    await asyncio.sleep(0.2)
                    s.reset(d.StreamCode.TARGET_FAILED)
                    return
                if m == "early-stop":
                    s.stop_sending(d.StreamCode.CANCELLED)
                    s.send(d.ResponseHeader(0, "text/plain").encode() + b"early", end=True)
                    return
                if m == "garbage":
                    s.send(b"\x40", end=True)  # a truncated response header
                    return
                if m == "hang":
                    try:
                        await s.read_to_end(1 << 30)
                    except d.StreamReset:
                        pass
                    try:
                        await asyncio.wait_for(s.aborted.wait(), 5)
                    except asyncio.TimeoutError:
                        pass
                    # aioquic reports no RESET_STREAM once the FIN has arrived; STOP_SENDING
                    # is always reported.
                    observed["target_reset"] = s.reset_code
                    observed["target_stop"] = s.stop_sending_code
                    return
                body = await s.read_to_end(1 << 30)
                s.send(d.ResponseHeader(0, "text/plain").encode() + body, end=True)
            except Exception as exc:  # noqa: BLE001
                observed["error"] = repr(exc)
        asyncio.ensure_future(serve())

    target, tok = await p.attached(card=d.make_card("probe-target", [cap]), on_incoming=on_incoming)
    caller = d.Agent(gw, creds, {f"probe_caller_{os.getpid()}": d.handle_echo}, open_lanes=False)
    await caller.attach()

    async def call(payload=b"hi", **kw) -> d.Reply:
        for _ in range(50):
            r = await caller.invoke(cap, payload, **kw)
            if r.status != d.Status.NO_ROUTE:
                return r
            await asyncio.sleep(0.02)
        return r

    mode["value"] = "echo"
    raw = d.RequestHeader(cap, 0, 0, caller="spiffe://dmsc.local/agent/forged").encode_block() + b"EXT"
    r = await call(raw_header=d.encode_varint(len(raw)) + raw)
    h = observed.get("header")
    check("forwarded header: caller overwritten, hop 1, deadline = default 30000, extensions dropped (7.6)",
          r.ok and h is not None and h.caller == str(caller.identity) and h.hop_count == 1 and h.deadline_ms == 30000,
          repr(h))
    r = await call(deadline_ms=10**9)
    h = observed.get("header")
    check("deadline above max_deadline_ms is cut to 300000 (7.8)", h is not None and h.deadline_ms == 300000, repr(h and h.deadline_ms))

    mode["value"] = "reset-before"
    r = await call()
    check("target resets before any response byte: caller gets status TARGET_FAILED (7.9)",
          r.status == d.Status.TARGET_FAILED and r.reset_code is None, f"{r.status_name} reset={r.reset_code} {r.message!r}")
    mode["value"] = "reset-after"
    r = await call()
    check("target resets after response bytes: caller stream reset TARGET_FAILED (7.9)",
          r.reset_code == d.StreamCode.TARGET_FAILED, f"{r.status_name} reset={r.reset_code} {r.message!r}")
    mode["value"] = "early-stop"
    r = await call(os.urandom(4 << 20))
    check("target answers early with STOP_SENDING: caller still reads the response (7.4 rule 5)",
          r.ok and r.payload == b"early", f"{r.status_name} {r.payload[:10]!r} {r.message!r}")
    mode["value"] = "garbage"
    r = await call()
    check("malformed response header is relayed unchanged; the caller must treat it as a failure (7.6)",
          r.status == d.Status.TARGET_FAILED, f"{r.status_name} {r.message!r}")
    mode["value"] = "hang"
    observed.pop("target_reset", None)
    observed.pop("target_stop", None)
    t0 = time.monotonic()
    r = await call(deadline_ms=300)
    dt = time.monotonic() - t0
    await asyncio.sleep(0.3)
    check("deadline passes: caller DEADLINE_EXCEEDED, target stopped with DEADLINE_EXCEEDED (7.8)",
          r.status == d.Status.DEADLINE_EXCEEDED and observed.get("target_stop") == d.StreamCode.DEADLINE_EXCEEDED,
          f"{r.status_name} after {dt:.2f}s; target saw reset={observed.get('target_reset')} stop={observed.get('target_stop')}")

    # The same through a hand-off: a caller on another worker than the target's home, no lanes.
    if len(tok.lanes) > 1:
        other = None
        for _ in range(20):
            cand = d.Agent(gw, creds, {f"probe_caller2_{os.getpid()}": d.handle_echo}, open_lanes=False)
            await cand.attach()
            if cand.attach_ok.worker != tok.worker:
                other = cand
                break
            await cand.close()
        if other is not None:
            observed.pop("target_reset", None)
            observed.pop("target_stop", None)
            r = await other.invoke(cap, b"hi", deadline_ms=300)
            await asyncio.sleep(0.5)
            check("deadline passes through a hand-off: target stopped with DEADLINE_EXCEEDED (7.8, 13)",
                  r.status == d.Status.DEADLINE_EXCEEDED and observed.get("target_stop") == d.StreamCode.DEADLINE_EXCEEDED,
                  f"caller worker {other.attach_ok.worker}, target worker {tok.worker}: {r.status_name}; "
                  f"target saw reset={observed.get('target_reset')} stop={observed.get('target_stop')}")
            await other.detach()

    # caller cancels with STOP_SENDING: target sees CANCELLED
    observed.pop("target_reset", None)
    observed.pop("target_stop", None)
    conn = caller.primary
    s = conn.open_stream()
    s.send(d.RequestHeader(cap).encode() + b"x", end=True)
    await asyncio.sleep(0.3)
    s.stop_sending(d.StreamCode.CANCELLED)
    await asyncio.sleep(0.5)
    check("caller STOP_SENDING cancels: target stream stopped CANCELLED (7.9)",
          observed.get("target_stop") == d.StreamCode.CANCELLED,
          f"target saw reset={observed.get('target_reset')} stop={observed.get('target_stop')}")
    s.forget()

    # OVERLOADED: stream credit (initial_max_streams_bidi = 1) and max_concurrent = 1
    for label, kw in [("stream credit exhausted (7.5 step 7)", dict(max_concurrent=64, max_streams=1)),
                      ("max_concurrent reached (7.5 step 6)", dict(max_concurrent=1, max_streams=16))]:
        capx = f"probe_slow_{os.getpid()}_{kw['max_streams']}"
        slow = d.Agent(gw, creds, {capx: d.handle_sleep}, open_lanes=False, max_concurrent=kw["max_concurrent"])
        slow.stream_credit = kw["max_streams"]
        await slow.attach()
        for _ in range(50):
            if (await caller.invoke(capx, b"0")).status != d.Status.NO_ROUTE:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # let the stream credit of that call come back
        rs = await asyncio.gather(caller.invoke(capx, b"500"), caller.invoke(capx, b"500"))
        names = sorted(x.status_name for x in rs)
        check(f"OVERLOADED when {label}", names == ["OK", "OVERLOADED"], str(names))
        await slow.detach()

    # Informational: stream credit == max_concurrent (as section 2.5 recommends) and a caller
    # that invokes again as soon as it has its answer.
    capx = f"probe_tight_{os.getpid()}"
    tight = d.Agent(gw, creds, {capx: d.handle_echo}, open_lanes=False, max_concurrent=1, stream_credit=1)
    await tight.attach()
    await asyncio.sleep(0.2)
    statuses = [(await caller.invoke(capx, b"x")).status_name for _ in range(50)]
    print(f"INFO stream credit = max_concurrent = 1, 50 back-to-back calls: "
          f"{statuses.count('OK')} OK, {statuses.count('OVERLOADED')} OVERLOADED")
    await tight.detach()

    await caller.detach()
    await target.close_and_wait()

    # --- section 6.3: lanes -------------------------------------------------------------------
    conn, ok = await p.attached()
    others = [(i, a) for i, a in enumerate(ok.lanes) if i != ok.worker]
    if others:
        i, addr = others[0]
        lane = await p.raw(address=d.parse_address(addr))
        lane.send_control(d.encode_lane(ok.session, bytes(16)))
        a = await p.first(lane)
        c = await p.closed(lane)
        check("LANE with a wrong token: UNKNOWN_SESSION and close ATTACH_REFUSED (6.3)",
              c is not None and c.is_app(d.ConnCode.ATTACH_REFUSED),
              f"frame={a!r}; close={c.describe() if c else None}")
        for attempt in range(6):
            lane = await p.raw(address=d.parse_address(addr))
            lane.send_control(d.encode_lane(ok.session, ok.lane_token))
            a = await p.first(lane)
            if isinstance(a, d.LaneOk):
                break
            await asyncio.sleep(0.01 * 2 ** attempt)
        check("LANE_OK names the lane's worker (6.3)", isinstance(a, d.LaneOk) and a.worker == i, repr(a))
        d_res = None
        if isinstance(a, d.LaneOk):
            lane.discover_waiters[9] = asyncio.get_running_loop().create_future()
            lane.send_control(d.encode_discover(9, "probe_"))
            d_res = await asyncio.wait_for(lane.discover_waiters[9], 3)
            check("DISCOVER on a lane (6.3)", d_res.query_id == 9, repr(d_res))
            lane.send_control(d.encode_update_card(p.card))
            c = await p.closed(lane)
            check("UPDATE_CARD on a lane closes PROTOCOL_VIOLATION (4.5)",
                  c is not None and c.is_app(d.ConnCode.PROTOCOL_VIOLATION), c.describe() if c else "no close")
        # lane from another identity
        if args.other_cert:
            other = d.Credentials(args.other_cert, args.other_key, args.ca)
            lane = await d.connect(d.parse_address(addr), other, label="x", max_streams=4, on_incoming=lambda c, s: None)
            lane.send_control(d.encode_lane(ok.session, ok.lane_token))
            a = await p.first(lane)
            c = await p.closed(lane)
            check("LANE with the right token from another identity is refused (17)",
                  c is not None and c.is_app(d.ConnCode.ATTACH_REFUSED), f"frame={a!r} close={c.describe() if c else None}")
    else:
        print("SKIP lane probes: the gateway offers no lane to another worker")
    await conn.close_and_wait()

    if args.slow:
        conn = await p.raw()
        t0 = time.monotonic()
        c = await p.closed(conn, 10)
        check("no ATTACH: closed ATTACH_TIMEOUT after attach_timeout_ms (3)",
              c is not None and c.is_app(d.ConnCode.ATTACH_TIMEOUT), f"{c.describe() if c else None} after {time.monotonic() - t0:.1f}s")

    print(f"{len(FAILURES)} failure(s)" + (": " + "; ".join(FAILURES) if FAILURES else ""))
    return 1 if FAILURES else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gateway", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--other-cert", help="a second agent identity, for the lane-identity probe")
    ap.add_argument("--other-key")
    ap.add_argument("--slow", action="store_true")
    args = ap.parse_args()
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
