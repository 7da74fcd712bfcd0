//! Delivering: one batch to Listrak, with in-process retries, token refresh and bisection,
//! until every contact has a verdict.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::driver::unpoisoned::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::FutureExt;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::panic::AssertUnwindSafe;
use tokio_util::sync::CancellationToken;

use crate::driver::clock;
use crate::driver::concurrency::{AdaptiveConcurrency, Signal};
use crate::driver::readback::Reconciler;
use crate::driver::retry::InProcessBackoff;
use crate::driver::superseded::SupersededGuard;
use crate::edges::listrak::ListrakApi;
use crate::edges::telemetry::{mask_email, Metrics, RetryClass};
use crate::stages::batch::{Batch, Contact, FieldValue, RequestBody};
use crate::stages::classify::{classify, Class, ListrakError, Outcome};
use crate::stages::model::{
    capped, AppliedKey, DeadLetterReason, Delivered, EventTime, ListId, Rejection, Verdict,
    QUOTE_LIMIT,
};

/// The smallest body size that Listrak refused with a size-404, per list, learned by
/// bisection; later batches for the list stay under it.
#[derive(Default)]
pub struct SizeCeilings {
    ceilings: Mutex<HashMap<ListId, usize>>,
    /// Asked for every update, and almost never learned: no lock until one is.
    any: AtomicBool,
}

impl SizeCeilings {
    pub fn get(&self, list: ListId) -> Option<usize> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        self.ceilings.lock().get(&list).copied()
    }

    fn learn(&self, list: ListId, max_bytes_that_passed: usize) {
        let mut ceilings = self.ceilings.lock();
        self.any.store(true, Ordering::Release);
        let ceiling = ceilings.entry(list).or_insert(usize::MAX);
        if max_bytes_that_passed < *ceiling {
            tracing::info!(
                list_id = %list,
                bytes = max_bytes_that_passed,
                "Listrak refused larger bodies for this list; later batches stay under this size"
            );
            *ceiling = max_bytes_that_passed;
        }
    }
}

/// Everything a delivery needs, shared by all batches.
pub struct Deliverer<A> {
    pub api: Arc<A>,
    pub concurrency: Arc<AdaptiveConcurrency>,
    pub guard: Arc<SupersededGuard>,
    pub ceilings: Arc<SizeCeilings>,
    pub metrics: Metrics,
    /// How long after its oldest message arrived a batch may still start a request
    /// (`batch.max_wait` + `retry.in_process`); past it, what is left goes to the retry
    /// queues. Counted from the arrival, not from the first request, so batches that waited
    /// behind a failing one do not each start a budget of their own.
    pub hold_budget: Duration,
    /// `listrak.request_timeout`: a request started within the hold budget may take this
    /// long, its token included; then the batch goes to the retry queues.
    pub request_timeout: Duration,
    pub shutdown: CancellationToken,
    /// Told what Listrak accepted and what got no answer, when read-backs are on.
    pub reconciler: Option<Arc<Reconciler>>,
}

struct Attempt<'a> {
    list: ListId,
    contacts: &'a [Contact],
    /// The last moment a request may start.
    deadline: Instant,
    /// The last moment a request may still be answered (token, slot and answer included).
    answer_deadline: Instant,
    /// Listrak's `resourceId` of each request it accepted, for the applied log.
    resource_ids: Mutex<Vec<String>>,
}

/// Some of a batch's contacts, sent as one request.
struct Group {
    contacts: Vec<usize>,
    /// The body size of the parent group when Listrak refused it with a 404 that was about
    /// its size, not its list: a body of this group that passes under it is the list's
    /// ceiling (see `SizeCeilings`).
    refused_size: Option<usize>,
    /// Set on the one contact that tells a 404 about a missing list from one about size.
    probing: Option<Probe>,
}

impl Group {
    fn of(contacts: Vec<usize>) -> Self {
        Self {
            contacts,
            refused_size: None,
            probing: None,
        }
    }
}

/// The rest of a group refused with a 404, waiting for its probe's answer.
struct Probe {
    rest: Vec<usize>,
    /// The refused group's body size.
    refused_size: usize,
}

impl Probe {
    /// The list is missing: the rest is dead-lettered with the probe. Else the 404 was about
    /// size: the rest is halved, under the size that was refused. While the probe is sent
    /// again, the rest waits on it.
    fn answered(self, mut step: Step) -> Step {
        if let Some(next) = step.next.first_mut() {
            next.probing = Some(self);
            return step;
        }
        let missing_list = step.verdicts.iter().find_map(|(_, verdict)| match verdict {
            Verdict::DeadLetter(rejection)
                if rejection.reason == DeadLetterReason::ListNotFound =>
            {
                Some(verdict.clone())
            }
            _ => None,
        });
        match missing_list {
            Some(verdict) => step
                .verdicts
                .extend(self.rest.into_iter().map(|i| (i, verdict.clone()))),
            None => step.next = halves(self.rest, Some(self.refused_size)),
        }
        step
    }
}

/// What one group's request leads to: verdicts for some of its contacts, and the groups the
/// others are sent in next.
struct Step {
    verdicts: Vec<(usize, Verdict)>,
    next: Vec<Group>,
}

impl Step {
    fn done(verdicts: Vec<(usize, Verdict)>) -> Self {
        Self {
            verdicts,
            next: Vec::new(),
        }
    }
}

/// A group in two, sent side by side; one contact stays one group.
fn halves(mut contacts: Vec<usize>, refused_size: Option<usize>) -> Vec<Group> {
    let back = contacts.split_off(contacts.len().div_ceil(2));
    [contacts, back]
        .into_iter()
        .filter(|half| !half.is_empty())
        .map(|half| Group {
            contacts: half,
            refused_size,
            probing: None,
        })
        .collect()
}

/// A batch's verdicts as its requests answer, exactly one per contact: a contact given none,
/// or a second one, is a bug, and panics; `deliver_or_retry` then sends the whole batch to
/// the retry queues rather than settle a message on a verdict nobody gave.
struct Verdicts(Vec<Option<Verdict>>);

impl Verdicts {
    fn new(contacts: usize) -> Self {
        Self(vec![None; contacts])
    }

    fn give(&mut self, contact: usize, verdict: Verdict) {
        let slot = &mut self.0[contact];
        assert!(
            slot.is_none(),
            "contact {contact} was given a second verdict"
        );
        *slot = Some(verdict);
    }

    fn into_vec(self) -> Vec<Verdict> {
        self.0
            .into_iter()
            .enumerate()
            .map(|(contact, verdict)| {
                verdict.unwrap_or_else(|| panic!("contact {contact} was given no verdict"))
            })
            .collect()
    }
}

impl<A: ListrakApi> Deliverer<A> {
    /// Sends the batch; the verdicts are in the order of `batch.contacts`. A delivery that
    /// panics (a bug) sends its messages to the retry queues instead of holding them.
    pub async fn deliver_or_retry(&self, batch: &Batch) -> Delivered {
        match AssertUnwindSafe(self.deliver_recorded(batch))
            .catch_unwind()
            .await
        {
            Ok(delivered) => delivered,
            Err(_) => {
                self.metrics
                    .delivery_panicked(batch.list_id, batch.contacts.len());
                Delivered {
                    verdicts: vec![Verdict::Retry; batch.contacts.len()],
                    resource_ids: Vec::new(),
                }
            }
        }
    }

    /// Sends the batch; the verdicts are in the order of `batch.contacts`.
    pub async fn deliver(&self, batch: &Batch) -> Vec<Verdict> {
        self.deliver_recorded(batch).await.verdicts
    }

    async fn deliver_recorded(&self, batch: &Batch) -> Delivered {
        let oldest = batch.oldest().unwrap_or_else(clock::now);
        let deadline = oldest
            .checked_add(self.hold_budget)
            .unwrap_or_else(|| clock::now() + self.hold_budget);
        let attempt = Attempt {
            list: batch.list_id,
            contacts: &batch.contacts,
            deadline,
            answer_deadline: deadline + self.request_timeout,
            resource_ids: Mutex::new(Vec::new()),
        };
        // Groups of the batch's contacts, each one request (and its retries); an answer may
        // set contacts aside and send others as new groups, side by side.
        let mut verdicts = Verdicts::new(batch.contacts.len());
        let mut sending = FuturesUnordered::new();
        sending.push(self.attempt(&attempt, Group::of((0..batch.contacts.len()).collect())));
        while let Some(step) = sending.next().await {
            for (contact, verdict) in step.verdicts {
                verdicts.give(contact, verdict);
            }
            for group in step.next {
                sending.push(self.attempt(&attempt, group));
            }
        }
        let resource_ids = std::mem::take(&mut *attempt.resource_ids.lock());
        Delivered {
            verdicts: verdicts.into_vec(),
            resource_ids,
        }
    }

    /// Sends one group as one request, retrying it while the failure is systemic, until its
    /// contacts have their verdicts or Listrak's answer says which groups to send instead.
    async fn attempt(&self, attempt: &Attempt<'_>, mut group: Group) -> Step {
        let probing = group.probing.take();
        let step = self.request(attempt, group).await;
        match probing {
            Some(probe) => probe.answered(step),
            None => step,
        }
    }

    async fn request(&self, attempt: &Attempt<'_>, group: Group) -> Step {
        let Group {
            contacts: mut indexes,
            refused_size,
            probing: _,
        } = group;
        let mut verdicts = Vec::with_capacity(indexes.len());
        let mut backoff = InProcessBackoff::until(attempt.deadline);
        loop {
            // Filtered again on every attempt: while this batch waited, a newer value may
            // have been applied for one of its contacts.
            let (body, sent) = self.encode_current(attempt, &mut indexes, &mut verdicts);
            if sent.is_empty() {
                return Step::done(verdicts);
            }
            let body_len = body.len();
            if clock::now() >= attempt.deadline {
                tracing::warn!(
                    list_id = %attempt.list,
                    contacts = sent.len(),
                    "the batch's hold budget was spent before it could be sent; moving it to \
                     the retry queues"
                );
                verdicts.extend(sent.into_iter().map(|i| (i, Verdict::Retry)));
                return Step::done(verdicts);
            }
            // Waiting for a slot spends the same budget: in an outage the limit is 1. (At
            // shutdown the batch still waits: what is batched is sent within the grace.)
            let acquired =
                tokio::time::timeout_at(attempt.deadline.into(), self.concurrency.acquire()).await;
            let Ok(permit) = acquired else {
                tracing::warn!(
                    list_id = %attempt.list,
                    contacts = sent.len(),
                    "the batch's hold budget ran out before a request slot was free; moving it \
                     to the retry queues"
                );
                verdicts.extend(sent.into_iter().map(|i| (i, Verdict::Retry)));
                return Step::done(verdicts);
            };
            // The token and the answer spend the budget too: a token endpoint or an
            // answer that hangs cannot hold the batch past it.
            // Until an answer comes, Listrak may apply the request whenever: a request that
            // times out, loses its connection or is cancelled with its session leaves its
            // keys at risk.
            let mut unanswered = Unanswered {
                reconciler: self.reconciler.as_deref(),
                attempt,
                sent: &sent,
            };
            let outcome = tokio::time::timeout_at(
                attempt.answer_deadline.into(),
                self.api.post_contacts(attempt.list, body, sent.len()),
            )
            .await
            .unwrap_or(Outcome::Timeout);
            if !matches!(outcome, Outcome::Timeout | Outcome::Connection(_)) {
                unanswered.reconciler = None;
            }
            drop(unanswered);
            let class = classify(&outcome, sent.len());
            permit.record(match class {
                Class::Ok => Signal::Healthy,
                Class::Systemic { .. }
                    if matches!(outcome, Outcome::Answered { status: 429, .. }) =>
                {
                    Signal::Throttled
                }
                Class::Systemic { .. } => Signal::Overloaded,
                _ => Signal::Neutral,
            });
            match class {
                Class::Ok => {
                    if let Outcome::Answered {
                        resource_id: Some(id),
                        ..
                    } = &outcome
                    {
                        attempt.resource_ids.lock().push(id.clone());
                    }
                    self.applied(attempt, &sent);
                    if let Some(refused) = refused_size {
                        if body_len < refused {
                            self.ceilings.learn(attempt.list, body_len);
                        }
                    }
                    verdicts.extend(sent.into_iter().map(|i| (i, Verdict::Applied)));
                    return Step::done(verdicts);
                }
                Class::Auth | Class::Systemic { .. } => {
                    // Listrak's wait, if it named one, never beyond the hold budget.
                    let retry_after = match class {
                        Class::Systemic { retry_after } => {
                            retry_after.map(|wait| wait.min(self.hold_budget))
                        }
                        _ => None,
                    };
                    self.metrics.retried(if class == Class::Auth {
                        RetryClass::Auth
                    } else {
                        RetryClass::Systemic
                    });
                    let Some(delay) = backoff.next_delay(retry_after) else {
                        tracing::warn!(
                            list_id = %attempt.list,
                            contacts = sent.len(),
                            status = %outcome.status_label(),
                            "Listrak kept failing; moving the batch to the retry queues"
                        );
                        verdicts.extend(sent.into_iter().map(|i| (i, Verdict::Retry)));
                        return Step::done(verdicts);
                    };
                    tracing::debug!(
                        list_id = %attempt.list,
                        status = %outcome.status_label(),
                        ?delay,
                        "retrying batch"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = self.shutdown.cancelled() => {
                            verdicts.extend(sent.into_iter().map(|i| (i, Verdict::Abandoned)));
                            return Step::done(verdicts);
                        }
                    }
                }
                Class::Ambiguous => {
                    self.metrics.retried(RetryClass::Ambiguous);
                    let status = match &outcome {
                        Outcome::Answered { status, .. } => *status,
                        _ => 0,
                    };
                    let error = listrak_error(&outcome);
                    // A rejection that names one contact of this request: set it aside
                    // and resend the rest, instead of halving blindly.
                    if status == 400 {
                        if let Some(guilty) = named_contact(attempt, &sent, &error) {
                            tracing::info!(
                                list_id = %attempt.list,
                                email = %mask_email(&attempt.contacts[guilty].email),
                                error = %capped(&error.error, QUOTE_LIMIT),
                                "Listrak refused a contact it named; dead-lettering its \
                                 messages, resending the rest"
                            );
                            verdicts.push((guilty, rejection(attempt.list, &outcome)));
                            indexes = sent.into_iter().filter(|&i| i != guilty).collect();
                            continue;
                        }
                    }
                    if status == 404 {
                        // One contact alone tells a missing list from a body too large.
                        let mut probe = sent;
                        let rest = probe.split_off(1);
                        return Step {
                            verdicts,
                            next: vec![Group {
                                contacts: probe,
                                refused_size: None,
                                probing: Some(Probe {
                                    rest,
                                    refused_size: body_len,
                                }),
                            }],
                        };
                    }
                    return Step {
                        verdicts,
                        next: halves(sent, None),
                    };
                }
                Class::Permanent => {
                    let verdict = rejection(attempt.list, &outcome);
                    if let [only] = sent.as_slice() {
                        tracing::info!(
                            list_id = %attempt.list,
                            email = %mask_email(&attempt.contacts[*only].email),
                            status = %outcome.status_label(),
                            error = %capped(&listrak_error(&outcome).error, QUOTE_LIMIT),
                            "Listrak refused a contact; dead-lettering its messages"
                        );
                    } else {
                        tracing::info!(
                            list_id = %attempt.list,
                            contacts = sent.len(),
                            status = %outcome.status_label(),
                            "Listrak refused the request; dead-lettering its messages"
                        );
                    }
                    verdicts.extend(sent.into_iter().map(|i| (i, verdict.clone())));
                    return Step::done(verdicts);
                }
            }
        }
    }

    /// Drops fields (and whole contacts) that a newer applied value supersedes, then encodes
    /// what is left. Returns the body and the indexes it carries.
    fn encode_current(
        &self,
        attempt: &Attempt<'_>,
        indexes: &mut Vec<usize>,
        verdicts: &mut Vec<(usize, Verdict)>,
    ) -> (Bytes, Vec<usize>) {
        let mut body = RequestBody::with_capacity(64 + indexes.len() * 128);
        let mut sent = Vec::with_capacity(indexes.len());
        let mut current: Vec<&FieldValue> = Vec::new();
        for &index in indexes.iter() {
            let contact = &attempt.contacts[index];
            current.clear();
            current.extend(contact.fields.iter().filter(|f| {
                !self
                    .guard
                    .is_superseded(attempt.list, &contact.email, f.field, f.timestamp)
            }));
            if current.is_empty() {
                verdicts.push((index, Verdict::Superseded));
                continue;
            }
            body.push(&contact.email, current.iter().copied());
            sent.push(index);
        }
        indexes.clone_from(&sent);
        (Bytes::from(body.finish()), sent)
    }

    fn applied(&self, attempt: &Attempt<'_>, sent: &[usize]) {
        let now = EventTime::now();
        self.metrics.request_accepted(now.0 as f64 / 1e6);
        for &index in sent {
            let contact = &attempt.contacts[index];
            for field in &contact.fields {
                self.guard
                    .record(attempt.list, &contact.email, field.field, field.timestamp);
                if let Some(reconciler) = &self.reconciler {
                    let key = AppliedKey {
                        list: attempt.list,
                        email: &contact.email,
                        field: field.field,
                    };
                    reconciler.applied_here(key, &field.value, field.timestamp, now);
                }
                let lag =
                    Duration::from_micros(now.0.saturating_sub(field.timestamp.0).max(0) as u64);
                self.metrics.event_applied(lag);
            }
        }
    }
}

/// A request sent and not yet answered; dropped unanswered (no answer in time, a lost
/// connection, a cancelled task), it tells the reconciler that its keys are at risk.
struct Unanswered<'a> {
    reconciler: Option<&'a Reconciler>,
    attempt: &'a Attempt<'a>,
    sent: &'a [usize],
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let Some(reconciler) = self.reconciler else {
            return;
        };
        let now = EventTime::now();
        for &index in self.sent {
            let contact = &self.attempt.contacts[index];
            for field in &contact.fields {
                reconciler.uncertain(self.attempt.list, &contact.email, field.field, now);
            }
        }
    }
}

fn listrak_error(outcome: &Outcome) -> ListrakError {
    match outcome {
        Outcome::Answered {
            error: Some(error), ..
        } => error.clone(),
        _ => ListrakError::default(),
    }
}

/// The index of the one contact whose email Listrak's message names, if exactly one does.
fn named_contact(attempt: &Attempt<'_>, sent: &[usize], error: &ListrakError) -> Option<usize> {
    let message = error.message.to_lowercase();
    if message.is_empty() {
        return None;
    }
    let mut named = sent
        .iter()
        .copied()
        .filter(|&i| message.contains(attempt.contacts[i].email.as_str()));
    let first = named.next()?;
    named.next().is_none().then_some(first)
}

fn rejection(list: ListId, outcome: &Outcome) -> Verdict {
    let error = listrak_error(outcome);
    let status = match outcome {
        Outcome::Answered { status, .. } => Some(*status),
        _ => None,
    };
    Verdict::DeadLetter(Rejection {
        reason: if status == Some(404) {
            DeadLetterReason::ListNotFound
        } else {
            DeadLetterReason::Rejected
        },
        status,
        error: Some(error.error).filter(|code| !code.is_empty()),
        message: Some(error.message).filter(|message| !message.is_empty()),
        list_id: Some(list),
    })
}

#[cfg(test)]
mod tests;
