//! TLS for devices that can do secure transfer: HTTPS for the handshake and
//! API calls, MQTT over TLS to the gatekeeper, both trusting the CA the
//! device was flashed with.

use std::sync::Arc;

use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use crate::{DeviceConfig, SdkError};

/// A rustls client configuration trusting only the certificates in `ca_pem`.
pub fn client_config(ca_pem: &[u8]) -> Result<Arc<ClientConfig>, SdkError> {
    let invalid = |e: String| SdkError::Invalid(format!("CA certificate: {e}"));
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| invalid(e.to_string()))?)
            .map_err(|e| invalid(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(invalid("no certificate in the PEM".into()));
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether the device talks to the platform over TLS (an `https://` server).
pub fn secure(config: &DeviceConfig) -> bool {
    config.server.starts_with("https://")
}

/// The TLS configuration a secure device uses; `None` for plain HTTP.
pub fn for_device(config: &DeviceConfig) -> Result<Option<Arc<ClientConfig>>, SdkError> {
    if !secure(config) {
        return Ok(None);
    }
    let ca = config.ca_pem.as_deref().ok_or_else(|| {
        SdkError::Invalid("an https:// server needs the CA certificate (ca_pem)".into())
    })?;
    client_config(ca).map(Some)
}

/// The HTTP client for the platform's API, over TLS when the server is https.
pub fn http_client(config: &DeviceConfig) -> Result<reqwest::Client, SdkError> {
    let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
    if let Some(tls) = for_device(config)? {
        builder = builder.use_preconfigured_tls((*tls).clone());
    }
    builder
        .build()
        .map_err(|e| SdkError::Network(e.to_string()))
}
