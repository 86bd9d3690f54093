//! A raw connection's byte stream: plain TCP to an `http://` upstream, or TLS over TCP to an
//! `https://` one that speaks HTTP/1.1 (`upstream.http2 = false`). The raw transport reads
//! and writes through this and nothing else, so HTTP/1 framing and pooling are one code for
//! both.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::http1;

pub enum Wire {
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
    /// Writes `first` then `second`, all of both.
    pub async fn write_two(&mut self, first: &[u8], second: &[u8]) -> io::Result<()> {
        match self {
            Wire::Plain(stream) => http1::write_two(stream, first, second).await,
            Wire::Tls(stream) => {
                // rustls seals what it is given into records and writes them out on each
                // call; the flush makes sure nothing stays in its buffer.
                stream.write_all(first).await?;
                if !second.is_empty() {
                    stream.write_all(second).await?;
                }
                stream.flush().await
            }
        }
    }

    /// Reads what has arrived into `buf`'s spare room: the number of bytes, 0 at the end.
    pub fn poll_read_buf(
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

    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_buf(cx, buf)).await
    }

    /// Whether an idle connection can carry another request: the upstream has neither closed
    /// it nor sent anything unasked. The event loop's readiness answers without a system call
    /// in the usual case; only a connection marked readable is read to tell. Over TLS, a
    /// record that carries no data (a session ticket) is taken in and the answer is still yes.
    pub fn still_open(&mut self) -> bool {
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
