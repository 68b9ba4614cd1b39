//! TLS for the listener (`meshwire serve --tls-cert FILE --tls-key FILE`):
//! rustls with the ring provider, TLS 1.2 and 1.3, HTTP/1.1 (WebSocket
//! upgrades included) over it.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The certificate and key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The certificate PEM holds no `CERTIFICATE` block, or a bad one.
    #[error("no usable certificate in the certificate PEM ({0})")]
    Certificate(String),
    /// The key PEM holds no private key (PKCS#8, PKCS#1 or SEC1), or a bad one.
    #[error("no usable private key in the key PEM ({0})")]
    Key(String),
    /// rustls refused the pair (for example a key that does not match the
    /// certificate).
    #[error("the certificate and key are not usable together: {0}")]
    Config(String),
}

/// A TLS server configuration for [`RunningServer::spawn_tls`](crate::RunningServer::spawn_tls).
/// The key material lives inside rustls; this type never prints it.
#[derive(Clone)]
pub struct TlsConfig(pub(crate) Arc<rustls::ServerConfig>);

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsConfig(<certificate and key>)")
    }
}

impl TlsConfig {
    /// From a PEM certificate chain (leaf first) and a PEM private key.
    pub fn from_pem(cert_chain: &[u8], key: &[u8]) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_slice_iter(cert_chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        if chain.is_empty() {
            return Err(TlsError::Certificate("no CERTIFICATE block".to_owned()));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| TlsError::Key(e.to_string()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self(Arc::new(config)))
    }

    /// From PEM files.
    pub fn from_pem_files(cert_chain: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.display().to_string(),
                source,
            })
        };
        let key_pem = zeroize::Zeroizing::new(read(key)?);
        Self::from_pem(&read(cert_chain)?, &key_pem)
    }
}
