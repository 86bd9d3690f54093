//! Admission: per-key and per-address request rates (token buckets), and caps on concurrent
//! requests, global and per key. All off unless set in `[limits]`.
//!
//! Without `limits.store` they are per gateway process, decided here from the head: several
//! replicas behind a load balancer each apply their own. With it they are shared through the
//! store ([`crate::store`]) and decided by one round trip when forwarding begins
//! ([`Limiter::settle`]); `limits.store_failure` says what happens while it cannot be reached.
//! Keys are tracked by their SHA-256, never stored as given.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::GatewayError;
use crate::config::{AdmissionConfig, StoreFailure};
use crate::store::{self, Lease, Store, Verdict};

/// The SHA-256 of a key.
pub(crate) type KeyHash = [u8; 32];

/// Holds a request's place under the concurrency caps until it is dropped (when its answer
/// has been delivered, or its WebSocket session has ended).
#[derive(Debug, Default)]
pub(crate) struct Admission {
    _global: Option<OwnedSemaphorePermit>,
    /// Boxed: a request carries its room only with `max_concurrent_per_key` set.
    _per_key: Option<Box<KeySlot>>,
    /// With a store: what to ask it ([`Limiter::settle`]), then the slots it leased. Boxed:
    /// without a store, every request would carry its room.
    place: Option<Box<Place>>,
}

/// A request's place in the store's limits.
#[derive(Debug)]
enum Place {
    /// Not asked yet: who asks.
    Ask { ip: Option<IpAddr>, key: KeyHash },
    /// Admitted, holding these slots (none when no cap is set).
    Held { _lease: Option<Lease> },
}

impl Admission {
    /// Whether the store has yet to be asked.
    pub(crate) fn is_pending(&self) -> bool {
        matches!(self.place.as_deref(), Some(Place::Ask { .. }))
    }
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

/// The limits of one `[limits]`: kept here, or in the store.
pub(crate) struct Limiter {
    config: AdmissionConfig,
    /// With `limits.store`: the rates and caps, there (`None` also when none is set).
    shared: Option<store::Limits>,
    /// The store, for `/ready`.
    store: Option<Arc<Store>>,
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
    /// The limits of `config`, in `store` when there is one.
    pub(crate) fn new(config: &AdmissionConfig, store: Option<Arc<Store>>) -> Limiter {
        let shared = store.as_ref().and_then(|store| {
            let settings = shared_settings(config);
            (settings != store::Settings::default()).then(|| store.limits(settings))
        });
        // What this process keeps itself: everything, unless a store keeps it.
        let here = match store {
            Some(_) => AdmissionConfig::default(),
            None => config.clone(),
        };
        Limiter {
            per_key_rate: here
                .requests_per_minute_per_key
                .map(|rate| governor::RateLimiter::keyed(quota(rate, here.burst))),
            per_ip_rate: here
                .requests_per_minute_per_ip
                .map(|rate| governor::RateLimiter::keyed(quota(rate, here.burst))),
            global: here
                .max_concurrent_requests
                .map(|n| Arc::new(Semaphore::new(n.get() as usize))),
            per_key_counts: Arc::default(),
            admitted: std::sync::atomic::AtomicU64::new(0),
            config: config.clone(),
            shared,
            store,
        }
    }

    /// The store limits and cool-downs are shared through, if any.
    pub(crate) fn store(&self) -> Option<&Store> {
        self.store.as_deref()
    }

    /// Admits a request from `ip` presenting the key hashed as `key_hash`, or says why not.
    /// With a store, the answer is pending until [`Limiter::settle`].
    pub(crate) fn admit(
        &self,
        ip: Option<IpAddr>,
        key_hash: &KeyHash,
    ) -> Result<Admission, GatewayError> {
        if self.shared.is_some() {
            return Ok(Admission {
                place: Some(Box::new(Place::Ask { ip, key: *key_hash })),
                ..Admission::default()
            });
        }
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
                Some(Box::new(KeySlot {
                    key: *key_hash,
                    counts: Arc::clone(&self.per_key_counts),
                }))
            }
            None => None,
        };
        Ok(Admission {
            _global: global,
            _per_key: per_key,
            ..Admission::default()
        })
    }

    /// Asks the store about an admission [`Limiter::admit`] left pending: one round trip.
    /// While the store is unreachable, `limits.store_failure` decides.
    pub(crate) async fn settle(&self, admission: &mut Admission) -> Result<(), GatewayError> {
        let (Some(shared), Some(place)) = (&self.shared, admission.place.as_deref_mut()) else {
            return Ok(());
        };
        let Place::Ask { ip, key } = *place else {
            return Ok(());
        };
        let config = &self.config;
        match shared.admit(ip, &key).await {
            Verdict::Admitted(lease) => {
                *place = Place::Held { _lease: lease };
                Ok(())
            }
            Verdict::AddressRate(wait) => Err(rate_limited(
                "limits.requests_per_minute_per_ip",
                config.requests_per_minute_per_ip,
                wait,
            )),
            Verdict::KeyRate(wait) => Err(rate_limited(
                "limits.requests_per_minute_per_key",
                config.requests_per_minute_per_key,
                wait,
            )),
            Verdict::AllBusy => Err(GatewayError::TooBusy {
                setting: "limits.max_concurrent_requests",
                limit: config.max_concurrent_requests.map_or(0, NonZeroU32::get),
            }),
            Verdict::KeyBusy => Err(GatewayError::TooBusy {
                setting: "limits.max_concurrent_per_key",
                limit: config.max_concurrent_per_key.map_or(0, NonZeroU32::get),
            }),
            Verdict::Unavailable => match shared.store().settings().failure {
                StoreFailure::Open => {
                    shared.serving_without();
                    Ok(())
                }
                StoreFailure::Closed => Err(GatewayError::StoreUnavailable),
            },
        }
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

/// The store's form of `config`'s rates and caps.
fn shared_settings(config: &AdmissionConfig) -> store::Settings {
    let burst = config.burst;
    let rate = |per_minute: Option<NonZeroU32>| {
        per_minute.map(|per_minute| store::Rate {
            interval: Duration::from_secs(60) / per_minute.get(),
            burst: burst.unwrap_or(per_minute).get(),
        })
    };
    store::Settings {
        per_ip: rate(config.requests_per_minute_per_ip),
        per_key: rate(config.requests_per_minute_per_key),
        cap_all: config.max_concurrent_requests.map(NonZeroU32::get),
        cap_per_key: config.max_concurrent_per_key.map(NonZeroU32::get),
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
        let limiter = Limiter::new(
            &AdmissionConfig {
                requests_per_minute_per_key: n(60),
                burst: n(2),
                ..AdmissionConfig::default()
            },
            None,
        );
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
        let limiter = Limiter::new(
            &AdmissionConfig {
                max_concurrent_per_key: n(1),
                max_concurrent_requests: n(2),
                ..AdmissionConfig::default()
            },
            None,
        );
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
