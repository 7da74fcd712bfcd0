//! The fake's catalogue: lists, profile field groups and fields, seeded at start and extended
//! through the API, in Listrak's own JSON shapes.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The data types Listrak's spec allows for a profile field.
pub const DATA_TYPES: [&str; 7] = [
    "Text",
    "Numeric",
    "RadioButton",
    "CheckBox",
    "CommentArea",
    "Date",
    "ContentBlock",
];

/// A catalogue to start with, as JSON: `{"lists":[{"listId":1001,"listName":"Customers",
/// "groups":[{"segmentationFieldGroupId":1,"segmentationFieldGroupName":"Engage Audiences",
/// "fields":[{"segmentationFieldId":101,"segmentationFieldName":"vip_customers",
/// "dataType":"CheckBox","maxLength":3}]}]}]}`. Lists without groups need only their id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogueSeed {
    #[serde(default)]
    pub lists: Vec<SeedList>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedList {
    pub list_id: u32,
    #[serde(default)]
    pub list_name: String,
    #[serde(default)]
    pub groups: Vec<SeedGroup>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedGroup {
    pub segmentation_field_group_id: u32,
    pub segmentation_field_group_name: String,
    #[serde(default)]
    pub fields: Vec<SeedField>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedField {
    pub segmentation_field_id: u32,
    pub segmentation_field_name: String,
    pub data_type: String,
    #[serde(default)]
    pub max_length: u32,
}

impl CatalogueSeed {
    /// Lists with the given ids and names, without fields.
    pub fn lists(lists: &[(u32, &str)]) -> Self {
        Self {
            lists: lists
                .iter()
                .map(|(id, name)| SeedList {
                    list_id: *id,
                    list_name: (*name).to_owned(),
                    groups: Vec::new(),
                })
                .collect(),
        }
    }

    /// Refuses what Listrak could never hold: ids that are not positive int32, an id used
    /// twice, an unknown data type.
    pub fn validate(&self) -> Result<(), String> {
        let mut groups = std::collections::BTreeSet::new();
        let mut fields = std::collections::BTreeSet::new();
        let mut lists = std::collections::BTreeSet::new();
        let positive = |id: u32, what: &str| {
            if id == 0 || id > i32::MAX as u32 {
                Err(format!("{what} {id} is not a positive 32-bit integer"))
            } else {
                Ok(())
            }
        };
        for list in &self.lists {
            positive(list.list_id, "listId")?;
            if !lists.insert(list.list_id) {
                return Err(format!("listId {} is given twice", list.list_id));
            }
            for group in &list.groups {
                positive(
                    group.segmentation_field_group_id,
                    "segmentationFieldGroupId",
                )?;
                if !groups.insert(group.segmentation_field_group_id) {
                    return Err(format!(
                        "segmentationFieldGroupId {} is given twice",
                        group.segmentation_field_group_id
                    ));
                }
                for field in &group.fields {
                    positive(field.segmentation_field_id, "segmentationFieldId")?;
                    if !fields.insert(field.segmentation_field_id) {
                        return Err(format!(
                            "segmentationFieldId {} is given twice",
                            field.segmentation_field_id
                        ));
                    }
                    if !DATA_TYPES.contains(&field.data_type.as_str()) {
                        return Err(format!(
                            "dataType {:?} of field {} is not one of {}",
                            field.data_type,
                            field.segmentation_field_id,
                            DATA_TYPES.join(", ")
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A group as `GET .../SegmentationFieldGroup` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GroupResource {
    pub segmentation_field_group_id: u32,
    pub segmentation_field_group_name: String,
    pub position: i64,
}

/// A field as `GET .../SegmentationField` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FieldResource {
    pub segmentation_field_id: u32,
    pub segmentation_field_name: String,
    pub segmentation_field_group_id: u32,
    pub data_type: String,
    pub max_length: i64,
    pub position: i64,
}

/// A list as `GET /List` lists it (the properties the fake knows of).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListResource {
    pub list_id: u32,
    pub list_name: String,
}

#[derive(Debug, Clone, Default)]
struct List {
    name: String,
    groups: BTreeMap<u32, Group>,
}

#[derive(Debug, Clone)]
struct Group {
    resource: GroupResource,
    fields: BTreeMap<u32, FieldResource>,
}

/// Lists, groups and fields; ids for new groups and fields follow the highest one seen.
#[derive(Debug, Clone, Default)]
pub struct Catalogue {
    lists: BTreeMap<u32, List>,
    last_id: u32,
}

impl Catalogue {
    /// The seed is expected valid ([`CatalogueSeed::validate`]).
    pub fn new(seed: &CatalogueSeed) -> Self {
        let mut catalogue = Catalogue::default();
        for list in &seed.lists {
            let mut groups = BTreeMap::new();
            for (position, group) in list.groups.iter().enumerate() {
                let group_id = group.segmentation_field_group_id;
                let fields = group
                    .fields
                    .iter()
                    .enumerate()
                    .map(|(position, field)| {
                        (
                            field.segmentation_field_id,
                            FieldResource {
                                segmentation_field_id: field.segmentation_field_id,
                                segmentation_field_name: field.segmentation_field_name.clone(),
                                segmentation_field_group_id: group_id,
                                data_type: field.data_type.clone(),
                                max_length: i64::from(field.max_length),
                                position: position as i64 + 1,
                            },
                        )
                    })
                    .collect::<BTreeMap<_, _>>();
                catalogue.last_id = catalogue
                    .last_id
                    .max(group_id)
                    .max(fields.keys().copied().max().unwrap_or(0));
                groups.insert(
                    group_id,
                    Group {
                        resource: GroupResource {
                            segmentation_field_group_id: group_id,
                            segmentation_field_group_name: group
                                .segmentation_field_group_name
                                .clone(),
                            position: position as i64 + 1,
                        },
                        fields,
                    },
                );
            }
            catalogue.lists.insert(
                list.list_id,
                List {
                    name: list.list_name.clone(),
                    groups,
                },
            );
        }
        catalogue
    }

    /// Whether the fake was given lists: only then does it judge list and field ids.
    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }

    pub fn has_list(&self, list: u32) -> bool {
        self.lists.contains_key(&list)
    }

    /// Whether `field` is a profile field of `list` (in any of its groups).
    pub fn has_field(&self, list: u32, field: u32) -> bool {
        self.lists.get(&list).is_some_and(|list| {
            list.groups
                .values()
                .any(|group| group.fields.contains_key(&field))
        })
    }

    pub fn lists(&self) -> Vec<ListResource> {
        self.lists
            .iter()
            .map(|(id, list)| ListResource {
                list_id: *id,
                list_name: list.name.clone(),
            })
            .collect()
    }

    /// `None` when the list does not exist.
    pub fn groups(&self, list: u32) -> Option<Vec<GroupResource>> {
        let list = self.lists.get(&list)?;
        Some(
            list.groups
                .values()
                .map(|group| group.resource.clone())
                .collect(),
        )
    }

    /// `None` when the list or the group does not exist.
    pub fn fields(&self, list: u32, group: u32) -> Option<Vec<FieldResource>> {
        let group = self.lists.get(&list)?.groups.get(&group)?;
        Some(group.fields.values().cloned().collect())
    }

    /// `None` when the list does not exist; else the new group's id.
    pub fn create_group(&mut self, list: u32, name: String, position: i64) -> Option<u32> {
        let list = self.lists.get_mut(&list)?;
        self.last_id += 1;
        let id = self.last_id;
        list.groups.insert(
            id,
            Group {
                resource: GroupResource {
                    segmentation_field_group_id: id,
                    segmentation_field_group_name: name,
                    position,
                },
                fields: BTreeMap::new(),
            },
        );
        Some(id)
    }

    /// `None` when the list or the group does not exist; else the new field's id.
    pub fn create_field(&mut self, list: u32, group: u32, mut field: FieldResource) -> Option<u32> {
        let group = self.lists.get_mut(&list)?.groups.get_mut(&group)?;
        self.last_id += 1;
        field.segmentation_field_id = self.last_id;
        field.segmentation_field_group_id = group.resource.segmentation_field_group_id;
        group.fields.insert(self.last_id, field);
        Some(self.last_id)
    }

    /// Removes a field, as someone deleting it in Listrak would; whether it was there.
    pub fn delete_field(&mut self, list: u32, field: u32) -> bool {
        self.lists.get_mut(&list).is_some_and(|list| {
            list.groups
                .values_mut()
                .any(|group| group.fields.remove(&field).is_some())
        })
    }

    /// The whole catalogue in the seed's shape, for `GET /_fake/catalogue` and tests.
    pub fn snapshot(&self) -> CatalogueSeed {
        CatalogueSeed {
            lists: self
                .lists
                .iter()
                .map(|(id, list)| SeedList {
                    list_id: *id,
                    list_name: list.name.clone(),
                    groups: list
                        .groups
                        .values()
                        .map(|group| SeedGroup {
                            segmentation_field_group_id: group.resource.segmentation_field_group_id,
                            segmentation_field_group_name: group
                                .resource
                                .segmentation_field_group_name
                                .clone(),
                            fields: group
                                .fields
                                .values()
                                .map(|field| SeedField {
                                    segmentation_field_id: field.segmentation_field_id,
                                    segmentation_field_name: field.segmentation_field_name.clone(),
                                    data_type: field.data_type.clone(),
                                    max_length: u32::try_from(field.max_length).unwrap_or(0),
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed() -> CatalogueSeed {
        serde_json::from_str(
            r#"{"lists":[{"listId":1001,"listName":"Customers","groups":[
                {"segmentationFieldGroupId":5,"segmentationFieldGroupName":"Engage Audiences",
                 "fields":[{"segmentationFieldId":101,"segmentationFieldName":"vip_customers",
                            "dataType":"CheckBox","maxLength":3}]}]},
               {"listId":2002}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn a_seeded_catalogue_knows_its_fields_and_new_ids_follow_the_highest() {
        let seed = seed();
        seed.validate().unwrap();
        let mut catalogue = Catalogue::new(&seed);
        assert!(catalogue.has_field(1001, 101));
        assert!(!catalogue.has_field(2002, 101));
        let group = catalogue.create_group(2002, "Engage".into(), 1).unwrap();
        assert_eq!(group, 102);
        let field = FieldResource {
            segmentation_field_id: 0,
            segmentation_field_name: "x".into(),
            segmentation_field_group_id: 0,
            data_type: "CheckBox".into(),
            max_length: 3,
            position: 1,
        };
        assert_eq!(
            catalogue.create_field(2002, group, field.clone()),
            Some(103)
        );
        assert!(catalogue.has_field(2002, 103));
        assert_eq!(
            catalogue.create_field(2002, 5, field),
            None,
            "group 5 is list 1001's"
        );
        assert_eq!(catalogue.create_group(3003, "x".into(), 1), None);
        assert_eq!(
            catalogue.snapshot().lists[1].groups[0].fields[0].segmentation_field_id,
            103
        );
    }

    #[test]
    fn seeds_with_repeated_ids_or_unknown_types_are_refused() {
        let mut twice = seed();
        twice.lists[1].list_id = 1001;
        assert!(twice
            .validate()
            .unwrap_err()
            .contains("listId 1001 is given twice"));
        let mut bad_type = seed();
        bad_type.lists[0].groups[0].fields[0].data_type = "Boolean".into();
        assert!(bad_type.validate().unwrap_err().contains("\"Boolean\""));
        assert!(serde_json::from_str::<CatalogueSeed>(r#"{"lists":[{"id":1}]}"#).is_err());
    }
}
