//! Certificates for mutual TLS with devices: a device CA, and client certificates signed by
//! it whose subject CN is the device id. What `gateway certs` runs; built on rcgen.

use std::path::{Path, PathBuf};

use chrono::{Datelike, Days, NaiveDate, Utc};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose};

use crate::api::valid_device_id;
use crate::tls::{write_file, TlsError};

/// File name of the device CA certificate (what `--device-ca` is given).
pub const DEVICE_CA_CERT: &str = "device-ca.pem";
/// File name of the device CA's private key.
pub const DEVICE_CA_KEY: &str = "device-ca-key.pem";

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error(
        "{0} exists; delete it first to make a new device CA (certificates it signed stop working)"
    )]
    Exists(PathBuf),
    #[error("`{0}` is not a device id ([A-Za-z0-9][A-Za-z0-9._:-]{{0,127}})")]
    BadId(String),
    #[error("--days must be between 1 and 36500")]
    BadDays,
    #[error("cannot read the device CA {path} (make one with `gateway certs ca`): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable CA certificate or key: {source}")]
    BadCa { path: PathBuf, source: rcgen::Error },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot make the certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Validity from yesterday (clocks differ) to `days` from today.
fn validity(params: &mut CertificateParams, days: u32) -> Result<(), CertsError> {
    if !(1..=36_500).contains(&days) {
        return Err(CertsError::BadDays);
    }
    let today = Utc::now().date_naive();
    let ymd = |d: NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = ymd(today - Days::new(1));
    params.not_after = ymd(today + Days::new(u64::from(days)));
    Ok(())
}

/// Makes `device-ca.pem` and `device-ca-key.pem` (ECDSA P-256, mode 0600 for the key) in
/// `dir`, refusing to replace an existing CA. Returns the certificate's path.
pub fn create_device_ca(dir: &Path, days: u32) -> Result<PathBuf, CertsError> {
    let (cert_path, key_path) = (dir.join(DEVICE_CA_CERT), dir.join(DEVICE_CA_KEY));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertsError::Exists(path.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let mut params = crate::tls::ca_params("iot-gateway device CA")?;
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

/// Signs a client certificate for `device_id` (CN = the id, client auth only) with the device
/// CA in `ca_dir`; writes `{out}/{id}.pem` and `{out}/{id}-key.pem` (mode 0600), replacing
/// earlier ones. Returns the certificate's path.
pub fn issue_device_cert(
    ca_dir: &Path,
    device_id: &str,
    days: u32,
    out: &Path,
) -> Result<PathBuf, CertsError> {
    if !valid_device_id(device_id) {
        return Err(CertsError::BadId(device_id.to_owned()));
    }
    let issuer = load_issuer(ca_dir)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, device_id);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    validity(&mut params, days)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(|source| TlsError::Write {
        path: out.to_owned(),
        source,
    })?;
    let cert_path = out.join(format!("{device_id}.pem"));
    write_file(
        &out.join(format!("{device_id}-key.pem")),
        &key.serialize_pem(),
        true,
    )?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(cert_path)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertsError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| CertsError::Read { path, source })
    };
    let (cert, key) = (read(DEVICE_CA_CERT)?, read(DEVICE_CA_KEY)?);
    let bad = |name: &str| {
        let path = dir.join(name);
        move |source| CertsError::BadCa { path, source }
    };
    let key = KeyPair::from_pem(&key).map_err(bad(DEVICE_CA_KEY))?;
    Issuer::from_ca_cert_pem(&cert, key).map_err(bad(DEVICE_CA_CERT))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{device_id_of, load_certs};

    #[test]
    fn a_device_certificate_names_its_device_and_chains_to_the_device_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_device_ca(dir.path(), 30).unwrap();
        let out = dir.path().join("devices");
        let cert = issue_device_cert(dir.path(), "sensor-1", 7, &out).unwrap();
        assert_eq!(cert, out.join("sensor-1.pem"));
        let der = &load_certs(&cert).unwrap()[0];
        assert_eq!(device_id_of(der).as_deref(), Some("sensor-1"));

        // rustls accepts it as a client certificate of that CA.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(load_certs(&ca).unwrap().remove(0)).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            crate::tls::provider(),
        )
        .build()
        .unwrap();
        let now = rustls_pki_types::UnixTime::now();
        verifier.verify_client_cert(der, &[], now).unwrap();

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for key in [dir.path().join(DEVICE_CA_KEY), out.join("sensor-1-key.pem")] {
                let mode = std::fs::metadata(&key).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
    }

    #[test]
    fn an_existing_ca_is_never_replaced_and_bad_input_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = create_device_ca(dir.path(), 30).unwrap();
        let before = std::fs::read(&ca).unwrap();
        assert!(matches!(
            create_device_ca(dir.path(), 30),
            Err(CertsError::Exists(_))
        ));
        assert_eq!(std::fs::read(&ca).unwrap(), before);
        let out = dir.path().join("d");
        assert!(matches!(
            issue_device_cert(dir.path(), "bad id", 7, &out),
            Err(CertsError::BadId(_))
        ));
        assert!(matches!(
            issue_device_cert(dir.path(), "ok", 0, &out),
            Err(CertsError::BadDays)
        ));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            issue_device_cert(empty.path(), "ok", 7, &out),
            Err(CertsError::Read { .. })
        ));
    }
}
