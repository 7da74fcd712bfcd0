//! The one clock the driver reads: tokio's, as `std::time::Instant` values. The core and the
//! stages take the time as a value; read here, it is simulated on a paused runtime, so a test
//! runs the session, the delivery and its retries on a simulated clock.

use std::time::Instant;

pub fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}
