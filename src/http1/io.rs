//! Reading and writing HTTP/1 messages on a TCP stream with as few system calls as the
//! messages allow.

use std::io::IoSlice;
use std::task::Poll;

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Makes `buf` ready to read at least `room` more bytes. A buffer consumed from the front
/// keeps only its tail free: read into as it is, a message straddling the end takes two
/// reads (one more syscall every few requests). While nothing else holds the storage,
/// `reserve` moves what is left to the front instead of allocating.
pub(crate) fn make_room(buf: &mut BytesMut, room: usize) {
    if buf.capacity() - buf.len() < room {
        buf.reserve(room);
    }
}

/// Writes all of `first`, then all of `second`: in one `writev` as a rule, with no copy of
/// `second` behind `first`. Waits in the socket's own writer slot: no readiness future is
/// registered per wait, and the future stays a few words long.
pub(crate) async fn write_two(
    stream: &TcpStream,
    first: &[u8],
    second: &[u8],
) -> std::io::Result<()> {
    let (mut first, mut second) = (first, second);
    std::future::poll_fn(|cx| poll_write_two(stream, cx, &mut first, &mut second)).await
}

/// Moves `first`, then `second`, past the `written` bytes a vectored write took from them.
pub(crate) fn advance_two(first: &mut &[u8], second: &mut &[u8], written: usize) {
    let from_first = written.min(first.len());
    *first = &first[from_first..];
    *second = &second[written - from_first..];
}

/// [`write_two`] as a poll: `first` and `second` are advanced past what was written.
pub(crate) fn poll_write_two(
    stream: &TcpStream,
    cx: &mut std::task::Context<'_>,
    first: &mut &[u8],
    second: &mut &[u8],
) -> Poll<std::io::Result<()>> {
    loop {
        if first.is_empty() && second.is_empty() {
            return Poll::Ready(Ok(()));
        }
        if let Err(err) = std::task::ready!(stream.poll_write_ready(cx)) {
            return Poll::Ready(Err(err));
        }
        let written = if first.is_empty() {
            stream.try_write(second)
        } else if second.is_empty() {
            stream.try_write(first)
        } else {
            stream.try_write_vectored(&[IoSlice::new(first), IoSlice::new(second)])
        };
        match written {
            Ok(0) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => advance_two(first, second, n),
            // Readiness that was stale: polling again registers the waker.
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => return Poll::Ready(Err(err)),
        }
    }
}
