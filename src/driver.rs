//! The driver: the state that lives while the worker runs, and the loops that turn the edges'
//! inputs into the stages' decisions. `worker` runs broker sessions one after another, on
//! `worker_state`; `session` is one of them, carrying out what `session_core` decides;
//! `deliver` sends one batch; `fields` keeps each list's field catalogue; `readback` reads
//! keys at risk back from Listrak and repairs them; `superseded` (the superseded guard),
//! `concurrency` and `retry` hold the state those decisions need (a mutex, a clock, a random
//! number generator), which is why they are here and not among the stages.

pub mod clock;
pub mod concurrency;
pub mod deliver;
pub mod fields;
pub mod readback;
pub mod retry;
pub mod session;
pub mod session_core;
pub mod superseded;
pub mod unpoisoned;
pub mod worker;
pub mod worker_state;
