//! The raw transport's idle connections: plain TCP to an `http://` upstream, kept per worker
//! and lent to one exchange at a time, which does its own reading and writing on them (no
//! connection task, no channel between the two).

use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::upstream::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE};

/// A connection with its read buffer, which goes back into the pool with it.
#[derive(Debug)]
pub struct Connection {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

/// The idle connections to one upstream.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    connection: Connection,
    since: Instant,
}

impl Pool {
    /// The most recently used idle connection that is still open, else `None`. `now` is the
    /// exchange's own clock reading.
    pub fn checkout(&self, now: Instant) -> Option<Connection> {
        let Ok(mut idle) = self.idle.lock() else {
            return None;
        };
        while let Some(entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < POOL_IDLE_TIMEOUT
                && still_open(&entry.connection.stream)
            {
                return Some(entry.connection);
            }
        }
        None
    }

    /// Puts a connection whose last answer was read whole back for the next exchange;
    /// `since` is when it last answered.
    pub fn checkin(&self, connection: Connection, since: Instant) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() >= POOL_MAX_IDLE {
                // The oldest goes: the newest are the warmest.
                idle.remove(0);
            }
            idle.push(Idle { connection, since });
        }
    }
}

/// Whether an idle connection can carry another request: the upstream has neither closed it
/// nor sent anything unasked. The event loop's readiness answers without a system call in
/// the usual case; only a connection marked readable is read to tell.
fn still_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
        }
    }
}
