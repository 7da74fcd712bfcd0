//! listrak-worker: keeps Listrak profile fields in step with Segment Engage audiences.

pub mod batch;
pub mod broker;
pub mod classify;
pub mod concurrency;
pub mod config;
pub mod deliver;
pub mod fake;
pub mod guard;
pub mod listrak;
pub mod model;
pub mod retry;
pub mod settle;
pub mod telemetry;
