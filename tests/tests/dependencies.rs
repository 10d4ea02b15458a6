//! Dependencies stay past versions with known advisories (RUSTSEC): the lock file is what
//! ships, so it is what is checked. (`cargo audit` needs the advisory database from the
//! network, which CI machines here do not reach; this names the floors we know of.)

use std::collections::HashMap;

/// Crate -> the lowest version without the advisories we know of.
const FLOORS: [(&str, [u64; 3]); 5] = [
    ("rustls", [0, 23, 18]),
    ("rustls-webpki", [0, 103, 13]),
    ("tungstenite", [0, 20, 1]),
    ("sqlx", [0, 8, 1]),
    ("ring", [0, 17, 12]),
];

fn version(text: &str) -> [u64; 3] {
    let mut parts = text
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    [0; 3].map(|_| parts.next().unwrap_or(0))
}

#[test]
fn locked_versions_are_past_known_advisories() {
    let lock = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("read Cargo.lock");
    let mut locked: HashMap<&str, Vec<[u64; 3]>> = HashMap::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = \"") {
            name = n.strip_suffix('"');
        } else if let (Some(n), Some(v)) = (name, line.strip_prefix("version = \"")) {
            locked
                .entry(n)
                .or_default()
                .push(version(v.trim_end_matches('"')));
            name = None;
        }
    }
    for (krate, floor) in FLOORS {
        let versions = locked
            .get(krate)
            .unwrap_or_else(|| panic!("{krate} is not in Cargo.lock"));
        for v in versions {
            assert!(v >= &floor, "{krate} {v:?} is below {floor:?}");
        }
    }
}
