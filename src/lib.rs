//! listrak-worker: keeps Listrak profile fields in step with Segment Engage audiences.

pub mod batch;
pub mod classify;
pub mod model;
pub mod retry;
