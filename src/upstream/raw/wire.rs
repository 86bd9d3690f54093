//! A raw connection's byte stream: plain TCP to an `http://` upstream, or TLS over TCP to an
//! `https://` one that speaks HTTP/1.1 (`upstream.http2 = false`). The raw transport reads
//! and writes through this and nothing else, so HTTP/1 framing and pooling are one code for
//! both.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::http1;

/// The bytes of one raw connection, as the transport reads and writes them.
pub(super) enum Wire {
    Plain(TcpStream),
    /// Boxed: a TLS session's state is about a kilobyte, beside a TCP stream's few words.
    Tls(Box<TlsStream<TcpStream>>),
}

impl std::fmt::Debug for Wire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Wire::Plain(_) => "Wire::Plain",
            Wire::Tls(_) => "Wire::Tls",
        })
    }
}

impl Wire {
    /// Writes all of `first`, then all of `second`. Not an `async fn`: its future is the
    /// reference and the two slices (the request's future holds it).
    pub(super) fn write_two<'a>(
        &'a mut self,
        first: &'a [u8],
        second: &'a [u8],
    ) -> impl Future<Output = io::Result<()>> + 'a {
        let (mut first, mut second) = (first, second);
        std::future::poll_fn(move |cx| self.poll_write_two(cx, &mut first, &mut second))
    }

    /// [`Wire::write_two`] as a poll: `first` and `second` advance past what was written.
    fn poll_write_two(
        &mut self,
        cx: &mut Context<'_>,
        first: &mut &[u8],
        second: &mut &[u8],
    ) -> Poll<io::Result<()>> {
        match self {
            Wire::Plain(stream) => http1::poll_write_two(stream, cx, first, second),
            Wire::Tls(stream) => {
                // rustls seals what it is given into records and writes them out as it goes;
                // the flush sends what is left in its buffer.
                while !first.is_empty() || !second.is_empty() {
                    let bufs = [IoSlice::new(first), IoSlice::new(second)];
                    let n =
                        std::task::ready!(Pin::new(&mut **stream).poll_write_vectored(cx, &bufs))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                    }
                    http1::advance_two(first, second, n);
                }
                Pin::new(&mut **stream).poll_flush(cx)
            }
        }
    }

    /// Reads what has arrived into `buf`'s spare room: the number of bytes, 0 at the end.
    pub(super) fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
    ) -> Poll<io::Result<usize>> {
        match self {
            Wire::Plain(stream) => loop {
                std::task::ready!(stream.poll_read_ready(cx))?;
                match stream.try_read_buf(buf) {
                    // Readiness that was stale: polling again registers the waker.
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                    done => return Poll::Ready(done),
                }
            },
            Wire::Tls(stream) => tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf),
        }
    }

    /// [`Wire::poll_read_buf`] as a future. Not an `async fn`: its future is the two
    /// references and nothing more (the request's future holds it).
    pub(super) fn read_buf<'a>(
        &'a mut self,
        buf: &'a mut BytesMut,
    ) -> impl Future<Output = io::Result<usize>> + 'a {
        std::future::poll_fn(move |cx| self.poll_read_buf(cx, buf))
    }

    /// Whether an idle connection can carry another request: the upstream has neither closed
    /// it nor sent anything unasked. The event loop's readiness answers without a system call
    /// in the usual case; only a connection marked readable is read to tell. Over TLS, a
    /// record that carries no data (a session ticket) is taken in and the answer is still yes.
    pub(super) fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self {
            Wire::Plain(stream) => match stream.poll_read_ready(&mut cx) {
                Poll::Pending => true,
                Poll::Ready(Err(_)) => false,
                Poll::Ready(Ok(())) => {
                    let mut probe = [0u8; 1];
                    matches!(stream.try_read(&mut probe), Err(err) if err.kind() == io::ErrorKind::WouldBlock)
                }
            },
            Wire::Tls(stream) => {
                let mut probe = [0u8; 1];
                let mut probe = ReadBuf::new(&mut probe);
                matches!(
                    tokio::io::AsyncRead::poll_read(Pin::new(stream), &mut cx, &mut probe),
                    Poll::Pending
                )
            }
        }
    }
}
