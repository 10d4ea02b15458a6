//! What a simulated device does with a command: a pure function from command to outcome (and
//! the action that follows it), and the bounded memory of recent command ids that makes
//! redelivery (at-least-once) execute each command once.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::proto::{Command, Outcome};

/// Recent command ids remembered per device: far more than the gateway keeps in flight (8 by
/// default), few enough that a large fleet pays nothing for devices that never get commands.
pub const REMEMBERED_COMMANDS: usize = 256;

/// Telemetry intervals `set_interval` accepts.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// The longest telemetry interval `set_interval` accepts: a day.
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// The longest `reboot` delay accepted: an hour.
pub const MAX_REBOOT_DELAY: Duration = Duration::from_secs(3600);

/// What the device does once it has answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Nothing more.
    None,
    /// Send telemetry at this interval from now on.
    SetInterval(Duration),
    /// Close the socket (1000), stay offline this long, then connect again.
    Reboot(Duration),
}

/// Executes `command` at time `now`: its outcome (for `command_result`) and what follows.
pub fn execute(command: &Command, now: DateTime<Utc>) -> (Outcome, Action) {
    let params = &command.params;
    match command.name.as_str() {
        "ping" => {
            let ts = now.to_rfc3339_opts(SecondsFormat::Millis, true);
            (
                Outcome::Succeeded(json!({"pong": true, "ts": ts})),
                Action::None,
            )
        }
        "set_interval" => match interval_of(params) {
            Ok(interval) => (
                Outcome::Succeeded(json!({"interval_ms": interval.as_millis() as u64})),
                Action::SetInterval(interval),
            ),
            Err(error) => (Outcome::Failed(error), Action::None),
        },
        "reboot" => match reboot_delay_of(params) {
            Ok(delay) => (
                Outcome::Succeeded(json!({"rebooting": true, "delay_s": delay.as_secs_f64()})),
                Action::Reboot(delay),
            ),
            Err(error) => (Outcome::Failed(error), Action::None),
        },
        "fail" => {
            let error = params
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("failed on request");
            (Outcome::Failed(error.to_owned()), Action::None)
        }
        _ => (Outcome::Rejected("unknown command".into()), Action::None),
    }
}

/// `{"interval_ms": N}` (an integer) or `{"interval_s": X}` (a number), within the bounds.
fn interval_of(params: &Value) -> Result<Duration, String> {
    let interval = match (params.get("interval_ms"), params.get("interval_s")) {
        (Some(_), Some(_)) => return Err("give interval_ms or interval_s, not both".into()),
        (Some(ms), None) => ms
            .as_u64()
            .map(Duration::from_millis)
            .ok_or("interval_ms must be a positive integer")?,
        (None, Some(s)) => s
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .ok_or("interval_s must be a positive number")?,
        (None, None) => return Err("params need interval_ms (or interval_s)".into()),
    };
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        return Err(format!(
            "the interval must be between {} ms and {} ms",
            MIN_INTERVAL.as_millis(),
            MAX_INTERVAL.as_millis()
        ));
    }
    Ok(interval)
}

/// `{"delay_s": X}`, 1 s when absent.
fn reboot_delay_of(params: &Value) -> Result<Duration, String> {
    let Some(delay) = params.get("delay_s") else {
        return Ok(Duration::from_secs(1));
    };
    delay
        .as_f64()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .filter(|d| *d <= MAX_REBOOT_DELAY)
        .ok_or_else(|| {
            format!(
                "delay_s must be a number of seconds from 0 to {}",
                MAX_REBOOT_DELAY.as_secs()
            )
        })
}

/// The answers to the last [`REMEMBERED_COMMANDS`] commands, by id, oldest forgotten first.
///
/// A command redelivered after a reconnect is looked up here: it is acked again and its
/// remembered answer re-sent (the gateway takes a late result for a final command as a harmless
/// duplicate, and needs it when the first one was lost with the connection), but not executed.
#[derive(Debug)]
pub struct RecentCommands {
    capacity: usize,
    order: VecDeque<String>,
    answers: HashMap<String, String>,
}

impl Default for RecentCommands {
    fn default() -> Self {
        RecentCommands::with_capacity(REMEMBERED_COMMANDS)
    }
}

impl RecentCommands {
    /// Remembers up to `capacity` commands (at least one).
    pub fn with_capacity(capacity: usize) -> RecentCommands {
        RecentCommands {
            capacity: capacity.max(1),
            order: VecDeque::new(),
            answers: HashMap::new(),
        }
    }

    /// The answer already given to command `id`, if it is remembered.
    pub fn answer_to(&self, id: &str) -> Option<&str> {
        self.answers.get(id).map(String::as_str)
    }

    /// Remembers the answer (the `command_result` text) to command `id`.
    pub fn remember(&mut self, id: &str, answer: String) {
        if self.answers.insert(id.to_owned(), answer).is_some() {
            return;
        }
        self.order.push_back(id.to_owned());
        if self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.answers.remove(&oldest);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(name: &str, params: Value) -> Command {
        Command {
            id: "c-1".into(),
            name: name.into(),
            params,
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-25T10:00:00.123Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    fn run(name: &str, params: Value) -> (Outcome, Action) {
        execute(&command(name, params), now())
    }

    #[test]
    fn ping_answers_pong_with_the_time_in_milliseconds() {
        assert_eq!(
            run("ping", json!({})),
            (
                Outcome::Succeeded(json!({"pong": true, "ts": "2026-11-25T10:00:00.123Z"})),
                Action::None
            )
        );
        // Params are not required at all.
        assert!(matches!(run("ping", Value::Null).0, Outcome::Succeeded(_)));
    }

    #[test]
    fn set_interval_takes_milliseconds_or_seconds() {
        assert_eq!(
            run("set_interval", json!({"interval_ms": 250})),
            (
                Outcome::Succeeded(json!({"interval_ms": 250})),
                Action::SetInterval(Duration::from_millis(250))
            )
        );
        assert_eq!(
            run("set_interval", json!({"interval_s": 1.5})),
            (
                Outcome::Succeeded(json!({"interval_ms": 1500})),
                Action::SetInterval(Duration::from_millis(1500))
            )
        );
    }

    #[test]
    fn set_interval_with_invalid_params_fails_and_changes_nothing() {
        for params in [
            json!({}),
            Value::Null,
            json!({"interval_ms": -5}),
            json!({"interval_ms": 1.5}),
            json!({"interval_ms": "100"}),
            json!({"interval_ms": 0}),
            json!({"interval_ms": 5}),
            json!({"interval_s": 86_401}),
            json!({"interval_s": -1}),
            json!({"interval_ms": 100, "interval_s": 1}),
        ] {
            let (outcome, action) = run("set_interval", params.clone());
            assert!(
                matches!(&outcome, Outcome::Failed(e) if !e.is_empty()),
                "{params}: {outcome:?}"
            );
            assert_eq!(action, Action::None, "{params}");
        }
    }

    #[test]
    fn reboot_answers_first_and_defaults_to_one_second() {
        assert_eq!(
            run("reboot", json!({})),
            (
                Outcome::Succeeded(json!({"rebooting": true, "delay_s": 1.0})),
                Action::Reboot(Duration::from_secs(1))
            )
        );
        assert_eq!(
            run("reboot", json!({"delay_s": 0})).1,
            Action::Reboot(Duration::ZERO)
        );
        assert_eq!(
            run("reboot", json!({"delay_s": 2.5})).1,
            Action::Reboot(Duration::from_millis(2500))
        );
        for bad in [
            json!({"delay_s": -1}),
            json!({"delay_s": "5"}),
            json!({"delay_s": 3601}),
        ] {
            let (outcome, action) = run("reboot", bad.clone());
            assert!(matches!(outcome, Outcome::Failed(_)), "{bad}");
            assert_eq!(action, Action::None);
        }
    }

    #[test]
    fn fail_fails_with_the_given_error_or_a_default() {
        assert_eq!(
            run("fail", json!({"error": "disk full"})).0,
            Outcome::Failed("disk full".into())
        );
        assert_eq!(
            run("fail", json!({})).0,
            Outcome::Failed("failed on request".into())
        );
    }

    #[test]
    fn anything_else_is_rejected_as_unknown() {
        for name in ["", "PING", "self_destruct"] {
            assert_eq!(
                run(name, json!({})),
                (Outcome::Rejected("unknown command".into()), Action::None)
            );
        }
    }

    #[test]
    fn recent_commands_are_remembered_up_to_the_bound() {
        let mut recent = RecentCommands::with_capacity(3);
        for n in 0..5 {
            recent.remember(&format!("c-{n}"), format!("answer {n}"));
        }
        let remembered = |recent: &RecentCommands| {
            (0..7)
                .filter(|n| recent.answer_to(&format!("c-{n}")).is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(remembered(&recent), [2, 3, 4], "the oldest are forgotten");
        assert_eq!(recent.answer_to("c-4"), Some("answer 4"));
        // Remembering an id again does not take a second slot: one more new id forgets only c-2.
        recent.remember("c-4", "answer 4".into());
        recent.remember("c-5", "answer 5".into());
        assert_eq!(remembered(&recent), [3, 4, 5]);
    }
}
