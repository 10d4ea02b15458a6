//! The real `gateway` binary as a fixture: built once per test run, started on free ports in a
//! fresh directory, killed (`SIGKILL`) or terminated (`SIGTERM`), restarted on the same data.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

use crate::api::Api;
use crate::checks::random_token;
use crate::cli::Cli;
use crate::device::{ConnectRequest, Device};

/// How long a gateway may take to print its `listening` line.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a terminated gateway may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// How a gateway is started: extra flags and where its operator API key comes from.
#[derive(Clone, Debug, Default)]
pub struct Options {
    args: Vec<String>,
    env: Vec<(String, String)>,
    key: KeyMode,
    data_tmpfs: Option<String>,
    device_socket: Option<Arc<std::net::TcpListener>>,
}

#[derive(Clone, Debug, Default)]
enum KeyMode {
    /// A random key per fixture, passed with `--api-key` (fixed once chosen, so a restart reuses it).
    #[default]
    Random,
    Fixed(String),
    /// No `--api-key`: the gateway generates one into `data/api-key`.
    Generated,
}

impl Options {
    /// Default flags and a random `--api-key`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extra command-line flags, e.g. `.args(["--ping-interval", "1s"])`.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the gateway process (e.g. a `GATEWAY_*` setting).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Put `data/` (the database) on a tmpfs of `size` (e.g. `"8m"`) that only the gateway
    /// sees: it runs under `unshare --user --map-root-user --mount`, which mounts the tmpfs and
    /// then becomes the gateway (same process id). A small tmpfs is a real full disk; the test
    /// reaches the files through [`Gateway::data_dir`]. The data ends with the process.
    pub fn data_on_tmpfs(mut self, size: &str) -> Self {
        self.data_tmpfs = Some(size.to_owned());
        self
    }

    /// Hand the gateway `listener` as its device socket, as systemd socket activation does
    /// (descriptor 3, `LISTEN_FDS=1`). The test keeps its own handle, so the socket outlives
    /// the process: a restart with the same options gets the same socket.
    pub fn device_socket(mut self, listener: Arc<std::net::TcpListener>) -> Self {
        self.device_socket = Some(listener);
        self
    }

    /// Start without `--api-key`, so that the gateway generates (or reuses) its own.
    pub fn generated_api_key(mut self) -> Self {
        self.key = KeyMode::Generated;
        self
    }
}

/// A running gateway process; dropping it kills the process.
pub struct Gateway {
    /// `wss://127.0.0.1:PORT/v1/connect`, as printed by the gateway.
    pub device_url: String,
    /// `http://127.0.0.1:PORT/v1`, as printed by the gateway.
    pub api_url: String,
    /// The API origin without `/v1` (for `/healthz`, `/readyz`, `/metrics`).
    pub root_url: String,
    /// The operator API key in use (read from `data/api-key` when generated; empty if missing).
    pub api_key: String,
    /// The development CA the gateway generated: `<dir>/certs/ca.pem`.
    pub ca_pem_path: PathBuf,
    /// The process id.
    pub pid: u32,
    /// The file this run's stderr goes to.
    pub stderr_path: PathBuf,
    child: Child,
    dir: Option<TempDir>,
    opts: Options,
    stdout: Arc<Mutex<Vec<String>>>,
    drain: Option<tokio::task::JoinHandle<()>>,
}

/// A gateway that has exited; its directory (database, certificates, key) is kept for a restart.
pub struct Stopped {
    /// The working directory of the stopped gateway.
    pub dir: TempDir,
    /// The options it ran with (same API key).
    pub opts: Options,
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stderr.
    pub stderr: String,
    /// Every line it wrote to stdout.
    pub stdout: Vec<String>,
}

impl Stopped {
    /// Start the gateway again on the same directory, database and certificates.
    pub async fn start(self) -> Gateway {
        Gateway::start_in(self.dir, self.opts).await
    }
}

impl Gateway {
    /// Start a gateway in a fresh temporary directory.
    pub async fn start(opts: Options) -> Gateway {
        let dir = tempfile::Builder::new()
            .prefix("e2e-gateway-")
            .tempdir()
            .expect("create a temporary directory");
        Gateway::start_in(dir, opts).await
    }

    /// Start a gateway in `dir` (a previous run's data, certificates and key are reused).
    pub async fn start_in(dir: TempDir, mut opts: Options) -> Gateway {
        if let KeyMode::Random = opts.key {
            opts.key = KeyMode::Fixed(random_token(32));
        }
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).expect("create data directory");
        let stderr_path = next_stderr_path(dir.path());
        let stderr_file = std::fs::File::create(&stderr_path).expect("create stderr log");

        let mut cmd = match &opts.data_tmpfs {
            None => Command::new(gateway_bin()),
            Some(size) => {
                let mut unshare = Command::new("unshare");
                unshare
                    .args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
                    .arg(r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@""#)
                    .args(["sh", size])
                    .arg(&data_dir)
                    .arg(gateway_bin());
                unshare
            }
        };
        cmd.current_dir(dir.path())
            .arg("serve")
            .args(["--device-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
            .arg("--database-url")
            .arg(format!(
                "sqlite://{}",
                data_dir.join("gateway.db").display()
            ));
        if let KeyMode::Fixed(key) = &opts.key {
            cmd.args(["--api-key", key]);
        }
        cmd.args(&opts.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr_file))
            .kill_on_drop(true);
        // Settings from the environment would change what the tests see.
        for (name, _) in std::env::vars() {
            if name.starts_with("GATEWAY_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        if let Some(listener) = &opts.device_socket {
            let parent_fd = listener
                .as_fd()
                .try_clone_to_owned()
                .expect("dup the socket");
            cmd.fd_mappings(vec![FdMapping {
                parent_fd,
                child_fd: 3,
            }])
            .expect("one mapping")
            .env("LISTEN_FDS", "1");
        }
        let mut child = cmd.spawn().expect("spawn the gateway binary");
        let pid = child.id().expect("gateway pid");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let lines = Arc::new(Mutex::new(Vec::new()));

        let line = tokio::time::timeout(START_TIMEOUT, stdout.next_line()).await;
        let line = match line {
            Ok(Ok(Some(line))) => line,
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                panic!(
                    "gateway did not print its listening line ({other:?}); stderr:\n{}",
                    read_lossy(&stderr_path)
                );
            }
        };
        lines.lock().unwrap().push(line.clone());
        let (device_url, api_url) = parse_listening(&line).unwrap_or_else(|| {
            panic!(
                "first stdout line is not `listening device=... api=...`: {line:?}; stderr:\n{}",
                read_lossy(&stderr_path)
            )
        });
        let drain = tokio::spawn(drain(stdout, lines.clone()));

        let api_key = match &opts.key {
            KeyMode::Fixed(key) => key.clone(),
            _ => std::fs::read_to_string(data_dir.join("api-key"))
                .map(|k| k.trim().to_string())
                .unwrap_or_default(),
        };
        let root_url = api_url
            .strip_suffix("/v1")
            .unwrap_or_else(|| panic!("api url {api_url:?} does not end in /v1"))
            .to_string();
        Gateway {
            device_url,
            api_url,
            root_url,
            api_key,
            ca_pem_path: dir.path().join("certs").join("ca.pem"),
            pid,
            stderr_path,
            child,
            dir: Some(dir),
            opts,
            stdout: lines,
            drain: Some(drain),
        }
    }

    /// The gateway's working directory (database under `data/`, certificates under `certs/`).
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("gateway directory").path()
    }

    /// The data directory (`data/`, with `gateway.db`) as this process sees it: on a tmpfs of
    /// its own ([`Options::data_on_tmpfs`]) through `/proc/PID/root`.
    pub fn data_dir(&self) -> PathBuf {
        let data = self.dir().join("data");
        match self.opts.data_tmpfs {
            None => data,
            Some(_) => Path::new(&format!("/proc/{}/root", self.pid)).join(
                data.strip_prefix("/")
                    .expect("an absolute temporary directory"),
            ),
        }
    }

    /// Whether the process is still running (it has not exited, by itself or by a signal).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What this run has written to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The lines this run has written to stdout so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().unwrap().clone()
    }

    /// What the process has open: the target of each entry of `/proc/<pid>/fd` (`socket:[…]`,
    /// a path, …). Entries closed while they are listed are left out.
    pub fn open_files(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("list {dir}: {e}"));
        entries
            .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
            .map(|target| target.display().to_string())
            .collect()
    }

    /// An operator API client with this gateway's key.
    pub fn api(&self) -> Api {
        Api::new(&self.api_url, &self.root_url, Some(&self.api_key))
    }

    /// The CLI run in this gateway's directory with `--api-url` and `--api-key` for it.
    pub fn cli(&self) -> Cli {
        Cli::new(self.dir()).tail(["--api-url", &self.api_url, "--api-key", &self.api_key])
    }

    /// Create a device through the API (asserting `201`) and return its token.
    pub async fn create_device(&self, id: &str) -> String {
        self.api().create_device(id).await
    }

    /// A device connection request to this gateway, to be refined and sent.
    pub fn connect_request(&self) -> ConnectRequest {
        ConnectRequest::new(&self.device_url, &self.ca_pem_path)
    }

    /// Connect with `Authorization: Bearer <token>` offering `iot-gateway.v1`; panics if refused.
    pub async fn connect(&self, token: &str) -> Device {
        self.connect_request()
            .bearer(token)
            .protocols(["iot-gateway.v1"])
            .send()
            .await
            .device()
    }

    /// Send `SIGTERM` without waiting for the process to exit.
    pub fn sigterm(&self) {
        signal(self.pid, "-TERM");
    }

    /// Wait for the process to exit by itself (after [`Gateway::sigterm`]); panics after 20 s.
    pub async fn wait_exit(mut self) -> Stopped {
        let status = match tokio::time::timeout(EXIT_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("wait for the gateway"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "gateway did not exit within {EXIT_TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                );
            }
        };
        // The rest of stdout, up to the end of the pipe.
        if let Some(drain) = self.drain.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
        }
        self.into_stopped(status)
    }

    /// `SIGTERM`, then wait for the process to exit.
    pub async fn terminate(self) -> Stopped {
        self.sigterm();
        self.wait_exit().await
    }

    /// `SIGKILL` (`kill -9`): the process gets no chance to clean up.
    pub async fn kill9(self) -> Stopped {
        signal(self.pid, "-KILL");
        self.wait_exit().await
    }

    /// Terminate gracefully and start again on the same directory.
    pub async fn restart(self) -> Gateway {
        self.terminate().await.start().await
    }

    fn into_stopped(mut self, status: ExitStatus) -> Stopped {
        Stopped {
            dir: self.dir.take().expect("gateway directory"),
            opts: self.opts.clone(),
            status,
            stderr: self.stderr(),
            stdout: self.stdout_lines(),
        }
    }
}

/// `device=` and `api=` URLs of the exact line `listening device=wss://... api=http://...`.
fn parse_listening(line: &str) -> Option<(String, String)> {
    let mut words = line.split(' ');
    let (Some("listening"), Some(device), Some(api), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return None;
    };
    let device = device.strip_prefix("device=")?;
    let api = api.strip_prefix("api=")?;
    // wss:// and http:// by default; ws:// with --no-tls, https:// with --api-tls.
    let ok = (device.starts_with("wss://127.0.0.1:") || device.starts_with("ws://127.0.0.1:"))
        && device.ends_with("/v1/connect")
        && (api.starts_with("http://127.0.0.1:") || api.starts_with("https://127.0.0.1:"))
        && api.ends_with("/v1");
    ok.then(|| (device.to_string(), api.to_string()))
}

async fn drain(mut lines: tokio::io::Lines<BufReader<ChildStdout>>, sink: Arc<Mutex<Vec<String>>>) {
    while let Ok(Some(line)) = lines.next_line().await {
        sink.lock().unwrap().push(line);
    }
}

fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .arg(sig)
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} {pid} failed: {status}");
}

fn next_stderr_path(dir: &Path) -> PathBuf {
    (1..)
        .map(|n| dir.join(format!("gateway-{n}.stderr.log")))
        .find(|p| !p.exists())
        .expect("a free stderr log name")
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Path of the `gateway` binary, built once per test process with the same profile as the tests.
pub fn gateway_bin() -> PathBuf {
    workspace_bin("gateway")
}

/// Path of the workspace binary `name` (`gateway` or `device-sim`), in the tests' target
/// directory and profile. The first call builds the workspace's binaries (see [`build_bins`]).
pub(crate) fn workspace_bin(name: &str) -> PathBuf {
    static PROFILE_DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let profile_dir = PROFILE_DIR
        .get_or_init(build_bins)
        .clone()
        .unwrap_or_else(|e| panic!("{e}"));
    let bin = profile_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "built {name} not found at {}", bin.display());
    bin
}

/// Builds the binaries of every workspace package, with the tests' profile, into the tests'
/// target directory, and returns the directory they are in (`target/<profile>`).
///
/// One `cargo build --workspace --bins` for both binaries: their dependencies then have the
/// features unified over the workspace, as `cargo test --workspace` (the README's test
/// command) built them a moment before, so cargo reuses those and compiles only the two
/// binaries. Built one package at a time (`-p device-sim`), each would have the features of
/// its own dependencies only, and cargo would compile dozens of crates again (minutes on two
/// cores).
fn build_bins() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // …/target/<profile>/deps/e2e-xxxx → …/target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test binary location {}", exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("no target dir above {}", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root above tests/");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--workspace", "--bins", "--target-dir"])
        .arg(target_dir);
    // `cargo test` gives this process the test crate's CARGO_PKG_*, CARGO_MANIFEST_* and the
    // like. Build scripts that watch them (ring's does) would see a change and rebuild, with
    // everything above them, on every test run and again on the next plain build.
    for (name, _) in std::env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if is_crate_env(name) {
            cmd.env_remove(name);
        }
    }
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().map_err(|e| format!("run cargo build: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo build --workspace --bins failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(profile_dir.to_path_buf())
}

/// The variables cargo sets for the crate it runs (as opposed to those that configure cargo).
fn is_crate_env(name: &str) -> bool {
    name.starts_with("CARGO_PKG_")
        || matches!(
            name,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
        )
}

#[cfg(test)]
mod tests {
    use super::{is_crate_env, parse_listening};

    #[test]
    fn only_the_crate_environment_is_dropped_for_the_build() {
        for dropped in [
            "CARGO_PKG_NAME",
            "CARGO_MANIFEST_DIR",
            "CARGO_TARGET_TMPDIR",
        ] {
            assert!(is_crate_env(dropped), "{dropped}");
        }
        for kept in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_NET_OFFLINE",
        ] {
            assert!(!is_crate_env(kept), "{kept}");
        }
    }

    #[test]
    fn listening_line_is_parsed_strictly() {
        let line =
            "listening device=wss://127.0.0.1:40123/v1/connect api=http://127.0.0.1:40124/v1";
        assert_eq!(
            parse_listening(line),
            Some((
                "wss://127.0.0.1:40123/v1/connect".into(),
                "http://127.0.0.1:40124/v1".into()
            ))
        );
        assert_eq!(parse_listening(&format!("{line} ")), None);
        assert_eq!(parse_listening("listening device=x api=y"), None);
        assert_eq!(
            parse_listening("2026 INFO listening device=wss://127.0.0.1:1/v1/connect"),
            None
        );
    }
}
