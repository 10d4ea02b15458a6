//! What the CLI prints: kubectl-like borderless tables, `key: value` views and JSON on stdout.

use std::io::Write;

use comfy_table::presets::NOTHING;
use comfy_table::{ColumnConstraint, Table, Width};
use serde_json::Value;

use super::CliError;
use gateway::time::parse_rfc3339_ms;

/// Spaces between two columns, as kubectl leaves them.
const GAP: u16 = 3;
/// Longest JSON shown in a table cell before it is cut with `…`.
pub const CELL_CHARS: usize = 60;

/// Writes `text` and a newline to stdout, flushed (a streaming reader sees each line at once).
pub fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(CliError::Stdout)
}

/// Pretty JSON, for one document or one array.
pub fn print_json(value: &Value) -> Result<(), CliError> {
    print(&serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string()))
}

/// Compact JSON on one line, for streams (one object per line).
pub fn print_json_line(value: &Value) -> Result<(), CliError> {
    print(&value.to_string())
}

/// A borderless table: a header row, no leading space, three spaces between columns.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> Table {
    let mut table = Table::new();
    table
        .load_preset(NOTHING)
        .set_header(header.to_vec())
        .add_rows(rows);
    for column in table.column_iter_mut() {
        column.set_padding((0, GAP));
    }
    table
}

/// The table as text, without trailing spaces.
pub fn render(table: &Table) -> String {
    table.trim_fmt()
}

/// One row on its own, aligned with columns of at least `widths` (from [`Table::column_max_content_widths`]).
///
/// Streams (`telemetry --follow`) print rows one by one under a table printed earlier.
pub fn row_line(widths: &[u16], cells: Vec<String>) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING).add_row(cells);
    let constraints = widths
        .iter()
        .map(|w| ColumnConstraint::LowerBoundary(Width::Fixed(w + GAP)));
    table.set_constraints(constraints);
    for column in table.column_iter_mut() {
        column.set_padding((0, GAP));
    }
    table.trim_fmt()
}

/// `key: value` lines for every field of an object, values aligned.
pub fn fields(object: &Value) -> String {
    let Some(map) = object.as_object() else {
        return text(object);
    };
    let width = map.keys().map(|k| k.chars().count()).max().unwrap_or(0) + 1;
    map.iter()
        .map(|(key, value)| format!("{:width$} {}", format!("{key}:"), text(value)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A value as a person reads it: strings bare, `null` as `-`, the rest as compact JSON.
pub fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// [`text`] cut to `max` characters with `…`.
pub fn clip(value: &Value, max: usize) -> String {
    let full = text(value);
    if full.chars().count() <= max {
        return full;
    }
    let mut cut: String = full.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// How long ago an RFC 3339 time was, kubectl style (`12s ago`, `5m ago`, `3h ago`, `2d ago`).
pub fn age(time: &Value, now_ms: i64) -> String {
    let Some(ms) = time.as_str().and_then(parse_rfc3339_ms) else {
        return text(time);
    };
    let secs = (now_ms - ms).max(0) / 1000;
    let (n, unit) = match secs {
        0..60 => (secs, "s"),
        60..3600 => (secs / 60, "m"),
        3600..86_400 => (secs / 3600, "h"),
        _ => (secs / 86_400, "d"),
    };
    format!("{n}{unit} ago")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_are_borderless_and_aligned() {
        let t = table(
            &["ID", "ONLINE"],
            vec![
                vec!["sensor-1".into(), "true".into()],
                vec!["b".into(), "false".into()],
            ],
        );
        assert_eq!(
            render(&t),
            "ID         ONLINE\nsensor-1   true\nb          false"
        );
        let widths = t.column_max_content_widths();
        assert_eq!(
            row_line(&widths, vec!["c".into(), "x".into()]),
            "c          x"
        );
        // A longer cell widens its column rather than being cut.
        assert_eq!(
            row_line(&widths, vec!["much-longer-id".into(), "x".into()]),
            "much-longer-id   x"
        );
    }

    #[test]
    fn fields_are_key_value_lines() {
        let v = json!({"id": "c-1", "status": "succeeded", "result": {"a": 1}, "error": null});
        assert_eq!(
            fields(&v),
            "id:     c-1\nstatus: succeeded\nresult: {\"a\":1}\nerror:  -"
        );
    }

    #[test]
    fn ages_and_clipping() {
        let now = parse_rfc3339_ms("2026-11-25T10:00:00.000Z").unwrap();
        let at = |s: &str| age(&json!(s), now);
        assert_eq!(at("2026-11-25T09:59:48.000Z"), "12s ago");
        assert_eq!(at("2026-11-25T09:55:00.000Z"), "5m ago");
        assert_eq!(at("2026-11-25T07:00:00.000Z"), "3h ago");
        assert_eq!(at("2026-11-23T10:00:00.000Z"), "2d ago");
        assert_eq!(at("2026-11-25T10:00:05.000Z"), "0s ago", "clock skew");
        assert_eq!(age(&Value::Null, now), "-");
        assert_eq!(clip(&json!("abcdef"), 4), "abc…");
        assert_eq!(clip(&json!({"k": 1}), 60), "{\"k\":1}");
    }
}
