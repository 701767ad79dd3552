//! Reading certificates: the SPIFFE ID of a peer's leaf, and the few X.509 facts the
//! development CA checks.

use dmsc_protocol::spiffe::{SpiffeId, SCHEME};
use rcgen::KeyPair;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

use crate::IdentityError;

/// Reads the SPIFFE ID of a DER certificate: it must carry exactly one `spiffe://` URI SAN, and
/// that URI must be a valid DMSC SPIFFE ID. Other URI SANs are ignored.
///
/// This only reads the certificate; it does not check who signed it. A verified peer's
/// certificate comes from a [`SpiffeVerifier`](crate::SpiffeVerifier), which does both.
pub fn spiffe_id_from_cert(der: &[u8]) -> Result<SpiffeId, IdentityError> {
    let cert = parse_cert(der)?;
    let uris = spiffe_uris(&cert)?;
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [uri] => Ok(SpiffeId::parse(uri)?),
        more => Err(IdentityError::MultipleSpiffeIds { count: more.len() }),
    }
}

/// Whether `key_pem` is the private key of the certificate `cert_der`.
pub(crate) fn key_matches_cert(cert_der: &[u8], key_pem: &str) -> bool {
    match (parse_cert(cert_der), KeyPair::from_pem(key_pem)) {
        (Ok(cert), Ok(key)) => cert.public_key().raw == key.public_key_der().as_slice(),
        _ => false,
    }
}

/// Parses a DER certificate, refusing trailing bytes.
pub(crate) fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, IdentityError> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Ok(cert),
        Ok((rest, _)) => Err(IdentityError::Certificate(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ))),
        Err(e) => Err(IdentityError::Certificate(e.to_string())),
    }
}

/// All `spiffe://` URI SANs of a certificate (scheme compared case-insensitively, so that a
/// `SPIFFE://` URI is reported as invalid rather than silently ignored).
pub(crate) fn spiffe_uris<'a>(cert: &X509Certificate<'a>) -> Result<Vec<&'a str>, IdentityError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|e| IdentityError::Certificate(format!("subjectAltName: {e}")))?;
    let Some(san) = san else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri)
                if uri
                    .get(..SCHEME.len())
                    .is_some_and(|s| s.eq_ignore_ascii_case(SCHEME)) =>
            {
                Some(*uri)
            }
            _ => None,
        })
        .collect())
}

/// The subject key identifier extension of a certificate, if it has one.
pub(crate) fn subject_key_id<'a>(cert: &'a X509Certificate<'_>) -> Option<&'a [u8]> {
    cert.iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0),
            _ => None,
        })
}

/// PEM-encodes a DER certificate (rcgen's layout: 64-column base64, LF line endings).
pub(crate) fn pem_encode(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            b64.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63]
            } else {
                b'='
            });
        }
    }
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.chunks(64) {
        pem.extend(line.iter().map(|&b| char::from(b)));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

#[cfg(test)]
mod tests {
    use dmsc_protocol::spiffe::SpiffeIdError;
    use proptest::prelude::*;
    use rcgen::{CertificateParams, PKCS_ECDSA_P256_SHA256};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;

    use super::*;
    use crate::ca::uri_san;
    use crate::CertificateAuthority;

    proptest! {
        #[test]
        fn cert_parsing_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
            let _ = spiffe_id_from_cert(&bytes);
        }

        #[test]
        fn corrupted_certs_never_panic(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let der = sample_leaf_der();
            let mut bytes = der.to_vec();
            for (at, value) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= value;
            }
            let _ = spiffe_id_from_cert(&bytes);
            let _ = spiffe_id_from_cert(&bytes[..cut.index(bytes.len())]);
        }
    }

    /// One leaf certificate, generated once for the corruption property test.
    fn sample_leaf_der() -> &'static CertificateDer<'static> {
        static LEAF: std::sync::OnceLock<CertificateDer<'static>> = std::sync::OnceLock::new();
        LEAF.get_or_init(|| {
            let ca = CertificateAuthority::generate("dmsc.local").unwrap();
            let id = SpiffeId::gateway("dmsc.local", "gw").unwrap();
            ca.issue(&id, &["localhost", "::1"])
                .unwrap()
                .cert_chain()
                .remove(0)
        })
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in 0..10 {
            let der: Vec<u8> = (0..len * 31).map(|i| (i * 7) as u8).collect();
            let pem = pem_encode(&der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes());
            if der.is_empty() {
                continue;
            }
            assert_eq!(back.unwrap().as_ref(), der.as_slice());
        }
    }

    #[test]
    fn cert_parse_errors_are_typed() {
        assert!(matches!(
            spiffe_id_from_cert(b"not a certificate"),
            Err(IdentityError::Certificate(_))
        ));
        // A certificate without any URI SAN.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let plain = CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(matches!(
            spiffe_id_from_cert(plain.der()),
            Err(IdentityError::NoSpiffeId)
        ));
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![
            uri_san("spiffe://d/agent/a").unwrap(),
            uri_san("spiffe://d/agent/b").unwrap(),
            uri_san("https://example.com/").unwrap(),
        ];
        let two = params.self_signed(&key).unwrap();
        assert!(matches!(
            spiffe_id_from_cert(two.der()),
            Err(IdentityError::MultipleSpiffeIds { count: 2 })
        ));
        let mut der = two.der().to_vec();
        der.push(0);
        assert!(matches!(
            spiffe_id_from_cert(&der),
            Err(IdentityError::Certificate(_))
        ));
        // The CA certificate itself names a trust domain, not a principal.
        let ca = CertificateAuthority::generate("dmsc.local").unwrap();
        assert!(matches!(
            spiffe_id_from_cert(&ca.cert_der()),
            Err(IdentityError::Spiffe(SpiffeIdError::InvalidSpiffeId { .. }))
        ));
    }
}
