//! Tests of the verifier and the configuration builders against certificates of the
//! development CA, including ones it would never issue.

use std::sync::Arc;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, KeyUsagePurpose};
use rustls::client::danger::ServerCertVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{CertificateError, OtherError};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::ca::uri_san;
use crate::{
    client_config, server_config, CertificateAuthority, Credentials, PrincipalKind, RefusalReason,
    Refused, Resumption, SpiffeId, SpiffeVerifier, TlsError,
};

const DOMAIN: &str = "test.local";
const OTHER: &str = "other.local";

fn leaf(ca: &CertificateAuthority, id: &SpiffeId) -> CertificateDer<'static> {
    ca.issue(id, &["localhost"]).unwrap().cert_chain().remove(0)
}

/// A leaf of `ca` with exactly the given URI SANs, usable for client and server auth.
fn leaf_with_uris(ca: &CertificateAuthority, uris: &[&str]) -> CertificateDer<'static> {
    let mut params = CertificateParams::default();
    params.subject_alt_names = uris.iter().map(|u| uri_san(u).unwrap()).collect();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    ca.sign_raw(params)
}

fn verifier(
    anchors: &[&CertificateAuthority],
    kinds: &[PrincipalKind],
    domains: &[&str],
) -> SpiffeVerifier {
    let anchors: Vec<_> = anchors.iter().map(|ca| ca.cert_der()).collect();
    SpiffeVerifier::new(&anchors, kinds, domains).unwrap()
}

/// Runs both the client and the server check, which must agree, and returns the result.
fn verify_both(v: &SpiffeVerifier, cert: &CertificateDer<'_>) -> Result<SpiffeId, Refused> {
    let now = UnixTime::now();
    let as_client = v.verify_client(cert, &[], now);
    let as_server = v.verify_server(cert, &[], now);
    match (&as_client, &as_server) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a.reason(), b.reason(), "{a} / {b}"),
        _ => panic!("client and server checks disagree: {as_client:?} / {as_server:?}"),
    }
    as_server
}

#[test]
fn a_principal_of_an_accepted_kind_and_domain_is_accepted() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    let id = SpiffeId::agent(DOMAIN, "weather").unwrap();
    assert_eq!(verify_both(&v, &leaf(&ca, &id)).unwrap(), id);
    assert_eq!(v.refusals().total(), 0);
}

#[test]
fn a_principal_of_another_kind_is_refused() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    for id in [
        SpiffeId::gateway(DOMAIN, "g1").unwrap(),
        SpiffeId::control(DOMAIN).unwrap(),
    ] {
        let refused = verify_both(&v, &leaf(&ca, &id)).unwrap_err();
        assert!(
            matches!(&refused, Refused::WrongKind { id: found, .. } if *found == id),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("expected an agent"),
            "{refused}"
        );
    }
    // Each call of `verify_both` checks twice.
    assert_eq!(v.refusals().get(RefusalReason::WrongKind), 4);
}

#[test]
fn a_set_of_kinds_accepts_each_of_them() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(
        &[&ca],
        &[
            PrincipalKind::Gateway,
            PrincipalKind::Agent,
            PrincipalKind::Agent,
        ],
        &[DOMAIN],
    );
    assert_eq!(v.kinds(), [PrincipalKind::Agent, PrincipalKind::Gateway]);
    for id in [
        SpiffeId::agent(DOMAIN, "a").unwrap(),
        SpiffeId::gateway(DOMAIN, "g").unwrap(),
    ] {
        assert_eq!(verify_both(&v, &leaf(&ca, &id)).unwrap(), id);
    }
    let refused = verify_both(&v, &leaf(&ca, &SpiffeId::control(DOMAIN).unwrap())).unwrap_err();
    assert_eq!(refused.reason(), RefusalReason::WrongKind);
    assert!(
        refused.to_string().contains("an agent or a gateway"),
        "{refused}"
    );
}

#[test]
fn a_principal_of_another_trust_domain_is_refused() {
    // Both CAs are trusted, so the chain is fine; the identity is not.
    let ours = CertificateAuthority::generate(DOMAIN).unwrap();
    let theirs = CertificateAuthority::generate(OTHER).unwrap();
    let v = verifier(&[&ours, &theirs], &[PrincipalKind::Gateway], &[DOMAIN]);
    let cert = leaf(&theirs, &SpiffeId::gateway(OTHER, "g1").unwrap());
    let refused = verify_both(&v, &cert).unwrap_err();
    assert!(
        matches!(&refused, Refused::WrongTrustDomain { accepted, .. } if accepted == &[DOMAIN]),
        "{refused}"
    );
    assert!(refused.to_string().contains("other.local"), "{refused}");
}

#[test]
fn a_set_of_two_trust_domains_accepts_both() {
    let ours = CertificateAuthority::generate(DOMAIN).unwrap();
    let theirs = CertificateAuthority::generate(OTHER).unwrap();
    let v = verifier(
        &[&ours, &theirs],
        &[PrincipalKind::Gateway],
        &[DOMAIN, OTHER],
    );
    assert_eq!(v.trust_domains(), [DOMAIN, OTHER]);
    for (ca, domain) in [(&ours, DOMAIN), (&theirs, OTHER)] {
        let id = SpiffeId::gateway(domain, "g1").unwrap();
        assert_eq!(verify_both(&v, &leaf(ca, &id)).unwrap(), id);
    }
    // A domain in the set does not make its CA trusted: the anchors decide the chain.
    let only_ours = verifier(&[&ours], &[PrincipalKind::Gateway], &[DOMAIN, OTHER]);
    let cert = leaf(&theirs, &SpiffeId::gateway(OTHER, "g1").unwrap());
    let refused = verify_both(&only_ours, &cert).unwrap_err();
    assert_eq!(refused.reason(), RefusalReason::Chain);
}

#[test]
fn a_certificate_of_a_foreign_ca_is_refused() {
    // Same trust domain, so the same subject name as our CA, but another key.
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let stranger = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    let cert = leaf(&stranger, &SpiffeId::agent(DOMAIN, "mallory").unwrap());
    let refused = verify_both(&v, &cert).unwrap_err();
    assert!(
        matches!(
            refused,
            Refused::Chain(rustls::Error::InvalidCertificate(
                CertificateError::BadSignature | CertificateError::UnknownIssuer
            ))
        ),
        "{refused}"
    );
    // rustls gets webpki's own error back, so the alert is the usual one.
    let err = ClientCertVerifier::verify_client_cert(&v, &cert, &[], UnixTime::now()).unwrap_err();
    assert!(
        matches!(
            err,
            rustls::Error::InvalidCertificate(
                CertificateError::BadSignature | CertificateError::UnknownIssuer
            )
        ),
        "{err:?}"
    );
}

#[test]
fn a_certificate_without_a_spiffe_id_is_refused() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    let none = leaf_with_uris(&ca, &[]);
    assert!(matches!(verify_both(&v, &none), Err(Refused::NoSpiffeId)));
    let not_spiffe = leaf_with_uris(&ca, &["https://example.com/agent/a"]);
    assert!(matches!(
        verify_both(&v, &not_spiffe),
        Err(Refused::NoSpiffeId)
    ));
}

#[test]
fn a_certificate_with_two_spiffe_ids_is_refused() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    let two = leaf_with_uris(
        &ca,
        &["spiffe://test.local/agent/a", "spiffe://test.local/agent/b"],
    );
    assert!(matches!(
        verify_both(&v, &two),
        Err(Refused::MultipleSpiffeIds { count: 2 })
    ));
}

#[test]
fn a_malformed_spiffe_id_is_refused() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    let bad = leaf_with_uris(&ca, &["spiffe://test.local/agent/a/b"]);
    assert!(matches!(
        verify_both(&v, &bad),
        Err(Refused::InvalidSpiffeId(_))
    ));
}

#[test]
fn the_counters_count_each_reason() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let stranger = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Agent], &[DOMAIN]);
    let now = UnixTime::now();
    let good = leaf(&ca, &SpiffeId::agent(DOMAIN, "a").unwrap());
    let gateway = leaf(&ca, &SpiffeId::gateway(DOMAIN, "g").unwrap());
    let foreign = leaf(&stranger, &SpiffeId::agent(DOMAIN, "a").unwrap());
    let no_id = leaf_with_uris(&ca, &[]);
    for _ in 0..3 {
        v.verify_client(&gateway, &[], now).unwrap_err();
    }
    for _ in 0..2 {
        v.verify_client(&foreign, &[], now).unwrap_err();
    }
    v.verify_server(&no_id, &[], now).unwrap_err();
    v.verify_client(&good, &[], now).unwrap();
    let counts = v.refusals();
    assert_eq!(counts.get(RefusalReason::WrongKind), 3);
    assert_eq!(counts.get(RefusalReason::Chain), 2);
    assert_eq!(counts.get(RefusalReason::NoSpiffeId), 1);
    assert_eq!(counts.get(RefusalReason::WrongTrustDomain), 0);
    assert_eq!(counts.total(), 6);
    assert_eq!(counts.iter().map(|(_, n)| n).sum::<u64>(), 6);
    // Refusals through the rustls traits count too.
    ServerCertVerifier::verify_server_cert(
        &v,
        &gateway,
        &[],
        &ServerName::try_from("ignored").unwrap(),
        &[],
        now,
    )
    .unwrap_err();
    assert_eq!(v.refusals().get(RefusalReason::WrongKind), 4);
}

#[test]
fn identity_refusals_reach_rustls_as_typed_errors() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let v = verifier(&[&ca], &[PrincipalKind::Gateway], &[DOMAIN]);
    let agent = leaf(&ca, &SpiffeId::agent(DOMAIN, "a").unwrap());
    let err = ServerCertVerifier::verify_server_cert(
        &v,
        &agent,
        &[],
        &ServerName::try_from("ignored").unwrap(),
        &[],
        UnixTime::now(),
    )
    .unwrap_err();
    let rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) = &err else {
        panic!("unexpected error {err:?}");
    };
    let refused = inner.downcast_ref::<Refused>().unwrap();
    assert_eq!(refused.reason(), RefusalReason::WrongKind);
    // The handshake error text (rustls prints the Debug form) reads well.
    assert!(err.to_string().contains("expected a gateway"), "{err}");
}

#[test]
fn verifiers_that_could_accept_nothing_are_not_built() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let anchors = [ca.cert_der()];
    let agent = [PrincipalKind::Agent];
    assert!(matches!(
        SpiffeVerifier::new(&[], &agent, &[DOMAIN]),
        Err(TlsError::NoTrustAnchor)
    ));
    assert!(matches!(
        SpiffeVerifier::new(&anchors, &[], &[DOMAIN]),
        Err(TlsError::NoAcceptedKind)
    ));
    assert!(matches!(
        SpiffeVerifier::new(&anchors, &agent, &[]),
        Err(TlsError::NoTrustDomain)
    ));
    assert!(matches!(
        SpiffeVerifier::new(&anchors, &agent, &["Not A Domain"]),
        Err(TlsError::TrustDomain(_))
    ));
    assert!(matches!(
        SpiffeVerifier::new(&[CertificateDer::from(vec![1, 2, 3])], &agent, &[DOMAIN]),
        Err(TlsError::TrustAnchor(_))
    ));
}

#[test]
fn the_builders_make_quic_configurations() {
    let ca = CertificateAuthority::generate(DOMAIN).unwrap();
    let gateway = ca
        .issue(&SpiffeId::gateway(DOMAIN, "g").unwrap(), &["localhost"])
        .unwrap();
    let agent = ca
        .issue(&SpiffeId::agent(DOMAIN, "a").unwrap(), &[])
        .unwrap();
    let credentials = |issued: &crate::IssuedIdentity| Credentials {
        cert_chain: issued.cert_chain(),
        private_key: issued.private_key(),
    };
    let anchors = [ca.cert_der()];
    let accept_agents =
        Arc::new(SpiffeVerifier::new(&anchors, &[PrincipalKind::Agent], &[DOMAIN]).unwrap());
    let accept_gateways =
        Arc::new(SpiffeVerifier::new(&anchors, &[PrincipalKind::Gateway], &[DOMAIN]).unwrap());
    for resumption in [Resumption::Allowed, Resumption::Off] {
        server_config(
            dmsc_protocol::ALPN_AGENT,
            credentials(&gateway),
            accept_agents.clone(),
            resumption,
        )
        .unwrap();
        client_config(
            dmsc_protocol::ALPN_AGENT,
            credentials(&agent),
            accept_gateways.clone(),
            resumption,
        )
        .unwrap();
    }
    // A key that is not the certificate's is refused up front.
    let mismatched = Credentials {
        cert_chain: gateway.cert_chain(),
        private_key: agent.private_key(),
    };
    assert!(matches!(
        server_config(
            dmsc_protocol::ALPN_PEER,
            mismatched,
            accept_agents,
            Resumption::Off
        ),
        Err(TlsError::Credentials(_))
    ));
}
