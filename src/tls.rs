//! TLS set-up for `fleetgate up`: the certificate to serve (MQTT over TLS,
//! HTTPS and the PostgreSQL wire endpoint alike).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

/// Paths of a certificate chain and key to serve, and (for `--dev-tls`) the
/// CA that clients should trust.
pub struct Identity {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: Option<PathBuf>,
}

/// A development CA and a certificate it signed for localhost, 127.0.0.1
/// and ::1, kept in `<data>/dev-tls/` and reused on later starts. Clients
/// trust `ca.pem` (e.g. `mosquitto_pub --cafile`); nothing else trusts it.
pub fn dev_identity(data_dir: &Path) -> anyhow::Result<Identity> {
    let dir = data_dir.join("dev-tls");
    let identity = Identity {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
        ca: Some(dir.join("ca.pem")),
    };
    if identity.cert.exists() && identity.key.exists() && dir.join("ca.pem").exists() {
        return Ok(identity);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fleetgate development CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let mut leaf_params = CertificateParams::new(vec!["localhost".to_string()])?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf_params.subject_alt_names.extend([
        SanType::IpAddress("127.0.0.1".parse().expect("literal")),
        SanType::IpAddress("::1".parse().expect("literal")),
    ]);
    let leaf_key = KeyPair::generate()?;
    let leaf = leaf_params.signed_by(&leaf_key, &ca)?;
    let private = |path: &Path, text: String| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        file.write_all(text.as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))
    };
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(&identity.cert, format!("{}{}", leaf.pem(), ca.pem()))?;
    private(&identity.key, leaf_key.serialize_pem())?;
    Ok(identity)
}

pub fn identity_from_flags(
    cert: Option<&Path>,
    key: Option<&Path>,
    dev: bool,
    data_dir: &Path,
) -> anyhow::Result<Option<Identity>> {
    match (cert, key, dev) {
        (Some(cert), Some(key), false) => Ok(Some(Identity {
            cert: cert.into(),
            key: key.into(),
            ca: None,
        })),
        (None, None, true) => dev_identity(data_dir).map(Some),
        (None, None, false) => Ok(None),
        (_, _, true) => Err(anyhow!(
            "--dev-tls generates its own certificate; drop --cert/--key or --dev-tls"
        )),
        _ => Err(anyhow!("--cert and --key go together")),
    }
}
