//! The `gateway` binary run as the operator CLI: one-shot runs (exit code, stdout, stderr) and
//! streaming runs (`events`, `telemetry --follow`) read line by line, then killed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::gateway::gateway_bin;

/// How long a one-shot CLI run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// A CLI invocation being built: arguments, environment, working directory.
#[derive(Clone, Debug)]
pub struct Cli {
    args: Vec<String>,
    /// Arguments that go after `args` (connection flags, global to every client command).
    tail: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
}

/// How a one-shot run ended.
#[derive(Debug)]
pub struct CliOutput {
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
    what: String,
}

/// A running CLI whose stdout is read line by line; killed when dropped.
pub struct CliProcess {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Cli {
    /// `gateway` with no arguments yet, run in `dir` with every `GATEWAY_*` variable removed.
    pub fn new(dir: &Path) -> Cli {
        Cli {
            args: Vec::new(),
            tail: Vec::new(),
            env: Vec::new(),
            dir: dir.to_path_buf(),
        }
    }

    /// Arguments placed after all others, e.g. `--api-url URL --api-key KEY`.
    pub fn tail<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tail.extend(args.into_iter().map(Into::into));
        self
    }

    /// Append arguments.
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

    fn command(&self) -> Command {
        let mut cmd = Command::new(gateway_bin());
        cmd.current_dir(&self.dir)
            .args(&self.args)
            .args(&self.tail)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (name, _) in std::env::vars() {
            if name.starts_with("GATEWAY_") {
                cmd.env_remove(name);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Run to completion (panics after a minute).
    pub async fn run(self) -> CliOutput {
        let what = format!("gateway {}", self.args.join(" "));
        let out = tokio::time::timeout(RUN_TIMEOUT, self.command().output())
            .await
            .unwrap_or_else(|_| panic!("`{what}` ran longer than {RUN_TIMEOUT:?}"))
            .unwrap_or_else(|e| panic!("run `{what}`: {e}"));
        CliOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            what,
        }
    }

    /// Start it with stdout piped, for commands that stream until they are stopped.
    pub fn spawn(self) -> CliProcess {
        let mut child = self
            .command()
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn gateway {}: {e}", self.args.join(" ")));
        let stdout = child.stdout.take().expect("piped stdout");
        CliProcess {
            child,
            lines: BufReader::new(stdout).lines(),
            seen: Vec::new(),
        }
    }
}

impl CliOutput {
    /// Asserts exit code 0 and an empty stderr; returns stdout.
    #[track_caller]
    pub fn success(&self) -> &str {
        assert_eq!(
            self.code,
            Some(0),
            "`{}` failed\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.is_empty(),
            "`{}` succeeded but wrote to stderr:\n{}",
            self.what,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts exit `code` with exactly one line on stderr, starting with `gateway: `; returns it.
    #[track_caller]
    pub fn error_line(&self, code: i32) -> &str {
        assert_eq!(
            self.code,
            Some(code),
            "`{}`: expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert!(
            lines.len() == 1 && lines[0].starts_with("gateway: "),
            "`{}`: expected one `gateway: ...` line on stderr, got:\n{}",
            self.what,
            self.stderr
        );
        lines[0]
    }

    /// Stdout parsed as one JSON document.
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(self.success()).unwrap_or_else(|e| {
            panic!(
                "`{}`: stdout is not JSON ({e}):\n{}",
                self.what, self.stdout
            )
        })
    }
}

impl CliProcess {
    /// The next stdout line, or `None` if stdout ended or nothing came within `timeout`.
    pub async fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let line = tokio::time::timeout(timeout, self.lines.next_line())
            .await
            .ok()?
            .ok()
            .flatten()?;
        self.seen.push(line.clone());
        Some(line)
    }

    /// Reads lines until one satisfies `pred`; panics (showing what was read) after `timeout`.
    pub async fn line_where(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_line(left).await {
                Some(line) if pred(&line) => return line,
                Some(_) => continue,
                None => panic!(
                    "no matching line within {timeout:?}; stdout so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Stops the process (`SIGKILL`) and waits for it.
    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}
