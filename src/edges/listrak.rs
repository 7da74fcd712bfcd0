//! The Listrak API: OAuth token cache, the SegmentationField request, and the catalogue
//! (lists, profile field groups and fields) the setup commands read and extend.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::{ListrakSettings, Secret};
use crate::edges::telemetry::{Metrics, RetryClass};
use crate::stages::catalogue::{FieldGroup, FieldInfo, ListInfo, CHECK_BOX};
pub use crate::stages::classify::CatalogueError;
use crate::stages::classify::{parse_retry_after, ListrakError, Outcome};
use crate::stages::model::{FieldId, ListId};

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

/// The one call the pipeline makes, and the catalogue requests that resolve `audience_field`
/// mappings; narrow so the pipeline runs against anything in tests.
pub trait ListrakApi: FieldCatalogue + Send + Sync + 'static {
    /// Sends one request body (a JSON array of `contacts` contacts) to one list.
    fn post_contacts(
        &self,
        list: ListId,
        body: Bytes,
        contacts: usize,
    ) -> impl Future<Output = Outcome> + Send;

    /// What Listrak holds in `fields` of one contact of a list (Get a Contact); `None` when
    /// the contact is not on the list.
    fn contact(
        &self,
        list: ListId,
        email: &str,
        fields: &[u32],
    ) -> impl Future<Output = Result<Option<ContactValues>, CatalogueError>> + Send;
}

/// An access token and when to stop using it.
#[derive(Clone)]
struct Token {
    value: Arc<str>,
    /// Tells a stale 401 (for a token already replaced) from a fresh one.
    generation: u64,
    refresh_at: Instant,
}

/// Listrak's Email API over HTTPS, with a token shared by every request in flight.
pub struct ListrakClient {
    http: reqwest::Client,
    api_url: String,
    auth_url: String,
    client_id: String,
    client_secret: Secret,
    /// A tokio mutex, held across the token request: while one task refreshes, the others
    /// wait for its token instead of asking for their own.
    token: Mutex<Option<Token>>,
    generations: std::sync::atomic::AtomicU64,
    metrics: Metrics,
}

/// Only `access_token` is required: OAuth servers and proxies write `expires_in` as an
/// integer, a float or a string, or leave it out, and a 401 refreshes the token anyway.
#[derive(serde::Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: serde_json::Value,
}

/// A token's lifetime when its answer gives none that makes sense: Listrak's own.
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(900);
/// Longer than any token lives; a larger `expires_in` is not believed.
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

impl TokenAnswer {
    fn lifetime(&self) -> Duration {
        let seconds = match &self.expires_in {
            serde_json::Value::Number(n) => n.as_f64(),
            serde_json::Value::String(text) => text.trim().parse::<f64>().ok(),
            _ => None,
        };
        seconds
            .filter(|s| *s >= 1.0)
            .and_then(|s| Duration::try_from_secs_f64(s).ok())
            .filter(|lifetime| *lifetime <= MAX_TOKEN_LIFETIME)
            .unwrap_or(DEFAULT_TOKEN_LIFETIME)
    }
}

/// How much of an answer is read: a Listrak answer is a few hundred bytes; more is read only
/// from something that is not Listrak, and discarded.
const ANSWER_LIMIT: usize = 64 * 1024;
/// A list of lists or fields: large accounts have hundreds, a few hundred bytes each.
const CATALOGUE_LIMIT: usize = 8 * 1024 * 1024;

/// Reads at most `limit` bytes of a response body; the rest is not read (the connection is
/// not reused then).
async fn read_capped(mut response: reqwest::Response, limit: usize) -> reqwest::Result<Bytes> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = limit - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= limit {
            break;
        }
    }
    Ok(Bytes::from(body))
}

impl ListrakClient {
    pub fn new(settings: &ListrakSettings, metrics: Metrics) -> anyhow::Result<Self> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("listrak-worker/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            api_url: settings.api_url.trim_end_matches('/').to_string(),
            auth_url: settings.auth_url.clone(),
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.clone(),
            token: Mutex::new(None),
            generations: std::sync::atomic::AtomicU64::new(0),
            metrics,
        })
    }

    /// Obtains a token now (for `check --auth`), whatever is cached.
    pub async fn authenticate(&self) -> Result<Duration, String> {
        let token = self.fetch_token().await?;
        Ok(token.refresh_at.saturating_duration_since(Instant::now()))
    }

    async fn bearer(&self) -> Result<Token, String> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.refresh_at {
                return Ok(token.clone());
            }
        }
        let token = self.fetch_token().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// Forgets the token of `generation`, unless another request already replaced it.
    async fn invalidate(&self, generation: u64) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.generation == generation) {
            *cached = None;
        }
    }

    async fn fetch_token(&self) -> Result<Token, String> {
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.as_str()),
            ("client_secret", self.client_secret.expose()),
        ];
        let result = async {
            let response = self
                .http
                .post(&self.auth_url)
                .form(&form)
                .send()
                .await
                .map_err(|e| {
                    format!("token request to {} failed: {}", self.auth_url, describe(e))
                })?;
            let status = response.status();
            let body = read_capped(response, ANSWER_LIMIT)
                .await
                .map_err(|e| format!("token answer unreadable: {}", describe(e)))?;
            if !status.is_success() {
                let error: ListrakError = serde_json::from_slice(&body).unwrap_or_default();
                return Err(format!(
                    "token endpoint answered {status}{}",
                    if error.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {} {}", error.error, error.message)
                    }
                ));
            }
            let answer: TokenAnswer = serde_json::from_slice(&body)
                .map_err(|e| format!("token answer is not the expected JSON: {e}"))?;
            let lifetime = answer.lifetime();
            // Refresh a little early, so a request does not leave with a token about to lapse.
            let margin = (lifetime / 10).min(Duration::from_secs(30));
            Ok(Token {
                value: answer.access_token.into(),
                generation: self
                    .generations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                refresh_at: Instant::now() + lifetime - margin,
            })
        }
        .await;
        self.metrics.token_refreshed(result.is_ok());
        if let Err(reason) = &result {
            tracing::warn!(%reason, "could not obtain a Listrak token");
        }
        result
    }

    async fn post_once(&self, list: ListId, token: &str, body: Bytes, contacts: usize) -> Outcome {
        let url = format!("{}/List/{}/Contact/SegmentationField", self.api_url, list);
        let started = Instant::now();
        self.metrics.requests_in_flight(1);
        let result = self
            .http
            .post(url)
            .bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let outcome = match result {
            Err(error) if error.is_timeout() => Outcome::Timeout,
            Err(error) => Outcome::Connection(describe(error)),
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
                match read_capped(response, ANSWER_LIMIT).await {
                    Err(error) if error.is_timeout() => Outcome::Timeout,
                    Err(error) => Outcome::Connection(describe(error)),
                    Ok(body) => Outcome::Answered {
                        status,
                        retry_after,
                        error: (status >= 400)
                            .then(|| serde_json::from_slice::<ListrakError>(&body).ok())
                            .flatten(),
                        resource_id: (200..300)
                            .contains(&status)
                            .then(|| serde_json::from_slice::<ResourceCreated>(&body).ok())
                            .flatten()
                            .map(|created| created.resource_id),
                    },
                }
            }
        };
        self.metrics.requests_in_flight(-1);
        self.metrics
            .request_answered(&outcome.status_label(), started.elapsed(), contacts);
        outcome
    }
}

impl ListrakApi for ListrakClient {
    async fn contact(
        &self,
        list: ListId,
        email: &str,
        fields: &[u32],
    ) -> Result<Option<ContactValues>, CatalogueError> {
        ListrakClient::contact(self, list, email, fields).await
    }

    async fn post_contacts(&self, list: ListId, body: Bytes, contacts: usize) -> Outcome {
        let mut refreshed = false;
        loop {
            let token = match self.bearer().await {
                Ok(token) => token,
                Err(reason) => return Outcome::NoToken(reason),
            };
            let outcome = self
                .post_once(list, &token.value, body.clone(), contacts)
                .await;
            match outcome {
                Outcome::Answered { status: 401, .. } if !refreshed => {
                    refreshed = true;
                    self.metrics.retried(RetryClass::Auth);
                    self.invalidate(token.generation).await;
                }
                outcome => return outcome,
            }
        }
    }
}

/// `{"status":200,"data":[...]}`: how Listrak wraps every collection it returns.
#[derive(Deserialize)]
struct Collection<T> {
    data: Vec<T>,
}

/// `{"status":201,"resourceId":"..."}`: the id of what a POST created.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResourceCreated {
    resource_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListShape {
    list_id: i64,
    #[serde(default)]
    list_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GroupShape {
    segmentation_field_group_id: i64,
    #[serde(default)]
    segmentation_field_group_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldShape {
    segmentation_field_id: i64,
    #[serde(default)]
    segmentation_field_name: Option<String>,
    #[serde(default)]
    data_type: Option<String>,
    #[serde(default)]
    max_length: Option<i64>,
}

/// A contact as Listrak holds it: its email and the values of the fields asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactValues {
    pub email: String,
    pub values: Vec<(u32, String)>,
}

/// One page of Get all Contacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactsPage {
    pub contacts: Vec<ContactValues>,
    /// The cursor of the next page; `None` after the last.
    pub next: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PagedContacts {
    #[serde(default)]
    next_page_cursor: Option<String>,
    #[serde(default)]
    data: Vec<ContactShape>,
}

#[derive(Deserialize)]
struct ContactResource {
    data: ContactShape,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ContactShape {
    email_address: String,
    #[serde(default)]
    segmentation_field_values: Vec<FieldValueShape>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FieldValueShape {
    segmentation_field_id: i64,
    #[serde(default)]
    value: Option<String>,
}

impl From<ContactShape> for ContactValues {
    fn from(contact: ContactShape) -> Self {
        ContactValues {
            email: contact.email_address.to_lowercase(),
            values: contact
                .segmentation_field_values
                .into_iter()
                .filter_map(|value| {
                    Some((
                        u32::try_from(value.segmentation_field_id).ok()?,
                        value.value.unwrap_or_default(),
                    ))
                })
                .collect(),
        }
    }
}

impl ListrakClient {
    /// Every list of the account (`GET /List`).
    pub async fn lists(&self) -> Result<Vec<ListInfo>, CatalogueError> {
        let request = "GET /List".to_owned();
        let answer: Collection<ListShape> = self.catalogue_get(&request, "List").await?;
        answer
            .data
            .into_iter()
            .map(|list| {
                Ok(ListInfo {
                    id: ListId::new(list.list_id)
                        .ok_or_else(|| unexpected(&request, format!("list id {}", list.list_id)))?,
                    name: list.list_name.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// A list's profile field groups, each with its fields: one request for the groups and
    /// one per group.
    pub async fn field_groups(&self, list: ListId) -> Result<Vec<FieldGroup>, CatalogueError> {
        let path = format!("List/{list}/SegmentationFieldGroup");
        let request = format!("GET /{path}");
        let answer: Collection<GroupShape> = self.catalogue_get(&request, &path).await?;
        let mut groups = Vec::with_capacity(answer.data.len());
        for group in answer.data {
            let id = positive(group.segmentation_field_group_id).ok_or_else(|| {
                unexpected(
                    &request,
                    format!("group id {}", group.segmentation_field_group_id),
                )
            })?;
            let path = format!("{path}/{id}/SegmentationField");
            let request = format!("GET /{path}");
            let fields: Collection<FieldShape> = self.catalogue_get(&request, &path).await?;
            let fields = fields
                .data
                .into_iter()
                .map(|field| {
                    Ok(FieldInfo {
                        id: FieldId::new(field.segmentation_field_id).ok_or_else(|| {
                            unexpected(
                                &request,
                                format!("field id {}", field.segmentation_field_id),
                            )
                        })?,
                        name: field.segmentation_field_name.unwrap_or_default(),
                        data_type: field.data_type.unwrap_or_default(),
                        max_length: field.max_length.and_then(positive),
                    })
                })
                .collect::<Result<Vec<_>, CatalogueError>>()?;
            groups.push(FieldGroup {
                id,
                name: group.segmentation_field_group_name.unwrap_or_default(),
                fields,
            });
        }
        Ok(groups)
    }

    /// Creates a profile field group at the end of the list's groups; returns its id.
    pub async fn create_field_group(
        &self,
        list: ListId,
        name: &str,
        position: u32,
    ) -> Result<u32, CatalogueError> {
        let path = format!("List/{list}/SegmentationFieldGroup");
        let body = serde_json::json!({
            "segmentationFieldGroupName": name,
            "position": position,
        });
        self.catalogue_create(&path, body).await
    }

    /// Creates a Check Box profile field in a group; returns its id.
    pub async fn create_check_box(
        &self,
        list: ListId,
        group: u32,
        name: &str,
        position: u32,
    ) -> Result<FieldId, CatalogueError> {
        let path = format!("List/{list}/SegmentationFieldGroup/{group}/SegmentationField");
        // The schema requires a maxLength for every type; a Check Box holds "on" or "off".
        let body = serde_json::json!({
            "segmentationFieldName": name,
            "dataType": CHECK_BOX,
            "maxLength": 3,
            "position": position,
        });
        let request = format!("POST /{path}");
        let id = self.catalogue_create(&path, body).await?;
        FieldId::new(i64::from(id)).ok_or_else(|| unexpected(&request, format!("field id {id}")))
    }

    /// One page of Get all Contacts (`GET /List/{list}/Contact`): at most `count` contacts
    /// after `cursor` (`None` for the first page), with the values of `fields` (at most 30)
    /// they hold. Answers the contacts (email, field, value) and the next page's cursor.
    pub async fn contacts_page(
        &self,
        list: ListId,
        fields: &[u32],
        cursor: Option<&str>,
        count: usize,
    ) -> Result<ContactsPage, CatalogueError> {
        let ids: Vec<String> = fields.iter().map(u32::to_string).collect();
        let path = format!(
            "List/{list}/Contact?segmentationFieldIds={}&count={count}&cursor={}",
            ids.join(","),
            cursor.unwrap_or("Start")
        );
        let request = format!("GET /List/{list}/Contact");
        let answer: PagedContacts = self.catalogue_get(&request, &path).await?;
        Ok(ContactsPage {
            contacts: answer.data.into_iter().map(ContactValues::from).collect(),
            next: answer.next_page_cursor.filter(|next| !next.is_empty()),
        })
    }

    /// Get a Contact (`GET /List/{list}/Contact/{email}`) with the values of `fields`;
    /// `None` when the contact is not on the list (404).
    pub async fn contact(
        &self,
        list: ListId,
        email: &str,
        fields: &[u32],
    ) -> Result<Option<ContactValues>, CatalogueError> {
        let ids: Vec<String> = fields.iter().map(u32::to_string).collect();
        let identifier: String = email
            .bytes()
            .map(|byte| match byte {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' | b'@' => {
                    char::from(byte).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        let path = format!(
            "List/{list}/Contact/{identifier}?segmentationFieldIds={}",
            ids.join(",")
        );
        let request = format!("GET /List/{list}/Contact/{{email}}");
        match self.catalogue_get::<ContactResource>(&request, &path).await {
            Ok(answer) => Ok(Some(ContactValues::from(answer.data))),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn catalogue_get<T: DeserializeOwned>(
        &self,
        request: &str,
        path: &str,
    ) -> Result<T, CatalogueError> {
        let body = self
            .catalogue_send(request, reqwest::Method::GET, path, None)
            .await?;
        serde_json::from_slice(&body).map_err(|e| unexpected(request, e.to_string()))
    }

    async fn catalogue_create(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<u32, CatalogueError> {
        let request = format!("POST /{path}");
        let answer = self
            .catalogue_send(&request, reqwest::Method::POST, path, Some(body))
            .await?;
        let created: ResourceCreated =
            serde_json::from_slice(&answer).map_err(|e| unexpected(&request, e.to_string()))?;
        created
            .resource_id
            .trim()
            .parse::<i64>()
            .ok()
            .and_then(positive)
            .ok_or_else(|| {
                unexpected(
                    &request,
                    format!("resourceId {:?} is not a positive id", created.resource_id),
                )
            })
    }

    /// One catalogue request with the shared token, sent again once after a 401 with a
    /// fresh token, as updates are.
    async fn catalogue_send(
        &self,
        request: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, CatalogueError> {
        let url = format!("{}/{path}", self.api_url);
        let mut refreshed = false;
        loop {
            let token = self.bearer().await.map_err(CatalogueError::NoToken)?;
            let mut builder = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&token.value);
            if let Some(body) = &body {
                builder = builder
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_string());
            }
            let transport = |error: reqwest::Error| CatalogueError::Transport {
                request: request.to_owned(),
                reason: describe(error),
            };
            let response = builder.send().await.map_err(transport)?;
            let status = response.status().as_u16();
            let answer = read_capped(response, CATALOGUE_LIMIT)
                .await
                .map_err(transport)?;
            match status {
                200..=299 => return Ok(answer),
                401 if !refreshed => {
                    refreshed = true;
                    self.invalidate(token.generation).await;
                }
                _ => {
                    let error: ListrakError = serde_json::from_slice(&answer).unwrap_or_default();
                    return Err(CatalogueError::Refused {
                        request: request.to_owned(),
                        status,
                        error: error.error,
                        message: error.message,
                    });
                }
            }
        }
    }
}

impl FieldCatalogue for ListrakClient {
    fn field_groups(
        &self,
        list: ListId,
    ) -> impl Future<Output = Result<Vec<FieldGroup>, CatalogueError>> + Send {
        ListrakClient::field_groups(self, list)
    }

    fn create_field_group(
        &self,
        list: ListId,
        name: &str,
        position: u32,
    ) -> impl Future<Output = Result<u32, CatalogueError>> + Send {
        ListrakClient::create_field_group(self, list, name, position)
    }

    fn create_check_box(
        &self,
        list: ListId,
        group: u32,
        name: &str,
        position: u32,
    ) -> impl Future<Output = Result<FieldId, CatalogueError>> + Send {
        ListrakClient::create_check_box(self, list, group, name, position)
    }
}

fn unexpected(request: &str, reason: impl Into<String>) -> CatalogueError {
    CatalogueError::Unexpected {
        request: request.to_owned(),
        reason: reason.into(),
    }
}

fn positive(value: i64) -> Option<u32> {
    u32::try_from(value).ok().filter(|value| *value > 0)
}

/// A request error with its causes ("error sending request: ...: invalid peer certificate:
/// UnknownIssuer"): reqwest's own message alone does not say what went wrong. The URL is left
/// out; no cause carries the request body, where the client secret travels.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut cause = std::error::Error::source(&error);
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

/// reqwest and lapin are built without a bundled rustls provider; this picks ring, once per
/// process.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_answer_is_read_whatever_form_its_lifetime_takes() {
        let minute = Duration::from_secs(60);
        let table: &[(&str, Option<Duration>)] = &[
            (
                r#"{"access_token":"t","expires_in":900}"#,
                Some(15 * minute),
            ),
            (
                r#"{"access_token":"t","expires_in":900.0}"#,
                Some(15 * minute),
            ),
            (
                r#"{"access_token":"t","expires_in":"900"}"#,
                Some(15 * minute),
            ),
            (r#"{"access_token":"t","expires_in":" 60 "}"#, Some(minute)),
            (r#"{"access_token":"t"}"#, Some(DEFAULT_TOKEN_LIFETIME)),
            (
                r#"{"access_token":"t","expires_in":null}"#,
                Some(DEFAULT_TOKEN_LIFETIME),
            ),
            (
                r#"{"access_token":"t","expires_in":0}"#,
                Some(DEFAULT_TOKEN_LIFETIME),
            ),
            (
                r#"{"access_token":"t","expires_in":-60}"#,
                Some(DEFAULT_TOKEN_LIFETIME),
            ),
            (
                r#"{"access_token":"t","expires_in":"soon"}"#,
                Some(DEFAULT_TOKEN_LIFETIME),
            ),
            (
                r#"{"access_token":"t","expires_in":1e300}"#,
                Some(DEFAULT_TOKEN_LIFETIME),
            ),
            (
                r#"{"access_token":"t","expires_in":18446744073709551615}"#,
                Some(DEFAULT_TOKEN_LIFETIME),
            ),
            (r#"{"expires_in":900}"#, None),
            (r#"{"access_token":null}"#, None),
        ];
        for (answer, lifetime) in table {
            let read = serde_json::from_str::<TokenAnswer>(answer).ok();
            assert_eq!(read.map(|a| a.lifetime()), *lifetime, "{answer}");
        }
    }
}
