//! The gateway assembled from a manifest: for each worker, a pipeline (with its own upstream
//! connection pools) and the routes of both engines over it; swapped whole on reload; and the
//! state that outlives a reload (metrics, realtime sessions, the limiter's buckets, the
//! connection to the limits store).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use url::Url;

use crate::config::{AdmissionConfig, Config, ConfigError, LogConfig, ServerConfig, StoreConfig};
use crate::engine::gateway::{self, Docs, Status};
use crate::engine::{fast, Serving, Worker};
use crate::ledger::Ledger;
use crate::observe::metrics::Metrics;
use crate::pipeline::health::{Health, RetryBudget};
use crate::pipeline::keys::KeyPool;
use crate::pipeline::limits::Limiter;
use crate::pipeline::{Kept, Pipeline};
use crate::realtime::Sessions;
use crate::store::{Store, StoreMetrics};
use crate::upstream;

/// The pools of the keys the gateway holds, by mount name.
type Pools = Vec<(Arc<str>, Arc<KeyPool>)>;

/// The gateway, ready to serve.
pub struct App {
    /// What each worker serves with now.
    pub serving: Arc<Serving>,
    /// The limiter and the settings it was built for: a reload with the same `[limits]`
    /// keeps it, so buckets and in-flight counts carry over.
    limiter: Mutex<Option<(AdmissionConfig, Arc<Limiter>)>>,
    /// What named keys have spent, and where it is kept (a state file, or the store): a
    /// reload naming the same place keeps it.
    ledger: Mutex<Option<(Keeping, Arc<Ledger>)>>,
    /// The limits store (`limits.store`) while its settings stay the same.
    store: Mutex<Option<Arc<Store>>>,
    /// The pools of the keys the gateway holds, by mount: a reload that keeps a mount's keys
    /// keeps its pool, and so the rests of keys that drew a 429.
    key_pools: Mutex<Pools>,
    /// Each mount's run of failures, by name: a reload keeps it, and so an ejection.
    health: Mutex<Vec<(Arc<str>, Arc<Health>)>>,
    /// How many retries may go up, over every manifest.
    retry_budget: Arc<RetryBudget>,
    /// How many manifests have been loaded: 1 at start, one more per successful reload.
    generation: Arc<AtomicU64>,
    /// The `[server]` and `[log]` settings the process started with; they need a restart.
    server: ServerConfig,
    log: LogConfig,
    /// Where traces went at start (the exporter is made once): `tracing.otlp_endpoint`, and
    /// whether the `OTEL_EXPORTER_OTLP_*` variables turned them on.
    traces: (Option<Url>, bool),
}

/// Where the ledger keeps its counts; the store by identity, as a reload that keeps its
/// settings keeps its `Arc`.
#[derive(Debug, PartialEq, Eq)]
enum Keeping {
    Memory,
    File(PathBuf),
    Store(usize),
}

/// Builds the gateway from `config`, for one worker (tests, or a single runtime).
pub fn app(config: &Config) -> Result<Arc<App>, ConfigError> {
    app_for_workers(config, 1)
}

/// Builds the gateway from `config` with a pipeline per worker: each worker's requests use
/// its own upstream pools, so a request's tasks stay on one thread.
pub fn app_for_workers(config: &Config, workers: usize) -> Result<Arc<App>, ConfigError> {
    let metrics = Arc::new(Metrics::new(&config.metrics));
    let sessions = Sessions::default();
    let mut app = App {
        serving: Arc::new(Serving::new(Vec::new(), sessions, metrics)),
        limiter: Mutex::new(None),
        ledger: Mutex::new(None),
        store: Mutex::new(None),
        key_pools: Mutex::new(Vec::new()),
        health: Mutex::new(Vec::new()),
        retry_budget: Arc::new(RetryBudget::new()),
        generation: Arc::new(AtomicU64::new(1)),
        server: config.server.clone(),
        log: config.log.clone(),
        traces: (
            config.tracing.otlp_endpoint.clone(),
            config.tracing.otlp_from_environment,
        ),
    };
    let built = app.build_all(&Arc::new(config.clone()), workers.max(1))?;
    let Serving {
        sessions, metrics, ..
    } = match Arc::try_unwrap(app.serving) {
        Ok(serving) => serving,
        Err(_) => {
            return Err(ConfigError::Invalid(vec![
                "the gateway was shared while built".into(),
            ]))
        }
    };
    app.serving = Arc::new(Serving::new(built, sessions, metrics));
    Ok(Arc::new(app))
}

impl App {
    /// What the workers serve, for [`crate::server::serve`].
    pub fn serving(&self) -> Arc<Serving> {
        Arc::clone(&self.serving)
    }

    /// The metrics, which outlive reloads.
    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.serving.metrics
    }

    /// Counts a reload refused before [`App::reload`] saw it (a manifest that did not load).
    pub fn count_refused_reload(&self) {
        self.metrics().count_reload(false);
    }

    /// How many manifests have been loaded.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// Serves `config` from now on. Requests and streams already running finish on the
    /// manifest they started with. On error nothing changes. Settings that only apply at
    /// start-up (`[server]`, `[log]`, `tracing.otlp_endpoint`) are kept, with a warning when
    /// they differ.
    pub fn reload(&self, config: &Config) -> Result<(), ConfigError> {
        let traces = (
            config.tracing.otlp_endpoint.clone(),
            config.tracing.otlp_from_environment,
        );
        let mut config = Cow::Borrowed(config);
        if traces != self.traces {
            tracing::warn!(
                "tracing.otlp_endpoint changed in the manifest; it applies at the next restart"
            );
            let tracing = &mut config.to_mut().tracing;
            (tracing.otlp_endpoint, tracing.otlp_from_environment) = self.traces.clone();
        }
        let config = Arc::new(config.into_owned());
        // Every worker's pipeline is built before any is swapped: all or nothing.
        let result = self.build_all(&config, self.serving.workers());
        self.metrics().count_reload(result.is_ok());
        self.serving.swap(result?);
        self.metrics().configure(&config.metrics);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        if config.server != self.server {
            tracing::warn!(
                "[server] settings changed in the manifest; they apply at the next restart"
            );
        }
        if config.log != self.log {
            tracing::warn!(
                "[log] settings changed in the manifest; they apply at the next restart"
            );
        }
        tracing::info!(
            manifest = %config.source,
            routes = config.routes.len(),
            generation,
            "manifest reloaded"
        );
        Ok(())
    }

    /// What each of `workers` serves `config` with. The upstream TLS settings are read once
    /// (reading the system's roots costs milliseconds), and `/openapi.json` and `/docs` are
    /// shared by the workers.
    fn build_all(&self, config: &Arc<Config>, workers: usize) -> Result<Vec<Worker>, ConfigError> {
        let tls = upstream::tls::client_config()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        let docs = config.openapi.enabled.then(|| Docs::new(config));
        let store = self.store(config.limits.admission.store.as_ref())?;
        let pools = self.key_pools(config, store.as_ref())?;
        let store_kept = store.clone();
        let limiter = self.limiter(&config.limits.admission, store);
        let kept = Kept {
            limiter,
            ledger: self.ledger(config.limits.state_file.as_deref(), store_kept.as_ref())?,
            pools,
            health: self.health(config, store_kept.as_ref()),
            retry_budget: Arc::clone(&self.retry_budget),
        };
        (0..workers)
            .map(|_| self.build(config, &tls, docs.as_ref(), &kept))
            .collect()
    }

    /// A pool for each upstream whose keys the gateway holds, shared by the workers: the
    /// one already made for the same keys, else a new one. Fails closed: with the pools'
    /// state poisoned (a thread panicked holding it) the manifest is refused, and the one
    /// serving keeps its pools; a held-key mount never goes without its keys.
    fn key_pools(&self, config: &Config, store: Option<&Arc<Store>>) -> Result<Pools, ConfigError> {
        let Ok(mut kept) = self.key_pools.lock() else {
            return Err(ConfigError::Invalid(vec![
                "the keys the gateway holds: their state is poisoned (a thread panicked \
                 holding it); restart the gateway"
                    .to_owned(),
            ]));
        };
        let upstreams =
            std::iter::once(&config.upstream).chain(config.mounts.iter().map(|m| &m.upstream));
        let pools: Pools = upstreams
            .filter_map(|upstream| {
                let same = kept.iter().find(|(name, pool)| {
                    **name == *upstream.mount
                        && pool.made_from(upstream.credential_header, &upstream.keys, store)
                });
                let pool = match same {
                    Some((_, pool)) => Arc::clone(pool),
                    None => Arc::new(KeyPool::new(upstream, store)?),
                };
                Some((Arc::clone(&upstream.mount), pool))
            })
            .collect();
        kept.clone_from(&pools);
        Ok(pools)
    }

    /// Each mount's health, shared by the workers: the one a mount of the same name had
    /// (with the same store), else a new one. A poisoned lock only forgets past failures.
    fn health(&self, config: &Config, store: Option<&Arc<Store>>) -> Vec<(Arc<str>, Arc<Health>)> {
        let mut kept = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let upstreams =
            std::iter::once(&config.upstream).chain(config.mounts.iter().map(|m| &m.upstream));
        let health: Vec<_> = upstreams
            .map(|upstream| {
                let same = (kept.iter()).find(|(name, health)| {
                    **name == *upstream.mount && health.shares_through(store)
                });
                let health = match same {
                    Some((_, health)) => Arc::clone(health),
                    None => Arc::new(Health::new(&upstream.mount, store)),
                };
                (Arc::clone(&upstream.mount), health)
            })
            .collect();
        kept.clone_from(&health);
        health
    }

    fn build(
        &self,
        config: &Arc<Config>,
        tls: &rustls::ClientConfig,
        docs: Option<&Docs>,
        kept: &Kept,
    ) -> Result<Worker, ConfigError> {
        let metrics = &self.serving.metrics;
        let pipeline = Arc::new(Pipeline::new(
            config,
            Kept {
                limiter: Arc::clone(&kept.limiter),
                ledger: Arc::clone(&kept.ledger),
                pools: kept.pools.clone(),
                health: kept.health.clone(),
                retry_budget: Arc::clone(&kept.retry_budget),
            },
            Arc::clone(metrics),
            self.serving.sessions.clone(),
            tls,
        )?);
        let endpoints = pipeline.endpoints()?;
        let status = Status {
            generation: Arc::clone(&self.generation),
            sessions: self.serving.sessions.clone(),
        };
        Ok(Worker {
            endpoint: gateway::router(config, &pipeline, &endpoints, docs, metrics, status)?,
            fast: config
                .server
                .fast_lane
                .then(|| Arc::new(fast::Routes::new(&endpoints, config, metrics))),
        })
    }

    /// The limiter of `config`: the one already made for the same settings, else a new one
    /// (with `store`, when set).
    fn limiter(&self, config: &AdmissionConfig, store: Option<Arc<Store>>) -> Arc<Limiter> {
        let Ok(mut slot) = self.limiter.lock() else {
            return Arc::new(Limiter::new(config, store));
        };
        match &*slot {
            Some((built_for, limiter)) if built_for == config => Arc::clone(limiter),
            _ => {
                let limiter = Arc::new(Limiter::new(config, store));
                *slot = Some((config.clone(), Arc::clone(&limiter)));
                limiter
            }
        }
    }

    /// Writes named keys' counts to `limits.state_file` now, if they changed: at shutdown,
    /// once every request has ended.
    pub fn flush_spend(&self) {
        if let Ok(slot) = self.ledger.lock() {
            if let Some((_, ledger)) = slot.as_ref() {
                ledger.flush();
            }
        }
    }

    /// The ledger kept in `store`, else in `state_file`: the one already made for the same
    /// place, else a new one (a state file that cannot be read or written refuses the
    /// manifest), else one in memory.
    fn ledger(
        &self,
        state_file: Option<&Path>,
        store: Option<&Arc<Store>>,
    ) -> Result<Arc<Ledger>, ConfigError> {
        let mut slot = self
            .ledger
            .lock()
            .map_err(|_| ConfigError::Invalid(vec!["limits.state_file: state poisoned".into()]))?;
        let keeping = match (store, state_file) {
            (Some(store), _) => Keeping::Store(Arc::as_ptr(store) as usize),
            (None, Some(path)) => Keeping::File(path.to_owned()),
            (None, None) => Keeping::Memory,
        };
        if let Some((_, ledger)) = slot.as_ref().filter(|(kept, _)| *kept == keeping) {
            return Ok(Arc::clone(ledger));
        }
        let ledger = match (store, state_file) {
            (Some(store), _) => Ledger::in_store(store.spend()),
            (None, Some(path)) => {
                Ledger::in_file(path).map_err(|err| ConfigError::Invalid(vec![err.to_string()]))?
            }
            (None, None) => Ledger::in_memory(),
        };
        *slot = Some((keeping, Arc::clone(&ledger)));
        Ok(ledger)
    }

    /// The store of `settings`: the one already connected with the same settings, else a
    /// new one; `None` without `limits.store`.
    fn store(&self, settings: Option<&StoreConfig>) -> Result<Option<Arc<Store>>, ConfigError> {
        let mut slot = self
            .store
            .lock()
            .map_err(|_| ConfigError::Invalid(vec!["limits.store: state poisoned".into()]))?;
        let Some(settings) = settings else {
            *slot = None;
            return Ok(None);
        };
        if let Some(store) = slot.as_ref().filter(|store| store.settings() == settings) {
            return Ok(Some(Arc::clone(store)));
        }
        let (errors, up) = self.metrics().limits_store();
        let store = Store::start(settings, StoreMetrics { errors, up })
            .map(Arc::new)
            .map_err(|err| ConfigError::Invalid(vec![err]))?;
        *slot = Some(Arc::clone(&store));
        Ok(Some(store))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::config::hash_line;

    const CLIENT_KEY: &str = "sk-client-key-NOT-FOR-UPSTREAM";
    const HELD_KEY: &str = "sk-held-by-the-gateway";

    /// An upstream that answers each request `{}` and sends every request head it reads.
    async fn recording_upstream() -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heads, seen) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let heads = heads.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = heads.send(String::from_utf8_lossy(&head).into_owned());
                    let answer =
                        "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";
                    let _ = socket.write_all(answer.as_bytes()).await;
                });
            }
        });
        (format!("http://{addr}"), seen)
    }

    /// A reload that meets the key pools' lock poisoned is refused, and the gateway keeps
    /// serving with its pools: the client's key never goes up, the held one does.
    #[tokio::test]
    async fn a_poisoned_key_pool_lock_fails_closed() {
        std::env::set_var("OA_TEST_POISONED_HELD", HELD_KEY);
        let (upstream, mut seen) = recording_upstream().await;
        let manifest = format!(
            "[upstream]\nbase_url = \"{upstream}\"\nkeys_env = [\"OA_TEST_POISONED_HELD\"]\n\
             [access]\nallowed_key_hashes = [\"{}\"]\n\
             [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n",
            hash_line(CLIENT_KEY)
        );
        let config = Config::from_manifest_str(&manifest).unwrap();
        let app = app(&config).unwrap();

        // A thread panics while it holds the pools' lock.
        std::thread::scope(|scope| {
            let holder = scope.spawn(|| {
                let _held = app.key_pools.lock();
                panic!("a thread panicked holding the key pools");
            });
            assert!(holder.join().is_err());
        });
        assert!(app.key_pools.is_poisoned());
        let refused = app.reload(&config).unwrap_err().to_string();
        assert!(refused.contains("poisoned"), "{refused}");

        let listener = crate::server::Listener::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr();
        let serving = app.serving();
        let settings = config.server.clone();
        tokio::spawn(crate::server::serve(
            listener,
            serving,
            std::future::pending(),
            settings,
        ));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let request = format!(
            "GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {CLIENT_KEY}\r\n\
             Connection: close\r\n\r\n"
        );
        client.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let head = seen.recv().await.unwrap();
        assert!(
            !head.contains(CLIENT_KEY),
            "the client's key went up:\n{head}"
        );
        assert!(head.contains(&format!("Bearer {HELD_KEY}")), "{head}");
    }
}
