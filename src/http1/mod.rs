//! HTTP/1.1 on the wire, for the fast engine (client side) and the raw upstream transport
//! (upstream side): heads parsed in place, heads written, chunked bodies decoded and framed.
//!
//! Request heads become `http` types whose values share the read buffer; response heads are
//! kept as they arrived ([`Fields`]) and written from there. Nothing here decides policy:
//! what a head means for the request is the pipeline's, which headers pass is
//! [`crate::headers`]'.
//!
//! The request parser is deliberately narrow: anything it does not recognise as a plain
//! HTTP/1.1 request with at most a `Content-Length` body is [`Parse::Refer`]red to hyper,
//! which then serves the connection from that request on. Transfer codings, upgrades,
//! `Expect`, repeated lengths, HTTP/1.0, absolute-form targets and every malformed head get
//! hyper's own, long-tested handling.

mod chunked;
mod date;
mod io;
mod request;
mod response;

pub(crate) use chunked::{put_chunk, Chunked, Step, LAST_CHUNK};
pub(crate) use io::{advance_two, make_room, poll_write_two, write_two};
pub(crate) use request::{parse_request, rejoin, write_request_head, RequestHead};
pub(crate) use response::{
    parse_response, write_response_head, BadResponse, Fields, Framing, ResponseHead,
};

/// Headers in one head, as hyper allows.
pub(crate) const MAX_HEADERS: usize = 100;

/// What parsing a head gave.
#[derive(Debug)]
pub(crate) enum Parse<T> {
    /// A whole head, taken off the front of the buffer.
    Complete(T),
    /// The head is not all there yet.
    Partial,
    /// Not for the fast engine: hyper serves it (and answers it if it is malformed). The
    /// buffer is untouched.
    Refer,
}

/// Where one header's name and value sit in a head's bytes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

fn offset(buf: &[u8], part: &[u8]) -> (usize, usize) {
    (part.as_ptr() as usize - buf.as_ptr() as usize, part.len())
}

fn part(raw: &[u8], (start, len): (usize, usize)) -> &[u8] {
    &raw[start..start + len]
}

/// A field value `http` takes: visible ASCII, obs-text, space and tab.
fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&byte| byte == b'\t' || (byte >= 0x20 && byte != 0x7f))
}
