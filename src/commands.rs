//! The commands beside `run`: the dead-letter queue (`dlq`), Listrak setup (`listrak`,
//! `check --listrak`), `publish`, and `history`; `progress` is their progress line on stderr.

pub mod dlq;
pub mod history;
pub mod ingest;
pub mod progress;
pub mod publish;
pub mod reconcile;
pub mod setup;
