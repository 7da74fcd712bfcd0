//! Setup: the `listrak` commands and `check --listrak`, reading an account's catalogue and
//! creating the profile fields audiences need. The decisions are `catalogue`'s; this is the
//! I/O around them, and the text people read.

use std::fmt::Write as _;

use crate::commands::cli::ListrakCommand;
use crate::config::{toml_str, Settings};
use crate::edges::listrak::{CatalogueError, ListrakClient};
use crate::edges::telemetry::Metrics;
use crate::stages::catalogue::{
    self, same_name, Catalogue, CheckReport, FieldGroup, ListInfo, Presence, ProvisionPlan,
    ProvisionRefusal,
};
use crate::stages::mapping::{AudienceField, ListSource, Mapping};
use crate::stages::model::{FieldId, ListId};

/// Why a setup command failed; [`SetupError::is_usage`] tells bad input (exit 2) from a
/// failure to talk to Listrak (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Usage(String),
    #[error("list {0} does not exist in this Listrak account (`listrak lists` shows them)")]
    ListNotFound(ListId),
    #[error(transparent)]
    Refused(#[from] ProvisionRefusal),
    #[error(transparent)]
    Api(#[from] CatalogueError),
}

impl SetupError {
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::Api(_))
    }
}

/// `check --listrak` or `listrak.verify_at_start` found problems; exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0} problem(s) between the mappings and the Listrak account; see above")]
pub struct ProblemsFound(pub usize);

/// A list's field groups, or [`SetupError::ListNotFound`] for Listrak's 404.
pub async fn field_groups(
    client: &ListrakClient,
    list: ListId,
) -> Result<Vec<FieldGroup>, SetupError> {
    client.field_groups(list).await.map_err(|error| {
        if error.is_not_found() {
            SetupError::ListNotFound(list)
        } else {
            SetupError::Api(error)
        }
    })
}

/// Reads what [`catalogue::check`] needs: every list, and the fields of the lists the
/// mappings can write to.
pub async fn read_catalogue(
    client: &ListrakClient,
    mappings: &[Mapping],
) -> Result<Catalogue, CatalogueError> {
    let lists = client.lists().await?;
    let mut catalogue = Catalogue {
        groups: Default::default(),
        lists,
    };
    for list in catalogue::lists_to_read(&catalogue.lists, mappings) {
        let groups = client.field_groups(list).await?;
        catalogue.groups.insert(list, groups);
    }
    Ok(catalogue)
}

/// Checks every mapping against the account.
pub async fn verify(
    client: &ListrakClient,
    mappings: &[Mapping],
) -> Result<CheckReport, CatalogueError> {
    let catalogue = read_catalogue(client, mappings).await?;
    Ok(catalogue::check(&catalogue, mappings))
}

/// One line per problem, then one per mapping left unchecked, then a summary line.
pub fn report_text(report: &CheckReport, mappings: usize) -> String {
    let mut out = String::new();
    for problem in &report.problems {
        let _ = writeln!(out, "problem: {problem}");
    }
    for unchecked in &report.unchecked {
        let _ = writeln!(out, "unchecked: {unchecked}");
    }
    let _ = writeln!(
        out,
        "# listrak: {} mapping(s) checked against the account, {} problem(s){}",
        mappings,
        report.problems.len(),
        if report.unchecked.is_empty() {
            String::new()
        } else {
            format!(", {} not checkable", report.unchecked.len())
        }
    );
    out
}

/// The account's lists as a table.
pub fn lists_table(lists: &[ListInfo]) -> String {
    let width = lists
        .iter()
        .map(|list| list.id.to_string().len())
        .max()
        .unwrap_or(0)
        .max("LIST".len());
    let mut out = format!("{:<width$}  NAME\n", "LIST");
    for list in lists {
        let _ = writeln!(out, "{:<width$}  {}", list.id, list.name);
    }
    if lists.is_empty() {
        out.push_str("(no lists)\n");
    }
    out
}

/// A list's groups and fields as a table: one row per field, under its group.
pub fn fields_table(groups: &[FieldGroup]) -> String {
    let rows: Vec<[String; 5]> = groups
        .iter()
        .flat_map(|group| {
            group.fields.iter().map(move |field| {
                [
                    format!("{} ({})", group.name, group.id),
                    field.id.to_string(),
                    field.name.clone(),
                    field.data_type.clone(),
                    field
                        .max_length
                        .map_or_else(|| "-".to_owned(), |max| max.to_string()),
                ]
            })
        })
        .chain(
            groups
                .iter()
                .filter(|group| group.fields.is_empty())
                .map(|group| {
                    [
                        format!("{} ({})", group.name, group.id),
                        "-".into(),
                        "(no fields)".into(),
                        "-".into(),
                        "-".into(),
                    ]
                }),
        )
        .collect();
    let header = ["GROUP", "FIELD", "NAME", "TYPE", "MAX LENGTH"];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: [&str; 5]| {
        let mut text = String::new();
        for (index, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if index + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        text.trim_end().to_owned() + "\n"
    };
    let mut out = line(header);
    for row in &rows {
        out.push_str(&line(row.each_ref().map(String::as_str)));
    }
    if groups.is_empty() {
        out.push_str("(no profile field groups)\n");
    }
    out
}

/// Where `listrak provision` creates fields, when `--list` or `--group` is left out: from the
/// configuration's `audience_field` mapping. Also names the mapping that already writes the
/// provisioned audiences, so no per-audience tables need printing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionTarget {
    pub list: ListId,
    pub group: String,
    /// The `audience_field` mapping that covers this list and group, if any.
    pub covered_by: Option<String>,
}

/// `--list` and `--group` as given, each missing one taken from the one `audience_field`
/// mapping with a fixed list that fits the other (refused, naming the option, when there
/// is none or more than one).
pub fn provision_target(
    mappings: &[Mapping],
    list: Option<ListId>,
    group: Option<String>,
) -> Result<ProvisionTarget, SetupError> {
    let candidates: Vec<(&Mapping, ListId, &AudienceField)> = mappings
        .iter()
        .filter_map(|mapping| {
            let field = mapping.audience_field.as_ref()?;
            let ListSource::Id(id) = mapping.list else {
                return None;
            };
            Some((mapping, id, field))
        })
        .filter(|(_, id, field)| {
            list.is_none_or(|list| list == *id)
                && group
                    .as_deref()
                    .is_none_or(|group| same_name(group, &field.group))
        })
        .collect();
    let (list, group) = match (list, group) {
        (Some(list), Some(group)) => (list, group),
        (list, group) => {
            let missing = if list.is_none() { "--list" } else { "--group" };
            match candidates.as_slice() {
                [(_, id, field)] => (
                    list.unwrap_or(*id),
                    group.unwrap_or_else(|| field.group.clone()),
                ),
                [] => {
                    return Err(SetupError::Usage(format!(
                        "give {missing}: no `audience_field` mapping with a fixed list_id fits \
                         what was given"
                    )))
                }
                several => {
                    let names: Vec<String> = several
                        .iter()
                        .map(|(m, _, _)| format!("{:?}", m.name))
                        .collect();
                    return Err(SetupError::Usage(format!(
                        "give {missing}: the `audience_field` mappings {} differ",
                        names.join(", ")
                    )));
                }
            }
        }
    };
    let covered_by = candidates
        .iter()
        .find(|(_, id, field)| *id == list && same_name(&field.group, &group))
        .map(|(mapping, _, _)| mapping.name.clone());
    Ok(ProvisionTarget {
        list,
        group,
        covered_by,
    })
}

/// What `listrak provision` is asked for.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    pub list: ListId,
    pub group: String,
    pub audiences: Vec<String>,
    /// The field name, instead of the audience key; one audience only.
    pub name: Option<String>,
    pub dry_run: bool,
}

impl ProvisionRequest {
    /// (audience key, field name) pairs, after checking the request makes sense.
    fn wanted(&self) -> Result<Vec<(String, String)>, SetupError> {
        let usage = |why: String| Err(SetupError::Usage(why));
        if self.group.trim().is_empty() {
            return usage("--group is empty; name the profile field group".into());
        }
        if self.audiences.is_empty() {
            return usage("give at least one --audience".into());
        }
        if let Some(blank) = self.audiences.iter().find(|key| key.trim().is_empty()) {
            return usage(format!("--audience {blank:?} is empty"));
        }
        for (index, key) in self.audiences.iter().enumerate() {
            if self.audiences[..index].contains(key) {
                return usage(format!("--audience {key:?} is given twice"));
            }
        }
        match &self.name {
            Some(_) if self.audiences.len() > 1 => usage(format!(
                "--name names one field, but {} audiences were given; leave --name out to name \
                 each field after its audience key",
                self.audiences.len()
            )),
            Some(name) if name.trim().is_empty() => usage("--name is empty".into()),
            Some(name) => Ok(vec![(self.audiences[0].clone(), name.clone())]),
            None => Ok(self
                .audiences
                .iter()
                .map(|key| (key.clone(), key.clone()))
                .collect()),
        }
    }
}

/// One audience's field after provisioning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionedField {
    pub audience_key: String,
    pub name: String,
    /// `None` in a dry run, for a field that would be created.
    pub id: Option<FieldId>,
    pub created: bool,
}

/// What `listrak provision` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provisioned {
    pub list: ListId,
    pub group: String,
    /// `None` in a dry run, when the group would be created.
    pub group_id: Option<u32>,
    pub group_created: bool,
    pub fields: Vec<ProvisionedField>,
    pub dry_run: bool,
}

/// Creates the group when missing and one Check Box field per audience when missing, after
/// looking for them by name: run twice, it creates nothing the second time.
pub async fn provision(
    client: &ListrakClient,
    request: &ProvisionRequest,
) -> Result<Provisioned, SetupError> {
    let wanted = request.wanted()?;
    let groups = field_groups(client, request.list).await?;
    let plan: ProvisionPlan =
        catalogue::plan_provision(request.list, &groups, &request.group, &wanted)?;
    let group_name = match plan.group {
        Presence::Exists(id) => groups
            .iter()
            .find(|group| group.id == id)
            .map_or_else(|| request.group.clone(), |group| group.name.clone()),
        Presence::Create => request.group.trim().to_owned(),
    };
    let mut provisioned = Provisioned {
        list: request.list,
        group: group_name.clone(),
        group_id: None,
        group_created: false,
        fields: Vec::with_capacity(plan.fields.len()),
        dry_run: request.dry_run,
    };
    let group_id = match plan.group {
        Presence::Exists(id) => Some(id),
        Presence::Create if request.dry_run => None,
        Presence::Create => {
            let position = u32::try_from(groups.len()).unwrap_or(u32::MAX - 1) + 1;
            let id = client
                .create_field_group(request.list, &group_name, position)
                .await?;
            provisioned.group_created = true;
            Some(id)
        }
    };
    provisioned.group_id = group_id;
    let mut position = groups
        .iter()
        .find(|group| Some(group.id) == group_id)
        .map_or(0, |group| group.fields.len());
    for (audience_key, name, presence) in plan.fields {
        let (id, created) = match (presence, group_id) {
            (Presence::Exists(id), _) => (FieldId::new(i64::from(id)), false),
            (Presence::Create, Some(group)) if !request.dry_run => {
                position += 1;
                let position = u32::try_from(position).unwrap_or(u32::MAX);
                let id = client
                    .create_check_box(request.list, group, name.trim(), position)
                    .await?;
                (Some(id), true)
            }
            (Presence::Create, _) => (None, true),
        };
        provisioned.fields.push(ProvisionedField {
            audience_key,
            name: name.trim().to_owned(),
            id,
            created,
        });
    }
    Ok(provisioned)
}

impl Provisioned {
    /// What was found and created (or would be), one line each.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let would = if self.dry_run {
            "would create"
        } else {
            "created"
        };
        match (self.group_id, self.group_created) {
            (Some(id), false) => {
                let _ = writeln!(
                    out,
                    "list {}: group {:?} exists ({id})",
                    self.list, self.group
                );
            }
            (Some(id), true) => {
                let _ = writeln!(
                    out,
                    "list {}: group {:?} created ({id})",
                    self.list, self.group
                );
            }
            (None, _) => {
                let _ = writeln!(out, "list {}: group {:?} {would}", self.list, self.group);
            }
        }
        for field in &self.fields {
            let what = match (field.id, field.created) {
                (Some(id), false) => format!("exists ({id})"),
                (Some(id), true) => format!("created ({id})"),
                (None, _) => would.to_owned(),
            };
            let _ = writeln!(
                out,
                "  Check Box field {:?} for audience {:?}: {what}",
                field.name, field.audience_key
            );
        }
        out
    }

    /// The `[[mappings]]` tables that write each audience to its field, ready to paste;
    /// empty in a dry run that would create something (no ids yet).
    pub fn mappings_toml(&self) -> String {
        let mut out = String::new();
        for field in &self.fields {
            let Some(id) = field.id else {
                return String::new();
            };
            let _ = writeln!(out, "[[mappings]]");
            let _ = writeln!(
                out,
                "name = {}",
                toml_str(&format!("{}-{}", field.audience_key, self.list))
            );
            let _ = writeln!(out, "events = [\"Audience Entered\", \"Audience Exited\"]");
            let _ = writeln!(out, "audience_key = {}", toml_str(&field.audience_key));
            let _ = writeln!(out, "list_id = {}", self.list);
            let _ = writeln!(out, "profile_fields = {{ \"{id}\" = \"useAudienceKey\" }}");
            out.push('\n');
        }
        out
    }
}

/// `check`: the configuration as the worker reads it (secrets redacted); with `auth`, a token
/// from Listrak; with `listrak`, every mapping against the account.
pub async fn check(settings: &Settings, auth: bool, listrak: bool) -> anyhow::Result<()> {
    print!("{}", settings.redacted_toml());
    if auth || listrak {
        let client = ListrakClient::new(&settings.listrak, Metrics::new(1))?;
        if auth {
            let lifetime = client
                .authenticate()
                .await
                .map_err(|reason| anyhow::anyhow!("authentication failed: {reason}"))?;
            println!(
                "# authentication: ok, token valid for about {}s",
                lifetime.as_secs()
            );
        }
        if listrak {
            verify_listrak(settings, &client, false).await?;
        }
    }
    Ok(())
}

/// Checks every mapping against the account; problems are printed (to stderr and the log at
/// start, to stdout for `check`) and make an error that exits 2.
pub async fn verify_listrak(
    settings: &Settings,
    client: &ListrakClient,
    at_start: bool,
) -> anyhow::Result<()> {
    let report = verify(client, &settings.mappings)
        .await
        .map_err(|error| anyhow::anyhow!("cannot check the mappings against Listrak: {error}"))?;
    let text = report_text(&report, settings.mappings.len());
    if at_start {
        for problem in &report.problems {
            tracing::error!(%problem, "a mapping does not match the Listrak account");
        }
        for unchecked in &report.unchecked {
            tracing::warn!(
                %unchecked,
                "a mapping could not be checked against the Listrak account"
            );
        }
        if !report.problems.is_empty() {
            eprint!("{text}");
        }
    } else {
        print!("{text}");
    }
    if report.problems.is_empty() {
        Ok(())
    } else {
        Err(ProblemsFound(report.problems.len()).into())
    }
}

/// `listrak lists | fields | provision`.
pub async fn listrak(
    command: ListrakCommand,
    client: &ListrakClient,
    mappings: &[Mapping],
) -> anyhow::Result<()> {
    match command {
        ListrakCommand::Lists { json } => {
            let lists = client.lists().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&lists)?);
            } else {
                print!("{}", lists_table(&lists));
            }
        }
        ListrakCommand::Fields { list, json } => {
            let groups = field_groups(client, list).await?;
            if json {
                let answer = serde_json::json!({ "list": list, "groups": groups });
                println!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                print!("{}", fields_table(&groups));
            }
        }
        ListrakCommand::Provision {
            list,
            group,
            audiences,
            name,
            dry_run,
        } => {
            let target = provision_target(mappings, list, group)?;
            let request = ProvisionRequest {
                list: target.list,
                group: target.group,
                audiences,
                name,
                dry_run,
            };
            let provisioned = provision(client, &request).await?;
            // What happened goes to stderr, so that stdout is the configuration to paste.
            eprint!("{}", provisioned.summary());
            let mappings = provisioned.mappings_toml();
            if let Some(mapping) = target.covered_by {
                eprintln!(
                    "mapping {mapping:?} (audience_field) already writes these audiences; no \
                     [[mappings]] tables to add"
                );
            } else if mappings.is_empty() {
                eprintln!(
                    "dry run: nothing created; run without --dry-run for the [[mappings]] tables"
                );
            } else {
                print!("{mappings}");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::catalogue::FieldInfo;

    fn request(audiences: &[&str], name: Option<&str>) -> ProvisionRequest {
        ProvisionRequest {
            list: ListId::new(1001).unwrap(),
            group: "Engage Audiences".into(),
            audiences: audiences.iter().map(|key| key.to_string()).collect(),
            name: name.map(str::to_owned),
            dry_run: false,
        }
    }

    #[test]
    fn provision_takes_list_and_group_from_the_audience_field_mapping() {
        let text = "[listrak]\nclient_id = \"id\"\nclient_secret = \"secret\"\n\
                    [[mappings]]\nname = \"every-audience\"\nevents = [\"Audience Entered\"]\n\
                    list_id = 1001\naudience_field = { group = \"Engage Audiences\" }\n\
                    [[mappings]]\nname = \"vip\"\nevents = [\"Audience Entered\"]\n\
                    list_id = 2002\nprofile_fields = { \"9\" = \"on\" }\n";
        let mappings = crate::config::Settings::from_toml(text, |_| None)
            .unwrap()
            .mappings;
        let list = |id| ListId::new(id).unwrap();
        let target = provision_target(&mappings, None, None).unwrap();
        assert_eq!(
            target,
            ProvisionTarget {
                list: list(1001),
                group: "Engage Audiences".into(),
                covered_by: Some("every-audience".into()),
            }
        );
        let elsewhere =
            provision_target(&mappings, Some(list(2002)), Some("Engage Audiences".into())).unwrap();
        assert_eq!(elsewhere.covered_by, None);
        let refused = provision_target(&mappings, Some(list(2002)), None).unwrap_err();
        assert!(refused.to_string().contains("give --group"), "{refused}");
        let refused = provision_target(&[], None, Some("G".into())).unwrap_err();
        assert!(refused.to_string().contains("give --list"), "{refused}");
    }

    #[test]
    fn provision_requests_that_make_no_sense_are_refused_naming_the_option() {
        let cases = [
            (request(&[], None), "at least one --audience"),
            (request(&["a", " "], None), "--audience \" \" is empty"),
            (request(&["a", "a"], None), "\"a\" is given twice"),
            (request(&["a", "b"], Some("VIP")), "--name names one field"),
            (request(&["a"], Some("")), "--name is empty"),
        ];
        for (request, expected) in cases {
            let error = request.wanted().unwrap_err();
            assert!(error.is_usage());
            assert!(error.to_string().contains(expected), "{error}");
        }
        assert_eq!(
            request(&["vip_customers"], Some("VIP")).wanted().unwrap(),
            [("vip_customers".to_string(), "VIP".to_string())]
        );
    }

    #[test]
    fn the_printed_mappings_load_as_configuration_with_the_field_ids() {
        let provisioned = Provisioned {
            list: ListId::new(1001).unwrap(),
            group: "Engage Audiences".into(),
            group_id: Some(7),
            group_created: true,
            fields: vec![
                ProvisionedField {
                    audience_key: "vip_customers".into(),
                    name: "vip_customers".into(),
                    id: FieldId::new(8),
                    created: true,
                },
                ProvisionedField {
                    audience_key: "cart \"abandoners\"".into(),
                    name: "Cart".into(),
                    id: FieldId::new(9),
                    created: false,
                },
            ],
            dry_run: false,
        };
        let text = format!(
            "[listrak]\nclient_id = \"id\"\nclient_secret = \"secret\"\n\n{}",
            provisioned.mappings_toml()
        );
        let settings = crate::config::Settings::from_toml(&text, |_| None).unwrap();
        assert_eq!(settings.mappings.len(), 2);
        assert_eq!(
            settings.mappings[1].audience_key.as_deref(),
            Some("cart \"abandoners\"")
        );
        assert_eq!(settings.mappings[1].profile_fields[0].0.get(), 9);
        assert!(provisioned
            .summary()
            .contains("group \"Engage Audiences\" created (7)"));
    }

    #[test]
    fn a_dry_run_that_would_create_fields_prints_no_mappings() {
        let provisioned = Provisioned {
            list: ListId::new(1001).unwrap(),
            group: "Engage Audiences".into(),
            group_id: None,
            group_created: false,
            fields: vec![ProvisionedField {
                audience_key: "vip".into(),
                name: "vip".into(),
                id: None,
                created: true,
            }],
            dry_run: true,
        };
        assert_eq!(provisioned.mappings_toml(), "");
        assert!(provisioned.summary().contains("would create"));
    }

    #[test]
    fn the_fields_table_has_one_row_per_field_under_its_group() {
        let groups = vec![
            FieldGroup {
                id: 3,
                name: "Engage Audiences".into(),
                fields: vec![FieldInfo {
                    id: FieldId::new(101).unwrap(),
                    name: "vip_customers".into(),
                    data_type: "CheckBox".into(),
                    max_length: Some(3),
                }],
            },
            FieldGroup {
                id: 4,
                name: "Empty".into(),
                fields: vec![],
            },
        ];
        let table = fields_table(&groups);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "GROUP                 FIELD  NAME           TYPE      MAX LENGTH"
        );
        assert_eq!(
            lines[1],
            "Engage Audiences (3)  101    vip_customers  CheckBox  3"
        );
        assert!(lines[2].starts_with("Empty (4)"), "{table}");
    }
}
