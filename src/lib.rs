//! listrak-worker: keeps Listrak profile fields in step with Segment Engage audiences.

pub mod config;
pub mod decode;
pub mod mapping;
pub mod model;
