//! One request in the fast engine: its head to the pipeline, its body read whole, its answer
//! written back as it arrives, while the client is watched for leaving.

use std::task::Poll;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::timer::Timer;
use super::{Conn, Routes, MAX_AHEAD};
use crate::http1::{self, write_two, ClientFraming, RequestHead};
use crate::pipeline::{Answer, AnswerBody, ClientBody, Endpoint, Request};
use crate::upstream::BodySize;

/// Why the body could not be read.
enum Unread {
    /// The client went silent mid-body past `server.body_read_timeout`.
    Stalled,
    /// The client went away, or cannot be read: nothing to answer.
    ClientGone,
}

impl Conn<'_> {
    /// One request, from its head to the last byte of its answer. Returns whether the
    /// connection can carry another request.
    pub(super) async fn exchange(
        &mut self,
        routes: &Routes,
        endpoint: &Endpoint,
        head: RequestHead,
        close: bool,
        timer: &mut Timer<'_>,
    ) -> bool {
        routes.metrics.count_lane_request();
        let Some(target) = head.target_after(routes.secret_len) else {
            return false;
        };
        let RequestHead {
            method,
            headers,
            body_len,
            ..
        } = head;
        let request = Request {
            method,
            target,
            headers,
            peer: Some(self.remote),
            has_body: body_len > 0,
        };
        let admitted = match endpoint.admit(request) {
            Ok(admitted) => admitted,
            Err(refusal) => return self.answer_unread(refusal, body_len, close).await,
        };
        // The whole body, before anything goes upstream: one write then carries the request.
        let body = match self.read_body(body_len, admitted.body_idle(), timer).await {
            Ok(body) => body,
            Err(Unread::Stalled) => {
                return self
                    .answer_unread(admitted.body_stalled(), body_len, true)
                    .await
            }
            Err(Unread::ClientGone) => return false,
        };
        let forwarding = admitted.forward(ClientBody::Whole(body), None);
        // A client that leaves cancels the upstream request: the future is dropped.
        let answer = tokio::select! {
            biased;
            answer = forwarding => answer,
            () = client_gone(self.client, &mut self.buf) => return false,
        };
        self.write_answer(answer, close).await
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

    /// Answers a request whose body has not been read. The connection stays open when the
    /// body is all here already (it is then dropped); otherwise it closes.
    async fn answer_unread(&mut self, answer: Answer, unread_body: u64, close: bool) -> bool {
        let unread = usize::try_from(unread_body).unwrap_or(usize::MAX);
        let close = close || self.buf.len() < unread;
        if !close {
            self.buf.advance(unread);
        }
        self.write_answer(answer, close).await
    }

    /// Writes an answer: its head, then its body as it arrives, framed for the client.
    /// Returns whether the connection can carry another request.
    async fn write_answer(&mut self, answer: Answer, close: bool) -> bool {
        let framing = match answer.body.size() {
            BodySize::None => ClientFraming::Empty,
            BodySize::Known(len) => ClientFraming::Length(len),
            BodySize::Unknown => ClientFraming::Chunked,
        };
        let Answer { status, head, body } = answer;
        self.out.clear();
        http1::write_response_head(&mut self.out, status, head.fields(), framing, close);
        drop(head);
        let complete = match body {
            // The head and the body in one `writev`.
            AnswerBody::Full(body) => {
                let written = write_two(self.client, &self.out, &body).await;
                self.out.clear();
                written.is_ok()
            }
            AnswerBody::Relay(relay) => self.relay(relay, framing).await,
        };
        complete && !close
    }

    /// Streams the upstream's answer to the client after the head waiting in `out`, chunk by
    /// chunk as it arrives. `false` when it could not be delivered whole: the connection is
    /// then closed without the body's end, so the client sees it incomplete.
    async fn relay(
        &mut self,
        mut relay: crate::pipeline::relay::Relay,
        framing: ClientFraming,
    ) -> bool {
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
                Some(Ok(data)) if framing == ClientFraming::Chunked => {
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
                    if framing == ClientFraming::Chunked {
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
        buf.reserve(8 * 1024);
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
