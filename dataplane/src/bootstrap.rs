//! The gateway's TLS identity: from the configured files, or a development PKI created on
//! first run in the state directory.

use std::path::PathBuf;

use dmsc_identity::{load_cert_chain, load_private_key, load_trust_anchors, DevPki, IdentityError};

use crate::config::Config;
use crate::gateway::GatewayIdentity;

/// Where the development PKI put things, to tell the user.
#[derive(Debug, Clone)]
pub struct DevIdentityPaths {
    /// The domain CA certificate (trust anchor for agents).
    pub ca: PathBuf,
    /// The gateway certificate and key.
    pub gateway: (PathBuf, PathBuf),
    /// Ready-made agent identities: name, certificate, key.
    pub agents: Vec<(String, PathBuf, PathBuf)>,
}

/// Names of the agent identities the development PKI issues on first run.
pub const DEV_AGENTS: [&str; 2] = ["echo", "caller"];

/// Loads the identity from `config.cert`/`key`/`ca` when set; otherwise creates (once) and
/// loads a development CA, gateway and agent certificates under `config.state_dir/pki`.
pub fn dev_identity(
    config: &Config,
) -> Result<(GatewayIdentity, Option<DevIdentityPaths>), IdentityError> {
    if let (Some(cert), Some(key), Some(ca)) = (&config.cert, &config.key, &config.ca) {
        let identity = GatewayIdentity {
            cert_chain: load_cert_chain(cert)?,
            private_key: load_private_key(key)?,
            trust_anchors: load_trust_anchors(ca)?,
        };
        return Ok((identity, None));
    }
    let pki = DevPki::new(config.state_dir.join("pki"));
    let ca = pki.init(&config.domain)?;
    let gateway = pki.ensure_gateway(&ca, &config.gateway_id)?;
    let mut agents = Vec::new();
    for name in DEV_AGENTS {
        let (cert, key) = pki.ensure_agent(&ca, name)?;
        agents.push((name.to_owned(), cert, key));
    }
    let identity = GatewayIdentity {
        cert_chain: load_cert_chain(&gateway.0)?,
        private_key: load_private_key(&gateway.1)?,
        trust_anchors: load_trust_anchors(&pki.ca_cert_path())?,
    };
    Ok((
        identity,
        Some(DevIdentityPaths {
            ca: pki.ca_cert_path(),
            gateway,
            agents,
        }),
    ))
}
