//! Whether the store answers: a PING now and then, more often while it does not, so a store
//! that comes back is used again without a restart.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;

/// The longest a health check waits for its PONG.
pub(super) const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// Between checks while the store answers: calls that fail mark it down sooner.
const EVERY_WHILE_UP: Duration = Duration::from_secs(1);
/// Between checks while it does not.
const EVERY_WHILE_DOWN: Duration = Duration::from_millis(250);

/// One check: marks the store up when it answers, down (counted) when not.
pub(super) async fn check(shared: &Arc<Shared>) {
    let Some((mut conn, _)) = shared.connection() else {
        shared.fail("cannot make a connection");
        return;
    };
    let ping = redis::cmd("PING");
    let ping = ping.query_async::<String>(&mut conn);
    match tokio::time::timeout(PING_TIMEOUT, ping).await {
        Ok(Ok(_)) => {
            if !shared.up.swap(true, Ordering::Relaxed) {
                shared.metrics.up.set(1);
                tracing::info!(store = %shared.settings.shown(), "limits.store answers");
            }
        }
        Ok(Err(err)) => shared.fail(&err.to_string()),
        Err(_) => shared.fail("no PONG within 1s"),
    }
}

/// Checks for as long as the store is in use.
pub(super) async fn watch(shared: Arc<Shared>) {
    loop {
        let wait = if shared.up.load(Ordering::Relaxed) {
            EVERY_WHILE_UP
        } else {
            EVERY_WHILE_DOWN
        };
        tokio::time::sleep(wait).await;
        check(&shared).await;
    }
}
