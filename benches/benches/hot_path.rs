//! Micro-benchmarks of the per-request path: header codec (agents' and trunks'), capability lookup plus selection,
//! control-frame decoding. See docs/BENCHMARKS.md for method and figures.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use dmsc_dataplane::routing::{AgentEntry, Router, Selection, TableGeneration};
use dmsc_protocol::control::{ControlFrame, SessionId};
use dmsc_protocol::header::{RequestHeader, ResponseHeader, TraceContext};
use dmsc_protocol::limits::MAX_HEADER_BYTES;
use dmsc_protocol::peer::PeerHeader;
use dmsc_protocol::Status;

fn header_codec(c: &mut Criterion) {
    let header = RequestHeader {
        capability: "currency_conversion",
        deadline_ms: 1500,
        hop_count: 1,
        trace: TraceContext {
            trace_id: [7; 16],
            span_id: [9; 8],
            flags: 1,
        },
        content_type: "application/json",
        caller: "spiffe://dmsc.local/agent/caller",
        target_session: 0,
        on_behalf_of: "",
        via: "",
    };
    let mut buf = Vec::with_capacity(256);
    header.encode(&mut buf).unwrap();
    let mut g = c.benchmark_group("header");
    g.throughput(Throughput::Elements(1));
    g.bench_function("request_encode", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            black_box(&header).encode(&mut out).unwrap();
            black_box(out.len())
        })
    });
    g.bench_function("request_decode", |b| {
        b.iter(|| {
            let (h, used) = RequestHeader::decode(black_box(&buf), MAX_HEADER_BYTES)
                .unwrap()
                .unwrap();
            black_box((h.capability.len(), used))
        })
    });
    let mut resp = Vec::new();
    ResponseHeader::new(Status::Ok).encode(&mut resp).unwrap();
    g.bench_function("response_decode", |b| {
        b.iter(|| black_box(ResponseHeader::decode(black_box(&resp), MAX_HEADER_BYTES).unwrap()))
    });
    // What a gateway writes and reads per request forwarded over a trunk (docs/TRUNK.md).
    let peer = PeerHeader::new(header, &["gw1"]).unwrap();
    let mut peer_buf = Vec::with_capacity(256);
    peer.encode(&mut Vec::new(), &mut peer_buf).unwrap();
    g.bench_function("peer_encode", |b| {
        let (mut fields, mut out) = (Vec::with_capacity(256), Vec::with_capacity(256));
        b.iter(|| {
            out.clear();
            black_box(&peer).encode(&mut fields, &mut out).unwrap();
            black_box(out.len())
        })
    });
    g.bench_function("peer_decode", |b| {
        b.iter(|| {
            let (h, used) = PeerHeader::decode(black_box(&peer_buf), MAX_HEADER_BYTES)
                .unwrap()
                .unwrap();
            black_box((h.visited().len(), used))
        })
    });
    g.finish();
}

/// A router with `caps` capabilities spread over agents, 10 capabilities per agent and every
/// capability offered by two agents (so selection really chooses).
fn router(caps: usize) -> (Router<u32>, Vec<String>) {
    let names: Vec<String> = (0..caps).map(|i| format!("capability_{i:07}")).collect();
    let mut r = Router::new(TableGeneration::standalone(), 42, 64);
    let agents = caps / 5;
    for a in 0..agents {
        let offered: Arc<[Box<str>]> = (0..10)
            .map(|k| Box::from(names[(a * 5 + k) % caps].as_str()))
            .collect();
        r.insert(AgentEntry {
            session: SessionId(a as u64),
            home: dmsc_dataplane::routing::WorkerId(0),
            local: Some(a as u32),
            outstanding: 0,
            limit: u32::MAX,
            capabilities: offered,
        });
    }
    (r, names)
}

fn lookup_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup_select");
    g.throughput(Throughput::Elements(1));
    for caps in [100, 100_000] {
        let (mut r, names) = router(caps);
        let mut i = 0usize;
        g.bench_function(format!("{caps}_capabilities"), |b| {
            b.iter(|| {
                i = (i + 7919) % names.len();
                match r.select(&dmsc_protocol::table::GroupSet::EMPTY, black_box(&names[i])) {
                    Selection::Local(t, _) => {
                        r.finish(t);
                        black_box(t)
                    }
                    other => panic!("unexpected {other:?}"),
                }
            })
        });
    }
    // The same 100,000-capability table, but requests concentrate on 1,000 hot capabilities
    // (the usual skew of real traffic): the working set stays in cache.
    let (mut r, names) = router(100_000);
    let mut i = 0usize;
    g.bench_function("100000_capabilities_hot_1000", |b| {
        b.iter(|| {
            i = (i + 7919) % 1000;
            match r.select(
                &dmsc_protocol::table::GroupSet::EMPTY,
                black_box(&names[i * 100]),
            ) {
                Selection::Local(t, _) => {
                    r.finish(t);
                    black_box(t)
                }
                other => panic!("unexpected {other:?}"),
            }
        })
    });
    let (mut r, _) = router(1000);
    g.bench_function("no_route", |b| {
        b.iter(|| black_box(r.select(&dmsc_protocol::table::GroupSet::EMPTY, black_box("missing"))))
    });
    g.finish();
}

fn control_decode(c: &mut Criterion) {
    let card = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../protocol/tests/fixtures/agent-cards/currency_agent.v1.0.json"
    ))
    .unwrap();
    let frame = ControlFrame::Attach {
        max_concurrent: 64,
        card: card.clone(),
    }
    .to_bytes()
    .unwrap();
    let mut g = c.benchmark_group("control");
    g.bench_function("attach_decode_and_card_parse", |b| {
        b.iter_batched(
            || frame.clone(),
            |f| {
                let (frame, _) = ControlFrame::decode(&f, 1 << 20).unwrap().unwrap();
                let ControlFrame::Attach { card, .. } = frame else {
                    unreachable!()
                };
                black_box(dmsc_protocol::card::AgentCard::from_json(&card).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, header_codec, lookup_select, control_decode);
criterion_main!(benches);
