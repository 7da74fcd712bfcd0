//! Listrak's error envelope and the error codes the fake answers with.
//!
//! Codes come from the "Error Codes" table of Listrak's Email API spec, except
//! [`TOO_MANY_REQUESTS`]: Listrak documents no 429 at all, so that one is ours.

use std::time::Duration;

use axum::http::StatusCode;
use serde::Serialize;

/// Missing, unknown or expired access token (token endpoint: wrong client credentials use
/// [`INVALID_CREDENTIALS`]).
pub const UNAUTHORIZED: &str = "ERROR_UNAUTHORIZED";
/// Wrong client id or secret at the token endpoint.
pub const INVALID_CREDENTIALS: &str = "ERROR_INVALID_CREDENTIALS";
/// A value that breaks the schema: a bad list id, a wrong type, a missing property, an
/// implausible or refused email address.
pub const INVALID_PARAMETER: &str = "ERROR_INVALID_PARAMETER";
/// A body that is not JSON at all.
pub const MALFORMED_REQUEST_BODY: &str = "ERROR_MALFORMED_REQUEST_BODY";
/// One contact carries two values for the same field; the spec lists this code for
/// transactional messages, and it names the mistake exactly.
pub const SEGMENTATION_FIELD_DEFINED_TWICE: &str = "ERROR_SEGMENTATION_FIELD_DEFINED_TWICE";
/// An unknown list, and also a body over the size limit, which Listrak answers the same way.
pub const UNABLE_TO_LOCATE_RESOURCE: &str = "ERROR_UNABLE_TO_LOCATE_RESOURCE";
pub const UNSUPPORTED_CONTENT_TYPE: &str = "ERROR_UNSUPPORTED_CONTENT_TYPE";
pub const UNKNOWN_ROUTE: &str = "ERROR_UNKNOWN_ROUTE";
pub const UNSUPPORTED_METHOD: &str = "ERROR_UNSUPPORTED_METHOD";
/// Injected 503s (outage, random errors): the spec's only code for server-side failures.
pub const UNHANDLED_EXCEPTION: &str = "ERROR_UNHANDLED_EXCEPTION";
/// Injected 429s. Not a Listrak code: Listrak documents neither 429 nor a code for it.
pub const TOO_MANY_REQUESTS: &str = "ERROR_TOO_MANY_REQUESTS";

/// The body of every error answer: `{"status":400,"error":"ERROR_…","message":"…"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Envelope {
    pub status: u16,
    pub error: &'static str,
    pub message: String,
}

/// Why a request was not accepted, with what the answer carries besides the envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub error: &'static str,
    pub message: String,
    /// Only 429 and 503 answers carry `Retry-After`, and only when the faults ask for it.
    pub retry_after: Option<Duration>,
}

impl Refusal {
    pub fn new(status: StatusCode, error: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            UNAUTHORIZED,
            "Authorization was denied for this request.",
        )
    }

    pub fn list_not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            UNABLE_TO_LOCATE_RESOURCE,
            "Unable to locate a resource associated with the listId supplied.",
        )
    }

    pub fn invalid(parameter: &str, why: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            INVALID_PARAMETER,
            format!("An invalid value was supplied for {parameter}: {why}."),
        )
    }

    pub fn envelope(&self) -> Envelope {
        Envelope {
            status: self.status.as_u16(),
            error: self.error,
            message: self.message.clone(),
        }
    }
}

/// Whole seconds, rounded up, as `Retry-After` wants them.
pub fn retry_after_seconds(delay: Duration) -> u64 {
    delay.as_secs() + u64::from(delay.subsec_nanos() > 0)
}

/// A random version-4 UUID, the shape of Listrak's `resourceId`.
pub fn resource_id() -> String {
    let bits: u128 = rand::random();
    let bits = (bits & !(0xF << 76)) | (0x4 << 76);
    let bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        bits >> 96,
        (bits >> 80) & 0xFFFF,
        (bits >> 64) & 0xFFFF,
        (bits >> 48) & 0xFFFF,
        bits & 0xFFFF_FFFF_FFFF
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_partial_seconds_up() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 0);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_seconds(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn resource_ids_look_like_version_4_uuids() {
        let id = resource_id();
        let groups: Vec<&str> = id.split('-').collect();
        let lengths: Vec<usize> = groups.iter().map(|group| group.len()).collect();
        assert_eq!(lengths, [8, 4, 4, 4, 12], "{id}");
        assert!(groups[2].starts_with('4'), "{id}");
        assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{id}");
        assert_ne!(resource_id(), id);
    }
}
