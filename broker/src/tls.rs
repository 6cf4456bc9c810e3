//! TLS for the gatekeeper's MQTT listener, and for the HTTP API.
//!
//! Every handshake runs in a task of its own with a deadline, never in the
//! accept loop: one silent or slow client must not hold up anyone else's
//! handshake (rumqttd's own TLS accept loop has exactly that flaw).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
pub use tokio_rustls::server::TlsStream;
pub use tokio_rustls::TlsAcceptor;

/// A server configuration from a PEM certificate chain and private key.
pub fn acceptor_from_pem(cert_path: &Path, key_path: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("cannot read certificates from {}: {e}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", cert_path.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", key_path.display()))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| {
                format!(
                    "certificate {} and key {} do not make a TLS identity: {e}",
                    cert_path.display(),
                    key_path.display()
                )
            })?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Connections whose TLS handshake has completed, in the order they did.
pub struct TlsIncoming {
    completed: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    accept_loop: JoinHandle<()>,
}

impl TlsIncoming {
    /// At most `max_handshakes` handshakes run at once: a connection beyond
    /// that is closed at once rather than given a task, so a flood of
    /// silent sockets costs bounded memory (and ends at the deadline).
    pub fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        handshake_timeout: Duration,
        max_handshakes: usize,
    ) -> io::Result<TlsIncoming> {
        let local = listener.local_addr()?;
        let (tx, completed) = mpsc::channel(1024);
        let handshakes = Arc::new(Semaphore::new(max_handshakes));
        let accept_loop = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, max_handshakes, "too many TLS handshakes at once; connection closed");
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsIncoming {
            completed,
            local,
            accept_loop,
        })
    }

    /// The next connection with a completed handshake.
    pub async fn accept(&mut self) -> Option<(TlsStream<TcpStream>, SocketAddr)> {
        self.completed.recv().await
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}
