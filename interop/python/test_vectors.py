#!/usr/bin/env python3
"""Checks dmsc_agent's codecs against the worked examples of docs/PROTOCOL.md (section 18) and
the varint table of section 1.3, read from the document itself.

Run: python3 interop/python/test_vectors.py   (exit 0 when every vector matches)
"""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import dmsc_agent as d  # noqa: E402

SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "PROTOCOL.md")


def load_examples(text: str) -> dict[str, bytes]:
    out = {}
    for m in re.finditer(r"<!-- example: (\w+) -->\s*```\n(.*?)```", text, re.S):
        out[m.group(1)] = bytes.fromhex(m.group(2).replace("\n", " "))
    return out


def load_varint_table(text: str) -> list[tuple[int, bytes]]:
    rows = []
    for m in re.finditer(r"^\| (\d+) \| `([0-9a-f ]+)` \|$", text, re.M):
        rows.append((int(m.group(1)), bytes.fromhex(m.group(2))))
    return rows


def main() -> int:
    text = open(SPEC, encoding="utf-8").read()
    ex = load_examples(text)
    failures = []

    def check(name, cond, detail=""):
        print(f"{'PASS' if cond else 'FAIL'} {name} {detail}")
        if not cond:
            failures.append(name)

    # varints (section 1.3)
    table = load_varint_table(text)
    check("varint table found", len(table) >= 10, str(len(table)))
    for value, enc in table:
        check(f"varint {value}", d.encode_varint(value) == enc and d.Reader(enc).varint() == value)
    check("non-minimal varint 40 25 = 37", d.Reader(bytes([0x40, 0x25])).varint() == 37)

    def frame(name):
        p = d.FrameParser()
        p.feed(ex[name])
        f = p.next_frame()
        assert f is not None and not p.buf, name
        return f

    card = b'{"name":"echo-agent","skills":[{"id":"echo","name":"Echo","tags":["demo"]}]}'
    check("attach (encode)", d.encode_attach(100, card) == ex["attach"])

    t, pl = frame("attach_ok")
    ok = d.decode_gateway_frame(t, pl)
    check("attach_ok (decode)", isinstance(ok, d.AttachOk) and ok.session == 0x0002000000000007
          and ok.lane_token == bytes.fromhex("00112233445566778899aabbccddeeff") and ok.worker == 2
          and ok.lanes == ["192.0.2.10:7000", "192.0.2.10:7001", "192.0.2.10:7002"] and ok.max_concurrent == 100, repr(ok))

    t, pl = frame("attach_refused")
    r = d.decode_gateway_frame(t, pl)
    check("attach_refused (decode)", r == d.AttachRefused(1, "skills[0].id: missing"), repr(r))

    check("lane (encode)", d.encode_lane(0x0002000000000007, ok.lane_token) == ex["lane"])
    for i in (0, 1):
        t, pl = frame(f"lane_ok_{i}")
        check(f"lane_ok_{i} (decode)", d.decode_gateway_frame(t, pl) == d.LaneOk(i))

    check("update_card (encode)",
          d.encode_update_card(b'{"name":"e","skills":[{"id":"echo","name":"E"}]}') == ex["update_card"])
    t, pl = frame("update_result")
    check("update_result (decode)", d.decode_gateway_frame(t, pl) == d.UpdateResult(0, ""))

    check("discover (encode)", d.encode_discover(7, "ec", "") == ex["discover"])
    t, pl = frame("discover_result")
    dr = d.decode_gateway_frame(t, pl)
    check("discover_result (decode)", dr == d.DiscoverResult(7, False, [d.DiscoveryEntry("echo", "", 2, ["demo"], [], [])]), repr(dr))

    check("detach (encode)", d.encode_detach() == ex["detach"])
    t, pl = frame("detached")
    check("detached (decode)", d.decode_gateway_frame(t, pl) == d.Detached())
    t, pl = frame("drain")
    check("drain (decode)", d.decode_gateway_frame(t, pl) == d.Drain(10000))
    t, pl = frame("unknown")
    check("unknown frame skipped", t == 0x3F and pl == b"\xaa\xbb" and d.decode_gateway_frame(t, pl) is None)

    # streaming reassembly: byte by byte, several frames back to back
    p = d.FrameParser()
    stream = ex["unknown"] + ex["attach_ok"] + ex["drain"]
    got = []
    for b in stream:
        p.feed(bytes([b]))
        while (f := p.next_frame()) is not None:
            got.append(f[0])
    check("byte-by-byte reassembly", got == [0x3F, 0x02, 0x0C], str(got))

    # trailing bytes in a payload are ignored (section 4.1 rule 2)
    check("trailing bytes ignored", d.decode_gateway_frame(0x05, b"\x01\xff\xff") == d.LaneOk(1))
    try:
        d.decode_gateway_frame(0x09, bytes([7, 2, 0]))
        check("truncated=2 is malformed", False)
    except d.Malformed:
        check("truncated=2 is malformed", True)
    p = d.FrameParser()
    p.feed(d.encode_varint(0x3F) + d.encode_varint(262145))
    try:
        p.next_frame()
        check("oversized frame length rejected at once", False)
    except d.FrameTooLarge:
        check("oversized frame length rejected at once", True)

    # headers (sections 7.2, 7.3, 18.8, 18.9)
    req = d.RequestHeader("echo", 1500, 0, content_type="text/plain")
    check("request (encode)", req.encode() == ex["request"])
    block, used = d.split_header(ex["request_forwarded"])
    fwd = d.RequestHeader.decode_block(block)
    check("request_forwarded (decode)", used == len(ex["request_forwarded"]) and fwd == d.RequestHeader(
        "echo", 1500, 1, content_type="text/plain", caller="spiffe://dmsc.local/agent/alice"), repr(fwd))
    check("request_forwarded (encode)", fwd.encode() == ex["request_forwarded"])
    traced = d.RequestHeader("echo", 0, 0, bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736"),
                             bytes.fromhex("00f067aa0ba902b7"), 1, "", "")
    check("request_traced (encode)", traced.encode() == ex["request_traced"])
    alice, front = "spiffe://dmsc.local/agent/alice", "spiffe://dmsc.local/agent/a2a-front"
    delegated = d.RequestHeader("echo", 1500, 0, content_type="text/plain", target_session=2,
                                on_behalf_of=alice)
    check("request_delegated (encode)", delegated.encode() == ex["request_delegated"])
    block, _ = d.split_header(ex["request_delegated"])
    check("request_delegated (decode)", d.RequestHeader.decode_block(block) == delegated)
    via = d.RequestHeader("echo", 1500, 1, content_type="text/plain", caller=alice, via=front)
    check("request_forwarded_via (encode)", via.encode() == ex["request_forwarded_via"])
    block, _ = d.split_header(ex["request_forwarded_via"])
    check("request_forwarded_via (decode)", d.RequestHeader.decode_block(block) == via)
    check("response_ok (encode)", d.ResponseHeader(0, "text/plain", "").encode() == ex["response_ok"])
    block, _ = d.split_header(ex["response_no_route"])
    nr = d.ResponseHeader.decode_block(block)
    check("response_no_route (decode)", nr == d.ResponseHeader(1, "", "no agent offers capability"), repr(nr))

    # SPIFFE IDs (section 2.3)
    for good in ("spiffe://dmsc.local/agent/weather", "spiffe://dmsc.local/gateway/gw1", "spiffe://dmsc.local/control"):
        try:
            d.parse_spiffe_id(good)
            check(f"valid {good}", True)
        except d.IdentityError as e:
            check(f"valid {good}", False, str(e))
    for bad in ("spiffe://DMSC.local/agent/a", "spiffe://dmsc.local/agent/", "spiffe://dmsc.local/agent/a/b",
                "spiffe://dmsc.local", "spiffe://dmsc.local/agent/a b", "SPIFFE://dmsc.local/agent/a",
                "spiffe://dmsc.local/agent/..", "spiffe://dmsc.local/agent/a/"):
        try:
            d.parse_spiffe_id(bad)
            check(f"invalid {bad}", False)
        except d.IdentityError:
            check(f"invalid {bad}", True)

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
