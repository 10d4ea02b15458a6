//! What every subcommand needs before its devices go online: their credentials (provisioned
//! first when asked) and a bounded way of connecting many of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::api::{self, Api};
use crate::backoff::Backoff;
use crate::cli::Common;
use crate::conn::{self, ConnectError, Target, Ws};
use crate::proto::Welcome;
use crate::stats::ErrorTally;
use crate::tokens::{self, Secret, TokenMap};

/// How long one connection attempt (TCP, TLS, upgrade, welcome) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The ids and tokens of `count` devices; with `provision`, devices without a token in the file
/// are created (or get a new token) first.
pub async fn credentials(
    common: &Common,
    count: usize,
    provision: bool,
) -> Result<Vec<(String, Secret)>> {
    credentials_with_prefix(common, &common.prefix, count, provision).await
}

/// As [`credentials`], for the devices `{prefix}-00001` onwards.
pub async fn credentials_with_prefix(
    common: &Common,
    prefix: &str,
    count: usize,
    provision: bool,
) -> Result<Vec<(String, Secret)>> {
    if count == 0 {
        bail!("--devices must be at least 1");
    }
    let ids = tokens::device_ids(prefix, count)?;
    let mut map = tokens::load(&common.tokens)?;
    if provision {
        provision_missing(common, &ids, &mut map).await?;
    }
    if common.client_certs.is_some() {
        // Certificates, not tokens, prove who the devices are; none is sent.
        return Ok(ids
            .into_iter()
            .map(|id| (id, Secret::from(String::new())))
            .collect());
    }
    tokens::credentials(&ids, &map, &common.tokens)
}

async fn provision_missing(common: &Common, ids: &[String], map: &mut TokenMap) -> Result<()> {
    if let Some(key) = &common.api_key {
        forget_unknown(common, key, ids, map).await?;
    }
    let missing = tokens::missing(ids, map);
    let reused = ids.len() - missing.len();
    let file = common.tokens.display();
    if missing.is_empty() {
        eprintln!("provision: all {reused} devices already have tokens in {file}");
        return Ok(());
    }
    let key = common
        .api_key
        .clone()
        .context("--provision needs the operator API key (--api-key or GATEWAY_API_KEY)")?;
    let api = Api::new(&common.api_url, key)?;
    let started = Instant::now();
    let outcome = api::provision(&api, &missing).await;
    map.extend(outcome.tokens);
    // A token is shown only once: keep every one we got, even when others failed.
    tokens::save(&common.tokens, map)?;
    eprintln!(
        "provision: {} created, {} existing got a new token, {reused} reused from {file} ({:.2}s)",
        outcome.created,
        outcome.rotated,
        started.elapsed().as_secs_f64()
    );
    if let Some((id, error)) = outcome.failures.first() {
        bail!(
            "could not provision {} of {} devices; first: {id}: {error}",
            outcome.failures.len(),
            missing.len()
        );
    }
    Ok(())
}

/// Forgets the kept tokens of devices the gateway does not have (its database was reset, say),
/// so that they are created again instead of being refused (401) at connect.
async fn forget_unknown(
    common: &Common,
    key: &Secret,
    ids: &[String],
    map: &mut TokenMap,
) -> Result<()> {
    if !ids.iter().any(|id| map.contains_key(id)) {
        return Ok(());
    }
    let api = Api::new(&common.api_url, key.clone())?;
    let existing = api::existing_ids(&api)
        .await
        .context("listing the gateway's devices")?;
    let unknown = tokens::unknown_to_gateway(ids, map, &existing);
    if !unknown.is_empty() {
        eprintln!(
            "provision: {} devices with a token in {} are not in the gateway (its database was \
             reset?); creating them again",
            unknown.len(),
            common.tokens.display()
        );
        for id in unknown {
            map.remove(id);
        }
    }
    Ok(())
}

/// The connector for a fleet of `devices` at `--url`, from `--source-ips`.
pub async fn connector(common: &Common, devices: usize) -> Result<Arc<Connector>> {
    let target = Target::resolve(&common.url, &common.ca).await?;
    let sources = common.source_ips.for_fleet(target.addr(), devices);
    if sources.len() > 1 {
        eprintln!(
            "device-sim: connecting from {} source addresses ({} to {})",
            sources.len(),
            sources[0],
            sources[sources.len() - 1]
        );
    }
    let target = target
        .with_sources(sources)
        .with_client_certs(common.client_certs.clone())?;
    Ok(Connector::new(target, common.connect_concurrency))
}

/// Connects devices to one target, a bounded number of handshakes at a time.
pub struct Connector {
    target: Target,
    permits: Semaphore,
}

impl Connector {
    /// A connector allowing `concurrency` attempts in progress at once.
    pub fn new(target: Target, concurrency: usize) -> Arc<Connector> {
        Arc::new(Connector {
            target,
            permits: Semaphore::new(concurrency.max(1)),
        })
    }

    /// The device URL.
    pub fn url(&self) -> String {
        self.target.url()
    }

    /// Where the connections go, for a client that speaks another protocol (`bench-mqtt`).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Waits until fewer than `--connect-concurrency` handshakes are in progress; the returned
    /// permit counts as one until it is dropped.
    pub async fn permit(&self) -> Option<SemaphorePermit<'_>> {
        // The semaphore is never closed, so acquiring cannot fail.
        self.permits.acquire().await.ok()
    }

    /// One attempt of device `id`, waiting for a permit first.
    pub async fn once(&self, id: &str, token: &Secret) -> Result<(Ws, Welcome), ConnectError> {
        // The permit is held until the welcome arrived.
        let _permit = self.permit().await;
        conn::connect(&self.target, id, token, CONNECT_TIMEOUT).await
    }

    /// Up to `attempts` attempts with backoff; every failed attempt is counted in `tally`.
    pub async fn with_retries(
        &self,
        id: &str,
        token: &Secret,
        attempts: u32,
        tally: &ErrorTally,
    ) -> Result<(Ws, Welcome), ConnectError> {
        let mut backoff = Backoff::device();
        let mut attempt = 1;
        loop {
            match self.once(id, token).await {
                Err(e) if !e.is_final() && attempt < attempts => {
                    tally.record(&format!("{} (retried)", e.kind()), &e);
                    let jitter = backoff.next_delay(&mut rand::thread_rng());
                    tokio::time::sleep(e.retry_after().unwrap_or_default().max(jitter)).await;
                    attempt += 1;
                }
                Err(e) => {
                    tally.record(&e.kind(), &e);
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }
}
