//! What runs beside the worker, not in it: nothing in production imports these.
//!
//! - [`demo`]: the `demo` command, the whole pipeline on this machine.
//! - [`sample`]: the demo's Engage traffic and mappings, shared with the tests.
//! - [`bench`](mod@bench): `listrak-bench`, the worker against a bare consumer.
//! - [`fake`]: `listrak-fake`, a strict stand-in for Listrak with fault injection.
//! - [`ingest_bench`]: `listrak-bench --ingest`, events through `ingest` against `publish`.
//! - [`log_bench`]: `listrak-bench --applied-log`, a week of traffic in an applied log, read
//!   back as a worker does at start.

pub mod bench;
pub mod demo;
pub mod fake;
pub mod ingest_bench;
pub mod log_bench;
pub mod sample;
