//! The fake's HTTP surface: Listrak's token and SegmentationField endpoints, and `/_fake/*`
//! controls.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::answer::{self, Refusal};
use super::catalogue::{FieldResource, DATA_TYPES};
use super::faults::Faults;
use super::payload::{self, Payload};
use super::state::{Incoming, RecordedRequest};
use super::Shared;

/// Bodies are read whole up to this size; anything larger is answered like an over-size
/// payload (404) without being kept in memory.
const BODY_HARD_CAP: usize = 64 * 1024 * 1024;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/OAuth2/Token", post(issue_token))
        .route(
            "/email/v1/List/{listId}/Contact/SegmentationField",
            post(segmentation_field),
        )
        .route("/email/v1/List", get(list_collection))
        .route("/email/v1/List/{listId}/Contact", get(contact_collection))
        .route(
            "/email/v1/List/{listId}/Contact/{contactIdentifier}",
            get(one_contact),
        )
        .route(
            "/email/v1/List/{listId}/SegmentationFieldGroup",
            get(group_collection).post(create_group),
        )
        .route(
            "/email/v1/List/{listId}/SegmentationFieldGroup/{groupId}/SegmentationField",
            get(field_collection).post(create_field),
        )
        .route("/_fake/catalogue", get(catalogue))
        .route("/_fake/contacts", get(contacts))
        .route(
            "/_fake/contacts/{listId}/{email}/{fieldId}",
            axum::routing::put(edit_field),
        )
        .route("/_fake/requests", get(requests))
        .route(
            "/_fake/faults",
            get(faults).put(replace_faults).patch(amend_faults),
        )
        .route("/_fake/reset", post(reset))
        .route("/_fake/expire-tokens", post(expire_tokens))
        .fallback(unknown_route)
        .method_not_allowed_fallback(unsupported_method)
        .with_state(shared)
}

#[derive(Serialize)]
struct TokenIssued {
    access_token: String,
    token_type: &'static str,
    expires_in: u64,
}

async fn issue_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = "application/x-www-form-urlencoded";
    if !payload::content_type_is(header(&headers, CONTENT_TYPE), form) {
        return refused(Refusal::new(
            StatusCode::BAD_REQUEST,
            answer::UNSUPPORTED_CONTENT_TYPE,
            format!("Please use a Content-Type of {form}."),
        ));
    }
    let Some(pairs) = payload::form_pairs(&body) else {
        return refused(Refusal::new(
            StatusCode::BAD_REQUEST,
            answer::MALFORMED_REQUEST_BODY,
            "The form body is not valid UTF-8 URL encoding.",
        ));
    };
    let field = |name: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    };
    match field("grant_type") {
        Some("client_credentials") => {}
        Some(other) => {
            return refused(Refusal::invalid(
                "grant_type",
                format!("{other:?} is not supported; use client_credentials"),
            ))
        }
        None => return refused(Refusal::invalid("grant_type", "the parameter is required")),
    }
    let (Some(client_id), Some(client_secret)) = (field("client_id"), field("client_secret"))
    else {
        return refused(Refusal::invalid(
            "client_id, client_secret",
            "both parameters are required",
        ));
    };
    if client_id != shared.client_id || client_secret != shared.client_secret {
        tracing::debug!("token refused: wrong client credentials");
        return refused(Refusal::new(
            StatusCode::UNAUTHORIZED,
            answer::INVALID_CREDENTIALS,
            "Invalid client credentials.",
        ));
    }
    let token = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    let lifetime = shared.lock().issue_token(token.clone(), Instant::now());
    tracing::debug!("token issued");
    json(
        StatusCode::OK,
        &TokenIssued {
            access_token: token,
            token_type: "Bearer",
            expires_in: answer::retry_after_seconds(lifetime),
        },
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResourceCreated {
    status: u16,
    resource_id: String,
}

async fn segmentation_field(
    State(shared): State<Arc<Shared>>,
    list: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A segment that is not even text still gets recorded and answered as a bad listId.
    let list = list.map(|Path(list)| list).unwrap_or_default();
    let body = axum::body::to_bytes(body, BODY_HARD_CAP).await.ok();
    let body_bytes = match &body {
        Some(body) => body.len(),
        None => header(&headers, CONTENT_LENGTH)
            .and_then(|length| length.parse().ok())
            .unwrap_or(BODY_HARD_CAP + 1),
    };
    // Parsed before the lock is taken, so that concurrent requests only queue for bookkeeping.
    let payload = body.as_deref().map(Payload::read);
    let incoming = Incoming {
        authorization: header(&headers, AUTHORIZATION),
        list_segment: &list,
        content_type: header(&headers, CONTENT_TYPE),
        payload,
        body_bytes,
        arrived: Instant::now(),
    };
    let decision = shared
        .lock()
        .decide(incoming, |share| rand::rng().random_bool(share));
    if !decision.latency.is_zero() {
        tokio::time::sleep(decision.latency).await;
    }
    match decision.answer {
        Ok(resource_id) => {
            tracing::debug!(list = %list, status = 201, "SegmentationField accepted");
            json(
                StatusCode::CREATED,
                &ResourceCreated {
                    status: StatusCode::CREATED.as_u16(),
                    resource_id,
                },
            )
        }
        Err(refusal) => {
            tracing::debug!(
                list = %list,
                status = refusal.status.as_u16(),
                error = refusal.error,
                "SegmentationField refused"
            );
            refused(refusal)
        }
    }
}

/// `{"status":200,"data":[...]}`, Listrak's wrapping of every collection.
#[derive(Serialize)]
struct Collection<T> {
    status: u16,
    data: Vec<T>,
}

fn collection<T: Serialize>(data: Vec<T>) -> Response {
    json(StatusCode::OK, &Collection { status: 200, data })
}

fn created(id: u32) -> Response {
    json(
        StatusCode::CREATED,
        &ResourceCreated {
            status: StatusCode::CREATED.as_u16(),
            resource_id: id.to_string(),
        },
    )
}

/// The path's ids, each a positive int32 (Listrak routes nothing else), named as the spec
/// names them.
fn path_ids(segments: &[(&str, &str)]) -> Result<Vec<u32>, Refusal> {
    segments
        .iter()
        .map(|(name, segment)| {
            payload::list_id(segment).ok_or_else(|| {
                Refusal::invalid(
                    name,
                    format!("{segment:?} is not a positive 32-bit integer"),
                )
            })
        })
        .collect()
}

fn group_not_found() -> Refusal {
    Refusal::new(
        StatusCode::NOT_FOUND,
        answer::UNABLE_TO_LOCATE_RESOURCE,
        "Unable to locate a resource associated with the listId and segmentationFieldGroupId \
         supplied.",
    )
}

/// The catalogue faults in force: waits their latency, then answers their refusal, if any.
async fn catalogue_fault(shared: &Shared, creation: bool) -> Result<(), Refusal> {
    let (latency, refusal) = shared
        .lock()
        .catalogue_fault(Instant::now(), creation, |share| {
            rand::rng().random_bool(share)
        });
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    refusal.map_or(Ok(()), Err)
}

/// Checks shared by every catalogue request: the token, then the ids in the path.
fn admitted(
    shared: &Shared,
    headers: &HeaderMap,
    segments: &[(&str, &str)],
) -> Result<Vec<u32>, Refusal> {
    if !shared
        .lock()
        .token_valid(header(headers, AUTHORIZATION), Instant::now())
    {
        return Err(Refusal::unauthorized());
    }
    path_ids(segments)
}

/// A creation body: declared JSON, an object, with the spec's required properties.
fn creation_body(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<serde_json::Map<String, Value>, Refusal> {
    if !payload::content_type_is(header(headers, CONTENT_TYPE), "application/json") {
        return Err(Refusal::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            answer::UNSUPPORTED_CONTENT_TYPE,
            "Please use a Content-Type of application/json.",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(other) => Err(Refusal::invalid(
            "body",
            format!(
                "expected an object, found {}",
                crate::stages::decode::kind_of(&other)
            ),
        )),
        Err(err) => Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            answer::MALFORMED_REQUEST_BODY,
            format!("Invalid JSON body was supplied: {err}."),
        )),
    }
}

fn required_name(
    object: &serde_json::Map<String, Value>,
    property: &str,
) -> Result<String, Refusal> {
    match object.get(property) {
        Some(Value::String(name)) if !name.trim().is_empty() => Ok(name.clone()),
        Some(Value::String(_)) => Err(Refusal::invalid(property, "the name is empty")),
        Some(other) => Err(Refusal::invalid(
            property,
            format!(
                "expected a string, found {}",
                crate::stages::decode::kind_of(other)
            ),
        )),
        None => Err(Refusal::invalid(property, "the property is required")),
    }
}

fn required_int32(object: &serde_json::Map<String, Value>, property: &str) -> Result<i64, Refusal> {
    match object.get(property) {
        Some(Value::Number(number)) => number
            .as_i64()
            .filter(|value| (0..=i64::from(i32::MAX)).contains(value))
            .ok_or_else(|| {
                Refusal::invalid(
                    property,
                    format!("{number} is not a non-negative 32-bit integer"),
                )
            }),
        Some(other) => Err(Refusal::invalid(
            property,
            format!(
                "expected an integer, found {}",
                crate::stages::decode::kind_of(other)
            ),
        )),
        None => Err(Refusal::invalid(property, "the property is required")),
    }
}

fn answered(result: Result<Response, Refusal>) -> Response {
    result.unwrap_or_else(|refusal| {
        tracing::debug!(
            status = refusal.status.as_u16(),
            error = refusal.error,
            "catalogue request refused"
        );
        refused(refusal)
    })
}

async fn list_collection(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = catalogue_fault(&shared, false).await {
        return refused(refusal);
    }
    answered(
        admitted(&shared, &headers, &[]).map(|_| collection(shared.lock().catalogue().lists())),
    )
}

async fn group_collection(
    State(shared): State<Arc<Shared>>,
    Path(list): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = catalogue_fault(&shared, false).await {
        return refused(refusal);
    }
    answered(
        admitted(&shared, &headers, &[("listId", &list)]).and_then(|ids| {
            let groups = shared.lock().catalogue().groups(ids[0]);
            groups.map(collection).ok_or_else(Refusal::list_not_found)
        }),
    )
}

async fn create_group(
    State(shared): State<Arc<Shared>>,
    Path(list): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = catalogue_fault(&shared, true).await {
        return refused(refusal);
    }
    answered(
        admitted(&shared, &headers, &[("listId", &list)]).and_then(|ids| {
            let object = creation_body(&headers, &body)?;
            let name = required_name(&object, "segmentationFieldGroupName")?;
            let position = required_int32(&object, "position")?;
            let id = shared
                .lock()
                .catalogue_mut()
                .create_group(ids[0], name, position)
                .ok_or_else(Refusal::list_not_found)?;
            tracing::debug!(list = ids[0], group = id, "profile field group created");
            Ok(created(id))
        }),
    )
}

async fn field_collection(
    State(shared): State<Arc<Shared>>,
    Path((list, group)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = catalogue_fault(&shared, false).await {
        return refused(refusal);
    }
    let segments = [
        ("listId", list.as_str()),
        ("segmentationFieldGroupId", group.as_str()),
    ];
    answered(admitted(&shared, &headers, &segments).and_then(|ids| {
        let fields = shared.lock().catalogue().fields(ids[0], ids[1]);
        fields.map(collection).ok_or_else(group_not_found)
    }))
}

async fn create_field(
    State(shared): State<Arc<Shared>>,
    Path((list, group)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = catalogue_fault(&shared, true).await {
        return refused(refusal);
    }
    let segments = [
        ("listId", list.as_str()),
        ("segmentationFieldGroupId", group.as_str()),
    ];
    answered(admitted(&shared, &headers, &segments).and_then(|ids| {
        let object = creation_body(&headers, &body)?;
        let name = required_name(&object, "segmentationFieldName")?;
        let data_type = required_name(&object, "dataType")?;
        if !DATA_TYPES.contains(&data_type.as_str()) {
            return Err(Refusal::invalid(
                "dataType",
                format!("{data_type:?} is not one of {}", DATA_TYPES.join(", ")),
            ));
        }
        let max_length = required_int32(&object, "maxLength")?;
        let position = required_int32(&object, "position")?;
        let field = FieldResource {
            segmentation_field_id: 0,
            segmentation_field_name: name,
            segmentation_field_group_id: 0,
            data_type,
            max_length,
            position,
        };
        let id = shared
            .lock()
            .catalogue_mut()
            .create_field(ids[0], ids[1], field)
            .ok_or_else(group_not_found)?;
        tracing::debug!(list = ids[0], field = id, "profile field created");
        Ok(created(id))
    }))
}

async fn catalogue(State(shared): State<Arc<Shared>>) -> Response {
    json(StatusCode::OK, &shared.lock().catalogue().snapshot())
}

async fn contacts(State(shared): State<Arc<Shared>>) -> Response {
    let mut state = shared.lock();
    state.complete_imports(Instant::now());
    json(StatusCode::OK, state.contacts())
}

/// Sets one field of one contact, as a person in Listrak's UI would: the body is the value.
async fn edit_field(
    State(shared): State<Arc<Shared>>,
    Path((list, email, field)): Path<(u32, String, u32)>,
    body: Bytes,
) -> Response {
    let Ok(value) = std::str::from_utf8(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut state = shared.lock();
    state.complete_imports(Instant::now());
    state.edit_field(list, &email, field, value);
    StatusCode::NO_CONTENT.into_response()
}

/// The query of the contact read routes.
#[derive(Deserialize)]
struct ContactQuery {
    #[serde(rename = "segmentationFieldIds")]
    field_ids: Option<String>,
    cursor: Option<String>,
    count: Option<String>,
}

/// A contact as the read routes show it (the spec's `Contact`): the requested fields that
/// hold a value.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContactView {
    email_address: String,
    subscription_state: &'static str,
    segmentation_field_values: Vec<FieldValueView>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct FieldValueView {
    segmentation_field_id: u32,
    value: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContactPage {
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_page_cursor: Option<String>,
    data: Vec<ContactView>,
}

#[derive(Serialize)]
struct ContactResource {
    status: u16,
    data: ContactView,
}

/// The most field ids one read may ask for, and the page sizes, as the spec gives them.
const MAX_READ_FIELDS: usize = 30;
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 5000;

fn requested_fields(query: &ContactQuery) -> Result<Vec<u32>, Refusal> {
    let Some(text) = query.field_ids.as_deref().filter(|text| !text.is_empty()) else {
        return Ok(Vec::new());
    };
    let ids: Vec<u32> = text
        .split(',')
        .map(|id| payload::list_id(id.trim()))
        .collect::<Option<_>>()
        .ok_or_else(|| {
            Refusal::invalid("segmentationFieldIds", "is not a list of profile field ids")
        })?;
    if ids.len() > MAX_READ_FIELDS {
        return Err(Refusal::invalid(
            "segmentationFieldIds",
            format!("names {} fields; at most {MAX_READ_FIELDS}", ids.len()),
        ));
    }
    Ok(ids)
}

fn view(email: &str, values: &BTreeMap<u32, String>, fields: &[u32]) -> ContactView {
    ContactView {
        email_address: email.to_owned(),
        subscription_state: "Subscribed",
        segmentation_field_values: fields
            .iter()
            .filter_map(|id| {
                values.get(id).map(|value| FieldValueView {
                    segmentation_field_id: *id,
                    value: value.clone(),
                })
            })
            .collect(),
    }
}

/// One list's contacts: email → field → value.
type ListContacts = BTreeMap<String, BTreeMap<u32, String>>;

/// A list's contacts as the completed imports left them, for the read routes: 404 for a list
/// that does not exist, as for updates; `None` for one that holds no contact yet.
fn list_contacts(
    state: &mut super::state::State,
    list: u32,
) -> Result<Option<&ListContacts>, Refusal> {
    let now = Instant::now();
    state.complete_imports(now);
    state.contact_read();
    let faults = state.faults(now);
    if faults.unknown_lists.contains(&list)
        || (!state.catalogue().is_empty() && !state.catalogue().has_list(list))
    {
        return Err(Refusal::list_not_found());
    }
    Ok(state.contacts().get(&list))
}

/// Get a Contact: `GET /v1/List/{listId}/Contact/{contactIdentifier}` (an email address).
async fn one_contact(
    State(shared): State<Arc<Shared>>,
    Path((list, identifier)): Path<(String, String)>,
    Query(query): Query<ContactQuery>,
    headers: HeaderMap,
) -> Response {
    answered(
        admitted(&shared, &headers, &[("listId", &list)]).and_then(|ids| {
            let fields = requested_fields(&query)?;
            let mut state = shared.lock();
            let email = identifier.to_lowercase();
            let values = list_contacts(&mut state, ids[0])?
                .and_then(|contacts| contacts.get(&email))
                .ok_or_else(|| {
                    Refusal::new(
                        StatusCode::NOT_FOUND,
                        answer::UNABLE_TO_LOCATE_RESOURCE,
                        "Unable to locate a contact associated with the contactIdentifier \
                         supplied.",
                    )
                })?;
            let data = view(&email, values, &fields);
            Ok(json(StatusCode::OK, &ContactResource { status: 200, data }))
        }),
    )
}

/// Get all Contacts: `GET /v1/List/{listId}/Contact`, a page of `count` (default 1000, at
/// most 5000) after `cursor` (`Start` by default; each page names the next, none after the
/// last).
async fn contact_collection(
    State(shared): State<Arc<Shared>>,
    Path(list): Path<String>,
    Query(query): Query<ContactQuery>,
    headers: HeaderMap,
) -> Response {
    answered(
        admitted(&shared, &headers, &[("listId", &list)]).and_then(|ids| {
            let fields = requested_fields(&query)?;
            let count = match query.count.as_deref() {
                None => DEFAULT_PAGE,
                Some(text) => text
                    .parse::<usize>()
                    .ok()
                    .filter(|count| (1..=MAX_PAGE).contains(count))
                    .ok_or_else(|| {
                        Refusal::invalid("count", format!("must be from 1 to {MAX_PAGE}"))
                    })?,
            };
            let after = match query.cursor.as_deref() {
                None | Some("Start") | Some("") => None,
                Some(cursor) => Some(
                    from_cursor(cursor).ok_or_else(|| Refusal::invalid("cursor", "is unknown"))?,
                ),
            };
            let mut state = shared.lock();
            let empty = BTreeMap::new();
            let contacts = list_contacts(&mut state, ids[0])?.unwrap_or(&empty);
            let start = match &after {
                None => std::ops::Bound::Unbounded,
                Some(after) => std::ops::Bound::Excluded(after),
            };
            let mut page: Vec<ContactView> = contacts
                .range::<String, _>((start, std::ops::Bound::Unbounded))
                .take(count + 1)
                .map(|(email, values)| view(email, values, &fields))
                .collect();
            let next_page_cursor = if page.len() > count {
                page.truncate(count);
                page.last().map(|last| to_cursor(&last.email_address))
            } else {
                None
            };
            Ok(json(
                StatusCode::OK,
                &ContactPage {
                    status: 200,
                    next_page_cursor,
                    data: page,
                },
            ))
        }),
    )
}

/// A cursor is the last email of a page, in hex: opaque, and safe in a query string.
fn to_cursor(email: &str) -> String {
    email.bytes().map(|byte| format!("{byte:02x}")).collect()
}

fn from_cursor(cursor: &str) -> Option<String> {
    if !cursor.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..cursor.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(cursor.get(at..at + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[derive(Deserialize)]
struct RequestsQuery {
    /// Only the most recent `limit` requests are listed; the counts still cover all of them.
    limit: Option<usize>,
}

#[derive(Serialize)]
struct RequestsReport<'a> {
    total: usize,
    by_status: BTreeMap<u16, usize>,
    tokens_issued: usize,
    requests: &'a [RecordedRequest],
}

async fn requests(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<RequestsQuery>,
) -> Response {
    let state = shared.lock();
    let all = state.requests();
    let listed = &all[all.len() - query.limit.unwrap_or(all.len()).min(all.len())..];
    json(
        StatusCode::OK,
        &RequestsReport {
            total: all.len(),
            by_status: super::count_by_status(all),
            tokens_issued: state.tokens_issued(),
            requests: listed,
        },
    )
}

async fn faults(State(shared): State<Arc<Shared>>) -> Response {
    json(StatusCode::OK, &shared.lock().faults(Instant::now()))
}

/// Every fault is replaced: what the body leaves out goes back to its default.
async fn replace_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let faults = serde_json::from_slice::<Faults>(&body).map_err(|err| err.to_string());
    set_faults(&shared, faults.and_then(validated), Instant::now())
}

/// Only the faults the body names change; an outage in progress keeps its end.
async fn amend_faults(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let changes = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(changes)) => changes,
        Ok(_) => return refused(Refusal::invalid("faults", "expected a JSON object")),
        Err(err) => return refused(Refusal::invalid("faults", err)),
    };
    let now = Instant::now();
    let current = shared.lock().faults(now);
    let amended = serde_json::to_value(current)
        .map_err(|err| err.to_string())
        .and_then(|mut faults| {
            if let Value::Object(faults) = &mut faults {
                faults.extend(changes);
            }
            serde_json::from_value::<Faults>(faults).map_err(|err| err.to_string())
        });
    set_faults(&shared, amended.and_then(validated), now)
}

fn validated(faults: Faults) -> Result<Faults, String> {
    faults.validate().map(|()| faults)
}

fn set_faults(shared: &Shared, faults: Result<Faults, String>, now: Instant) -> Response {
    match faults {
        Ok(faults) => {
            tracing::info!(?faults, "faults set");
            let mut state = shared.lock();
            state.set_faults(faults, now);
            json(StatusCode::OK, &state.faults(now))
        }
        Err(why) => refused(Refusal::invalid("faults", why)),
    }
}

async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().reset();
    tracing::info!("contacts and recorded requests cleared");
    StatusCode::NO_CONTENT
}

async fn unknown_route(method: Method, uri: Uri) -> Response {
    refused(Refusal::new(
        StatusCode::NOT_FOUND,
        answer::UNKNOWN_ROUTE,
        format!("No route matches {method} {}.", uri.path()),
    ))
}

async fn unsupported_method(method: Method, uri: Uri) -> Response {
    refused(Refusal::new(
        StatusCode::METHOD_NOT_ALLOWED,
        answer::UNSUPPORTED_METHOD,
        format!("{} does not support {method}.", uri.path()),
    ))
}

fn header(headers: &HeaderMap, name: axum::http::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn json(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (
            status,
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            )],
            bytes,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(%err, "answer could not be serialised");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

fn refused(refusal: Refusal) -> Response {
    let mut response = json(refusal.status, &refusal.envelope());
    if let Some(delay) = refusal.retry_after {
        response.headers_mut().insert(
            RETRY_AFTER,
            HeaderValue::from(answer::retry_after_seconds(delay)),
        );
    }
    response
}

async fn expire_tokens(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.lock().expire_tokens();
    StatusCode::NO_CONTENT
}
