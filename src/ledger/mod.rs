//! What each named key has spent, by UTC calendar period: requests and tokens this minute,
//! tokens and dollars this day and this month. The pipeline decides what a limit means
//! ([`crate::pipeline`]'s budget phase); this only counts, and keeps the counts across
//! restarts in `limits.state_file` ([`file`]).
//!
//! Counts are by key name, never by key: a person whose key is replaced keeps their month.
//! A period that has passed reads as zero, so nothing has to reset the counters on time.

mod file;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) use crate::store::Counts;
use crate::store::{PeriodNumbers, Spend};
pub(crate) use file::StateError;

/// The UTC calendar periods a moment falls in, each as a count since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Periods {
    pub(crate) minute: u64,
    pub(crate) day: u64,
    /// `year × 12 + month − 1`.
    pub(crate) month: u64,
}

impl Periods {
    pub(crate) fn at(now: SystemTime) -> Periods {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs());
        let day = secs / 86_400;
        let (year, month) = year_and_month(day);
        Periods {
            minute: secs / 60,
            day,
            month: year * 12 + month - 1,
        }
    }

    /// The minute, day and month numbers, as the store names its hashes.
    pub(crate) fn numbers(&self) -> PeriodNumbers {
        (self.minute, self.day, self.month)
    }

    /// Unix seconds when this minute, day and month end.
    pub(crate) fn ends(&self) -> (u64, u64, u64) {
        let (year, month) = (self.month / 12, self.month % 12 + 1);
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        let month_end = days_from_civil(next_year, next_month) * 86_400;
        ((self.minute + 1) * 60, (self.day + 1) * 86_400, month_end)
    }
}

/// The year, month (1–12) and day (1–31) of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn year_and_month(days: u64) -> (u64, u64) {
    let (year, month, _) = civil(days);
    (year, month)
}

/// Unix seconds as RFC 3339 in UTC (`2027-04-01T00:00:00Z`).
pub(crate) fn rfc3339(secs: u64) -> String {
    let (year, month, day) = civil(secs / 86_400);
    let time = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        time / 3_600,
        time / 60 % 60,
        time % 60
    )
}

/// Days from 1970-01-01 to the first of `month` in `year`.
fn days_from_civil(year: u64, month: u64) -> u64 {
    let days = crate::config::days_from_civil(
        i32::try_from(year).unwrap_or(i32::MAX),
        u32::try_from(month).unwrap_or(1),
        1,
    );
    u64::try_from(days).unwrap_or(0)
}

/// One key's counts, each with the period it belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Spent {
    pub(crate) minute: u64,
    pub(crate) minute_requests: u64,
    pub(crate) minute_tokens: u64,
    pub(crate) day: u64,
    pub(crate) day_tokens: u64,
    pub(crate) day_pico_usd: u64,
    pub(crate) month: u64,
    pub(crate) month_tokens: u64,
    pub(crate) month_pico_usd: u64,
}

impl Spent {
    /// Its six counts in the order limits are checked: requests and tokens this minute,
    /// tokens today and this month, pico-dollars today and this month ([`Counts`]).
    pub(crate) fn counts(&self) -> Counts {
        [
            self.minute_requests,
            self.minute_tokens,
            self.day_tokens,
            self.month_tokens,
            self.day_pico_usd,
            self.month_pico_usd,
        ]
    }

    /// The counts a store read back, for `periods`.
    fn from_counts(counts: Counts, periods: Periods) -> Spent {
        let [minute_requests, minute_tokens, day_tokens, month_tokens, day_pico_usd, month_pico_usd] =
            counts;
        Spent {
            minute: periods.minute,
            minute_requests,
            minute_tokens,
            day: periods.day,
            day_tokens,
            day_pico_usd,
            month: periods.month,
            month_tokens,
            month_pico_usd,
        }
    }

    /// These counts as of `now`: those of a period that has passed are zero.
    pub(crate) fn rolled(mut self, now: Periods) -> Spent {
        if self.minute != now.minute {
            (self.minute, self.minute_requests, self.minute_tokens) = (now.minute, 0, 0);
        }
        if self.day != now.day {
            (self.day, self.day_tokens, self.day_pico_usd) = (now.day, 0, 0);
        }
        if self.month != now.month {
            (self.month, self.month_tokens, self.month_pico_usd) = (now.month, 0, 0);
        }
        self
    }
}

/// What an answer used, as counted against its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Charge {
    pub(crate) tokens: u64,
    pub(crate) pico_usd: u64,
}

/// Every named key's counts: in this process (and its state file), or in the store.
pub(crate) struct Ledger {
    /// With `limits.store`: the counts are there, shared by the replicas, and nothing below
    /// is used.
    shared: Option<Spend>,
    spent: Mutex<HashMap<Arc<str>, Spent>>,
    /// Where the counts are kept between runs, when they are.
    file: Option<file::StateFile>,
    /// Counts changed since the file was last written.
    dirty: AtomicBool,
}

impl Ledger {
    /// A ledger that forgets on exit: for keys with request rates alone, or with a store.
    pub(crate) fn in_memory() -> Arc<Ledger> {
        Arc::new(Ledger {
            shared: None,
            spent: Mutex::default(),
            file: None,
            dirty: AtomicBool::new(false),
        })
    }

    /// The ledger kept in `path`: its counts read now (a corrupt or unreadable file is an
    /// error, never reset), and written at most once a second while they change, and when
    /// the ledger is dropped.
    pub(crate) fn in_file(path: &Path) -> Result<Arc<Ledger>, StateError> {
        let (file, spent) = file::StateFile::open(path)?;
        let ledger = Arc::new(Ledger {
            shared: None,
            spent: Mutex::new(spent),
            file: Some(file),
            dirty: AtomicBool::new(false),
        });
        file::write_while_alive(Arc::downgrade(&ledger));
        Ok(ledger)
    }

    /// The ledger kept in a store, for every replica.
    pub(crate) fn in_store(spend: Spend) -> Arc<Ledger> {
        Arc::new(Ledger {
            shared: Some(spend),
            spent: Mutex::default(),
            file: None,
            dirty: AtomicBool::new(false),
        })
    }

    /// The store the counts are kept in, when they are: then requests are checked against
    /// them when forwarding begins ([`Spend::admit`]), one round trip.
    pub(crate) fn shared(&self) -> Option<&Spend> {
        self.shared.as_ref()
    }

    /// The counts of `name` as of `now`, wherever they are kept; `None` while the store does
    /// not answer.
    pub(crate) async fn read(&self, name: &str, now: Periods) -> Option<Spent> {
        match &self.shared {
            Some(spend) => {
                let counts = spend.read(name, now.numbers()).await?;
                Some(Spent::from_counts(counts, now))
            }
            None => Some(self.spent(name, now)),
        }
    }

    /// The counts of `name` as of `now`, in this process.
    pub(crate) fn spent(&self, name: &str, now: Periods) -> Spent {
        let spent = self.spent.lock().ok();
        let counted = spent.and_then(|spent| spent.get(name).copied());
        counted.unwrap_or_default().rolled(now)
    }

    /// Counts a request of `name` this minute, if `admit` allows it given the counts before;
    /// returns those counts either way.
    pub(crate) fn count_request(
        &self,
        name: &Arc<str>,
        now: Periods,
        admit: impl FnOnce(&Spent) -> bool,
    ) -> Spent {
        let Ok(mut spent) = self.spent.lock() else {
            return Spent::default().rolled(now);
        };
        let entry = spent.entry(Arc::clone(name)).or_default();
        let before = entry.rolled(now);
        *entry = before;
        if admit(&before) {
            entry.minute_requests += 1;
            self.dirty.store(true, Ordering::Relaxed);
        }
        before
    }

    /// Adds what an answer of `name` used to this minute, day and month.
    pub(crate) fn add(&self, name: &Arc<str>, charge: Charge, now: Periods) {
        if charge == Charge::default() {
            return;
        }
        if let Some(spend) = &self.shared {
            spend.add(name, now.numbers(), charge.tokens, charge.pico_usd);
            return;
        }
        let Ok(mut spent) = self.spent.lock() else {
            return;
        };
        let entry = spent.entry(Arc::clone(name)).or_default();
        let mut rolled = entry.rolled(now);
        rolled.minute_tokens = rolled.minute_tokens.saturating_add(charge.tokens);
        rolled.day_tokens = rolled.day_tokens.saturating_add(charge.tokens);
        rolled.month_tokens = rolled.month_tokens.saturating_add(charge.tokens);
        rolled.day_pico_usd = rolled.day_pico_usd.saturating_add(charge.pico_usd);
        rolled.month_pico_usd = rolled.month_pico_usd.saturating_add(charge.pico_usd);
        *entry = rolled;
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Writes the counts to the state file if they changed since it was last written.
    pub(crate) fn flush(&self) {
        let Some(file) = &self.file else {
            return;
        };
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return;
        }
        let snapshot = match self.spent.lock() {
            Ok(spent) => spent.clone(),
            Err(_) => return,
        };
        if let Err(err) = file.write(&snapshot) {
            // Try again on the next tick.
            self.dirty.store(true, Ordering::Release);
            tracing::warn!("cannot write limits.state_file: {err}");
        }
    }
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("kept_in_store", &self.shared.is_some())
            .field("kept_in_file", &self.file.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(text: &str) -> Periods {
        let (date, time) = text.split_once('T').unwrap();
        let mut fields = date.split('-').map(|f| f.parse::<u32>().unwrap());
        let (y, m, d) = (
            fields.next().unwrap(),
            fields.next().unwrap(),
            fields.next().unwrap(),
        );
        let days = crate::config::days_from_civil(y as i32, m, d) as u64;
        let mut hms = time.split(':').map(|f| f.parse::<u64>().unwrap());
        let secs = days * 86_400
            + hms.next().unwrap() * 3600
            + hms.next().unwrap() * 60
            + hms.next().unwrap();
        Periods::at(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn rfc3339_writes_utc_dates() {
        assert_eq!(rfc3339(1_806_537_600), "2027-04-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_399), "2000-02-28T23:59:59Z");
        assert_eq!(rfc3339(951_868_800), "2000-03-01T00:00:00Z");
    }

    #[test]
    fn periods_end_at_the_next_utc_minute_day_and_month() {
        let now = at("2027-12-31T23:59:30");
        let (minute, day, month) = now.ends();
        assert_eq!(minute, at("2028-01-01T00:00:00").minute * 60);
        assert_eq!(day, at("2028-01-01T00:00:00").day * 86_400);
        assert_eq!(month, day);
        assert_eq!(at("2028-02-29T12:00:00").month, 2028 * 12 + 1);
        let (_, _, month) = at("2028-02-29T12:00:00").ends();
        assert_eq!(month, at("2028-03-01T00:00:00").day * 86_400);
    }

    #[test]
    fn counts_of_a_passed_period_read_as_zero() {
        let ledger = Ledger::in_memory();
        let alice: Arc<str> = Arc::from("alice");
        let charge = Charge {
            tokens: 8,
            pico_usd: 100,
        };
        ledger.add(&alice, charge, at("2027-03-31T23:59:59"));
        let same_minute = ledger.spent("alice", at("2027-03-31T23:59:59"));
        assert_eq!(
            (same_minute.minute_tokens, same_minute.month_pico_usd),
            (8, 100)
        );
        let next_day = ledger.spent("alice", at("2027-04-01T00:00:01"));
        assert_eq!(
            next_day.minute_tokens + next_day.day_tokens + next_day.month_tokens,
            0
        );
        ledger.add(&alice, charge, at("2027-04-30T10:00:00"));
        ledger.add(&alice, charge, at("2027-04-30T10:05:00"));
        let later = ledger.spent("alice", at("2027-04-30T10:05:30"));
        assert_eq!(
            (later.minute_tokens, later.day_tokens, later.month_tokens),
            (8, 16, 16)
        );
    }
}
