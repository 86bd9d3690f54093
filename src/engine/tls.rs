//! HTTPS without a reverse proxy in front: `[server.tls]` PEM files (re-read on SIGHUP, so a
//! renewed certificate is picked up without a restart), or `[server.acme]`, a certificate
//! obtained and renewed from Let's Encrypt (or another ACME directory) with poem's ACME
//! client over the TLS-ALPN-01 challenge, which is answered on this same port.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use poem::listener::acme::{
    issue_cert, seconds_until_expiry, AcmeClient, ChallengeType, ResolveServerCert,
};
use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::{AcmeConfig, ServerConfig, TlsConfig};

/// The ALPN protocol of the ACME TLS-ALPN-01 challenge (RFC 8737).
pub(crate) const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// Renew when the certificate has less than this left.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the renewal task looks at the certificate (and retries a failed renewal).
const RENEW_CHECK_EVERY: Duration = Duration::from_secs(3600);
/// The retry while there is no certificate at all: soon, but within Let's Encrypt's limit of
/// 5 failed validations per hostname and hour.
const FIRST_CERT_RETRY: Duration = Duration::from_secs(15 * 60);

/// The TLS side of the listener.
pub struct Tls {
    acceptor: ArcSwap<TlsAcceptor>,
    source: Source,
}

enum Source {
    Files(TlsConfig),
    Acme,
}

impl Tls {
    /// TLS as `[server]` configures it, or `None` for plain HTTP. ACME starts its renewal
    /// task, so call this inside the runtime.
    pub fn from_config(server: &ServerConfig) -> Result<Option<Arc<Tls>>, String> {
        if let Some(files) = &server.tls {
            let acceptor = acceptor_from_files(files)?;
            return Ok(Some(Arc::new(Tls {
                acceptor: ArcSwap::from_pointee(acceptor),
                source: Source::Files(files.clone()),
            })));
        }
        if let Some(acme) = &server.acme {
            let resolver = Arc::new(ResolveServerCert::default());
            load_cached(acme, &resolver);
            tokio::spawn(renew(acme.clone(), Arc::clone(&resolver)));
            let mut alpn = alpn_protocols();
            alpn.push(ACME_TLS_ALPN.to_vec());
            let acceptor = acceptor_with(resolver, alpn)?;
            return Ok(Some(Arc::new(Tls {
                acceptor: ArcSwap::from_pointee(acceptor),
                source: Source::Acme,
            })));
        }
        Ok(None)
    }

    /// Loads `[server.tls]` files, if set, without serving: for `--check`.
    pub fn check(server: &ServerConfig) -> Result<(), String> {
        match &server.tls {
            Some(files) => acceptor_from_files(files).map(drop),
            None => Ok(()),
        }
    }

    /// The acceptor for the next connection.
    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Re-reads the certificate and key files; on error the current pair stays in use.
    pub fn reload(&self) -> Result<(), String> {
        match &self.source {
            Source::Files(files) => {
                let acceptor = acceptor_from_files(files)?;
                self.acceptor.store(Arc::new(acceptor));
                Ok(())
            }
            // The renewal task swaps ACME certificates by itself.
            Source::Acme => Ok(()),
        }
    }
}

fn alpn_protocols() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn acceptor_with(
    resolver: Arc<dyn ResolvesServerCert>,
    alpn: Vec<Vec<u8>>,
) -> Result<TlsAcceptor, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|err| format!("TLS: {err}"))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A fixed certificate chain and key, checked to belong together.
#[derive(Debug)]
struct FixedCert(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

fn acceptor_from_files(files: &TlsConfig) -> Result<TlsAcceptor, String> {
    let chain = read_chain("server.tls.cert", &files.cert)?;
    let key = read_key("server.tls.key", &files.key)?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|err| {
            format!(
                "server.tls.key: {} is not a usable private key: {err}",
                files.key.display()
            )
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    certified.keys_match().map_err(|err| {
        format!(
            "server.tls: the key in {} does not belong to the certificate in {}: {err}",
            files.key.display(),
            files.cert.display()
        )
    })?;
    acceptor_with(Arc::new(FixedCert(Arc::new(certified))), alpn_protocols())
}

/// Reads a PEM certificate chain; `setting` names where the path came from, for messages.
fn read_chain(setting: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|err| format!("{setting}: cannot read {}: {err}", path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "{setting}: {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(chain)
}

fn read_key(setting: &str, path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    // The error never quotes the file: it holds the private key.
    PrivateKeyDer::from_pem_file(path).map_err(|err| {
        format!(
            "{setting}: cannot read a PEM private key from {}: {err}",
            path.display()
        )
    })
}

/// Puts the cached certificate, if any, in place at start-up.
fn load_cached(acme: &AcmeConfig, resolver: &ResolveServerCert) {
    let cert = acme.cache_dir.join("cert.pem");
    let key = acme.cache_dir.join("key.pem");
    let loaded = read_chain("server.acme.cache_dir", &cert).and_then(|chain| {
        let key = read_key("server.acme.cache_dir", &key)?;
        let signing_key = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|err| err.to_string())?;
        Ok(CertifiedKey::new(chain, signing_key))
    });
    match loaded {
        Ok(certified) => {
            tracing::info!(
                cache = %acme.cache_dir.display(),
                expires_in_days = seconds_until_expiry(&certified) / 86_400,
                "ACME: using the cached certificate"
            );
            *resolver.cert.write() = Some(Arc::new(certified));
        }
        Err(err) => tracing::info!(
            cache = %acme.cache_dir.display(),
            reason = %err,
            "ACME: no usable cached certificate; requesting one"
        ),
    }
}

/// Obtains the certificate when there is none or it is within [`RENEW_BEFORE`] of expiry,
/// writes it to the cache, and checks again every hour (every 15 minutes while there is
/// none).
async fn renew(acme: AcmeConfig, resolver: Arc<ResolveServerCert>) {
    let mut client = None;
    loop {
        let due = resolver.cert.read().as_ref().is_none_or(|cert| {
            seconds_until_expiry(cert) < i64::try_from(RENEW_BEFORE.as_secs()).unwrap_or(0)
        });
        if due {
            if let Err(err) = issue(&acme, &resolver, &mut client).await {
                tracing::error!(error = %err, "ACME: cannot obtain a certificate; will retry");
            }
        }
        let wait = if resolver.cert.read().is_some() {
            RENEW_CHECK_EVERY
        } else {
            FIRST_CERT_RETRY
        };
        tokio::time::sleep(wait).await;
    }
}

async fn issue(
    acme: &AcmeConfig,
    resolver: &ResolveServerCert,
    client: &mut Option<AcmeClient>,
) -> Result<(), String> {
    let client = match client {
        Some(client) => client,
        None => client.insert(
            AcmeClient::try_new(acme.directory.as_str(), acme.contacts.clone())
                .await
                .map_err(|err| format!("directory {}: {err}", acme.directory))?,
        ),
    };
    let issued = issue_cert(
        client,
        resolver,
        &acme.domains,
        ChallengeType::TlsAlpn01,
        None,
    )
    .await
    .map_err(|err| err.to_string())?;
    *resolver.cert.write() = Some(issued.rustls_key);
    std::fs::create_dir_all(&acme.cache_dir)
        .and_then(|()| {
            write_private(
                &acme.cache_dir.join("key.pem"),
                issued.private_pem.as_bytes(),
            )
        })
        .and_then(|()| std::fs::write(acme.cache_dir.join("cert.pem"), issued.public_pem))
        .map_err(|err| {
            format!(
                "certificate obtained but not cached in {}: {err}",
                acme.cache_dir.display()
            )
        })?;
    tracing::info!(domains = ?acme.domains, "ACME: certificate obtained");
    Ok(())
}

/// Writes a private key readable by this user only.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(data)
}
