//! Grouping: updates collected per list, merged per contact, last write wins per field; and
//! the order per contact: a contact is never in two requests at once.
//!
//! Pure and clock-driven: the caller passes `now`, so every flush rule is tested without
//! sleeping. The encoded size of each batch is tracked exactly as the request body will be,
//! so `max_bytes` is a promise, not an estimate.
//!
//! A list has as many requests in flight as the adaptive concurrency allows, and a contact's
//! updates still reach Listrak in the order they were formed: each contact (a stable hash of
//! its lower-cased email, with the list) is its own partition with one request chain. While a
//! request carrying a contact is unanswered, newer updates of that contact wait beside the
//! open batches ("parked") and join the open batch when the answer comes. So a batch never
//! holds a contact in flight, batches leave full, and one slow or failing request holds back
//! only its own contacts' later updates, not a list.

use rustc_hash::{FxHashMap as HashMap, FxHasher};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use crate::stages::model::{EventTime, FieldId, ListId, Update};

/// Identifies the message an update came from; opaque to the batcher.
pub type MessageKey = u64;

#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub max_contacts: usize,
    pub max_bytes: usize,
    pub max_wait: Duration,
}

/// Why a batch left the batcher; the `trigger` label of `listrak_batch_flushes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushTrigger {
    Size,
    Bytes,
    Time,
    /// Nothing more could come: the input paused (see `ArrivalPace`) with nothing on its way
    /// to Listrak, and the queue was empty or the prefetch window full; or the window is
    /// full and this batch holds the lowest unacknowledged message, which no other answer
    /// can free.
    Idle,
    Shutdown,
}

impl FlushTrigger {
    pub const ALL: [FlushTrigger; 5] = [
        Self::Size,
        Self::Bytes,
        Self::Time,
        Self::Idle,
        Self::Shutdown,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Bytes => "bytes",
            Self::Time => "time",
            Self::Idle => "idle",
            Self::Shutdown => "shutdown",
        }
    }
}

/// One field's winning value and the event time that made it win.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldValue {
    pub field: FieldId,
    pub value: String,
    pub timestamp: EventTime,
}

/// One contact entry of a request, and every message whose updates it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    pub email: String,
    /// Sorted by field id, one entry per field.
    pub fields: Vec<FieldValue>,
    /// Messages that settle when this contact is settled, in arrival order, without repeats.
    pub messages: Vec<MessageKey>,
    /// When the oldest of `messages` arrived: its hold time, and so its retry budget, counts
    /// from then.
    pub since: Instant,
}

impl Contact {
    /// The exact length of this contact's JSON object in the request body.
    pub fn encoded_len(&self) -> usize {
        // {"emailAddress":"…","segmentationFieldValues":[…]}
        let mut len = r#"{"emailAddress":,"segmentationFieldValues":[]}"#.len();
        len += json_string_len(&self.email);
        for (i, field) in self.fields.iter().enumerate() {
            // {"segmentationFieldId":N,"value":"…"}
            len += usize::from(i > 0);
            len += r#"{"segmentationFieldId":,"value":}"#.len();
            len += decimal_len(field.field.get());
            len += json_string_len(&field.value);
        }
        len
    }

    /// A contact entry opened by one update of message `key`, arrived at `now`.
    fn first(
        email: String,
        fields: Vec<(FieldId, String)>,
        timestamp: EventTime,
        key: MessageKey,
        now: Instant,
    ) -> Self {
        let mut contact = Contact {
            email,
            fields: Vec::with_capacity(fields.len()),
            messages: vec![key],
            since: now,
        };
        contact.merge(fields, timestamp);
        contact
    }

    /// Adds message `key` to those this entry settles; true if it was not among them yet.
    fn add_message(&mut self, key: MessageKey) -> bool {
        if self.messages.last() == Some(&key) || self.messages.contains(&key) {
            return false;
        }
        self.messages.push(key);
        true
    }

    /// Merges one update in; on the same field the later timestamp wins, and on equal
    /// timestamps the later delivery (this one) wins, so "Entered then Exited" ends "off".
    fn merge(&mut self, fields: Vec<(FieldId, String)>, timestamp: EventTime) {
        for (field, value) in fields {
            match self.fields.binary_search_by_key(&field, |f| f.field) {
                Ok(at) => {
                    if timestamp >= self.fields[at].timestamp {
                        self.fields[at] = FieldValue {
                            field,
                            value,
                            timestamp,
                        };
                    }
                }
                Err(at) => self.fields.insert(
                    at,
                    FieldValue {
                        field,
                        value,
                        timestamp,
                    },
                ),
            }
        }
    }
}

/// A request's worth of contacts for one list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub list_id: ListId,
    pub contacts: Vec<Contact>,
    pub trigger: FlushTrigger,
}

impl Batch {
    /// When the oldest message it carries arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.contacts.iter().map(|c| c.since).min()
    }
}

/// A request body as it is sent: `[`, one JSON object per contact, `]`. Its length is
/// what `Contact::encoded_len` predicts, which is how batches stay under `max_bytes`.
pub struct RequestBody {
    bytes: Vec<u8>,
}

impl RequestBody {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut body = Vec::with_capacity(bytes);
        body.push(b'[');
        RequestBody { bytes: body }
    }

    /// Appends one contact with the given fields (those of its entry still worth sending).
    pub fn push<'a>(&mut self, email: &str, fields: impl IntoIterator<Item = &'a FieldValue>) {
        // Past the opening `[`, a contact is already written.
        if self.bytes.len() > 1 {
            self.bytes.push(b',');
        }
        encode_contact(&mut self.bytes, email, fields);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.push(b']');
        self.bytes
    }
}

fn encode_contact<'a>(
    body: &mut Vec<u8>,
    email: &str,
    fields: impl IntoIterator<Item = &'a FieldValue>,
) {
    body.extend_from_slice(br#"{"emailAddress":"#);
    write_json_string(body, email);
    body.extend_from_slice(br#","segmentationFieldValues":["#);
    for (j, field) in fields.into_iter().enumerate() {
        if j > 0 {
            body.push(b',');
        }
        body.extend_from_slice(br#"{"segmentationFieldId":"#);
        write_decimal(body, field.field.get());
        body.extend_from_slice(br#","value":"#);
        write_json_string(body, &field.value);
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
}

fn write_decimal(body: &mut Vec<u8>, mut n: u32) {
    let mut digits = [0u8; 10];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    body.extend_from_slice(&digits[at..]);
}

fn body_len(contacts: &[Contact]) -> usize {
    2 + contacts.iter().map(Contact::encoded_len).sum::<usize>() + contacts.len().saturating_sub(1)
}

/// Contacts of one list waiting to be sent.
#[derive(Debug)]
struct OpenBatch {
    contacts: Vec<Contact>,
    by_email: HashMap<String, usize>,
    /// Equals `body_len(&contacts)`, kept up to date on every merge.
    bytes: usize,
    opened_at: Instant,
}

impl OpenBatch {
    fn new(now: Instant) -> Self {
        Self {
            contacts: Vec::new(),
            by_email: HashMap::default(),
            bytes: 2,
            opened_at: now,
        }
    }
}

/// What adding one update did.
#[derive(Debug, Default)]
pub struct Added {
    /// The message gained a contact entry it was not part of yet: one more part to settle.
    pub new_part: bool,
    /// Batches that became full and must be sent now.
    pub flushed: Vec<Batch>,
}

/// A contact's partition within its list: requests for one partition never overlap. A hash
/// collision only makes two contacts wait for each other, never mixes their fields.
type PartitionKey = (ListId, u64);

fn partition_of(list_id: ListId, email: &str) -> PartitionKey {
    // Emails arrive lower-cased (see `decode`), so case variants share a partition.
    let mut hasher = FxHasher::default();
    email.hash(&mut hasher);
    (list_id, hasher.finish())
}

/// Open batches of every list, and the contacts whose request is not answered yet.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    open: HashMap<ListId, OpenBatch>,
    /// Partitions with a request in flight, and how many of their contacts it carries (more
    /// than one only when two emails share a hash).
    in_flight: HashMap<PartitionKey, u32>,
    /// Newer updates of contacts in flight, one entry per email, waiting for the answer.
    parked: HashMap<PartitionKey, Vec<Contact>>,
}

impl Batcher {
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            open: HashMap::default(),
            in_flight: HashMap::default(),
            parked: HashMap::default(),
        }
    }

    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// Adds one update of message `key`.
    #[cfg(test)]
    pub fn add(&mut self, key: MessageKey, update: Update, now: Instant) -> Added {
        self.add_with_ceiling(key, update, now, self.limits.max_bytes)
    }

    /// Adds one update, with a byte ceiling for its list that may be lower than `max_bytes`
    /// (a list whose size limit Listrak proved to be smaller).
    pub fn add_with_ceiling(
        &mut self,
        key: MessageKey,
        update: Update,
        now: Instant,
        max_bytes: usize,
    ) -> Added {
        let mut added = Added::default();
        let max_bytes = max_bytes.min(self.limits.max_bytes);
        let Update {
            list_id,
            email,
            fields,
            timestamp,
        } = update;

        let partition = partition_of(list_id, &email);
        if self.in_flight.contains_key(&partition) {
            let waiting = self.parked.entry(partition).or_default();
            match waiting.iter_mut().find(|c| c.email == email) {
                Some(contact) => {
                    contact.merge(fields, timestamp);
                    added.new_part = contact.add_message(key);
                }
                None => {
                    waiting.push(Contact::first(email, fields, timestamp, key, now));
                    added.new_part = true;
                }
            }
            return added;
        }

        let open = self
            .open
            .entry(list_id)
            .or_insert_with(|| OpenBatch::new(now));
        if let Some(&at) = open.by_email.get(&email) {
            let contact = &mut open.contacts[at];
            let before = contact.encoded_len();
            contact.merge(fields, timestamp);
            added.new_part = contact.add_message(key);
            open.bytes = open.bytes + contact.encoded_len() - before;
            if open.bytes > max_bytes && open.contacts.len() > 1 {
                // The merge grew the body past the limit: send the others now, and let this
                // contact open the next batch.
                let contact = open.contacts.swap_remove(at);
                open.by_email.remove(&contact.email);
                if let Some(moved) = open.contacts.get(at) {
                    open.by_email.insert(moved.email.clone(), at);
                }
                open.bytes = body_len(&open.contacts);
                let flushed = self.take(list_id, FlushTrigger::Bytes, now);
                added.flushed.push(flushed);
                self.insert_contact(list_id, contact, now);
            }
            self.flush_if_full(list_id, now, max_bytes, &mut added);
        } else {
            added.new_part = true;
            let contact = Contact::first(email, fields, timestamp, key, now);
            self.place(list_id, contact, now, max_bytes, &mut added);
        }
        added
    }

    /// The request for `batch` has its answer, whatever it was: its contacts' parked updates
    /// join the open batch of its list (`max_bytes`: the list's byte ceiling, as for
    /// `add_with_ceiling`). Returns the batches that became full.
    pub fn answered(&mut self, batch: &Batch, now: Instant, max_bytes: usize) -> Vec<Batch> {
        let mut added = Added::default();
        let max_bytes = max_bytes.min(self.limits.max_bytes);
        for contact in &batch.contacts {
            let partition = partition_of(batch.list_id, &contact.email);
            match self.in_flight.get_mut(&partition) {
                None => continue,
                Some(carried) if *carried > 1 => {
                    *carried -= 1;
                    continue;
                }
                Some(_) => {
                    self.in_flight.remove(&partition);
                }
            }
            for waiting in self.parked.remove(&partition).unwrap_or_default() {
                self.place(batch.list_id, waiting, now, max_bytes, &mut added);
            }
        }
        added.flushed
    }

    /// Puts a contact that no open batch of its list holds into the open batch, sending the
    /// batch first if the contact would push it past `max_bytes`.
    fn place(
        &mut self,
        list_id: ListId,
        contact: Contact,
        now: Instant,
        max_bytes: usize,
        added: &mut Added,
    ) {
        let open = self
            .open
            .entry(list_id)
            .or_insert_with(|| OpenBatch::new(now));
        let grown = open.bytes + contact.encoded_len() + usize::from(!open.contacts.is_empty());
        if grown > max_bytes && !open.contacts.is_empty() {
            let flushed = self.take(list_id, FlushTrigger::Bytes, now);
            added.flushed.push(flushed);
        }
        self.insert_contact(list_id, contact, now);
        self.flush_if_full(list_id, now, max_bytes, added);
    }

    fn flush_if_full(
        &mut self,
        list_id: ListId,
        now: Instant,
        max_bytes: usize,
        added: &mut Added,
    ) {
        let open = &self.open[&list_id];
        let trigger = if open.contacts.len() >= self.limits.max_contacts {
            FlushTrigger::Size
        } else if open.bytes >= max_bytes {
            FlushTrigger::Bytes
        } else {
            return;
        };
        let flushed = self.take(list_id, trigger, now);
        added.flushed.push(flushed);
    }

    fn insert_contact(&mut self, list_id: ListId, contact: Contact, now: Instant) {
        let open = self
            .open
            .entry(list_id)
            .or_insert_with(|| OpenBatch::new(now));
        if !open.contacts.is_empty() {
            open.bytes += 1;
        }
        open.bytes += contact.encoded_len();
        // A parked contact brings its age along: the batch leaves by its `max_wait`. The first
        // contact sets it: the empty batch left behind by a flush is not older than it.
        open.opened_at = if open.contacts.is_empty() {
            contact.since
        } else {
            open.opened_at.min(contact.since)
        };
        open.by_email
            .insert(contact.email.clone(), open.contacts.len());
        open.contacts.push(contact);
    }

    /// Takes the open batch of a list out to be sent: its contacts are in flight from now.
    fn take(&mut self, list_id: ListId, trigger: FlushTrigger, now: Instant) -> Batch {
        let open = self
            .open
            .insert(list_id, OpenBatch::new(now))
            .expect("a batch is open for the list being flushed");
        self.leave(list_id, open, trigger)
    }

    fn leave(&mut self, list_id: ListId, open: OpenBatch, trigger: FlushTrigger) -> Batch {
        for contact in &open.contacts {
            *self
                .in_flight
                .entry(partition_of(list_id, &contact.email))
                .or_default() += 1;
        }
        Batch {
            list_id,
            contacts: open.contacts,
            trigger,
        }
    }

    /// The earliest moment a partial batch must leave, if any is open.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.open
            .values()
            .filter(|open| !open.contacts.is_empty())
            .map(|open| open.opened_at + self.limits.max_wait)
            .min()
    }

    /// Partial batches that have waited `max_wait`.
    pub fn flush_due(&mut self, now: Instant) -> Vec<Batch> {
        let max_wait = self.limits.max_wait;
        self.flush_where(FlushTrigger::Time, |open| {
            now.saturating_duration_since(open.opened_at) >= max_wait
        })
    }

    /// Every open batch, for shutdown. Parked updates leave once their contact's request is
    /// answered (`answered`, then this again).
    pub fn flush_all(&mut self) -> Vec<Batch> {
        self.flush_where(FlushTrigger::Shutdown, |_| true)
    }

    /// The open batches that carry part of message `key` (one per list it updates): they
    /// leave now.
    pub fn flush_holding(&mut self, key: MessageKey) -> Vec<Batch> {
        self.flush_where(FlushTrigger::Idle, |open| {
            open.contacts
                .iter()
                .any(|contact| contact.messages.contains(&key))
        })
    }

    /// Every open batch, because no more input is coming for now.
    pub fn flush_idle(&mut self) -> Vec<Batch> {
        self.flush_where(FlushTrigger::Idle, |_| true)
    }

    fn flush_where(
        &mut self,
        trigger: FlushTrigger,
        due: impl Fn(&OpenBatch) -> bool,
    ) -> Vec<Batch> {
        let lists: Vec<ListId> = self
            .open
            .iter()
            .filter(|(_, open)| !open.contacts.is_empty() && due(open))
            .map(|(list, _)| *list)
            .collect();
        lists
            .into_iter()
            .map(|list_id| {
                let open = self.open.remove(&list_id).expect("listed above");
                self.leave(list_id, open, trigger)
            })
            .collect()
    }

    /// Some contact waits for an earlier request of its own to be answered. Asked on every
    /// turn of the session loop: O(1), where `parked` counts.
    pub fn any_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// Contacts waiting for an earlier request of theirs to be answered.
    #[cfg(test)]
    pub fn parked(&self) -> usize {
        self.parked.values().map(Vec::len).sum()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.open.values().all(|open| open.contacts.is_empty())
    }
}

fn decimal_len(mut n: u32) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Length of `text` as a JSON string literal, quotes included, escaped as serde_json does.
fn json_string_len(text: &str) -> usize {
    2 + text
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The pace of arrivals, to tell when the input has gone quiet: a drained backlog or the
/// end of a burst has nothing more to add to the open batches, and lingering for
/// `max_wait` would only delay them (and, with a prefetch window full of unsent updates,
/// stall the consumer until then). Quiet means a gap many times the recent typical gap,
/// so a steady trickle never looks quiet and batches at low rates fill for `max_wait` as
/// before: at 500 events a second the quiet gap is about 60 ms, which Poisson arrivals at
/// that rate essentially never leave; at 20 a second it exceeds a one-second `max_wait`.
#[derive(Debug, Default)]
pub struct ArrivalPace {
    last: Option<Instant>,
    /// Exponentially weighted mean of the gaps between arrivals, in seconds.
    mean_gap: Option<f64>,
}

/// How many typical gaps without an arrival make the input quiet.
const QUIET_GAPS: f64 = 32.0;
/// Weight of the newest gap in the mean.
const GAP_WEIGHT: f64 = 1.0 / 16.0;
/// Never quiet sooner than this: a broker pauses for a few milliseconds now and then.
const QUIET_AT_LEAST: Duration = Duration::from_millis(20);

impl ArrivalPace {
    pub fn arrived(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let gap = now.saturating_duration_since(last).as_secs_f64();
            self.mean_gap = Some(match self.mean_gap {
                Some(mean) => mean + (gap - mean) * GAP_WEIGHT,
                None => gap,
            });
        }
        self.last = Some(now);
    }

    /// Quiet was checked at `now` and more input is known to be coming (the broker paused):
    /// look again one quiet gap later, without taking the pause as the pace.
    pub fn not_quiet_yet(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// When the input counts as quiet if nothing more arrives; `None` until a pace is known.
    /// Never later than `max_wait` after the last arrival.
    pub fn quiet_at(&self, max_wait: Duration) -> Option<Instant> {
        let quiet_after = Duration::from_secs_f64(self.mean_gap? * QUIET_GAPS)
            .clamp(QUIET_AT_LEAST, max_wait.max(QUIET_AT_LEAST));
        Some(self.last? + quiet_after)
    }
}

#[cfg(test)]
mod tests;
