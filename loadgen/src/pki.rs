//! A throwaway development PKI in a temporary directory, removed when dropped.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use dmsc_identity::DevPki;

/// Trust domain of the throwaway PKI.
pub const DOMAIN: &str = "dmsc.local";

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
}

/// The CA and the three identities a self-contained run needs: the gateway, the echo agents
/// (one identity shared by all of them, as replicas would) and the callers.
#[derive(Debug)]
pub struct TempPki {
    dir: PathBuf,
    /// The domain CA certificate, every endpoint's trust anchor.
    pub ca: PathBuf,
    /// `spiffe://dmsc.local/gateway/loadgen`.
    pub gateway: IdentityFiles,
    /// `spiffe://dmsc.local/agent/echo`.
    pub agent: IdentityFiles,
    /// `spiffe://dmsc.local/agent/loadgen`.
    pub caller: IdentityFiles,
}

impl TempPki {
    /// Creates the CA and identities in a new directory under the system temporary directory.
    pub fn create() -> anyhow::Result<TempPki> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("dmsc-loadgen-{}-{nanos:08x}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("creating the PKI directory {}", dir.display()))?;
        // From here on, `Drop` removes the directory whatever happens.
        let mut pki = TempPki {
            dir: dir.clone(),
            ca: PathBuf::new(),
            gateway: IdentityFiles::empty(),
            agent: IdentityFiles::empty(),
            caller: IdentityFiles::empty(),
        };
        let store = DevPki::new(dir.join("pki"));
        let ca = store.init(DOMAIN).context("creating the development CA")?;
        pki.ca = store.ca_cert_path();
        pki.gateway = store.ensure_gateway(&ca, "loadgen")?.into();
        pki.agent = store.ensure_agent(&ca, "echo")?.into();
        pki.caller = store.ensure_agent(&ca, "loadgen")?.into();
        Ok(pki)
    }

    /// The directory holding everything.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TempPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl IdentityFiles {
    fn empty() -> Self {
        Self {
            cert: PathBuf::new(),
            key: PathBuf::new(),
        }
    }
}

impl From<(PathBuf, PathBuf)> for IdentityFiles {
    fn from((cert, key): (PathBuf, PathBuf)) -> Self {
        Self { cert, key }
    }
}
