//! A throwaway development PKI in a temporary directory, removed when dropped.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use dmsc_identity::{DevPki, IdentityError, SpiffeId};

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
    /// `spiffe://dmsc.local/gateway/loadgen2`: the second gateway of `--gateways 2`.
    pub gateway2: IdentityFiles,
    /// `spiffe://dmsc.local/agent/echo`.
    pub agent: IdentityFiles,
    /// `spiffe://dmsc.local/agent/loadgen`.
    pub caller: IdentityFiles,
    /// `spiffe://dmsc.local/control`.
    pub control: IdentityFiles,
    /// `spiffe://dmsc.local/agent/a2a-front`: the A2A front door.
    pub a2a_front: IdentityFiles,
    /// `spiffe://dmsc.local/agent/a2a-echo`: the adapter of the trivial A2A agent.
    pub a2a_agent: IdentityFiles,
    /// The domain configuration the control plane serves ([`TempPki::write_domain`]).
    pub domain_toml: PathBuf,
    /// Gateways the domain configuration lists.
    gateways: usize,
}

/// The id of the loadgen's gateway number `i` (1 or 2).
pub fn gateway_id(i: usize) -> &'static str {
    if i == 2 {
        "loadgen2"
    } else {
        "loadgen"
    }
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
            gateway2: IdentityFiles::empty(),
            agent: IdentityFiles::empty(),
            caller: IdentityFiles::empty(),
            control: IdentityFiles::empty(),
            a2a_front: IdentityFiles::empty(),
            a2a_agent: IdentityFiles::empty(),
            domain_toml: dir.join("domain.toml"),
            gateways: 1,
        };
        let store = DevPki::new(dir.join("pki"));
        let ca = store.init(DOMAIN).context("creating the development CA")?;
        pki.ca = store.ca_cert_path();
        pki.gateway = store.ensure_gateway(&ca, "loadgen")?.into();
        pki.gateway2 = store.ensure_gateway(&ca, "loadgen2")?.into();
        pki.agent = store.ensure_agent(&ca, "echo")?.into();
        pki.caller = store.ensure_agent(&ca, "loadgen")?.into();
        pki.a2a_front = store.ensure_agent(&ca, "a2a-front")?.into();
        pki.a2a_agent = store.ensure_agent(&ca, "a2a-echo")?.into();
        let control = SpiffeId::control(DOMAIN).map_err(IdentityError::from)?;
        pki.control = store.ensure(&ca, &control)?.into();
        pki.write_domain(0)?;
        Ok(pki)
    }

    /// Writes the domain configuration: the gateways, and every agent of the domain allowed to
    /// advertise, discover and invoke everything. `version` only changes an interned dummy
    /// capability, so each version compiles to a different generation with the same policy
    /// (what `--swap-tables-ms` installs).
    pub fn write_domain(&self, version: u64) -> anyhow::Result<()> {
        Self::write_domain_at(&self.domain_toml, &self.ca, version, self.gateways)
    }

    /// Gateways the domain configuration lists.
    pub fn gateways(&self) -> usize {
        self.gateways
    }

    /// Lists `n` gateways (1 or 2: `loadgen`, `loadgen2`) in the domain configuration from now
    /// on, and rewrites it.
    pub fn set_gateways(&mut self, n: usize) -> anyhow::Result<()> {
        self.gateways = n;
        self.write_domain(0)
    }

    /// [`TempPki::write_domain`] to `path`, with the CA certificate at `ca`.
    pub fn write_domain_at(
        path: &Path,
        ca: &Path,
        version: u64,
        gateways: usize,
    ) -> anyhow::Result<()> {
        let text = format!(
            "# Written by dmsc-loadgen.\n\
             capabilities = [\"loadgen.generation-{version}\"]\n\n\
             [domain]\nname = \"{DOMAIN}\"\ntrust_anchor = {ca:?}\n\n\
             {gateways}\
             [groups.agents]\nmembers = [\"spiffe://{DOMAIN}/agent/*\"]\nadvertise = [\"*\"]\ndiscover = [\"*\"]\n\n\
             [[invoke]]\neffect = \"allow\"\ngroups = [\"agents\"]\ncapabilities = [\"*\"]\n",
            ca = ca.display().to_string(),
            gateways = (1..=gateways.clamp(1, 2))
                .map(|i| format!("[[gateway]]\nid = \"{}\"\n\n", gateway_id(i)))
                .collect::<String>(),
        );
        // Write then rename, so the control plane never reads a half-written file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Deletes every private key (the processes have loaded theirs).
    pub fn remove_keys(&self) {
        for key in [
            &self.gateway.key,
            &self.gateway2.key,
            &self.agent.key,
            &self.caller.key,
            &self.control.key,
            &self.a2a_front.key,
            &self.a2a_agent.key,
        ] {
            let _ = std::fs::remove_file(key);
        }
        let _ = std::fs::remove_file(self.dir.join("pki").join("ca.key"));
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
