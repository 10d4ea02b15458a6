//! The `device-sim` binary as a fixture: built once per test run like the gateway, run as a
//! process against a real gateway (stopped by signal, killed on drop), a TCP relay that keeps
//! one device address while gateways behind it come and go, and reads of what a fleet stored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

use crate::api::Api;
use crate::checks::eventually;
use crate::gateway::Gateway;

/// How long a simulator may take to exit after `SIGTERM` or `SIGINT`.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// The ids `device-sim` gives a fleet: `{prefix}-00001` ..= `{prefix}-{count:05}`.
pub fn fleet_ids(prefix: &str, count: usize) -> Vec<String> {
    (1..=count).map(|n| format!("{prefix}-{n:05}")).collect()
}

/// A `device-sim` invocation being built.
#[derive(Clone, Debug)]
pub struct Sim {
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    own_group: bool,
    open_files: Option<u64>,
}

impl Sim {
    /// `device-sim` run in `dir`, with every `GATEWAY_*` and `DEVICE_SIM_*` variable removed.
    pub fn new(dir: &Path) -> Sim {
        Sim {
            args: Vec::new(),
            env: Vec::new(),
            dir: dir.to_path_buf(),
            own_group: false,
            open_files: None,
        }
    }

    /// `device-sim` in the gateway's directory (so `certs/ca.pem` and `data/sim-tokens.json` are
    /// where a user has them), pointed at its URLs with its API key in `GATEWAY_API_KEY`.
    pub fn against(gw: &Gateway) -> Sim {
        Sim::new(gw.dir())
            .args(["--url", &gw.device_url, "--api-url", &gw.api_url])
            .env("GATEWAY_API_KEY", &gw.api_key)
    }

    /// Append arguments (common options may come before or after the subcommand's).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable for the process.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Start it in a process group of its own, as a shell starts a foreground job, so that
    /// [`SimProcess::interrupt_group`] is a terminal's Ctrl-C.
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// Run it with this open-files limit (soft and hard, so it cannot raise it), through
    /// util-linux's `prlimit`, which then becomes the simulator (same process id).
    pub fn open_files_limit(mut self, files: u64) -> Self {
        self.open_files = Some(files);
        self
    }

    /// Start it: stdout read line by line in the background, stderr to a file.
    pub fn spawn(self) -> SimProcess {
        let stderr_path = next_log_path(&self.dir);
        let stderr = std::fs::File::create(&stderr_path).expect("create the simulator's log");
        let mut cmd = match self.open_files {
            None => Command::new(sim_bin()),
            Some(files) => {
                let mut prlimit = Command::new("prlimit");
                prlimit
                    .arg(format!("--nofile={files}:{files}"))
                    .arg("--")
                    .arg(sim_bin());
                prlimit
            }
        };
        cmd.current_dir(&self.dir)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("GATEWAY_") || name.starts_with("DEVICE_SIM_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        if self.own_group {
            cmd.process_group(0);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn device-sim {}: {e}", self.args.join(" ")));
        let pid = child.id().expect("device-sim pid");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let reader = tokio::spawn({
            let lines = lines.clone();
            async move {
                let mut stdout = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = stdout.next_line().await {
                    lines.lock().unwrap().push(line);
                }
            }
        });
        SimProcess {
            child,
            pid,
            what: format!("device-sim {}", self.args.join(" ")),
            stderr_path,
            lines,
            reader: Some(reader),
        }
    }
}

/// A running simulator; dropping it kills the process.
pub struct SimProcess {
    child: Child,
    /// The process id (also its process group id with [`Sim::own_process_group`]).
    pub pid: u32,
    what: String,
    stderr_path: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

/// How a simulator run ended.
#[derive(Debug)]
pub struct SimOutput {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Every stdout line.
    pub stdout: Vec<String>,
    /// Everything on stderr.
    pub stderr: String,
    what: String,
}

impl SimProcess {
    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// The stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for a stdout line that satisfies `pred`; panics (with stdout and stderr) after `timeout`.
    pub async fn line_where(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(line) = self.stdout_lines().into_iter().find(|l| pred(l)) {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "`{}`: no matching stdout line within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                self.what,
                self.stdout_lines().join("\n"),
                self.stderr()
            )
        })
    }

    /// `SIGTERM` to the process, then wait for it to exit.
    pub async fn terminate(self) -> SimOutput {
        signal(&self.pid.to_string(), "-TERM");
        self.wait().await
    }

    /// `SIGUSR1` to the process (a running fleet prints its errors so far).
    pub fn request_report(&self) {
        signal(&self.pid.to_string(), "-USR1");
    }

    /// `SIGINT` to its whole process group (a terminal's Ctrl-C), then wait for it to exit.
    pub async fn interrupt_group(self) -> SimOutput {
        signal(&format!("-{}", self.pid), "-INT");
        self.wait().await
    }

    /// Waits for it to exit by itself; panics after 30 s.
    pub async fn wait(mut self) -> SimOutput {
        let status = match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("wait for device-sim"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "`{}` did not exit within {EXIT_TIMEOUT:?}; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
        };
        if let Some(reader) = self.reader.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        SimOutput {
            code: status.code(),
            stdout: self.stdout_lines(),
            stderr: self.stderr(),
            what: self.what.clone(),
        }
    }
}

impl SimOutput {
    /// Asserts exit code 0.
    #[track_caller]
    pub fn success(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` failed\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout.join("\n"),
            self.stderr
        );
        self
    }

    /// The `--json` summary: asserts exit 0 and stdout of exactly one line, a JSON object.
    #[track_caller]
    pub fn summary(&self) -> Value {
        self.success();
        let [line] = self.stdout.as_slice() else {
            panic!(
                "`{}`: expected one stdout line (the summary), got:\n{}",
                self.what,
                self.stdout.join("\n")
            );
        };
        let summary: Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("`{}`: the summary is not JSON ({e}): {line}", self.what));
        assert!(summary.is_object(), "summary {summary} is not an object");
        summary
    }
}

/// A TCP relay on a port of its own that forwards each connection to the current backend:
/// devices keep one address while gateways behind it stop and start on new ports, as behind a
/// load balancer. With no backend, or one that refuses, a connection is accepted and closed.
pub struct Relay {
    addr: SocketAddr,
    backend: Arc<Mutex<Option<SocketAddr>>>,
    cut: Arc<Notify>,
    task: JoinHandle<()>,
}

impl Relay {
    /// A relay on `127.0.0.1:0` forwarding to `backend`.
    pub async fn start(backend: Option<SocketAddr>) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let backend = Arc::new(Mutex::new(backend));
        let cut = Arc::new(Notify::new());
        let task = tokio::spawn(relay(listener, backend.clone(), cut.clone()));
        Relay {
            addr,
            backend,
            cut,
            task,
        }
    }

    /// The relay's own address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The device URL through this relay: `wss://127.0.0.1:PORT/v1/connect`.
    pub fn device_url(&self) -> String {
        format!("wss://{}/v1/connect", self.addr)
    }

    /// Where new connections go from now on (`None`: nowhere).
    pub fn set_backend(&self, backend: Option<SocketAddr>) {
        *self.backend.lock().unwrap() = backend;
    }

    /// Closes every connection it carries now, both sockets at once and mid-stream, as a
    /// failing middlebox would; new ones are relayed as before.
    pub fn cut(&self) {
        self.cut.notify_one();
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(listener: TcpListener, backend: Arc<Mutex<Option<SocketAddr>>>, cut: Arc<Notify>) {
    // Owned here, so that aborting the relay aborts every connection it carries.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((mut client, _)) = accepted else { continue };
                let target = *backend.lock().unwrap();
                connections.spawn(async move {
                    let Some(target) = target else { return };
                    let Ok(mut server) = TcpStream::connect(target).await else { return };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = cut.notified() => connections.abort_all(),
        }
    }
}

/// The device listener's address, from the URL the gateway printed.
pub fn device_addr(gw: &Gateway) -> SocketAddr {
    let rest = gw
        .device_url
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let host_port = rest.split('/').next().unwrap_or_default();
    host_port
        .parse()
        .unwrap_or_else(|e| panic!("device url {:?}: {e}", gw.device_url))
}

/// Ids of the devices the API lists as online.
pub async fn online_ids(api: &Api) -> Vec<String> {
    let page = api.get("/devices?online=true&limit=1000").await.expect(200);
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|d| d["id"].as_str().expect("device id").to_string())
        .collect()
}

/// Waits until the API shows every one of `ids` online.
pub async fn wait_all_online(api: &Api, ids: &[String], timeout: Duration) {
    eventually(
        &format!("all {} devices online", ids.len()),
        timeout,
        || async {
            let online = online_ids(api).await;
            ids.iter().all(|id| online.contains(id)).then_some(())
        },
    )
    .await;
}

/// Waits until the API lists no device as online; panics after `timeout`.
pub async fn wait_none_online(api: &Api, timeout: Duration) {
    eventually("no device online", timeout, || async {
        online_ids(api).await.is_empty().then_some(())
    })
    .await;
}

/// The `counter` of every stored reading of a device, oldest first (by `ts`).
pub async fn stored_counters(api: &Api, device: &str) -> Vec<u64> {
    api.telemetry_all(device, "order=asc")
        .await
        .iter()
        .map(|item| {
            item["data"]["counter"]
                .as_u64()
                .unwrap_or_else(|| panic!("{device}: a stored point without a counter: {item}"))
        })
        .collect()
}

/// Asserts the stored counters of a device are 0, 1, 2, ... n-1 in time order: every reading
/// the device took arrived (no gap), each once (no duplicate), in the order it was taken.
#[track_caller]
pub fn assert_gapless(device: &str, counters: &[u64]) {
    let expected: Vec<u64> = (0..counters.len() as u64).collect();
    if counters != expected {
        let mut sorted = counters.to_vec();
        sorted.sort_unstable();
        let duplicates: Vec<u64> = sorted
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        let max = sorted.last().copied().unwrap_or(0);
        let missing: Vec<u64> = (0..=max)
            .filter(|n| sorted.binary_search(n).is_err())
            .collect();
        panic!(
            "{device}: stored counters are not 0..{}: duplicates {duplicates:?}, missing {missing:?}, \
             in time order: {counters:?}",
            counters.len()
        );
    }
}

/// Path of the `device-sim` binary, built with the gateway's (`gateway::workspace_bin`).
pub fn sim_bin() -> PathBuf {
    crate::gateway::workspace_bin("device-sim")
}

fn signal(target: &str, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, "--", target])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {target} failed: {status}");
}

fn next_log_path(dir: &Path) -> PathBuf {
    (1..)
        .map(|n| dir.join(format!("device-sim-{n}.stderr.log")))
        .find(|p| !p.exists())
        .expect("a free log name")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_ids_match_the_simulator_numbering() {
        assert_eq!(fleet_ids("sim", 2), ["sim-00001", "sim-00002"]);
    }

    #[test]
    fn gapless_accepts_only_every_counter_once_in_order() {
        assert_gapless("d", &[0, 1, 2, 3]);
        assert_gapless("d", &[]);
        for bad in [&[0, 1, 1, 2][..], &[0, 2, 3], &[1, 2, 3], &[0, 2, 1]] {
            assert!(
                std::panic::catch_unwind(|| assert_gapless("d", bad)).is_err(),
                "{bad:?}"
            );
        }
    }
}
