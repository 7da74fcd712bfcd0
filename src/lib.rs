//! listrak-worker: keeps Listrak profile fields in step with Segment Engage audiences.

pub mod fake;
pub mod model;
