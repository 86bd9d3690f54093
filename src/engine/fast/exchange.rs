//! One request in the fast engine: its head to the pipeline, its body read whole, its answer
//! written back as it arrives, while the client is watched for leaving.

use std::future::Future;
use std::task::Poll;

use bytes::{Buf, Bytes};
use futures_util::future::Either;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::{ClientConnection, Routes, MAX_AHEAD, SMALL_BUFFER};
use crate::http1::{self, make_room, write_two, Framing, RequestHead};
use crate::message::{Body, Head};
use crate::pipeline::{Admitted, Answer, Endpoint, Relay, Request, Timer};

/// Why the body could not be read.
enum Unread {
    /// The client went silent mid-body past `server.body_read_timeout`.
    Stalled,
    /// The client went away, or cannot be read: nothing to answer.
    ClientGone,
}

impl<'c> ClientConnection<'c> {
    /// One request, from its head to the last byte of its answer: the pipeline admits it
    /// or answers it here, before anything waits. The future returned tells whether the
    /// connection can carry another request.
    ///
    /// Why `fn`s returning `async move` blocks, one picked here: an `async fn` keeps each
    /// argument twice (as given, and moved into its body), and a `match` that awaits in its
    /// arms keeps what it matched on; every connection's task would hold those copies.
    pub(super) fn exchange<'f, 's>(
        &'f mut self,
        routes: &Routes,
        endpoint: &'f Endpoint,
        head: RequestHead,
        close: bool,
        timer: &'f mut Timer<'s>,
    ) -> impl Future<Output = bool> + use<'f, 'c, 's> {
        let body_len = head.body_len;
        let Some(target) = head.target_after(routes.secret_len()) else {
            return Either::Left(Either::Left(std::future::ready(false)));
        };
        let request = Request {
            method: head.method,
            target,
            headers: head.headers,
            peer: Some(self.remote),
            has_body: body_len > 0,
        };
        match endpoint.admit(request) {
            Err(refusal) => {
                let close = close || self.skip_unread(body_len);
                Either::Left(Either::Right(self.write_answer(refusal, close)))
            }
            Ok(admitted) => Either::Right(self.forward(admitted, body_len, close, timer)),
        }
    }

    /// An admitted request: its body read whole (one write then carries it upstream), the
    /// pipeline's forwarding of it while the client is watched, and the answer written.
    #[allow(clippy::manual_async_fn)] // See `exchange`: an `async fn` holds its arguments twice.
    fn forward<'f, 's>(
        &'f mut self,
        admitted: Admitted<'f>,
        body_len: u64,
        close: bool,
        timer: &'f mut Timer<'s>,
    ) -> impl Future<Output = bool> + use<'f, 'c, 's> {
        async move {
            let body = match self.read_body(body_len, admitted.body_idle(), timer).await {
                Ok(body) => body,
                Err(Unread::ClientGone) => return false,
                Err(Unread::Stalled) => {
                    self.skip_unread(body_len);
                    return self.write_answer(admitted.body_stalled(), true).await;
                }
            };
            // A client that leaves cancels the upstream request: the future is dropped.
            // (Pinned where it is made: moved into the `select!`, it would be copied.)
            let answer = {
                let mut forwarding =
                    std::pin::pin!(admitted.forward(Body::Whole(body), None, Some(timer)));
                tokio::select! {
                    biased;
                    answer = forwarding.as_mut() => answer,
                    () = client_gone(self.client, &mut self.buf) => return false,
                }
            };
            self.write_answer(answer, close).await
        }
    }

    /// Writes an answer: its head, then its body as it arrives, framed for the client. The
    /// future tells whether the connection can carry another request.
    fn write_answer(
        &mut self,
        mut answer: Answer,
        close: bool,
    ) -> impl Future<Output = bool> + use<'_, 'c> {
        // A body its upstream ends by closing goes chunked here, so the connection is kept.
        let framing = match answer.framing() {
            Framing::UntilClose => Framing::Chunked,
            framing => framing,
        };
        self.out.clear();
        http1::write_response_head(
            &mut self.out,
            answer.status,
            answer.head.fields(),
            framing,
            close,
        );
        // Written: let the head go now. Kept as it arrived, it shares the upstream
        // connection's read buffer, which could then not be reused in place for the whole
        // stream.
        answer.head = Head::Map(http::HeaderMap::new());
        async move {
            let complete = match answer.body {
                // The head and the body in one `writev`.
                Body::Whole(body) => {
                    let written = write_two(self.client, &self.out, &body).await;
                    self.out.clear();
                    written.is_ok()
                }
                Body::Stream(mut relay) => self.relay(&mut relay, framing).await,
            };
            complete && !close
        }
    }

    /// Reads the rest of a `len`-byte body into the buffer, allowing the client `idle` of
    /// silence, and takes it off.
    async fn read_body(
        &mut self,
        len: u64,
        idle: std::time::Duration,
        timer: &mut Timer<'_>,
    ) -> Result<Bytes, Unread> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        while self.buf.len() < len {
            self.buf.reserve(len - self.buf.len());
            let deadline = Instant::now() + idle;
            tokio::select! {
                biased;
                read = self.client.read_buf(&mut self.buf) => match read {
                    Ok(0) | Err(_) => return Err(Unread::ClientGone),
                    Ok(_) => {}
                },
                () = timer.expired(deadline) => return Err(Unread::Stalled),
            }
        }
        Ok(self.buf.split_to(len).freeze())
    }

    /// Before answering a request whose body has not been read: the body is dropped when it
    /// is all here already, and the connection can stay open; otherwise it must close.
    /// Returns whether it must.
    fn skip_unread(&mut self, unread_body: u64) -> bool {
        let unread = usize::try_from(unread_body).unwrap_or(usize::MAX);
        if self.buf.len() < unread {
            return true;
        }
        self.buf.advance(unread);
        false
    }

    /// Streams the upstream's answer to the client after the head waiting in `out`, chunk by
    /// chunk as it arrives. `false` when it could not be delivered whole: the connection is
    /// then closed without the body's end, so the client sees it incomplete.
    async fn relay(&mut self, relay: &mut Relay, framing: Framing) -> bool {
        loop {
            let ready = std::future::poll_fn(|cx| Poll::Ready(relay.poll_next_unpin(cx))).await;
            let next = match ready {
                Poll::Ready(next) => next,
                Poll::Pending => {
                    // Nothing yet: what waits in `out` (the head, at first) goes now rather
                    // than with the first chunk, which may be long in coming.
                    if self.flush().await.is_err() {
                        return false;
                    }
                    tokio::select! {
                        biased;
                        next = relay.next() => next,
                        () = client_gone(self.client, &mut self.buf) => return false,
                    }
                }
            };
            match next {
                Some(Ok(data)) if framing == Framing::Chunked => {
                    http1::put_chunk(&mut self.out, &data);
                    if self.flush().await.is_err() {
                        return false;
                    }
                }
                // The head (the first time) and the data in one `writev`, as they are.
                Some(Ok(data)) => {
                    let written = write_two(self.client, &self.out, &data).await;
                    self.out.clear();
                    if written.is_err() {
                        return false;
                    }
                }
                Some(Err(_)) => {
                    // The head, if it has not gone yet, so the client sees what failed.
                    let _ = self.flush().await;
                    return false;
                }
                None => {
                    if framing == Framing::Chunked {
                        self.out.extend_from_slice(http1::LAST_CHUNK);
                    }
                    return self.flush().await.is_ok();
                }
            }
        }
    }

    /// Writes `out` to the client and empties it.
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        let written = self.client.write_all(&self.out).await;
        self.out.clear();
        written
    }
}

/// Resolves when the client closes its side or fails; what it sends meanwhile (a pipelined
/// request) is kept in `buf`, up to [`MAX_AHEAD`]. Waits in the socket's own reader slot
/// rather than in a readiness future registered and removed per wait.
async fn client_gone(client: &TcpStream, buf: &mut bytes::BytesMut) {
    std::future::poll_fn(|cx| loop {
        if buf.len() >= MAX_AHEAD {
            return Poll::Pending;
        }
        match client.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(())) => {}
        }
        // Room for what a client sends while its answer streams (usually nothing, or the
        // close): every open stream's connection holds this buffer.
        make_room(buf, SMALL_BUFFER);
        match client.try_read_buf(buf) {
            Ok(0) => return Poll::Ready(()),
            // Data, or readiness that was stale: look again (which registers the waker).
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(()),
        }
    })
    .await;
}
