//! `device-sim demo`, the README's first command: the `gateway` binary started as a child on its
//! defaults, a fleet provisioned through its API and run, and where to look printed; Ctrl-C (or
//! SIGTERM) stops the fleet first, then the gateway, and exits 0.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::cli::{Common, DemoArgs, RunArgs};
use crate::fleet;
use crate::run;
use crate::shards::Sharding;
use crate::shutdown::Signals;
use crate::tokens::{self, Secret};

/// How long the gateway may take to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the gateway may take to exit after SIGTERM (its own grace period is 10 s by default).
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the operator CLI looks for the API when not told.
const DEFAULT_API_URL: &str = "http://127.0.0.1:8080/v1";
/// The gateway's database when not told otherwise; its generated API key is kept beside it.
const DEFAULT_DATABASE_URL: &str = "sqlite://data/gateway.db";
/// Where the operator CLI looks for the API key when not told.
const DEFAULT_KEY_FILE: &str = "data/api-key";

/// Runs the demo until Ctrl-C or SIGTERM; `Ok(true)` when the gateway then exited cleanly and
/// the fleet had not stopped by itself (every device refused).
pub async fn demo(common: &Common, args: &DemoArgs) -> Result<bool> {
    // Caught before the gateway exists: a Ctrl-C must never end this process while the gateway,
    // in a process group of its own so that the terminal's Ctrl-C reaches only us, runs on.
    let mut signals = Signals::new().context("catching Ctrl-C and SIGTERM")?;
    let bin = gateway_bin(args.gateway_bin.as_deref())?;
    let mut gateway = GatewayChild::spawn(&bin, &args.gateway_log)?;
    eprintln!(
        "demo: started {} (pid {}), its log goes to {}",
        shown(&bin).display(),
        gateway.pid,
        args.gateway_log.display()
    );
    let listening = tokio::select! {
        listening = gateway.listening() => Some(listening),
        _ = signals.next() => None,
    };
    let listening = match listening {
        None => return gateway.stop(&mut signals).await,
        Some(Err(e)) => {
            gateway.stop(&mut signals).await?;
            return Err(e);
        }
        Some(Ok(listening)) => listening,
    };

    let (key, key_file) = api_key(common)?;
    let fleet = Common {
        url: listening.device_url.clone(),
        ca: common.ca.clone(),
        api_url: listening.api_url.clone(),
        api_key: Some(key),
        tokens: common.tokens.clone(),
        provision: false,
        prefix: common.prefix.clone(),
        connect_concurrency: common.connect_concurrency,
        source_ips: common.source_ips.clone(),
        client_certs: common.client_certs.clone(),
    };
    let provisioned = tokio::select! {
        result = fleet::credentials(&fleet, args.devices, true) => Some(result),
        _ = signals.next() => None,
    };
    match provisioned {
        None => return gateway.stop(&mut signals).await,
        Some(Err(e)) => {
            gateway.stop(&mut signals).await?;
            return Err(e);
        }
        Some(Ok(_)) => {}
    }
    println!(
        "{}",
        Guide {
            gateway: shown(&bin),
            listening: &listening,
            key_file: key_file.as_deref(),
            common,
            args,
        }
    );

    let run_args = RunArgs {
        devices: args.devices,
        rate: args.rate,
        duration: None,
        buffer: 10_000,
        chaos_disconnect_rate: 0.0,
        chaos_duplicate_rate: 0.0,
        clock_skew: chrono::TimeDelta::zero(),
        json: false,
        sharding: Sharding::default(),
    };
    let mut exited_early = None;
    let ran = {
        let stop = async {
            tokio::select! {
                _ = signals.next() => {}
                status = gateway.child.wait() => {
                    exited_early = Some(status.map_or_else(|e| e.to_string(), describe));
                }
            }
        };
        run::run_until(&fleet, &run_args, stop).await
    };
    if let Some(status) = exited_early {
        bail!(
            "the gateway stopped on its own ({status}); the end of its log:\n{}",
            log_tail(&args.gateway_log)
        );
    }
    eprintln!("demo: the fleet has stopped; stopping the gateway");
    let stopped = gateway.stop(&mut signals).await;
    let fleet_ran = ran?;
    Ok(stopped? && fleet_ran)
}

/// The gateway binary: `--gateway-bin`, else `gateway` beside this program (both are built
/// into the same `target/<profile>/`).
fn gateway_bin(given: Option<&Path>) -> Result<PathBuf> {
    let bin = match given {
        Some(bin) => bin.to_path_buf(),
        None => std::env::current_exe()
            .context("locating device-sim itself")?
            .with_file_name(format!("gateway{}", std::env::consts::EXE_SUFFIX)),
    };
    if !bin.is_file() {
        bail!(
            "no gateway binary at {}: build it with `cargo build --release -p gateway` \
             (./demo.sh does), or name it with --gateway-bin",
            bin.display()
        );
    }
    Ok(bin)
}

/// The API key: `GATEWAY_API_KEY` (which the gateway reads too), else the one the gateway
/// generated (or kept) beside its database; with the file it came from.
fn api_key(common: &Common) -> Result<(Secret, Option<PathBuf>)> {
    if let Some(key) = &common.api_key {
        return Ok((key.clone(), None));
    }
    let database =
        std::env::var("GATEWAY_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let file = key_file(&database);
    let key = std::fs::read_to_string(&file)
        .with_context(|| format!("reading the gateway's API key from {}", file.display()))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("{} is empty", file.display());
    }
    Ok((Secret::from(key.to_owned()), Some(file)))
}

/// `api-key` beside the database of a `sqlite://PATH[?options]` URL.
fn key_file(database_url: &str) -> PathBuf {
    let path = database_url
        .strip_prefix("sqlite://")
        .or_else(|| database_url.strip_prefix("sqlite:"))
        .unwrap_or(database_url);
    let path = path.split('?').next().unwrap_or(path);
    Path::new(path)
        .parent()
        .unwrap_or(Path::new(""))
        .join("api-key")
}

/// The gateway's URLs, from its `listening` line, made reachable from this host.
#[derive(Debug, PartialEq)]
struct Listening {
    device_url: String,
    api_url: String,
}

/// Parses `listening device=URL api=URL`; a wildcard address (`0.0.0.0`, `[::]`) becomes the
/// loopback address, which the development certificate names.
fn parse_listening(line: &str) -> Option<Listening> {
    let mut words = line.split(' ');
    let (Some("listening"), Some(device), Some(api), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let reachable = |url: &str| {
        url.replacen("://0.0.0.0:", "://127.0.0.1:", 1)
            .replacen("://[::]:", "://[::1]:", 1)
    };
    Some(Listening {
        device_url: reachable(device.strip_prefix("device=")?),
        api_url: reachable(api.strip_prefix("api=")?),
    })
}

/// The running gateway: its own process group, stdout read for the `listening` line, stderr
/// into the log file; killed if this process ends without stopping it.
struct GatewayChild {
    child: Child,
    pid: u32,
    stdout: Option<Lines<BufReader<ChildStdout>>>,
    log: PathBuf,
}

impl GatewayChild {
    fn spawn(bin: &Path, log: &Path) -> Result<GatewayChild> {
        if let Some(dir) = log.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("creating the gateway log {}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("serve")
            // Its log goes to a file: no terminal colour codes in it.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("the gateway has no pid")?;
        let stdout = child.stdout.take().map(|out| BufReader::new(out).lines());
        Ok(GatewayChild {
            child,
            pid,
            stdout,
            log: log.to_path_buf(),
        })
    }

    /// Waits for the `listening` line, then keeps draining stdout so the gateway never blocks on it.
    async fn listening(&mut self) -> Result<Listening> {
        let mut lines = self
            .stdout
            .take()
            .context("the gateway's stdout was read already")?;
        let first = tokio::time::timeout(START_TIMEOUT, lines.next_line()).await;
        let line = match first {
            Ok(Ok(Some(line))) => line,
            Err(_) => bail!(
                "the gateway printed no `listening` line within {START_TIMEOUT:?}; the end of its log:\n{}",
                log_tail(&self.log)
            ),
            Ok(_) => {
                let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                let status = match status {
                    Ok(Ok(status)) => describe(status),
                    _ => "still running".into(),
                };
                bail!(
                    "the gateway ended before it was listening ({status}); the end of its log {}:\n{}",
                    self.log.display(),
                    log_tail(&self.log)
                );
            }
        };
        let listening = parse_listening(&line).with_context(|| {
            format!("the gateway's first line is not `listening ...`: {line:?}")
        })?;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(listening)
    }

    /// SIGTERM, then waits for the exit (a second Ctrl-C, or [`STOP_TIMEOUT`], kills it);
    /// `Ok(true)` when it exited 0.
    async fn stop(mut self, signals: &mut Signals) -> Result<bool> {
        if let Some(status) = self.child.try_wait()? {
            eprintln!(
                "demo: the gateway had already stopped ({})",
                describe(status)
            );
            return Ok(status.success());
        }
        let pid = i32::try_from(self.pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .context("the gateway's pid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::TERM)
            .context("sending SIGTERM to the gateway")?;
        enum Ended {
            Exited(std::io::Result<ExitStatus>),
            Again,
            TooSlow,
        }
        let ended = tokio::select! {
            status = self.child.wait() => Ended::Exited(status),
            _ = signals.next() => Ended::Again,
            _ = tokio::time::sleep(STOP_TIMEOUT) => Ended::TooSlow,
        };
        let status = match ended {
            Ended::Exited(status) => status?,
            Ended::Again | Ended::TooSlow => {
                eprintln!("demo: killing the gateway (SIGKILL)");
                self.child.kill().await?;
                self.child.wait().await?
            }
        };
        eprintln!("demo: the gateway stopped ({})", describe(status));
        Ok(status.success())
    }
}

/// What to look at, printed once the fleet is provisioned.
struct Guide<'a> {
    gateway: &'a Path,
    listening: &'a Listening,
    key_file: Option<&'a Path>,
    common: &'a Common,
    args: &'a DemoArgs,
}

impl std::fmt::Display for Guide<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids = tokens::device_ids(&self.common.prefix, self.args.devices).unwrap_or_default();
        let (first, last) = (
            ids.first().map_or("", String::as_str),
            ids.last().map_or("", String::as_str),
        );
        let api = &self.listening.api_url;
        let (key_where, key_shell) = match self.key_file {
            Some(file) => (
                format!("key in {}", file.display()),
                format!("$(cat {})", file.display()),
            ),
            None => ("key in $GATEWAY_API_KEY".into(), "$GATEWAY_API_KEY".into()),
        };
        writeln!(f)?;
        writeln!(
            f,
            "  operator API  {api}  ({key_where}; the API reference: {api}/openapi.json)"
        )?;
        let console = api.strip_suffix("/v1").unwrap_or(api);
        writeln!(
            f,
            "  web console   {console}/  (open it in a browser; sign in with the key)"
        )?;
        writeln!(
            f,
            "  devices       {first} .. {last}, telemetry {}/s each, connected to {}",
            self.args.rate, self.listening.device_url
        )?;
        writeln!(
            f,
            "                (their tokens in {})",
            self.common.tokens.display()
        )?;
        writeln!(f)?;
        writeln!(f, "Try, from another terminal in this directory:")?;
        // The CLI finds the API and the key by itself when they are where it looks by default.
        let cli = self.gateway.display();
        if api != DEFAULT_API_URL {
            writeln!(f, "  export GATEWAY_API_URL={api}")?;
        }
        if self
            .key_file
            .is_some_and(|file| file != Path::new(DEFAULT_KEY_FILE))
        {
            writeln!(f, "  export GATEWAY_API_KEY={key_shell}")?;
        }
        writeln!(f, "  {cli} devices list --online")?;
        writeln!(f, "  {cli} commands send {first} ping --wait 5s")?;
        writeln!(f, "  {cli} telemetry {first} --since 1m --follow")?;
        writeln!(f, "  {cli} events")?;
        writeln!(
            f,
            "  curl -s -H \"Authorization: Bearer {key_shell}\" {api}/devices/{first}/telemetry/latest"
        )?;
        writeln!(f)?;
        write!(f, "Ctrl-C stops the fleet, then the gateway.")
    }
}

/// `path` relative to the working directory when it is under it (as a user would type it).
fn shown(path: &Path) -> &Path {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok())
        .filter(|relative| !relative.as_os_str().is_empty())
        .unwrap_or(path)
}

fn describe(status: ExitStatus) -> String {
    match status.code() {
        Some(code) => format!("exit {code}"),
        None => format!("{status}"),
    }
}

/// The last lines of the gateway's log, for an error message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_urls_reachable_from_here() {
        let line = "listening device=wss://0.0.0.0:8443/v1/connect api=http://127.0.0.1:8080/v1";
        assert_eq!(
            parse_listening(line),
            Some(Listening {
                device_url: "wss://127.0.0.1:8443/v1/connect".into(),
                api_url: "http://127.0.0.1:8080/v1".into(),
            })
        );
        let v6 = parse_listening("listening device=ws://[::]:1/v1/connect api=http://[::]:2/v1");
        assert_eq!(v6.unwrap().device_url, "ws://[::1]:1/v1/connect");
        for bad in [
            "",
            "listening device=wss://x/v1/connect",
            "2026 INFO listening device=a api=b",
            "listening device=a api=b extra",
            "listening api=b device=a",
        ] {
            assert_eq!(parse_listening(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_key_file_is_beside_the_database() {
        assert_eq!(key_file(DEFAULT_DATABASE_URL), Path::new(DEFAULT_KEY_FILE));
        assert_eq!(
            key_file("sqlite:///var/lib/gw/g.db?mode=rwc"),
            Path::new("/var/lib/gw/api-key")
        );
        assert_eq!(key_file("sqlite:g.db"), Path::new("api-key"));
    }
}
