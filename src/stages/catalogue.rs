//! Catalogue: an account's lists and profile fields, and what the mappings need of them.
//!
//! Pure decisions around the `listrak` commands and `check --listrak`: [`check`] compares
//! every mapping with what Listrak holds, and [`plan_provision`] decides which profile field
//! group and Check Box fields are missing. `setup` does the reading and writing around them.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

use crate::stages::mapping::{AudienceField, FieldRule, ListSource, Mapping};
use crate::stages::model::{FieldId, ListId};

/// Listrak's data type for a field that holds `on` or `off`.
pub const CHECK_BOX: &str = "CheckBox";

/// A mapping that takes its list from the event is checked against every list of the
/// account, which costs one request per list and per field group: above this many lists,
/// it is reported as not checkable instead.
pub const MAX_LISTS_FOR_LIST_PATH: usize = 20;

/// One list of the account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListInfo {
    pub id: ListId,
    pub name: String,
}

/// A profile field group of a list, with its fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldGroup {
    pub id: u32,
    pub name: String,
    pub fields: Vec<FieldInfo>,
}

/// A profile field as Listrak describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldInfo {
    pub id: FieldId,
    pub name: String,
    /// `Text`, `Numeric`, `RadioButton`, `CheckBox`, `CommentArea`, `Date` or `ContentBlock`.
    pub data_type: String,
    /// The most characters the field stores; `None` when Listrak gives no positive limit.
    pub max_length: Option<u32>,
}

impl FieldInfo {
    pub fn is_check_box(&self) -> bool {
        self.data_type.eq_ignore_ascii_case(CHECK_BOX)
    }
}

/// What was read of an account: every list, and the field groups of the lists read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalogue {
    pub lists: Vec<ListInfo>,
    /// The field groups of each list that was read; a list missing here was not read.
    pub groups: BTreeMap<ListId, Vec<FieldGroup>>,
}

impl Catalogue {
    fn list(&self, id: ListId) -> Option<&ListInfo> {
        self.lists.iter().find(|list| list.id == id)
    }

    fn fields(&self, list: ListId) -> impl Iterator<Item = &FieldInfo> {
        self.groups
            .get(&list)
            .into_iter()
            .flatten()
            .flat_map(|group| &group.fields)
    }
}

/// The lists whose fields [`check`] needs: the ones mappings name, and every list of the
/// account when a mapping takes its list from the event and there are few enough.
pub fn lists_to_read(lists: &[ListInfo], mappings: &[Mapping]) -> Vec<ListId> {
    let any_path = mappings
        .iter()
        .any(|mapping| matches!(mapping.list, ListSource::Path(_)));
    let mut wanted: Vec<ListId> = mappings
        .iter()
        .filter_map(|mapping| match mapping.list {
            ListSource::Id(id) => Some(id),
            ListSource::Path(_) => None,
        })
        .filter(|id| lists.iter().any(|list| list.id == *id))
        .collect();
    if any_path && lists.len() <= MAX_LISTS_FOR_LIST_PATH {
        wanted.extend(lists.iter().map(|list| list.id));
    }
    wanted.sort();
    wanted.dedup();
    wanted
}

/// One thing a mapping needs that the account does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The mapping's name.
    pub mapping: String,
    /// The configuration key at fault, within the mapping: `list_id`, `profile_fields."456"`.
    pub key: String,
    /// What is wrong, and what Listrak has instead.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "mapping {:?}: {}: {}",
            self.mapping, self.key, self.message
        )
    }
}

/// The outcome of [`check`]: problems (the configuration would fail at Listrak), and
/// mappings that could not be checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub problems: Vec<Problem>,
    /// Mappings left unchecked, and why.
    pub unchecked: Vec<Problem>,
}

/// Compares every mapping with the account: its list exists, every field id is a field of
/// that list, `on`/`off`/`useAudienceKey` go to Check Box fields only, and a text value
/// fits its field. A mapping with `list_id_path` is checked on every list read.
pub fn check(catalogue: &Catalogue, mappings: &[Mapping]) -> CheckReport {
    let mut report = CheckReport::default();
    for mapping in mappings {
        let problem = |key: String, message: String| Problem {
            mapping: mapping.name.clone(),
            key,
            message,
        };
        match mapping.list {
            ListSource::Id(list) => {
                if catalogue.list(list).is_none() {
                    report.problems.push(problem(
                        "list_id".into(),
                        format!("list {list} does not exist{}", account_lists(catalogue)),
                    ));
                    continue;
                }
                if let Some(audience) = &mapping.audience_field {
                    for message in audience_problems(catalogue, list, audience) {
                        report
                            .problems
                            .push(problem(AUDIENCE_GROUP_KEY.into(), message));
                    }
                }
                for (field, rule) in &mapping.profile_fields {
                    let place = format!("list {list}");
                    if let Some(message) =
                        field_problem(catalogue, list, *field, rule, mapping, &place)
                    {
                        report.problems.push(problem(field_key(*field), message));
                    }
                }
            }
            ListSource::Path(_) => {
                if catalogue.lists.is_empty() {
                    report.problems.push(problem(
                        "list_id_path".into(),
                        "the account has no lists for events to name".into(),
                    ));
                    continue;
                }
                if catalogue.lists.len() > MAX_LISTS_FOR_LIST_PATH {
                    report.unchecked.push(problem(
                        "list_id_path".into(),
                        format!(
                            "not checked: the list comes from each event, and the account has {} \
                             lists (checked up to {MAX_LISTS_FOR_LIST_PATH})",
                            catalogue.lists.len()
                        ),
                    ));
                    continue;
                }
                if let Some(audience) = &mapping.audience_field {
                    for list in &catalogue.lists {
                        for message in audience_problems(catalogue, list.id, audience) {
                            report
                                .problems
                                .push(problem(AUDIENCE_GROUP_KEY.into(), message));
                        }
                    }
                }
                // The same fault on several lists is one line naming them all.
                for (field, rule) in &mapping.profile_fields {
                    let mut faults: BTreeMap<String, Vec<ListId>> = BTreeMap::new();
                    for list in &catalogue.lists {
                        if let Some(message) =
                            field_problem(catalogue, list.id, *field, rule, mapping, "that list")
                        {
                            faults.entry(message).or_default().push(list.id);
                        }
                    }
                    for (message, lists) in faults {
                        let lists: Vec<String> = lists.iter().map(ToString::to_string).collect();
                        report.problems.push(problem(
                            field_key(*field),
                            format!("on list {}: {message}", lists.join(", ")),
                        ));
                    }
                }
            }
        }
    }
    report
}

const AUDIENCE_GROUP_KEY: &str = "audience_field.group";

/// What an `audience_field` mapping finds wrong with one list: no group of that name when
/// fields are not created, and names held by more than one group or Check Box field (what
/// replicas that raced to create one leave behind; updates go to the lowest id).
fn audience_problems(catalogue: &Catalogue, list: ListId, audience: &AudienceField) -> Vec<String> {
    let groups: Vec<&FieldGroup> = catalogue
        .groups
        .get(&list)
        .into_iter()
        .flatten()
        .filter(|group| same_name(&group.name, &audience.group))
        .collect();
    let mut problems = Vec::new();
    if groups.is_empty() {
        if !audience.create {
            problems.push(format!(
                "list {list} has no profile field group {:?}, and `create` is false: every event \
                 would be dead-lettered as unknown_field; create it with `listrak provision --list \
                 {list} --group {:?} --audience KEY`, or set `create = true`",
                audience.group, audience.group
            ));
        }
        return problems;
    }
    if groups.len() > 1 {
        let mut ids: Vec<u32> = groups.iter().map(|group| group.id).collect();
        ids.sort();
        let shown: Vec<String> = ids.iter().map(ToString::to_string).collect();
        problems.push(format!(
            "list {list} has {} profile field groups named {:?} (ids {}); fields are looked for in \
             all of them and created in the lowest, {}",
            ids.len(),
            audience.group,
            shown.join(", "),
            ids[0],
        ));
    }
    let mut by_name: BTreeMap<String, Vec<FieldId>> = BTreeMap::new();
    for field in groups.iter().flat_map(|group| &group.fields) {
        if field.is_check_box() {
            let name = field.name.trim().to_ascii_lowercase();
            by_name.entry(name).or_default().push(field.id);
        }
    }
    for (name, mut ids) in by_name {
        if ids.len() > 1 {
            ids.sort();
            let shown: Vec<String> = ids.iter().map(ToString::to_string).collect();
            problems.push(format!(
                "list {list} has {} Check Box fields named {name:?} in group {:?} (ids {}): \
                 updates go to the lowest, {}; the others can be deleted",
                ids.len(),
                audience.group,
                shown.join(", "),
                ids[0]
            ));
        }
    }
    problems
}

fn field_key(field: FieldId) -> String {
    format!("profile_fields.\"{field}\"")
}

/// How many of the account's lists a missing-list problem names; a large account's whole
/// list would drown the line.
const LISTS_NAMED: usize = 10;

fn account_lists(catalogue: &Catalogue) -> String {
    if catalogue.lists.is_empty() {
        return "; the account has no lists".into();
    }
    let lists: Vec<String> = catalogue
        .lists
        .iter()
        .take(LISTS_NAMED)
        .map(|list| format!("{} ({})", list.id, list.name))
        .collect();
    let more = catalogue.lists.len().saturating_sub(LISTS_NAMED);
    let more = if more > 0 {
        format!(" and {more} more (`listrak lists` shows them)")
    } else {
        String::new()
    };
    format!("; the account has {}{more}", lists.join(", "))
}

/// What is wrong with writing `rule` to `field` of `list`; `place` names the list in the
/// message ("list 1001", or "that list" when one message covers several).
fn field_problem(
    catalogue: &Catalogue,
    list: ListId,
    field: FieldId,
    rule: &FieldRule,
    mapping: &Mapping,
    place: &str,
) -> Option<String> {
    let fault = Some;
    let wants_check_box = match rule {
        FieldRule::UseAudienceKey => true,
        FieldRule::Literal(text) => text == "on" || text == "off",
    };
    let Some(found) = catalogue.fields(list).find(|info| info.id == field) else {
        return fault(format!(
            "field {field} is not a profile field of {place}{}",
            suggestion(catalogue, list, mapping, wants_check_box)
        ));
    };
    let value = rule.as_str();
    if wants_check_box && !found.is_check_box() {
        return fault(format!(
            "{value:?} is written to {}, a {} field; on and off need a Check Box field{}",
            describe(found),
            found.data_type,
            suggestion(catalogue, list, mapping, true)
        ));
    }
    if let FieldRule::Literal(text) = rule {
        if found.is_check_box() && !wants_check_box {
            return fault(format!(
                "{value:?} is written to {}, a Check Box field, which holds only \"on\" or \"off\"",
                describe(found)
            ));
        }
        let length = text.chars().count();
        if let Some(max) = found.max_length.filter(|max| length > *max as usize) {
            return fault(format!(
                "{value:?} has {length} characters; {} holds at most {max}",
                describe(found)
            ));
        }
    }
    None
}

fn describe(field: &FieldInfo) -> String {
    format!("field {} ({:?})", field.id, field.name)
}

/// "; did you mean field 9001 ("vip_customers", CheckBox)?" for the field of `list` whose
/// name is closest to the mapping's audience key or name, when one is close at all.
fn suggestion(
    catalogue: &Catalogue,
    list: ListId,
    mapping: &Mapping,
    wants_check_box: bool,
) -> String {
    let wanted: Vec<String> = mapping
        .audience_key
        .iter()
        .chain(std::iter::once(&mapping.name))
        .map(|name| folded(name))
        .collect();
    let best = catalogue
        .fields(list)
        .filter(|field| !wants_check_box || field.is_check_box())
        .filter(|field| !mapping.profile_fields.iter().any(|(id, _)| *id == field.id))
        .filter_map(|field| {
            let name = folded(&field.name);
            let distance = wanted.iter().map(|wanted| distance(wanted, &name)).min()?;
            // Close means at most a third of the name differs: a typo, another separator.
            (distance * 3 <= name.chars().count().max(1)).then_some((distance, field))
        })
        .min_by_key(|(distance, field)| (*distance, field.id));
    match best {
        Some((_, field)) => format!(
            "; did you mean field {} ({:?}, {})?",
            field.id, field.name, field.data_type
        ),
        None => String::new(),
    }
}

/// Whether two group or field names are one, as Listrak users write them: letter case and
/// surrounding spaces aside.
pub fn same_name(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// Lower case, letters and digits only: "VIP Customers" and "vip_customers" compare equal.
fn folded(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Levenshtein distance, in characters.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Whether a group or field is there already, or is to be created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    Exists(u32),
    Create,
}

/// What `listrak provision` does for one list: the group, then one Check Box field per
/// audience (audience key, field name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionPlan {
    pub group: Presence,
    pub fields: Vec<(String, String, Presence)>,
}

/// Why provisioning cannot go ahead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProvisionRefusal {
    #[error(
        "a field named {name:?} already exists in group {group:?} as field {id}, but it is a \
             {data_type} field, not a Check Box: rename or remove it in Listrak, or choose another \
             name with --name"
    )]
    NotACheckBox {
        name: String,
        group: String,
        id: FieldId,
        data_type: String,
    },
    #[error(
        "list {0} has {1} profile field groups named {2:?}; keep one, or pass another --group"
    )]
    AmbiguousGroup(ListId, usize, String),
}

/// Finds the group and the fields by name (case-insensitively, as people see them), so that
/// a second run creates nothing. `wanted` is (audience key, field name) pairs.
pub fn plan_provision(
    list: ListId,
    groups: &[FieldGroup],
    group_name: &str,
    wanted: &[(String, String)],
) -> Result<ProvisionPlan, ProvisionRefusal> {
    let same = same_name;
    let matching: Vec<&FieldGroup> = groups
        .iter()
        .filter(|group| same(&group.name, group_name))
        .collect();
    if matching.len() > 1 {
        return Err(ProvisionRefusal::AmbiguousGroup(
            list,
            matching.len(),
            group_name.to_owned(),
        ));
    }
    let group = matching.first().copied();
    let mut fields = Vec::with_capacity(wanted.len());
    for (audience, name) in wanted {
        let existing = group.and_then(|group| {
            // The lowest id, should Listrak hold two fields of one name.
            group
                .fields
                .iter()
                .filter(|field| same(&field.name, name))
                .min_by_key(|field| field.id)
        });
        let presence = match existing {
            Some(field) if field.is_check_box() => Presence::Exists(field.id.get()),
            Some(field) => {
                return Err(ProvisionRefusal::NotACheckBox {
                    name: name.clone(),
                    group: group_name.to_owned(),
                    id: field.id,
                    data_type: field.data_type.clone(),
                })
            }
            None => Presence::Create,
        };
        fields.push((audience.clone(), name.clone(), presence));
    }
    Ok(ProvisionPlan {
        group: group.map_or(Presence::Create, |group| Presence::Exists(group.id)),
        fields,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::mapping::{default_email_paths, JsonPath, SegmentType};

    fn list(id: i64) -> ListId {
        ListId::new(id).unwrap()
    }

    fn field_id(id: i64) -> FieldId {
        FieldId::new(id).unwrap()
    }

    fn field(id: i64, name: &str, data_type: &str, max_length: Option<u32>) -> FieldInfo {
        FieldInfo {
            id: field_id(id),
            name: name.into(),
            data_type: data_type.into(),
            max_length,
        }
    }

    /// Two lists; list 1001 has a Check Box field, a short Text field and a look-alike.
    fn catalogue() -> Catalogue {
        Catalogue {
            lists: vec![
                ListInfo {
                    id: list(1001),
                    name: "Customers".into(),
                },
                ListInfo {
                    id: list(2002),
                    name: "Newsletter".into(),
                },
            ],
            groups: [
                (
                    list(1001),
                    vec![FieldGroup {
                        id: 1,
                        name: "Engage Audiences".into(),
                        fields: vec![
                            field(101, "vip_customers", CHECK_BOX, None),
                            field(102, "Favourite colour", "Text", Some(10)),
                            field(103, "cart_abandoners", CHECK_BOX, None),
                        ],
                    }],
                ),
                (
                    list(2002),
                    vec![FieldGroup {
                        id: 2,
                        name: "Engage Audiences".into(),
                        fields: vec![field(201, "vip_customers", CHECK_BOX, None)],
                    }],
                ),
            ]
            .into(),
        }
    }

    fn mapping(list_source: ListSource, fields: &[(i64, &str)]) -> Mapping {
        Mapping {
            name: "vip".into(),
            events: vec!["Audience Entered".into(), "Audience Exited".into()],
            types: vec![SegmentType::Track],
            audience_key: Some("vip_customers".into()),
            list: list_source,
            email_paths: default_email_paths(),
            profile_fields: fields
                .iter()
                .map(|(id, value)| {
                    let rule = if *value == FieldRule::USE_AUDIENCE_KEY {
                        FieldRule::UseAudienceKey
                    } else {
                        FieldRule::Literal((*value).into())
                    };
                    (field_id(*id), rule)
                })
                .collect(),
            audience_field: None,
        }
    }

    #[test]
    fn audience_field_mappings_report_a_missing_group_and_duplicate_fields() {
        let every_audience = |create: bool| Mapping {
            name: "every-audience".into(),
            audience_key: None,
            profile_fields: vec![],
            audience_field: Some(AudienceField {
                group: "Engage Audiences".into(),
                create,
            }),
            ..mapping(ListSource::Id(list(1001)), &[])
        };
        let check_box = |id: i64, name: &str| FieldInfo {
            id: field_id(id),
            name: name.into(),
            data_type: CHECK_BOX.into(),
            max_length: Some(3),
        };
        let mut catalogue = Catalogue {
            lists: vec![ListInfo {
                id: list(1001),
                name: "Customers".into(),
            }],
            groups: BTreeMap::from([(list(1001), vec![])]),
        };
        let report = check(&catalogue, &[every_audience(true)]);
        assert!(report.problems.is_empty(), "{report:?}");
        let report = check(&catalogue, &[every_audience(false)]);
        assert_eq!(report.problems.len(), 1, "{report:?}");
        assert_eq!(report.problems[0].key, "audience_field.group");
        assert!(report.problems[0]
            .message
            .contains("no profile field group \"Engage Audiences\""));

        catalogue.groups.insert(
            list(1001),
            vec![FieldGroup {
                id: 20,
                name: "Engage Audiences".into(),
                fields: vec![
                    check_box(305, "gold"),
                    check_box(301, "gold"),
                    check_box(302, "silver"),
                ],
            }],
        );
        let report = check(&catalogue, &[every_audience(false)]);
        assert_eq!(report.problems.len(), 1, "{report:?}");
        let message = &report.problems[0].message;
        assert!(
            message.contains("2 Check Box fields named \"gold\"")
                && message.contains("ids 301, 305")
                && message.contains("the lowest, 301"),
            "{message}"
        );
    }

    #[test]
    fn every_mapping_fault_is_one_problem_naming_the_key_and_what_listrak_has() {
        let on_list = |id| ListSource::Id(list(id));
        // (case, mapping, expected problems as (key, part of the message))
        type Case = (&'static str, Mapping, Vec<(&'static str, &'static str)>);
        let cases: Vec<Case> = vec![
            (
                "a correct mapping",
                mapping(on_list(1001), &[(101, "useAudienceKey"), (102, "blue")]),
                vec![],
            ),
            (
                "a missing list",
                mapping(on_list(999), &[(101, "on")]),
                vec![(
                    "list_id",
                    "list 999 does not exist; the account has 1001 (Customers), 2002 (Newsletter)",
                )],
            ),
            (
                "a wrong field id, with the field named like the audience suggested",
                mapping(on_list(1001), &[(999, "useAudienceKey")]),
                vec![(
                    "profile_fields.\"999\"",
                    "field 999 is not a profile field of list 1001; did you mean field 101 \
                     (\"vip_customers\", CheckBox)?",
                )],
            ),
            (
                "a field of another list",
                mapping(on_list(1001), &[(201, "on")]),
                vec![(
                    "profile_fields.\"201\"",
                    "is not a profile field of list 1001",
                )],
            ),
            (
                "on sent to a Text field",
                mapping(on_list(1001), &[(102, "on")]),
                vec![(
                    "profile_fields.\"102\"",
                    "\"on\" is written to field 102 (\"Favourite colour\"), a Text field; on and \
                     off need a Check Box field; did you mean field 101",
                )],
            ),
            (
                "useAudienceKey sent to a Text field",
                mapping(on_list(1001), &[(102, "useAudienceKey")]),
                vec![("profile_fields.\"102\"", "a Text field; on and off need")],
            ),
            (
                "text sent to a Check Box field",
                mapping(on_list(1001), &[(101, "yes please")]),
                vec![(
                    "profile_fields.\"101\"",
                    "\"yes please\" is written to field 101 (\"vip_customers\"), a Check Box \
                     field, which holds only \"on\" or \"off\"",
                )],
            ),
            (
                "text longer than the field",
                mapping(on_list(1001), &[(102, "ultramarine blue")]),
                vec![(
                    "profile_fields.\"102\"",
                    "\"ultramarine blue\" has 16 characters; field 102 (\"Favourite colour\") \
                     holds at most 10",
                )],
            ),
            (
                "a list path: the field is missing on one of the account's lists",
                mapping(
                    ListSource::Path(JsonPath::parse("$.properties.list_id").unwrap()),
                    &[(101, "useAudienceKey")],
                ),
                vec![(
                    "profile_fields.\"101\"",
                    "on list 2002: field 101 is not a profile field of that list; did you mean \
                     field 201",
                )],
            ),
        ];
        for (case, mapping, expected) in cases {
            let report = check(&catalogue(), std::slice::from_ref(&mapping));
            assert_eq!(
                report.problems.len(),
                expected.len(),
                "{case}: {:#?}",
                report.problems
            );
            for (problem, (key, message)) in report.problems.iter().zip(&expected) {
                assert_eq!(problem.mapping, "vip", "{case}");
                assert_eq!(problem.key, *key, "{case}");
                assert!(problem.message.contains(message), "{case}: {problem}");
            }
            assert!(report.unchecked.is_empty(), "{case}");
        }
    }

    #[test]
    fn a_list_path_on_a_large_account_is_reported_unchecked_not_as_a_problem() {
        let mut catalogue = catalogue();
        catalogue.lists = (1..=MAX_LISTS_FOR_LIST_PATH as i64 + 1)
            .map(|id| ListInfo {
                id: list(id),
                name: format!("list {id}"),
            })
            .collect();
        let mapping = mapping(
            ListSource::Path(JsonPath::parse("$.properties.list_id").unwrap()),
            &[(101, "on")],
        );
        assert!(lists_to_read(&catalogue.lists, std::slice::from_ref(&mapping)).is_empty());
        let report = check(&catalogue, &[mapping]);
        assert!(report.problems.is_empty());
        assert_eq!(report.unchecked.len(), 1);
        assert!(report.unchecked[0].message.contains("21 lists"));
    }

    #[test]
    fn a_missing_list_names_ten_of_the_accounts_lists_and_a_list_path_needs_one() {
        let mut catalogue = catalogue();
        catalogue.lists = (1..=MAX_LISTS_FOR_LIST_PATH as i64 + 1)
            .map(|id| ListInfo {
                id: list(id),
                name: format!("list {id}"),
            })
            .collect();
        let missing = mapping_on(ListSource::Id(list(999)));
        let report = check(&catalogue, &[missing]);
        assert!(
            report.problems[0]
                .message
                .ends_with("10 (list 10) and 11 more (`listrak lists` shows them)"),
            "{}",
            report.problems[0]
        );
        let by_path = mapping_on(ListSource::Path(JsonPath::parse("$.list").unwrap()));
        let report = check(&Catalogue::default(), &[by_path]);
        assert_eq!(
            report.problems[0].message,
            "the account has no lists for events to name"
        );
    }

    fn mapping_on(list_source: ListSource) -> Mapping {
        mapping(list_source, &[(101, "on")])
    }

    #[test]
    fn only_the_lists_that_exist_and_are_needed_are_read() {
        let catalogue = catalogue();
        let named = [
            mapping(ListSource::Id(list(2002)), &[(201, "on")]),
            mapping(ListSource::Id(list(999)), &[(201, "on")]),
        ];
        assert_eq!(lists_to_read(&catalogue.lists, &named), [list(2002)]);
        let by_path = [mapping(
            ListSource::Path(JsonPath::parse("$.list").unwrap()),
            &[(201, "on")],
        )];
        assert_eq!(
            lists_to_read(&catalogue.lists, &by_path),
            [list(1001), list(2002)]
        );
    }

    fn wanted(names: &[&str]) -> Vec<(String, String)> {
        names
            .iter()
            .map(|name| (name.to_string(), name.to_string()))
            .collect()
    }

    #[test]
    fn provisioning_finds_the_group_and_fields_by_name_and_creates_only_what_is_missing() {
        let groups = &catalogue().groups[&list(1001)];
        let plan = plan_provision(
            list(1001),
            groups,
            "engage audiences",
            &wanted(&["VIP_Customers", "high_spenders"]),
        )
        .unwrap();
        assert_eq!(plan.group, Presence::Exists(1));
        assert_eq!(plan.fields[0].2, Presence::Exists(101));
        assert_eq!(plan.fields[1].2, Presence::Create);

        let plan =
            plan_provision(list(1001), groups, "Other", &wanted(&["vip_customers"])).unwrap();
        assert_eq!(plan.group, Presence::Create);
        assert_eq!(plan.fields[0].2, Presence::Create);
    }

    #[test]
    fn provisioning_refuses_a_field_of_that_name_that_is_no_check_box() {
        let groups = &catalogue().groups[&list(1001)];
        let refusal = plan_provision(
            list(1001),
            groups,
            "Engage Audiences",
            &wanted(&["Favourite colour"]),
        )
        .unwrap_err();
        assert!(
            refusal
                .to_string()
                .contains("field 102, but it is a Text field"),
            "{refusal}"
        );
    }

    #[test]
    fn provisioning_refuses_two_groups_of_the_wanted_name() {
        let mut groups = catalogue().groups[&list(1001)].clone();
        groups.push(FieldGroup {
            id: 9,
            fields: vec![],
            ..groups[0].clone()
        });
        let refusal =
            plan_provision(list(1001), &groups, "Engage Audiences", &wanted(&["x"])).unwrap_err();
        assert_eq!(
            refusal,
            ProvisionRefusal::AmbiguousGroup(list(1001), 2, "Engage Audiences".into())
        );
    }

    #[test]
    fn names_compare_without_case_or_separators_and_distance_counts_edits() {
        assert_eq!(folded("VIP Customers"), folded("vip_customers"));
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }
}
