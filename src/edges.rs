//! The edges: where the worker meets the world. The broker (connection, topology, confirmed
//! publishing, the applied log's stream), Listrak's HTTP API, the operations endpoint, the
//! metrics, and the ingest endpoint Segment posts to.

pub mod applied_log;
pub mod broker;
pub mod http;
pub mod ingest;
pub mod listrak;
pub mod telemetry;
