//! What the `dlq` commands print: the stats table (or JSON), dead letters for people, and the
//! summaries at the end.

use std::fmt::{self, Write};
use std::time::Duration;

use lapin::BasicProperties;
use serde_json::{json, Value};

use crate::stages::model::EventTime;

use super::letter::message_headers;
use super::stats::Stats;
use super::{ExportSummary, Letter, PurgeSummary, ReplaySummary, Walked};

/// A failure time to the second, UTC: `2026-01-01T12:00:00Z`.
pub fn time(at: EventTime) -> String {
    chrono::DateTime::from_timestamp_micros(at.0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

fn or_dash<T: ToString>(value: &Option<T>) -> String {
    value
        .as_ref()
        .map_or_else(|| "-".to_string(), ToString::to_string)
}

/// The stats as a table, the largest groups first.
pub fn stats_table(stats: &Stats, queue: &str, walked: &Walked) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{queue}: {} dead letters{}",
        walked.present,
        if walked.matched == walked.read {
            String::new()
        } else {
            format!(", {} match the filter", walked.matched)
        }
    );
    if stats.total() == 0 {
        return out;
    }
    let header = [
        "REASON", "LIST", "STATUS", "ERROR", "COUNT", "OLDEST", "NEWEST",
    ];
    let mut rows: Vec<[String; 7]> = stats
        .groups()
        .into_iter()
        .map(|group| {
            [
                group.cause.reason.clone(),
                or_dash(&group.cause.list_id),
                or_dash(&group.cause.status),
                or_dash(&group.cause.error),
                group.count.to_string(),
                group.oldest.map_or_else(|| "-".into(), time),
                group.newest.map_or_else(|| "-".into(), time),
            ]
        })
        .collect();
    rows.push([
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        stats.total().to_string(),
        String::new(),
        String::new(),
    ]);
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 7]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            // Counts right-aligned, everything else left.
            if i == 4 {
                let _ = write!(text, "{cell:>width$}");
            } else {
                let _ = write!(text, "{cell:<width$}");
            }
        }
        text.trim_end().to_string()
    };
    let _ = writeln!(out, "{}", line(header));
    for row in &rows {
        let _ = writeln!(out, "{}", line(row.each_ref().map(String::as_str)));
    }
    out
}

/// The stats as one JSON document.
pub fn stats_json(stats: &Stats, queue: &str, walked: &Walked) -> Value {
    let groups: Vec<Value> = stats
        .groups()
        .into_iter()
        .map(|group| {
            json!({
                "reason": group.cause.reason,
                "list_id": group.cause.list_id,
                "status": group.cause.status,
                "error": group.cause.error,
                "count": group.count,
                "oldest": group.oldest.map(time),
                "newest": group.newest.map(time),
            })
        })
        .collect();
    json!({
        "queue": queue,
        "messages": walked.present,
        "matched": walked.matched,
        "groups": groups,
    })
}

/// Bodies longer than this are cut in `peek`'s text output (never in `--json`).
const BODY_SHOWN: usize = 4000;

/// Dead letters for people: what failed, why, when; the properties, other headers, body.
pub fn letters_text(letters: &[Letter], walked: &Walked) -> String {
    let mut out = String::new();
    for (i, letter) in letters.iter().enumerate() {
        let facts = &letter.facts;
        let mut title = vec![facts.reason.clone()];
        if let Some(list) = facts.list_id {
            title.push(format!("list {list}"));
        }
        match (&facts.status, &facts.error) {
            (Some(status), Some(error)) => title.push(format!("{status} {error}")),
            (Some(status), None) => title.push(status.to_string()),
            (None, Some(error)) => title.push(error.clone()),
            (None, None) => {}
        }
        if let Some(at) = facts.failed_at {
            title.push(format!("failed {}", time(at)));
        }
        if let Some(attempts) = facts.attempts {
            title.push(format!("retries {attempts}"));
        }
        if facts.replays > 0 {
            title.push(format!("replayed {}x before", facts.replays));
        }
        let _ = writeln!(out, "#{} {}", i + 1, title.join(" · "));
        if let Some(message) = &facts.message {
            let _ = writeln!(out, "  message:    {}", clean(message));
        }
        let _ = writeln!(out, "  properties: {}", properties_text(&letter.properties));
        let others: Vec<String> = message_headers(&letter.properties)
            .iter()
            .filter(|(name, _)| !name.as_str().starts_with("x-listrak-"))
            .map(|(name, value)| format!("{}={}", name.as_str(), super::record::header_json(value)))
            .collect();
        if !others.is_empty() {
            let _ = writeln!(out, "  headers:    {}", clean(&others.join(" ")));
        }
        let _ = writeln!(out, "  body:       {}", body_text(&letter.body));
    }
    let _ = writeln!(
        out,
        "{} shown; {} dead letters in the queue{}",
        letters.len(),
        walked.present,
        if walked.read < walked.present {
            format!(" (read the first {})", walked.read)
        } else {
            String::new()
        }
    );
    out
}

fn properties_text(p: &BasicProperties) -> String {
    let mut parts = Vec::new();
    let mut text = |name: &str, value: &Option<lapin::types::ShortString>| {
        if let Some(value) = value {
            parts.push(format!("{name}={}", clean(value.as_str())));
        }
    };
    text("content_type", p.content_type());
    text("message_id", p.message_id());
    text("correlation_id", p.correlation_id());
    text("type", p.kind());
    text("app_id", p.app_id());
    if let Some(mode) = p.delivery_mode() {
        parts.push(format!("delivery_mode={mode}"));
    }
    if let Some(seconds) = p.timestamp() {
        let at = EventTime(
            i64::try_from(*seconds)
                .unwrap_or(0)
                .saturating_mul(1_000_000),
        );
        parts.push(format!("timestamp={}", time(at)));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(" ")
    }
}

/// A body as text: UTF-8 shown as it is (control characters escaped, long bodies cut),
/// anything else described.
fn body_text(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) if text.chars().count() <= BODY_SHOWN => clean(text),
        Ok(text) => format!(
            "{}… ({} bytes in all)",
            clean(&text.chars().take(BODY_SHOWN).collect::<String>()),
            body.len()
        ),
        Err(_) => format!(
            "({} bytes, not UTF-8) {}",
            body.len(),
            clean(&String::from_utf8_lossy(
                &body[..body.len().min(BODY_SHOWN)]
            ))
        ),
    }
}

/// Escapes control characters, so a message cannot drive the operator's terminal.
fn clean(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

fn per_second(count: u64, elapsed: Duration) -> String {
    format!("{:.0}/s", count as f64 / elapsed.as_secs_f64().max(1e-3))
}

fn moved_back(f: &mut fmt::Formatter<'_>, count: u64) -> fmt::Result {
    if count > 0 {
        write!(
            f,
            " ({count} that did not match moved, in order, behind the dead letters that arrived \
             meanwhile)"
        )?;
    }
    Ok(())
}

fn stopped(f: &mut fmt::Formatter<'_>, error: &Option<super::DlqError>) -> fmt::Result {
    match error {
        Some(error) => write!(f, "\nstopped early: {error}"),
        None => Ok(()),
    }
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = &self.walked;
        if self.dry_run {
            write!(
                f,
                "dry run: {} of {} dead letters would be replayed to queue {:?}; nothing was \
                 changed",
                w.matched, w.present, self.target
            )?;
            if let Some(superseded) = self.superseded {
                write!(
                    f,
                    "; the applied log supersedes {superseded} of them ({})",
                    if self.skipped_superseded {
                        "--skip-superseded would remove them"
                    } else {
                        "replayed, the worker acknowledges them as superseded; \
                         --skip-superseded removes them instead"
                    }
                )?;
            }
        } else {
            write!(
                f,
                "replayed {} of {} dead letters to queue {:?} in {:.1}s ({}); {} left in {:?}",
                self.replayed,
                w.present,
                self.target,
                w.elapsed.as_secs_f64(),
                per_second(self.replayed, w.elapsed),
                w.present.saturating_sub(self.replayed).saturating_sub(
                    self.superseded
                        .filter(|_| self.skipped_superseded)
                        .unwrap_or(0)
                ),
                self.dead
            )?;
            moved_back(f, self.moved_back)?;
            if let (Some(superseded), true) = (self.superseded, self.skipped_superseded) {
                write!(
                    f,
                    "; removed {superseded} the applied log supersedes instead of replaying them"
                )?;
            }
        }
        if w.read < w.present && self.stopped.is_none() {
            write!(f, " (the limit was reached after reading {})", w.read)?;
        }
        stopped(f, &self.stopped)
    }
}

impl fmt::Display for ExportSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exported {} of {} dead letters to {} (synced to disk)",
            self.walked.matched,
            self.walked.present,
            self.path.display()
        )?;
        if self.remove {
            write!(f, "; removed {} from {:?}", self.removed, self.dead)?;
            moved_back(f, self.moved_back)?;
        } else {
            write!(f, "; {:?} is unchanged", self.dead)?;
        }
        stopped(f, &self.stopped)
    }
}

impl fmt::Display for PurgeSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.confirmed {
            write!(
                f,
                "deleted {} of {} dead letters from {:?}",
                self.deleted, self.walked.present, self.dead
            )?;
            moved_back(f, self.moved_back)?;
        } else {
            write!(
                f,
                "would delete {} of {} dead letters from {:?}; nothing was deleted (add --yes to \
                 delete them)",
                self.walked.matched, self.walked.present, self.dead
            )?;
        }
        stopped(f, &self.stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::dlq::letter::Facts;

    fn facts(reason: &str, list: Option<i64>, status: Option<i64>, at: i64) -> Facts {
        Facts {
            reason: reason.into(),
            list_id: list,
            status,
            error: status.map(|_| "ERROR_INVALID_PARAMETER".into()),
            failed_at: Some(EventTime(at * 1_000_000)),
            ..Facts::default()
        }
    }

    #[test]
    fn the_stats_table_lines_up_and_ends_with_the_total() {
        let mut stats = Stats::default();
        for at in [1_767_225_600, 1_767_229_200] {
            stats.add(&facts("rejected", Some(12345), Some(400), at));
        }
        stats.add(&facts("invalid_json", None, None, 1_767_225_600));
        let walked = Walked {
            present: 3,
            read: 3,
            matched: 3,
            ..Walked::default()
        };
        let table = stats_table(&stats, "q.dead", &walked);
        assert_eq!(
            table,
            "q.dead: 3 dead letters\n\
             REASON        LIST   STATUS  ERROR                    COUNT  OLDEST                \
             NEWEST\n\
             rejected      12345  400     ERROR_INVALID_PARAMETER      2  2026-01-01T00:00:00Z  \
             2026-01-01T01:00:00Z\n\
             invalid_json  -      -       -                            1  2026-01-01T00:00:00Z  \
             2026-01-01T00:00:00Z\n\
             total                                                     3\n"
        );
        let value = stats_json(&stats, "q.dead", &walked);
        assert_eq!(value["groups"][0]["count"], 2);
        assert_eq!(value["groups"][0]["list_id"], 12345);
        assert_eq!(value["groups"][1]["list_id"], Value::Null);
        assert_eq!(value["groups"][1]["oldest"], "2026-01-01T00:00:00Z");
    }

    #[test]
    fn a_body_cannot_drive_the_terminal() {
        assert_eq!(body_text(b"{\"a\":\"\x1b[2J\"}"), "{\"a\":\"\\u{1b}[2J\"}");
        assert_eq!(body_text(&[0xff, b'a']), "(2 bytes, not UTF-8) \u{fffd}a");
    }
}
