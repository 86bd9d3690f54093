//! Waiting for what happens in the background (a log line, metrics written at a stream's end,
//! a close the upstream sees): polled until a deadline, never read once or after a bare sleep.

use std::future::Future;
use std::time::Duration;

/// How long a test waits for something done in the background: far past the log writer's
/// delay, even with CI's guard holding each batch back ([`super::LOG_HOLD_ENV`]).
pub const LOG_DEADLINE: Duration = Duration::from_secs(10);

/// Polls `check` every 20 ms until it gives `Ok`, and returns that; past `within`, fails the
/// test naming `what` it waited for and the last `Err`: what was seen instead (shown only
/// then, so it may be a view that reads what it shows when displayed).
pub async fn eventually<T, E, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let until = tokio::time::Instant::now() + within;
    loop {
        let seen = match check().await {
            Ok(done) => return done,
            Err(seen) => seen,
        };
        if tokio::time::Instant::now() >= until {
            panic!("waited {within:?} for {what}; saw instead:\n{seen}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for a condition that has nothing to show but itself.
pub async fn until(what: &str, within: Duration, mut holds: impl FnMut() -> bool) {
    eventually(what, within, || {
        let seen = if holds() { Ok(()) } else { Err("") };
        std::future::ready(seen)
    })
    .await;
}
