//! Which dead letters the applied log already supersedes: every update they would make is
//! older than a value some worker applied for its list, contact and field. Replaying them
//! changes nothing in Listrak (the worker acknowledges them as superseded).

use lapin::{BasicProperties, Connection};

use crate::config::Settings;
use crate::driver::superseded::SupersededGuard;
use crate::edges::applied_log::{self, ReadFrom};
use crate::edges::broker::{carried_event_time, stamped_time, Topology};
use crate::stages::decode::decode;
use crate::stages::mapping::{plan, Mapping};
use crate::stages::model::EventTime;

use super::DlqError;

/// What the applied log holds, and the mappings to read dead letters with.
pub struct SupersededCheck {
    guard: SupersededGuard,
    mappings: Vec<Mapping>,
    /// Records read from the log.
    pub records: u64,
}

impl SupersededCheck {
    /// Reads the whole applied log (as far back as it reaches).
    pub async fn read(
        connection: &Connection,
        topology: &Topology,
        settings: &Settings,
    ) -> Result<Self, DlqError> {
        // Every value, however many: a command's memory is not the worker's.
        let guard = SupersededGuard::with_watch(usize::MAX, 0, settings.applied_log.max_age);
        let records = applied_log::read_into(connection, topology, &guard, ReadFrom::First)
            .await
            .map_err(|error| DlqError::Walk {
                queue: topology.applied.clone(),
                reason: error.to_string(),
                hint: "",
            })?;
        Ok(Self {
            guard,
            mappings: settings.mappings.clone(),
            records,
        })
    }

    /// Whether every update of the message is older than what the log says was applied. A
    /// message whose updates cannot be known here (not decodable, no mapping, a field found
    /// by its audience's name) is not superseded.
    pub fn supersedes(&self, body: &[u8], properties: &BasicProperties) -> bool {
        let carried = carried_event_time(properties);
        let received = carried
            .or(stamped_time(properties))
            .unwrap_or_else(EventTime::now);
        let Ok(inbound) = decode(body, received) else {
            return false;
        };
        let Ok(planned) = plan(&inbound, &self.mappings, &()) else {
            return false;
        };
        if !planned.unresolved.is_empty() || planned.updates.is_empty() {
            return false;
        }
        planned.updates.iter().all(|update| {
            let time = carried.unwrap_or(update.timestamp);
            !update.fields.is_empty()
                && update.fields.iter().all(|(field, _)| {
                    self.guard
                        .is_superseded(update.list_id, &update.email, *field, time)
                })
        })
    }
}
