//! The TLS client configuration: trust exactly the CA given with `--ca`, and present a
//! device's client certificate under mutual TLS (`--client-certs`).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
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
    let verifier = ChainVerifiedOnce::new(roots, provider.clone())?;
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(Identity { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .context("unusable client certificate or key")?,
    };
    // Every simulated device is a separate machine: each pays for a full handshake (key
    // exchange, the gateway's signature), as a real fleet would, instead of resuming a
    // session another device started. Only the chain's verdict is shared ([`ChainVerifiedOnce`]).
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// How long a chain, once verified, is taken as verified (at most: never past a certificate's
/// expiry).
const CHAIN_VERDICT_LIFETIME: Duration = Duration::from_secs(60);

/// rustls' WebPKI verification of the gateway's certificate, with the chain checked once a
/// minute rather than on every handshake of the devices sharing a configuration.
///
/// A simulator process stands for thousands of devices that all receive the same chain; its
/// CPU shares the machine with the gateway under test, and verifying the chain's signature on
/// every handshake was a sixth of it while a fleet connected. Each handshake still verifies
/// the gateway's signature over that handshake with the key of the certificate checked here,
/// so a server without the certificate's private key is still refused; a chain that differs
/// in any byte, or another server name, is verified in full; and a verdict is not reused past
/// the time any certificate of the chain expires.
#[derive(Debug)]
struct ChainVerifiedOnce {
    webpki: Arc<WebPkiServerVerifier>,
    verified: Mutex<Option<Verdict>>,
}

/// The chain last verified, for whom, and the seconds (Unix time) the verdict holds for.
#[derive(Debug)]
struct Verdict {
    chain: Vec<CertificateDer<'static>>,
    name: ServerName<'static>,
    from: u64,
    until: u64,
}

impl ChainVerifiedOnce {
    fn new(roots: Arc<RootCertStore>, provider: Arc<CryptoProvider>) -> Result<ChainVerifiedOnce> {
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .context("TLS certificate verifier")?;
        Ok(ChainVerifiedOnce {
            webpki,
            verified: Mutex::new(None),
        })
    }

    fn is_verified(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.as_ref().is_some_and(|v| {
            (v.from..v.until).contains(&now.as_secs())
                && v.name == *name
                && v.chain.len() == intermediates.len() + 1
                && v.chain[0] == *end_entity
                && v.chain[1..] == *intermediates
        })
    }
}

/// The seconds (Unix time) within which every certificate of `chain` is valid; `None` if one
/// cannot be parsed (its verdict is then not kept).
fn validity(chain: &[CertificateDer<'_>]) -> Option<(u64, u64)> {
    chain.iter().try_fold((0, u64::MAX), |(from, until), cert| {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let validity = parsed.validity();
        let not_before = u64::try_from(validity.not_before.timestamp()).unwrap_or(0);
        // Valid through its `notAfter` second, as WebPKI reads it.
        let not_after = u64::try_from(validity.not_after.timestamp()).ok()?;
        Some((from.max(not_before), until.min(not_after.saturating_add(1))))
    })
}

impl ServerCertVerifier for ChainVerifiedOnce {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.is_verified(end_entity, intermediates, name, now) {
            return Ok(ServerCertVerified::assertion());
        }
        let verified =
            self.webpki
                .verify_server_cert(end_entity, intermediates, name, ocsp_response, now)?;
        let chain: Vec<_> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|cert| cert.clone().into_owned())
            .collect();
        if let Some((from, until)) = validity(&chain) {
            let until = until.min(now.as_secs() + CHAIN_VERDICT_LIFETIME.as_secs());
            *self.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some(Verdict {
                chain,
                name: name.to_owned(),
                from,
                until,
            });
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
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

    use rcgen::{
        date_time_ymd, BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair,
    };
    use rustls::server::{ClientHello, ResolvesServerCert};
    use rustls::sign::CertifiedKey;
    use rustls_pki_types::PrivatePkcs8KeyDer;

    /// 2030-01-01T00:00:00Z, when the short-lived test certificates expire.
    const EXPIRY: u64 = 1_893_456_000;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    fn ring() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A CA and the roots trusting it.
    fn new_ca() -> (CertifiedIssuer<'static, KeyPair>, Arc<RootCertStore>) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        (ca, Arc::new(roots))
    }

    /// A certificate for `localhost` signed by `ca`, valid until `expires` (if given).
    fn leaf(
        ca: &CertifiedIssuer<'static, KeyPair>,
        expires: Option<(i32, u8, u8)>,
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        if let Some((y, m, d)) = expires {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(y, m, d);
        }
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.der().clone(), key)
    }

    fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    #[test]
    fn a_verdict_is_reused_only_for_the_same_chain_and_name() {
        let (ca, roots) = new_ca();
        let (good, _) = leaf(&ca, None);
        let verifier = ChainVerifiedOnce::new(roots, ring()).unwrap();
        let now = UnixTime::now();
        assert!(!verifier.is_verified(&good, &[], &localhost(), now));
        verifier
            .verify_server_cert(&good, &[], &localhost(), &[], now)
            .unwrap();
        assert!(verifier.is_verified(&good, &[], &localhost(), now));

        // Another CA's certificate for the same name: verified in full, and refused.
        let (stranger, _) = leaf(&new_ca().0, None);
        assert!(!verifier.is_verified(&stranger, &[], &localhost(), now));
        verifier
            .verify_server_cert(&stranger, &[], &localhost(), &[], now)
            .unwrap_err();
        // The good chain for a name it does not hold: refused.
        let other = ServerName::try_from("other.example").unwrap();
        assert!(!verifier.is_verified(&good, &[], &other, now));
        verifier
            .verify_server_cert(&good, &[], &other, &[], now)
            .unwrap_err();
        // With an extra certificate sent along: not the chain verified.
        assert!(!verifier.is_verified(&good, &[ca.der().clone()], &localhost(), now));
        // A refusal leaves the last verdict as it was, for a minute.
        assert!(verifier.is_verified(&good, &[], &localhost(), now));
        let later = at(now.as_secs() + CHAIN_VERDICT_LIFETIME.as_secs());
        assert!(!verifier.is_verified(&good, &[], &localhost(), later));
    }

    #[test]
    fn a_verdict_is_not_reused_past_the_certificates_expiry() {
        let (ca, roots) = new_ca();
        let (cert, _) = leaf(&ca, Some((2030, 1, 1)));
        let verifier = ChainVerifiedOnce::new(roots, ring()).unwrap();
        verifier
            .verify_server_cert(&cert, &[], &localhost(), &[], at(EXPIRY - 30))
            .unwrap();
        // Within the minute, but the certificate has expired: verified again, and refused.
        let error = verifier
            .verify_server_cert(&cert, &[], &localhost(), &[], at(EXPIRY + 10))
            .unwrap_err();
        assert!(
            matches!(
                error,
                rustls::Error::InvalidCertificate(rustls::CertificateError::ExpiredContext { .. })
                    | rustls::Error::InvalidCertificate(rustls::CertificateError::Expired)
            ),
            "{error:?}"
        );
    }

    /// Serves a fixed certificate and key, whether or not they belong together.
    #[derive(Debug)]
    struct Fixed(Arc<CertifiedKey>);

    impl ResolvesServerCert for Fixed {
        fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
            Some(self.0.clone())
        }
    }

    fn server(cert: &CertificateDer<'static>, key: &KeyPair) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let key = ring().key_provider.load_private_key(key).unwrap();
        let certified = CertifiedKey::new(vec![cert.clone()], key);
        let config = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
        Arc::new(config)
    }

    /// An in-memory handshake; the client's error if it fails.
    fn handshake(
        client: &Arc<ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(client.clone(), localhost())?;
        let mut s = rustls::ServerConnection::new(server).unwrap();
        while c.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            if s.process_new_packets().is_err() {
                break;
            }
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        Ok(())
    }

    #[test]
    fn a_server_without_the_certificates_key_is_refused_after_its_chain_was_verified() {
        let (ca, roots) = new_ca();
        let (cert, key) = leaf(&ca, None);
        let client = Arc::new(client_config(roots, None).unwrap());
        handshake(&client, server(&cert, &key)).unwrap();
        handshake(&client, server(&cert, &key)).unwrap();

        // The same certificate, but signing with another key.
        let impostor = server(&cert, &KeyPair::generate().unwrap());
        let error = handshake(&client, impostor).unwrap_err();
        assert!(
            matches!(
                error,
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature)
            ),
            "{error:?}"
        );
        handshake(&client, server(&cert, &key)).unwrap();
    }
}
