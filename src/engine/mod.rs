//! Downstream engines: they read requests off the wire, hand them to the pipeline, and write
//! its answers back. They parse and write the wire, nothing else.
//!
//! - [`server`]: the accept loop, TLS, and which engine serves a connection; graceful
//!   shutdown.
//! - [`fast`]: the gateway's own HTTP/1 engine, for plain HTTP/1.1 requests to routes without
//!   path parameters; the first request it does not take goes to hyper with the connection.
//! - [`hyper`] and [`gateway`]: hyper for HTTP/1.1, HTTP/2, TLS and upgrades, behind poem's
//!   router, with the gateway's own endpoints and [`cors`].

pub(crate) mod cors;
pub(crate) mod fast;
pub(crate) mod gateway;
pub(crate) mod hyper;
pub mod server;
pub(crate) mod tls;

use std::sync::Arc;

use arc_swap::ArcSwap;
use poem::endpoint::BoxEndpoint;
use poem::Response;

use crate::observe::metrics::Metrics;
use crate::realtime::Sessions;

/// What one worker serves one manifest with.
pub(crate) struct Worker {
    /// Everything, through poem's router.
    pub(crate) endpoint: BoxEndpoint<'static, Response>,
    /// The fast engine's routes (`None` with `server.fast_lane = false`).
    pub(crate) fast: Option<Arc<fast::Routes>>,
}

/// The manifest each worker serves now, swapped whole on reload (requests in flight keep the
/// one they started with), and the state the server reports to. Opaque outside the crate:
/// what [`crate::App::serving`] hands to [`server::serve`].
pub struct Serving {
    workers: Vec<ArcSwap<Worker>>,
    pub(crate) sessions: Sessions,
    pub(crate) metrics: Arc<Metrics>,
}

impl Serving {
    pub(crate) fn new(workers: Vec<Worker>, sessions: Sessions, metrics: Arc<Metrics>) -> Serving {
        Serving {
            workers: workers.into_iter().map(ArcSwap::from_pointee).collect(),
            sessions,
            metrics,
        }
    }

    /// What `worker`'s new requests are served with.
    pub(crate) fn worker(&self, worker: usize) -> Arc<Worker> {
        self.workers[worker % self.workers.len()].load_full()
    }

    /// The fast engine's routes of the manifest loaded now, for `worker`.
    pub(crate) fn fast(&self, worker: usize) -> Option<Arc<fast::Routes>> {
        self.workers[worker % self.workers.len()]
            .load()
            .fast
            .clone()
    }

    pub(crate) fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Serves `workers` (one per worker, in order) from now on.
    pub(crate) fn swap(&self, workers: Vec<Worker>) {
        for (slot, worker) in self.workers.iter().zip(workers) {
            slot.store(Arc::new(worker));
        }
    }
}
