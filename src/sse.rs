//! Server-sent events (`text/event-stream`, in the HTML standard), as far as the gateway reads
//! them: where an event ends, what its data lines say, and where a `usage` key stands. The
//! keep-alive (between events only), the usage filter (the usage-only chunk of a stream) and
//! the usage tap all read events through here.
//!
//! Lines end in CRLF, LF or CR; an empty line ends an event. Nothing here buffers or changes
//! a byte: it only looks.

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Where a stream stands, read one byte at a time: the one scan of event boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum Boundary {
    /// Between two events (or before the first): nothing of an event has come.
    #[default]
    BetweenEvents,
    /// Inside a line with something on it.
    InLine,
    /// A line with something on it has just ended: an empty line now ends the event.
    LineEnded,
    /// A CR ended a line; an LF right after it belongs to the same line end. `empty`: the
    /// line it ended was empty, so the event has ended.
    AfterCr { empty: bool },
}

/// What one byte did to the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The event ended with the byte before this one (a CR's event, the byte after it not
    /// an LF): this byte is the next event's.
    EndedBefore,
    /// The event ends with this byte.
    Ended,
    Within,
}

impl Boundary {
    fn step(&mut self, byte: u8) -> Step {
        let (next, step) = match (*self, byte) {
            (Boundary::AfterCr { empty: true }, b'\n') => (Boundary::BetweenEvents, Step::Ended),
            (Boundary::AfterCr { empty: false }, b'\n') => (Boundary::LineEnded, Step::Within),
            (Boundary::AfterCr { empty: true }, other) => {
                let mut fresh = Boundary::BetweenEvents;
                fresh.step(other);
                *self = fresh;
                return Step::EndedBefore;
            }
            (Boundary::AfterCr { empty: false } | Boundary::LineEnded, b'\r') => {
                (Boundary::AfterCr { empty: true }, Step::Within)
            }
            (Boundary::LineEnded, b'\n') => (Boundary::BetweenEvents, Step::Ended),
            (Boundary::BetweenEvents, b'\r') => (Boundary::AfterCr { empty: true }, Step::Within),
            (Boundary::BetweenEvents, b'\n') => (Boundary::BetweenEvents, Step::Ended),
            (Boundary::InLine, b'\r') => (Boundary::AfterCr { empty: false }, Step::Within),
            (Boundary::InLine, b'\n') => (Boundary::LineEnded, Step::Within),
            (_, _) => (Boundary::InLine, Step::Within),
        };
        *self = next;
        step
    }

    /// Reads `chunk` on from where the stream stood.
    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        // Why only the tail: the last bytes decide where a stream stands once they hold
        // something other than line ends, or two line ends (the scan runs on every chunk of
        // every open stream).
        let from = chunk.len().saturating_sub(8);
        if from > 0 {
            *self = Boundary::InLine;
        }
        for &byte in &chunk[from..] {
            self.step(byte);
        }
    }

    /// Whether nothing of an event is pending: a comment written now goes between events. A
    /// CR that ended an event counts: an LF after it would end an empty event, which clients
    /// skip.
    pub(crate) fn between_events(self) -> bool {
        matches!(
            self,
            Boundary::BetweenEvents | Boundary::AfterCr { empty: true }
        )
    }
}

/// Where the first event in `buf` ends: just after the empty line that closes it. A CR as
/// `buf`'s last byte is left for the bytes after it to decide.
pub(crate) fn event_end(buf: &[u8]) -> Option<usize> {
    let mut boundary = Boundary::default();
    for (at, &byte) in buf.iter().enumerate() {
        match boundary.step(byte) {
            Step::Ended => return Some(at + 1),
            Step::EndedBefore => return Some(at),
            Step::Within => {}
        }
    }
    None
}

/// Where the last whole event in `chunk` ends, if one does.
pub(crate) fn last_event_end(chunk: &[u8]) -> Option<usize> {
    let mut end = None;
    let mut from = 0;
    while let Some(len) = event_end(&chunk[from..]) {
        from += len;
        end = Some(from);
    }
    end
}

/// The data of an event: its `data:` lines' values (one leading space off each), joined by
/// LF.
pub(crate) fn data(event: &[u8]) -> Vec<u8> {
    let mut data = Vec::new();
    let lines = event
        .split(|byte| matches!(byte, b'\n' | b'\r'))
        .filter_map(|line| line.strip_prefix(b"data:"));
    for (i, value) in lines.enumerate() {
        if i > 0 {
            data.push(b'\n');
        }
        data.extend_from_slice(value.strip_prefix(b" ").unwrap_or(value));
    }
    data
}

/// A `"usage"` key, as JSON writes it.
pub(crate) const USAGE_KEY: &[u8] = b"\"usage\"";
/// Finds [`USAGE_KEY`].
pub(crate) static USAGE_FINDER: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(USAGE_KEY));

/// Where a `"usage"` key starts in `chunk`, leaving out the places inside a string (a quote
/// with a backslash before it: every quote in a JSON string is escaped; `before` is the byte
/// ahead of the chunk).
pub(crate) fn usage_keys(chunk: &[u8], before: Option<u8>) -> impl Iterator<Item = usize> + '_ {
    keys(&USAGE_FINDER, chunk, before)
}

/// Where `finder`'s key starts in `chunk`, outside strings (see [`usage_keys`]).
pub(crate) fn keys<'a>(
    finder: &'a Finder<'static>,
    chunk: &'a [u8],
    before: Option<u8>,
) -> impl Iterator<Item = usize> + 'a {
    finder.find_iter(chunk).filter(move |&start| {
        let previous = match start.checked_sub(1) {
            Some(at) => Some(chunk[at]),
            None => before,
        };
        previous != Some(b'\\')
    })
}

/// Whether a `"usage"` key in `event` is followed by an object: a cheap look before parsing
/// (every chunk of a stream that asked for its usage says `"usage":null`).
pub(crate) fn names_usage_object(event: &[u8]) -> bool {
    usage_keys(event, None).any(|at| {
        let rest = event[at + USAGE_KEY.len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|value| value.trim_ascii_start().starts_with(b"{"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a stream of `chunks` stands between events.
    fn between_after(chunks: &[&[u8]]) -> bool {
        let mut boundary = Boundary::default();
        for chunk in chunks {
            boundary.feed(chunk);
        }
        boundary.between_events()
    }

    #[test]
    fn a_stream_stands_between_events_only_after_an_empty_line() {
        let between: &[&[&[u8]]] = &[
            &[],
            &[b"data: {}\n\n"],
            &[b"data: {}\r\n\r\n"],
            &[b"data: {}\r\r"],
            &[b"data: {}\n", b"\n"],
            &[b"data: {}\r\n\r", b"\n"],
            &[b"data: {}\n", b"", b"\n"],
            &[b"\n"],
            &[b"data: {}\n\n", b": ping\n\n"],
            &[b"data: a long line that is longer than the tail looked at\n\n"],
            &[b"data: x\n\n\n\n\n\n\n\n\n\n"],
        ];
        for chunks in between {
            assert!(between_after(chunks), "{chunks:?}");
        }
        let inside: &[&[&[u8]]] = &[
            &[b"data: {"],
            &[b"data: {}\n"],
            &[b"data: {}\r\n"],
            &[b"data: {}\n\ndata: x"],
            &[b"data: {}\n\n", b"event: done\n"],
            &[b"data: {}\n\n", b"d"],
            &[b"xxxx", b"\n"],
            &[b"data: a long line that is longer than the tail looked at\n"],
        ];
        for chunks in inside {
            assert!(!between_after(chunks), "{chunks:?}");
        }
    }

    #[test]
    fn an_event_ends_after_its_empty_line_in_any_line_ending() {
        assert_eq!(event_end(b"data: 1\n\ndata: 2\n\n"), Some(9));
        assert_eq!(event_end(b"data: 1\r\n\r\ndata: 2"), Some(11));
        assert_eq!(event_end(b"data: 1\r\rdata: 2"), Some(9));
        assert_eq!(event_end(b"data: 1\r\r"), None, "an LF may follow");
        assert_eq!(event_end(b"data: 1\n"), None);
        assert_eq!(event_end(b"\n"), Some(1));
        assert_eq!(last_event_end(b"data: 1\n\ndata: 2\n\ndata: 3"), Some(18));
    }

    #[test]
    fn data_lines_are_joined_and_other_fields_left_out() {
        assert_eq!(
            data(b"event: x\r\ndata: {\"a\":\r\ndata:1}\r\nid: 7\r\n\r\n"),
            b"{\"a\":\n1}"
        );
    }

    #[test]
    fn a_usage_key_inside_a_string_is_not_one() {
        assert!(names_usage_object(
            b"data: {\"usage\": {\"prompt_tokens\":1}}\n\n"
        ));
        assert!(!names_usage_object(b"data: {\"usage\":null}\n\n"));
        assert!(!names_usage_object(
            b"data: {\"text\":\"say \\\"usage\\\": {}\"}\n\n"
        ));
    }
}
