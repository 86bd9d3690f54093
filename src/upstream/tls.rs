//! The TLS client settings for upstream connections: Mozilla's roots (webpki-roots) and the
//! system's, with ring. Read once per manifest, since reading the system's store costs
//! milliseconds.

use std::sync::Arc;

use crate::config::ConfigError;

pub(crate) fn client_config() -> Result<rustls::ClientConfig, ConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // The system's store too, so a private CA installed on the host (or named by
    // SSL_CERT_FILE) is honoured. Unreadable certificates are skipped.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|err| ConfigError::Invalid(vec![format!("TLS setup failed: {err}")]))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}
