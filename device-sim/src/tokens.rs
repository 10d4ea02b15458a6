//! Device ids and the tokens file (`{"device-id": "token", ...}`); secrets never reach a log line.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::io::{ErrorKind, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};

/// A token or API key: printable only on purpose, through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for an `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Device id -> token, kept sorted so the file diffs well.
pub type TokenMap = BTreeMap<String, String>;

/// The ids `{prefix}-00001` ..= `{prefix}-{count:05}`.
pub fn device_ids(prefix: &str, count: usize) -> Result<Vec<String>> {
    let valid_start = prefix.starts_with(|c: char| c.is_ascii_alphanumeric());
    let valid_rest = prefix
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._:-".contains(c));
    // Ids may be 128 bytes long; leave room for `-` and the number.
    if !valid_start || !valid_rest || prefix.len() > 100 {
        bail!("--prefix `{prefix}` would not make valid device ids ([A-Za-z0-9][A-Za-z0-9._:-]*, at most 100 characters)");
    }
    Ok((1..=count).map(|n| format!("{prefix}-{n:05}")).collect())
}

/// Reads the tokens file; a missing file is an empty map.
pub fn load(path: &Path) -> Result<TokenMap> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a JSON object of device id -> token",
                path.display()
            )
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(TokenMap::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the tokens file atomically (temp file + rename), readable by its owner only.
pub fn save(path: &Path, tokens: &TokenMap) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut temp = path.as_os_str().to_owned();
    temp.push(".tmp");
    let temp = Path::new(&temp);
    let write = || -> std::io::Result<()> {
        // A leftover temp file could carry looser permissions than ours.
        match std::fs::remove_file(temp) {
            Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(temp)?;
        serde_json::to_writer_pretty(&mut file, tokens)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(temp, path)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// The ids of `ids` that have no token in `tokens`, in order.
pub fn missing<'a>(ids: &'a [String], tokens: &TokenMap) -> Vec<&'a str> {
    ids.iter()
        .filter(|id| !tokens.contains_key(*id))
        .map(String::as_str)
        .collect()
}

/// The ids of `ids` that have a token in `tokens` but are not among the gateway's `existing`
/// devices (its database was reset, say): their tokens can only be refused.
pub fn unknown_to_gateway<'a>(
    ids: &'a [String],
    tokens: &TokenMap,
    existing: &HashSet<String>,
) -> Vec<&'a str> {
    ids.iter()
        .filter(|id| tokens.contains_key(*id) && !existing.contains(*id))
        .map(String::as_str)
        .collect()
}

/// Each id with its token, or an error naming the first id without one.
pub fn credentials(
    ids: &[String],
    tokens: &TokenMap,
    file: &Path,
) -> Result<Vec<(String, Secret)>> {
    ids.iter()
        .map(|id| match tokens.get(id) {
            Some(token) => Ok((id.clone(), Secret(token.clone()))),
            None => bail!(
                "device {id} has no token in {}; run with --provision (and an API key)",
                file.display()
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> TokenMap {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn ids_are_numbered_from_one_with_five_digits() {
        assert_eq!(
            device_ids("sim", 3).unwrap(),
            ["sim-00001", "sim-00002", "sim-00003"]
        );
        assert_eq!(device_ids("a.b", 100_000).unwrap()[99_999], "a.b-100000");
    }

    #[test]
    fn prefixes_that_make_invalid_ids_are_refused() {
        for bad in ["", "-sim", "sim/x", "sim x", &"x".repeat(101)] {
            assert!(device_ids(bad, 1).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_lists_only_ids_without_tokens() {
        let ids = device_ids("sim", 3).unwrap();
        let tokens = map(&[("sim-00002", "t2"), ("other", "x")]);
        assert_eq!(missing(&ids, &tokens), ["sim-00001", "sim-00003"]);
    }

    #[test]
    fn tokens_of_devices_the_gateway_lost_are_found() {
        let ids = device_ids("sim", 3).unwrap();
        let tokens = map(&[("sim-00001", "a"), ("sim-00002", "b"), ("other", "x")]);
        let existing: HashSet<String> = ["sim-00002", "sim-00003"].map(String::from).into();
        // sim-00003 has no token (missing, not unknown); "other" is not part of the fleet.
        assert_eq!(unknown_to_gateway(&ids, &tokens, &existing), ["sim-00001"]);
    }

    #[test]
    fn file_round_trip_merges_and_keeps_unrelated_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/tokens.json");
        assert!(load(&path).unwrap().is_empty());

        save(&path, &map(&[("other", "x"), ("sim-00001", "old")])).unwrap();
        let mut tokens = load(&path).unwrap();
        tokens.extend(map(&[("sim-00001", "rotated"), ("sim-00002", "new")]));
        save(&path, &tokens).unwrap();

        assert_eq!(
            load(&path).unwrap(),
            map(&[
                ("other", "x"),
                ("sim-00001", "rotated"),
                ("sim-00002", "new")
            ])
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(
                mode & 0o077,
                0,
                "tokens file must not be group/world readable"
            );
        }
    }

    #[test]
    fn a_corrupt_file_is_an_error_not_an_empty_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        std::fs::write(&path, "[1,2]").unwrap();
        assert!(load(&path).is_err());
    }

    #[test]
    fn credentials_need_every_token() {
        let ids = device_ids("sim", 2).unwrap();
        let file = Path::new("t.json");
        assert!(credentials(&ids, &map(&[("sim-00001", "a")]), file).is_err());
        let creds =
            credentials(&ids, &map(&[("sim-00001", "a"), ("sim-00002", "b")]), file).unwrap();
        assert_eq!(creds[1].0, "sim-00002");
        assert_eq!(creds[1].1.expose(), "b");
        assert_eq!(format!("{:?}", creds[1].1), "Secret(***)");
    }
}
