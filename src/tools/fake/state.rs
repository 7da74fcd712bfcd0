//! What the fake remembers (tokens, contacts, recorded requests) and how one SegmentationField
//! request is decided.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde::Serialize;

use super::answer::{self, Refusal};
use super::catalogue::Catalogue;
use super::faults::{FaultState, Faults, Injected};
use super::payload::{self, Payload};

/// list id → email (lower-cased) → field id → value.
pub type Contacts = BTreeMap<u32, BTreeMap<String, BTreeMap<u32, String>>>;

/// One SegmentationField request as the fake saw it, whatever it answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedRequest {
    /// `None` when the path segment is not a positive int32.
    pub list_id: Option<u32>,
    /// The HTTP status answered.
    pub status: u16,
    /// Listrak's error code for refusals; `None` for 201.
    pub error: Option<&'static str>,
    /// How many contacts the body holds, when it is a JSON array.
    pub contacts: Option<usize>,
    pub body_bytes: usize,
    /// Every `emailAddress` string in the body, as sent, in order.
    pub emails: Vec<String>,
    /// When the request arrived, counted from the fake's start.
    #[serde(rename = "elapsed_ms", serialize_with = "as_millis")]
    pub elapsed: Duration,
    /// Which token authorised it: 1 for the first token issued, 2 for the next…; `None` when
    /// no token this fake issued was presented (expired tokens still show their generation).
    pub token_generation: Option<usize>,
}

fn as_millis<S: serde::Serializer>(elapsed: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(elapsed.as_secs_f64() * 1000.0)
}

/// A SegmentationField request, read but not yet decided.
#[derive(Debug)]
pub struct Incoming<'a> {
    pub authorization: Option<&'a str>,
    pub list_segment: &'a str,
    pub content_type: Option<&'a str>,
    /// `None` when the body could not be read whole (over the fake's own hard cap).
    pub payload: Option<Payload>,
    pub body_bytes: usize,
    pub arrived: Instant,
}

/// How to answer a SegmentationField request.
#[derive(Debug)]
pub struct Decision {
    pub answer: Result<String, Refusal>,
    /// How long to wait before answering (the latency fault in force when it arrived).
    pub latency: Duration,
}

#[derive(Debug)]
struct IssuedToken {
    generation: usize,
    issued: Instant,
    /// Ended early by [`State::expire_tokens`], whatever its lifetime says.
    expired: bool,
}

/// Everything behind the fake's one lock; each method is quick, so the lock is held briefly.
#[derive(Debug)]
pub struct State {
    started: Instant,
    faults: FaultState,
    tokens: HashMap<String, IssuedToken>,
    contacts: Contacts,
    requests: Vec<RecordedRequest>,
    /// Lists and profile fields; while empty, any list and field id is accepted.
    catalogue: Catalogue,
    /// Imports accepted but not completed yet (`import_delay_*`), in the order they arrived.
    imports: Vec<PendingImport>,
    /// Requests of the contact read routes answered with contacts (Get a Contact, Get all
    /// Contacts).
    contact_reads: usize,
}

/// An accepted update whose import has not completed.
#[derive(Debug)]
struct PendingImport {
    completes: Instant,
    list_id: u32,
    contacts: Vec<payload::ContactValues>,
}

impl State {
    pub fn new(faults: Faults, started: Instant) -> Self {
        Self {
            started,
            faults: FaultState::new(faults, started),
            tokens: HashMap::new(),
            contacts: Contacts::new(),
            requests: Vec::new(),
            catalogue: Catalogue::default(),
            imports: Vec::new(),
            contact_reads: 0,
        }
    }

    /// Completes every import due by `now`, in the order they complete (not the order they
    /// were accepted).
    pub fn complete_imports(&mut self, now: Instant) {
        if self.imports.is_empty() {
            return;
        }
        let (mut due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.imports)
            .into_iter()
            .partition(|import| import.completes <= now);
        self.imports = waiting;
        due.sort_by_key(|import| import.completes);
        for import in due {
            self.apply(import.list_id, import.contacts);
        }
    }

    /// A contact read route was asked.
    pub fn contact_read(&mut self) {
        self.contact_reads += 1;
    }

    pub fn contact_reads(&self) -> usize {
        self.contact_reads
    }

    /// Imports accepted and not completed yet.
    pub fn imports_pending(&self) -> usize {
        self.imports.len()
    }

    /// Sets one field of one contact directly, as a person in Listrak's UI would.
    pub fn edit_field(&mut self, list_id: u32, email: &str, field_id: u32, value: &str) {
        self.contacts
            .entry(list_id)
            .or_default()
            .entry(email.to_lowercase())
            .or_default()
            .insert(field_id, value.to_owned());
    }

    pub fn catalogue(&self) -> &Catalogue {
        &self.catalogue
    }

    pub fn catalogue_mut(&mut self) -> &mut Catalogue {
        &mut self.catalogue
    }

    /// Whether `authorization` carries a token this fake issued, not expired at `now`.
    pub fn token_valid(&self, authorization: Option<&str>, now: Instant) -> bool {
        authorization
            .and_then(payload::bearer_token)
            .and_then(|token| self.tokens.get(token))
            .is_some_and(|token| {
                !token.expired
                    && now.duration_since(token.issued) < self.faults.faults().token_lifetime
            })
    }

    pub fn faults(&self, now: Instant) -> Faults {
        self.faults.current(now)
    }

    /// What the catalogue faults do to a catalogue request arriving at `now`: how long to
    /// wait before answering, and the refusal to answer with, if any. `creation` for a
    /// request that creates a field or a group.
    pub fn catalogue_fault(
        &self,
        now: Instant,
        creation: bool,
        draw: impl FnOnce(f64) -> bool,
    ) -> (Duration, Option<Refusal>) {
        let faults = self.faults.faults();
        let refusal = match self.faults.inject_catalogue(now, draw) {
            Some(injected) => Some(injected_refusal(injected, faults.retry_after)),
            None if creation && faults.refuse_creations => Some(Refusal::new(
                StatusCode::BAD_REQUEST,
                answer::INVALID_PARAMETER,
                "An invalid value was supplied for segmentationFieldName: the name is not \
                 accepted (injected refusal).",
            )),
            None => None,
        };
        (faults.catalogue_latency, refusal)
    }

    pub fn set_faults(&mut self, faults: Faults, now: Instant) {
        self.faults.set(faults, now);
    }

    /// Remembers a new token and returns how long it lives.
    pub fn issue_token(&mut self, token: String, now: Instant) -> Duration {
        let generation = self.tokens.len() + 1;
        self.tokens.insert(
            token,
            IssuedToken {
                generation,
                issued: now,
                expired: false,
            },
        );
        self.faults.faults().token_lifetime
    }

    pub fn tokens_issued(&self) -> usize {
        self.tokens.len()
    }

    /// Ends every token issued so far, as a credential rotation or an early expiry would.
    pub fn expire_tokens(&mut self) {
        for token in self.tokens.values_mut() {
            token.expired = true;
        }
    }

    pub fn contacts(&self) -> &Contacts {
        &self.contacts
    }

    pub fn requests(&self) -> &[RecordedRequest] {
        &self.requests
    }

    /// Forgets contacts and recorded requests; tokens and faults stay, so clients carry on.
    pub fn reset(&mut self) {
        self.contacts.clear();
        self.requests.clear();
        self.imports.clear();
    }

    /// Decides, applies and records one request, in the order Listrak's checks are listed in
    /// the contract: token, outage, throttle, random error, list id, content type, unknown
    /// list, body size, body schema, refused emails. `draw(p)` is true with probability `p`.
    pub fn decide(&mut self, incoming: Incoming<'_>, draw: impl FnOnce(f64) -> bool) -> Decision {
        let now = incoming.arrived;
        let token = incoming
            .authorization
            .and_then(payload::bearer_token)
            .and_then(|token| self.tokens.get(token));
        let token_generation = token.map(|token| token.generation);
        let token_valid = self.token_valid(incoming.authorization, now);
        let list_id = payload::list_id(incoming.list_segment);
        let refusal = self.refusal(&incoming, token_valid, list_id, draw);
        let (contacts, emails, checked) = match incoming.payload {
            Some(payload) => (payload.contacts, payload.emails, Some(payload.checked)),
            None => (None, Vec::new(), None),
        };
        let answer = match refusal {
            Some(refusal) => Err(refusal),
            None => {
                // No refusal means the list id and the body were both found valid.
                let accepted = checked.and_then(Result::ok).unwrap_or_default();
                let faults = self.faults.faults();
                let (shortest, longest) = (faults.import_delay_min, faults.import_delay_max);
                if longest.is_zero() {
                    self.apply(list_id.unwrap_or_default(), accepted);
                } else {
                    let spread = longest.saturating_sub(shortest).as_secs_f64();
                    let delay = shortest + Duration::from_secs_f64(rand::random::<f64>() * spread);
                    self.imports.push(PendingImport {
                        completes: now + delay,
                        list_id: list_id.unwrap_or_default(),
                        contacts: accepted,
                    });
                }
                Ok(answer::resource_id())
            }
        };

        self.requests.push(RecordedRequest {
            list_id,
            status: match &answer {
                Ok(_) => StatusCode::CREATED.as_u16(),
                Err(refusal) => refusal.status.as_u16(),
            },
            error: answer.as_ref().err().map(|refusal| refusal.error),
            contacts,
            body_bytes: incoming.body_bytes,
            emails,
            elapsed: now.saturating_duration_since(self.started),
            token_generation,
        });
        let faults = self.faults.faults();
        let jitter = faults.latency_jitter.as_secs_f64();
        let extra = if jitter > 0.0 {
            Duration::from_secs_f64(rand::random::<f64>() * jitter)
        } else {
            Duration::ZERO
        };
        Decision {
            answer,
            latency: faults.latency + extra,
        }
    }

    fn refusal(
        &mut self,
        incoming: &Incoming<'_>,
        token_valid: bool,
        list_id: Option<u32>,
        draw: impl FnOnce(f64) -> bool,
    ) -> Option<Refusal> {
        if !token_valid {
            return Some(Refusal::unauthorized());
        }
        if let Some(injected) = self.faults.inject(incoming.arrived, draw) {
            return Some(injected_refusal(injected, self.faults.faults().retry_after));
        }
        let Some(list_id) = list_id else {
            return Some(Refusal::invalid(
                "listId",
                format!(
                    "{:?} is not a positive 32-bit integer",
                    incoming.list_segment
                ),
            ));
        };
        if !payload::content_type_is(incoming.content_type, "application/json") {
            return Some(Refusal::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                answer::UNSUPPORTED_CONTENT_TYPE,
                "Please use a Content-Type of application/json.",
            ));
        }
        let faults = self.faults.faults();
        if faults.failing_lists.contains(&list_id) {
            return Some(Refusal::new(
                StatusCode::SERVICE_UNAVAILABLE,
                answer::UNHANDLED_EXCEPTION,
                "The service is unavailable for this list (injected failure).",
            ));
        }
        if faults.unknown_lists.contains(&list_id)
            || (!self.catalogue.is_empty() && !self.catalogue.has_list(list_id))
        {
            return Some(Refusal::list_not_found());
        }
        let over_limit = faults
            .max_body_bytes
            .is_some_and(|limit| incoming.body_bytes > limit);
        let checked = match &incoming.payload {
            Some(payload) if !over_limit => &payload.checked,
            _ => return Some(Refusal::list_not_found()),
        };
        let contacts = match checked {
            Ok(contacts) => contacts,
            Err(refusal) => return Some(refusal.clone()),
        };
        if let Some(refusal) = self.unknown_field(list_id, contacts) {
            return Some(refusal);
        }
        contacts
            .iter()
            .enumerate()
            .find(|(_, contact)| self.faults.rejects_email(&contact.email))
            .map(|(index, contact)| {
                Refusal::invalid(
                    &format!("contactSegmentationFieldValues[{index}].emailAddress"),
                    format!("{} is not accepted for this list", contact.email),
                )
            })
    }

    /// A field id the list does not have, when the fake holds a catalogue: Listrak refuses
    /// the whole request with 400, naming the place.
    fn unknown_field(&self, list_id: u32, contacts: &[payload::ContactValues]) -> Option<Refusal> {
        if self.catalogue.is_empty() {
            return None;
        }
        contacts.iter().enumerate().find_map(|(index, contact)| {
            let (position, (field, _)) = contact
                .fields
                .iter()
                .enumerate()
                .find(|(_, (field, _))| !self.catalogue.has_field(list_id, *field))?;
            Some(Refusal::invalid(
                &format!(
                    "contactSegmentationFieldValues[{index}].segmentationFieldValues[{position}]\
                     .segmentationFieldId"
                ),
                format!("{field} is not a profile field of list {list_id}"),
            ))
        })
    }

    /// Later requests overwrite earlier ones; emails are case-folded because Listrak keeps one
    /// contact per address whatever its case.
    fn apply(&mut self, list_id: u32, contacts: Vec<payload::ContactValues>) {
        let list = self.contacts.entry(list_id).or_default();
        for contact in contacts {
            let fields = list.entry(contact.email.to_lowercase()).or_default();
            fields.extend(contact.fields);
        }
    }
}

/// The answer an injected fault gives.
fn injected_refusal(injected: Injected, retry_after: Option<Duration>) -> Refusal {
    let (status, error, message) = match injected {
        Injected::Outage => (
            StatusCode::SERVICE_UNAVAILABLE,
            answer::UNHANDLED_EXCEPTION,
            "The service is unavailable (injected outage).",
        ),
        Injected::RandomError => (
            StatusCode::SERVICE_UNAVAILABLE,
            answer::UNHANDLED_EXCEPTION,
            "The service is unavailable (injected error).",
        ),
        Injected::Throttled => (
            StatusCode::TOO_MANY_REQUESTS,
            answer::TOO_MANY_REQUESTS,
            "Too many requests; slow down (injected throttle).",
        ),
    };
    Refusal {
        retry_after,
        ..Refusal::new(status, error, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "token-1";

    fn state(faults: Faults) -> (State, Instant) {
        let start = Instant::now();
        let mut state = State::new(faults, start);
        state.issue_token(TOKEN.into(), start);
        (state, start)
    }

    fn request<'a>(list: &'a str, body: &str, at: Instant) -> Incoming<'a> {
        Incoming {
            authorization: Some("Bearer token-1"),
            list_segment: list,
            content_type: Some("application/json"),
            payload: Some(Payload::read(body.as_bytes())),
            body_bytes: body.len(),
            arrived: at,
        }
    }

    fn body(email: &str, field: u32, value: &str) -> String {
        format!(
            "[{{\"emailAddress\":\"{email}\",\"segmentationFieldValues\":\
             [{{\"segmentationFieldId\":{field},\"value\":\"{value}\"}}]}}]"
        )
    }

    #[test]
    fn accepted_requests_apply_in_order_and_fold_email_case() {
        let (mut state, start) = state(Faults::default());
        let first = state.decide(request("7", &body("A@example.com", 1, "on"), start), |_| {
            false
        });
        assert!(first.answer.is_ok());
        state.decide(
            request("7", &body("a@example.com", 1, "off"), start),
            |_| false,
        );
        assert_eq!(state.contacts()[&7]["a@example.com"][&1], "off");
        assert_eq!(state.requests()[0].emails, ["A@example.com"]);
        assert_eq!(state.requests()[1].token_generation, Some(1));
    }

    #[test]
    fn an_unknown_token_is_checked_before_any_injected_fault() {
        let (mut state, start) = state(Faults {
            outage_for: Some(Duration::from_secs(60)),
            ..Faults::default()
        });
        let mut incoming = request("7", &body("a@example.com", 1, "on"), start);
        incoming.authorization = Some("Bearer forged");
        let refusal = state.decide(incoming, |_| true).answer.unwrap_err();
        assert_eq!(refusal.status, StatusCode::UNAUTHORIZED);
        assert_eq!(state.requests()[0].token_generation, None);
    }

    #[test]
    fn an_expired_token_is_refused_but_still_recorded_with_its_generation() {
        let (mut state, start) = state(Faults {
            token_lifetime: Duration::from_secs(1),
            ..Faults::default()
        });
        let later = start + Duration::from_secs(1);
        let refusal = state
            .decide(request("7", &body("a@example.com", 1, "on"), later), |_| {
                false
            })
            .answer
            .unwrap_err();
        assert_eq!(refusal.error, answer::UNAUTHORIZED);
        assert_eq!(state.requests()[0].token_generation, Some(1));
    }

    #[test]
    fn a_bad_list_id_is_refused_before_the_content_type_is_looked_at() {
        let (mut state, start) = state(Faults::default());
        let mut incoming = request("0", "[]", start);
        incoming.content_type = Some("text/plain");
        let refusal = state.decide(incoming, |_| false).answer.unwrap_err();
        assert_eq!(refusal.error, answer::INVALID_PARAMETER);
        assert!(refusal.message.contains("listId"), "{}", refusal.message);
    }

    #[test]
    fn an_unknown_list_is_refused_before_the_body_is_judged() {
        let (mut state, start) = state(Faults {
            unknown_lists: [9].into(),
            ..Faults::default()
        });
        let refusal = state
            .decide(request("9", "not json", start), |_| false)
            .answer
            .unwrap_err();
        assert_eq!(refusal, Refusal::list_not_found());
    }

    #[test]
    fn a_refused_email_refuses_the_whole_request_and_applies_nothing() {
        let (mut state, start) = state(Faults {
            reject_emails: ["bad@example.com".into()].into(),
            ..Faults::default()
        });
        let body = r#"[{"emailAddress":"good@example.com",
                        "segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"}]},
                       {"emailAddress":"BAD@example.com",
                        "segmentationFieldValues":[{"segmentationFieldId":1,"value":"on"}]}]"#;
        let refusal = state
            .decide(request("7", body, start), |_| false)
            .answer
            .unwrap_err();
        assert_eq!(refusal.status, StatusCode::BAD_REQUEST);
        assert!(
            refusal.message.contains("[1].emailAddress"),
            "{}",
            refusal.message
        );
        assert!(
            refusal.message.contains("BAD@example.com"),
            "{}",
            refusal.message
        );
        assert!(state.contacts().is_empty());
    }

    #[test]
    fn injected_refusals_carry_retry_after_when_asked_to() {
        let (mut state, start) = state(Faults {
            error_rate: 1.0,
            retry_after: Some(Duration::from_secs(2)),
            ..Faults::default()
        });
        let refusal = state
            .decide(request("7", &body("a@example.com", 1, "on"), start), |_| {
                true
            })
            .answer
            .unwrap_err();
        assert_eq!(refusal.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refusal.retry_after, Some(Duration::from_secs(2)));
    }

    #[test]
    fn reset_forgets_contacts_and_requests_but_not_tokens() {
        let (mut state, start) = state(Faults::default());
        state.decide(request("7", &body("a@example.com", 1, "on"), start), |_| {
            false
        });
        state.reset();
        assert!(state.contacts().is_empty());
        assert!(state.requests().is_empty());
        assert!(state
            .decide(request("7", &body("a@example.com", 1, "on"), start), |_| {
                false
            })
            .answer
            .is_ok());
    }
}
