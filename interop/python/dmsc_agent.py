#!/usr/bin/env python3
"""A DMSC agent (protocol ``dmsc/1``) in Python, on aioquic.

This module was written from ``docs/PROTOCOL.md`` alone, as an independent check that the
specification is complete enough to interoperate with the Rust gateway. It implements:

* QUIC varints, control frames, request and response headers (PROTOCOL.md sections 1.3, 4, 7);
* the connection: QUIC v1 client, TLS 1.3, ALPN ``dmsc/1``, mutual TLS; the gateway is verified
  by the domain CA *and* by its SPIFFE ID (``spiffe://<domain>/gateway/<id>``, section 2.4),
  never by host name;
* the session: ``ATTACH`` with an A2A agent card, lanes to every other worker (section 6.3),
  keep-alive PINGs, ``DISCOVER``, ``UPDATE_CARD``, ``DETACH``, ``DRAIN`` handling;
* serving capabilities (as a *target*) and invoking them (as a *caller*).

Command line (see ``--help``)::

    python3 dmsc_agent.py --gateway 127.0.0.1:4433 --cert agent.pem --key agent.key --ca ca.pem \\
        serve --capability py_echo --capability py_upper
    python3 dmsc_agent.py ... invoke --capability echo --payload hello
    python3 dmsc_agent.py ... discover --prefix py_
    python3 dmsc_agent.py ... selftest

``invoke`` prints the status name on the first line of standard output and then the response
payload, and exits 0 only when the status is ``OK``. ``selftest`` attaches, invokes its own
capabilities through the gateway, checks the spec's behaviour in a series of cases and exits 0
only if all of them pass.

Requires ``aioquic`` (``pip install aioquic``); Python 3.11 or later.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import json
import logging
import os
import random
import re
import signal
import socket
import ssl
import sys
from collections import deque
from typing import Awaitable, Callable, Optional

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509

log = logging.getLogger("dmsc_agent")

# ---------------------------------------------------------------------------------------------
# Constants (PROTOCOL.md sections 2, 4, 12-15)
# ---------------------------------------------------------------------------------------------

ALPN = "dmsc/1"

MAX_VARINT = (1 << 62) - 1
MAX_CONTROL_FRAME_BYTES = 262144  # section 4.1 rule 4
MAX_HEADER_BLOCK = 16384  # sections 7.2, 7.3
MAX_CAPABILITY = 255
MAX_CONTENT_TYPE = 255
MAX_CALLER = 2048
MAX_MESSAGE = 1024
MAX_HOP_COUNT = 255
MAX_CARD = 65536
MAX_LANES = 256
MAX_LANE_ADDR = 64
MAX_DISCOVERY_FILTER = 255
MAX_DISCOVERY_ENTRIES = 1024
MAX_DISCOVERY_LIST = 32
MAX_DISCOVERY_STRING = 1024

KEEPALIVE_SECONDS = 5.0  # section 2.5
IDLE_TIMEOUT_SECONDS = 30.0  # section 2.5
STREAM_WINDOW = 1 << 20


class FrameType(enum.IntEnum):
    """Control frame types (section 4.2)."""

    ATTACH = 0x01
    ATTACH_OK = 0x02
    ATTACH_REFUSED = 0x03
    LANE = 0x04
    LANE_OK = 0x05
    UPDATE_CARD = 0x06
    UPDATE_RESULT = 0x07
    DISCOVER = 0x08
    DISCOVER_RESULT = 0x09
    DETACH = 0x0A
    DETACHED = 0x0B
    DRAIN = 0x0C


#: Frame types only agents send: an agent receiving one closes with PROTOCOL_VIOLATION (4.5).
AGENT_ONLY_FRAMES = {
    FrameType.ATTACH,
    FrameType.LANE,
    FrameType.UPDATE_CARD,
    FrameType.DISCOVER,
    FrameType.DETACH,
}


class Refusal(enum.IntEnum):
    """Refusal codes of ATTACH_REFUSED and UPDATE_RESULT (section 4.4)."""

    ACCEPTED = 0
    BAD_CARD = 1
    NOT_PERMITTED = 2
    GATEWAY_FULL = 3
    ALREADY_ATTACHED = 4
    DRAINING = 5
    UNKNOWN_SESSION = 6


class Status(enum.IntEnum):
    """Response status codes (section 12)."""

    OK = 0
    NO_ROUTE = 1
    DENIED = 2
    RATE_LIMITED = 3
    OVERLOADED = 4
    DEADLINE_EXCEEDED = 5
    TARGET_FAILED = 6
    BAD_REQUEST = 7
    LOOP_DETECTED = 8
    UNAVAILABLE = 9
    APPLICATION_ERROR = 10


class StreamCode(enum.IntEnum):
    """RESET_STREAM / STOP_SENDING codes on invocation streams (section 13)."""

    CANCELLED = 0x1
    TARGET_FAILED = 0x2
    DEADLINE_EXCEEDED = 0x3
    PROTOCOL_VIOLATION = 0x4


class ConnCode(enum.IntEnum):
    """Application CONNECTION_CLOSE codes (section 14)."""

    NO_ERROR = 0x0
    PROTOCOL_VIOLATION = 0x1
    FRAME_TOO_LARGE = 0x2
    ATTACH_REFUSED = 0x3
    SHUTTING_DOWN = 0x4
    LIMIT_EXCEEDED = 0x5
    INTERNAL_ERROR = 0x6
    UNAUTHENTICATED = 0x7
    ATTACH_TIMEOUT = 0x8


def status_name(code: int) -> str:
    """The name of a status code, or ``UNKNOWN(<n>)`` (section 12: surface the numeric code)."""
    try:
        return Status(code).name
    except ValueError:
        return f"UNKNOWN({code})"


def _enum_name(kind: type[enum.IntEnum], code: int) -> str:
    try:
        return kind(code).name
    except ValueError:
        return f"0x{code:x}"


# ---------------------------------------------------------------------------------------------
# Encoding primitives (section 1.3)
# ---------------------------------------------------------------------------------------------


class Incomplete(Exception):
    """More bytes are needed."""


class Malformed(Exception):
    """A frame or header violates the encoding rules."""


class FrameTooLarge(Exception):
    """A control frame's length exceeds the receiver's limit (section 4.1 rule 4)."""


def encode_varint(value: int) -> bytes:
    """Shortest QUIC variable-length encoding of ``value`` (RFC 9000, section 16)."""
    if value < 0 or value > MAX_VARINT:
        raise ValueError(f"varint out of range: {value}")
    if value < 1 << 6:
        return bytes([value])
    if value < 1 << 14:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 1 << 30:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def encode_bytes(data: bytes, limit: int) -> bytes:
    """``bytes(N)``: a varint length then the bytes."""
    if len(data) > limit:
        raise ValueError(f"{len(data)} bytes, over the limit of {limit}")
    return encode_varint(len(data)) + data


def encode_str(text: str, limit: int) -> bytes:
    """``str(N)``: a varint byte length then UTF-8."""
    return encode_bytes(text.encode("utf-8"), limit)


class Reader:
    """Sequential decoder over a byte buffer. Raises :class:`Incomplete` at the end."""

    def __init__(self, data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None):
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def varint(self) -> int:
        if self.pos >= self.end:
            raise Incomplete
        first = self.data[self.pos]
        size = 1 << (first >> 6)
        if self.pos + size > self.end:
            raise Incomplete
        value = first & 0x3F
        for b in self.data[self.pos + 1 : self.pos + size]:
            value = (value << 8) | b
        self.pos += size
        return value

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise Incomplete
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def bytes_(self, limit: int) -> bytes:
        length = self.varint()
        if length > limit:
            raise Malformed(f"length {length} above the limit of {limit}")
        return self.take(length)

    def str_(self, limit: int) -> str:
        raw = self.bytes_(limit)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Malformed("string is not UTF-8") from exc


def _complete(reader_fn):
    """Decodes a complete unit: running out of bytes inside it makes it malformed."""
    try:
        return reader_fn()
    except Incomplete as exc:
        raise Malformed("ends inside a field") from exc


# ---------------------------------------------------------------------------------------------
# Control frames (section 4)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AttachOk:
    session: int
    lane_token: bytes
    worker: int
    lanes: list[str]
    max_concurrent: int

    def __repr__(self) -> str:  # never log the lane token (section 6.2)
        return (
            f"AttachOk(session=0x{self.session:016x}, worker={self.worker}, "
            f"lanes={self.lanes}, max_concurrent={self.max_concurrent})"
        )


@dataclasses.dataclass
class AttachRefused:
    refusal: int
    reason: str


@dataclasses.dataclass
class LaneOk:
    worker: int


@dataclasses.dataclass
class UpdateResult:
    refusal: int
    reason: str


@dataclasses.dataclass
class DiscoveryEntry:
    capability: str
    description: str
    providers: int
    tags: list[str]
    input_modes: list[str]
    output_modes: list[str]


@dataclasses.dataclass
class DiscoverResult:
    query_id: int
    truncated: bool
    entries: list[DiscoveryEntry]


@dataclasses.dataclass
class Detached:
    pass


@dataclasses.dataclass
class Drain:
    grace_ms: int


def encode_frame(ftype: int, payload: bytes) -> bytes:
    """``type (varint) | length (varint) | payload``."""
    return encode_varint(ftype) + encode_varint(len(payload)) + payload


def encode_attach(max_concurrent: int, card: bytes) -> bytes:
    return encode_frame(FrameType.ATTACH, encode_varint(max_concurrent) + encode_bytes(card, MAX_CARD))


def encode_lane(session: int, lane_token: bytes) -> bytes:
    if len(lane_token) != 16:
        raise ValueError("lane token must be 16 bytes")
    return encode_frame(FrameType.LANE, session.to_bytes(8, "big") + lane_token)


def encode_update_card(card: bytes) -> bytes:
    return encode_frame(FrameType.UPDATE_CARD, encode_bytes(card, MAX_CARD))


def encode_discover(query_id: int, prefix: str = "", tag: str = "") -> bytes:
    return encode_frame(
        FrameType.DISCOVER,
        encode_varint(query_id) + encode_str(prefix, MAX_DISCOVERY_FILTER) + encode_str(tag, MAX_DISCOVERY_FILTER),
    )


def encode_detach() -> bytes:
    return encode_frame(FrameType.DETACH, b"")


def _list(r: Reader, count_limit: int, item_limit: int) -> list[str]:
    count = r.varint()
    if count > count_limit:
        raise Malformed(f"list of {count} items, above {count_limit}")
    return [r.str_(item_limit) for _ in range(count)]


def decode_gateway_frame(ftype: int, payload: bytes):
    """Decodes a frame the gateway sends. Returns ``None`` for an unknown type (skipped,
    section 4.1 rule 1); raises :class:`Malformed`; trailing bytes are ignored (rule 2).
    Agent-only frame types are returned as the bare :class:`FrameType` so the caller can close
    with PROTOCOL_VIOLATION (section 4.5)."""
    r = Reader(payload)

    def parse():
        if ftype == FrameType.ATTACH_OK:
            session = r.u64()
            token = r.take(16)
            worker = r.varint()
            lane_count = r.varint()
            if lane_count > MAX_LANES:
                raise Malformed(f"lane_count {lane_count} above {MAX_LANES}")
            lanes = [r.str_(MAX_LANE_ADDR) for _ in range(lane_count)]
            max_concurrent = r.varint()
            return AttachOk(session, token, worker, lanes, max_concurrent)
        if ftype == FrameType.ATTACH_REFUSED:
            refusal = r.varint()
            reason = r.str_(MAX_MESSAGE)
            if refusal == 0:
                raise Malformed("ATTACH_REFUSED with refusal 0")
            return AttachRefused(refusal, reason)
        if ftype == FrameType.LANE_OK:
            return LaneOk(r.varint())
        if ftype == FrameType.UPDATE_RESULT:
            return UpdateResult(r.varint(), r.str_(MAX_MESSAGE))
        if ftype == FrameType.DISCOVER_RESULT:
            query_id = r.varint()
            truncated = r.u8()
            if truncated not in (0, 1):
                raise Malformed(f"truncated byte {truncated}")
            count = r.varint()
            if count > MAX_DISCOVERY_ENTRIES:
                raise Malformed(f"entry_count {count} above {MAX_DISCOVERY_ENTRIES}")
            entries = []
            for _ in range(count):
                capability = r.str_(MAX_CAPABILITY)
                description = r.str_(MAX_DISCOVERY_STRING)
                providers = r.varint()
                tags = _list(r, MAX_DISCOVERY_LIST, MAX_DISCOVERY_STRING)
                inputs = _list(r, MAX_DISCOVERY_LIST, MAX_DISCOVERY_STRING)
                outputs = _list(r, MAX_DISCOVERY_LIST, MAX_DISCOVERY_STRING)
                entries.append(DiscoveryEntry(capability, description, providers, tags, inputs, outputs))
            return DiscoverResult(query_id, bool(truncated), entries)
        if ftype == FrameType.DETACHED:
            return Detached()
        if ftype == FrameType.DRAIN:
            return Drain(r.varint())
        if ftype in AGENT_ONLY_FRAMES:
            return FrameType(ftype)
        return None

    return _complete(parse)


class FrameParser:
    """Reassembles control frames from the byte stream (section 4.1)."""

    def __init__(self, max_payload: int = MAX_CONTROL_FRAME_BYTES):
        self.buf = bytearray()
        self.max_payload = max_payload

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next_frame(self) -> Optional[tuple[int, bytes]]:
        """The next complete ``(type, payload)``, or ``None``. Raises :class:`FrameTooLarge` as
        soon as an oversized length has been read."""
        r = Reader(self.buf)
        try:
            ftype = r.varint()
            length = r.varint()
        except Incomplete:
            return None
        if length > self.max_payload:
            raise FrameTooLarge(f"control frame of {length} bytes, limit {self.max_payload}")
        if r.remaining < length:
            return None
        payload = r.take(length)
        del self.buf[: r.pos]
        return ftype, payload


# ---------------------------------------------------------------------------------------------
# Invocation headers (section 7)
# ---------------------------------------------------------------------------------------------

ZERO_TRACE_ID = bytes(16)
ZERO_SPAN_ID = bytes(8)


@dataclasses.dataclass
class RequestHeader:
    """The request header (section 7.2)."""

    capability: str
    deadline_ms: int = 0
    hop_count: int = 0
    trace_id: bytes = ZERO_TRACE_ID
    span_id: bytes = ZERO_SPAN_ID
    trace_flags: int = 0
    content_type: str = ""
    caller: str = ""
    target_session: int = 0
    on_behalf_of: str = ""
    via: str = ""

    def encode_block(self) -> bytes:
        if not self.capability:
            raise ValueError("capability must not be empty")
        if self.hop_count > MAX_HOP_COUNT:
            raise ValueError("hop_count above 255")
        if len(self.trace_id) != 16 or len(self.span_id) != 8:
            raise ValueError("trace_id is 16 bytes, span_id 8")
        return (
            encode_str(self.capability, MAX_CAPABILITY)
            + encode_varint(self.deadline_ms)
            + encode_varint(self.hop_count)
            + self.trace_id
            + self.span_id
            + bytes([self.trace_flags])
            + encode_str(self.content_type, MAX_CONTENT_TYPE)
            + encode_str(self.caller, MAX_CALLER)
            + self._optional_fields()
        )

    def _optional_fields(self) -> bytes:
        """target_session, on_behalf_of, via: the trailing ones at their defaults are left out."""
        fields = [
            encode_varint(self.target_session),
            encode_str(self.on_behalf_of, MAX_CALLER),
            encode_str(self.via, MAX_CALLER),
        ]
        if self.via:
            return b"".join(fields)
        if self.on_behalf_of:
            return b"".join(fields[:2])
        if self.target_session:
            return fields[0]
        return b""

    def encode(self) -> bytes:
        block = self.encode_block()
        return encode_varint(len(block)) + block

    @classmethod
    def decode_block(cls, block: bytes) -> "RequestHeader":
        r = Reader(block)

        def parse():
            capability = r.str_(MAX_CAPABILITY)
            if not capability:
                raise Malformed("empty capability")
            deadline = r.varint()
            hops = r.varint()
            if hops > MAX_HOP_COUNT:
                raise Malformed(f"hop_count {hops} above 255")
            trace_id = r.take(16)
            span_id = r.take(8)
            flags = r.u8()
            content_type = r.str_(MAX_CONTENT_TYPE)
            caller = r.str_(MAX_CALLER)
            # Optional trailing fields, each read while bytes remain (section 7.2); bytes after
            # `via` are extensions: ignored (section 16).
            target_session = r.varint() if r.remaining else 0
            on_behalf_of = r.str_(MAX_CALLER) if r.remaining else ""
            via = r.str_(MAX_CALLER) if r.remaining else ""
            return cls(capability, deadline, hops, trace_id, span_id, flags, content_type, caller,
                       target_session, on_behalf_of, via)

        return _complete(parse)


@dataclasses.dataclass
class ResponseHeader:
    """The response header (section 7.3)."""

    status: int
    content_type: str = ""
    message: str = ""

    def encode(self) -> bytes:
        block = (
            encode_varint(self.status)
            + encode_str(self.content_type, MAX_CONTENT_TYPE)
            + encode_str(self.message, MAX_MESSAGE)
        )
        return encode_varint(len(block)) + block

    @classmethod
    def decode_block(cls, block: bytes) -> "ResponseHeader":
        r = Reader(block)
        return _complete(lambda: cls(r.varint(), r.str_(MAX_CONTENT_TYPE), r.str_(MAX_MESSAGE)))


def split_header(buf: bytes | bytearray, limit: int = MAX_HEADER_BLOCK) -> Optional[tuple[bytes, int]]:
    """If ``buf`` starts with a complete ``block_length | block``, returns ``(block, used)``;
    ``None`` if more bytes are needed; raises :class:`Malformed` if the length is over ``limit``."""
    r = Reader(buf)
    try:
        length = r.varint()
    except Incomplete:
        return None
    if length > limit:
        raise Malformed(f"header block of {length} bytes, limit {limit}")
    if r.remaining < length:
        return None
    return r.take(length), r.pos


# ---------------------------------------------------------------------------------------------
# SPIFFE identities and certificates (sections 2.3, 2.4)
# ---------------------------------------------------------------------------------------------

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


@dataclasses.dataclass(frozen=True)
class SpiffeId:
    domain: str
    kind: str  # "agent", "gateway" or "control"
    name: str  # empty for "control"

    def __str__(self) -> str:
        if self.kind == "control":
            return f"spiffe://{self.domain}/control"
        return f"spiffe://{self.domain}/{self.kind}/{self.name}"


class IdentityError(Exception):
    pass


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parses a SPIFFE ID of one of the forms section 2.3 accepts."""
    if len(text.encode("utf-8")) > 2048:
        raise IdentityError("SPIFFE ID longer than 2048 bytes")
    if not text.startswith("spiffe://"):
        raise IdentityError(f"{text!r}: scheme is not exactly 'spiffe://'")
    domain, sep, path = text[len("spiffe://") :].partition("/")
    if not _TRUST_DOMAIN.fullmatch(domain):
        raise IdentityError(f"{text!r}: invalid trust domain")
    if not sep:
        raise IdentityError(f"{text!r}: no path")
    path = "/" + path
    if path == "/control":
        return SpiffeId(domain, "control", "")
    for kind in ("agent", "gateway"):
        prefix = f"/{kind}/"
        if path.startswith(prefix):
            segment = path[len(prefix) :]
            if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
                raise IdentityError(f"{text!r}: invalid {kind} name")
            return SpiffeId(domain, kind, segment)
    raise IdentityError(f"{text!r}: path is not /agent/<name>, /gateway/<id> or /control")


# The certificates of the development PKI encode BasicConstraints with an explicit
# `cA FALSE` (a DEFAULT value, which DER forbids). Recent pyca/cryptography refuses to parse the
# extensions of such certificates ("EncodedDefault"), so the two extensions the SPIFFE checks
# need are read with the small tolerant DER walker below, from the signed TBSCertificate bytes.

_OID_SAN = bytes.fromhex("551d11")  # 2.5.29.17 subjectAltName
_OID_EKU = bytes.fromhex("551d25")  # 2.5.29.37 extendedKeyUsage
_OID_SERVER_AUTH = bytes.fromhex("2b06010505070301")  # 1.3.6.1.5.5.7.3.1
_OID_CLIENT_AUTH = bytes.fromhex("2b06010505070302")  # 1.3.6.1.5.5.7.3.2


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) pairs of a concatenation of DER TLVs (definite lengths only)."""
    out, pos = [], 0
    while pos < len(data):
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
        if pos + length > len(data):
            raise IdentityError("truncated DER in certificate")
        out.append((tag, data[pos : pos + length]))
        pos += length
    return out


def certificate_extensions(cert: x509.Certificate) -> dict[bytes, bytes]:
    """extnID (DER OID content) -> extnValue (the OCTET STRING's content), from the
    TBSCertificate's `[3] EXPLICIT Extensions`."""
    (tag, tbs), = _der_items(cert.tbs_certificate_bytes)
    exts: dict[bytes, bytes] = {}
    for t, content in _der_items(tbs):
        if t == 0xA3:  # [3] extensions
            (_, seq), = _der_items(content)
            for _, ext in _der_items(seq):
                parts = _der_items(ext)
                oid = parts[0][1]
                value = parts[-1][1]  # skip the optional `critical` BOOLEAN
                if oid in exts:
                    raise IdentityError("duplicate certificate extension")
                exts[oid] = value
    return exts


def certificate_uris(cert: x509.Certificate) -> list[str]:
    """The URI subjectAltNames ([6] IA5String) of a certificate."""
    san = certificate_extensions(cert).get(_OID_SAN)
    if san is None:
        return []
    (_, names), = _der_items(san)
    return [v.decode("ascii", "replace") for t, v in _der_items(names) if t == 0x86]


def certificate_ekus(cert: x509.Certificate) -> Optional[list[bytes]]:
    """The extendedKeyUsage OIDs (DER contents), or None without that extension."""
    eku = certificate_extensions(cert).get(_OID_EKU)
    if eku is None:
        return None
    (_, seq), = _der_items(eku)
    return [v for t, v in _der_items(seq) if t == 0x06]


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID of a certificate: exactly one URI SAN whose scheme is ``spiffe://``
    (counted case-insensitively; other URIs, DNS and IP SANs ignored)."""
    uris = [u for u in certificate_uris(cert) if u.lower().startswith("spiffe://")]
    if len(uris) != 1:
        raise IdentityError(f"{len(uris)} spiffe:// URI SANs, expected exactly one")
    return parse_spiffe_id(uris[0])


def check_gateway_certificate(cert: x509.Certificate, domain: str) -> SpiffeId:
    """The checks of section 2.4 that TLS chain validation does not do: extendedKeyUsage
    includes serverAuth if present; exactly one SPIFFE URI SAN naming a gateway of ``domain``."""
    ekus = certificate_ekus(cert)
    if ekus is not None and _OID_SERVER_AUTH not in ekus:
        raise IdentityError("gateway certificate's extendedKeyUsage lacks serverAuth")
    ident = spiffe_id_of(cert)
    if ident.domain != domain:
        raise IdentityError(f"gateway {ident} is not of trust domain {domain!r}")
    if ident.kind != "gateway":
        raise IdentityError(f"{ident} does not name a gateway")
    return ident


def load_own_identity(cert_file: str) -> SpiffeId:
    """The agent's own identity (and so its trust domain), from the first certificate of its
    PEM file."""
    with open(cert_file, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    ident = spiffe_id_of(certs[0])
    if ident.kind != "agent":
        raise IdentityError(f"own certificate names {ident}, not an agent")
    return ident


# ---------------------------------------------------------------------------------------------
# Agent card (section 5)
# ---------------------------------------------------------------------------------------------


def make_card(name: str, capabilities: list[str], description: str = "Python interop agent") -> bytes:
    """A minimal A2A agent card whose skill ids are ``capabilities``."""
    card = {
        "name": name,
        "description": description,
        "version": "1.0.0",
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        "skills": [
            {"id": cap, "name": cap, "description": f"{cap} (python)", "tags": ["python", "interop"]}
            for cap in capabilities
        ],
    }
    return json.dumps(card, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Errors, close information
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class CloseInfo:
    """How a connection ended, from aioquic's ConnectionTerminated."""

    error_code: int
    transport: bool  # True: transport CONNECTION_CLOSE (0x1c); False: application (0x1d)
    reason: str
    by_us: bool = False

    def describe(self) -> str:
        if self.reason == "Idle timeout":
            return "idle timeout"
        if self.transport:
            if 0x100 <= self.error_code <= 0x1FF:
                what = f"CRYPTO_ERROR (TLS alert {self.error_code - 0x100})"
            elif self.error_code == 0x2:
                what = "CONNECTION_REFUSED"
            else:
                what = f"transport error 0x{self.error_code:x}"
        else:
            what = _enum_name(ConnCode, self.error_code)
        detail = ("sent by us" if self.by_us else "") + (": " if self.by_us and self.reason else "") + self.reason
        return f"{what} ({detail})" if detail else what

    def is_app(self, code: int) -> bool:
        return not self.transport and self.error_code == code


class DmscError(Exception):
    pass


class ConnectionLost(DmscError):
    def __init__(self, close: Optional[CloseInfo]):
        super().__init__(f"connection closed: {close.describe() if close else 'unknown'}")
        self.close = close


class AttachRefusedError(DmscError):
    """An ATTACH or LANE was refused: by an ATTACH_REFUSED frame and/or a close with
    ATTACH_REFUSED (0x3). ``refusal`` is None when only the close arrived (section 4.5)."""

    def __init__(self, refusal: Optional[int], reason: str, close: Optional[CloseInfo]):
        name = _enum_name(Refusal, refusal) if refusal is not None else "(no ATTACH_REFUSED frame)"
        super().__init__(f"refused: {name} {reason!r}; close: {close.describe() if close else '-'}")
        self.refusal = refusal
        self.reason = reason
        self.close = close


class StreamReset(Exception):
    def __init__(self, code: int):
        super().__init__(f"stream reset by peer with {_enum_name(StreamCode, code)}")
        self.code = code


# ---------------------------------------------------------------------------------------------
# Streams and connections
# ---------------------------------------------------------------------------------------------

_FIN = object()


class Stream:
    """One bidirectional invocation stream: an async byte reader plus send helpers."""

    def __init__(self, conn: "DmscConnection", stream_id: int):
        self.conn = conn
        self.id = stream_id
        self._queue: asyncio.Queue = asyncio.Queue()
        self.buf = bytearray()
        self.fin = False
        self.stop_sending_code: Optional[int] = None  # STOP_SENDING received from the peer
        self.reset_code: Optional[int] = None  # RESET_STREAM received from the peer
        self.send_done = False
        self.aborted = asyncio.Event()  # the peer reset or stopped the stream, or the connection died

    # -- fed by the connection ---------------------------------------------------------------
    def _on_data(self, data: bytes, end: bool) -> None:
        if data:
            self._queue.put_nowait(data)
        if end:
            self._queue.put_nowait(_FIN)

    def _on_reset(self, code: int) -> None:
        self.reset_code = code
        self.aborted.set()
        self._queue.put_nowait(StreamReset(code))

    def _on_stop_sending(self, code: int) -> None:
        # aioquic has already reset our sending half with the same code (RFC 9000 3.5).
        self.stop_sending_code = code
        self.send_done = True
        self.aborted.set()

    def _on_close(self, close: Optional[CloseInfo]) -> None:
        self.aborted.set()
        self._queue.put_nowait(ConnectionLost(close))

    # -- reading -----------------------------------------------------------------------------
    async def read_more(self) -> bool:
        """Appends the next chunk to ``buf``. False at FIN; raises on reset / connection loss."""
        if self.fin:
            return False
        item = await self._queue.get()
        if item is _FIN:
            self.fin = True
            return False
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # sticky
            raise item
        self.buf += item
        return True

    async def read_header(self, limit: int = MAX_HEADER_BLOCK) -> bytes:
        """Reads ``block_length | block``; returns the block. Raises Malformed (including FIN
        before the block is complete)."""
        while True:
            got = split_header(self.buf, limit)
            if got is not None:
                block, used = got
                del self.buf[:used]
                return block
            if not await self.read_more():
                raise Malformed("stream ended before the header was complete")

    async def read_to_end(self, limit: int) -> bytes:
        """Reads the rest of the stream up to FIN; raises ``OverflowError`` past ``limit``."""
        while await self.read_more():
            if len(self.buf) > limit:
                raise OverflowError(f"payload over {limit} bytes")
        data = bytes(self.buf)
        self.buf.clear()
        return data

    # -- writing -----------------------------------------------------------------------------
    def send(self, data: bytes, end: bool = False) -> bool:
        """Queues ``data`` (and FIN). False if the sending half was reset meanwhile."""
        if self.send_done:
            return False
        try:
            self.conn.quic.send_stream_data(self.id, data, end_stream=end)
        except (ValueError, RuntimeError):  # reset after STOP_SENDING, or stream gone
            self.send_done = True
            return False
        if end:
            self.send_done = True
        self.conn.transmit()
        return True

    def reset(self, code: int) -> None:
        """RESET_STREAM on our sending half."""
        if not self.send_done:
            self.send_done = True
            try:
                self.conn.quic.reset_stream(self.id, code)
            except (ValueError, RuntimeError):
                pass
            self.conn.transmit()

    def stop_sending(self, code: int) -> None:
        """STOP_SENDING: ask the peer to stop sending on this stream."""
        if not self.fin:
            try:
                self.conn.quic.stop_stream(self.id, code)
            except (ValueError, RuntimeError):
                pass
            self.fin = True  # consider the receiving half finished (section 7.7 rule 5)
            self.conn.transmit()

    def forget(self) -> None:
        self.conn.streams.pop(self.id, None)


class DmscConnection(QuicConnectionProtocol):
    """One QUIC connection to the gateway (primary or lane).

    Stream 0 is the control stream: its bytes are parsed into frames synchronously as they
    arrive. Gateway-opened streams (``4k+1``) are handed to ``on_incoming``; agent-opened ones
    are created by :meth:`open_stream`.
    """

    def __init__(self, quic: QuicConnection, *, label: str, on_incoming: Callable[["DmscConnection", Stream], None]):
        super().__init__(quic)
        self.quic = quic
        self.label = label
        self.on_incoming = on_incoming
        self.streams: dict[int, Stream] = {}
        self.parser = FrameParser()
        self.close_info: Optional[CloseInfo] = None
        self.closed_event = asyncio.Event()
        self.attached = False  # ATTACH_OK / LANE_OK received
        # control-plane waiters
        self.first_answer: asyncio.Future = asyncio.get_running_loop().create_future()
        self.update_waiters: deque[asyncio.Future] = deque()
        self.discover_waiters: dict[int, asyncio.Future] = {}
        self.detached = asyncio.Event()
        self.drain: Optional[Drain] = None
        self.on_drain: Optional[Callable[[Drain], None]] = None
        self.late_refusals: asyncio.Queue = asyncio.Queue()  # ATTACH_REFUSED after attach
        self._keepalive: Optional[asyncio.Task] = None
        self._closing_by_us = False
        self.refused = False  # an ATTACH_REFUSED answered our ATTACH/LANE

    # -- aioquic events ----------------------------------------------------------------------
    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            if event.stream_id == 0:
                self._on_control_data(event.data, event.end_stream)
                return
            stream = self.streams.get(event.stream_id)
            if stream is None:
                if event.stream_id % 4 != 1:
                    return  # data for a stream of ours we already forgot
                stream = self.streams[event.stream_id] = Stream(self, event.stream_id)
                self.on_incoming(self, stream)
            stream._on_data(event.data, event.end_stream)
        elif isinstance(event, events.StreamReset):
            if event.stream_id == 0:
                self.close_with(ConnCode.PROTOCOL_VIOLATION, "gateway reset the control stream")
            elif (s := self.streams.get(event.stream_id)) is not None:
                s._on_reset(event.error_code)
        elif isinstance(event, events.StopSendingReceived):
            # aioquic has already reset our sending half with the same code (RFC 9000 3.5).
            if event.stream_id == 0:
                self.close_with(ConnCode.PROTOCOL_VIOLATION, "gateway stopped the control stream")
            elif (s := self.streams.get(event.stream_id)) is not None:
                s._on_stop_sending(event.error_code)
        elif isinstance(event, events.ConnectionTerminated):
            self.close_info = CloseInfo(
                event.error_code, event.frame_type is not None, event.reason_phrase, self._closing_by_us
            )
            log.info("%s: connection closed: %s", self.label, self.close_info.describe())
            self._fail_all()

    def _fail_all(self) -> None:
        exc = ConnectionLost(self.close_info)
        for s in list(self.streams.values()):
            s._on_close(self.close_info)
        if not self.first_answer.done():
            self.first_answer.set_exception(exc)
            self.first_answer.exception()  # mark retrieved
        for fut in list(self.update_waiters) + list(self.discover_waiters.values()):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()
        self.update_waiters.clear()
        self.discover_waiters.clear()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.closed_event.set()

    # -- the control stream ------------------------------------------------------------------
    def _on_control_data(self, data: bytes, end: bool) -> None:
        self.parser.feed(data)
        try:
            while (frame := self.parser.next_frame()) is not None:
                ftype, payload = frame
                decoded = decode_gateway_frame(ftype, payload)
                if decoded is None:
                    log.debug("%s: skipping unknown frame type 0x%x (%d bytes)", self.label, ftype, len(payload))
                    continue
                self._on_frame(decoded)
        except FrameTooLarge as exc:
            self.close_with(ConnCode.FRAME_TOO_LARGE, str(exc))
            return
        except Malformed as exc:
            self.close_with(ConnCode.PROTOCOL_VIOLATION, f"malformed control frame: {exc}")
            return
        if end:
            if self.refused:
                # Section 4.5: after ATTACH_REFUSED the gateway finishes its half of the control
                # stream, then closes with ATTACH_REFUSED; wait for that close.
                log.debug("%s: gateway finished the control stream after a refusal", self.label)
                return
            # The gateway never finishes its half (section 4.1): protocol violation.
            self.close_with(ConnCode.PROTOCOL_VIOLATION, "gateway finished the control stream")

    def _on_frame(self, frame) -> None:
        log.debug("%s: control frame %r", self.label, frame)
        if isinstance(frame, FrameType):  # agent-only type
            self.close_with(ConnCode.PROTOCOL_VIOLATION, f"gateway sent {frame.name}")
        elif isinstance(frame, (AttachOk, LaneOk)):
            if self.first_answer.done():
                self.close_with(ConnCode.PROTOCOL_VIOLATION, f"unexpected {type(frame).__name__}")
                return
            self.attached = True
            self.first_answer.set_result(frame)
            if self._keepalive is None:
                self._keepalive = asyncio.ensure_future(self._keepalive_loop())
        elif isinstance(frame, AttachRefused):
            if not self.first_answer.done():
                self.refused = frame.refusal != Refusal.ALREADY_ATTACHED
                self.first_answer.set_result(frame)
            else:
                self.late_refusals.put_nowait(frame)  # e.g. ALREADY_ATTACHED; connection stays
        elif isinstance(frame, UpdateResult):
            if self.update_waiters:
                self.update_waiters.popleft().set_result(frame)
            else:
                self.close_with(ConnCode.PROTOCOL_VIOLATION, "unsolicited UPDATE_RESULT")
        elif isinstance(frame, DiscoverResult):
            fut = self.discover_waiters.pop(frame.query_id, None)
            if fut is not None and not fut.done():
                fut.set_result(frame)
            else:
                log.warning("%s: DISCOVER_RESULT for unknown query %d", self.label, frame.query_id)
        elif isinstance(frame, Detached):
            self.detached.set()
        elif isinstance(frame, Drain):
            self.drain = frame
            if self.on_drain is not None:
                self.on_drain(frame)

    def send_control(self, data: bytes) -> None:
        self.quic.send_stream_data(0, data, end_stream=False)
        self.transmit()

    async def _keepalive_loop(self) -> None:
        # Section 2.5: an ack-eliciting packet every 5 s of idleness. A PING every 5 s is
        # simpler and satisfies "more often than half the effective idle timeout".
        n = 0
        try:
            while self.close_info is None:
                await asyncio.sleep(KEEPALIVE_SECONDS)
                n += 1
                self.quic.send_ping(n)
                self.transmit()
        except asyncio.CancelledError:
            pass

    def transmit(self) -> None:
        super().transmit()
        # aioquic raises its stream limit when it discards a finished stream, which happens
        # while it builds a packet but *after* the point where it writes MAX_STREAMS. The
        # gateway never queues for stream credit (section 2.5), it answers callers OVERLOADED,
        # so (defensively) build one more packet at once when new credit is waiting.
        limit = self.quic._local_max_streams_bidi
        if limit.value != limit.sent and limit.sent - limit.used < limit.value - limit.sent:
            super().transmit()

    # -- streams, closing --------------------------------------------------------------------
    def open_stream(self) -> Stream:
        if self.close_info is not None:
            raise ConnectionLost(self.close_info)
        stream_id = self.quic.get_next_available_stream_id()
        stream = self.streams[stream_id] = Stream(self, stream_id)
        return stream

    def close_with(self, code: int, reason: str = "") -> None:
        """Closes with an application error code (CONNECTION_CLOSE 0x1d)."""
        if self.close_info is None and not self._closing_by_us:
            log.debug("%s: closing with %s %s", self.label, _enum_name(ConnCode, code), reason)
            self._closing_by_us = True
            self.close(error_code=int(code), reason_phrase=reason)

    async def close_and_wait(self, code: int = ConnCode.NO_ERROR, reason: str = "", timeout: float = 2.0) -> None:
        self.close_with(code, reason)
        try:
            await asyncio.wait_for(self.closed_event.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if self._transport is not None:
            self._transport.close()


# ---------------------------------------------------------------------------------------------
# Connecting
# ---------------------------------------------------------------------------------------------


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (section 6.2)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bad address {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


@dataclasses.dataclass
class Credentials:
    cert: str
    key: str
    ca: str

    def identity(self) -> SpiffeId:
        return load_own_identity(self.cert)


async def connect(
    address: tuple[str, int],
    creds: Credentials,
    *,
    label: str,
    max_streams: int,
    on_incoming: Callable[[DmscConnection, Stream], None],
    timeout: float = 10.0,
) -> DmscConnection:
    """Opens a QUIC connection to the gateway and verifies it (section 2). Returns once the
    handshake has completed and the gateway's SPIFFE ID has been checked; nothing has been
    sent on any stream yet."""
    domain = creds.identity().domain
    config = QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        idle_timeout=IDLE_TIMEOUT_SECONDS,
        max_stream_data=STREAM_WINDOW,
        max_data=8 * STREAM_WINDOW,
        verify_mode=ssl.CERT_REQUIRED,
        # No server_name: aioquic then sends no SNI and does no host-name check; the gateway is
        # authenticated by chain (aioquic, against --ca) and SPIFFE ID (below), section 2.4.
        server_name=None,
    )
    config.load_cert_chain(creds.cert, creds.key)
    config.load_verify_locations(cafile=creds.ca)
    quic = QuicConnection(configuration=config)
    # aioquic offers no setting for these transport parameters; they are read when the
    # handshake starts, so adjust them before connect(). Section 2.5: initial_max_streams_bidi =
    # our concurrency as a target, initial_max_streams_uni = 0.
    quic._local_max_streams_bidi.value = quic._local_max_streams_bidi.sent = max_streams
    quic._local_max_streams_uni.value = quic._local_max_streams_uni.sent = 0

    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(address[0], address[1], type=socket.SOCK_DGRAM)
    family, _, _, _, addr = infos[0]
    local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: DmscConnection(quic, label=label, on_incoming=on_incoming), local_addr=local, family=family
    )
    conn: DmscConnection = protocol  # type: ignore[assignment]
    conn.connect(addr)
    try:
        await asyncio.wait_for(conn.wait_connected(), timeout)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        transport.close()
        raise ConnectionLost(conn.close_info) from exc
    # Section 2.4: the checks TLS chain validation does not cover. aioquic keeps the verified
    # peer certificate in a private attribute of its TLS context.
    peer = quic.tls._peer_certificate
    try:
        if peer is None:
            raise IdentityError("no gateway certificate")
        gateway_id = check_gateway_certificate(peer, domain)
    except IdentityError as exc:
        # The handshake is already complete in aioquic; close before sending any DMSC frame,
        # with the transport error a TLS bad_certificate alert would have produced (0x12a).
        quic.close(error_code=0x100 + 42, frame_type=0, reason_phrase=str(exc))
        conn.transmit()
        transport.close()
        raise DmscError(f"gateway certificate rejected: {exc}") from exc
    log.debug("%s: connected to %s (%s:%d)", label, gateway_id, *address)
    return conn


# ---------------------------------------------------------------------------------------------
# The agent
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """An invocation as the target sees it."""

    header: RequestHeader
    payload: bytes
    connection: str

    @property
    def capability(self) -> str:
        return self.header.capability

    @property
    def caller(self) -> str:
        return self.header.caller


@dataclasses.dataclass
class Response:
    status: int = Status.OK
    payload: bytes = b""
    content_type: str = ""
    message: str = ""


@dataclasses.dataclass
class Reply:
    """An invocation's outcome as the caller sees it."""

    status: int
    payload: bytes = b""
    content_type: str = ""
    message: str = ""
    reset_code: Optional[int] = None  # when the outcome comes from a RESET_STREAM

    @property
    def ok(self) -> bool:
        return self.status == Status.OK

    @property
    def status_name(self) -> str:
        return status_name(self.status)


Handler = Callable[[Request], Awaitable[Response]]


async def handle_echo(req: Request) -> Response:
    return Response(Status.OK, req.payload, req.header.content_type)


async def handle_upper(req: Request) -> Response:
    try:
        text = req.payload.decode("utf-8")
    except UnicodeDecodeError:
        return Response(Status.BAD_REQUEST, message="payload is not UTF-8")
    return Response(Status.OK, text.upper().encode("utf-8"), "text/plain")


async def handle_caller(req: Request) -> Response:
    """Answers the caller identity the gateway stamped (section 7.6)."""
    return Response(Status.OK, req.header.caller.encode("utf-8"), "text/plain")


async def handle_fail(req: Request) -> Response:
    raise RuntimeError("this handler always fails")


async def handle_sleep(req: Request) -> Response:
    """Sleeps for the number of milliseconds in the payload, then answers ``slept``."""
    try:
        ms = int(req.payload.decode() or "0")
    except ValueError:
        return Response(Status.BAD_REQUEST, message="payload is not a number of milliseconds")
    await asyncio.sleep(ms / 1000)
    return Response(Status.OK, b"slept", "text/plain")


BUILTIN_HANDLERS: dict[str, Handler] = {
    "echo": handle_echo,
    "upper": handle_upper,
    "caller": handle_caller,
    "fail": handle_fail,
    "sleep": handle_sleep,
}


def handler_for(capability: str) -> Handler:
    """``py_echo``/``echo`` echo, ``py_upper`` uppercases, ``py_caller`` answers the stamped
    caller, ``py_fail`` fails, ``py_sleep`` sleeps; any other name echoes. ``NAME=KIND`` picks
    explicitly."""
    name = capability.rsplit("_", 1)[-1]
    return BUILTIN_HANDLERS.get(name, handle_echo)


class Agent:
    """A DMSC agent: one primary connection, lanes, serving and invoking.

    ``handlers`` maps capability names to async handlers; the card offers exactly those names.
    """

    def __init__(
        self,
        gateway: tuple[str, int],
        creds: Credentials,
        handlers: dict[str, Handler],
        *,
        name: str = "python-agent",
        max_concurrent: int = 64,
        stream_credit: Optional[int] = None,
        max_request_bytes: int = 16 << 20,
        open_lanes: bool = True,
    ):
        if not handlers:
            raise ValueError("an agent must offer at least one capability (section 5.1)")
        self.gateway = gateway
        self.creds = creds
        self.identity = creds.identity()
        self.handlers = dict(handlers)
        self.name = name
        self.max_concurrent = max_concurrent
        # initial_max_streams_bidi: section 2.5 recommends at least twice max_concurrent, since
        # stream credit only comes back once the gateway has acknowledged the response's FIN
        # and our MAX_STREAMS has reached it.
        self.stream_credit = stream_credit or 2 * max_concurrent
        self.max_request_bytes = max_request_bytes
        self.open_lanes = open_lanes
        self.primary: Optional[DmscConnection] = None
        self.attach_ok: Optional[AttachOk] = None
        self.lanes: dict[int, DmscConnection] = {}
        self.draining = False
        self.detaching = False
        self._rr = 0
        self._query_id = 0
        self._tasks: set[asyncio.Task] = set()
        self.served = 0

    # -- attach ------------------------------------------------------------------------------
    def card(self) -> bytes:
        return make_card(self.name, list(self.handlers))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _first_answer(self, conn: DmscConnection, timeout: float):
        """Waits for ATTACH_OK/LANE_OK or a refusal. Section 4.5: a close with ATTACH_REFUSED
        is a refusal whether or not the frame arrived."""
        try:
            answer = await asyncio.wait_for(asyncio.shield(conn.first_answer), timeout)
        except ConnectionLost as exc:
            if exc.close is not None and exc.close.is_app(ConnCode.ATTACH_REFUSED):
                raise AttachRefusedError(None, "", exc.close) from None
            raise
        if isinstance(answer, AttachRefused):
            # The gateway closes right after the frame (unless ALREADY_ATTACHED).
            try:
                await asyncio.wait_for(conn.closed_event.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            await conn.close_and_wait(ConnCode.NO_ERROR)
            raise AttachRefusedError(answer.refusal, answer.reason, conn.close_info)
        return answer

    async def attach(self, timeout: float = 10.0) -> AttachOk:
        """Connects, sends ATTACH at once, waits for ATTACH_OK, then opens lanes in the
        background."""
        conn = await connect(
            self.gateway, self.creds, label="primary", max_streams=self.stream_credit, on_incoming=self._incoming
        )
        conn.on_drain = self._on_drain
        # Section 4: the control stream is the first bidirectional stream, ATTACH at once.
        assert conn.quic.get_next_available_stream_id() == 0
        conn.send_control(encode_attach(self.max_concurrent, self.card()))
        try:
            ok = await self._first_answer(conn, timeout)
        except BaseException:
            await conn.close_and_wait(ConnCode.NO_ERROR)
            raise
        self.primary = conn
        self.attach_ok = ok
        self.draining = False
        self.detaching = False
        log.info("attached: %r", ok)
        self._spawn(self._watch_primary(conn))
        if self.open_lanes:
            for i, addr in enumerate(ok.lanes):
                if i != ok.worker:  # never a lane to the home worker (section 6.3)
                    self._spawn(self._open_lane(i, addr, ok))
        return ok

    async def _open_lane(self, index: int, address: str, ok: AttachOk, attempts: int = 6) -> None:
        """Section 6.3: connect, LANE(session, token), expect LANE_OK(index); retry a refusal
        with a new connection after 10 ms, doubling, a few times."""
        backoff = 0.01
        for attempt in range(attempts):
            if self.attach_ok is not ok or self.primary is None or self.primary.close_info is not None:
                return
            conn = None
            try:
                conn = await connect(
                    parse_address(address),
                    self.creds,
                    label=f"lane{index}",
                    max_streams=self.stream_credit,
                    on_incoming=self._incoming,
                )
                conn.send_control(encode_lane(ok.session, ok.lane_token))
                answer = await self._first_answer(conn, 10.0)
                if answer.worker != index:
                    log.warning("lane %d: LANE_OK names worker %d", index, answer.worker)
                if self.attach_ok is not ok:
                    await conn.close_and_wait(ConnCode.NO_ERROR)
                    return
                self.lanes[index] = conn
                log.info("lane %d bound at %s (worker %d)", index, address, answer.worker)
                self._spawn(self._watch_lane(index, conn))
                return
            except (AttachRefusedError, ConnectionLost, DmscError, OSError) as exc:
                log.info("lane %d attempt %d failed: %s", index, attempt + 1, exc)
                if conn is not None and conn.close_info is None:
                    await conn.close_and_wait(ConnCode.NO_ERROR)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)
        log.warning("lane %d: giving up; the session works without it", index)

    async def _watch_lane(self, index: int, conn: DmscConnection) -> None:
        await conn.closed_event.wait()
        if self.lanes.get(index) is conn:
            del self.lanes[index]

    async def _watch_primary(self, conn: DmscConnection) -> None:
        """The session ends with its primary connection (section 6.4): close the lanes."""
        await conn.closed_event.wait()
        if self.primary is conn:
            lanes = list(self.lanes.values())
            self.lanes.clear()
            for lane in lanes:
                await lane.close_and_wait(ConnCode.NO_ERROR, "primary connection closed")

    def _on_drain(self, drain: Drain) -> None:
        log.info("gateway draining: grace %d ms", drain.grace_ms)
        self.draining = True

    @property
    def attached(self) -> bool:
        return self.primary is not None and self.primary.close_info is None

    def connections(self) -> list[DmscConnection]:
        conns = [self.primary] if self.attached else []
        conns += [c for c in self.lanes.values() if c.close_info is None]
        return conns

    # -- serving (section 7.7) ---------------------------------------------------------------
    def _incoming(self, conn: DmscConnection, stream: Stream) -> None:
        self._spawn(self._serve(conn, stream))

    async def _serve(self, conn: DmscConnection, stream: Stream) -> None:
        try:
            try:
                header = RequestHeader.decode_block(await stream.read_header())
            except Malformed as exc:
                log.warning("%s stream %d: malformed request header: %s", conn.label, stream.id, exc)
                stream.reset(StreamCode.PROTOCOL_VIOLATION)
                stream.stop_sending(StreamCode.PROTOCOL_VIOLATION)
                return
            handler = self.handlers.get(header.capability)
            if handler is None:
                # e.g. a card update raced with the request (rule 3)
                stream.stop_sending(StreamCode.CANCELLED)
                stream.send(ResponseHeader(Status.NO_ROUTE, "", "capability not offered here").encode(), end=True)
                return
            try:
                payload = await stream.read_to_end(self.max_request_bytes)
            except OverflowError:
                stream.stop_sending(StreamCode.CANCELLED)
                stream.send(ResponseHeader(Status.BAD_REQUEST, "", "request payload too large").encode(), end=True)
                return
            req = Request(header, payload, conn.label)
            deadline = header.deadline_ms / 1000 if header.deadline_ms else None
            work = asyncio.ensure_future(asyncio.wait_for(handler(req), deadline))
            aborted = asyncio.ensure_future(stream.aborted.wait())
            await asyncio.wait({work, aborted}, return_when=asyncio.FIRST_COMPLETED)
            aborted.cancel()
            if not work.done():
                # RESET_STREAM/STOP_SENDING from the gateway (CANCELLED, DEADLINE_EXCEEDED):
                # abandon the work (rule 7); aioquic already reset our half after STOP_SENDING.
                work.cancel()
                log.debug("%s stream %d: abandoned (reset %s, stop %s)", conn.label, stream.id,
                          stream.reset_code, stream.stop_sending_code)
                stream.reset(StreamCode.CANCELLED)
                return
            try:
                resp = work.result()
            except asyncio.TimeoutError:
                stream.reset(StreamCode.TARGET_FAILED)  # gave up after deadline_ms (rule 6)
                return
            except Exception as exc:  # handler failure: APPLICATION_ERROR (rule 4)
                resp = Response(Status.APPLICATION_ERROR, b"", "text/plain", f"handler failed: {exc}"[:MAX_MESSAGE])
            self.served += 1
            stream.send(ResponseHeader(resp.status, resp.content_type, resp.message).encode() + resp.payload, end=True)
        except (StreamReset, ConnectionLost):
            stream.reset(StreamCode.CANCELLED)  # abandon the work (rule 7)
        finally:
            stream.forget()

    # -- invoking (section 7.4) --------------------------------------------------------------
    def _pick(self) -> DmscConnection:
        conns = self.connections()
        if not conns:
            raise ConnectionLost(self.primary.close_info if self.primary else None)
        self._rr += 1
        return conns[self._rr % len(conns)]

    async def invoke(
        self,
        capability: str,
        payload: bytes = b"",
        *,
        content_type: str = "",
        deadline_ms: int = 0,
        hop_count: int = 0,
        trace_id: bytes = ZERO_TRACE_ID,
        span_id: bytes = ZERO_SPAN_ID,
        trace_flags: int = 0,
        connection: Optional[DmscConnection] = None,
        raw_header: Optional[bytes] = None,
        max_response_bytes: int = 64 << 20,
    ) -> Reply:
        """Invokes ``capability`` and returns the whole reply. Failures without a status (reset
        before the header, connection lost, local timeout) are mapped to a status as section
        7.4 rule 4 says, with ``reset_code`` set for resets."""
        conn = connection or self._pick()
        header = raw_header if raw_header is not None else RequestHeader(
            capability, deadline_ms, hop_count, trace_id, span_id, trace_flags, content_type, ""
        ).encode()
        stream = conn.open_stream()
        # Header, payload and FIN together; FIN even when the payload is empty (rule 2).
        stream.send(header + payload, end=True)
        # Callers apply their own deadline too (section 7.8): the gateway's, plus slack.
        local_timeout = (deadline_ms or 30000) / 1000 + 5.0
        try:
            async with asyncio.timeout(local_timeout):
                try:
                    block = await stream.read_header()
                except Malformed as exc:
                    return Reply(Status.TARGET_FAILED, message=f"malformed or missing response header: {exc}")
                try:
                    rh = ResponseHeader.decode_block(block)
                except Malformed as exc:
                    return Reply(Status.TARGET_FAILED, message=f"malformed response header: {exc}")
                try:
                    body = await stream.read_to_end(max_response_bytes)
                except OverflowError:
                    stream.stop_sending(StreamCode.CANCELLED)
                    return Reply(Status.TARGET_FAILED, message="response too large")
                except StreamReset as exc:
                    # after the header: the target failed mid-response (section 7.9)
                    return Reply(_status_for_reset(exc.code), message=str(exc), reset_code=exc.code)
                return Reply(rh.status, body, rh.content_type, rh.message)
        except StreamReset as exc:
            return Reply(_status_for_reset(exc.code), message=str(exc), reset_code=exc.code)
        except TimeoutError:
            stream.stop_sending(StreamCode.CANCELLED)  # cancel (rule 6)
            stream.reset(StreamCode.CANCELLED)
            return Reply(Status.DEADLINE_EXCEEDED, message="local deadline passed")
        except ConnectionLost as exc:
            return Reply(Status.UNAVAILABLE, message=str(exc))
        finally:
            stream.forget()

    # -- discovery, card update, detach ------------------------------------------------------
    async def discover(self, prefix: str = "", tag: str = "", connection: Optional[DmscConnection] = None,
                       timeout: float = 10.0) -> DiscoverResult:
        conn = connection or self._pick()
        self._query_id += 1
        qid = self._query_id
        fut = asyncio.get_running_loop().create_future()
        conn.discover_waiters[qid] = fut
        conn.send_control(encode_discover(qid, prefix, tag))
        return await asyncio.wait_for(fut, timeout)

    async def update_card(self, card: bytes, timeout: float = 10.0) -> UpdateResult:
        """UPDATE_CARD on the primary connection; results are matched in order (section 9)."""
        if self.detaching:
            raise DmscError("UPDATE_CARD after DETACH is not allowed (section 9)")
        conn = self.primary
        if conn is None:
            raise DmscError("not attached")
        fut = asyncio.get_running_loop().create_future()
        conn.update_waiters.append(fut)
        conn.send_control(encode_update_card(card))
        return await asyncio.wait_for(fut, timeout)

    async def detach(self, timeout: float = 10.0) -> bool:
        """Section 10: DETACH, keep serving until DETACHED, then close everything with
        NO_ERROR. Returns whether DETACHED arrived."""
        got = False
        conn = self.primary
        if conn is not None and conn.close_info is None:
            self.detaching = True
            conn.send_control(encode_detach())
            try:
                await asyncio.wait_for(conn.detached.wait(), timeout)
                got = True
            except asyncio.TimeoutError:
                log.warning("no DETACHED within %.1f s", timeout)
        await self.close()
        return got

    async def close(self) -> None:
        """Closes the primary connection and the lanes with NO_ERROR."""
        conns = ([self.primary] if self.primary else []) + list(self.lanes.values())
        self.lanes.clear()
        for c in conns:
            await c.close_and_wait(ConnCode.NO_ERROR, "leaving")
        for task in list(self._tasks):
            task.cancel()


def _status_for_reset(code: int) -> int:
    """Section 7.4: the status a caller reports for a reset of its own invocation stream."""
    if code == StreamCode.DEADLINE_EXCEEDED:
        return Status.DEADLINE_EXCEEDED
    if code == StreamCode.PROTOCOL_VIOLATION:
        return Status.BAD_REQUEST  # stream opened before the connection was attached
    if code == StreamCode.CANCELLED:
        return Status.UNAVAILABLE
    return Status.TARGET_FAILED


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _handlers_from_args(specs: list[str]) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {}
    for spec in specs:
        name, sep, kind = spec.partition("=")
        if sep:
            if kind not in BUILTIN_HANDLERS:
                raise SystemExit(f"unknown handler kind {kind!r}; one of {', '.join(BUILTIN_HANDLERS)}")
            handlers[name] = BUILTIN_HANDLERS[kind]
        else:
            handlers[name] = handler_for(name)
    return handlers


def _make_agent(args, capabilities: list[str]) -> Agent:
    return Agent(
        parse_address(args.gateway),
        Credentials(args.cert, args.key, args.ca),
        _handlers_from_args(capabilities),
        name=args.name,
        max_concurrent=args.max_concurrent,
        stream_credit=args.stream_credit,
        open_lanes=not args.no_lanes,
    )


async def _wait_lanes(agent: Agent, seconds: float) -> None:
    ok = agent.attach_ok
    if ok is None or agent.draining:
        return
    wanted = len(ok.lanes) - 1 if ok.lanes and agent.open_lanes else 0
    end = asyncio.get_running_loop().time() + seconds
    while len(agent.lanes) < wanted and asyncio.get_running_loop().time() < end:
        await asyncio.sleep(0.02)


async def cmd_serve(args) -> int:
    """Attach and serve until SIGINT/SIGTERM; then detach. Re-attaches with exponential backoff
    and jitter after the session is lost (drain, gateway restart), section 11."""
    agent = _make_agent(args, args.capability or ["py_echo", "py_upper"])
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    backoff = 0.1
    while not stop.is_set():
        try:
            ok = await agent.attach()
        except AttachRefusedError as exc:
            if exc.refusal == Refusal.BAD_CARD:
                print(f"attach refused: {exc}", file=sys.stderr)
                return 3
            log.warning("%s", exc)
        except (ConnectionLost, DmscError, OSError) as exc:
            if isinstance(exc, ConnectionLost) and exc.close and exc.close.transport and 0x100 <= exc.close.error_code <= 0x1FF:
                print(f"handshake failed: {exc}", file=sys.stderr)
                return 3
            if isinstance(exc, DmscError) and not isinstance(exc, ConnectionLost):
                print(f"{exc}", file=sys.stderr)
                return 3
            log.warning("connect failed: %s", exc)
        else:
            backoff = 0.1
            await _wait_lanes(agent, 2.0)
            print(
                f"attached session=0x{ok.session:016x} worker={ok.worker} lanes={len(agent.lanes)}"
                f" identity={agent.identity} capabilities={','.join(agent.handlers)}",
                flush=True,
            )
            closed = asyncio.ensure_future(agent.primary.closed_event.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            closed.cancel()
            stopping.cancel()
            if stop.is_set():
                break
            print(f"session lost: {agent.primary.close_info.describe()}; re-attaching", flush=True)
            await agent.close()
        await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
        backoff = min(backoff * 2, 30.0)
    detached = await agent.detach()
    print(f"detached={'yes' if detached else 'no'} served={agent.served}", flush=True)
    return 0


async def _attach_for_cli(args, capabilities: list[str]) -> Agent:
    agent = _make_agent(args, capabilities)
    await agent.attach()
    await _wait_lanes(agent, 1.0)
    return agent


async def cmd_invoke(args) -> int:
    # A card needs at least one skill (section 5.1), so even a pure caller offers something.
    agent = await _attach_for_cli(args, args.offer or ["py_echo"])
    try:
        payload = args.payload.encode("utf-8") if args.payload is not None else sys.stdin.buffer.read()
        reply = None
        for attempt in range(max(1, args.retries + 1)):
            reply = await agent.invoke(
                args.capability, payload, content_type=args.content_type, deadline_ms=args.deadline_ms
            )
            if reply.status != Status.NO_ROUTE:
                break
            await asyncio.sleep(0.1)
        print(reply.status_name, flush=True)
        sys.stdout.buffer.write(reply.payload)
        if reply.payload and not reply.payload.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
        if reply.message:
            print(f"message: {reply.message}", file=sys.stderr)
        return 0 if reply.ok else 1
    finally:
        await agent.detach(timeout=5.0)


async def cmd_discover(args) -> int:
    agent = await _attach_for_cli(args, args.offer or ["py_echo"])
    try:
        result = await agent.discover(args.prefix, args.tag)
        for e in result.entries:
            print(f"{e.capability}\tproviders={e.providers}\ttags={','.join(e.tags)}\t{e.description}")
        if result.truncated:
            print("(truncated)")
        return 0
    finally:
        await agent.detach(timeout=5.0)


async def cmd_selftest(args) -> int:
    """Attach offering py_echo, py_upper, py_caller and py_fail, then check the behaviour the
    spec describes, invoking ourselves through the gateway."""
    failures: list[str] = []

    def check(name: str, cond: bool, detail: str = "") -> bool:
        print(f"{'PASS' if cond else 'FAIL'} {name}{': ' + detail if detail else ''}", flush=True)
        if not cond:
            failures.append(name)
        return cond

    caps = ["py_echo", "py_upper", "py_caller", "py_fail"]
    agent = _make_agent(args, caps)
    try:
        ok = await agent.attach()
    except Exception as exc:  # noqa: BLE001
        check("attach", False, str(exc))
        return 1
    check("attach", True, repr(ok))
    check(
        "ATTACH_OK max_concurrent is ours, capped at the gateway limit",
        1 <= ok.max_concurrent <= agent.max_concurrent,
        str(ok.max_concurrent),
    )
    check("ATTACH_OK worker indexes its lane list", not ok.lanes or ok.worker < len(ok.lanes), f"worker={ok.worker} lanes={len(ok.lanes)}")
    await _wait_lanes(agent, 3.0)
    expected_lanes = max(0, len(ok.lanes) - 1) if not args.no_lanes else 0
    check("lanes bound to every other worker", len(agent.lanes) == expected_lanes, f"{len(agent.lanes)} of {expected_lanes}")

    async def invoke_retrying(cap: str, payload: bytes = b"", **kw) -> Reply:
        # Workers learn of sessions and card updates asynchronously (sections 6.3, 9).
        for _ in range(50):
            reply = await agent.invoke(cap, payload, **kw)
            if reply.status != Status.NO_ROUTE:
                return reply
            await asyncio.sleep(0.02)
        return reply

    # 1. py_echo through the gateway to ourselves, on every connection.
    for conn in agent.connections():
        r = await invoke_retrying("py_echo", b"hello from python", content_type="text/plain", connection=conn)
        check(f"py_echo via {conn.label} is OK with the payload", r.ok and r.payload == b"hello from python",
              f"{r.status_name} {r.payload!r} {r.message}")
        check(f"py_echo via {conn.label}: content type relayed", r.content_type == "text/plain", repr(r.content_type))
    r = await invoke_retrying("py_upper", b"make me loud")
    check("py_upper uppercases", r.ok and r.payload == b"MAKE ME LOUD", f"{r.status_name} {r.payload!r}")
    r = await invoke_retrying("py_echo", b"")
    check("empty payload", r.ok and r.payload == b"", f"{r.status_name} {r.payload!r}")
    big = os.urandom(3 << 20)
    r = await invoke_retrying("py_echo", big, deadline_ms=60000)
    check("3 MiB payload round trip", r.ok and r.payload == big, f"{r.status_name} {len(r.payload)} bytes")
    r = await invoke_retrying("py_caller")
    check("gateway stamps the caller's verified identity", r.ok and r.payload.decode() == str(agent.identity),
          f"{r.status_name} {r.payload!r}")
    r = await invoke_retrying("py_caller", trace_id=bytes(range(1, 17)), span_id=bytes(range(8)), trace_flags=1)
    check("traced request is served", r.ok, r.status_name)
    r = await invoke_retrying("py_fail")
    check("handler failure is APPLICATION_ERROR", r.status == Status.APPLICATION_ERROR, f"{r.status_name} {r.message!r}")
    # 2. concurrency
    replies = await asyncio.gather(*(agent.invoke("py_echo", str(i).encode()) for i in range(50)))
    check("50 concurrent invocations", all(x.ok and x.payload == str(i).encode() for i, x in enumerate(replies)),
          ",".join(sorted({x.status_name for x in replies})))

    # 3. gateway-generated statuses
    r = await agent.invoke("py_no_such_capability", b"x")
    check("unknown capability is NO_ROUTE", r.status == Status.NO_ROUTE, f"{r.status_name} {r.message!r}")
    check("gateway answer has empty content type and no payload", r.content_type == "" and r.payload == b"",
          f"{r.content_type!r} {r.payload!r}")
    r = await agent.invoke("py_echo", b"x", hop_count=255)
    check("hop_count 255 is LOOP_DETECTED", r.status == Status.LOOP_DETECTED, f"{r.status_name} {r.message!r}")
    bad = bytes([0x00])  # block_length 0: the block ends inside `capability`
    r = await agent.invoke("", b"x", raw_header=bad)
    check("malformed header (empty block) is BAD_REQUEST", r.status == Status.BAD_REQUEST, f"{r.status_name} {r.message!r}")
    # A well-formed block whose capability is empty: replace "01 78" (capability "x") by "00".
    raw = encode_str("", 255) + RequestHeader("x").encode_block()[2:]
    r = await agent.invoke("", b"x", raw_header=encode_varint(len(raw)) + raw)
    check("empty capability is BAD_REQUEST", r.status == Status.BAD_REQUEST, f"{r.status_name} {r.message!r}")
    # Every field at its ceiling still makes a block under 4096 bytes; extension bytes can
    # make it longer (and are otherwise ignored).
    padded = RequestHeader("py_echo").encode_block() + bytes(5000)
    big_block = encode_varint(len(padded)) + padded
    r = await agent.invoke("", b"x", raw_header=big_block)
    check("header block over max_header_bytes (4096 default) is BAD_REQUEST", r.status == Status.BAD_REQUEST,
          f"{len(big_block)} bytes: {r.status_name}")
    # Extensions come after the last field of this revision, `via`: the optional fields before
    # them are written at their defaults (target_session 0, on_behalf_of and via empty).
    ext = (RequestHeader("py_echo", content_type="text/plain").encode_block()
           + encode_varint(0) + encode_str("", MAX_CALLER) + encode_str("", MAX_CALLER)
           + b"\xaa\xbb\xcc")
    r = await agent.invoke("", b"ext", raw_header=encode_varint(len(ext)) + ext)
    check("header extension bytes are ignored", r.ok and r.payload == b"ext", r.status_name)

    # 4. discovery (section 8)
    d = await agent.discover("py_")
    names = [e.capability for e in d.entries]
    check("DISCOVER lists our capabilities, sorted", names == sorted(names) and set(caps) <= set(names), str(names))
    mine = {e.capability: e for e in d.entries}
    e = mine.get("py_echo")
    check("DISCOVER entry fields", e is not None and e.providers >= 1 and "python" in e.tags and e.input_modes == ["text/plain"],
          repr(e))
    d = await agent.discover("py_", "no-such-tag")
    check("DISCOVER tag filter", d.entries == [], str(d.entries))
    for conn in list(agent.lanes.values())[:1]:
        d = await agent.discover("py_echo", connection=conn)
        check("DISCOVER on a lane", [x.capability for x in d.entries] == ["py_echo"], str(d.entries))

    # 5. ATTACH again on the primary: ALREADY_ATTACHED, the connection stays (section 4.5)
    agent.primary.send_control(encode_attach(1, agent.card()))
    try:
        late = await asyncio.wait_for(agent.primary.late_refusals.get(), 5.0)
        check("second ATTACH is refused ALREADY_ATTACHED", late.refusal == Refusal.ALREADY_ATTACHED, repr(late))
    except asyncio.TimeoutError:
        check("second ATTACH is refused ALREADY_ATTACHED", False, "no answer")
    r = await invoke_retrying("py_echo", b"still here", connection=agent.primary)
    check("primary still works after ALREADY_ATTACHED", r.ok, r.status_name)

    # 6. UPDATE_CARD (section 9)
    agent.handlers["py_extra"] = handle_echo
    res = await agent.update_card(agent.card())
    check("UPDATE_CARD accepted", res.refusal == 0 and res.reason == "", repr(res))
    r = await invoke_retrying("py_extra", b"new skill")
    check("new capability invocable after UPDATE_CARD", r.ok and r.payload == b"new skill", r.status_name)
    res = await agent.update_card(json.dumps({"name": "x", "skills": []}).encode())
    check("UPDATE_CARD without skills refused BAD_CARD", res.refusal == Refusal.BAD_CARD, repr(res))
    res = await agent.update_card(json.dumps({"name": "x", "skills": [{"id": "a b", "name": "n"}]}).encode())
    check("UPDATE_CARD with whitespace in a skill id refused BAD_CARD", res.refusal == Refusal.BAD_CARD, repr(res))
    r = await invoke_retrying("py_extra", b"still")
    check("previous card stays in force after a refusal", r.ok, r.status_name)

    # 7. DETACH (section 10)
    conn = agent.primary
    agent.detaching = True
    conn.send_control(encode_detach())
    try:
        await asyncio.wait_for(conn.detached.wait(), 10.0)
        check("DETACH answered DETACHED", True)
    except asyncio.TimeoutError:
        check("DETACH answered DETACHED", False, "timeout")
    r = await agent.invoke("py_echo", b"gone?", connection=conn)
    check("after DETACH our capability is NO_ROUTE (home worker)", r.status == Status.NO_ROUTE, r.status_name)
    await agent.close()
    print(f"{len(failures)} failure(s)" + (": " + "; ".join(failures) if failures else ""), flush=True)
    return 0 if not failures else 1


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="DMSC (dmsc/1) agent in Python, on aioquic.")
    parser.add_argument("--gateway", required=True, help="gateway address host:port")
    parser.add_argument("--cert", required=True, help="agent certificate (PEM)")
    parser.add_argument("--key", required=True, help="agent private key (PEM)")
    parser.add_argument("--ca", required=True, help="domain CA certificate (PEM): the trust anchor")
    parser.add_argument("--name", default="python-agent", help="agent card name")
    parser.add_argument("--max-concurrent", type=int, default=64, help="concurrency as a target")
    parser.add_argument("--stream-credit", type=int, default=None,
                        help="initial_max_streams_bidi (default: twice --max-concurrent)")
    parser.add_argument("--no-lanes", action="store_true", help="do not open lanes")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="attach and serve capabilities until SIGINT/SIGTERM")
    p.add_argument("--capability", action="append",
                   help="capability to offer, NAME or NAME=KIND (kinds: echo, upper, caller, fail, sleep); "
                        "repeatable; default py_echo and py_upper")
    p = sub.add_parser("invoke", help="invoke a capability; exit 0 only on OK")
    p.add_argument("--capability", required=True)
    p.add_argument("--payload", help="payload text (default: standard input)")
    p.add_argument("--content-type", default="text/plain")
    p.add_argument("--deadline-ms", type=int, default=0)
    p.add_argument("--retries", type=int, default=0, help="retry NO_ROUTE this many times (100 ms apart)")
    p.add_argument("--offer", action="append", help="capability the invoking agent offers (default py_echo)")
    p = sub.add_parser("discover", help="list invocable capabilities")
    p.add_argument("--prefix", default="")
    p.add_argument("--tag", default="")
    p.add_argument("--offer", action="append")
    sub.add_parser("selftest", help="attach, invoke ourselves through the gateway, check behaviours")

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * args.verbose,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.verbose < 2:
        logging.getLogger("quic").setLevel(logging.WARNING)
    commands = {"serve": cmd_serve, "invoke": cmd_invoke, "discover": cmd_discover, "selftest": cmd_selftest}
    try:
        return asyncio.run(commands[args.command](args))
    except AttachRefusedError as exc:
        print(f"attach refused: {exc}", file=sys.stderr)
        return 3
    except (DmscError, OSError, IdentityError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
