//! `[limits] store`: the Redis that replicas share their limits and key cool-downs through.

use std::fmt;
use std::time::Duration;

use url::Url;

use super::raw::RawLimits;
use super::units::format_duration;
use super::values::mask_url;

/// What admission does while the store cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFailure {
    /// Serve without the shared limits, with a warning now and then.
    Open,
    /// Refuse with 503 until the store is back.
    Closed,
}

impl StoreFailure {
    /// As `limits.store_failure` writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreFailure::Open => "open",
            StoreFailure::Closed => "closed",
        }
    }
}

/// The store's settings, validated. Its URL may carry a password: `Debug` and `describe`
/// mask it.
#[derive(Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// `redis://` or `rediss://`.
    pub url: Url,
    pub failure: StoreFailure,
    /// The longest a request waits for the store.
    pub timeout: Duration,
    /// How long a concurrency slot outlives a replica that stopped renewing it.
    pub lease: Duration,
}

impl StoreConfig {
    /// The URL with its password, if any, masked: what messages and `--check` show.
    pub fn shown(&self) -> String {
        mask_url(&self.url)
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.shown())
            .field("failure", &self.failure)
            .field("timeout", &self.timeout)
            .field("lease", &self.lease)
            .finish()
    }
}

/// `[limits] store`, `store_failure`, `store_timeout` and `store_lease`; `None` when no store
/// is set. Problems go to `problems`, named by key; the URL is never echoed (it may hold a
/// password).
pub(super) fn validate_store(raw: &RawLimits, problems: &mut Vec<String>) -> Option<StoreConfig> {
    let failure = match raw.store_failure.as_str() {
        "open" => StoreFailure::Open,
        "closed" => StoreFailure::Closed,
        other => {
            problems.push(format!(
                "limits.store_failure: {other:?} is not \"open\" (serve without shared limits \
                 while the store is unreachable) or \"closed\" (answer 503)"
            ));
            StoreFailure::Open
        }
    };
    let timeout = raw.store_timeout.0;
    if timeout.is_zero() || timeout > Duration::from_secs(10) {
        problems.push(format!(
            "limits.store_timeout: {} must be more than 0s and at most 10s",
            format_duration(timeout)
        ));
    }
    let lease = raw.store_lease.0;
    if lease < Duration::from_secs(1) || lease > Duration::from_secs(3600) {
        problems.push(format!(
            "limits.store_lease: {} must be between 1s and 1h",
            format_duration(lease)
        ));
    }
    let text = raw.store.trim();
    if text.is_empty() {
        return None;
    }
    let url = match Url::parse(text) {
        Ok(url) if matches!(url.scheme(), "redis" | "rediss") && url.has_host() => url,
        Ok(_) | Err(_) => {
            problems.push(
                "limits.store: not a Redis URL (like \"redis://redis:6379/0\", or \
                 \"rediss://…\" for TLS); the value is not shown, as it may hold a password"
                    .to_owned(),
            );
            return None;
        }
    };
    Some(StoreConfig {
        url,
        failure,
        timeout,
        lease,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_in_the_url_is_never_shown() {
        let raw = RawLimits {
            store: "redis://:hunter2@redis:6379/0".to_owned(),
            ..RawLimits::default()
        };
        let mut problems = Vec::new();
        let store = validate_store(&raw, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        let store = store.unwrap();
        assert_eq!(store.shown(), "redis://:****@redis:6379/0");
        assert!(!format!("{store:?}").contains("hunter2"));
        let bad = RawLimits {
            store: "http://:hunter2@redis".to_owned(),
            store_failure: "maybe".to_owned(),
            ..RawLimits::default()
        };
        validate_store(&bad, &mut problems);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|problem| !problem.contains("hunter2")));
    }
}
