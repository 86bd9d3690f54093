//! Passive health and the retry budget, shared by every worker.
//!
//! A mount that fails `retry.eject_after` times in a row (no connection, or a 500, 502, 503,
//! 504) is left out of turn for `retry.eject_for`; then one request tries it again, and its
//! answer decides. Only requests that may go elsewhere (`[models]` targets, `retry = true`)
//! read or write this: nothing here runs for the others. With `limits.store`, an ejection is
//! written to the store as a key's rest is, and every replica leaves the mount out.
//!
//! The retry budget keeps retries to `retry.budget` of the first attempts over the last 10 s
//! (and a floor of [`FLOOR_PER_SECOND`]), so an outage does not multiply the load on the
//! upstream that is already failing.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::RetryConfig;
use crate::store::{self, Deadlines, Store};

/// One mount's run of failures, and until when it is out of turn.
pub(crate) struct Health {
    mount: Arc<str>,
    failures: AtomicU32,
    /// Milliseconds after `epoch` (0: in turn).
    ejected_until: AtomicU64,
    epoch: Instant,
    /// With a store: the other replicas' ejection, and where this one's goes.
    shared: Option<(Arc<Store>, Arc<Deadlines>)>,
}

impl Health {
    pub(crate) fn new(mount: &Arc<str>, store: Option<&Arc<Store>>) -> Health {
        Health {
            mount: Arc::clone(mount),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
            shared: store.map(|store| {
                let cell = store.deadlines(vec![store::ejection_name(mount)]);
                (Arc::clone(store), cell)
            }),
        }
    }

    /// Whether it was made to share ejections through `store` (a reload keeps it if so).
    pub(crate) fn shares_through(&self, store: Option<&Arc<Store>>) -> bool {
        match (&self.shared, store) {
            (Some((mine, _)), Some(store)) => Arc::ptr_eq(mine, store),
            (None, None) => true,
            _ => false,
        }
    }

    /// Whether a request may go here now: it is in turn, or its time out is over and this
    /// is the one request that tries it again (the others stay away for another
    /// `eject_for` unless that request succeeds).
    pub(crate) fn admits(&self, retry: &RetryConfig) -> bool {
        if self.ejected_elsewhere() {
            return false;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until == 0 {
            return true;
        }
        let now = self.now();
        now >= until
            && (self.ejected_until)
                .compare_exchange(
                    until,
                    now + millis(retry.eject_for),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Whether it is out of turn now, here or on another replica: what `/ready` shows.
    pub(crate) fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        (until != 0 && self.now() < until) || self.ejected_elsewhere()
    }

    fn ejected_elsewhere(&self) -> bool {
        (self.shared.as_ref()).is_some_and(|(_, cell)| cell.until_ms(0) > store::unix_ms())
    }

    /// A request here failed. Returns whether that took the mount out of turn.
    pub(crate) fn failed(&self, retry: &RetryConfig) -> bool {
        if retry.eject_after == 0 {
            return false;
        }
        let run = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if run < retry.eject_after {
            return false;
        }
        self.failures.store(0, Ordering::Relaxed);
        let until = self.now() + millis(retry.eject_for);
        self.ejected_until.fetch_max(until, Ordering::Relaxed);
        if let Some((store, cell)) = &self.shared {
            if let Some(name) = cell.name(0) {
                store.publish_deadline(name, retry.eject_for);
            }
        }
        tracing::warn!(
            mount = %self.mount,
            failures = run,
            eject_for_s = retry.eject_for.as_secs(),
            "the mount failed every time lately; it is left out of turn (retry.eject_after)"
        );
        true
    }

    /// A request here got an answer: its run of failures ends, and an ejected mount is in
    /// turn again. Returns whether it was out.
    pub(crate) fn answered(&self) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        // Read first: a write on every answer would bounce the line between workers.
        let was_out = self.ejected_until.load(Ordering::Relaxed) != 0
            && self.ejected_until.swap(0, Ordering::Relaxed) != 0;
        if was_out {
            tracing::info!(mount = %self.mount, "the mount answered again; back in turn");
        }
        was_out
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed()).max(1)
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Retries a second allowed whatever the budget says, so that a quiet gateway still retries.
pub(crate) const FLOOR_PER_SECOND: u32 = 3;
/// The window the budget counts over, in seconds.
const WINDOW_SECONDS: u64 = 10;

/// First attempts and retries over the last [`WINDOW_SECONDS`], a second at a time.
pub(crate) struct RetryBudget {
    seconds: Mutex<[Second; WINDOW_SECONDS as usize]>,
    epoch: Instant,
}

#[derive(Default, Clone, Copy)]
struct Second {
    /// Which second since the epoch this slot counts (slots are reused round the window).
    at: u64,
    sent: u32,
    retries: u32,
}

impl RetryBudget {
    pub(crate) fn new() -> RetryBudget {
        RetryBudget {
            seconds: Mutex::default(),
            epoch: Instant::now(),
        }
    }

    fn second(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// A request that may be retried went up for the first time.
    pub(crate) fn sent(&self) {
        let now = self.second();
        // A poisoned count only loses the budget's view; requests go on.
        if let Ok(mut seconds) = self.seconds.lock() {
            slot(&mut seconds, now).sent += 1;
        }
    }

    /// Whether one more retry fits: the retries of the window, this one included, within
    /// `budget` of its first attempts plus the floor. Counted when it fits.
    pub(crate) fn try_retry(&self, budget: f64) -> bool {
        let now = self.second();
        let Ok(mut seconds) = self.seconds.lock() else {
            return false;
        };
        let live = seconds
            .iter()
            .filter(|s| s.at + WINDOW_SECONDS > now && s.at <= now);
        let (sent, retries) = live.fold((0u64, 0u64), |(sent, retries), s| {
            (sent + u64::from(s.sent), retries + u64::from(s.retries))
        });
        let floor = f64::from(FLOOR_PER_SECOND) * WINDOW_SECONDS as f64;
        #[allow(clippy::cast_precision_loss)] // counts of a 10 s window
        let allowed = floor + budget * sent as f64;
        #[allow(clippy::cast_precision_loss)]
        let fits = (retries + 1) as f64 <= allowed;
        if fits {
            slot(&mut seconds, now).retries += 1;
        }
        fits
    }
}

/// The slot of second `now`, emptied if it last counted an older second.
fn slot(seconds: &mut [Second; WINDOW_SECONDS as usize], now: u64) -> &mut Second {
    #[allow(clippy::cast_possible_truncation)] // below WINDOW_SECONDS
    let slot = &mut seconds[(now % WINDOW_SECONDS) as usize];
    if slot.at != now {
        *slot = Second {
            at: now,
            ..Second::default()
        };
    }
    slot
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ejecting_after(eject_after: u32) -> RetryConfig {
        RetryConfig {
            eject_after,
            eject_for: Duration::from_millis(40),
            ..RetryConfig::default()
        }
    }

    #[test]
    fn a_mount_failing_in_a_row_is_left_out_then_tried_by_one_request() {
        let health = Health::new(&Arc::from("groq"), None);
        let retry = ejecting_after(3);
        assert!(!health.failed(&retry) && !health.failed(&retry));
        // An answer breaks the run.
        health.answered();
        assert!(!health.failed(&retry) && !health.failed(&retry));
        assert!(health.failed(&retry), "the third in a row ejects");
        assert!(health.is_ejected() && !health.admits(&retry));
        std::thread::sleep(Duration::from_millis(60));
        assert!(health.admits(&retry), "one request tries it again");
        assert!(!health.admits(&retry), "and only one");
        assert!(health.answered(), "its answer brings it back");
        assert!(health.admits(&retry) && !health.is_ejected());
        let never = ejecting_after(0);
        assert!((0..20).all(|_| !health.failed(&never)));
    }

    #[test]
    fn retries_stay_within_the_budget_and_its_floor() {
        let budget = RetryBudget::new();
        for _ in 0..200 {
            budget.sent();
        }
        let granted = (0..1000).filter(|_| budget.try_retry(0.2)).count();
        // 20% of 200, and the floor of 3 a second over 10 s.
        assert_eq!(granted, 40 + 30);
        let none = RetryBudget::new();
        assert_eq!((0..100).filter(|_| none.try_retry(0.0)).count(), 30);
    }
}
