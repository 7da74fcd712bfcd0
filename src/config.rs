//! TEMPORARY stand-in until the configuration module lands.
use std::num::NonZeroUsize;
use std::time::Duration;
#[derive(Clone)]
pub struct Secret(pub String);
impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}
pub struct ListrakSettings {
    pub client_id: String,
    pub client_secret: Secret,
    pub api_url: String,
    pub auth_url: String,
    pub request_timeout: Duration,
    pub max_concurrency: NonZeroUsize,
}
