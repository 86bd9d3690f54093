//! An answer's body read off a raw connection, as framed by the upstream (RFC 9112 §6.3):
//! handed on chunk by chunk as it arrives, sharing the connection's buffer. Once the body is
//! read whole, the connection goes back to the pool, before the client has even been sent
//! the last chunk.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::Stream;
use tokio::time::Instant;

use super::pool::{Connection, Pool};
use super::BUFFER;
use crate::http1::{make_room, Chunked, Framing, ResponseHead, Step};
use crate::upstream::connect::BoxError;

/// The upstream's answer body on a raw connection.
pub(crate) struct RawBody {
    /// `None` once the body is over (and the connection pooled or closed).
    connection: Option<Connection>,
    framing: Framing,
    /// Bytes left of a `Content-Length` body.
    remaining: u64,
    chunked: Chunked,
    /// The connection may carry another request once this body is read.
    reusable: bool,
    eof: bool,
    pool: Arc<Pool>,
    /// When the answer's head arrived: the connection's last sign of life for the pool.
    answered: Instant,
}

impl RawBody {
    pub(super) fn new(
        connection: Connection,
        head: &ResponseHead,
        pool: Arc<Pool>,
        answered: Instant,
    ) -> RawBody {
        let mut body = RawBody {
            connection: Some(connection),
            framing: head.framing,
            remaining: match head.framing {
                Framing::Length(len) => len,
                Framing::Empty | Framing::Chunked | Framing::UntilClose => 0,
            },
            chunked: Chunked::default(),
            reusable: head.reusable,
            eof: false,
            pool,
            answered,
        };
        if matches!(head.framing, Framing::Empty | Framing::Length(0)) {
            body.finish();
        }
        body
    }

    /// How the upstream delimits this body.
    pub(crate) fn framing(&self) -> Framing {
        self.framing
    }

    /// The body is over: the connection goes back to the pool when it can carry another
    /// request and nothing unasked followed the answer, else it is closed.
    fn finish(&mut self) {
        if let Some(connection) = self.connection.take() {
            if self.reusable && connection.buf.is_empty() {
                self.pool.checkin(connection, self.answered);
            }
        }
    }

    /// The next piece of the body in the buffer, if one is there; `Err` for a malformed
    /// chunk.
    fn next_in_buffer(&mut self) -> Result<Option<Bytes>, BoxError> {
        let Some(connection) = self.connection.as_mut() else {
            return Ok(None);
        };
        let buf = &mut connection.buf;
        match self.framing {
            Framing::Empty => Ok(None),
            Framing::Length(_) => {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                if take == 0 {
                    return Ok(None);
                }
                self.remaining -= take as u64;
                let data = buf.split_to(take).freeze();
                if self.remaining == 0 {
                    self.finish();
                }
                Ok(Some(data))
            }
            Framing::Chunked => match self.chunked.step(buf)? {
                Step::Data { skip, len } => {
                    buf.advance(skip);
                    Ok(Some(buf.split_to(len).freeze()))
                }
                // All of it was framing: more is needed.
                Step::More => {
                    buf.clear();
                    Ok(None)
                }
                Step::End { used } => {
                    buf.advance(used);
                    self.finish();
                    Ok(None)
                }
            },
            Framing::UntilClose if buf.is_empty() => Ok(None),
            Framing::UntilClose => Ok(Some(buf.split().freeze())),
        }
    }
}

impl Stream for RawBody {
    type Item = Result<Bytes, BoxError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            match this.next_in_buffer() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(data))),
                Ok(None) => {}
                Err(err) => {
                    this.connection = None;
                    return Poll::Ready(Some(Err(err)));
                }
            }
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            if this.eof {
                this.connection = None;
                return if this.framing == Framing::UntilClose {
                    Poll::Ready(None)
                } else {
                    // Closed before the body's end: the client must see it incomplete.
                    Poll::Ready(Some(Err(Box::new(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upstream closed the connection mid-body",
                    )))))
                };
            }
            make_room(&mut connection.buf, BUFFER);
            match connection.stream.poll_read_buf(cx, &mut connection.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => this.eof = true,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => {
                    this.connection = None;
                    return Poll::Ready(Some(Err(Box::new(err))));
                }
            }
        }
    }
}
