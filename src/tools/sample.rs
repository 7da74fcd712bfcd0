//! Sample Engage traffic: audience events for the demo, the tests and the benchmark, with the
//! Listrak state they must produce.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::stages::model::EventTime;

/// The demo's mappings, as configuration text: two lists, three mapped audiences (one of
/// them fed by identify calls), and one audience nobody maps (its events are ignored).
pub const MAPPINGS_TOML: &str = r#"
[[mappings]]
name = "vip-customers"
events = ["Audience Entered", "Audience Exited"]
audience_key = "vip_customers"
list_id = 1001
profile_fields = { "101" = "useAudienceKey" }

[[mappings]]
name = "cart-abandoners"
events = ["Audience Entered", "Audience Exited"]
audience_key = "cart_abandoners"
list_id = 1001
profile_fields = { "102" = "useAudienceKey" }

[[mappings]]
name = "cart-abandoners-on-the-second-list"
events = ["Audience Entered", "Audience Exited"]
audience_key = "cart_abandoners"
list_id = 2002
profile_fields = { "201" = "useAudienceKey", "202" = "abandoned-cart" }

[[mappings]]
name = "newsletter-fans"
types = ["identify"]
audience_key = "newsletter_fans"
list_id = 2002
profile_fields = { "203" = "useAudienceKey" }
"#;

/// The Check Box field of each audience in [`MAPPINGS_TOML`]: (list, field id, audience
/// key). The demo provisions these fields and puts the ids Listrak gives in their place.
pub const AUDIENCE_FIELDS: [(u32, u32, &str); 4] = [
    (1001, 101, "vip_customers"),
    (1001, 102, "cart_abandoners"),
    (2002, 201, "cart_abandoners"),
    (2002, 203, "newsletter_fans"),
];

/// The Text field [`MAPPINGS_TOML`] writes "abandoned-cart" to: (list, field id).
pub const TEXT_FIELD: (u32, u32) = (2002, 202);

/// Listrak's expected state: list → email → field → value.
pub type State = BTreeMap<u32, BTreeMap<String, BTreeMap<u32, String>>>;

/// Generated traffic: message bodies in publish order, and what they must leave behind.
pub struct Traffic {
    pub bodies: Vec<Vec<u8>>,
    pub expected: State,
    /// Bodies the worker must dead-letter, by reason.
    pub poison: BTreeMap<&'static str, usize>,
    /// Bodies of an audience no mapping names.
    pub ignored: usize,
}

/// How to shape the traffic.
#[derive(Debug, Clone, Copy)]
pub struct TrafficShape {
    pub events: usize,
    pub people: usize,
    /// One in this many events is malformed (0: none).
    pub poison_every: usize,
    /// One in this many events carries a timestamp older than the person's previous one.
    pub late_every: usize,
    /// Each person appears at most once per audience, so every (list, contact, field) is
    /// decided by one event and the final state does not depend on the order in which the
    /// events are applied. Needs `people` × 4 audiences ≥ `events`.
    pub one_event_per_field: bool,
    pub seed: u64,
}

impl Default for TrafficShape {
    fn default() -> Self {
        Self {
            events: 3000,
            people: 600,
            poison_every: 97,
            late_every: 23,
            one_event_per_field: false,
            seed: 7,
        }
    }
}

/// Which fields each audience sets, and where.
fn targets(audience: &str) -> &'static [(u32, u32, Option<&'static str>)] {
    match audience {
        "vip_customers" => &[(1001, 101, None)],
        "cart_abandoners" => &[
            (1001, 102, None),
            (2002, 201, None),
            (2002, 202, Some("abandoned-cart")),
        ],
        "newsletter_fans" => &[(2002, 203, None)],
        _ => &[],
    }
}

const AUDIENCES: [&str; 4] = [
    "vip_customers",
    "cart_abandoners",
    "newsletter_fans",
    "high_spenders",
];
pub const BASE_MICROS: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

/// Events as one JSON array, as Segment's Webhooks destination batches them (each body must
/// be JSON).
pub fn json_array<B: AsRef<[u8]>>(bodies: &[B]) -> Vec<u8> {
    let mut array = b"[".to_vec();
    for (index, body) in bodies.iter().enumerate() {
        if index > 0 {
            array.push(b',');
        }
        array.extend_from_slice(body.as_ref());
    }
    array.push(b']');
    array
}

pub fn email(person: usize) -> String {
    format!("person{person}@example.com")
}

/// Generates the traffic deterministically from the shape's seed.
pub fn generate(shape: TrafficShape) -> Traffic {
    let mut rng = StdRng::seed_from_u64(shape.seed);
    let mut bodies = Vec::with_capacity(shape.events);
    let mut poison: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut ignored = 0;
    // (list, email, field) → (timestamp, publish index, value)
    let mut winners: BTreeMap<(u32, String, u32), (i64, usize, String)> = BTreeMap::new();
    let mut member: BTreeMap<(usize, &str), bool> = BTreeMap::new();
    // Drawn only when asked for, so that the other shapes stay the traffic they were.
    let pairs = shape.one_event_per_field.then(|| {
        let pairs = shape.people * AUDIENCES.len();
        assert!(
            pairs >= shape.events,
            "one event per field needs people × {} ≥ events",
            AUDIENCES.len()
        );
        rand::seq::index::sample(&mut rng, pairs, shape.events)
    });

    for index in 0..shape.events {
        if shape.poison_every > 0 && index % shape.poison_every == shape.poison_every / 2 {
            let (reason, body) = match (index / shape.poison_every) % 4 {
                0 => (
                    "invalid_json",
                    b"{\"type\": \"track\", \"event\": ".to_vec(),
                ),
                1 => ("invalid_json", vec![0xff, 0xfe, b'{', b'}']),
                2 => (
                    "invalid_event",
                    track(
                        "Audience Entered",
                        "vip_customers",
                        true,
                        "not-an-email",
                        index,
                        BASE_MICROS,
                    ),
                ),
                _ => (
                    "invalid_event",
                    serde_json::to_vec(&json!({"type": "track", "event": 42})).unwrap(),
                ),
            };
            *poison.entry(reason).or_default() += 1;
            bodies.push(body);
            continue;
        }
        let (person, audience) = match &pairs {
            Some(pairs) => {
                let pair = pairs.index(index);
                (pair / AUDIENCES.len(), AUDIENCES[pair % AUDIENCES.len()])
            }
            None => (
                rng.random_range(0..shape.people),
                AUDIENCES[rng.random_range(0..AUDIENCES.len())],
            ),
        };
        let was = member.get(&(person, audience)).copied().unwrap_or(false);
        // Mostly a change of membership; sometimes a repeat of the current state.
        let entered = if rng.random_bool(0.8) { !was } else { was };
        member.insert((person, audience), entered);
        let late = shape.late_every > 0 && index % shape.late_every == 0 && index > 0;
        let micros = if late {
            BASE_MICROS + (index as i64 - 50).max(0) * 1_000
        } else {
            BASE_MICROS + index as i64 * 1_000
        };
        let address = email(person);
        let body = if audience == "newsletter_fans" {
            identify(audience, entered, &address, index, micros)
        } else {
            let event = if entered {
                "Audience Entered"
            } else {
                "Audience Exited"
            };
            track(event, audience, entered, &address, index, micros)
        };
        bodies.push(body);
        let fields = targets(audience);
        if fields.is_empty() {
            ignored += 1;
        }
        for (list, field, literal) in fields {
            let value = literal
                .map_or(if entered { "on" } else { "off" }, |v| v)
                .to_string();
            let key = (*list, address.clone(), *field);
            let entry = winners.entry(key).or_insert((i64::MIN, 0, String::new()));
            if (micros, index) >= (entry.0, entry.1) {
                *entry = (micros, index, value);
            }
        }
    }

    let mut expected = State::new();
    for ((list, email, field), (_, _, value)) in winners {
        expected
            .entry(list)
            .or_default()
            .entry(email)
            .or_default()
            .insert(field, value);
    }
    Traffic {
        bodies,
        expected,
        poison,
        ignored,
    }
}

fn timestamp(micros: i64) -> String {
    EventTime(micros).to_rfc3339()
}

pub fn track(
    event: &str,
    audience: &str,
    member: bool,
    email: &str,
    index: usize,
    micros: i64,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "track",
        "event": event,
        "messageId": format!("sample-{index}"),
        "timestamp": timestamp(micros),
        "userId": format!("user-{email}"),
        "properties": { "audience_key": audience, audience: member },
        "context": {
            "traits": { "email": email },
            "personas": {
                "computation_key": audience,
                "computation_class": "audience",
                "space_id": "spa_sample"
            }
        }
    }))
    .expect("JSON")
}

pub fn identify(audience: &str, member: bool, email: &str, index: usize, micros: i64) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "type": "identify",
        "messageId": format!("sample-{index}"),
        "timestamp": timestamp(micros),
        "userId": format!("user-{email}"),
        "traits": { "email": email, audience: member },
        "context": {
            "personas": {
                "computation_key": audience,
                "computation_class": "audience",
                "space_id": "spa_sample"
            }
        }
    }))
    .expect("JSON")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn one_event_per_field_names_each_person_once_per_audience() {
        let traffic = generate(TrafficShape {
            events: 2000,
            people: 600,
            poison_every: 0,
            one_event_per_field: true,
            ..TrafficShape::default()
        });
        let mut pairs = BTreeSet::new();
        for body in &traffic.bodies {
            let event: serde_json::Value = serde_json::from_slice(body).unwrap();
            let text = |pointers: &[&str]| {
                pointers
                    .iter()
                    .find_map(|p| event.pointer(p).and_then(|v| v.as_str()))
                    .unwrap()
                    .to_owned()
            };
            let email = text(&["/context/traits/email", "/traits/email"]);
            let audience = text(&["/context/personas/computation_key"]);
            assert!(
                pairs.insert((email, audience)),
                "a person appears twice in one audience"
            );
        }
        assert_eq!(pairs.len(), 2000);
        let fields_set: usize = traffic
            .expected
            .values()
            .flat_map(|contacts| contacts.values())
            .map(|fields| fields.len())
            .sum();
        let fields_of_events: usize = pairs
            .iter()
            .map(|(_, audience)| targets(audience).len())
            .sum();
        assert_eq!(
            fields_set, fields_of_events,
            "every field is decided by exactly one event"
        );
    }
}
