//! The shared store (`[limits] store`): a Redis that replicas keep their limits, concurrency
//! leases, held keys' cool-downs and named keys' spend in, so a limit means the same with one
//! replica or ten.
//!
//! It holds mechanism only: scripts, leases, health. What a refusal means to a client is the
//! pipeline's ([`crate::pipeline::limits`]). Only hashes and addresses go to Redis, never a
//! key.
//!
//! Each thread that calls the store has one multiplexed connection of its own (the `redis`
//! crate's `ConnectionManager`, which reconnects by itself), made on its first call: a
//! request's round trip never leaves its worker's thread, and Redis answers in order on one
//! socket, so a pool would add sockets, not throughput. The background work (health checks,
//! lease renewal, releases, cool-down sync) runs on a thread of its own, which ends when the
//! [`Store`] is dropped.

mod deadlines;
mod health;
mod limits;
mod spend;

use std::cell::RefCell;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};

use crate::config::StoreConfig;
pub(crate) use deadlines::{ejection_name, name as deadline_name, Deadlines};
pub(crate) use limits::{Lease, Limits, Rate, Settings, Verdict};
pub(crate) use spend::{Counts, PeriodNumbers, Spend, SpendVerdict};

/// What every Redis key of the gateway starts with.
const PREFIX: &str = "oa-bypass:";
/// How often a warning about serving without shared limits may be logged.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The store's counters on `/metrics`.
#[derive(Clone, Default)]
pub(crate) struct StoreMetrics {
    /// Calls that failed or timed out.
    pub errors: Counter,
    /// 1 while the store answers.
    pub up: Gauge,
}

/// A handle on the store; the background thread stops when the last one is dropped.
pub(crate) struct Store {
    shared: Arc<Shared>,
    /// Dropped with the store: its thread's runtime then ends.
    _stop: oneshot::Sender<()>,
}

/// What the handle and the background tasks share.
struct Shared {
    settings: StoreConfig,
    /// What each thread's connection is made from.
    client: redis::Client,
    connection: ConnectionManagerConfig,
    /// Whether the last call or health check got an answer: while not, requests do not wait
    /// on the store at all (the failure policy answers for it).
    up: AtomicBool,
    metrics: StoreMetrics,
    /// Unix milliseconds of the last "serving without shared limits" warning.
    warned_at: AtomicU64,
    /// This process's name for its leases: unique per start.
    instance: String,
    /// Leases held now, renewed while they live.
    leases: limits::Held,
    /// Fire-and-forget writes (releases, cool-downs), done in order by the background thread.
    writes: mpsc::UnboundedSender<Write>,
    /// Cool-down cells to keep in step with the store.
    deadlines: Mutex<Vec<std::sync::Weak<Deadlines>>>,
}

/// A write nobody waits for.
enum Write {
    Release(limits::LeaseKeys),
    Deadline {
        name: String,
        until_ms: u64,
    },
    /// What one answer of a named key spent.
    Spend {
        hashes: [String; 3],
        tokens: u64,
        pico_usd: u64,
    },
}

impl Store {
    /// Connects to the store of `settings`, or starts without it, down (the health check
    /// reconnects). Fails only when the URL cannot be used at all.
    pub(crate) fn start(settings: &StoreConfig, metrics: StoreMetrics) -> Result<Store, String> {
        let client = redis::Client::open(settings.url.as_str())
            .map_err(|err| format!("limits.store: {} cannot be used: {err}", settings.shown()))?;
        // rediss:// needs a process-wide TLS provider; the gateway's is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|err| format!("limits.store: cannot start its event loop: {err}"))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(settings.timeout.max(health::PING_TIMEOUT)))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let (writes, queued) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            client,
            connection: config,
            up: AtomicBool::new(false),
            metrics,
            warned_at: AtomicU64::new(0),
            instance: instance_name(),
            leases: limits::Held::default(),
            writes,
            deadlines: Mutex::default(),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let (checked, first_check) = std::sync::mpsc::channel();
        let background = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("oa-bypass-store".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    // The first check before serving, so a reachable store is up from the
                    // first request.
                    health::check(&background).await;
                    let _ = checked.send(());
                    tokio::select! {
                        _ = stopped => {}
                        () = health::watch(Arc::clone(&background)) => {}
                        () = limits::renew(Arc::clone(&background)) => {}
                        () = deadlines::sync(Arc::clone(&background)) => {}
                        () = write_all(&background, queued) => {}
                    }
                });
            })
            .map_err(|err| format!("limits.store: cannot start its thread: {err}"))?;
        // Bounded by the check's own timeout; a thread that never reports starts it down.
        let _ = first_check.recv_timeout(health::PING_TIMEOUT * 2);
        if !shared.up.load(Ordering::Relaxed) {
            tracing::warn!(
                store = %settings.shown(),
                policy = settings.failure.as_str(),
                "limits.store does not answer at start; limits.store_failure applies until it does"
            );
        }
        Ok(Store {
            shared,
            _stop: stop,
        })
    }

    /// Whether the store answers now: what `/ready` reports.
    pub(crate) fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Relaxed)
    }

    /// The settings it was started with.
    pub(crate) fn settings(&self) -> &StoreConfig {
        &self.shared.settings
    }

    /// The shared rate limits and caps of `limits`, asked of this store.
    pub(crate) fn limits(self: &Arc<Self>, limits: limits::Settings) -> Limits {
        Limits::new(Arc::clone(self), limits)
    }

    /// Named keys' counts, kept in this store.
    pub(crate) fn spend(self: &Arc<Self>) -> Spend {
        Spend::new(Arc::clone(self))
    }

    /// Cells for the cool-downs named `names`, kept in step with the other replicas.
    pub(crate) fn deadlines(&self, names: Vec<String>) -> Arc<Deadlines> {
        let cells = Arc::new(Deadlines::new(names));
        if let Ok(mut all) = self.shared.deadlines.lock() {
            all.retain(|cell| cell.strong_count() > 0);
            all.push(Arc::downgrade(&cells));
        }
        cells
    }

    /// Records that `name` rests for `rest` from now, for the others.
    pub(crate) fn publish_deadline(&self, name: &str, rest: Duration) {
        let _ = self.shared.writes.send(Write::Deadline {
            name: name.to_owned(),
            until_ms: unix_ms().saturating_add(millis(rest)),
        });
    }
}

thread_local! {
    /// This thread's connection to each store in use.
    static CONNECTIONS: RefCell<Vec<(Weak<Shared>, ConnectionManager)>> =
        const { RefCell::new(Vec::new()) };
}

impl Shared {
    /// This thread's connection, and whether it is new: made on the thread's first call
    /// (inside its event loop, which then drives it). `None` only if the crate refuses.
    fn connection(self: &Arc<Self>) -> Option<(ConnectionManager, bool)> {
        CONNECTIONS.with(|made| {
            let mut made = made.borrow_mut();
            let mine = made.iter().find(|(of, _)| of.as_ptr() == Arc::as_ptr(self));
            if let Some((_, connection)) = mine {
                return Some((connection.clone(), false));
            }
            // Those of stores dropped since (a reload that changed `limits.store`) go.
            made.retain(|(of, _)| of.strong_count() > 0);
            let client = self.client.clone();
            let connection =
                ConnectionManager::new_lazy_with_config(client, self.connection.clone()).ok()?;
            made.push((Arc::downgrade(self), connection.clone()));
            Some((connection, true))
        })
    }

    /// One call to the store within `store_timeout`; a failure marks the store down, so the
    /// requests after this one do not wait on it.
    async fn call<T, F>(self: &Arc<Self>, call: impl FnOnce(ConnectionManager) -> F) -> Option<T>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        if !self.up.load(Ordering::Relaxed) {
            return None;
        }
        let Some((connection, new)) = self.connection() else {
            self.fail("cannot make a connection");
            return None;
        };
        // A new connection's first call also connects: it may take the connect timeout.
        let timeout = if new {
            health::PING_TIMEOUT
        } else {
            self.settings.timeout
        };
        let outcome = tokio::time::timeout(timeout, call(connection)).await;
        match outcome {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                self.fail(&err.to_string());
                None
            }
            Err(_) => {
                self.fail("no answer within limits.store_timeout");
                None
            }
        }
    }

    /// Counts a failed call and, the first time, says the store is down.
    fn fail(&self, why: &str) {
        self.metrics.errors.inc();
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.up.set(0);
            tracing::warn!(
                store = %self.settings.shown(),
                error = why,
                policy = self.settings.failure.as_str(),
                "limits.store unreachable; limits.store_failure applies until it answers"
            );
        }
    }

    /// While the store is down under `store_failure = "open"`: a warning at most every
    /// [`WARN_EVERY`].
    fn warn_open(&self) {
        let now = unix_ms();
        let last = self.warned_at.load(Ordering::Relaxed);
        if now.saturating_sub(last) < millis(WARN_EVERY) {
            return;
        }
        if self
            .warned_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            tracing::warn!(
                store = %self.settings.shown(),
                "limits.store unreachable: serving without shared limits (limits.store_failure = \"open\")"
            );
        }
    }
}

/// Does the writes nobody waits for, in the order they were made. One that fails is left:
/// leases expire by themselves, a cool-down is also kept by the replica that set it, and
/// spend the store missed while down is lost (the docs say so).
async fn write_all(shared: &Arc<Shared>, mut queued: mpsc::UnboundedReceiver<Write>) {
    while let Some(first) = queued.recv().await {
        let mut pipe = redis::pipe();
        let mut next = Some(first);
        // Whatever else is queued goes in the same round trip.
        while let Some(write) = next.take().or_else(|| queued.try_recv().ok()) {
            match write {
                Write::Release(keys) => keys.release(&mut pipe),
                Write::Deadline { name, until_ms } => {
                    deadlines::publish(&mut pipe, &name, until_ms, unix_ms());
                }
                Write::Spend {
                    hashes,
                    tokens,
                    pico_usd,
                } => spend::add(&mut pipe, &hashes, tokens, pico_usd),
            }
            if pipe.len() >= 512 {
                break;
            }
        }
        let _: Option<()> = shared
            .call(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await;
    }
}

/// A name no other process of this start shares: process id and start time.
fn instance_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    format!("{:x}-{:x}", std::process::id(), nanos)
}

/// Now, in Unix milliseconds: the clock [`Deadlines`] are kept in.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
