//! Reading `[[mappings]]` into the rules `crate::stages::mapping` applies.

use std::collections::BTreeMap;

use super::document::{wrong_type, Node};
use super::print::toml_str;
use super::{invalid, ConfigError};
use crate::stages::mapping::{
    default_email_paths, AudienceField, FieldRule, JsonPath, ListSource, Mapping, SegmentType,
};
use crate::stages::model::{FieldId, ListId};

pub(super) fn mappings(root: &Node<'_>) -> Result<Vec<Mapping>, ConfigError> {
    let none = || {
        invalid(
            "mappings",
            "no mappings: add at least one [[mappings]] table, or every event would be ignored",
        )
    };
    let tables = match root.get("mappings") {
        None => return Err(none()),
        Some(toml::Value::Array(items)) if items.is_empty() => return Err(none()),
        Some(toml::Value::Array(items)) => items,
        Some(other) => {
            return Err(wrong_type(
                "mappings".to_owned(),
                "an array of tables ([[mappings]])",
                other,
            ))
        }
    };
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut mappings = Vec::with_capacity(tables.len());
    for (index, item) in tables.iter().enumerate() {
        let path = format!("mappings[{index}]");
        let toml::Value::Table(table) = item else {
            return Err(wrong_type(path, "a table", item));
        };
        let node = Node {
            path,
            table: Some(table),
        };
        let mapping = mapping(&node)?;
        if let Some(first) = names.get(&mapping.name) {
            return Err(invalid(
                node.key("name"),
                format!(
                    "{:?} is already the name of mappings[{first}]",
                    mapping.name
                ),
            ));
        }
        names.insert(mapping.name.clone(), index);
        mappings.push(mapping);
    }
    Ok(mappings)
}

fn mapping(node: &Node<'_>) -> Result<Mapping, ConfigError> {
    node.only(&[
        "name",
        "events",
        "types",
        "audience_key",
        "list_id",
        "list_id_path",
        "email_path",
        "profile_fields",
        "audience_field",
    ])?;
    let name = match node.string("name")? {
        Some(name) if !name.trim().is_empty() => name.to_owned(),
        _ => {
            return Err(invalid(
                node.key("name"),
                "is missing or empty; every mapping needs a name for logs and dead letters",
            ))
        }
    };

    let events = node.strings("events")?.unwrap_or_default();
    if let Some(index) = events.iter().position(|event| event.is_empty()) {
        return Err(invalid(
            format!("{}[{index}]", node.key("events")),
            "is empty; an event name matches exactly",
        ));
    }
    let events: Vec<String> = events.into_iter().map(str::to_owned).collect();

    let types = node
        .strings("types")?
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(index, text)| match text {
            "track" => Ok(SegmentType::Track),
            "identify" => Ok(SegmentType::Identify),
            other => Err(invalid(
                format!("{}[{index}]", node.key("types")),
                format!("{other:?} is not \"track\" or \"identify\""),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if events.is_empty() && types.is_empty() {
        return Err(invalid(
            node.key("events"),
            "the mapping has neither `events` nor `types`, so it would match nothing",
        ));
    }

    let audience_key = match node.string("audience_key")? {
        Some("") => {
            return Err(invalid(
                node.key("audience_key"),
                "is empty; leave it out to take every audience",
            ))
        }
        other => other.map(str::to_owned),
    };

    let list = match (node.get("list_id"), node.string("list_id_path")?) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                node.key("list_id_path"),
                "set either `list_id` or `list_id_path`, not both",
            ))
        }
        (None, None) => {
            return Err(invalid(
                node.key("list_id"),
                "is missing: set `list_id` or `list_id_path`",
            ))
        }
        (Some(_), None) => {
            let number = node.integer("list_id")?.expect("present");
            let id = ListId::new(number).ok_or_else(|| {
                invalid(
                    node.key("list_id"),
                    format!(
                        "is {number}; a list id is a positive 32-bit integer (1 to 2147483647)"
                    ),
                )
            })?;
            ListSource::Id(id)
        }
        (None, Some(text)) => ListSource::Path(
            JsonPath::parse(text).map_err(|why| invalid(node.key("list_id_path"), why))?,
        ),
    };

    let email_paths = email_paths(node)?;
    let (profile_fields, audience_field) = match node.get("audience_field") {
        None => (profile_fields(node)?, None),
        Some(_) if node.get("profile_fields").is_some() => {
            return Err(invalid(
                node.key("audience_field"),
                "set either `profile_fields` or `audience_field`, not both",
            ))
        }
        Some(_) => (Vec::new(), Some(audience_field(node)?)),
    };

    Ok(Mapping {
        name,
        events,
        types,
        audience_key,
        list,
        email_paths,
        profile_fields,
        audience_field,
    })
}

fn audience_field(node: &Node<'_>) -> Result<AudienceField, ConfigError> {
    let table = node.table("audience_field")?;
    table.only(&["group", "create"])?;
    let group =
        match table.string("group")? {
            Some(group) if !group.trim().is_empty() => group.to_owned(),
            _ => return Err(invalid(
                table.key("group"),
                "is missing or empty; name the profile field group that holds one Check Box field \
                 per audience",
            )),
        };
    let create = table.boolean("create")?.unwrap_or(false);
    Ok(AudienceField { group, create })
}

/// A single path goes first and the defaults follow it; an array is exactly those paths.
fn email_paths(node: &Node<'_>) -> Result<Vec<JsonPath>, ConfigError> {
    let key = node.key("email_path");
    match node.get("email_path") {
        None => Ok(default_email_paths()),
        Some(toml::Value::String(text)) => {
            let first = JsonPath::parse(text).map_err(|why| invalid(&key, why))?;
            let mut paths = vec![first];
            for path in default_email_paths() {
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
            Ok(paths)
        }
        Some(toml::Value::Array(items)) => {
            if items.is_empty() {
                return Err(invalid(
                    key,
                    "must hold at least one path; leave it out for the default ones",
                ));
            }
            let mut paths: Vec<JsonPath> = Vec::with_capacity(items.len());
            for (index, item) in items.iter().enumerate() {
                let item_key = format!("{key}[{index}]");
                let toml::Value::String(text) = item else {
                    return Err(wrong_type(item_key, "a string", item));
                };
                let path = JsonPath::parse(text).map_err(|why| invalid(&item_key, why))?;
                if !paths.contains(&path) {
                    paths.push(path);
                }
            }
            Ok(paths)
        }
        Some(other) => Err(wrong_type(key, "a string or an array of strings", other)),
    }
}

fn profile_fields(node: &Node<'_>) -> Result<Vec<(FieldId, FieldRule)>, ConfigError> {
    let fields = node.table("profile_fields")?;
    let Some(table) = fields.table.filter(|table| !table.is_empty()) else {
        return Err(invalid(
            node.key("profile_fields"),
            "is missing or empty; map at least one profile field id to a value, as in { \"456\" = \
             \"on\" }",
        ));
    };
    let mut rules = BTreeMap::new();
    for (id_text, value) in table {
        // Field ids are always quoted here, since they look like numbers but are keys.
        let key = fields.child_path(&toml_str(id_text));
        let id = id_text
            .parse::<FieldId>()
            .ok()
            .filter(|id| id.to_string() == *id_text)
            .ok_or_else(|| {
                invalid(
                    &key,
                    "is not a profile field id: a positive 32-bit integer written plainly, such as \
                     \"456\"",
                )
            })?;
        let toml::Value::String(text) = value else {
            return Err(wrong_type(key, "a string", value));
        };
        let rule = if text == FieldRule::USE_AUDIENCE_KEY {
            FieldRule::UseAudienceKey
        } else if text.eq_ignore_ascii_case(FieldRule::USE_AUDIENCE_KEY) {
            // Listrak would store the misspelling as the field's value.
            return Err(invalid(
                key,
                format!("{text:?} would be sent as written; did you mean \"useAudienceKey\"?"),
            ));
        } else if text.is_empty() {
            return Err(invalid(
                key,
                "is empty; a field is set to \"on\", \"off\", text, or \"useAudienceKey\"",
            ));
        } else {
            FieldRule::Literal(text.clone())
        };
        rules.insert(id, rule);
    }
    Ok(rules.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{accepted, check_refusals, credentials, refusal, refused, Refused};
    use crate::config::Settings;

    #[test]
    fn audience_field_mapping_names_a_group_instead_of_fields() {
        let text = "[listrak]\nclient_id = \"id\"\nclient_secret = \"secret\"\n\
                    [[mappings]]\nname = \"every-audience\"\n\
                    events = [\"Audience Entered\", \"Audience Exited\"]\n\
                    list_id = 12345\n\
                    audience_field = { group = \"Engage Audiences\", create = true }\n";
        let settings = Settings::from_toml(text, |_| None).unwrap();
        let mapping = &settings.mappings[0];
        assert!(mapping.profile_fields.is_empty());
        assert_eq!(
            mapping.audience_field,
            Some(AudienceField {
                group: "Engage Audiences".into(),
                create: true
            })
        );
        let shown = settings.redacted_toml();
        assert!(
            shown.contains("audience_field = { group = \"Engage Audiences\", create = true }"),
            "{shown}"
        );
        let again = Settings::from_toml(&shown, |_| None).unwrap();
        assert_eq!(again.mappings, settings.mappings);
    }

    #[test]
    fn every_refused_mapping_names_its_key() {
        const BASE: &str = "[[mappings]]\nname = \"vip\"\nevents = [\"Audience Entered\"]\n";
        check_refusals(
            &[
                refused("no_mappings", "", "mappings"),
                refused(
                    "mappings_as_a_single_table",
                    "[mappings]\nname = \"vip\"",
                    "mappings",
                ),
                refused(
                    "unknown_mapping_key",
                    "[[mappings]]\nname = \"vip\"\nevents = [\"E\"]\nlist_id = 1\nlists = \
                     [1]\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].lists",
                ),
                refused(
                    "mapping_without_name",
                    "[[mappings]]\nevents = [\"E\"]\nlist_id = 1\nprofile_fields = { \"456\" = \
                     \"on\" }",
                    "mappings[0].name",
                ),
                Refused {
                    behaviour: "duplicate_mapping_names",
                    toml: "[[mappings]]\nname = \"vip\"\nevents = [\"E\"]\nlist_id = 1\n\
                           profile_fields = { \"456\" = \"on\" }\n\
                           [[mappings]]\nname = \"vip\"\nevents = [\"E\"]\nlist_id = 2\n\
                           profile_fields = { \"456\" = \"on\" }",
                    key: "mappings[1].name",
                    reason_mentions: "mappings[0]",
                },
                refused(
                    "mapping_with_neither_events_nor_types",
                    "[[mappings]]\nname = \"vip\"\nlist_id = 1\nprofile_fields = { \"456\" = \
                     \"on\" }",
                    "mappings[0].events",
                ),
                refused(
                    "mapping_with_empty_events_and_no_types",
                    "[[mappings]]\nname = \"vip\"\nevents = []\nlist_id = 1\nprofile_fields = { \
                     \"456\" = \"on\" }",
                    "mappings[0].events",
                ),
                refused(
                    "event_name_that_is_not_a_string",
                    "[[mappings]]\nname = \"vip\"\nevents = [1]\nlist_id = 1\nprofile_fields = { \
                     \"456\" = \"on\" }",
                    "mappings[0].events[0]",
                ),
                refused(
                    "type_other_than_track_or_identify",
                    "[[mappings]]\nname = \"vip\"\ntypes = [\"identify\", \"page\"]\nlist_id = \
                     1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].types[1]",
                ),
                refused(
                    "empty_audience_key",
                    "[[mappings]]\nname = \"vip\"\nevents = [\"E\"]\naudience_key = \"\"\nlist_id \
                     = 1\nprofile_fields = { \"456\" = \"on\" }",
                    "mappings[0].audience_key",
                ),
            ],
            false,
        );
        let lists_and_fields: &[(&str, &str, &str)] = &[
            (
                "zero_list_id",
                "list_id = 0\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id",
            ),
            (
                "negative_list_id",
                "list_id = -5\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id",
            ),
            (
                "list_id_over_int32",
                "list_id = 2147483648\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id",
            ),
            (
                "list_id_as_text",
                "list_id = \"12345\"\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id",
            ),
            (
                "fractional_list_id",
                "list_id = 1.5\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id",
            ),
            (
                "both_list_id_and_path",
                "list_id = 1\nlist_id_path = \"$.properties.list_id\"\nprofile_fields = { \"456\" \
                 = \"on\" }",
                "mappings[0].list_id_path",
            ),
            (
                "neither_list_id_nor_path",
                "profile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id",
            ),
            (
                "list_id_path_without_dollar",
                "list_id_path = \"properties.list_id\"\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].list_id_path",
            ),
            (
                "field_id_that_is_a_word",
                "list_id = 1\nprofile_fields = { \"abc\" = \"on\" }",
                "mappings[0].profile_fields.\"abc\"",
            ),
            (
                "field_id_zero",
                "list_id = 1\nprofile_fields = { \"0\" = \"on\" }",
                "mappings[0].profile_fields.\"0\"",
            ),
            (
                "negative_field_id",
                "list_id = 1\nprofile_fields = { \"-4\" = \"on\" }",
                "mappings[0].profile_fields.\"-4\"",
            ),
            (
                "field_id_over_int32",
                "list_id = 1\nprofile_fields = { \"2147483648\" = \"on\" }",
                "mappings[0].profile_fields.\"2147483648\"",
            ),
            (
                "field_id_with_leading_zero",
                "list_id = 1\nprofile_fields = { \"0456\" = \"on\" }",
                "mappings[0].profile_fields.\"0456\"",
            ),
            (
                "field_id_with_spaces",
                "list_id = 1\nprofile_fields = { \" 456\" = \"on\" }",
                "mappings[0].profile_fields.\" 456\"",
            ),
            (
                "field_value_that_is_a_boolean",
                "list_id = 1\nprofile_fields = { \"456\" = true }",
                "mappings[0].profile_fields.\"456\"",
            ),
            (
                "empty_field_value",
                "list_id = 1\nprofile_fields = { \"456\" = \"\" }",
                "mappings[0].profile_fields.\"456\"",
            ),
            (
                "misspelt_use_audience_key",
                "list_id = 1\nprofile_fields = { \"456\" = \"useaudiencekey\" }",
                "mappings[0].profile_fields.\"456\"",
            ),
            (
                "empty_profile_fields",
                "list_id = 1\nprofile_fields = {}",
                "mappings[0].profile_fields",
            ),
            (
                "missing_profile_fields",
                "list_id = 1",
                "mappings[0].profile_fields",
            ),
            (
                "email_path_without_dollar",
                "list_id = 1\nemail_path = \"context.email\"\nprofile_fields = { \"456\" = \"on\" \
                 }",
                "mappings[0].email_path",
            ),
            (
                "bad_path_in_email_path_array",
                "list_id = 1\nemail_path = [\"$.a\", \"$..b\"]\nprofile_fields = { \"456\" = \
                 \"on\" }",
                "mappings[0].email_path[1]",
            ),
            (
                "empty_email_path_array",
                "list_id = 1\nemail_path = []\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].email_path",
            ),
            (
                "email_path_as_number",
                "list_id = 1\nemail_path = 3\nprofile_fields = { \"456\" = \"on\" }",
                "mappings[0].email_path",
            ),
            (
                "both_profile_fields_and_audience_field",
                "list_id = 1\nprofile_fields = { \"456\" = \"on\" }\naudience_field = { group = \
                 \"Engage Audiences\" }",
                "mappings[0].audience_field",
            ),
            (
                "audience_field_without_group",
                "list_id = 1\naudience_field = { create = true }",
                "mappings[0].audience_field.group",
            ),
            (
                "audience_field_with_empty_group",
                "list_id = 1\naudience_field = { group = \" \" }",
                "mappings[0].audience_field.group",
            ),
            (
                "audience_field_with_unknown_key",
                "list_id = 1\naudience_field = { group = \"G\", create_group = true }",
                "mappings[0].audience_field.create_group",
            ),
            (
                "audience_field_create_as_text",
                "list_id = 1\naudience_field = { group = \"G\", create = \"yes\" }",
                "mappings[0].audience_field.create",
            ),
            (
                "audience_field_as_text",
                "list_id = 1\naudience_field = \"Engage Audiences\"",
                "mappings[0].audience_field",
            ),
        ];
        for (behaviour, rest, expected) in lists_and_fields {
            let (key, reason) = refusal(&format!("{BASE}{rest}"), credentials);
            assert_eq!(key, *expected, "{behaviour}: reason {reason:?}");
        }
    }

    #[test]
    fn email_path_forms() {
        let paths = |email_path: &str| -> Vec<String> {
            let text = format!(
                "[[mappings]]\nname = \"m\"\nevents = [\"E\"]\nlist_id = \
                 1\n{email_path}\nprofile_fields = {{ \"1\" = \"on\" }}"
            );
            accepted(&text).mappings[0]
                .email_paths
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        let cases: [(&str, &str, &[&str]); 5] = [
            (
                "absent_means_the_defaults",
                "",
                &[
                    "$.context.traits.email",
                    "$.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "single_string_goes_first_then_the_defaults",
                "email_path = \"$.properties.contact.email\"",
                &[
                    "$.properties.contact.email",
                    "$.context.traits.email",
                    "$.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "single_default_path_is_not_repeated",
                "email_path = \"$.traits.email\"",
                &[
                    "$.traits.email",
                    "$.context.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "default_path_spelled_with_brackets_is_not_repeated",
                "email_path = \"$['traits'].email\"",
                &[
                    "$['traits'].email",
                    "$.context.traits.email",
                    "$.properties.email",
                ],
            ),
            (
                "array_means_exactly_those",
                "email_path = [\"$.properties.email\", \"$.traits['e-mail']\"]",
                &["$.properties.email", "$.traits['e-mail']"],
            ),
        ];
        for (behaviour, email_path, expected) in cases {
            assert_eq!(paths(email_path), expected, "{behaviour}");
        }
    }

    #[test]
    fn profile_fields_are_sorted_by_numeric_id_and_keep_literals_as_written() {
        let settings = accepted(
            "[[mappings]]\nname = \"m\"\ntypes = [\"track\"]\n\
             list_id_path = \"$.properties.list_id\"\n\
             profile_fields = { \"789\" = \"off\", \"1000\" = \"Gold tier\", \
             \"456\" = \"useAudienceKey\", \"5\" = \"on\" }",
        );
        let mapping = &settings.mappings[0];
        let field = |id: i64| FieldId::new(id).unwrap();
        assert_eq!(
            mapping.profile_fields,
            [
                (field(5), FieldRule::Literal("on".into())),
                (field(456), FieldRule::UseAudienceKey),
                (field(789), FieldRule::Literal("off".into())),
                (field(1000), FieldRule::Literal("Gold tier".into())),
            ]
        );
        assert_eq!(mapping.types, [SegmentType::Track]);
        assert!(mapping.events.is_empty());
        assert_eq!(
            mapping.list,
            ListSource::Path(JsonPath::parse("$.properties.list_id").unwrap())
        );
    }
}
