//! The driver: the state that lives while the worker runs, and the loops that turn the edges'
//! inputs into the stages' decisions. `worker` runs broker sessions one after another;
//! `session` is one of them; `deliver` sends one batch; `fields` keeps each list's catalogue;
//! `readback` reads keys at risk back from Listrak and repairs them;
//! `guard`, `concurrency` and `retry` hold the state those decisions need (a mutex, a clock,
//! a random number generator), which is why they are here and not among the stages.

pub mod clock;
pub mod concurrency;
pub mod core;
pub mod deliver;
pub mod fields;
pub mod guard;
pub mod readback;
pub mod retry;
pub mod session;
pub mod shared;
pub mod unpoisoned;
pub mod worker;
