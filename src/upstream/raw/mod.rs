//! The raw HTTP/1 transport: for a plain `http://` upstream reached without a proxy, a request
//! whose body is already whole goes out in one `writev` on a pooled connection, and its answer
//! is read in place, the head kept as it arrived and the body handed on chunk by chunk.
//!
//! Why: hyper's pooled client spends as much user time on a request as all of nginx does
//! (one task per connection, a channel between it and the request, a header map each way);
//! here the request's own task reads and writes the connection it holds.

mod body;
mod pool;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Method, Uri};
use tokio::time::Instant;

use super::connect::{BoxError, Connector};
use super::{SendError, Stage};
use crate::http1::{self, make_room, write_two, BadResponse, ResponseHead};
pub use body::RawBody;
use pool::{Connection, Pool};

/// The read buffer a new connection starts with, and the room each read makes.
const BUFFER: usize = 8 * 1024;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Requests to one plain-HTTP upstream on this worker's pooled connections.
pub struct Raw {
    /// Where new connections go.
    dst: Uri,
    connector: Connector,
    pool: Arc<Pool>,
}

impl Raw {
    pub fn new(dst: Uri, connector: Connector) -> Raw {
        Raw {
            dst,
            connector,
            pool: Arc::default(),
        }
    }

    /// Writes the request and reads the answer's head; the body follows in [`RawBody`].
    pub async fn send(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<(ResponseHead, RawBody), SendError> {
        let mut connection = self.write_request(method, target, headers, body).await?;
        let head = read_head(&mut connection)
            .await
            .map_err(|source| SendError::new(Stage::Exchange, source))?;
        tracing::trace!(status = head.status.as_u16(), framing = ?head.framing, "raw transport: response head");
        let body = RawBody::new(connection, &head, Arc::clone(&self.pool), Instant::now());
        Ok((head, body))
    }

    /// Writes the request on a pooled connection, or a new one. A pooled connection that
    /// turns out closed when written to is replaced once: the upstream saw nothing.
    async fn write_request(
        &self,
        method: &Method,
        target: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Connection, SendError> {
        if let Some(mut pooled) = self.pool.checkout(Instant::now()) {
            put_head(&mut pooled, method, target, headers, body);
            let written = write_two(&pooled.stream, &pooled.buf, body).await;
            pooled.buf.clear();
            match written {
                Ok(()) => {
                    tracing::trace!("raw transport: request sent on a pooled connection");
                    return Ok(pooled);
                }
                Err(err) => {
                    tracing::trace!(error = %err, "raw transport: pooled connection closed; connecting");
                }
            }
        }
        let stream = self
            .connector
            .tcp(&self.dst)
            .await
            .map_err(|source| SendError::new(Stage::Connect, source))?;
        let mut fresh = Connection {
            stream,
            buf: BytesMut::with_capacity(BUFFER),
        };
        put_head(&mut fresh, method, target, headers, body);
        let written = write_two(&fresh.stream, &fresh.buf, body).await;
        fresh.buf.clear();
        written.map_err(|err| SendError::new(Stage::Exchange, Box::new(err)))?;
        tracing::trace!("raw transport: request sent on a new connection");
        Ok(fresh)
    }
}

/// Puts the request head in the connection's buffer, which is empty between exchanges.
fn put_head(
    connection: &mut Connection,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body: &Bytes,
) {
    connection.buf.clear();
    http1::write_request_head(&mut connection.buf, method, target, headers, body.len());
}

/// Reads the answer's head off the connection, skipping interim (1xx) answers.
async fn read_head(connection: &mut Connection) -> Result<ResponseHead, BoxError> {
    loop {
        match http1::parse_response(&mut connection.buf)? {
            Some(head) if head.status.is_informational() => continue,
            Some(head) => return Ok(head),
            None if connection.buf.len() > MAX_RESPONSE_HEAD => {
                return Err(Box::new(BadResponse::TooLarge(MAX_RESPONSE_HEAD)))
            }
            None => {}
        }
        make_room(&mut connection.buf, BUFFER / 2);
        let read = tokio::io::AsyncReadExt::read_buf(&mut connection.stream, &mut connection.buf);
        if read.await? == 0 {
            return Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection before answering",
            )));
        }
    }
}
