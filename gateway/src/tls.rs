//! TLS: the rustls `ServerConfig`, built once, from configured PEM files or a generated development CA.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no usable PEM private key found")]
    NoKey { path: PathBuf },
    #[error("cannot write development certificates to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate development certificates: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("device CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
}

/// File names of the development certificates inside the certs folder.
pub const DEV_CA_CERT: &str = "ca.pem";
const DEV_CA_KEY: &str = "ca-key.pem";
const DEV_SERVER_CERT: &str = "server.pem";
const DEV_SERVER_KEY: &str = "server-key.pem";

/// A certificate chain and its key, as PEM file paths.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA devices must trust, when the gateway generated it.
    pub dev_ca: Option<PathBuf>,
}

/// Uses the configured files, or generates a development CA and server certificate in `certs_dir`
/// (reused on later starts).
pub fn resolve_cert_files(
    cert: Option<&Path>,
    key: Option<&Path>,
    certs_dir: &Path,
) -> Result<CertFiles, TlsError> {
    if let (Some(cert), Some(key)) = (cert, key) {
        return Ok(CertFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            dev_ca: None,
        });
    }
    let files = CertFiles {
        cert: certs_dir.join(DEV_SERVER_CERT),
        key: certs_dir.join(DEV_SERVER_KEY),
        dev_ca: Some(certs_dir.join(DEV_CA_CERT)),
    };
    let complete = [DEV_CA_CERT, DEV_CA_KEY, DEV_SERVER_CERT, DEV_SERVER_KEY]
        .iter()
        .all(|f| certs_dir.join(f).is_file());
    if !complete {
        generate_dev_certs(certs_dir)?;
        tracing::info!(dir = %certs_dir.display(), "generated a development CA and server certificate");
    }
    Ok(files)
}

pub(crate) fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), TlsError> {
    let err = |source| TlsError::Write {
        path: path.to_owned(),
        source,
    };
    std::fs::write(path, contents).map_err(err)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

/// A CA certificate's parameters (no intermediates below it); validity is the caller's.
pub(crate) fn ca_params(common_name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Generates `ca.pem`, `ca-key.pem`, `server.pem` and `server-key.pem` (ECDSA P-256).
pub fn generate_dev_certs(dir: &Path) -> Result<(), TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let year = chrono::Utc::now().year();

    let mut ca_params = ca_params("iot-gateway development CA")?;
    ca_params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    ca_params.not_after = rcgen::date_time_ymd(year + 10, 1, 1);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names = vec!["localhost".to_string()];
    if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
        let host = host.trim();
        if !host.is_empty() && host != "localhost" {
            names.push(host.to_string());
        }
    }
    let mut server_params = CertificateParams::new(names)?;
    for ip in ["127.0.0.1", "::1"] {
        server_params
            .subject_alt_names
            .push(SanType::IpAddress(ip.parse().expect("literal IP")));
    }
    server_params
        .distinguished_name
        .push(DnType::CommonName, "iot-gateway development server");
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    server_params.not_after = rcgen::date_time_ymd(year + 2, 1, 1);
    let server_key = KeyPair::generate()?;
    let issuer = Issuer::new(ca_params, ca_key);
    let server_cert = server_params.signed_by(&server_key, &issuer)?;

    write_file(&dir.join(DEV_CA_KEY), &issuer.key().serialize_pem(), true)?;
    write_file(&dir.join(DEV_CA_CERT), &ca_cert.pem(), false)?;
    write_file(&dir.join(DEV_SERVER_KEY), &server_key.serialize_pem(), true)?;
    // The chain: server certificate first, then the CA.
    let chain = format!("{}{}", server_cert.pem(), ca_cert.pem());
    write_file(&dir.join(DEV_SERVER_CERT), &chain, false)?;
    Ok(())
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads every certificate of a PEM chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

/// The ring crypto provider, the only one compiled in.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The provider the servers use: ring's suites with AES-128-GCM preferred.
///
/// AES-128 is as safe a choice as AES-256 here, and cheaper for a gateway that makes
/// thousands of handshakes in a burst: its SHA-256 key schedule runs on the CPU's SHA
/// instructions where SHA-384 has none, and its records cost fewer AES rounds.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    // A stable sort on "is not AES-128": each version's AES-128-GCM suite moves to its front.
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    Arc::new(provider)
}

/// Builds the server configuration: TLS 1.2 and 1.3 only, HTTP/1.1 via ALPN when asked.
///
/// With `client_ca`, client certificates are requested: one that does not chain to that CA,
/// or has expired, fails the handshake. A client may still send none (and then authenticate
/// with a token), so token and certificate devices share one listener.
pub fn server_config(
    files: &CertFiles,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let builder = ServerConfig::builder_with_provider(server_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in load_certs(path)? {
                roots.add(ca)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::ClientCa {
                    path: path.to_owned(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Ours, not the client's: most clients (rustls, OpenSSL) list AES-256 first.
    config.ignore_client_order = true;
    // No session resumption. rustls' default keeps 256 sessions and sends two TLS 1.3
    // tickets per handshake: at fleet size a device's session is evicted long before it
    // reconnects (its connection is meant to last), and the tickets cost every handshake a
    // record and a send of their own (measured: 4 -> 3 sends and 10.8 -> 4.8 `getrandom`
    // calls per connection while a fleet connects).
    config.send_tls13_tickets = 0;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Ok(Arc::new(config))
}

/// The device id a client certificate names: its subject's CN (`None` if it has none, or
/// the certificate cannot be parsed; it was verified by rustls before this is asked).
pub fn device_id_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_dev_certs_load_and_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        let files = resolve_cert_files(None, None, &certs).unwrap();
        assert_eq!(
            files.dev_ca.as_deref(),
            Some(certs.join("ca.pem").as_path())
        );
        server_config(&files, None).unwrap();
        let first = std::fs::read(&files.cert).unwrap();
        let again = resolve_cert_files(None, None, &certs).unwrap();
        assert_eq!(
            std::fs::read(&again.cert).unwrap(),
            first,
            "reused, not regenerated"
        );
        assert_eq!(
            load_certs(&files.cert).unwrap().len(),
            2,
            "chain holds the CA"
        );
    }

    #[test]
    fn configured_files_are_used_as_given() {
        let dir = tempfile::tempdir().unwrap();
        let files = resolve_cert_files(
            Some(&dir.path().join("c.pem")),
            Some(&dir.path().join("k.pem")),
            dir.path(),
        )
        .unwrap();
        assert!(files.dev_ca.is_none());
        assert!(matches!(
            server_config(&files, None),
            Err(TlsError::Read { .. })
        ));
    }

    /// A client that lists AES-256 first (rustls' default, like OpenSSL's) gets AES-128.
    #[test]
    fn the_server_picks_aes_128_whatever_the_clients_order() {
        let dir = tempfile::tempdir().unwrap();
        let files = resolve_cert_files(None, None, dir.path()).unwrap();
        let server = server_config(&files, None).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in load_certs(files.dev_ca.as_deref().unwrap()).unwrap() {
            roots.add(ca).unwrap();
        }
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            let name = "localhost".try_into().unwrap();
            let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
            let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
            while c.is_handshaking() || s.is_handshaking() {
                let mut wire = Vec::new();
                c.write_tls(&mut wire).unwrap();
                s.read_tls(&mut wire.as_slice()).unwrap();
                s.process_new_packets().unwrap();
                wire.clear();
                s.write_tls(&mut wire).unwrap();
                c.read_tls(&mut wire.as_slice()).unwrap();
                c.process_new_packets().unwrap();
            }
            let suite = s.negotiated_cipher_suite().unwrap().suite();
            assert!(
                matches!(
                    suite,
                    rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
                        | rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                ),
                "{suite:?}"
            );
        }
    }
}
