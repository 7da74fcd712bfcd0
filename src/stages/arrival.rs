//! A delivery's way in: its bytes decoded and mapped into the updates it asks for, their
//! event times trusted as far as `batch.clock_skew`, or the reason it can never be applied.

use std::time::Duration;

use crate::stages::decode::decode;
use crate::stages::mapping::{plan, Mapping, Plan, UnmappedAudiences};
use crate::stages::model::{EventTime, Rejection, Update};

/// What a delivery brings, as far as its preparation needs.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub body: &'a [u8],
    /// The event time an earlier delivery of this message used (a copy carries it in a
    /// header): every update of the message takes it again.
    pub carried: Option<EventTime>,
    /// The producer's AMQP `timestamp`.
    pub stamped: Option<EventTime>,
}

/// A delivery, prepared.
#[derive(Debug)]
pub enum Prepared {
    /// It can never be applied: dead-lettered at once, with the reason.
    Poison(Rejection),
    /// No mapping takes it: acked, nothing to do.
    Ignored,
    Plan {
        /// The updates, some with a field still to look up.
        plan: Plan,
        /// The event time a copy of the message carries on.
        event_time: EventTime,
        /// The first event time further ahead of `now` than `skew`, replaced by `now`.
        future: Option<EventTime>,
    },
}

/// Decodes and maps `delivery` at `now`. An event without a time of its own takes the
/// carried time, else the producer's stamp, else `now` (its first receipt).
pub fn prepare(
    delivery: Delivery<'_>,
    now: EventTime,
    skew: Duration,
    mappings: &[Mapping],
    unmapped: &impl UnmappedAudiences,
) -> Prepared {
    let received = delivery.carried.or(delivery.stamped).unwrap_or(now);
    let planned =
        decode(delivery.body, received).and_then(|inbound| plan(&inbound, mappings, unmapped));
    let mut plan = match planned {
        Err(poison) => {
            return Prepared::Poison(Rejection {
                reason: poison.reason,
                status: None,
                error: None,
                message: Some(poison.detail),
                list_id: None,
            })
        }
        Ok(plan) if plan.is_empty() => return Prepared::Ignored,
        Ok(plan) => plan,
    };
    let mut updates: Vec<&mut Update> = plan
        .updates
        .iter_mut()
        .chain(
            plan.unresolved
                .iter_mut()
                .map(|pending| &mut pending.update),
        )
        .collect();
    if let Some(carried) = delivery.carried {
        for update in &mut updates {
            update.timestamp = carried;
        }
    }
    let future = trust_event_times(updates, now, skew);
    let event_time = plan
        .updates
        .first()
        .or(plan.unresolved.first().map(|pending| &pending.update))
        .map_or(received, |update| update.timestamp);
    Prepared::Plan {
        plan,
        event_time,
        future,
    }
}

/// Replaces event times more than `skew` ahead of `now` by `now`; returns the first such time.
fn trust_event_times<'u>(
    updates: impl IntoIterator<Item = &'u mut Update>,
    now: EventTime,
    skew: Duration,
) -> Option<EventTime> {
    let mut claimed = None;
    for update in updates
        .into_iter()
        .filter(|u| u.timestamp.is_ahead_of(now, skew))
    {
        claimed.get_or_insert(update.timestamp);
        update.timestamp = now;
    }
    claimed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::model::DeadLetterReason;

    const HOUR: i64 = 3_600_000_000;
    const NOW: EventTime = EventTime(1_800_000_000_000_000);

    fn direct(timestamp: Option<&str>) -> Vec<u8> {
        let mut body = serde_json::json!({
            "type": "profile_update",
            "list_id": 7,
            "email": "a@example.com",
            "fields": {"3": "on"},
        });
        if let Some(timestamp) = timestamp {
            body["timestamp"] = timestamp.into();
        }
        serde_json::to_vec(&body).unwrap()
    }

    fn prepared(body: &[u8], carried: Option<EventTime>, stamped: Option<EventTime>) -> Prepared {
        let delivery = Delivery {
            body,
            carried,
            stamped,
        };
        prepare(delivery, NOW, Duration::from_secs(3600), &[], &())
    }

    /// The event time of the plan's update, the one a copy carries on, and what was claimed.
    fn times(prepared: Prepared) -> (EventTime, EventTime, Option<EventTime>) {
        match prepared {
            Prepared::Plan {
                plan,
                event_time,
                future,
            } => (plan.updates[0].timestamp, event_time, future),
            other => panic!("a plan, not {other:?}"),
        }
    }

    #[test]
    fn what_is_not_an_event_is_poison_with_its_reason() {
        let Prepared::Poison(rejection) = prepared(b"{not json", None, None) else {
            panic!("poison");
        };
        assert_eq!(rejection.reason, DeadLetterReason::InvalidJson);
        assert!(rejection.message.is_some());
        let Prepared::Poison(rejection) = prepared(br#"{"type":"page"}"#, None, None) else {
            panic!("poison");
        };
        assert_eq!(rejection.reason, DeadLetterReason::InvalidEvent);
    }

    #[test]
    fn an_event_no_mapping_takes_is_ignored() {
        let track = br#"{"type":"track","event":"Order Completed","userId":"u1"}"#;
        assert!(matches!(prepared(track, None, None), Prepared::Ignored));
    }

    #[test]
    fn event_times_come_from_the_event_then_the_carried_time_then_the_stamp_then_now() {
        let at = "2027-01-15T08:00:00Z";
        let own = EventTime::parse_rfc3339(at).unwrap();
        let carried = EventTime(own.0 - HOUR);
        let stamped = EventTime(own.0 - 2 * HOUR);
        let cases = [
            ("the event's own", direct(Some(at)), None, None, own),
            (
                "carried over the event's",
                direct(Some(at)),
                Some(carried),
                None,
                carried,
            ),
            (
                "the producer's stamp",
                direct(None),
                None,
                Some(stamped),
                stamped,
            ),
            (
                "carried over the stamp",
                direct(None),
                Some(carried),
                Some(stamped),
                carried,
            ),
            ("now, at first receipt", direct(None), None, None, NOW),
        ];
        for (case, body, carried, stamped, expected) in cases {
            let (update, copy, future) = times(prepared(&body, carried, stamped));
            assert_eq!(update, expected, "{case}");
            assert_eq!(copy, expected, "{case}: a copy carries it on");
            assert_eq!(future, None, "{case}");
        }
    }

    #[test]
    fn an_event_time_beyond_the_skew_is_replaced_by_now_and_reported() {
        let ahead = EventTime(NOW.0 + 2 * HOUR);
        let body = direct(Some(&ahead.to_rfc3339()));
        let (update, copy, future) = times(prepared(&body, None, None));
        assert_eq!(update, NOW);
        assert_eq!(copy, NOW);
        assert_eq!(future.map(|t| t.0 / 1_000_000), Some(ahead.0 / 1_000_000));
        // Within the skew, trusted.
        let near = EventTime(NOW.0 + HOUR / 2);
        let (update, _, future) = times(prepared(&direct(Some(&near.to_rfc3339())), None, None));
        assert_eq!(update.0 / 1_000_000, near.0 / 1_000_000);
        assert_eq!(future, None);
    }
}
