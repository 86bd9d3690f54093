//! The raw transport's idle connections to one upstream (plain TCP, or TLS over it), kept per
//! worker and lent to one exchange at a time, which does its own reading and writing on them
//! (no connection task, no channel between the two).

use std::sync::Mutex;

use bytes::BytesMut;
use tokio::time::Instant;

use super::wire::Wire;

use crate::upstream::POOL_IDLE_TIMEOUT;

/// A connection with its read buffer, which goes back into the pool with it.
#[derive(Debug)]
pub(super) struct Connection {
    pub stream: Wire,
    pub buf: BytesMut,
}

/// The idle connections to one upstream.
#[derive(Debug)]
pub(super) struct Pool {
    idle: Mutex<Vec<Idle>>,
    /// `upstream.max_idle_connections`.
    max_idle: usize,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

impl Pool {
    pub(super) fn new(max_idle: usize) -> Pool {
        Pool {
            idle: Mutex::default(),
            max_idle,
        }
    }

    /// The most recently used idle connection that is still open, else `None`. `now` is the
    /// exchange's own clock reading.
    pub(super) fn checkout(&self, now: Instant) -> Option<Connection> {
        let Ok(mut idle) = self.idle.lock() else {
            return None;
        };
        while let Some(mut entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < POOL_IDLE_TIMEOUT
                && entry.connection.stream.still_open()
            {
                return Some(entry.connection);
            }
        }
        None
    }

    /// Puts a connection whose last answer was read whole back for the next exchange;
    /// `since` is when it last answered.
    pub(super) fn checkin(&self, connection: Connection, since: Instant) {
        if self.max_idle == 0 {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() >= self.max_idle {
                // The oldest goes: the newest are the warmest.
                idle.remove(0);
            }
            idle.push(Idle { connection, since });
        }
    }
}
