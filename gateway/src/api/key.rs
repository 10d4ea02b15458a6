//! The operator API key: configured, or generated once and kept in `api-key` beside the database.

use std::io;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A random 256-bit secret as base64url text (`[A-Za-z0-9_-]`, 43 characters).
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The key the API accepts; only its hash is kept in memory.
pub struct ApiKey {
    hash: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(..)")
    }
}

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: &str) -> ApiKey {
        ApiKey {
            hash: Sha256::digest(key.as_bytes()).into(),
        }
    }

    /// Compares in constant time (over the hashes).
    pub fn matches(&self, presented: &str) -> bool {
        let other: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        self.hash
            .iter()
            .zip(other.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// The file the generated key is kept in: `api-key` beside the database.
pub fn key_file(database: &Path) -> PathBuf {
    database
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("api-key")
}

/// The configured key, else the kept one, else a new one written to `file`.
/// Returns the key and whether it was generated just now.
pub fn resolve(configured: Option<&str>, file: &Path) -> io::Result<(String, bool)> {
    if let Some(key) = configured.filter(|k| !k.is_empty()) {
        return Ok((key.to_owned(), false));
    }
    match std::fs::read_to_string(file) {
        Ok(text) if !text.trim().is_empty() => return Ok((text.trim().to_owned(), false)),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let key = random_secret();
    write_private(file, &format!("{key}\n"))?;
    Ok((key, true))
}

fn write_private(path: &Path, contents: &str) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    use std::io::Write;
    let mut f = options.open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let file = key_file(&dir.path().join("gateway.db"));
        let (key, generated) = resolve(None, &file).unwrap();
        assert!(generated);
        assert_eq!(key.len(), 43);
        assert_eq!(resolve(None, &file).unwrap(), (key.clone(), false));
        assert_eq!(
            resolve(Some("given"), &file).unwrap(),
            ("given".into(), false)
        );
        let api = ApiKey::new(&key);
        assert!(api.matches(&key));
        assert!(!api.matches("nope"));
    }
}
