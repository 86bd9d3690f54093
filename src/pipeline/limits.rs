//! Admission: per-key and per-address request rates (token buckets), and caps on concurrent
//! requests, global and per key. All off unless set in `[limits]`.
//!
//! Limits are per gateway process: several replicas behind a load balancer each apply their
//! own. Keys are tracked by their SHA-256, never stored as given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::GatewayError;
use crate::config::AdmissionConfig;

/// The SHA-256 of a key.
pub type KeyHash = [u8; 32];

/// Holds a request's place under the concurrency caps until it is dropped (when its answer
/// has been delivered, or its WebSocket session has ended).
#[derive(Debug, Default)]
pub struct Admission {
    _global: Option<OwnedSemaphorePermit>,
    _per_key: Option<KeySlot>,
}

#[derive(Debug)]
struct KeySlot {
    key: KeyHash,
    counts: Arc<Mutex<HashMap<KeyHash, u32>>>,
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.counts.lock() {
            if let Some(count) = counts.get_mut(&self.key) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&self.key);
                }
            }
        }
    }
}

pub struct Limiter {
    config: AdmissionConfig,
    /// Admissions so far, to forget idle rate buckets now and then.
    admitted: std::sync::atomic::AtomicU64,
    per_key_rate: Option<DefaultKeyedRateLimiter<KeyHash>>,
    per_ip_rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    global: Option<Arc<Semaphore>>,
    per_key_counts: Arc<Mutex<HashMap<KeyHash, u32>>>,
}

fn quota(per_minute: NonZeroU32, burst: Option<NonZeroU32>) -> Quota {
    Quota::per_minute(per_minute).allow_burst(burst.unwrap_or(per_minute))
}

impl Limiter {
    pub fn new(config: &AdmissionConfig) -> Limiter {
        Limiter {
            per_key_rate: config
                .requests_per_minute_per_key
                .map(|rate| governor::RateLimiter::keyed(quota(rate, config.burst))),
            per_ip_rate: config
                .requests_per_minute_per_ip
                .map(|rate| governor::RateLimiter::keyed(quota(rate, config.burst))),
            global: config
                .max_concurrent_requests
                .map(|n| Arc::new(Semaphore::new(n.get() as usize))),
            per_key_counts: Arc::default(),
            admitted: std::sync::atomic::AtomicU64::new(0),
            config: config.clone(),
        }
    }

    /// Admits a request from `ip` presenting the key hashed as `key_hash`, or says why not.
    pub fn admit(&self, ip: Option<IpAddr>, key_hash: &KeyHash) -> Result<Admission, GatewayError> {
        let count = self
            .admitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if count % 4096 == 4095 {
            self.shrink();
        }
        if let (Some(limiter), Some(ip)) = (&self.per_ip_rate, ip) {
            limiter.check_key(&ip).map_err(|not_until| {
                rate_limited(
                    "limits.requests_per_minute_per_ip",
                    self.config.requests_per_minute_per_ip,
                    not_until.wait_time_from(DefaultClock::default().now()),
                )
            })?;
        }
        if let Some(limiter) = &self.per_key_rate {
            limiter.check_key(key_hash).map_err(|not_until| {
                rate_limited(
                    "limits.requests_per_minute_per_key",
                    self.config.requests_per_minute_per_key,
                    not_until.wait_time_from(DefaultClock::default().now()),
                )
            })?;
        }
        let global = match &self.global {
            Some(semaphore) => Some(Arc::clone(semaphore).try_acquire_owned().map_err(|_| {
                GatewayError::TooBusy {
                    setting: "limits.max_concurrent_requests",
                    limit: self
                        .config
                        .max_concurrent_requests
                        .map_or(0, NonZeroU32::get),
                }
            })?),
            None => None,
        };
        let per_key = match self.config.max_concurrent_per_key {
            Some(cap) => {
                let mut counts = self
                    .per_key_counts
                    .lock()
                    .map_err(|_| GatewayError::Internal("admission state poisoned".into()))?;
                let count = counts.entry(*key_hash).or_insert(0);
                if *count >= cap.get() {
                    return Err(GatewayError::TooBusy {
                        setting: "limits.max_concurrent_per_key",
                        limit: cap.get(),
                    });
                }
                *count += 1;
                Some(KeySlot {
                    key: *key_hash,
                    counts: Arc::clone(&self.per_key_counts),
                })
            }
            None => None,
        };
        Ok(Admission {
            _global: global,
            _per_key: per_key,
        })
    }

    /// Forgets idle buckets, so memory follows active clients rather than all clients ever.
    fn shrink(&self) {
        if let Some(limiter) = &self.per_key_rate {
            limiter.retain_recent();
        }
        if let Some(limiter) = &self.per_ip_rate {
            limiter.retain_recent();
        }
    }
}

fn rate_limited(setting: &'static str, rate: Option<NonZeroU32>, wait: Duration) -> GatewayError {
    GatewayError::RateLimited {
        setting,
        per_minute: rate.map_or(0, NonZeroU32::get),
        retry_after: wait,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn key(text: &str) -> KeyHash {
        Sha256::digest(text.as_bytes()).into()
    }

    fn n(v: u32) -> Option<NonZeroU32> {
        NonZeroU32::new(v)
    }

    #[test]
    fn per_key_rate_allows_the_burst_then_refuses_with_a_wait() {
        let limiter = Limiter::new(&AdmissionConfig {
            requests_per_minute_per_key: n(60),
            burst: n(2),
            ..AdmissionConfig::default()
        });
        assert!(limiter.admit(None, &key("k1")).is_ok());
        assert!(limiter.admit(None, &key("k1")).is_ok());
        match limiter.admit(None, &key("k1")) {
            Err(GatewayError::RateLimited { retry_after, .. }) => {
                assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}")
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
        // Another key has its own bucket.
        assert!(limiter.admit(None, &key("k2")).is_ok());
    }

    #[test]
    fn concurrency_slots_free_when_admissions_drop() {
        let limiter = Limiter::new(&AdmissionConfig {
            max_concurrent_per_key: n(1),
            max_concurrent_requests: n(2),
            ..AdmissionConfig::default()
        });
        let first = limiter.admit(None, &key("k1")).unwrap();
        assert!(matches!(
            limiter.admit(None, &key("k1")),
            Err(GatewayError::TooBusy {
                setting: "limits.max_concurrent_per_key",
                ..
            })
        ));
        let second = limiter.admit(None, &key("k2")).unwrap();
        assert!(matches!(
            limiter.admit(None, &key("k3")),
            Err(GatewayError::TooBusy {
                setting: "limits.max_concurrent_requests",
                ..
            })
        ));
        drop(first);
        drop(second);
        assert!(limiter.admit(None, &key("k1")).is_ok());
        assert!(limiter.per_key_counts.lock().unwrap().is_empty());
    }
}
