//! Tests against the real local RabbitMQ and listrak-fake over loopback. One binary, so the
//! crate links once; each test uses queues of its own and deletes them.

mod cli;
mod dlq;
mod pipeline;
mod process;
mod support;
