//! The fast lane's upstream connections: plain TCP to an `http://` upstream, kept per worker
//! and handed to one exchange at a time, which does its own reading and writing on them (no
//! connection task, no channel between the two).

use std::io;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Idle connections kept per worker, and how long one may idle: as the hyper path's pool.
use super::super::{POOL_IDLE_TIMEOUT, POOL_MAX_IDLE};

/// Where the upstream is and the idle connections to it.
#[derive(Debug)]
pub struct Pool {
    /// `host:port`, resolved on each new connection.
    address: String,
    connect_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
}

#[derive(Debug)]
struct Idle {
    stream: TcpStream,
    since: Instant,
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    /// Not connected within this long (`upstream.connect_timeout`).
    TimedOut(Duration),
    Failed(io::Error),
}

impl Pool {
    pub fn new(address: String, connect_timeout: Duration) -> Pool {
        Pool {
            address,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The most recently used idle connection that is still open, else `None`. `now` is the
    /// exchange's own clock reading.
    pub fn checkout(&self, now: Instant) -> Option<TcpStream> {
        let Ok(mut idle) = self.idle.lock() else {
            return None;
        };
        while let Some(entry) = idle.pop() {
            if now.saturating_duration_since(entry.since) < POOL_IDLE_TIMEOUT
                && still_open(&entry.stream)
            {
                return Some(entry.stream);
            }
        }
        None
    }

    /// Puts a connection whose last response was read whole back for the next exchange;
    /// `since` is when it last answered.
    pub fn checkin(&self, stream: TcpStream, since: Instant) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() >= POOL_MAX_IDLE {
                // The oldest goes: the newest are the warmest.
                idle.remove(0);
            }
            idle.push(Idle { stream, since });
        }
    }

    /// A new connection, within `upstream.connect_timeout`.
    pub async fn connect(&self) -> Result<TcpStream, ConnectError> {
        let connecting = async {
            let mut last = None;
            for address in tokio::net::lookup_host(&self.address).await? {
                match TcpStream::connect(address).await {
                    Ok(stream) => {
                        // Events must leave the moment they are written.
                        let _ = stream.set_nodelay(true);
                        return Ok(stream);
                    }
                    Err(err) => last = Some(err),
                }
            }
            Err(last.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the upstream host has no address")
            }))
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(err)) => Err(ConnectError::Failed(err)),
            Err(_) => Err(ConnectError::TimedOut(self.connect_timeout)),
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
