//! The raw HTTP/1 transport: for an upstream reached without a proxy over plain `http://`, or
//! over `https://` with `upstream.http2 = false`, a request whose body is already whole goes
//! out in one write on a pooled connection, and its answer is read in place, the head kept as
//! it arrived and the body handed on chunk by chunk.
//!
//! Why: hyper's pooled client spends as much user time on a request as all of nginx does
//! (one task per connection, a channel between it and the request, a header map each way);
//! here the request's own task reads and writes the connection it holds.

mod body;
mod pool;
mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::BytesMut;
use http::Uri;
use tokio::time::Instant;

use super::connect::{BoxError, Connector};
use super::{Outbound, SendError, Stage};
use crate::http1::{self, make_room, BadResponse, ResponseHead};
use crate::message::Body;
pub(super) use body::RawBody;
use pool::{Connection, Pool};
use wire::Wire;

/// The read buffer a new connection starts with, and the room each read makes.
const BUFFER: usize = 8 * 1024;
/// Largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// A body up to this size is copied behind the head and the two go in one `write`: for the
/// small JSON bodies most requests carry, the copy costs less than `writev`'s vector.
const COPY_BODY_UP_TO: usize = 16 * 1024;

/// Requests to one upstream on this worker's pooled HTTP/1.1 connections.
pub(super) struct Raw {
    /// Where new connections go: `http://` for TCP, `https://` for TLS over it.
    dst: Uri,
    connector: Connector,
    pool: Arc<Pool>,
}

impl Raw {
    /// Requests to `dst`, keeping at most `max_idle` idle connections.
    pub(super) fn new(dst: Uri, connector: Connector, max_idle: usize) -> Raw {
        Raw {
            dst,
            connector,
            pool: Arc::new(Pool::new(max_idle)),
        }
    }

    /// Writes the request and reads the answer's head; the body follows in [`RawBody`]. A
    /// pooled connection that turns out closed when written to is replaced once: the
    /// upstream saw nothing.
    pub(super) async fn send(
        &self,
        request: Outbound,
    ) -> Result<(ResponseHead, RawBody), SendError> {
        let Outbound {
            method,
            target,
            headers,
            body,
        } = request;
        let Body::Whole(body) = body else {
            let refused = "the raw transport takes only whole bodies";
            return Err(SendError::new(Stage::Exchange, refused.into()));
        };
        // The pooled connection's stream and buffer held apart: only the stream waits with
        // the request (a smaller future for every request).
        let (mut pooled, mut buf) = match self.pool.checkout(Instant::now()) {
            Some(connection) => (Some(connection.stream), connection.buf),
            None => (None, BytesMut::with_capacity(BUFFER)),
        };
        buf.clear();
        http1::write_request_head(&mut buf, &method, target.as_str(), &headers, body.len());
        // Why before any wait: many requests waiting at once (for a connection, then for
        // their answers) would each hold a header map, and the holes they leave behind stay
        // in the process's memory.
        drop(headers);
        let rest = if body.len() <= COPY_BODY_UP_TO {
            buf.extend_from_slice(&body);
            &[][..]
        } else {
            &body[..]
        };
        let stream = loop {
            let (mut stream, was_pooled) = match pooled.take() {
                Some(stream) => (stream, true),
                None => (self.connect().await?, false),
            };
            match stream.write_two(&buf, rest).await {
                Ok(()) => {
                    tracing::trace!(pooled = was_pooled, "raw transport: request sent");
                    break stream;
                }
                Err(err) if was_pooled => {
                    tracing::trace!(error = %err, "raw transport: pooled connection closed; connecting");
                }
                Err(err) => return Err(SendError::new(Stage::Exchange, Box::new(err))),
            }
        };
        drop(body);
        buf.clear();
        let mut connection = Connection { stream, buf };
        let head = read_head(&mut connection)
            .await
            .map_err(|source| SendError::new(Stage::Exchange, source))?;
        tracing::trace!(status = head.status.as_u16(), framing = ?head.framing, "raw transport: response head");
        let body = RawBody::new(connection, &head, Arc::clone(&self.pool), Instant::now());
        Ok((head, body))
    }

    /// A new connection to the upstream: TCP, then TLS (HTTP/1.1 only) for `https://`.
    async fn connect(&self) -> Result<Wire, SendError> {
        let tcp = self
            .connector
            .tcp(&self.dst)
            .await
            .map_err(|source| SendError::new(Stage::Connect, source))?;
        if self.dst.scheme_str() != Some("https") {
            return Ok(Wire::Plain(tcp));
        }
        self.handshake(tcp).await
    }

    /// TLS over `tcp`. Boxed: the handshake's state (a rustls session, about a kilobyte)
    /// would otherwise be part of every request's future, so of every open stream's task.
    fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> Pin<Box<dyn Future<Output = Result<Wire, SendError>> + Send + '_>> {
        Box::pin(async move {
            match self.connector.tls_http1(&self.dst, tcp).await {
                Ok(tls) => Ok(Wire::Tls(Box::new(tls))),
                Err(source) => Err(SendError::new(Stage::Connect, source)),
            }
        })
    }
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
        make_room(&mut connection.buf, BUFFER);
        if connection.stream.read_buf(&mut connection.buf).await? == 0 {
            return Err(Box::new(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the upstream closed the connection before answering",
            )));
        }
    }
}
