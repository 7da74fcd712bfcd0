//! Fields: which profile field an `audience_field` mapping means, from each list's field
//! catalogue held in memory; missing fields (and their group) created when asked.
//!
//! A hit costs no request: the session looks a field up synchronously ([`Fields::lookup`]).
//! A miss is resolved in a task ([`Fields::resolve_all`]), within the message's hold budget:
//! the list's catalogue is read again, at most once per [`REFRESH_EVERY`] per list, and one
//! read answers every miss noticed before it. A read or creation that fails for Listrak's
//! reasons (5xx, 429, timeouts) is tried again after a growing pause shared by every waiter
//! of the list ([`FAILED_READ_PAUSE_FIRST`] up to [`FAILED_READ_PAUSE_MAX`]), so an outage
//! costs a few requests a second whatever the number of waiters; the message goes to the
//! retry queues when its budget is spent. Creations are limited per list and 24 hours
//! ([`Fields::new`]'s budget).
//! Several replicas may create the same field at once; each lists the group again after
//! creating and takes the lowest id among the Check Box fields of that name, so all of them
//! converge on one field.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

use tokio::time::Instant;

use crate::driver::unpoisoned::Mutex;
pub use crate::edges::listrak::{CatalogueError, FieldCatalogue};
use crate::edges::telemetry::{Metrics, Task};
use crate::stages::batch::Batch;
use crate::stages::catalogue::{same_name, FieldGroup};
use crate::stages::mapping::Plan;
use crate::stages::model::{FieldId, ListId, Rejection, Update, Verdict};

/// The least time between two reads of one list's catalogue.
pub const REFRESH_EVERY: Duration = Duration::from_secs(3);
/// The pause after a failed read or creation; it doubles with every failure in a row.
pub const FAILED_READ_PAUSE_FIRST: Duration = Duration::from_millis(250);
pub const FAILED_READ_PAUSE_MAX: Duration = Duration::from_secs(4);
/// The most refused creations remembered per list (see `Known::refused`).
const MAX_REFUSED_NAMES: usize = 1000;
/// The window the creation budget counts over.
pub const CREATION_WINDOW: Duration = Duration::from_secs(24 * 3600);
pub use crate::stages::classify::{Unresolvable, MAX_FIELD_NAME_CHARS};

/// A stand-in for Listrak that never reads or changes a catalogue (the delivery tests, the
/// session simulation): any call is a bug in the test.
#[cfg(test)]
pub(crate) trait WithoutCatalogue: Send + Sync + 'static {}

#[cfg(test)]
impl<T: WithoutCatalogue> FieldCatalogue for T {
    async fn field_groups(&self, _list: ListId) -> Result<Vec<FieldGroup>, CatalogueError> {
        unreachable!("this stand-in reads no catalogue")
    }

    async fn create_field_group(
        &self,
        _list: ListId,
        _name: &str,
        _position: u32,
    ) -> Result<u32, CatalogueError> {
        unreachable!("this stand-in creates no group")
    }

    async fn create_check_box(
        &self,
        _list: ListId,
        _group: u32,
        _name: &str,
        _position: u32,
    ) -> Result<FieldId, CatalogueError> {
        unreachable!("this stand-in creates no field")
    }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Field(FieldId),
    /// No such field after a read made since the miss, and `create` was not asked.
    Unknown,
    /// No such field, and it may not be created: the budget is spent, or the name cannot be a
    /// field's.
    NotCreated(NotCreated),
}

/// Why a missing field was not created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotCreated {
    /// `budget` fields were created in this list in the last 24 hours.
    BudgetSpent { budget: usize },
    /// The audience key is empty, too long, or holds control characters.
    InvalidName,
}

impl NotCreated {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::BudgetSpent { .. } => "budget",
            Self::InvalidName => "invalid_name",
        }
    }
}

/// Whether `name` can be a Listrak field's name.
pub fn valid_field_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.chars().count() <= MAX_FIELD_NAME_CHARS
        && !name.chars().any(char::is_control)
}

/// What is known of one list.
#[derive(Default)]
struct Known {
    groups: Vec<FieldGroup>,
    /// When the catalogue was last read; `None` before the first read.
    read_at: Option<Instant>,
    /// Listrak refused a field id of this list: what is held may be wrong.
    stale: bool,
    /// The last failed read or creation and how many failed in a row: the next request
    /// waits for the pause this implies, whoever makes it.
    failed: Option<(Instant, u32)>,
    /// When each field created in the last [`CREATION_WINDOW`] was created, oldest first.
    created: VecDeque<Instant>,
    /// The last creation Listrak refused for good, by field name (as `same_name` compares):
    /// when, and why. It answers every miss for that name noticed before it, without asking
    /// again.
    refused: HashMap<String, (Instant, CatalogueError)>,
}

impl Known {
    /// When the next request may start after failures, if failures ask for a pause.
    fn pause_until(&self) -> Option<Instant> {
        self.failed.map(|(at, streak)| {
            let doublings = streak.saturating_sub(1).min(16);
            let pause = FAILED_READ_PAUSE_FIRST.saturating_mul(1 << doublings);
            at + pause.min(FAILED_READ_PAUSE_MAX)
        })
    }

    fn creations_in_window(&mut self, now: Instant) -> usize {
        while self
            .created
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) >= CREATION_WINDOW)
        {
            self.created.pop_front();
        }
        self.created.len()
    }
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
    /// The most fields created per list in [`CREATION_WINDOW`].
    creation_budget: usize,
    lists: Mutex<HashMap<ListId, Arc<ListState>>>,
}

impl<C: FieldCatalogue> Fields<C> {
    /// `creation_budget`: the most fields `create = true` creates per list in 24 hours.
    pub fn new(catalogue: Arc<C>, metrics: Metrics, creation_budget: usize) -> Self {
        Self {
            catalogue,
            metrics,
            refresh_every: REFRESH_EVERY,
            creation_budget,
            lists: Mutex::new(HashMap::new()),
        }
    }

    pub fn with_refresh(catalogue: Arc<C>, metrics: Metrics, refresh_every: Duration) -> Self {
        Self {
            refresh_every,
            ..Self::new(catalogue, metrics, 100)
        }
    }

    fn state(&self, list: ListId) -> Arc<ListState> {
        let mut lists = self.lists.lock();
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
        let lists = self.lists.lock();
        let state = lists.get(&list)?;
        let known = state.known.lock();
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
    /// message that arrived at `seen`, by `deadline` (its hold budget): past it, the wait
    /// ends with [`Unresolvable::OutOfTime`]. A panic (a bug) ends it with
    /// [`Unresolvable::Panicked`], counted.
    pub async fn resolve_all(
        &self,
        plan: Plan,
        seen: Instant,
        deadline: Instant,
    ) -> Result<Vec<Update>, Unresolvable> {
        let resolving = AssertUnwindSafe(self.resolve_within(plan, seen)).catch_unwind();
        match tokio::time::timeout_at(deadline, resolving).await {
            Ok(Ok(resolved)) => resolved,
            Ok(Err(_)) => {
                self.metrics.task_panicked(Task::Resolve);
                Err(Unresolvable::Panicked)
            }
            Err(_) => Err(Unresolvable::OutOfTime),
        }
    }

    async fn resolve_within(&self, plan: Plan, seen: Instant) -> Result<Vec<Update>, Unresolvable> {
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
            let group = unresolved.group.clone();
            let name = unresolved.audience_key.clone();
            match resolution {
                Resolution::Field(field) => updates.push(unresolved.resolved(field)),
                Resolution::Unknown => {
                    return Err(Unresolvable::UnknownField { list, group, name })
                }
                Resolution::NotCreated(why) => {
                    self.metrics.field_not_created(list, &name, why.as_str());
                    return Err(match why {
                        NotCreated::BudgetSpent { budget } => Unresolvable::BudgetSpent {
                            list,
                            group,
                            name,
                            budget,
                        },
                        NotCreated::InvalidName => Unresolvable::InvalidName { list, name },
                    });
                }
            }
        }
        Ok(updates)
    }

    /// Listrak refused a field id of this list (a field deleted or changed since it was
    /// read): what is held is dropped, and the next miss reads the list again.
    pub fn forget(&self, list: ListId) {
        let state = self.state(list);
        let mut known = state.known.lock();
        known.groups.clear();
        known.stale = true;
    }

    /// Reads the list's catalogue unless it was read already, so that the first events need
    /// not wait for it; a failure is left to the first miss.
    pub async fn preload(&self, list: ListId) {
        let state = self.state(list);
        let _turn = state.turn.lock().await;
        if state.known.lock().read_at.is_some() {
            return;
        }
        let read = AssertUnwindSafe(self.read(list, &state))
            .catch_unwind()
            .await;
        let Ok(read) = read else {
            self.metrics.task_panicked(Task::Resolve);
            return;
        };
        if let Err(error) = read {
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

    /// Learns from a delivered batch's verdicts: a contact dead-lettered on a 400 that names
    /// one of its fields from the catalogue makes the list's catalogue be read again.
    pub fn learn_from(&self, batch: &Batch, verdicts: &[Verdict]) {
        for (contact, verdict) in batch.contacts.iter().zip(verdicts) {
            if let Verdict::DeadLetter(Rejection {
                status: Some(400),
                message: Some(message),
                ..
            }) = verdict
            {
                let fields = contact.fields.iter().map(|value| value.field);
                self.refused(batch.list_id, message, fields);
            }
        }
    }

    /// Whether `field` is in what is held of `list`'s catalogue.
    pub fn holds(&self, list: ListId, field: FieldId) -> bool {
        let lists = self.lists.lock();
        lists.get(&list).is_some_and(|state| {
            let known = state.known.lock();
            known
                .groups
                .iter()
                .flat_map(|g| &g.fields)
                .any(|f| f.id == field)
        })
    }

    /// The field for a miss noticed at `seen`: from a read made after `seen` (waiting for the
    /// list's next allowed read if need be), then, with `create`, by creating it (and its
    /// group), within the creation budget. A failure of Listrak's (see
    /// [`CatalogueError::is_systemic`]) is tried again after the list's pause, until the
    /// caller's deadline; any other is the answer.
    pub async fn resolve(
        &self,
        list: ListId,
        group: &str,
        name: &str,
        create: bool,
        seen: Instant,
    ) -> Result<Resolution, CatalogueError> {
        loop {
            match self.try_resolve(list, group, name, create, seen).await {
                Err(error) if error.is_systemic() => {
                    tracing::debug!(
                        list_id = %list,
                        %error,
                        "the list's profile fields could not be read or extended; trying again"
                    );
                }
                answer => return answer,
            }
        }
    }

    async fn try_resolve(
        &self,
        list: ListId,
        group: &str,
        name: &str,
        create: bool,
        seen: Instant,
    ) -> Result<Resolution, CatalogueError> {
        let state = self.state(list);
        let _turn = state.turn.lock().await;
        let (found, read_at, stale, pause_until) = {
            let known = state.known.lock();
            (
                find(&known.groups, group, name),
                known.read_at,
                known.stale,
                known.pause_until(),
            )
        };
        if let Some(field) = found {
            return Ok(Resolution::Field(field));
        }
        let read_since_seen = read_at.is_some_and(|at| at >= seen) && !stale;
        if !read_since_seen {
            let refresh_at = read_at.map_or_else(Instant::now, |at| at + self.refresh_every);
            let allowed_at = pause_until.map_or(refresh_at, |pause| pause.max(refresh_at));
            let loaded = read_at.is_some() && !stale;
            // Creating does not wait for a read (it lists the group again afterwards anyway),
            // unless failures ask for a pause.
            if !(create && loaded && pause_until.is_none() && allowed_at > Instant::now()) {
                tokio::time::sleep_until(allowed_at).await;
                let groups = self.read(list, &state).await?;
                if let Some(field) = find(&groups, group, name) {
                    return Ok(Resolution::Field(field));
                }
            }
        }
        let taken = {
            let known = state.known.lock();
            taken_by_another_type(&known.groups, group, name)
        };
        if !create || taken {
            return Ok(Resolution::Unknown);
        }
        if !valid_field_name(name) {
            return Ok(Resolution::NotCreated(NotCreated::InvalidName));
        }
        let spent = state.known.lock().creations_in_window(Instant::now()) >= self.creation_budget;
        if spent {
            return Ok(Resolution::NotCreated(NotCreated::BudgetSpent {
                budget: self.creation_budget,
            }));
        }
        let key = name.trim().to_lowercase();
        let refused = state.known.lock().refused.get(&key).cloned();
        if let Some((at, error)) = refused.filter(|(at, _)| *at >= seen) {
            tracing::debug!(list_id = %list, ?at, "a creation refused since the miss answers it");
            return Err(error);
        }
        let pause = state.known.lock().pause_until();
        if let Some(pause) = pause {
            tokio::time::sleep_until(pause).await;
        }
        counts_as_failed_until_answered(&state);
        let created = self.create(list, &state, group, name).await;
        let mut known = state.known.lock();
        match &created {
            Ok(_) => {
                known.failed = None;
                known.refused.remove(&key);
            }
            Err(error) if !error.is_systemic() => {
                // Bounded: a producer inventing names cannot grow it past what it refuses.
                if known.refused.len() >= MAX_REFUSED_NAMES {
                    known.refused.clear();
                }
                known.refused.insert(key, (Instant::now(), error.clone()));
            }
            Err(_) => {}
        }
        drop(known);
        created.map(Resolution::Field)
    }

    async fn read(
        &self,
        list: ListId,
        state: &ListState,
    ) -> Result<Vec<FieldGroup>, CatalogueError> {
        let started = Instant::now();
        self.metrics.catalogue_read();
        counts_as_failed_until_answered(state);
        let groups = self.catalogue.field_groups(list).await?;
        let mut known = state.known.lock();
        known.groups = groups.clone();
        known.read_at = Some(started);
        known.stale = false;
        known.failed = None;
        Ok(groups)
    }

    async fn create(
        &self,
        list: ListId,
        state: &ListState,
        group: &str,
        name: &str,
    ) -> Result<FieldId, CatalogueError> {
        let groups = state.known.lock().groups.clone();
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
        // Counted when asked for: a creation whose answer is lost may still have happened.
        state.known.lock().created.push_back(Instant::now());
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

/// Until it is answered, a request counts as one more failure in a row: one given up at a
/// waiter's deadline (or failing) makes the next waiter pause too, instead of each waiter
/// starting a request of its own.
fn counts_as_failed_until_answered(state: &ListState) {
    let mut known = state.known.lock();
    known.failed = Some((
        Instant::now(),
        known.failed.map_or(1, |(_, streak)| streak + 1),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::catalogue::{FieldInfo, CHECK_BOX};
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
        /// While set, every request answers this status.
        failing: Mutex<Option<u16>>,
        /// Waits this long before answering a read (on the test's clock).
        read_latency: Mutex<Duration>,
    }

    impl Memory {
        fn with(groups: Vec<FieldGroup>) -> Self {
            Self {
                groups: Mutex::new(groups),
                next_id: AtomicU32::new(500),
                ..Self::default()
            }
        }

        fn fail(&self) -> Result<(), CatalogueError> {
            match *self.failing.lock() {
                Some(status) => Err(CatalogueError::Refused {
                    request: "a catalogue request".into(),
                    status,
                    error: "ERROR".into(),
                    message: format!("answered {status}"),
                }),
                None => Ok(()),
            }
        }

        fn reads(&self) -> u32 {
            self.reads.load(Ordering::SeqCst)
        }

        async fn pause(&self) {
            let turns = self.pauses.lock().pop().unwrap_or(0);
            for _ in 0..turns {
                tokio::task::yield_now().await;
            }
        }
    }

    impl FieldCatalogue for Memory {
        async fn field_groups(&self, _list: ListId) -> Result<Vec<FieldGroup>, CatalogueError> {
            self.pause().await;
            self.reads.fetch_add(1, Ordering::SeqCst);
            let latency = *self.read_latency.lock();
            tokio::time::sleep(latency).await;
            self.fail()?;
            Ok(self.groups.lock().clone())
        }

        async fn create_field_group(
            &self,
            _list: ListId,
            name: &str,
            _position: u32,
        ) -> Result<u32, CatalogueError> {
            self.pause().await;
            self.fail()?;
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            self.groups.lock().push(FieldGroup {
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
            self.fail()?;
            let ours = self.next_id.fetch_add(1, Ordering::SeqCst);
            let mut groups = self.groups.lock();
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
        memory.groups.lock()[0].fields.push(field(9, "gold"));
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
        let groups = memory.groups.lock().clone();
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
        let groups = memory.groups.lock().clone();
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
        assert_eq!(memory.groups.lock()[0].fields.len(), 1);
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
        memory.groups.lock()[0].fields = vec![field(11, "gold")];
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
                Arc::new(Fields::new(Arc::clone(&memory), Metrics::new(10), 100)),
                Arc::new(Fields::new(Arc::clone(&memory), Metrics::new(10), 100)),
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
            let groups = memory.groups.lock().clone();
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

    fn plan_for(audience: &str) -> Plan {
        use crate::stages::mapping::Unresolved;
        use crate::stages::model::{EventTime, Update};
        Plan {
            updates: vec![],
            unresolved: vec![Unresolved {
                update: Update {
                    list_id: list(),
                    email: "a@example.com".into(),
                    fields: vec![],
                    timestamp: EventTime(1),
                },
                group: "Engage Audiences".into(),
                audience_key: audience.into(),
                value: "on",
                create: true,
            }],
        }
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_budget_of_creations_a_list_creates_no_field_and_says_why() {
        let memory = Arc::new(Memory::with(engage(vec![])));
        let fields = Fields::new(Arc::clone(&memory), Metrics::new(10), 3);
        for index in 0..3 {
            let audience = format!("audience_{index}");
            let resolved = fields
                .resolve_all(plan_for(&audience), Instant::now(), far())
                .await;
            assert!(resolved.is_ok(), "{resolved:?}");
        }
        let refused = fields
            .resolve_all(plan_for("audience_3"), Instant::now(), far())
            .await;
        let Err(why @ Unresolvable::BudgetSpent { budget: 3, .. }) = refused else {
            panic!("{refused:?}");
        };
        assert!(
            why.to_string().contains("listrak.field_creation_budget"),
            "{why}"
        );
        assert_eq!(memory.groups.lock()[0].fields.len(), 3);
        assert_eq!(
            fields
                .metrics
                .sample("listrak_fields_not_created_total", &[("reason", "budget")]),
            1.0
        );
        // A field that exists is still found, and the budget comes back after 24 hours.
        assert!(fields
            .resolve_all(plan_for("audience_1"), Instant::now(), far())
            .await
            .is_ok());
        tokio::time::advance(CREATION_WINDOW).await;
        assert!(fields
            .resolve_all(plan_for("audience_3"), Instant::now(), far())
            .await
            .is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_audience_key_that_cannot_be_a_field_name_is_refused_without_a_request() {
        let memory = Arc::new(Memory::with(engage(vec![])));
        let fields = Fields::new(Arc::clone(&memory), Metrics::new(10), 100);
        fields.preload(list()).await;
        let reads = memory.reads();
        for name in [
            "",
            "  ",
            "bad\u{7}key",
            &"x".repeat(MAX_FIELD_NAME_CHARS + 1),
        ] {
            // The miss is noticed before the last read: no new read is needed.
            let refused = fields
                .resolve_all(
                    plan_for(name),
                    Instant::now() - Duration::from_secs(1),
                    far(),
                )
                .await;
            assert!(
                matches!(refused, Err(Unresolvable::InvalidName { .. })),
                "{name:?}: {refused:?}"
            );
        }
        assert_eq!(memory.reads(), reads);
        assert!(memory.groups.lock()[0].fields.is_empty());
        assert!(valid_field_name(&"x".repeat(MAX_FIELD_NAME_CHARS)));
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_catalogue_is_read_a_few_times_a_second_however_many_wait() {
        let memory = Arc::new(Memory::with(engage(vec![])));
        *memory.failing.lock() = Some(503);
        let fields = Arc::new(Fields::new(Arc::clone(&memory), Metrics::new(10), 100));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(10);
        let waiters: Vec<_> = (0..200)
            .map(|index| {
                let fields = Arc::clone(&fields);
                tokio::spawn(async move {
                    let audience = format!("audience_{}", index % 20);
                    fields
                        .resolve_all(plan_for(&audience), started, deadline)
                        .await
                })
            })
            .collect();
        for waiter in waiters {
            let resolved = waiter.await.unwrap();
            assert!(
                matches!(resolved, Err(Unresolvable::OutOfTime)),
                "every waiter is answered at its deadline: {resolved:?}"
            );
        }
        assert_eq!(
            Instant::now(),
            deadline,
            "no waiter is held past its deadline"
        );
        let reads = memory.reads();
        assert!(
            (3..=10).contains(&reads),
            "{reads} reads in 10 s for 200 waiters"
        );
        // Once Listrak answers again, the next miss is resolved by one read and a creation.
        *memory.failing.lock() = None;
        let resolved = fields
            .resolve_all(plan_for("audience_1"), Instant::now(), far())
            .await;
        assert!(resolved.is_ok(), "{resolved:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_catalogue_holds_no_message_past_its_deadline() {
        let memory = Arc::new(Memory::with(engage(vec![])));
        *memory.read_latency.lock() = Duration::from_secs(30);
        let fields = Arc::new(Fields::new(Arc::clone(&memory), Metrics::new(10), 100));
        let started = Instant::now();
        let waiters: Vec<_> = (0..50u64)
            .map(|index| {
                let fields = Arc::clone(&fields);
                let deadline = started + Duration::from_millis(1200 + index * 10);
                tokio::spawn(async move {
                    let resolved = fields
                        .resolve_all(plan_for("gold"), started, deadline)
                        .await;
                    (resolved, deadline, Instant::now())
                })
            })
            .collect();
        for waiter in waiters {
            let (resolved, deadline, answered) = waiter.await.unwrap();
            assert!(
                matches!(resolved, Err(Unresolvable::OutOfTime)),
                "{resolved:?}"
            );
            assert_eq!(answered, deadline);
        }
        let reads = memory.reads();
        assert!(
            reads <= 3,
            "{reads} reads for 50 waiters on a catalogue that hangs"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_creation_refused_for_good_is_the_answer_not_a_retry() {
        let memory = Arc::new(Memory::with(engage(vec![])));
        let fields = Fields::new(Arc::clone(&memory), Metrics::new(10), 100);
        fields.preload(list()).await;
        *memory.failing.lock() = Some(400);
        let refused = fields
            .resolve_all(plan_for("gold"), Instant::now(), far())
            .await;
        let Err(Unresolvable::Catalogue(error)) = refused else {
            panic!("{refused:?}");
        };
        assert!(!error.is_systemic());
        assert!(error.to_string().contains("answered 400"), "{error}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_resolution_that_panics_is_counted_and_answered() {
        struct Panicking;
        impl FieldCatalogue for Panicking {
            async fn field_groups(&self, _: ListId) -> Result<Vec<FieldGroup>, CatalogueError> {
                panic!("a bug in a catalogue read")
            }
            async fn create_field_group(
                &self,
                _: ListId,
                _: &str,
                _: u32,
            ) -> Result<u32, CatalogueError> {
                unreachable!()
            }
            async fn create_check_box(
                &self,
                _: ListId,
                _: u32,
                _: &str,
                _: u32,
            ) -> Result<FieldId, CatalogueError> {
                unreachable!()
            }
        }
        let fields = Fields::new(Arc::new(Panicking), Metrics::new(10), 100);
        let resolved = fields
            .resolve_all(plan_for("gold"), Instant::now(), far())
            .await;
        assert!(
            matches!(resolved, Err(Unresolvable::Panicked)),
            "{resolved:?}"
        );
        assert_eq!(
            fields
                .metrics
                .sample("listrak_task_panics_total", &[("task", "resolve")]),
            1.0
        );
        // The list's state survived: the next resolution panics again, it does not hang.
        let again = fields
            .resolve_all(plan_for("gold"), Instant::now(), far())
            .await;
        assert!(matches!(again, Err(Unresolvable::Panicked)), "{again:?}");
    }
}
