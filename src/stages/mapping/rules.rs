//! The rules `[[mappings]]` tables are read into: which events a mapping takes and what it
//! makes of them.

use std::fmt;

use super::JsonPath;
use crate::stages::model::{FieldId, ListId};

/// One `[[mappings]]` table: which events it takes and what it makes of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub name: String,
    /// Track event names this mapping takes.
    pub events: Vec<String>,
    /// Event types this mapping takes whatever their name.
    pub types: Vec<SegmentType>,
    /// When set, only events whose audience key is this one.
    pub audience_key: Option<String>,
    pub list: ListSource,
    /// Tried in order; the first that holds a string is the email. Never empty.
    pub email_paths: Vec<JsonPath>,
    /// Sorted by id; empty exactly when `audience_field` is set.
    pub profile_fields: Vec<(FieldId, FieldRule)>,
    /// Instead of field ids: the audience key names a Check Box field in a field group.
    pub audience_field: Option<AudienceField>,
}

/// `audience_field = { group = "...", create = true }`: one mapping for every audience. The
/// event's audience key names a Check Box field of the list in `group`; membership decides
/// its value as `useAudienceKey` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AudienceField {
    /// The profile field group's name, as Listrak spells it.
    pub group: String,
    /// Whether a missing field (and group) is created on first sight; otherwise the event
    /// is dead-lettered as `unknown_field`.
    pub create: bool,
}

/// The paths tried for the email when a mapping names none (Engage puts it in
/// `context.traits`; other sources in `traits` or `properties`).
pub const DEFAULT_EMAIL_PATHS: [&str; 3] = [
    "$.context.traits.email",
    "$.traits.email",
    "$.properties.email",
];

pub fn default_email_paths() -> Vec<JsonPath> {
    DEFAULT_EMAIL_PATHS
        .iter()
        .map(|text| JsonPath::parse(text).expect("the default email paths parse"))
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentType {
    Track,
    Identify,
}

impl SegmentType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Track => "track",
            Self::Identify => "identify",
        }
    }
}

impl fmt::Display for SegmentType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a mapping's list id comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListSource {
    Id(ListId),
    /// A number or a numeric string in the event.
    Path(JsonPath),
}

/// What a mapping sets a profile field to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldRule {
    /// "on" or "off" from the event's audience membership.
    UseAudienceKey,
    /// Sent as written ("on", "off", or text).
    Literal(String),
}

impl FieldRule {
    /// The magic value Segment's Listrak destination gives this meaning; the same here.
    pub const USE_AUDIENCE_KEY: &'static str = "useAudienceKey";

    /// The value as written in the configuration.
    pub fn as_str(&self) -> &str {
        match self {
            Self::UseAudienceKey => Self::USE_AUDIENCE_KEY,
            Self::Literal(text) => text,
        }
    }
}
