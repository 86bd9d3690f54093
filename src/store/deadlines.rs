//! Deadlines shared between replicas: when each held key may be used again after a 429,
//! and until when a mount that kept failing is out of turn (`retry.eject_after`).
//! A replica that rests a key writes its deadline; every replica reads them all four times a
//! second into cells its key pools read without waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{Shared, PREFIX};

/// How often the cells are brought in step with the store.
const SYNC_EVERY: Duration = Duration::from_millis(250);

/// Writes a deadline unless a later one is there, expiring with it. KEYS[1]; ARGV: 1 the
/// deadline, 2 how far ahead it is (ms).
const PUBLISH: &str = r"
local now = tonumber(redis.call('GET', KEYS[1]) or 0)
if tonumber(ARGV[1]) > now then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 0
";

/// Deadlines by name, in Unix milliseconds (0: none), as the store last said.
pub(crate) struct Deadlines {
    names: Vec<String>,
    until_ms: Vec<AtomicU64>,
}

impl Deadlines {
    pub(super) fn new(names: Vec<String>) -> Deadlines {
        let until_ms = names.iter().map(|_| AtomicU64::new(0)).collect();
        Deadlines { names, until_ms }
    }

    /// The store's name for cell `index` (what [`super::Store::publish_deadline`] takes).
    pub(crate) fn name(&self, index: usize) -> Option<&str> {
        self.names.get(index).map(String::as_str)
    }

    /// Until when cell `index` rests, in Unix milliseconds (0: it does not).
    pub(crate) fn until_ms(&self, index: usize) -> u64 {
        self.until_ms
            .get(index)
            .map_or(0, |cell| cell.load(Ordering::Relaxed))
    }
}

/// The store's name for the deadline of a key hashed as `hash` on the mount `mount`.
pub(crate) fn name(mount: &str, hash: &[u8; 32]) -> String {
    format!("{PREFIX}rest:{mount}:{}", crate::config::hex(hash))
}

/// The store's name for the ejection of the mount `mount`.
pub(crate) fn ejection_name(mount: &str) -> String {
    format!("{PREFIX}eject:{mount}")
}

/// Adds the write of `name`'s deadline to `pipe`; nothing when it has passed.
pub(super) fn publish(pipe: &mut redis::Pipeline, name: &str, until_ms: u64, now_ms: u64) {
    if until_ms <= now_ms {
        return;
    }
    pipe.cmd("EVAL")
        .arg(PUBLISH)
        .arg(1)
        .arg(name)
        .arg(until_ms)
        .arg(until_ms - now_ms)
        .ignore();
}

/// Reads every live cell's deadline from the store, for as long as the store is in use.
pub(super) async fn sync(shared: Arc<Shared>) {
    let mut ticks = tokio::time::interval(SYNC_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let cells: Vec<Arc<Deadlines>> = match shared.deadlines.lock() {
            Ok(all) => all.iter().filter_map(std::sync::Weak::upgrade).collect(),
            Err(_) => continue,
        };
        let names: Vec<&String> = cells.iter().flat_map(|cell| &cell.names).collect();
        if names.is_empty() {
            continue;
        }
        let mut mget = redis::cmd("MGET");
        for name in &names {
            mget.arg(*name);
        }
        let read: Option<Vec<Option<u64>>> = shared
            .call(|mut conn| async move { mget.query_async(&mut conn).await })
            .await;
        let Some(read) = read else { continue };
        let cells = cells.iter().flat_map(|cell| &cell.until_ms);
        for (cell, until) in cells.zip(read) {
            cell.store(until.unwrap_or(0), Ordering::Relaxed);
        }
    }
}
