//! The listener's TLS settings, from PEM files (a mounted Secret).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or holds nothing usable.
    #[error("cannot load {what} from {path}: {reason}")]
    Load {
        /// "the certificate chain" or "the private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why (never the key's bytes).
        reason: String,
    },
    /// rustls refused the pair (e.g. the key does not match the certificate).
    #[error("the TLS certificate and key cannot be used: {0}")]
    Config(#[from] rustls::Error),
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3) for the certificate
/// chain and key in `cert_file` and `key_file`.
pub fn server_config(cert_file: &Path, key_file: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let load_error = |what, path: &Path, reason: String| TlsError::Load {
        what,
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| load_error("the certificate chain", cert_file, err.to_string()))?;
    if certs.is_empty() {
        return Err(load_error(
            "the certificate chain",
            cert_file,
            "no CERTIFICATE block".to_owned(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|err| load_error("the private key", key_file, err.to_string()))?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}
