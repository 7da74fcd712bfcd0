//! Fields: which profile field an `audience_field` mapping means, from each list's field
//! catalogue held in memory; missing fields (and their group) created when asked.
//!
//! A hit costs no request: the session looks a field up synchronously ([`Fields::lookup`]).
//! A miss is resolved in a task ([`Fields::resolve`]): the list's catalogue is read again, at
//! most once per [`REFRESH_EVERY`] per list, and one read answers every miss noticed before it.
//! Several replicas may create the same field at once; each lists the group again after
//! creating and takes the lowest id among the Check Box fields of that name, so all of them
//! converge on one field.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::catalogue::{same_name, FieldGroup};
use crate::listrak::CatalogueError;
use crate::mapping::Plan;
use crate::model::{FieldId, ListId, Update};
use crate::telemetry::Metrics;

/// The least time between two reads of one list's catalogue.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);

/// The catalogue requests the resolver makes; narrow so it is tested without HTTP.
pub trait FieldCatalogue: Send + Sync + 'static {
    /// The list's field groups, each with its fields.
    fn field_groups(
        &self,
        list: ListId,
    ) -> impl Future<Output = Result<Vec<FieldGroup>, CatalogueError>> + Send;

    /// Creates a field group; returns its id.
    fn create_field_group(
        &self,
        list: ListId,
        name: &str,
        position: u32,
    ) -> impl Future<Output = Result<u32, CatalogueError>> + Send;

    /// Creates a Check Box field in a group; returns its id.
    fn create_check_box(
        &self,
        list: ListId,
        group: u32,
        name: &str,
        position: u32,
    ) -> impl Future<Output = Result<FieldId, CatalogueError>> + Send;
}

/// The Check Box field named `name` in the group named `group` (letter case aside, as
/// `listrak provision` finds them): the lowest id among such fields, whichever group of that
/// name holds it, so that duplicates made by racing replicas all resolve to the same one.
pub fn find(groups: &[FieldGroup], group: &str, name: &str) -> Option<FieldId> {
    groups
        .iter()
        .filter(|g| same_name(&g.name, group))
        .flat_map(|g| &g.fields)
        .filter(|field| same_name(&field.name, name) && field.is_check_box())
        .map(|field| field.id)
        .min()
}

/// Whether the group holds a field named `name` that is not a Check Box: the name is taken,
/// and a Check Box of the same name is not created beside it (`listrak provision` refuses
/// such a field as well).
pub fn taken_by_another_type(groups: &[FieldGroup], group: &str, name: &str) -> bool {
    groups
        .iter()
        .filter(|g| same_name(&g.name, group))
        .flat_map(|g| &g.fields)
        .any(|field| same_name(&field.name, name) && !field.is_check_box())
}

/// The group named `name` (compared as `same_name` does: case and surrounding spaces aside):
/// the lowest id among groups of that name.
pub fn find_group(groups: &[FieldGroup], name: &str) -> Option<u32> {
    groups
        .iter()
        .filter(|g| same_name(&g.name, name))
        .map(|g| g.id)
        .min()
}

/// Whether `message` names `field` as a number of its own (not inside a longer one).
fn names(message: &str, field: FieldId) -> bool {
    message
        .split(|c: char| !c.is_ascii_digit())
        .any(|word| word == field.to_string())
}

/// What a resolution found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    Field(FieldId),
    /// No such field after a read made since the miss, and `create` was not asked.
    Unknown,
}

/// Why a message's fields could not all be resolved.
#[derive(Debug, thiserror::Error)]
pub enum Unresolvable {
    /// No such field, and the mapping does not create it (or a field of another type holds
    /// the name): the message is dead-lettered as `unknown_field`.
    #[error(
        "list {list} has no Check Box field {name:?} in the profile field group {group:?}; \
             create it (`listrak provision --audience {name}`) or set `create = true` in the \
             mapping (a field of that name and another type is never replaced), then replay the \
             dead letters with `dlq replay --reason unknown_field`"
    )]
    UnknownField {
        list: ListId,
        group: String,
        name: String,
    },
    /// Reading or extending the catalogue failed.
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
}

/// What is known of one list.
#[derive(Default)]
struct Known {
    groups: Vec<FieldGroup>,
    /// When the catalogue was last read; `None` before the first read.
    read_at: Option<Instant>,
    /// Listrak refused a field id of this list: what is held may be wrong.
    stale: bool,
}

struct ListState {
    known: Mutex<Known>,
    /// One read or creation at a time per list: misses that wait here are answered by the
    /// read made by the one ahead of them.
    turn: tokio::sync::Mutex<()>,
}

/// The field catalogues of the lists in use, shared by every session of the worker.
pub struct Fields<C> {
    catalogue: Arc<C>,
    metrics: Metrics,
    refresh_every: Duration,
    lists: Mutex<HashMap<ListId, Arc<ListState>>>,
}

impl<C: FieldCatalogue> Fields<C> {
    pub fn new(catalogue: Arc<C>, metrics: Metrics) -> Self {
        Self::with_refresh(catalogue, metrics, REFRESH_EVERY)
    }

    pub fn with_refresh(catalogue: Arc<C>, metrics: Metrics, refresh_every: Duration) -> Self {
        Self {
            catalogue,
            metrics,
            refresh_every,
            lists: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self, list: ListId) -> Arc<ListState> {
        let mut lists = self.lists.lock().expect("fields lock");
        Arc::clone(lists.entry(list).or_insert_with(|| {
            Arc::new(ListState {
                known: Mutex::new(Known::default()),
                turn: tokio::sync::Mutex::new(()),
            })
        }))
    }

    /// The field from what is held, without a request; `None` is a miss (not read yet, no
    /// such field, or forgotten), for [`Fields::resolve`].
    pub fn lookup(&self, list: ListId, group: &str, name: &str) -> Option<FieldId> {
        let lists = self.lists.lock().expect("fields lock");
        let state = lists.get(&list)?;
        let known = state.known.lock().expect("fields lock");
        find(&known.groups, group, name)
    }

    /// Every update of the plan, if each of its fields is held; else the plan back, for
    /// [`Fields::resolve_all`].
    pub fn lookup_all(&self, mut plan: Plan) -> Result<Vec<Update>, Plan> {
        let found: Option<Vec<FieldId>> = plan
            .unresolved
            .iter()
            .map(|u| self.lookup(u.list_id(), &u.group, &u.audience_key))
            .collect();
        let Some(found) = found else {
            return Err(plan);
        };
        let resolved = plan.unresolved.drain(..).zip(found);
        plan.updates
            .extend(resolved.map(|(unresolved, field)| unresolved.resolved(field)));
        Ok(plan.updates)
    }

    /// Every update of the plan, its fields resolved as [`Fields::resolve`] does, for a
    /// message that arrived at `seen`.
    pub async fn resolve_all(
        &self,
        plan: Plan,
        seen: Instant,
    ) -> Result<Vec<Update>, Unresolvable> {
        let mut updates = plan.updates;
        for unresolved in plan.unresolved {
            let list = unresolved.list_id();
            let resolution = self
                .resolve(
                    list,
                    &unresolved.group,
                    &unresolved.audience_key,
                    unresolved.create,
                    seen,
                )
                .await?;
            match resolution {
                Resolution::Field(field) => updates.push(unresolved.resolved(field)),
                Resolution::Unknown => {
                    return Err(Unresolvable::UnknownField {
                        list,
                        group: unresolved.group,
                        name: unresolved.audience_key,
                    })
                }
            }
        }
        Ok(updates)
    }

    /// Listrak refused a field id of this list (a field deleted or changed since it was
    /// read): what is held is dropped, and the next miss reads the list again.
    pub fn forget(&self, list: ListId) {
        let state = self.state(list);
        let mut known = state.known.lock().expect("fields lock");
        known.groups.clear();
        known.stale = true;
    }

    /// Reads the list's catalogue unless it was read already, so that the first events need
    /// not wait for it; a failure is left to the first miss.
    pub async fn preload(&self, list: ListId) {
        let state = self.state(list);
        let _turn = state.turn.lock().await;
        if state.known.lock().expect("fields lock").read_at.is_some() {
            return;
        }
        if let Err(error) = self.read(list, &state).await {
            tracing::warn!(
                list_id = %list,
                %error,
                "could not read the list's profile fields; reading them again at the first event \
                 that needs them"
            );
        }
    }

    /// Listrak answered 400 for a contact of `list` with `message`: when the message names
    /// one of the contact's `fields` that came from this list's catalogue, the catalogue is
    /// forgotten (the field was deleted or changed), so later events read it again.
    pub fn refused(
        &self,
        list: ListId,
        message: &str,
        mut fields: impl Iterator<Item = FieldId>,
    ) -> bool {
        let named = fields.any(|field| names(message, field) && self.holds(list, field));
        if named {
            tracing::info!(
                list_id = %list,
                message,
                "Listrak refused a field of this list's catalogue; reading it again on the next \
                 miss"
            );
            self.forget(list);
        }
        named
    }

    /// Whether `field` is in what is held of `list`'s catalogue.
    pub fn holds(&self, list: ListId, field: FieldId) -> bool {
        let lists = self.lists.lock().expect("fields lock");
        lists.get(&list).is_some_and(|state| {
            let known = state.known.lock().expect("fields lock");
            known
                .groups
                .iter()
                .flat_map(|g| &g.fields)
                .any(|f| f.id == field)
        })
    }

    /// The field for a miss noticed at `seen`: from a read made after `seen` (waiting for the
    /// list's next allowed read if need be), then, with `create`, by creating it (and its
    /// group).
    pub async fn resolve(
        &self,
        list: ListId,
        group: &str,
        name: &str,
        create: bool,
        seen: Instant,
    ) -> Result<Resolution, CatalogueError> {
        let state = self.state(list);
        let _turn = state.turn.lock().await;
        let (found, read_at, stale) = {
            let known = state.known.lock().expect("fields lock");
            (find(&known.groups, group, name), known.read_at, known.stale)
        };
        if let Some(field) = found {
            return Ok(Resolution::Field(field));
        }
        let read_since_seen = read_at.is_some_and(|at| at >= seen) && !stale;
        if !read_since_seen {
            let allowed_at = read_at.map_or_else(Instant::now, |at| at + self.refresh_every);
            let loaded = read_at.is_some() && !stale;
            // Creating does not wait for a read: it lists the group again afterwards anyway.
            if !(create && loaded && allowed_at > Instant::now()) {
                tokio::time::sleep_until(allowed_at).await;
                let groups = self.read(list, &state).await?;
                if let Some(field) = find(&groups, group, name) {
                    return Ok(Resolution::Field(field));
                }
            }
        }
        let taken = {
            let known = state.known.lock().expect("fields lock");
            taken_by_another_type(&known.groups, group, name)
        };
        if !create || taken {
            return Ok(Resolution::Unknown);
        }
        self.create(list, &state, group, name)
            .await
            .map(Resolution::Field)
    }

    async fn read(
        &self,
        list: ListId,
        state: &ListState,
    ) -> Result<Vec<FieldGroup>, CatalogueError> {
        let started = Instant::now();
        self.metrics.catalogue_read();
        let groups = self.catalogue.field_groups(list).await?;
        let mut known = state.known.lock().expect("fields lock");
        known.groups = groups.clone();
        known.read_at = Some(started);
        known.stale = false;
        Ok(groups)
    }

    async fn create(
        &self,
        list: ListId,
        state: &ListState,
        group: &str,
        name: &str,
    ) -> Result<FieldId, CatalogueError> {
        let groups = state.known.lock().expect("fields lock").groups.clone();
        let group_id = match find_group(&groups, group) {
            Some(id) => id,
            None => {
                let position = u32::try_from(groups.len() + 1).unwrap_or(u32::MAX);
                let created = self
                    .catalogue
                    .create_field_group(list, group, position)
                    .await?;
                tracing::info!(
                    list_id = %list,
                    group,
                    group_id = created,
                    "created a profile field group"
                );
                // Another replica may have created one too: the lowest id is the group.
                let groups = self.read(list, state).await?;
                find_group(&groups, group).unwrap_or(created)
            }
        };
        let in_group = groups
            .iter()
            .find(|g| g.id == group_id)
            .map_or(0, |g| g.fields.len());
        let position = u32::try_from(in_group + 1).unwrap_or(u32::MAX);
        let created = self
            .catalogue
            .create_check_box(list, group_id, name, position)
            .await?;
        self.metrics.field_created(list, group, name, created);
        // Another replica may have created one too: every one of them takes the lowest id.
        let groups = self.read(list, state).await?;
        Ok(find(&groups, group, name).unwrap_or(created))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalogue::{FieldInfo, CHECK_BOX};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn field(id: u32, name: &str) -> FieldInfo {
        FieldInfo {
            id: FieldId::new(i64::from(id)).unwrap(),
            name: name.into(),
            data_type: CHECK_BOX.into(),
            max_length: Some(3),
        }
    }

    fn list() -> ListId {
        ListId::new(12345).unwrap()
    }

    fn id(value: u32) -> FieldId {
        FieldId::new(i64::from(value)).unwrap()
    }

    /// A list's catalogue in memory, counting reads; `also_created` is a field another
    /// replica creates alongside each of ours, with a lower id.
    #[derive(Default)]
    struct Memory {
        groups: Mutex<Vec<FieldGroup>>,
        reads: AtomicU32,
        next_id: AtomicU32,
        rival_first: bool,
        /// How often each request yields before it is answered, in turn: other requests
        /// (another replica's) run meanwhile.
        pauses: Mutex<Vec<u8>>,
    }

    impl Memory {
        fn with(groups: Vec<FieldGroup>) -> Self {
            Self {
                groups: Mutex::new(groups),
                next_id: AtomicU32::new(500),
                ..Self::default()
            }
        }

        fn reads(&self) -> u32 {
            self.reads.load(Ordering::SeqCst)
        }

        async fn pause(&self) {
            let turns = self.pauses.lock().unwrap().pop().unwrap_or(0);
            for _ in 0..turns {
                tokio::task::yield_now().await;
            }
        }
    }

    impl FieldCatalogue for Memory {
        async fn field_groups(&self, _list: ListId) -> Result<Vec<FieldGroup>, CatalogueError> {
            self.pause().await;
            self.reads.fetch_add(1, Ordering::SeqCst);
            Ok(self.groups.lock().unwrap().clone())
        }

        async fn create_field_group(
            &self,
            _list: ListId,
            name: &str,
            _position: u32,
        ) -> Result<u32, CatalogueError> {
            self.pause().await;
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            self.groups.lock().unwrap().push(FieldGroup {
                id,
                name: name.into(),
                fields: vec![],
            });
            Ok(id)
        }

        async fn create_check_box(
            &self,
            _list: ListId,
            group: u32,
            name: &str,
            _position: u32,
        ) -> Result<FieldId, CatalogueError> {
            self.pause().await;
            let ours = self.next_id.fetch_add(1, Ordering::SeqCst);
            let mut groups = self.groups.lock().unwrap();
            let group = groups.iter_mut().find(|g| g.id == group).unwrap();
            group.fields.push(field(ours, name));
            if self.rival_first {
                // Another replica's field of the same name, created just before ours.
                group.fields.push(field(ours - 100, name));
            }
            Ok(id(ours))
        }
    }

    fn engage(fields: Vec<FieldInfo>) -> Vec<FieldGroup> {
        vec![FieldGroup {
            id: 1,
            name: "Engage Audiences".into(),
            fields,
        }]
    }

    fn resolver(memory: Memory, refresh: Duration) -> (Arc<Memory>, Fields<Memory>) {
        let memory = Arc::new(memory);
        let fields = Fields::with_refresh(Arc::clone(&memory), Metrics::new(10), refresh);
        (memory, fields)
    }

    #[test]
    fn lowest_id_wins_among_check_boxes_of_one_name() {
        let mut text = field(5, "gold");
        text.data_type = "Text".into();
        let groups = vec![
            FieldGroup {
                id: 9,
                name: "Engage Audiences".into(),
                fields: vec![field(40, "gold"), text, field(12, "silver")],
            },
            FieldGroup {
                id: 3,
                name: "Engage Audiences".into(),
                fields: vec![field(31, "gold")],
            },
            FieldGroup {
                id: 2,
                name: "Other".into(),
                fields: vec![field(1, "gold")],
            },
        ];
        assert_eq!(find(&groups, "Engage Audiences", "gold"), Some(id(31)));
        assert_eq!(find(&groups, "Engage Audiences", "silver"), Some(id(12)));
        assert_eq!(find(&groups, "engage audiences", "SILVER"), Some(id(12)));
        assert_eq!(find(&groups, "Engage Audiences", "bronze"), None);
        assert_eq!(find_group(&groups, "Engage Audiences"), Some(3));
        // As `find` does: a group spelt with other case is the same group, not a new one.
        assert_eq!(find_group(&groups, " engage AUDIENCES"), Some(3));
        assert_eq!(find_group(&groups, "Missing"), None);
    }

    #[tokio::test]
    async fn a_hit_after_the_first_read_costs_no_request() {
        let (memory, fields) = resolver(
            Memory::with(engage(vec![field(7, "gold"), field(8, "silver")])),
            REFRESH_EVERY,
        );
        assert_eq!(fields.lookup(list(), "Engage Audiences", "gold"), None);
        let found = fields
            .resolve(list(), "Engage Audiences", "gold", false, Instant::now())
            .await
            .unwrap();
        assert_eq!(found, Resolution::Field(id(7)));
        for _ in 0..100 {
            assert_eq!(
                fields.lookup(list(), "Engage Audiences", "silver"),
                Some(id(8))
            );
        }
        assert_eq!(memory.reads(), 1);
    }

    #[tokio::test]
    async fn misses_are_refreshed_at_most_once_per_interval() {
        let refresh = Duration::from_millis(300);
        let (memory, fields) = resolver(Memory::with(engage(vec![])), refresh);
        let first = Instant::now();
        assert_eq!(
            fields
                .resolve(list(), "Engage Audiences", "gold", false, first)
                .await
                .unwrap(),
            Resolution::Unknown
        );
        assert_eq!(memory.reads(), 1);
        // A miss seen before that read is answered by it.
        assert_eq!(
            fields
                .resolve(list(), "Engage Audiences", "silver", false, first)
                .await
                .unwrap(),
            Resolution::Unknown
        );
        assert_eq!(memory.reads(), 1);
        // A miss seen after it waits for the next allowed read, which finds a field made
        // meanwhile.
        memory.groups.lock().unwrap()[0]
            .fields
            .push(field(9, "gold"));
        let later = Instant::now();
        assert_eq!(
            fields
                .resolve(list(), "Engage Audiences", "gold", false, later)
                .await
                .unwrap(),
            Resolution::Field(id(9))
        );
        // The second read waited for the interval since the first.
        assert!(first.elapsed() >= refresh);
        assert_eq!(memory.reads(), 2);
    }

    #[tokio::test]
    async fn a_missing_field_and_group_are_created_once() {
        let (memory, fields) = resolver(Memory::with(vec![]), REFRESH_EVERY);
        let seen = Instant::now();
        let gold = fields
            .resolve(list(), "Engage Audiences", "gold", true, seen)
            .await
            .unwrap();
        let again = fields
            .resolve(list(), "Engage Audiences", "gold", true, seen)
            .await
            .unwrap();
        assert_eq!(gold, again);
        let groups = memory.groups.lock().unwrap().clone();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].fields.len(), 1);
        assert_eq!(Resolution::Field(groups[0].fields[0].id), gold);
        assert!(fields
            .metrics
            .render()
            .contains("listrak_fields_created_total 1"));
    }

    #[tokio::test]
    async fn concurrent_misses_for_several_audiences_create_each_field_once() {
        let (memory, fields) = resolver(Memory::with(vec![]), REFRESH_EVERY);
        let fields = Arc::new(fields);
        let seen = Instant::now();
        let audiences = ["gold", "silver", "bronze", "platinum", "diamond"];
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let fields = Arc::clone(&fields);
                let name = audiences[i % audiences.len()];
                tokio::spawn(async move {
                    let found = fields
                        .resolve(list(), "Engage Audiences", name, true, seen)
                        .await
                        .unwrap();
                    (name, found)
                })
            })
            .collect();
        let mut resolved: HashMap<&str, Vec<Resolution>> = HashMap::new();
        for task in tasks {
            let (name, found) = task.await.unwrap();
            resolved.entry(name).or_default().push(found);
        }
        let groups = memory.groups.lock().unwrap().clone();
        assert_eq!(groups.len(), 1, "one group");
        assert_eq!(groups[0].fields.len(), audiences.len(), "one field each");
        for (name, found) in resolved {
            let field = find(&groups, "Engage Audiences", name).unwrap();
            assert!(
                found.iter().all(|f| *f == Resolution::Field(field)),
                "{name}"
            );
        }
        // The first read, one after creating the group, one after each field.
        assert_eq!(memory.reads(), 2 + audiences.len() as u32);
    }

    #[tokio::test]
    async fn a_name_held_by_a_field_of_another_type_is_not_created_again() {
        let mut text = field(7, "gold");
        text.data_type = "Text".into();
        let (memory, fields) = resolver(Memory::with(engage(vec![text])), REFRESH_EVERY);
        let found = fields
            .resolve(list(), "Engage Audiences", "gold", true, Instant::now())
            .await
            .unwrap();
        assert_eq!(found, Resolution::Unknown);
        assert_eq!(memory.groups.lock().unwrap()[0].fields.len(), 1);
    }

    #[tokio::test]
    async fn after_a_race_the_lowest_id_wins() {
        let memory = Memory {
            rival_first: true,
            ..Memory::with(engage(vec![]))
        };
        let (_memory, fields) = resolver(memory, REFRESH_EVERY);
        let found = fields
            .resolve(list(), "Engage Audiences", "gold", true, Instant::now())
            .await
            .unwrap();
        // Ours is 500; the rival's, created alongside, 400.
        assert_eq!(found, Resolution::Field(id(400)));
        assert_eq!(
            fields.lookup(list(), "Engage Audiences", "gold"),
            Some(id(400))
        );
    }

    #[tokio::test]
    async fn a_preloaded_list_answers_lookups_at_once_and_is_read_once() {
        let (memory, fields) =
            resolver(Memory::with(engage(vec![field(7, "gold")])), REFRESH_EVERY);
        fields.preload(list()).await;
        fields.preload(list()).await;
        assert_eq!(
            fields.lookup(list(), "Engage Audiences", "gold"),
            Some(id(7))
        );
        assert_eq!(memory.reads(), 1);
    }

    #[tokio::test]
    async fn a_refusal_naming_a_held_field_forgets_the_list() {
        let (_memory, fields) =
            resolver(Memory::with(engage(vec![field(7, "gold")])), REFRESH_EVERY);
        fields
            .resolve(list(), "Engage Audiences", "gold", false, Instant::now())
            .await
            .unwrap();
        let message = "Segmentation field 77 does not exist";
        assert!(!fields.refused(list(), message, [id(7)].into_iter()));
        assert!(fields.lookup(list(), "Engage Audiences", "gold").is_some());
        let message = "Segmentation field 7 does not exist";
        assert!(fields.refused(list(), message, [id(3), id(7)].into_iter()));
        assert_eq!(fields.lookup(list(), "Engage Audiences", "gold"), None);
    }

    #[tokio::test]
    async fn a_forgotten_list_is_read_again_on_the_next_miss() {
        let (memory, fields) = resolver(
            Memory::with(engage(vec![field(7, "gold")])),
            Duration::from_millis(100),
        );
        fields
            .resolve(list(), "Engage Audiences", "gold", false, Instant::now())
            .await
            .unwrap();
        assert!(fields.holds(list(), id(7)));
        memory.groups.lock().unwrap()[0].fields = vec![field(11, "gold")];
        fields.forget(list());
        assert_eq!(fields.lookup(list(), "Engage Audiences", "gold"), None);
        let found = fields
            .resolve(list(), "Engage Audiences", "gold", false, Instant::now())
            .await
            .unwrap();
        assert_eq!(found, Resolution::Field(id(11)));
        assert_eq!(memory.reads(), 2);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Two replicas (two resolvers on one catalogue) meet audiences in any order, with
        /// their requests interleaved at random: every resolution of an audience is the
        /// lowest id among its fields at the end, and each replica created each at most once.
        #[test]
        fn replicas_resolving_in_any_interleaving_agree_on_the_lowest_id(
            first in proptest::collection::vec(0usize..4, 1..10),
            second in proptest::collection::vec(0usize..4, 1..10),
            pauses in proptest::collection::vec(0u8..4, 0..80),
            group_exists in proptest::prelude::any::<bool>(),
        ) {
            let audiences = ["gold", "silver", "bronze", "platinum"];
            let memory = Arc::new(Memory {
                pauses: Mutex::new(pauses),
                ..Memory::with(if group_exists { engage(vec![]) } else { vec![] })
            });
            let replicas = [
                Arc::new(Fields::new(Arc::clone(&memory), Metrics::new(10))),
                Arc::new(Fields::new(Arc::clone(&memory), Metrics::new(10))),
            ];
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            let resolved = runtime.block_on(async {
                let seen = Instant::now();
                let calls = [first, second].into_iter().enumerate().flat_map(|(replica, order)| {
                    let fields = Arc::clone(&replicas[replica]);
                    order.into_iter().map(move |audience| {
                        let fields = Arc::clone(&fields);
                        async move {
                            let name = audiences[audience];
                            let found = fields
                                .resolve(list(), "Engage Audiences", name, true, seen)
                                .await
                                .unwrap();
                            (name, found)
                        }
                    })
                });
                futures_util::future::join_all(calls).await
            });
            let groups = memory.groups.lock().unwrap().clone();
            for (name, found) in resolved {
                let lowest = find(&groups, "Engage Audiences", name).unwrap();
                proptest::prop_assert_eq!(found, Resolution::Field(lowest), "{}", name);
                let copies = groups
                    .iter()
                    .flat_map(|g| &g.fields)
                    .filter(|f| f.name == name)
                    .count();
                proptest::prop_assert!(copies <= 2, "{} created {} times", name, copies);
            }
        }
    }
}
