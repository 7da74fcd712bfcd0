//! listrak-fake: a strict, fault-injecting stand-in for Listrak's token, SegmentationField,
//! list and profile field endpoints.
//!
//! Integration tests, benchmarks, the demo and docker-compose run the worker against it: it
//! checks requests as strictly as Listrak's published spec allows, records every one, keeps
//! the resulting state of every contact, and injects faults on demand.
//!
//! # Layout
//!
//! - `mod.rs`: [`FakeOptions`], [`FakeServer`] (start, stop) and [`FakeHandle`] (read the
//!   state, change the faults while it runs).
//! - `routes.rs`: the HTTP surface, Listrak's endpoints and the `/_fake/*` controls.
//! - `state.rs`: tokens, contacts, recorded requests, and the order in which one
//!   SegmentationField request is checked.
//! - `payload.rs`: reading bodies, forms, ids and headers strictly.
//! - `catalogue.rs`: lists, profile field groups and fields ([`CatalogueSeed`] to start with).
//! - `faults.rs`: [`Faults`], the outage clock and the throttle bucket.
//! - `answer.rs`: Listrak's error envelope and the error codes used.
//!
//! # Catalogue
//!
//! `GET /List`, `GET`/`POST /List/{listId}/SegmentationFieldGroup` and
//! `GET`/`POST /List/{listId}/SegmentationFieldGroup/{groupId}/SegmentationField` answer as
//! Listrak's spec says (`{"status":200,"data":[...]}`, `{"status":201,"resourceId":"..."}`),
//! with the same token check and error envelope as updates. Once the fake holds lists, an
//! update to a list it does not hold gets 404 and one naming a field id its list does not
//! have gets 400; with no lists at all, any ids are accepted.
//!
//! # Control endpoints
//!
//! - `GET /_fake/catalogue`: the catalogue, in the shape of [`CatalogueSeed`].
//! - `GET /_fake/contacts`: `{"<listId>": {"<email>": {"<fieldId>": "value"}}}`.
//! - `GET /_fake/requests[?limit=N]`: counts by status, tokens issued, and the recorded
//!   requests (the last N when asked).
//! - `GET /_fake/faults`; `PUT` replaces every fault, `PATCH` changes the ones it names.
//! - `POST /_fake/reset`: forgets contacts and recorded requests (tokens and faults stay).
//! - `POST /_fake/expire-tokens`: every token issued so far is refused from now on (401).
//!
//! # Error codes
//!
//! | answer | status | `error` |
//! |---|---|---|
//! | token endpoint, wrong client id or secret | 401 | `ERROR_INVALID_CREDENTIALS` |
//! | token endpoint, not a form | 400 | `ERROR_UNSUPPORTED_CONTENT_TYPE` |
//! | token endpoint, no or other grant type, no id or secret | 400 | `ERROR_INVALID_PARAMETER` |
//! | missing, unknown or expired token | 401 | `ERROR_UNAUTHORIZED` |
//! | injected outage or random error | 503 | `ERROR_UNHANDLED_EXCEPTION` |
//! | injected throttle | 429 | `ERROR_TOO_MANY_REQUESTS` (Listrak documents no 429) |
//! | `listId` not a positive int32 | 400 | `ERROR_INVALID_PARAMETER` |
//! | `Content-Type` not `application/json` | 415 | `ERROR_UNSUPPORTED_CONTENT_TYPE` |
//! | unknown list, or body over `max_body_bytes` | 404 | `ERROR_UNABLE_TO_LOCATE_RESOURCE` |
//! | body not JSON | 400 | `ERROR_MALFORMED_REQUEST_BODY` |
//! | body breaks the schema (message names the place) | 400 | `ERROR_INVALID_PARAMETER` |
//! | one contact gives the same field twice | 400 | `ERROR_SEGMENTATION_FIELD_DEFINED_TWICE` |
//! | a contact's email is in `reject_emails` (message names it) | 400 | `ERROR_INVALID_PARAMETER` |
//! | with a catalogue: a list it does not hold | 404 | `ERROR_UNABLE_TO_LOCATE_RESOURCE` |
//! | with a catalogue: a field id its list does not have | 400 | `ERROR_INVALID_PARAMETER` |
//! | catalogue: unknown list or group | 404 | `ERROR_UNABLE_TO_LOCATE_RESOURCE` |
//! | creation: bad or missing property, unknown `dataType` | 400 | `ERROR_INVALID_PARAMETER` |
//! | unknown route / method | 404 / 405 | `ERROR_UNKNOWN_ROUTE` / `ERROR_UNSUPPORTED_METHOD` |

mod answer;
mod catalogue;
mod faults;
mod payload;
mod routes;
mod state;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use catalogue::{CatalogueSeed, SeedField, SeedGroup, SeedList};
pub use faults::{Faults, DEFAULT_TOKEN_LIFETIME};
pub use state::{Contacts, RecordedRequest};

use state::State;

/// How long [`FakeServer::shutdown`] lets answers in flight finish before it gives up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The credentials the fake issues tokens for, and the faults it starts with.
#[derive(Clone)]
pub struct FakeOptions {
    pub client_id: String,
    pub client_secret: String,
    pub faults: Faults,
    /// Lists and profile fields to start with; none by default (any ids accepted).
    pub catalogue: CatalogueSeed,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            client_id: "fake-client-id".into(),
            client_secret: "fake-client-secret".into(),
            faults: Faults::default(),
            catalogue: CatalogueSeed::default(),
        }
    }
}

/// The secret stays out of logs even here, so that no habit of printing options leaks a real one.
impl fmt::Debug for FakeOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeOptions")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("faults", &self.faults)
            .field("catalogue", &self.catalogue)
            .finish()
    }
}

/// What every request handler and every handle share.
struct Shared {
    addr: SocketAddr,
    client_id: String,
    client_secret: String,
    state: Mutex<State>,
}

impl Shared {
    /// A handler that panicked mid-update leaves bookkeeping at worst incomplete, never
    /// unsafe, so the fake keeps serving rather than failing every later request.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake. It stops on [`FakeServer::shutdown`], or when dropped.
///
/// It dereferences to its [`FakeHandle`], so `server.contacts()` and friends work directly;
/// take [`FakeServer::handle`] to read or steer it from elsewhere.
pub struct FakeServer {
    handle: FakeHandle,
    /// Sending, or dropping, starts the graceful shutdown.
    stop: oneshot::Sender<()>,
    task: JoinHandle<io::Result<()>>,
}

impl FakeServer {
    /// Binds `addr` (`127.0.0.1:0` picks a free port) and serves on the current tokio runtime.
    pub async fn start(addr: SocketAddr, options: FakeOptions) -> io::Result<FakeServer> {
        options.catalogue.validate().map_err(|why| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("catalogue: {why}"))
        })?;
        let mut state = State::new(options.faults, Instant::now());
        *state.catalogue_mut() = catalogue::Catalogue::new(&options.catalogue);
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            addr,
            client_id: options.client_id,
            client_secret: options.client_secret,
            state: Mutex::new(state),
        });
        // Small answers on kept-alive connections must not wait for Nagle's algorithm.
        let listener = listener.tap_io(|stream| {
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "TCP_NODELAY could not be set");
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let app = routes::router(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    // Dropping the sender counts as asking to stop.
                    let _ = stopped.await;
                })
                .await
        });
        tracing::info!(%addr, "listrak-fake listening");
        Ok(FakeServer {
            handle: FakeHandle { shared },
            stop,
            task,
        })
    }

    pub fn handle(&self) -> FakeHandle {
        self.handle.clone()
    }

    /// Stops accepting, lets answers in flight finish (bounded), and returns once it is down.
    pub async fn shutdown(self) {
        let FakeServer { stop, mut task, .. } = self;
        let _ = stop.send(());
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => tracing::info!("listrak-fake stopped"),
            Ok(Ok(Err(err))) => tracing::warn!(%err, "listrak-fake stopped with an error"),
            Ok(Err(err)) => tracing::warn!(%err, "listrak-fake task failed"),
            Err(_) => {
                tracing::warn!(
                    grace = ?SHUTDOWN_GRACE,
                    "listrak-fake did not stop in time; aborting"
                );
                task.abort();
            }
        }
    }
}

impl Deref for FakeServer {
    type Target = FakeHandle;

    fn deref(&self) -> &FakeHandle {
        &self.handle
    }
}

impl fmt::Debug for FakeServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeServer")
            .field("addr", &self.addr())
            .finish()
    }
}

/// A cheap, cloneable view of a running fake: its URLs, its state, its faults.
#[derive(Clone)]
pub struct FakeHandle {
    shared: Arc<Shared>,
}

impl FakeHandle {
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// What the worker's `listrak.api_url` should be: `http://{addr}/email/v1`.
    pub fn api_url(&self) -> String {
        format!("http://{}/email/v1", self.addr())
    }

    /// What the worker's `listrak.auth_url` should be: `http://{addr}/OAuth2/Token`.
    pub fn auth_url(&self) -> String {
        format!("http://{}/OAuth2/Token", self.addr())
    }

    /// list id → email (lower-cased) → field id → value, after every accepted request.
    /// Every contact as the completed imports left it.
    pub fn contacts(&self) -> Contacts {
        let mut state = self.shared.lock();
        state.complete_imports(Instant::now());
        state.contacts().clone()
    }

    /// Sets one field of one contact directly, as a person in Listrak's UI would.
    pub fn edit_field(&self, list_id: u32, email: &str, field_id: u32, value: &str) {
        let mut state = self.shared.lock();
        state.complete_imports(Instant::now());
        state.edit_field(list_id, email, field_id, value);
    }

    /// Requests of the contact read routes (Get a Contact, Get all Contacts) so far.
    pub fn contact_reads(&self) -> usize {
        self.shared.lock().contact_reads()
    }

    /// Imports accepted (201) and not completed yet.
    pub fn imports_pending(&self) -> usize {
        let mut state = self.shared.lock();
        state.complete_imports(Instant::now());
        state.imports_pending()
    }

    /// One field of one contact, without copying the whole state.
    pub fn value(&self, list_id: u32, email: &str, field_id: u32) -> Option<String> {
        let mut state = self.shared.lock();
        state.complete_imports(Instant::now());
        state
            .contacts()
            .get(&list_id)?
            .get(&email.to_lowercase())?
            .get(&field_id)
            .cloned()
    }

    /// Lists, groups and fields as they are now (seeded and created).
    pub fn catalogue(&self) -> CatalogueSeed {
        self.shared.lock().catalogue().snapshot()
    }

    /// Deletes a profile field, as someone could in Listrak's console; whether it existed.
    pub fn delete_field(&self, list_id: u32, field_id: u32) -> bool {
        self.shared
            .lock()
            .catalogue_mut()
            .delete_field(list_id, field_id)
    }

    /// Every SegmentationField request, in arrival order, whatever it was answered.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests().to_vec()
    }

    /// How many SegmentationField requests got each status.
    pub fn status_counts(&self) -> BTreeMap<u16, usize> {
        count_by_status(self.shared.lock().requests())
    }

    pub fn tokens_issued(&self) -> usize {
        self.shared.lock().tokens_issued()
    }

    /// Ends every token issued so far: the next request with one of them gets 401.
    pub fn expire_tokens(&self) {
        self.shared.lock().expire_tokens();
    }

    /// The faults in force; `outage_for` is what is left of an outage.
    pub fn faults(&self) -> Faults {
        self.shared.lock().faults(Instant::now())
    }

    /// Replaces the faults; an `outage_for` starts now. Out-of-range numbers are tolerated
    /// (an error rate is clamped to 0..=1, a non-positive throttle lets one request through).
    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().set_faults(faults, Instant::now());
    }

    /// Changes some faults and keeps the rest, including the end of an outage in progress.
    pub fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        let now = Instant::now();
        let mut state = self.shared.lock();
        let mut faults = state.faults(now);
        change(&mut faults);
        state.set_faults(faults, now);
    }

    /// Forgets contacts and recorded requests; issued tokens and faults stay.
    pub fn reset(&self) {
        self.shared.lock().reset();
    }
}

impl fmt::Debug for FakeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeHandle")
            .field("addr", &self.addr())
            .finish()
    }
}

fn count_by_status(requests: &[RecordedRequest]) -> BTreeMap<u16, usize> {
    let mut counts = BTreeMap::new();
    for request in requests {
        *counts.entry(request.status).or_insert(0) += 1;
    }
    counts
}
