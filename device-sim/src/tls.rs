//! The TLS client configuration: trust exactly the CA given with `--ca`, and present a
//! device's client certificate under mutual TLS (`--client-certs`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::Resumption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsConnector;

/// The CA certificates in the PEM file at `ca`.
pub fn roots(ca: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading CA file {}", ca.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("parsing CA file {}", ca.display()))?;
        roots
            .add(cert)
            .with_context(|| format!("CA file {} holds an unusable certificate", ca.display()))?;
    }
    if roots.is_empty() {
        bail!("CA file {} holds no certificate", ca.display());
    }
    Ok(roots)
}

/// A device's client certificate (chain) and key, for mutual TLS.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// `{dir}/{id}.pem` and `{dir}/{id}-key.pem`, as `gateway certs device` writes them.
    pub fn load(dir: &Path, id: &str) -> Result<Identity> {
        let cert = dir.join(format!("{id}.pem"));
        let key = dir.join(format!("{id}-key.pem"));
        let chain = CertificateDer::pem_file_iter(&cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .with_context(|| format!("reading client certificate {}", cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&key)
            .with_context(|| format!("reading client key {}", key.display()))?;
        Ok(Identity { chain, key })
    }
}

/// A connector trusting `roots`, presenting `identity` when the server asks for one.
pub fn connector_for(
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
) -> Result<TlsConnector> {
    Ok(TlsConnector::from(Arc::new(client_config(
        roots, identity,
    )?)))
}

/// The client configuration of [`connector_for`] (also what the MQTT client is given).
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<Identity>,
) -> Result<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(Identity { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .context("unusable client certificate or key")?,
    };
    // Every simulated device is a separate machine: each pays for a full handshake,
    // as a real fleet would, instead of resuming a session another device started.
    config.resumption = Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_empty_ca_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let error = roots(&missing).err().unwrap();
        assert!(format!("{error:#}").contains("nope.pem"), "{error:#}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(roots(&empty).is_err());
    }
}
