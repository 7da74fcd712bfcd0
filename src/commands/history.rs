//! The `history` command: what happened to one contact, from the applied log (every value
//! Listrak accepted for it, oldest first) and the dead-letter queue (what still waits for it).

use std::time::Duration;

use lapin::Connection;
use serde_json::json;

use crate::commands::dlq::{DeadLetters, Filter};
use crate::commands::progress::Progress;
use crate::config::Settings;
use crate::edges::applied_log::{self, AppliedValue, ReadFrom};
use crate::edges::broker::{queue_counts, Publisher, Topology};
use crate::edges::listrak::ListrakClient;
use crate::edges::telemetry::Metrics;
use crate::stages::model::{EventTime, ListId};

/// Dead letters read at most, looking for the contact's.
const DEAD_LETTERS_READ: usize = 1_000_000;

/// A dead letter that names the contact.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub reason: String,
    pub list_id: Option<i64>,
    pub failed_at: Option<EventTime>,
    pub message_id: Option<String>,
    pub message: Option<String>,
}

#[derive(Debug, Default)]
pub struct History {
    /// Oldest applied first.
    pub applied: Vec<AppliedValue>,
    pub waiting: Vec<Waiting>,
    /// Records of the log read.
    pub records: u64,
    /// What Listrak holds now for each (list, field) applied, when asked (`--listrak`).
    pub listrak: Option<Vec<HeldNow>>,
}

/// One field of the contact as Listrak holds it now; `value` is `None` when Listrak holds no
/// value (or not the contact).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldNow {
    pub list: u32,
    pub field: u32,
    pub value: Option<String>,
    /// The newest value applied, to compare.
    pub newest: String,
}

/// Reads, for every list and field of `history`, what Listrak holds now for `email` (Get a
/// Contact, one request per list).
pub async fn listrak_now(
    api: &crate::edges::listrak::ListrakClient,
    history: &History,
    email: &str,
) -> anyhow::Result<Vec<HeldNow>> {
    use std::collections::BTreeMap;
    let email = email.trim().to_lowercase();
    // The newest applied value of each (list, field), by event time.
    let mut newest: BTreeMap<(u32, u32), &AppliedValue> = BTreeMap::new();
    for value in &history.applied {
        let Ok(field) = u32::try_from(value.field) else {
            continue;
        };
        let key = (value.list, field);
        if newest
            .get(&key)
            .is_none_or(|seen| value.event_time >= seen.event_time)
        {
            newest.insert(key, value);
        }
    }
    let mut lists: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (list, field) in newest.keys() {
        lists.entry(*list).or_default().push(*field);
    }
    let mut held = Vec::new();
    for (list, fields) in lists {
        let Some(list_id) = crate::stages::model::ListId::new(i64::from(list)) else {
            continue;
        };
        let contact = api
            .contact(list_id, &email, &fields)
            .await
            .map_err(|error| anyhow::anyhow!("cannot read {email} from Listrak: {error}"))?;
        for field in fields {
            let value = contact.as_ref().and_then(|contact| {
                contact
                    .values
                    .iter()
                    .find(|(id, _)| *id == field)
                    .map(|(_, value)| value.clone())
            });
            held.push(HeldNow {
                list,
                field,
                value,
                newest: newest[&(list, field)].value.clone(),
            });
        }
    }
    Ok(held)
}

/// Opens the applied log for a command that reads it to its end (`from` on), with how many
/// messages it holds (for the progress line); a log that does not exist is said in words.
pub(crate) async fn open_log(
    connection: &Connection,
    topology: &Topology,
    from: ReadFrom,
    purpose: &str,
) -> anyhow::Result<(applied_log::Read, u32)> {
    let channel = connection.create_channel().await?;
    let (total, _) = queue_counts(&channel, &topology.applied)
        .await
        .map_err(|error| {
            anyhow::anyhow!(
                "cannot read the applied log {:?} (has a worker of this configuration run?): \
                 {error}",
                topology.applied
            )
        })?;
    let _ = channel.close(200, "counted".into()).await;
    let publisher = Publisher::new(connection).await?;
    let read = applied_log::Read::open(connection, &publisher, topology, from, purpose).await;
    let _ = publisher.channel().close(200, "done".into()).await;
    Ok((read?, total))
}

/// Reads the applied log (from `since` ago, or all it holds) and the dead-letter queue for
/// `email` (letter case aside), on `list` if given.
pub async fn history(
    connection: &Connection,
    topology: &Topology,
    email: &str,
    list: Option<u32>,
    since: Option<Duration>,
) -> anyhow::Result<History> {
    let email = email.trim().to_lowercase();
    let from = since.map_or(ReadFrom::First, ReadFrom::Age);
    let (read, total) = open_log(connection, topology, from, "history").await?;
    let progress = Progress::new("reading the applied log", u64::from(total));
    let mut found = History::default();
    found.records = read
        .to_marker(|record| {
            progress.advance(1);
            found.applied.extend(record.values_for(&email, list));
        })
        .await?;
    progress.clear();
    found
        .applied
        .sort_by_key(|value| (value.applied_at, value.event_time));

    let filter = Filter {
        list_ids: list.map(i64::from).into_iter().collect(),
        ..Filter::default()
    };
    let (letters, _) = DeadLetters::new(connection, topology)
        .peek(&filter, DEAD_LETTERS_READ)
        .await?;
    for letter in letters {
        let body = String::from_utf8_lossy(&letter.body).to_lowercase();
        if !body.contains(&email) {
            continue;
        }
        found.waiting.push(Waiting {
            reason: letter.facts.reason.clone(),
            list_id: letter.facts.list_id,
            failed_at: letter.facts.failed_at,
            message_id: letter
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            message: letter.facts.message.clone(),
        });
    }
    Ok(found)
}

/// The history as a table, oldest first.
pub fn table(history: &History, email: &str) -> String {
    let mut out = String::new();
    if history.applied.is_empty() {
        out.push_str(&format!(
            "no value applied to {email} in the {} records of the applied log read\n",
            history.records
        ));
    } else {
        out.push_str(&format!(
            "{:<24}  {:>10}  {:>10}  {:<8}  {:<24}  {:<24}  {}\n",
            "applied at", "list", "field", "value", "event time", "message id", "resource id"
        ));
        for value in &history.applied {
            out.push_str(&format!(
                "{:<24}  {:>10}  {:>10}  {:<8}  {:<24}  {:<24}  {}\n",
                value.applied_at.to_rfc3339(),
                value.list,
                value.field,
                value.value,
                value.event_time.to_rfc3339(),
                value.message_ids.join(","),
                value.resource_ids.join(","),
            ));
        }
    }
    if let Some(held) = &history.listrak {
        out.push_str("\nwhat Listrak holds now:\n");
        for now in held {
            let verdict = if now.value.as_deref() == Some(now.newest.as_str()) {
                "the newest applied"
            } else {
                "NOT the newest applied; `reconcile --apply` repairs it"
            };
            out.push_str(&format!(
                "  list {:<10} field {:<10} {:<12} ({verdict}: {})\n",
                now.list,
                now.field,
                now.value.as_deref().unwrap_or("(none)"),
                now.newest
            ));
        }
    }
    if history.waiting.is_empty() {
        out.push_str("no dead letter waits for it\n");
    } else {
        out.push_str(&format!(
            "\n{} dead letters wait for it:\n",
            history.waiting.len()
        ));
        for letter in &history.waiting {
            out.push_str(&format!(
                "  {:<18} list {:<10} failed {:<24} message id {}{}\n",
                letter.reason,
                letter.list_id.map_or("-".into(), |id| id.to_string()),
                letter.failed_at.map_or("-".into(), |at| at.to_rfc3339()),
                letter.message_id.as_deref().unwrap_or("-"),
                letter
                    .message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default(),
            ));
        }
    }
    out
}

/// The history as one JSON object.
pub fn to_json(history: &History, email: &str) -> String {
    let applied: Vec<_> = history
        .applied
        .iter()
        .map(|value| {
            json!({
                "list_id": value.list,
                "field_id": value.field,
                "value": value.value,
                "event_time": value.event_time.to_rfc3339_micros(),
                "applied_at": value.applied_at.to_rfc3339_micros(),
                "message_ids": value.message_ids,
                "resource_ids": value.resource_ids,
            })
        })
        .collect();
    let waiting: Vec<_> = history
        .waiting
        .iter()
        .map(|letter| {
            json!({
                "reason": letter.reason,
                "list_id": letter.list_id,
                "failed_at": letter.failed_at.map(EventTime::to_rfc3339),
                "message_id": letter.message_id,
                "message": letter.message,
            })
        })
        .collect();
    let mut answer = json!({
        "email": email.trim().to_lowercase(),
        "applied": applied,
        "dead_letters": waiting,
        "records_read": history.records,
    });
    if let Some(held) = &history.listrak {
        answer["listrak"] = held
            .iter()
            .map(|now| {
                json!({
                    "list_id": now.list,
                    "field_id": now.field,
                    "value": now.value,
                    "newest_applied": now.newest,
                })
            })
            .collect();
    }
    answer.to_string()
}

/// What `history` is asked.
pub struct HistoryRequest {
    pub email: String,
    pub list: Option<ListId>,
    pub since: Option<Duration>,
    pub json: bool,
    /// Also read what Listrak holds now.
    pub listrak: bool,
}

/// `history`: what the applied log and the dead-letter queue say of one contact, as a table
/// or JSON.
pub async fn run(settings: &Settings, request: HistoryRequest) -> anyhow::Result<()> {
    let HistoryRequest {
        email,
        list,
        since,
        json,
        listrak,
    } = request;
    let topology = Topology::of(settings);
    let connection = crate::commands::dlq::connect(&settings.amqp).await?;
    let list = list.map(ListId::get);
    let found = history(&connection, &topology, &email, list, since).await;
    let _ = connection.close(200, "done".into()).await;
    let mut found = found?;
    if listrak {
        let api = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
        found.listrak = Some(listrak_now(&api, &found, &email).await?);
    }
    if json {
        println!("{}", to_json(&found, &email));
    } else {
        print!("{}", table(&found, &email));
    }
    Ok(())
}
