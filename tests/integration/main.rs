//! Tests against the real local RabbitMQ and listrak-fake over loopback. One binary, so the
//! crate links once; each test uses queues of its own and deletes them.

mod applied_log;
mod audience;
mod catalogue_faults;
mod cli;
mod deploy_files;
mod dlq;
mod faults;
mod ingest;
mod logs;
mod observability;
mod pipeline;
mod process;
mod readback;
mod reconcile;
mod replicas;
mod setup;
mod support;
mod tls;
