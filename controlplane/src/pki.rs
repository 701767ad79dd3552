//! `dmsc-control pki`: the development PKI on the command line.
//!
//! * `pki init` creates the CA of a trust domain (or reports the one already there);
//! * `pki issue --agent NAME | --gateway ID | --control` issues a leaf identity, refusing to replace an
//!   existing one unless `--force` is given;
//! * `pki show` prints the CA's trust domain and the identities issued so far.
//!
//! The files are kept by [`DevPki`]; see its documentation for the directory layout.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use thiserror::Error;

use dmsc_identity::{
    load_cert_chain, spiffe_id_from_cert, CertificateAuthority, DevPki, IdentityError, SpiffeId,
};

/// Directory used when `--dir` is not given.
pub const DEFAULT_DIR: &str = "./dmsc-state/pki";
/// Trust domain of a new CA when `--domain` is not given.
pub const DEFAULT_TRUST_DOMAIN: &str = "dmsc.local";

/// Why a `pki` command failed.
#[derive(Debug, Error)]
pub enum PkiError {
    /// An identity operation (reading, writing, generating or parsing) failed.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The PKI directory has no CA yet.
    #[error("no CA at {path}; run `dmsc-control pki init` first")]
    NotInitialized {
        /// Where the CA certificate was looked for.
        path: PathBuf,
    },
    /// The existing CA is for another trust domain than `--domain` asked for.
    #[error("the CA in {dir} is for trust domain {found:?}, not {requested:?}")]
    DomainMismatch {
        /// The PKI directory.
        dir: PathBuf,
        /// The trust domain asked for.
        requested: String,
        /// The trust domain of the existing CA.
        found: String,
    },
    /// None of `--agent`, `--gateway`, `--control` was given (clap normally rules this out).
    #[error("pass --agent NAME, --gateway ID or --control")]
    NoTarget,
    /// The identity already exists and `--force` was not given.
    #[error("{id} already exists at {path}; pass --force to replace it")]
    AlreadyIssued {
        /// The SPIFFE ID that was to be issued.
        id: String,
        /// The existing certificate or key file.
        path: PathBuf,
    },
    /// Listing a directory failed.
    #[error("{path}: {source}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Writing the report failed.
    #[error("writing output: {0}")]
    Output(#[from] io::Error),
}

/// The `pki` subcommands.
#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the development CA (or report the existing one) and print its paths.
    Init(InitArgs),
    /// Issue a certificate and key for an agent or a gateway.
    Issue(IssueArgs),
    /// Print the CA's trust domain and the identities issued so far.
    Show(ShowArgs),
}

/// Where the PKI lives.
#[derive(Debug, Clone, Args)]
pub struct DirArg {
    /// Directory holding the PKI (ca.pem, ca.key, agents/, gateways/).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
}

/// Arguments of `pki init`.
#[derive(Debug, Clone, Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Trust domain of the CA, e.g. dmsc.local [default for a new CA: dmsc.local; an existing
    /// CA must match it if given].
    #[arg(long, value_name = "DOMAIN")]
    pub domain: Option<String>,
}

/// Arguments of `pki issue`.
#[derive(Debug, Clone, Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub target: IssueTarget,
    #[command(flatten)]
    pub dir: DirArg,
    /// Replace an existing certificate and key for this identity.
    #[arg(long)]
    pub force: bool,
}

/// Whom `pki issue` issues for: exactly one of `--agent`, `--gateway` and `--control`.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct IssueTarget {
    /// Issue spiffe://DOMAIN/agent/NAME for the agent NAME.
    #[arg(long, value_name = "NAME")]
    pub agent: Option<String>,
    /// Issue spiffe://DOMAIN/gateway/ID for the gateway ID; its certificate also names
    /// localhost, 127.0.0.1 and ::1.
    #[arg(long, value_name = "ID")]
    pub gateway: Option<String>,
    /// Issue spiffe://DOMAIN/control, the control plane's identity (control.pem, control.key);
    /// its certificate also names localhost, 127.0.0.1 and ::1.
    #[arg(long)]
    pub control: bool,
}

/// The identity `pki issue` issues, borrowed from [`IssueTarget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// An agent, by name.
    Agent(&'a str),
    /// A gateway, by id.
    Gateway(&'a str),
    /// The control plane.
    Control,
}

impl IssueTarget {
    /// The target named on the command line; `None` only if built in code with neither flag.
    /// (If both are set, which clap rules out, the agent wins.)
    pub fn target(&self) -> Option<Target<'_>> {
        match (&self.agent, &self.gateway, self.control) {
            (Some(name), _, _) => Some(Target::Agent(name)),
            (None, Some(id), _) => Some(Target::Gateway(id)),
            (None, None, true) => Some(Target::Control),
            (None, None, false) => None,
        }
    }
}

/// Arguments of `pki show`.
#[derive(Debug, Clone, Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub dir: DirArg,
}

/// Runs one `pki` subcommand, writing its report to `out`.
pub fn run(command: PkiCommand, out: &mut dyn Write) -> Result<(), PkiError> {
    match command {
        PkiCommand::Init(args) => init(&args, out),
        PkiCommand::Issue(args) => issue(&args, out),
        PkiCommand::Show(args) => show(&args, out),
    }
}

fn init(args: &InitArgs, out: &mut dyn Write) -> Result<(), PkiError> {
    let pki = DevPki::new(&args.dir.dir);
    let existed = pki.ca_cert_path().exists();
    let ca = if existed {
        let ca = pki.load_ca()?;
        if let Some(requested) = &args.domain {
            if requested != ca.trust_domain() {
                return Err(PkiError::DomainMismatch {
                    dir: pki.dir.clone(),
                    requested: requested.clone(),
                    found: ca.trust_domain().to_owned(),
                });
            }
        }
        ca
    } else {
        pki.init(args.domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN))?
    };
    let verb = if existed { "exists" } else { "created" };
    writeln!(out, "CA for trust domain {} {verb}", ca.trust_domain())?;
    writeln!(out, "  CA certificate: {}", pki.ca_cert_path().display())?;
    writeln!(out, "  CA key:         {}", pki.ca_key_path().display())?;
    Ok(())
}

fn issue(args: &IssueArgs, out: &mut dyn Write) -> Result<(), PkiError> {
    let pki = DevPki::new(&args.dir.dir);
    let ca = load_ca(&pki)?;
    let target = args.target.target().ok_or(PkiError::NoTarget)?;
    // Validate the name (via its SPIFFE ID) before using it in a path.
    let id = match target {
        Target::Agent(name) => SpiffeId::agent(ca.trust_domain(), name),
        Target::Gateway(id) => SpiffeId::gateway(ca.trust_domain(), id),
        Target::Control => SpiffeId::control(ca.trust_domain()),
    }
    .map_err(IdentityError::from)?;
    let (cert, key) = pki.paths(&id);
    if !args.force {
        if let Some(existing) = [&cert, &key].into_iter().find(|path| path.exists()) {
            return Err(PkiError::AlreadyIssued {
                id: id.to_string(),
                path: existing.clone(),
            });
        }
    }
    let (cert, key) = pki.issue(&ca, &id)?;
    writeln!(out, "issued {}", cert_spiffe_id(&cert)?)?;
    writeln!(out, "  certificate:    {}", cert.display())?;
    writeln!(out, "  key:            {}", key.display())?;
    writeln!(out, "  CA certificate: {}", pki.ca_cert_path().display())?;
    Ok(())
}

fn show(args: &ShowArgs, out: &mut dyn Write) -> Result<(), PkiError> {
    let pki = DevPki::new(&args.dir.dir);
    let ca = load_ca(&pki)?;
    writeln!(out, "trust domain:   {}", ca.trust_domain())?;
    writeln!(out, "CA certificate: {}", pki.ca_cert_path().display())?;
    for (title, dir) in [
        ("gateways", pki.gateways_dir()),
        ("agents", pki.agents_dir()),
    ] {
        let certs = cert_files(&dir)?;
        if certs.is_empty() {
            writeln!(out, "{title}: none")?;
        } else {
            writeln!(out, "{title}:")?;
        }
        for cert in certs {
            let status = match load_cert_chain(&cert) {
                Ok(chain) => match chain.first().map(|leaf| ca.verify_issued(leaf)) {
                    Some(Ok(id)) => id.to_string(),
                    Some(Err(e)) => format!("INVALID ({e})"),
                    None => "INVALID (no certificate)".to_owned(),
                },
                Err(e) => format!("INVALID ({e})"),
            };
            let key_note = if cert.with_extension("key").exists() {
                ""
            } else {
                "  [key missing]"
            };
            writeln!(out, "  {status}  {}{key_note}", cert.display())?;
        }
    }
    Ok(())
}

fn load_ca(pki: &DevPki) -> Result<CertificateAuthority, PkiError> {
    if !pki.ca_cert_path().exists() {
        return Err(PkiError::NotInitialized {
            path: pki.ca_cert_path(),
        });
    }
    Ok(pki.load_ca()?)
}

fn cert_spiffe_id(path: &Path) -> Result<SpiffeId, PkiError> {
    let chain = load_cert_chain(path)?;
    // `load_cert_chain` never returns an empty chain.
    let leaf = chain.first().ok_or(IdentityError::NoCertificate {
        path: path.to_owned(),
    })?;
    Ok(spiffe_id_from_cert(leaf)?)
}

/// The `*.pem` files of `dir`, sorted; none if the directory does not exist.
fn cert_files(dir: &Path) -> Result<Vec<PathBuf>, PkiError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PkiError::ReadDir {
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut certs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PkiError::ReadDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|ext| ext == "pem") {
            certs.push(path);
        }
    }
    certs.sort();
    Ok(certs)
}
