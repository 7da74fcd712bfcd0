//! The `reconcile` command: what Listrak holds for a list's fields against the newest value
//! the applied log says was applied to each (list, contact, field), and, with `--apply`, the
//! newest values sent again through the worker, so that they end in Listrak.
//!
//! A 201 only says Listrak started an import: imports that complete out of order, replicas
//! that raced, and edits in Listrak's UI all leave a field on another value than the newest
//! applied, and only reading Listrak shows it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use lapin::Connection;
use serde::Serialize;

use crate::commands::history::open_log;
use crate::commands::progress::Progress;
use crate::commands::publish::publish_lines;
use crate::config::Settings;
use crate::edges::applied_log::ReadFrom;
use crate::edges::broker::Topology;
use crate::edges::listrak::ListrakClient;
use crate::edges::telemetry::Metrics;
use crate::stages::decode::profile_update_body;
use crate::stages::model::{EventTime, ListId};

/// Get all Contacts takes at most 30 fields a request and 5,000 contacts a page.
const FIELDS_PER_READ: usize = 30;
const PAGE: usize = 5000;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct ReconcileOptions {
    pub list: ListId,
    /// Only these fields; all the applied log names for the list when empty.
    pub fields: Vec<u32>,
    /// Send the newest values again (through the exchange, so the worker applies them).
    pub apply: bool,
    /// Pages read per second at most.
    pub pages_per_second: f64,
}

/// A key whose value in Listrak is not the newest applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    pub email: String,
    pub field_id: u32,
    /// `None`: Listrak holds no value (or not the contact).
    pub listrak_value: Option<String>,
    pub newest_value: String,
    /// The newest value's event time (RFC 3339).
    pub event_time: String,
}

/// What `reconcile` found (and did).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Reconciled {
    pub list: u32,
    pub fields: Vec<u32>,
    /// Keys with a record in the applied log, compared with Listrak.
    pub checked: u64,
    pub in_sync: u64,
    pub differs: u64,
    /// Differing keys whose newest value was sent again (`--apply`).
    pub repaired: u64,
    /// Values Listrak holds for keys with no record within the log's horizon.
    pub unknown: u64,
    pub rows: Vec<Drift>,
}

/// The newest value applied to each (contact, field) of `list` in the applied log.
pub type Newest = BTreeMap<(String, u32), (String, EventTime)>;

/// Reads the whole applied log for `list` (only `fields`, unless empty).
pub async fn newest_applied(
    connection: &Connection,
    topology: &Topology,
    list: ListId,
    fields: &[u32],
) -> anyhow::Result<Newest> {
    let (read, total) = open_log(connection, topology, ReadFrom::First, "reconcile").await?;
    let progress = Progress::new("reading the applied log", u64::from(total));
    let wanted: BTreeSet<u32> = fields.iter().copied().collect();
    let mut newest = Newest::new();
    read.to_marker(|record| {
        progress.advance(1);
        if record.list != list.get() {
            return;
        }
        for contact in &record.a {
            for (field, value, before) in &contact.f {
                let Ok(field) = u32::try_from(*field) else {
                    continue;
                };
                if !wanted.is_empty() && !wanted.contains(&field) {
                    continue;
                }
                let time = EventTime(record.at.saturating_sub(*before));
                let key = (contact.e.clone(), field);
                // The newest by event time; of two at the same time, the later applied.
                let newer = newest.get(&key).is_none_or(|(_, seen)| time >= *seen);
                if newer {
                    newest.insert(key, (value.clone(), time));
                }
            }
        }
    })
    .await?;
    progress.clear();
    Ok(newest)
}

/// Reads what Listrak holds for `fields` of every contact of `list` (Get all Contacts,
/// paged, at most `pages_per_second`).
pub async fn listrak_values(
    api: &ListrakClient,
    list: ListId,
    fields: &[u32],
    pages_per_second: f64,
) -> anyhow::Result<BTreeMap<(String, u32), String>> {
    let pause = Duration::from_secs_f64(1.0 / pages_per_second.max(0.01));
    let progress = Progress::new("reading Listrak's contacts", 0);
    let mut held = BTreeMap::new();
    for chunk in fields.chunks(FIELDS_PER_READ) {
        let mut cursor: Option<String> = None;
        loop {
            let page = api
                .contacts_page(list, chunk, cursor.as_deref(), PAGE)
                .await
                .map_err(|error| {
                    anyhow::anyhow!("cannot read list {list} from Listrak: {error}")
                })?;
            progress.advance(page.contacts.len() as u64);
            for contact in page.contacts {
                for (field, value) in contact.values {
                    held.insert((contact.email.clone(), field), value);
                }
            }
            match page.next {
                Some(next) => cursor = Some(next),
                None => break,
            }
            tokio::time::sleep(pause).await;
        }
    }
    progress.clear();
    Ok(held)
}

/// Compares the newest applied values with what Listrak holds.
pub fn compare(
    list: ListId,
    fields: &[u32],
    newest: &Newest,
    held: &BTreeMap<(String, u32), String>,
) -> Reconciled {
    let mut found = Reconciled {
        list: list.get(),
        fields: fields.to_vec(),
        ..Reconciled::default()
    };
    for ((email, field), (value, time)) in newest {
        found.checked += 1;
        let listrak = held.get(&(email.clone(), *field));
        if listrak == Some(value) {
            found.in_sync += 1;
        } else {
            found.differs += 1;
            found.rows.push(Drift {
                email: email.clone(),
                field_id: *field,
                listrak_value: listrak.cloned(),
                newest_value: value.clone(),
                event_time: time.to_rfc3339_micros(),
            });
        }
    }
    found.unknown = held.keys().filter(|key| !newest.contains_key(*key)).count() as u64;
    found
}

/// The whole command: read the log and Listrak, compare, and with `apply` publish the newest
/// value of every differing key again, with its own event time, as a direct update the worker
/// applies through its normal path (batched, guarded, logged).
pub async fn reconcile(
    settings: &Settings,
    connection: &Connection,
    api: &ListrakClient,
    options: &ReconcileOptions,
) -> anyhow::Result<Reconciled> {
    let topology = Topology::of(settings);
    let newest = newest_applied(connection, &topology, options.list, &options.fields).await?;
    let fields: Vec<u32> = if options.fields.is_empty() {
        newest
            .keys()
            .map(|(_, field)| *field)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    } else {
        options.fields.clone()
    };
    let held = listrak_values(api, options.list, &fields, options.pages_per_second).await?;
    let mut found = compare(options.list, &fields, &newest, &held);
    if options.apply && !found.rows.is_empty() {
        let bodies: Vec<Vec<u8>> = found
            .rows
            .iter()
            .map(|drift| {
                profile_update_body(
                    options.list,
                    &drift.email,
                    drift.field_id,
                    &drift.newest_value,
                    &drift.event_time,
                    &format!(
                        "reconcile-{}-{}-{}",
                        options.list, drift.field_id, drift.email
                    ),
                )
            })
            .collect();
        let total = bodies.len() as u64;
        let published =
            publish_lines(&settings.amqp, &topology, bodies.into_iter().map(Ok), total).await?;
        found.repaired = published.messages;
    }
    Ok(found)
}

/// The result as text: the counts, then a row per differing key.
pub fn table(found: &Reconciled, applied: bool) -> String {
    let mut out = format!(
        "list {}: checked {}, in sync {}, differs {}, repaired {}, unknown {} (fields {})\n",
        found.list,
        found.checked,
        found.in_sync,
        found.differs,
        found.repaired,
        found.unknown,
        found
            .fields
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",")
    );
    if !found.rows.is_empty() {
        out.push_str(&format!(
            "{:<40}  {:>10}  {:<12}  {:<12}  {}\n",
            "email", "field", "listrak", "newest", "event time"
        ));
        for row in &found.rows {
            out.push_str(&format!(
                "{:<40}  {:>10}  {:<12}  {:<12}  {}\n",
                row.email,
                row.field_id,
                row.listrak_value.as_deref().unwrap_or("(none)"),
                row.newest_value,
                row.event_time
            ));
        }
        if !applied {
            out.push_str("nothing was changed; --apply sends the newest values again\n");
        }
    }
    out
}

/// `reconcile`: reads the list, compares, prints a table (or one JSON object), and with
/// `--apply` repairs.
pub async fn run(
    settings: &Settings,
    options: &ReconcileOptions,
    json: bool,
) -> anyhow::Result<()> {
    let api = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
    let connection = crate::commands::dlq::connect(&settings.amqp).await?;
    let found = reconcile(settings, &connection, &api, options).await;
    let _ = connection.close(200, "done".into()).await;
    let found = found?;
    if json {
        println!("{}", serde_json::to_string(&found)?);
    } else {
        print!("{}", table(&found, options.apply));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(email: &str, field: u32) -> (String, u32) {
        (email.to_owned(), field)
    }

    #[test]
    fn a_key_differs_when_listrak_holds_another_value_or_none_and_unlogged_values_are_unknown() {
        let list = ListId::new(7).unwrap();
        let newest: Newest = [
            (key("a@x.com", 1), ("on".to_owned(), EventTime(10))),
            (key("b@x.com", 1), ("off".to_owned(), EventTime(20))),
            (key("c@x.com", 1), ("on".to_owned(), EventTime(30))),
        ]
        .into();
        let held: BTreeMap<(String, u32), String> = [
            (key("a@x.com", 1), "on".to_owned()),
            (key("b@x.com", 1), "on".to_owned()),
            (key("d@x.com", 1), "on".to_owned()),
        ]
        .into();
        let found = compare(list, &[1], &newest, &held);
        assert_eq!(
            (found.checked, found.in_sync, found.differs, found.unknown),
            (3, 1, 2, 1)
        );
        assert_eq!(found.rows[0].email, "b@x.com");
        assert_eq!(found.rows[0].listrak_value.as_deref(), Some("on"));
        assert_eq!(found.rows[0].newest_value, "off");
        assert_eq!(found.rows[1].email, "c@x.com");
        assert_eq!(found.rows[1].listrak_value, None);
    }
}
