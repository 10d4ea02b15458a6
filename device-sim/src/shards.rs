//! One subcommand over several processes of this program. A process may hold only so many
//! files (`RLIMIT_NOFILE`, one per connection), so `bench` and `idle` split a bigger fleet into
//! shards: the parent provisions, starts one child per shard with the same arguments, and adds
//! up what the children report on stdout, one JSON object per line. A child stops when its
//! stdin (a pipe from the parent) closes, so none outlives its parent.

use std::ffi::OsString;
use std::io::{BufRead, Write};
use std::process::{ExitStatus, Stdio};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Files a process keeps besides its connections: stdio, the runtime's, the CA and tokens files.
const RESERVED_FILES: u64 = 64;

/// How a subcommand spreads its connections over processes (by default: as the open-files
/// limit requires).
#[derive(Debug, Clone, Default, Args)]
pub struct Sharding {
    /// Processes to spread the connections over [default: as few as this process's open-files
    /// limit allows, one connection per file].
    #[arg(long)]
    pub processes: Option<usize>,
    /// This process is shard I of N, started by a parent `device-sim` (internal).
    #[arg(long, hide = true, value_name = "I/N")]
    pub shard: Option<Shard>,
}

/// Which part of the fleet a child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Shard, String> {
        let parsed = text
            .split_once('/')
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        match parsed {
            Some((index, count)) if index < count => Ok(Shard { index, count }),
            _ => Err(format!("`{text}` is not I/N with I < N")),
        }
    }
}

impl Shard {
    /// The items of this shard: every `count`-th, from position `index`.
    pub fn take<T>(&self, items: Vec<T>) -> Vec<T> {
        items
            .into_iter()
            .skip(self.index)
            .step_by(self.count)
            .collect()
    }
}

/// What this process does with the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs every device itself.
    Alone,
    /// Starts this many children and adds up their reports.
    Parent(usize),
    /// Runs one shard and reports to its parent.
    Child(Shard),
}

impl Sharding {
    /// The role for a fleet of `devices`, given how many connections one process may hold.
    pub fn role(&self, devices: usize, per_process: usize) -> Result<Role> {
        if let Some(shard) = self.shard {
            return Ok(Role::Child(shard));
        }
        let processes = match self.processes {
            Some(0) => bail!("--processes must be at least 1"),
            Some(n) => n,
            None => devices.div_ceil(per_process.max(1)),
        };
        Ok(match processes.min(devices) {
            0 | 1 => Role::Alone,
            n => Role::Parent(n),
        })
    }
}

/// How many connections this process can hold: its open-files limit (raised to the hard
/// limit first, as servers and load generators do) less what it needs for itself.
pub fn connections_per_process() -> usize {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut limit = getrlimit(Resource::Nofile);
        let below_hard = match (limit.current, limit.maximum) {
            (Some(current), Some(maximum)) => current < maximum,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if below_hard {
            limit.current = limit.maximum;
            // Best effort: the soft limit below is what counts.
            let _ = setrlimit(Resource::Nofile, limit);
        }
        match getrlimit(Resource::Nofile).current {
            Some(files) => {
                usize::try_from(files.saturating_sub(RESERVED_FILES).max(1)).unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        }
    }
    #[cfg(not(unix))]
    {
        usize::MAX
    }
}

/// One child process (its stdin is kept apart, in [`Shards::stdins`]).
struct ShardProcess {
    index: usize,
    child: Child,
    stdout: Lines<BufReader<ChildStdout>>,
}

/// The children of a parent, started together.
pub struct Shards {
    children: Vec<ShardProcess>,
    /// Closed (emptied) to tell every child to finish.
    stdins: Vec<ChildStdin>,
    /// When cancelled, the children are told to finish even while the parent waits for them.
    stop: CancellationToken,
}

impl Shards {
    /// Starts `count` copies of this program with this process's arguments, each told its
    /// shard. `--provision` is left out: the parent has provisioned the whole fleet.
    pub fn spawn(count: usize, stop: CancellationToken) -> Result<Shards> {
        let program = std::env::current_exe().context("finding this program")?;
        let args = child_args(std::env::args_os().skip(1));
        let (mut children, mut stdins) = (Vec::with_capacity(count), Vec::with_capacity(count));
        for index in 0..count {
            let mut child = Command::new(&program)
                .args(&args)
                .arg("--shard")
                .arg(format!("{index}/{count}"))
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting shard {index} ({})", program.display()))?;
            stdins.push(child.stdin.take().context("shard stdin")?);
            let stdout = child.stdout.take().context("shard stdout")?;
            children.push(ShardProcess {
                index,
                child,
                stdout: BufReader::new(stdout).lines(),
            });
        }
        Ok(Shards {
            children,
            stdins,
            stop,
        })
    }

    /// The next report of every child, in shard order. Should `stop` fire meanwhile, the
    /// children are told to finish, and they report what they have.
    pub async fn next_reports<T: DeserializeOwned>(&mut self) -> Result<Vec<T>> {
        let mut reports = Vec::with_capacity(self.children.len());
        let (stdins, stop) = (&mut self.stdins, &self.stop);
        for shard in &mut self.children {
            let line = loop {
                tokio::select! {
                    line = shard.stdout.next_line() => break line?,
                    _ = stop.cancelled(), if !stdins.is_empty() => stdins.clear(),
                }
            };
            let Some(line) = line else {
                let status = shard.child.wait().await?;
                bail!("shard {} ended without reporting ({status})", shard.index);
            };
            let report = serde_json::from_str(&line)
                .with_context(|| format!("shard {} reported `{line}`", shard.index))?;
            reports.push(report);
        }
        Ok(reports)
    }

    /// Sends one line to every child.
    pub async fn tell(&mut self, line: &str) -> Result<()> {
        if self.stdins.is_empty() {
            bail!("the shards were already told to finish");
        }
        for stdin in &mut self.stdins {
            stdin.write_all(format!("{line}\n").as_bytes()).await?;
            stdin.flush().await?;
        }
        Ok(())
    }

    /// Closes every child's stdin: each finishes and reports a last time.
    pub fn stop(&mut self) {
        self.stdins.clear();
    }

    /// Waits for every child to exit; true when each exited 0 (or 2: ran, saw errors).
    pub async fn wait(mut self) -> Result<bool> {
        self.stop();
        let mut clean = true;
        for shard in &mut self.children {
            let status: ExitStatus = shard.child.wait().await?;
            if !matches!(status.code(), Some(0 | 2)) {
                eprintln!("device-sim: shard {} exited with {status}", shard.index);
                clean = false;
            }
        }
        Ok(clean)
    }
}

/// The arguments of a child: the parent's without `--provision`.
fn child_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    args.filter(|arg| arg != "--provision").collect()
}

/// A child's report to its parent: one JSON line on stdout.
pub fn report<T: Serialize>(message: &T) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, message)?;
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    Ok(())
}

/// The lines the parent sends on stdin, read on a thread of their own (a blocking read cannot
/// be interrupted, and a detached thread does not hold up the exit); the channel closes at the
/// end of stdin.
pub fn parent_lines() -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_i_of_n() {
        assert_eq!("2/5".parse(), Ok(Shard { index: 2, count: 5 }));
        for bad in ["5/5", "1", "a/2", "1/0", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn every_item_falls_to_exactly_one_shard() {
        let items: Vec<usize> = (0..10).collect();
        let mut seen: Vec<usize> = (0..3)
            .flat_map(|index| Shard { index, count: 3 }.take(items.clone()))
            .collect();
        assert_eq!(Shard { index: 1, count: 3 }.take(items.clone()), [1, 4, 7]);
        seen.sort();
        assert_eq!(seen, items);
    }

    #[test]
    fn processes_follow_the_open_files_limit_unless_given() {
        let auto = Sharding {
            processes: None,
            shard: None,
        };
        assert_eq!(auto.role(1000, 19_936).unwrap(), Role::Alone);
        assert_eq!(auto.role(50_000, 19_936).unwrap(), Role::Parent(3));
        let given = Sharding {
            processes: Some(4),
            shard: None,
        };
        assert_eq!(given.role(1000, 19_936).unwrap(), Role::Parent(4));
        assert_eq!(given.role(2, 19_936).unwrap(), Role::Parent(2));
        let one = Sharding {
            processes: Some(1),
            shard: None,
        };
        assert_eq!(one.role(50_000, 100).unwrap(), Role::Alone);
        let zero = Sharding {
            processes: Some(0),
            shard: None,
        };
        assert!(zero.role(10, 100).is_err());
        let child = Sharding {
            processes: Some(4),
            shard: Some(Shard { index: 1, count: 4 }),
        };
        assert_eq!(
            child.role(1000, 10).unwrap(),
            Role::Child(Shard { index: 1, count: 4 })
        );
    }

    #[test]
    fn children_do_not_provision_again() {
        let args =
            ["--provision", "bench", "--devices", "9", "--url", "wss://x"].map(OsString::from);
        assert_eq!(
            child_args(args.into_iter()),
            ["bench", "--devices", "9", "--url", "wss://x"].map(OsString::from)
        );
    }
}
