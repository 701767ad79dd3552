//! Filesystem helpers for the binaries: loading PEM certificates and keys, and keeping a
//! development PKI in a directory. Every error names the file it concerns.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use dmsc_protocol::spiffe::{validate_trust_domain, Principal, PrincipalKind, SpiffeId};

use crate::cert::key_matches_cert;
use crate::{CertificateAuthority, IdentityError};

/// DNS and IP SANs put in the certificates of gateways and of the control plane, so that local
/// peers can reach them by `localhost` or a loopback address.
pub const SERVER_DNS_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Loads every certificate of a PEM file, in file order (leaf first for a chain).
pub fn load_cert_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))?;
    if certs.is_empty() {
        return Err(IdentityError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, IdentityError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        pem::Error::NoItemsFound => IdentityError::NoPrivateKey {
            path: path.to_owned(),
        },
        other => pem_error(path, other),
    })
}

/// Loads the CA certificates to trust from a PEM file (at least one).
pub fn load_trust_anchors(path: &Path) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
    load_cert_chain(path)
}

/// A development PKI kept in a directory, laid out like this:
///
/// ```text
/// <dir>/ca.pem              CA certificate (the trust anchor to give every endpoint)
/// <dir>/ca.key              CA private key (mode 0600)
/// <dir>/gateways/<id>.pem   gateway certificate; <id>.key its key (mode 0600)
/// <dir>/agents/<name>.pem   agent certificate; <name>.key its key (mode 0600)
/// <dir>/control.pem         control-plane certificate; control.key its key (mode 0600)
/// ```
///
/// `DevPki` itself is only the directory; [`DevPki::init`] creates or loads the CA, and
/// [`DevPki::ensure`] and [`DevPki::issue`] write leaf certificates with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPki {
    /// The directory holding the PKI.
    pub dir: PathBuf,
}

impl DevPki {
    /// A PKI kept in `dir` (nothing is read or written yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DevPki { dir: dir.into() }
    }

    /// Creates the CA for `trust_domain` if `ca.pem` does not exist, else loads it; loading fails
    /// with [`IdentityError::WrongTrustDomain`] if the existing CA is for another domain.
    pub fn init(&self, trust_domain: &str) -> Result<CertificateAuthority, IdentityError> {
        validate_trust_domain(trust_domain)?;
        if self.ca_cert_path().exists() {
            let ca = self.load_ca()?;
            if ca.trust_domain() != trust_domain {
                return Err(IdentityError::WrongTrustDomain {
                    expected: trust_domain.to_owned(),
                    found: ca.trust_domain().to_owned(),
                });
            }
            return Ok(ca);
        }
        let ca = CertificateAuthority::generate(trust_domain)?;
        create_dir(&self.dir)?;
        // Key first: a crash in between leaves no `ca.pem`, so the next `init` starts over.
        write_file(
            &self.ca_key_path(),
            ca.key_pem().as_bytes(),
            Secrecy::Private,
        )?;
        write_file(
            &self.ca_cert_path(),
            ca.cert_pem().as_bytes(),
            Secrecy::Public,
        )?;
        Ok(ca)
    }

    /// Loads the existing CA (`ca.pem` and `ca.key`).
    pub fn load_ca(&self) -> Result<CertificateAuthority, IdentityError> {
        let cert_path = self.ca_cert_path();
        let key_path = self.ca_key_path();
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        CertificateAuthority::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            IdentityError::PrivateKey(message) => {
                IdentityError::PrivateKey(format!("{}: {message}", key_path.display()))
            }
            IdentityError::Certificate(message) => {
                IdentityError::Certificate(format!("{}: {message}", cert_path.display()))
            }
            other => other,
        })
    }

    /// Returns the (certificate, key) paths of `id`, first issuing its identity unless a
    /// certificate for it from `ca` and its key are already there. Certificates of gateways and
    /// of the control plane also carry [`SERVER_DNS_NAMES`].
    ///
    /// A certificate from another CA, for another identity, or with a key that does not match is
    /// replaced; a file that cannot be read or decoded is reported as an error instead.
    pub fn ensure(
        &self,
        ca: &CertificateAuthority,
        id: &SpiffeId,
    ) -> Result<(PathBuf, PathBuf), IdentityError> {
        let paths = self.paths(id);
        let (cert_path, key_path) = &paths;
        if cert_path.exists() && key_path.exists() {
            // `load_cert_chain` returns at least one certificate or an error.
            let leaf = load_cert_chain(cert_path)?.swap_remove(0);
            let key_pem = read_string(key_path)?;
            // Reuse only a certificate for this id from this CA, with its key; one left over
            // from an older CA (or for another id) would fail every handshake, so it is replaced.
            let current = matches!(ca.verify_issued(&leaf), Ok(ref found) if found == id)
                && key_matches_cert(&leaf, &key_pem);
            if current {
                return Ok(paths);
            }
        }
        self.issue(ca, id)
    }

    /// Issues a new identity for `id`, overwriting any existing one; returns the (certificate,
    /// key) paths. Fails with [`IdentityError::WrongTrustDomain`] if `id` is not of `ca`'s trust
    /// domain.
    pub fn issue(
        &self,
        ca: &CertificateAuthority,
        id: &SpiffeId,
    ) -> Result<(PathBuf, PathBuf), IdentityError> {
        let dns_names = match id.kind() {
            PrincipalKind::Agent => &[][..],
            PrincipalKind::Gateway | PrincipalKind::Control => SERVER_DNS_NAMES,
        };
        let issued = ca.issue(id, dns_names)?;
        let paths = self.paths(id);
        let (cert_path, key_path) = &paths;
        if let Some(parent) = cert_path.parent() {
            create_dir(parent)?;
        }
        write_file(key_path, issued.key_pem.as_bytes(), Secrecy::Private)?;
        write_file(cert_path, issued.cert_pem.as_bytes(), Secrecy::Public)?;
        Ok(paths)
    }

    /// [`DevPki::ensure`] for gateway `id` of `ca`'s trust domain.
    pub fn ensure_gateway(
        &self,
        ca: &CertificateAuthority,
        id: &str,
    ) -> Result<(PathBuf, PathBuf), IdentityError> {
        self.ensure(ca, &SpiffeId::gateway(ca.trust_domain(), id)?)
    }

    /// [`DevPki::ensure`] for agent `name` of `ca`'s trust domain.
    pub fn ensure_agent(
        &self,
        ca: &CertificateAuthority,
        name: &str,
    ) -> Result<(PathBuf, PathBuf), IdentityError> {
        self.ensure(ca, &SpiffeId::agent(ca.trust_domain(), name)?)
    }

    /// The (certificate, key) paths of `id`: under `agents/` or `gateways/` by name, or
    /// `control.pem` and `control.key` for the control plane. A [`SpiffeId`]'s names are valid
    /// path segments (no `/`, not `.` or `..`), so the paths stay inside the directory.
    pub fn paths(&self, id: &SpiffeId) -> (PathBuf, PathBuf) {
        match id.principal() {
            Principal::Agent(name) => leaf_paths(&self.agents_dir(), name),
            Principal::Gateway(gateway) => leaf_paths(&self.gateways_dir(), gateway),
            Principal::Control => leaf_paths(&self.dir, "control"),
        }
    }

    /// Path of the CA certificate, the trust anchor for every endpoint.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Path of the CA private key.
    pub fn ca_key_path(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// Directory of agent certificates and keys.
    pub fn agents_dir(&self) -> PathBuf {
        self.dir.join("agents")
    }

    /// Directory of gateway certificates and keys.
    pub fn gateways_dir(&self) -> PathBuf {
        self.dir.join("gateways")
    }
}

fn leaf_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// Whether a file may be read by others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Secrecy {
    Public,
    Private,
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| io_error(path, source))
}

fn read_string(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> IdentityError {
    IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pem_error(path: &Path, error: pem::Error) -> IdentityError {
    match error {
        pem::Error::Io(source) => io_error(path, source),
        other => IdentityError::Pem {
            path: path.to_owned(),
            message: other.to_string(),
        },
    }
}

fn create_dir(dir: &Path) -> Result<(), IdentityError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| io_error(dir, source))
}

/// Writes `contents` to a temporary file beside `path` and renames it into place, so a reader
/// never sees a half-written file. Private files are created with mode 0600 on unix.
fn write_file(path: &Path, contents: &[u8], secrecy: Secrecy) -> Result<(), IdentityError> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover temporary file may have looser permissions than we want; start afresh.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error(&tmp, source)),
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(match secrecy {
            Secrecy::Private => 0o600,
            Secrecy::Public => 0o644,
        });
    }
    #[cfg(not(unix))]
    let _ = secrecy;
    let mut file = options
        .open(&tmp)
        .map_err(|source| io_error(&tmp, source))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error(&tmp, source))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| io_error(path, source))
}

#[cfg(test)]
mod tests {
    use dmsc_protocol::spiffe::SpiffeIdError;

    use super::*;
    use crate::spiffe_id_from_cert;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "dmsc-store-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn init_ensure_and_reload() {
        let dir = temp_dir("init");
        let pki = DevPki::new(&dir);
        let ca = pki.init("dmsc.local").unwrap();
        assert!(pki.ca_cert_path().exists());
        let again = pki.init("dmsc.local").unwrap();
        assert_eq!(again.cert_der(), ca.cert_der());
        assert!(matches!(
            pki.init("other.domain"),
            Err(IdentityError::WrongTrustDomain { .. })
        ));

        let gw1 = SpiffeId::gateway("dmsc.local", "gw1").unwrap();
        let (cert, key) = pki.ensure_gateway(&ca, "gw1").unwrap();
        assert_eq!((cert.clone(), key.clone()), pki.paths(&gw1));
        let first = fs::read(&cert).unwrap();
        pki.ensure_gateway(&again, "gw1").unwrap();
        assert_eq!(fs::read(&cert).unwrap(), first, "ensure must not reissue");
        pki.issue(&ca, &gw1).unwrap();
        assert_ne!(fs::read(&cert).unwrap(), first, "issue must reissue");

        let (agent_cert, agent_key) = pki.ensure_agent(&ca, "weather").unwrap();
        let chain = load_cert_chain(&agent_cert).unwrap();
        assert_eq!(
            spiffe_id_from_cert(&chain[0]).unwrap().as_str(),
            "spiffe://dmsc.local/agent/weather"
        );
        load_private_key(&agent_key).unwrap();
        assert_eq!(load_trust_anchors(&pki.ca_cert_path()).unwrap().len(), 1);

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for path in [pki.ca_key_path(), key, agent_key] {
                let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }

        // A leaf from another CA is replaced by ensure.
        let stranger = CertificateAuthority::generate("dmsc.local").unwrap();
        let foreign = stranger
            .issue(&SpiffeId::agent("dmsc.local", "weather").unwrap(), &[])
            .unwrap();
        fs::write(&agent_cert, &foreign.cert_pem).unwrap();
        pki.ensure_agent(&ca, "weather").unwrap();
        let chain = load_cert_chain(&agent_cert).unwrap();
        assert!(ca.verify_issued(&chain[0]).is_ok());

        // So is a certificate whose key was swapped.
        let (gw_cert, gw_key) = pki.paths(&gw1);
        let weather = SpiffeId::agent("dmsc.local", "weather").unwrap();
        fs::copy(pki.paths(&weather).1, &gw_key).unwrap();
        let before = fs::read(&gw_cert).unwrap();
        pki.ensure_gateway(&ca, "gw1").unwrap();
        assert_ne!(fs::read(&gw_cert).unwrap(), before);
        let chain = load_cert_chain(&gw_cert).unwrap();
        let key_pem = fs::read_to_string(&gw_key).unwrap();
        assert!(key_matches_cert(&chain[0], &key_pem));

        assert!(matches!(
            pki.ensure_agent(&ca, "../escape"),
            Err(IdentityError::Spiffe(SpiffeIdError::InvalidName { .. }))
        ));

        // The control plane's identity has its own files, with the loopback names.
        let control = SpiffeId::control("dmsc.local").unwrap();
        let (control_cert, _) = pki.ensure(&ca, &control).unwrap();
        assert_eq!(control_cert, dir.join("control.pem"));
        let chain = load_cert_chain(&control_cert).unwrap();
        assert_eq!(ca.verify_issued(&chain[0]).unwrap(), control);
        // An identity of another trust domain is refused before anything is written.
        let foreign = SpiffeId::agent("other.domain", "x").unwrap();
        assert!(matches!(
            pki.issue(&ca, &foreign),
            Err(IdentityError::WrongTrustDomain { .. })
        ));
        assert!(!pki.paths(&foreign).0.exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn load_errors_name_the_path() {
        let dir = temp_dir("errors");
        fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let err = load_cert_chain(&missing).unwrap_err();
        assert!(matches!(err, IdentityError::Io { .. }));
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let empty = dir.join("empty.pem");
        fs::write(&empty, "nothing here\n").unwrap();
        assert!(matches!(
            load_cert_chain(&empty),
            Err(IdentityError::NoCertificate { .. })
        ));
        assert!(matches!(
            load_private_key(&empty),
            Err(IdentityError::NoPrivateKey { .. })
        ));

        let broken = dir.join("broken.pem");
        fs::write(&broken, "-----BEGIN CERTIFICATE-----\n!!!!\n").unwrap();
        let err = load_cert_chain(&broken).unwrap_err();
        assert!(err.to_string().contains("broken.pem"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
