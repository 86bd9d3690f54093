//! Reading and writing HTTP/1 messages on a TCP stream with as few system calls as the
//! messages allow.

use std::io::IoSlice;
use std::task::Poll;

use bytes::BytesMut;
use tokio::net::TcpStream;

/// Makes `buf`, a read buffer of `size` bytes, ready to read at least half that.
///
/// A drained buffer starts again at the front of its storage when nothing else holds it.
/// Read into where the last message ended, each event of a long stream landed past the last
/// and touched the buffer's pages one after another: 8,000 streams grew from 15 to 19 KiB
/// each over 40 s of events, and stay at 15 this way (docs/performance.md).
///
/// A buffer consumed from the front keeps only its tail free: read into as it is, a message
/// straddling the end takes two reads (one more syscall every few requests). While nothing
/// else holds the storage, `reserve` moves what is left to the front instead of allocating.
pub(crate) fn make_room(buf: &mut BytesMut, size: usize) {
    // Never allocates: while a piece handed on still holds the storage, this fails and
    // reading goes on in its tail.
    let _rewound = buf.is_empty() && buf.capacity() < size && buf.try_reclaim(size);
    let room = size / 2;
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

#[cfg(test)]
mod tests {
    use bytes::{BufMut, Bytes, BytesMut};

    use super::make_room;

    const SIZE: usize = 8 * 1024;

    /// Reads `event` into `buf` as a connection would, and hands it on.
    fn read_event(buf: &mut BytesMut, event: &[u8]) -> Bytes {
        make_room(buf, SIZE);
        buf.put_slice(event);
        buf.split_to(event.len()).freeze()
    }

    #[test]
    fn a_stream_whose_pieces_are_sent_reads_every_event_at_the_front() {
        let mut buf = BytesMut::with_capacity(SIZE);
        let event = [b'x'; 250];
        let first = read_event(&mut buf, &event).as_ptr();
        // Each piece is sent (dropped) before the next read, as the relay does.
        for _ in 0..100 {
            let piece = read_event(&mut buf, &event);
            assert_eq!(piece.as_ptr(), first, "the event landed past the last one");
        }
    }

    #[test]
    fn a_piece_still_held_keeps_its_storage_and_costs_no_allocation() {
        let mut buf = BytesMut::with_capacity(SIZE);
        let event = [b'x'; 250];
        let held = read_event(&mut buf, &event);
        let second = read_event(&mut buf, &event);
        // Read on in the tail of the same storage, behind the piece not yet sent.
        assert_eq!(second.as_ptr(), held.as_ptr().wrapping_add(event.len()));
    }
}
