//! The `dlq` commands: inspect, replay, export and purge the dead-letter queue.

pub mod filter;
pub mod letter;
pub mod pace;
pub mod record;
pub mod stats;

pub use filter::Filter;
pub use letter::Facts;
pub use stats::Stats;
