//! Mapping: which profile-field updates a decoded message asks for (Segment's semantics, stricter).
//!
//! Segment's Listrak destination quietly sends what it cannot make sense of (the literal
//! "useAudienceKey", an empty email); here such a message is poison, so that it lands in
//! the dead-letter queue where someone will see it.

mod json_path;
mod rules;

pub use json_path::JsonPath;
pub use rules::{
    default_email_paths, AudienceField, FieldRule, ListSource, Mapping, SegmentType,
    DEFAULT_EMAIL_PATHS,
};

use crate::stages::decode::{
    at, list_id_from_json, member, normalize_email, Inbound, Json, Poison, SegmentEvent,
    SegmentKind,
};
use crate::stages::model::{FieldId, ListId, Update};

/// The event names Engage gives audience membership changes.
const ENTERED: &str = "Audience Entered";
const EXITED: &str = "Audience Exited";

/// Told of every audience event no mapping takes: an event with an audience key that no
/// mapping's events, types and `audience_key` accept, and that is therefore ignored. The
/// worker counts them (`listrak_unmapped_audience_events_total`), so that an audience
/// created in Engage and never mapped shows up.
pub trait UnmappedAudiences {
    fn unmapped_audience(&self, audience_key: &str);
}

/// For callers that do not count them.
impl UnmappedAudiences for () {
    fn unmapped_audience(&self, _audience_key: &str) {}
}

/// What a message asks for: updates whose fields are known, and updates whose field an
/// `audience_field` mapping names by the audience key, still to be resolved to an id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub updates: Vec<Update>,
    pub unresolved: Vec<Unresolved>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.updates.is_empty() && self.unresolved.is_empty()
    }
}

/// An update for the Check Box field named `audience_key` in the list's `group`: the field
/// id comes from the list's catalogue (see `fields`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unresolved {
    /// The contact and time; its `fields` are empty until the field is resolved.
    pub update: Update,
    pub group: String,
    pub audience_key: String,
    /// "on" or "off".
    pub value: &'static str,
    /// Whether a missing field is created (else the message is dead-lettered).
    pub create: bool,
}

impl Unresolved {
    pub fn list_id(&self) -> ListId {
        self.update.list_id
    }

    /// The update, with the field it resolved to.
    pub fn resolved(mut self, field: FieldId) -> Update {
        self.update.fields.push((field, self.value.to_owned()));
        self.update
    }
}

/// The updates a message asks for: a direct update's own, or one per matching mapping.
/// Empty means it matched no mapping: it is acknowledged and counted as ignored, and when
/// it is an audience event, its audience key goes to `unmapped`.
pub fn plan(
    inbound: &Inbound<'_>,
    mappings: &[Mapping],
    unmapped: &impl UnmappedAudiences,
) -> Result<Plan, Poison> {
    let plan = updates(inbound, mappings)?;
    // Every mapping that takes an event adds an update to the plan: an empty plan for an
    // audience event means no mapping takes its audience.
    let unmapped_key = match inbound {
        Inbound::Segment(event) if plan.is_empty() => audience_key(event),
        _ => None,
    };
    if let Some(key) = unmapped_key {
        unmapped.unmapped_audience(key);
    }
    Ok(plan)
}

fn updates(inbound: &Inbound<'_>, mappings: &[Mapping]) -> Result<Plan, Poison> {
    match inbound {
        Inbound::ProfileUpdate(direct) => Ok(Plan {
            updates: vec![direct.update.clone()],
            unresolved: Vec::new(),
        }),
        // One matching mapping that cannot be applied poisons the whole message: it is
        // settled as one, so it goes to the dead-letter queue whole, with none of its
        // updates sent; once the cause is fixed, replaying it applies every mapping.
        Inbound::Segment(event) => {
            let key = audience_key(event);
            let mut plan = Plan::default();
            for mapping in mappings.iter().filter(|m| matches(event, key, m)) {
                let update = update(event, mapping)?;
                match &mapping.audience_field {
                    None => plan.updates.push(update),
                    Some(field) => plan
                        .unresolved
                        .push(unresolved(event, mapping, field, update)?),
                }
            }
            Ok(plan)
        }
    }
}

/// The audience key names the field; membership decides its value.
fn unresolved(
    event: &SegmentEvent<'_>,
    mapping: &Mapping,
    field: &AudienceField,
    update: Update,
) -> Result<Unresolved, Poison> {
    let poison = |why: String| Poison::invalid_event(format!("mapping {:?}: {why}", mapping.name));
    let key = audience_key(event).ok_or_else(|| {
        poison(
            "`audience_field` names the field by the audience key, and the event has none \
             (context.personas.computation_key or properties.audience_key)"
                .to_owned(),
        )
    })?;
    let value = member_value(event)
        .map_err(|why| poison(format!("`audience_field` takes the membership, but {why}")))?;
    Ok(Unresolved {
        update,
        group: field.group.clone(),
        audience_key: key.to_owned(),
        value,
        create: field.create,
    })
}

/// `context.personas.computation_key` (what Engage sends), else `properties.audience_key`;
/// non-empty strings only.
pub fn audience_key<'e>(event: &'e SegmentEvent<'_>) -> Option<&'e str> {
    let from = |path: &[&str]| {
        at(&event.body, path)
            .and_then(Json::as_str)
            .filter(|key| !key.is_empty())
    };
    from(&["context", "personas", "computation_key"])
        .or_else(|| from(&["properties", "audience_key"]))
}

/// Whether `mapping` takes `event`, whose audience key is `key`.
fn matches(event: &SegmentEvent<'_>, key: Option<&str>, mapping: &Mapping) -> bool {
    let taken = match &event.kind {
        SegmentKind::Track { event: name } => {
            mapping.events.iter().any(|wanted| wanted == name)
                || mapping.types.contains(&SegmentType::Track)
        }
        SegmentKind::Identify => mapping.types.contains(&SegmentType::Identify),
    };
    taken
        && mapping
            .audience_key
            .as_deref()
            .is_none_or(|wanted| key == Some(wanted))
}

fn update(event: &SegmentEvent<'_>, mapping: &Mapping) -> Result<Update, Poison> {
    let poison = |why: String| Poison::invalid_event(format!("mapping {:?}: {why}", mapping.name));

    // The first path that holds a string is the email, even if that string is no address:
    // falling through to another path could pick someone else's.
    let (path, raw) = mapping
        .email_paths
        .iter()
        .find_map(|path| Some((path, path.lookup(&event.body)?.as_str()?)))
        .ok_or_else(|| poison(format!("no email at {}", joined(&mapping.email_paths))))?;
    let email = normalize_email(raw)
        .ok_or_else(|| poison(format!("the email at {path} is not a plausible address")))?;

    let list_id = match &mapping.list {
        ListSource::Id(id) => *id,
        ListSource::Path(path) => match path.lookup(&event.body).filter(|value| !value.is_null()) {
            None => return Err(poison(format!("no list id at {path}"))),
            Some(value) => list_id_from_json(value).ok_or_else(|| {
                poison(format!(
                    "the list id at {path} is not a positive 32-bit integer"
                ))
            })?,
        },
    };

    // Worked out once, and only when a field asks for it.
    let mut membership = None;
    let mut fields = Vec::with_capacity(mapping.profile_fields.len());
    for (id, rule) in &mapping.profile_fields {
        let value = match rule {
            FieldRule::Literal(text) => text.clone(),
            FieldRule::UseAudienceKey => match membership {
                Some(value) => value,
                None => {
                    let value = member_value(event).map_err(|why| {
                        poison(format!("field {id} is \"useAudienceKey\", but {why}"))
                    })?;
                    membership = Some(value);
                    value
                }
            }
            .to_owned(),
        };
        fields.push((*id, value));
    }

    Ok(Update {
        list_id,
        email,
        fields,
        timestamp: event.timestamp,
    })
}

/// "on" or "off": the boolean under the audience key decides, else the event name.
fn member_value(event: &SegmentEvent<'_>) -> Result<&'static str, String> {
    let key = audience_key(event);
    if let Some(flag) = key.and_then(|key| membership_flag(event, key)) {
        return Ok(if flag { "on" } else { "off" });
    }
    match &event.kind {
        SegmentKind::Track { event: name } if name == ENTERED => Ok("on"),
        SegmentKind::Track { event: name } if name == EXITED => Ok("off"),
        _ => Err(match (key, &event.kind) {
            (None, _) => format!(
                "the event has no audience key (context.personas.computation_key or \
                 properties.audience_key) and is not named {ENTERED:?} or {EXITED:?}"
            ),
            (Some(key), SegmentKind::Track { .. }) => format!(
                "properties.{key} is not a boolean and the event is not named {ENTERED:?} or \
                 {EXITED:?}"
            ),
            (Some(key), SegmentKind::Identify) => {
                format!("neither traits.{key} nor context.traits.{key} is a boolean")
            }
        }),
    }
}

/// `properties[key]` for a track event; `traits[key]`, else `context.traits[key]`, for an
/// identify event (Engage puts an identify's traits at the top; other sources in context).
fn membership_flag(event: &SegmentEvent<'_>, key: &str) -> Option<bool> {
    let flag = |path: &[&str]| {
        at(&event.body, path)
            .and_then(|traits| member(traits.as_object()?, key))
            .and_then(Json::as_bool)
    };
    match event.kind {
        SegmentKind::Track { .. } => flag(&["properties"]),
        SegmentKind::Identify => flag(&["traits"]).or_else(|| flag(&["context", "traits"])),
    }
}

fn joined(paths: &[JsonPath]) -> String {
    paths
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::model::{DeadLetterReason, EventTime, FieldId, ListId};
    use serde_json::{json, Value};

    const RECEIVED: EventTime = EventTime(1_700_000_000_000_000);

    fn list(id: i64) -> ListId {
        ListId::new(id).unwrap()
    }

    fn field(id: i64) -> FieldId {
        FieldId::new(id).unwrap()
    }

    fn path(text: &str) -> JsonPath {
        JsonPath::parse(text).unwrap()
    }

    fn inbound(body: &Value) -> Inbound<'static> {
        crate::stages::decode::tests::decoded(body)
    }

    /// Takes every track and identify event; one field from the audience membership.
    fn any_event() -> Mapping {
        Mapping {
            name: "vip".into(),
            events: vec![],
            types: vec![SegmentType::Track, SegmentType::Identify],
            audience_key: None,
            list: ListSource::Id(list(12345)),
            email_paths: default_email_paths(),
            profile_fields: vec![(field(456), FieldRule::UseAudienceKey)],
            audience_field: None,
        }
    }

    /// One mapping for every audience: the field is the audience key's in the group.
    fn every_audience(create: bool) -> Mapping {
        Mapping {
            name: "every-audience".into(),
            profile_fields: vec![],
            audience_field: Some(AudienceField {
                group: "Engage Audiences".into(),
                create,
            }),
            ..audience_events()
        }
    }

    /// Takes the two Engage audience events by name, as the contract's example does.
    fn audience_events() -> Mapping {
        Mapping {
            events: vec!["Audience Entered".into(), "Audience Exited".into()],
            types: vec![],
            ..any_event()
        }
    }

    fn track(name: &str, extra: Value) -> Value {
        let mut body = json!({
            "type": "track",
            "event": name,
            "context": {"traits": {"email": "a@example.com"}},
        });
        merge(&mut body, extra);
        body
    }

    fn identify(extra: Value) -> Value {
        let mut body = json!({"type": "identify", "traits": {"email": "a@example.com"}});
        merge(&mut body, extra);
        body
    }

    /// Deep merge, so a case states only what differs from the usual event.
    fn merge(into: &mut Value, extra: Value) {
        match (into, extra) {
            (Value::Object(into), Value::Object(extra)) => {
                for (key, value) in extra {
                    merge(into.entry(key).or_insert(Value::Null), value);
                }
            }
            (into, extra) => *into = extra,
        }
    }

    fn planned(body: &Value, mappings: &[Mapping]) -> Result<Vec<Update>, Poison> {
        plan(&inbound(body), mappings, &()).map(|plan| plan.updates)
    }

    fn unresolved(body: &Value, mappings: &[Mapping]) -> Result<Vec<Unresolved>, Poison> {
        plan(&inbound(body), mappings, &()).map(|plan| plan.unresolved)
    }

    #[test]
    fn audience_field_mapping_leaves_the_field_to_be_resolved_by_the_audience_key() {
        let body = track(
            "Audience Exited",
            json!({
                "context": {"personas": {"computation_key": "gold"}},
                "properties": {"gold": false}
            }),
        );
        let pending = unresolved(&body, &[every_audience(true)]).unwrap();
        assert_eq!(pending.len(), 1);
        let pending = pending[0].clone();
        assert_eq!(pending.group, "Engage Audiences");
        assert_eq!(pending.audience_key, "gold");
        assert_eq!(pending.value, "off");
        assert!(pending.create);
        assert!(pending.update.fields.is_empty());
        let update = pending.resolved(field(77));
        assert_eq!(update.fields, vec![(field(77), "off".to_owned())]);
        assert_eq!(update.list_id, list(12345));
        assert_eq!(update.email, "a@example.com");
        assert_eq!(planned(&body, &[every_audience(true)]), Ok(vec![]));
    }

    #[test]
    fn audience_field_mapping_keeps_its_audience_key_filter() {
        let body = track(
            "Audience Entered",
            json!({"context": {"personas": {"computation_key": "gold"}}}),
        );
        let only_silver = Mapping {
            audience_key: Some("silver".into()),
            ..every_audience(false)
        };
        assert_eq!(unresolved(&body, &[only_silver]), Ok(vec![]));
        let only_gold = Mapping {
            audience_key: Some("gold".into()),
            ..every_audience(false)
        };
        let pending = unresolved(&body, &[only_gold]).unwrap();
        assert_eq!(pending[0].value, "on");
        assert!(!pending[0].create);
    }

    #[test]
    fn audience_field_event_without_an_audience_key_is_invalid_event() {
        let body = track("Audience Entered", json!({}));
        let poison = unresolved(&body, &[every_audience(true)]).unwrap_err();
        assert_eq!(poison.reason, DeadLetterReason::InvalidEvent);
        assert!(poison.detail.contains("audience key"), "{}", poison.detail);
    }

    fn one_update(body: &Value, mapping: Mapping) -> Result<Update, Poison> {
        let mut updates = planned(body, &[mapping])?;
        assert_eq!(updates.len(), 1, "expected one update for {body}");
        Ok(updates.remove(0))
    }

    #[test]
    fn engage_track_event_from_the_contract_sets_its_fields() {
        let body = crate::stages::decode::tests::engage_track();
        let mapping = Mapping {
            name: "vip-customers".into(),
            audience_key: Some("vip_customers".into()),
            profile_fields: vec![
                (field(456), FieldRule::UseAudienceKey),
                (field(789), FieldRule::Literal("on".into())),
            ],
            ..audience_events()
        };
        assert_eq!(
            planned(&body, &[mapping]),
            Ok(vec![Update {
                list_id: list(12345),
                email: "a@example.com".into(),
                fields: vec![(field(456), "on".into()), (field(789), "on".into())],
                timestamp: EventTime::parse_rfc3339("2024-05-01T12:00:00.123Z").unwrap(),
            }])
        );
    }

    #[test]
    fn use_audience_key_membership() {
        let engage = |key: &str| json!({"context": {"personas": {"computation_key": key}}});
        let with = |mut base: Value, extra: Value| {
            merge(&mut base, extra);
            base
        };
        let cases: Vec<(&str, Value, Option<&str>)> = vec![
            (
                "true_membership_sends_on_whatever_the_name",
                track(
                    "Audience Exited",
                    with(engage("vip"), json!({"properties": {"vip": true}})),
                ),
                Some("on"),
            ),
            (
                "false_membership_sends_off_whatever_the_name",
                track(
                    "Audience Entered",
                    with(engage("vip"), json!({"properties": {"vip": false}})),
                ),
                Some("off"),
            ),
            (
                "entered_event_without_membership_sends_on",
                track("Audience Entered", engage("vip")),
                Some("on"),
            ),
            (
                "exited_event_without_membership_sends_off",
                track("Audience Exited", engage("vip")),
                Some("off"),
            ),
            (
                "text_membership_leaves_it_to_the_event_name",
                track(
                    "Audience Exited",
                    with(engage("vip"), json!({"properties": {"vip": "true"}})),
                ),
                Some("off"),
            ),
            (
                "entered_event_without_any_audience_key_sends_on",
                track("Audience Entered", json!({})),
                Some("on"),
            ),
            (
                "computation_key_wins_over_properties_audience_key",
                track(
                    "Custom",
                    with(
                        engage("vip"),
                        json!({
                            "properties": {"audience_key": "other", "vip": false, "other": true}
                        }),
                    ),
                ),
                Some("off"),
            ),
            (
                "properties_audience_key_without_computation_key",
                track(
                    "Custom",
                    json!({"properties": {"audience_key": "vip", "vip": true}}),
                ),
                Some("on"),
            ),
            (
                "non_string_computation_key_leaves_properties_audience_key",
                track(
                    "Custom",
                    json!({
                        "context": {"personas": {"computation_key": 7}},
                        "properties": {"audience_key": "vip", "vip": false},
                    }),
                ),
                Some("off"),
            ),
            (
                "neither_membership_nor_name_decides_is_invalid_event",
                track(
                    "Custom",
                    with(engage("vip"), json!({"properties": {"vip": "yes"}})),
                ),
                None,
            ),
            (
                "no_audience_key_and_no_audience_name_is_invalid_event",
                track("Custom", json!({"properties": {"vip": true}})),
                None,
            ),
            (
                "identify_with_true_trait_sends_on",
                identify(with(engage("vip"), json!({"traits": {"vip": true}}))),
                Some("on"),
            ),
            (
                "identify_with_false_context_trait_sends_off",
                identify(with(
                    engage("vip"),
                    json!({"context": {"traits": {"vip": false}}}),
                )),
                Some("off"),
            ),
            (
                "identify_top_level_trait_wins_over_context_trait",
                identify(with(
                    engage("vip"),
                    json!({"traits": {"vip": false}, "context": {"traits": {"vip": true}}}),
                )),
                Some("off"),
            ),
            (
                "identify_looks_in_context_traits_when_the_top_level_one_is_not_boolean",
                identify(with(
                    engage("vip"),
                    json!({"traits": {"vip": "yes"}, "context": {"traits": {"vip": true}}}),
                )),
                Some("on"),
            ),
            (
                "identify_does_not_read_membership_from_properties",
                identify(with(engage("vip"), json!({"properties": {"vip": true}}))),
                None,
            ),
            (
                "identify_without_audience_key_is_invalid_event",
                identify(json!({"traits": {"vip": true}})),
                None,
            ),
        ];
        for (behaviour, body, expected) in cases {
            match (one_update(&body, any_event()), expected) {
                (Ok(update), Some(value)) => {
                    assert_eq!(
                        update.fields,
                        [(field(456), value.to_owned())],
                        "{behaviour}"
                    )
                }
                (Err(poison), None) => {
                    assert_eq!(poison.reason, DeadLetterReason::InvalidEvent, "{behaviour}");
                    assert!(
                        poison.detail.contains("useAudienceKey"),
                        "{behaviour}: {poison}"
                    );
                    assert!(
                        poison.detail.contains("mapping \"vip\""),
                        "{behaviour}: {poison}"
                    );
                }
                (outcome, expected) => {
                    panic!("{behaviour}: got {outcome:?}, expected {expected:?}")
                }
            }
        }
    }

    #[test]
    fn literal_values_are_sent_as_written() {
        let mapping = Mapping {
            profile_fields: vec![
                (field(1), FieldRule::Literal("on".into())),
                (field(2), FieldRule::Literal("off".into())),
                (field(3), FieldRule::Literal("Gold tier".into())),
                (field(4), FieldRule::UseAudienceKey),
            ],
            ..any_event()
        };
        let update = one_update(&track("Audience Exited", json!({})), mapping).unwrap();
        assert_eq!(
            update.fields,
            [
                (field(1), "on".to_owned()),
                (field(2), "off".to_owned()),
                (field(3), "Gold tier".to_owned()),
                (field(4), "off".to_owned()),
            ]
        );
    }

    #[test]
    fn literal_only_mapping_needs_no_audience() {
        let mapping = Mapping {
            profile_fields: vec![(field(1), FieldRule::Literal("on".into()))],
            ..any_event()
        };
        assert!(one_update(&track("Order Completed", json!({})), mapping).is_ok());
    }

    #[test]
    fn which_events_a_mapping_takes() {
        let by_name = audience_events();
        let tracks = Mapping {
            types: vec![SegmentType::Track],
            ..any_event()
        };
        let identifies = Mapping {
            types: vec![SegmentType::Identify],
            ..any_event()
        };
        let vip_only = Mapping {
            audience_key: Some("vip".into()),
            ..audience_events()
        };
        let engage = |key: &str| json!({"context": {"personas": {"computation_key": key}}});
        let cases: Vec<(&str, Mapping, Value, bool)> = vec![
            (
                "track_named_in_events",
                by_name.clone(),
                track("Audience Entered", json!({})),
                true,
            ),
            (
                "track_not_named_in_events",
                by_name.clone(),
                track("Order Completed", json!({})),
                false,
            ),
            (
                "event_names_match_exactly",
                by_name.clone(),
                track("audience entered", json!({})),
                false,
            ),
            (
                "identify_not_taken_by_event_names",
                by_name.clone(),
                identify(json!({})),
                false,
            ),
            (
                "track_type_takes_any_name",
                tracks.clone(),
                track("Order Completed", json!({})),
                true,
            ),
            (
                "track_type_does_not_take_identify",
                tracks,
                identify(json!({})),
                false,
            ),
            (
                "identify_type_takes_identify",
                identifies.clone(),
                identify(json!({})),
                true,
            ),
            (
                "identify_type_does_not_take_track",
                identifies,
                track("Audience Entered", json!({})),
                false,
            ),
            (
                "audience_key_filter_takes_its_audience",
                vip_only.clone(),
                track("Audience Entered", engage("vip")),
                true,
            ),
            (
                "audience_key_filter_ignores_other_audiences",
                vip_only.clone(),
                track("Audience Entered", engage("gold")),
                false,
            ),
            (
                "audience_key_filter_ignores_events_without_key",
                vip_only.clone(),
                track("Audience Entered", json!({})),
                false,
            ),
            (
                "audience_key_filter_reads_properties_audience_key",
                vip_only.clone(),
                track(
                    "Audience Entered",
                    json!({"properties": {"audience_key": "vip"}}),
                ),
                true,
            ),
            (
                "audience_key_filter_prefers_computation_key",
                vip_only,
                track(
                    "Audience Entered",
                    json!({
                        "context": {"personas": {"computation_key": "gold"}},
                        "properties": {"audience_key": "vip"},
                    }),
                ),
                false,
            ),
        ];
        for (behaviour, mapping, body, taken) in cases {
            // A literal value, so that only matching is under test here.
            let mapping = Mapping {
                profile_fields: vec![(field(456), FieldRule::Literal("on".into()))],
                ..mapping
            };
            let updates = planned(&body, &[mapping]).unwrap_or_else(|p| panic!("{behaviour}: {p}"));
            assert_eq!(updates.len(), usize::from(taken), "{behaviour}");
        }
    }

    #[test]
    fn event_matching_no_mapping_yields_nothing() {
        let body = track("Order Completed", json!({}));
        assert_eq!(planned(&body, &[audience_events()]), Ok(vec![]));
        assert_eq!(planned(&body, &[]), Ok(vec![]));
    }

    #[test]
    fn event_feeds_every_matching_mapping() {
        let second_list = Mapping {
            name: "vip-eu".into(),
            list: ListSource::Id(list(777)),
            profile_fields: vec![(field(9), FieldRule::Literal("member".into()))],
            ..audience_events()
        };
        let same_list_again = Mapping {
            name: "vip-again".into(),
            ..audience_events()
        };
        let other_event = Mapping {
            name: "orders".into(),
            events: vec!["Order Completed".into()],
            ..audience_events()
        };
        let updates = planned(
            &track("Audience Entered", json!({})),
            &[audience_events(), other_event, second_list, same_list_again],
        )
        .unwrap();
        let summary: Vec<(u32, Vec<(u32, &str)>)> = updates
            .iter()
            .map(|update| {
                let fields = update
                    .fields
                    .iter()
                    .map(|(id, v)| (id.get(), v.as_str()))
                    .collect();
                (update.list_id.get(), fields)
            })
            .collect();
        assert_eq!(
            summary,
            [
                (12345, vec![(456, "on")]),
                (777, vec![(9, "member")]),
                (12345, vec![(456, "on")]),
            ],
            "one update per matching mapping, in mapping order; the batcher merges duplicates"
        );
    }

    #[test]
    fn one_unusable_mapping_poisons_the_whole_message() {
        let good = audience_events();
        let bad = Mapping {
            name: "from-path".into(),
            list: ListSource::Path(path("$.properties.list_id")),
            ..audience_events()
        };
        let poison = planned(&track("Audience Entered", json!({})), &[good, bad]).unwrap_err();
        assert_eq!(poison.reason, DeadLetterReason::InvalidEvent);
        assert!(poison.detail.contains("mapping \"from-path\""), "{poison}");
    }

    #[test]
    fn email_is_the_first_path_holding_a_string() {
        let only_properties_contact = Mapping {
            email_paths: vec![path("$.properties.contact")],
            ..any_event()
        };
        let base = || json!({"type": "track", "event": "Audience Entered"});
        let with = |extra: Value| {
            let mut body = base();
            merge(&mut body, extra);
            body
        };
        let cases: Vec<(&str, Mapping, Value, Result<&str, &str>)> = vec![
            (
                "context_traits_email_comes_first",
                any_event(),
                with(json!({
                    "context": {"traits": {"email": "c@example.com"}},
                    "traits": {"email": "t@example.com"},
                    "properties": {"email": "p@example.com"}
                })),
                Ok("c@example.com"),
            ),
            (
                "traits_email_comes_next",
                any_event(),
                with(json!({
                    "traits": {"email": "t@example.com"},
                    "properties": {"email": "p@example.com"}
                })),
                Ok("t@example.com"),
            ),
            (
                "properties_email_comes_last",
                any_event(),
                with(json!({"properties": {"email": "p@example.com"}})),
                Ok("p@example.com"),
            ),
            (
                "path_holding_a_number_is_skipped",
                any_event(),
                with(json!({
                    "context": {"traits": {"email": 5}},
                    "traits": {"email": "t@example.com"}
                })),
                Ok("t@example.com"),
            ),
            (
                "path_holding_null_is_skipped",
                any_event(),
                with(json!({
                    "context": {"traits": {"email": null}},
                    "properties": {"email": "p@example.com"}
                })),
                Ok("p@example.com"),
            ),
            (
                "email_is_trimmed_and_lower_cased",
                any_event(),
                with(json!({"traits": {"email": " Ann@Example.COM "}})),
                Ok("ann@example.com"),
            ),
            (
                "implausible_email_is_invalid_even_when_a_later_path_is_good",
                any_event(),
                with(json!({
                    "context": {"traits": {"email": "not-an-email"}},
                    "traits": {"email": "t@example.com"}
                })),
                Err("the email at $.context.traits.email is not a plausible address"),
            ),
            (
                "empty_email_is_invalid",
                any_event(),
                with(json!({"context": {"traits": {"email": ""}}})),
                Err("is not a plausible address"),
            ),
            (
                "no_email_anywhere_is_invalid",
                any_event(),
                with(json!({"properties": {"name": "Ann"}})),
                Err("no email at $.context.traits.email, $.traits.email, $.properties.email"),
            ),
            (
                "explicit_paths_are_the_only_ones_tried",
                only_properties_contact.clone(),
                with(json!({"context": {"traits": {"email": "c@example.com"}}})),
                Err("no email at $.properties.contact"),
            ),
            (
                "explicit_path_is_read",
                only_properties_contact,
                with(json!({"properties": {"contact": "x@example.com"}})),
                Ok("x@example.com"),
            ),
        ];
        for (behaviour, mapping, body, expected) in cases {
            match (one_update(&body, mapping), expected) {
                (Ok(update), Ok(email)) => assert_eq!(update.email, email, "{behaviour}"),
                (Err(poison), Err(mentions)) => {
                    assert_eq!(poison.reason, DeadLetterReason::InvalidEvent, "{behaviour}");
                    assert!(poison.detail.contains(mentions), "{behaviour}: {poison}");
                    assert!(
                        poison.detail.contains("mapping \"vip\""),
                        "{behaviour}: {poison}"
                    );
                    assert!(
                        !poison.detail.contains("not-an-email"),
                        "{behaviour}: quotes the email"
                    );
                }
                (outcome, expected) => {
                    panic!("{behaviour}: got {outcome:?}, expected {expected:?}")
                }
            }
        }
    }

    #[test]
    fn list_id_from_a_path() {
        let mapping = Mapping {
            list: ListSource::Path(path("$.properties.list_id")),
            ..any_event()
        };
        let cases: Vec<(&str, Value, Result<i64, &str>)> = vec![
            ("number", json!(321), Ok(321)),
            ("numeric_string", json!("321"), Ok(321)),
            ("largest_int32", json!(2_147_483_647), Ok(2_147_483_647)),
            ("zero", json!(0), Err("not a positive 32-bit integer")),
            ("negative", json!(-1), Err("not a positive 32-bit integer")),
            (
                "over_int32",
                json!(2_147_483_648_i64),
                Err("not a positive 32-bit integer"),
            ),
            (
                "fraction",
                json!(32.5),
                Err("not a positive 32-bit integer"),
            ),
            ("word", json!("main"), Err("not a positive 32-bit integer")),
            ("boolean", json!(true), Err("not a positive 32-bit integer")),
            (
                "null",
                Value::Null,
                Err("no list id at $.properties.list_id"),
            ),
        ];
        for (behaviour, list_id, expected) in cases {
            let body = track(
                "Audience Entered",
                json!({"properties": {"list_id": list_id}}),
            );
            match (one_update(&body, mapping.clone()), expected) {
                (Ok(update), Ok(id)) => assert_eq!(update.list_id, list(id), "{behaviour}"),
                (Err(poison), Err(mentions)) => {
                    assert_eq!(poison.reason, DeadLetterReason::InvalidEvent, "{behaviour}");
                    assert!(poison.detail.contains(mentions), "{behaviour}: {poison}");
                }
                (outcome, expected) => {
                    panic!("{behaviour}: got {outcome:?}, expected {expected:?}")
                }
            }
        }
        let missing = one_update(&track("Audience Entered", json!({})), mapping).unwrap_err();
        assert!(
            missing
                .detail
                .contains("no list id at $.properties.list_id"),
            "{missing}"
        );
    }

    #[test]
    fn update_carries_the_event_time() {
        let timed = track(
            "Audience Entered",
            json!({"originalTimestamp": "2024-05-01T09:30:00Z"}),
        );
        let update = one_update(&timed, audience_events()).unwrap();
        assert_eq!(
            update.timestamp,
            EventTime::parse_rfc3339("2024-05-01T09:30:00Z").unwrap()
        );

        let untimed = one_update(&track("Audience Entered", json!({})), audience_events()).unwrap();
        assert_eq!(untimed.timestamp, RECEIVED);
    }

    #[test]
    fn direct_update_yields_itself_and_ignores_the_mappings() {
        let body = json!({
            "type": "profile_update", "list_id": 5, "email": "a@example.com",
            "fields": {"456": "off"}, "timestamp": "2024-05-01T12:00:00Z"
        });
        let Inbound::ProfileUpdate(direct) = inbound(&body) else {
            panic!("a profile_update decodes as a direct update");
        };
        assert_eq!(planned(&body, &[]), Ok(vec![direct.update.clone()]));
        assert_eq!(planned(&body, &[any_event()]), Ok(vec![direct.update]));
    }

    #[test]
    fn audience_key_prefers_computation_key() {
        let event = |body: Value| match inbound(&body) {
            Inbound::Segment(event) => event,
            other => panic!("{other:?}"),
        };
        let cases = [
            (
                "computation_key_first",
                json!({
                    "context": {"personas": {"computation_key": "a"}},
                    "properties": {"audience_key": "b"}
                }),
                Some("a"),
            ),
            (
                "properties_audience_key_next",
                json!({"properties": {"audience_key": "b"}}),
                Some("b"),
            ),
            (
                "empty_computation_key_is_no_key",
                json!({
                    "context": {"personas": {"computation_key": ""}},
                    "properties": {"audience_key": "b"}
                }),
                Some("b"),
            ),
            (
                "numeric_audience_key_is_no_key",
                json!({"properties": {"audience_key": 3}}),
                None,
            ),
            ("no_key", json!({}), None),
        ];
        for (behaviour, extra, expected) in cases {
            let body = track("Audience Entered", extra);
            assert_eq!(audience_key(&event(body)), expected, "{behaviour}");
        }
    }

    /// Collects what `plan` reports, as the worker's metrics would count it.
    #[derive(Default)]
    struct Reported(std::cell::RefCell<Vec<String>>);

    impl UnmappedAudiences for Reported {
        fn unmapped_audience(&self, audience_key: &str) {
            self.0.borrow_mut().push(audience_key.to_owned());
        }
    }

    #[test]
    fn audience_events_no_mapping_takes_are_reported_with_their_key() {
        let vip = Mapping {
            audience_key: Some("vip_customers".into()),
            ..audience_events()
        };
        let every_audience = audience_events();
        let engage = |key: &str| {
            track(
                "Audience Entered",
                json!({
                    "context": {"personas": {"computation_key": key}},
                    "properties": {key: true}
                }),
            )
        };
        let cases = [
            (
                "an audience no mapping names",
                engage("high_spenders"),
                vec![&vip],
                vec!["high_spenders"],
            ),
            (
                "the mapped audience",
                engage("vip_customers"),
                vec![&vip],
                vec![],
            ),
            (
                "the key in properties.audience_key",
                track(
                    "Audience Exited",
                    json!({"properties": {"audience_key": "lapsed"}}),
                ),
                vec![&vip],
                vec!["lapsed"],
            ),
            (
                "an event without an audience key",
                track("Order Completed", json!({})),
                vec![&vip],
                vec![],
            ),
            (
                "a mapping without audience_key takes every audience",
                engage("high_spenders"),
                vec![&vip, &every_audience],
                vec![],
            ),
            (
                "an audience key with an event name no mapping takes",
                track(
                    "Audience Renamed",
                    json!({"properties": {"audience_key": "vip_customers"}}),
                ),
                vec![&vip],
                vec!["vip_customers"],
            ),
        ];
        for (case, body, mappings, expected) in cases {
            let mappings: Vec<Mapping> = mappings.into_iter().cloned().collect();
            let reported = Reported::default();
            let updates = plan(&inbound(&body), &mappings, &reported).unwrap();
            assert_eq!(*reported.0.borrow(), expected, "{case}");
            if !expected.is_empty() {
                assert!(updates.is_empty(), "{case}: an unmapped event is ignored");
            }
        }
        let direct = json!({"type": "profile_update", "list_id": 7, "email": "a@example.com",
                            "fields": {"1": "on"}, "timestamp": "2026-01-01T00:00:00Z"});
        let reported = Reported::default();
        plan(&inbound(&direct), &[vip], &reported).unwrap();
        assert!(
            reported.0.borrow().is_empty(),
            "a direct update has no audience"
        );
    }
}
