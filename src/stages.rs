//! The pure stages: every decision the pipeline makes, as functions of their inputs. None of
//! them performs I/O, reads a clock or draws a random number; time comes in as a value. They
//! import only each other and `config` (a test in `lib.rs` checks every file in this folder).

pub mod arrival;
pub mod batch;
pub mod catalogue;
pub mod classify;
pub mod decode;
pub mod disposition;
pub mod headers;
pub mod ingest;
pub mod mapping;
pub mod model;
pub mod pace;
pub mod readback;
pub mod settle;
