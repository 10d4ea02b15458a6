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

/// A connector for devices that trust `verifier`, presenting `identity` when the server asks
/// for one.
pub fn connector_for(
    verifier: Arc<ChainVerifiedOnce>,
    identity: Option<Identity>,
) -> Result<TlsConnector> {
    Ok(TlsConnector::from(Arc::new(client_config(
        verifier, identity,
    )?)))
}

/// The client configuration of [`connector_for`].
pub fn client_config(
    verifier: Arc<ChainVerifiedOnce>,
    identity: Option<Identity>,
) -> Result<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some(Identity { chain, key }) => builder
            .with_client_auth_cert(chain, key)
            .context("unusable client certificate or key")?,
    };
    // Every simulated device is a separate machine: each pays for a full handshake (key
    // exchange, the gateway's signature over it), as a real fleet would, instead of resuming
    // a session another device started. Only the verdict on the chain is shared.
    config.resumption = Resumption::disabled();
    Ok(config)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How long a verdict on a chain is reused: at most this long after the verification, and
/// never outside the validity of a certificate of the chain.
const CHAIN_VERDICT_LIFETIME: Duration = Duration::from_secs(60);

/// rustls' WebPKI verification of the gateway's certificate, with the chain verified at most
/// once a minute for all the devices of a process, rather than on every handshake.
///
/// A simulator process stands for thousands of devices that all receive the same chain, and
/// its CPU shares the machine with the gateway under test: verifying the chain (the
/// signatures along it, the path to the CA, the name) on every handshake took a sixth of
/// the load generator's CPU while a fleet connected. Each handshake still verifies the
/// gateway's signature over that handshake with the key of the certificate checked here, so
/// a server without the certificate's private key is still refused. Only the last chain
/// verified is remembered: another chain (differing in any byte) or another server name is
/// verified in full.
#[derive(Debug)]
pub struct ChainVerifiedOnce {
    webpki: Arc<WebPkiServerVerifier>,
    verified: Mutex<Option<Verdict>>,
}

/// The chain last verified, for whom, and the seconds (Unix time, `from..until`) in which its
/// verdict is reused.
struct Verdict {
    end_entity: CertificateDer<'static>,
    intermediates: Vec<CertificateDer<'static>>,
    name: ServerName<'static>,
    from: u64,
    until: u64,
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verdict")
            .field("name", &self.name)
            .field("from", &self.from)
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

impl ChainVerifiedOnce {
    /// Trusts exactly the CA certificates in `roots`.
    pub fn new(roots: Arc<RootCertStore>) -> Result<Arc<ChainVerifiedOnce>> {
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .context("TLS certificate verifier")?;
        Ok(Arc::new(ChainVerifiedOnce {
            webpki,
            verified: Mutex::new(None),
        }))
    }

    fn is_verified(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        now: UnixTime,
    ) -> bool {
        // Held only to compare, or to replace the whole verdict: a panic cannot leave it half
        // written.
        let verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
        verified.as_ref().is_some_and(|v| {
            (v.from..v.until).contains(&now.as_secs())
                && v.name == *name
                && v.end_entity == *end_entity
                && v.intermediates == intermediates
        })
    }
}

/// The first second (Unix time) at which a certificate of `chain` has expired; `None` if one
/// cannot be parsed (its verdict is then not kept). Each was valid when it was verified, so
/// the `notBefore` times are behind.
fn expiry(chain: &[&CertificateDer<'_>]) -> Option<u64> {
    chain.iter().try_fold(u64::MAX, |until, cert| {
        let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        // Valid through its `notAfter` second, as WebPKI reads it.
        let not_after = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
        Some(until.min(not_after.saturating_add(1)))
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
        let chain: Vec<_> = std::iter::once(end_entity).chain(intermediates).collect();
        if let Some(expiry) = expiry(&chain) {
            let now = now.as_secs();
            *self.verified.lock().unwrap_or_else(|e| e.into_inner()) = Some(Verdict {
                end_entity: end_entity.clone().into_owned(),
                intermediates: intermediates
                    .iter()
                    .map(|c| c.clone().into_owned())
                    .collect(),
                name: name.to_owned(),
                // Not before now: a clock set back does not stretch the minute.
                from: now,
                until: expiry.min(now.saturating_add(CHAIN_VERDICT_LIFETIME.as_secs())),
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

    fn requires_raw_public_keys(&self) -> bool {
        self.webpki.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[rustls::DistinguishedName]> {
        self.webpki.root_hint_subjects()
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
    use rustls::{CertificateError, SupportedProtocolVersion};
    use rustls_pki_types::PrivatePkcs8KeyDer;

    /// 2030-01-01T00:00:00Z, when the test certificates given an expiry expire.
    const EXPIRY: u64 = 1_893_456_000;

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
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

    /// A certificate for `localhost` signed by `ca`, valid from 2020 to [`EXPIRY`] if
    /// `expires`.
    fn leaf(
        ca: &CertifiedIssuer<'static, KeyPair>,
        expires: bool,
    ) -> (CertificateDer<'static>, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        if expires {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2030, 1, 1);
        }
        let cert = params.signed_by(&key, ca).unwrap();
        (cert.der().clone(), key)
    }

    fn localhost() -> ServerName<'static> {
        ServerName::try_from("localhost").unwrap()
    }

    #[test]
    fn a_verdict_is_reused_only_for_the_same_chain_and_name_within_a_minute() {
        let (ca, roots) = new_ca();
        let (good, _) = leaf(&ca, false);
        let verifier = ChainVerifiedOnce::new(roots).unwrap();
        let now = UnixTime::now();
        assert!(!verifier.is_verified(&good, &[], &localhost(), now));
        verifier
            .verify_server_cert(&good, &[], &localhost(), &[], now)
            .unwrap();
        assert!(verifier.is_verified(&good, &[], &localhost(), now));

        // Another CA's certificate for the same name: verified in full, and refused.
        let (stranger, _) = leaf(&new_ca().0, false);
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
        // A refusal leaves the last verdict as it was, for its minute; a clock set back does
        // not find it either.
        let secs = now.as_secs();
        assert!(verifier.is_verified(&good, &[], &localhost(), at(secs + 59)));
        assert!(!verifier.is_verified(&good, &[], &localhost(), at(secs + 60)));
        assert!(!verifier.is_verified(&good, &[], &localhost(), at(secs - 1)));
    }

    #[test]
    fn a_verdict_is_not_reused_past_the_certificates_expiry() {
        let (ca, roots) = new_ca();
        let (cert, _) = leaf(&ca, true);
        let verifier = ChainVerifiedOnce::new(roots).unwrap();
        verifier
            .verify_server_cert(&cert, &[], &localhost(), &[], at(EXPIRY - 30))
            .unwrap();
        // Valid through its `notAfter` second, as WebPKI has it; expired one second later,
        // well within the minute.
        assert!(verifier.is_verified(&cert, &[], &localhost(), at(EXPIRY)));
        assert!(!verifier.is_verified(&cert, &[], &localhost(), at(EXPIRY + 1)));
        let error = verifier
            .verify_server_cert(&cert, &[], &localhost(), &[], at(EXPIRY + 1))
            .unwrap_err();
        assert!(
            matches!(
                error,
                rustls::Error::InvalidCertificate(
                    CertificateError::ExpiredContext { .. } | CertificateError::Expired
                )
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

    fn server(
        version: &'static SupportedProtocolVersion,
        cert: &CertificateDer<'static>,
        key: &KeyPair,
    ) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let key = provider().key_provider.load_private_key(key).unwrap();
        let certified = CertifiedKey::new(vec![cert.clone()], key);
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Fixed(Arc::new(certified))));
        Arc::new(config)
    }

    /// An in-memory handshake to its end; the first error, the client's or the server's.
    fn handshake(
        client: &Arc<ClientConfig>,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(), rustls::Error> {
        let mut c = rustls::ClientConnection::new(client.clone(), localhost())?;
        let mut s = rustls::ServerConnection::new(server)?;
        while c.is_handshaking() || s.is_handshaking() {
            let mut wire = Vec::new();
            c.write_tls(&mut wire).unwrap();
            s.read_tls(&mut wire.as_slice()).unwrap();
            s.process_new_packets()?;
            wire.clear();
            s.write_tls(&mut wire).unwrap();
            c.read_tls(&mut wire.as_slice()).unwrap();
            c.process_new_packets()?;
        }
        Ok(())
    }

    #[test]
    fn a_server_without_the_certificates_key_is_refused_after_its_chain_was_verified() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (ca, roots) = new_ca();
            let (cert, key) = leaf(&ca, false);
            let verifier = ChainVerifiedOnce::new(roots).unwrap();
            let client = Arc::new(client_config(verifier.clone(), None).unwrap());
            handshake(&client, server(version, &cert, &key)).unwrap();
            assert!(verifier.is_verified(&cert, &[], &localhost(), UnixTime::now()));

            // The same certificate, but signing with another key.
            let impostor = server(version, &cert, &KeyPair::generate().unwrap());
            let error = handshake(&client, impostor).unwrap_err();
            assert!(
                matches!(
                    error,
                    rustls::Error::InvalidCertificate(CertificateError::BadSignature)
                ),
                "{version:?}: {error:?}"
            );
            handshake(&client, server(version, &cert, &key)).unwrap();
        }
    }
}
