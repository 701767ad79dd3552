//! What a TLS 1.3 handshake costs rustls on this machine, with the gateway's own configuration
//! (ring, P-256 ECDSA identities from the development CA, client certificates checked by the
//! SPIFFE verifier, no resumption), done in memory so only the library's work is timed: the
//! server's side (what the gateway pays per agent attach, before QUIC and `ATTACH`) and the
//! client's. Compared with the gateway's CPU per attach in docs/BENCHMARKS.md.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use dmsc_identity::{CertificateAuthority, PrincipalKind, SpiffeId, SpiffeVerifier};
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

const DOMAIN: &str = "bench.local";

fn configs() -> (Arc<ServerConfig>, Arc<ClientConfig>) {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let gateway = ca
        .issue(&SpiffeId::gateway(DOMAIN, "gw1").unwrap(), &["localhost"])
        .unwrap();
    let agent = ca
        .issue(&SpiffeId::agent(DOMAIN, "echo").unwrap(), &[])
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        |kind| Arc::new(SpiffeVerifier::new(&[ca.cert_der()], &[kind], &[DOMAIN]).unwrap());
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier(PrincipalKind::Agent))
        .with_single_cert(gateway.cert_chain(), gateway.private_key())
        .unwrap();
    server.send_tls13_tickets = 0;
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier(PrincipalKind::Gateway))
        .with_client_auth_cert(agent.cert_chain(), agent.private_key())
        .unwrap();
    client.resumption = rustls::client::Resumption::disabled();
    (Arc::new(server), Arc::new(client))
}

/// One full handshake; returns the time spent in the server's and in the client's calls.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Duration, Duration) {
    let t = Instant::now();
    let mut s = ServerConnection::new(server.clone()).unwrap();
    let mut server_time = t.elapsed();
    // The client's key share and ClientHello are made here.
    let t = Instant::now();
    let mut c = ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut client_time = t.elapsed();
    let mut wire = Vec::with_capacity(8192);
    while s.is_handshaking() || c.is_handshaking() {
        let t = Instant::now();
        wire.clear();
        while c.wants_write() {
            c.write_tls(&mut wire).unwrap();
        }
        client_time += t.elapsed();
        let t = Instant::now();
        if !wire.is_empty() {
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets().unwrap();
        }
        wire.clear();
        while s.wants_write() {
            s.write_tls(&mut wire).unwrap();
        }
        server_time += t.elapsed();
        let t = Instant::now();
        if !wire.is_empty() {
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        client_time += t.elapsed();
    }
    (server_time, client_time)
}

fn bench(c: &mut Criterion) {
    let (server, client) = configs();
    let mut group = c.benchmark_group("tls13_handshake_p256_mutual");
    group.sample_size(30);
    group.bench_function("server_side", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&server, &client).0).sum())
    });
    group.bench_function("client_side", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| handshake(&server, &client).1).sum())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
