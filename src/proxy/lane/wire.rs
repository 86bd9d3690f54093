//! HTTP/1.1 on the wire for the fast lane: request heads parsed in place into `http` types
//! (values share the read buffer instead of being copied) for the policy code that reads
//! them; response heads kept as they arrived ([`Fields`]) and written from there; chunked
//! bodies decoded.
//!
//! The request parser is deliberately narrow. Anything it does not recognise as a plain
//! HTTP/1.1 request with at most a `Content-Length` body is [`Parse::Refer`]red to hyper,
//! which then serves the connection from that request on: transfer codings, upgrades,
//! `Expect`, repeated lengths, HTTP/1.0, absolute-form targets and every malformed head get
//! hyper's own, long-tested handling.

use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::headers::{content_length, list_items_of, Downstream};

/// Headers in one head, as hyper allows.
pub const MAX_HEADERS: usize = 100;

/// A request head the fast lane can serve.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    /// The origin-form target as sent: path and query.
    pub target: http::uri::PathAndQuery,
    pub headers: HeaderMap,
    /// The body's length: 0 without `Content-Length`.
    pub body_len: u64,
    /// The client asked to close the connection after this exchange.
    pub close: bool,
    /// The head as it arrived, to give back when the request goes to hyper after all.
    pub raw: Bytes,
}

/// What parsing a head gave.
#[derive(Debug)]
pub enum Parse<T> {
    /// A whole head, taken off the front of the buffer.
    Complete(T),
    /// The head is not all there yet.
    Partial,
    /// Not for the fast lane: hyper serves it (and answers it if it is malformed). The
    /// buffer is untouched.
    Refer,
}

/// Where one header's name and value sit in the buffer. The parsers take a scratch list of
/// these from the caller, so a connection reuses one.
#[derive(Debug, Clone, Copy, Default)]
pub struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

fn offset(buf: &[u8], part: &[u8]) -> (usize, usize) {
    (part.as_ptr() as usize - buf.as_ptr() as usize, part.len())
}

/// A field value `http` takes: visible ASCII, obs-text, space and tab.
fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&byte| byte == b'\t' || (byte >= 0x20 && byte != 0x7f))
}

/// Parses the request head at the front of `buf` and, when it is complete and plain, takes
/// it off the buffer. Everything that could send it to hyper is decided before the buffer
/// is touched.
pub fn parse_request(buf: &mut BytesMut, spans: &mut Vec<Span>) -> Parse<RequestHead> {
    let mut raw = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let head_len = match request.parse_with_uninit_headers(buf, &mut raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parse::Partial,
        Err(_) => return Parse::Refer,
    };
    if request.version != Some(1) {
        return Parse::Refer;
    }
    let (Some(method), Some(path)) = (request.method, request.path) else {
        return Parse::Refer;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parse::Refer;
    };
    if !path.starts_with('/') {
        return Parse::Refer;
    }
    let target = offset(buf, path.as_bytes());
    spans.clear();
    let mut body_len = None;
    let mut close = false;
    for field in request.headers.iter() {
        let (name, value) = (field.name.as_bytes(), field.value);
        if !valid_value(value) {
            return Parse::Refer;
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Parse::Refer;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            match (body_len, content_length(value)) {
                (None, Some(len)) => body_len = Some(len),
                _ => return Parse::Refer,
            }
        }
        if name.eq_ignore_ascii_case(b"connection") {
            match connection_option(value) {
                Some(asks_close) => close |= asks_close,
                None => return Parse::Refer,
            }
        }
        spans.push(Span {
            name: offset(buf, name),
            value: offset(buf, value),
        });
    }

    let head = buf.split_to(head_len).freeze();
    let mut headers = HeaderMap::with_capacity(spans.len());
    for span in spans.iter() {
        let name = HeaderName::from_bytes(&head[span.name.0..span.name.0 + span.name.1]);
        let value = HeaderValue::from_maybe_shared(slice(&head, span.value));
        match (name, value) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            // Not reachable after the checks above; if it were, hyper takes the request.
            _ => return unsplit(buf, &head),
        }
    }
    // A target `http` refuses (httparse lets some bytes through that it does not) goes to
    // hyper, which answers 400.
    let Ok(target) = http::uri::PathAndQuery::from_maybe_shared(slice(&head, target)) else {
        return unsplit(buf, &head);
    };
    Parse::Complete(RequestHead {
        method,
        target,
        headers,
        body_len: body_len.unwrap_or(0),
        close,
        raw: head,
    })
}

/// Puts a head taken off the buffer back in front of it, for hyper.
fn unsplit<T>(buf: &mut BytesMut, head: &Bytes) -> Parse<T> {
    *buf = rejoin(head, buf);
    Parse::Refer
}

/// A head's bytes followed by what came after it: what hyper must read when the lane hands
/// a request over.
pub fn rejoin(head: &[u8], rest: &[u8]) -> BytesMut {
    let mut whole = BytesMut::with_capacity(head.len() + rest.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(rest);
    whole
}

fn slice(head: &Bytes, (start, len): (usize, usize)) -> Bytes {
    head.slice(start..start + len)
}

/// A request's `Connection` value the lane understands: `Some(true)` for `close`,
/// `Some(false)` for `keep-alive`; `None` for anything else (it names headers to drop, which
/// hyper's path handles).
fn connection_option(value: &[u8]) -> Option<bool> {
    let mut close = false;
    for item in value.split(|byte| *byte == b',') {
        let item = item.trim_ascii();
        if item.eq_ignore_ascii_case(b"close") {
            close = true;
        } else if !item.eq_ignore_ascii_case(b"keep-alive") && !item.is_empty() {
            return None;
        }
    }
    Some(close)
}

/// How the upstream delimits a response body (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    UntilClose,
}

/// An upstream response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub fields: Fields,
    pub framing: Framing,
    /// The connection can carry another request afterwards.
    pub reusable: bool,
}

/// A head's header fields as they arrived: read, filtered and written in place, with no
/// header map built in between.
#[derive(Debug)]
pub struct Fields {
    raw: Bytes,
    spans: Vec<Span>,
}

impl Fields {
    /// Every field, name and value, in the order received.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + Clone {
        self.spans
            .iter()
            .map(|span| (part(&self.raw, span.name), part(&self.raw, span.value)))
    }

    /// The first value of the header `name`.
    pub fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        Some(part(&self.raw, self.find(name)?.value))
    }

    /// The first value of the header `name`, sharing the head's storage.
    pub fn value(&self, name: &HeaderName) -> Option<HeaderValue> {
        HeaderValue::from_maybe_shared(slice(&self.raw, self.find(name)?.value)).ok()
    }

    fn find(&self, name: &HeaderName) -> Option<&Span> {
        self.spans
            .iter()
            .find(|span| part(&self.raw, span.name).eq_ignore_ascii_case(name.as_str().as_bytes()))
    }

    /// Gives the parser's scratch list back, for the next head.
    pub fn into_spans(self) -> Vec<Span> {
        self.spans
    }
}

fn part(raw: &[u8], (start, len): (usize, usize)) -> &[u8] {
    &raw[start..start + len]
}

/// Why an upstream's answer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    #[error("the upstream's response head is malformed: {0}")]
    Malformed(httparse::Error),
    #[error("the upstream's response head is not valid HTTP: {0}")]
    Invalid(&'static str),
    #[error("the upstream's response head is over {0} bytes")]
    TooLarge(usize),
    #[error("the upstream's chunked body is malformed")]
    BadChunk,
}

/// Parses the response head at the front of `buf`; `Ok(None)` while it is incomplete.
/// Interim (1xx) responses are parsed too; the caller skips them.
pub fn parse_response(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
) -> Result<Option<ResponseHead>, BadResponse> {
    let mut raw = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut response, buf, &mut raw)
        .map_err(BadResponse::Malformed)?;
    let head_len = match parsed {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return Ok(None),
    };
    let http11 = response.version == Some(1);
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(BadResponse::Invalid("status code"))?;
    // One pass over the fields for what frames the body and whether the connection stays.
    spans.clear();
    let mut reusable = http11;
    let mut transfer_coded = false;
    let mut last_coding: Option<&[u8]> = None;
    // The first Content-Length, parsed, and whether any later one differs from it.
    let mut length: Option<(&[u8], Option<u64>)> = None;
    let mut lengths_differ = false;
    for field in response.headers.iter() {
        let (name, value) = (field.name.as_bytes(), field.value);
        if !valid_value(value) {
            return Err(BadResponse::Invalid("header value"));
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for item in list_items_of(std::iter::once(value)) {
                if item.eq_ignore_ascii_case(b"close") {
                    reusable = false;
                } else if item.eq_ignore_ascii_case(b"keep-alive") && !http11 {
                    reusable = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            transfer_coded = true;
            last_coding = list_items_of(std::iter::once(value)).last().or(last_coding);
        } else if name.eq_ignore_ascii_case(b"content-length") {
            match length {
                None => length = Some((value, content_length(value))),
                Some((first, _)) => lengths_differ |= first != value,
            }
        }
        spans.push(Span {
            name: offset(buf, name),
            value: offset(buf, value),
        });
    }
    let framing = if status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if transfer_coded {
        if last_coding.is_some_and(|coding| coding.eq_ignore_ascii_case(b"chunked")) {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        // Repeated lengths must agree (RFC 9112 §6.3).
        match length {
            None => Framing::UntilClose,
            Some((_, Some(len))) if !lengths_differ => Framing::Length(len),
            Some(_) => return Err(BadResponse::Invalid("Content-Length")),
        }
    };
    let fields = Fields {
        raw: buf.split_to(head_len).freeze(),
        spans: std::mem::take(spans),
    };
    if framing == Framing::UntilClose {
        reusable = false;
    }
    Ok(Some(ResponseHead {
        status,
        fields,
        framing,
        reusable,
    }))
}

/// Writes a request head: `target` is the path and query as the upstream should see them;
/// of `headers`, what [`crate::headers::goes_upstream`] lets through.
pub fn write_request_head(
    out: &mut BytesMut,
    method: &Method,
    prefix: &str,
    target: &str,
    host: &HeaderValue,
    headers: &HeaderMap,
) {
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(prefix.as_bytes());
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\nhost: ");
    out.put_slice(host.as_bytes());
    out.put_slice(b"\r\n");
    // What hyper's path removes is left out here; the client's own Content-Length goes too
    // (the parser took at most one, all digits).
    for (name, value) in headers {
        if crate::headers::goes_upstream(name) {
            put_field(out, name, value);
        }
    }
    out.put_slice(b"\r\n");
}

/// How the lane frames a body towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFraming {
    /// No body and no length (204, 304).
    Empty,
    Length(u64),
    Chunked,
}

/// Writes a response head: the status line, the headers but hop-by-hop ones, `Date` when the
/// upstream sent none, then the framing and `Connection: close` when this is the
/// connection's last answer.
pub fn write_response_head<'h>(
    out: &mut BytesMut,
    status: StatusCode,
    fields: impl Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
    framing: ClientFraming,
    close: bool,
) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    // Hop-by-hop headers are left out (hyper's path strips them), and the framing headers,
    // which are the writer's.
    let downstream = Downstream::of(
        fields
            .clone()
            .filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"))
            .map(|(_, value)| value),
    );
    let mut dated = false;
    for (name, value) in fields {
        dated |= name.eq_ignore_ascii_case(b"date");
        if !name.eq_ignore_ascii_case(b"content-length") && downstream.allows(name) {
            // Lowercase, as hyper's path writes names from its map.
            let start = out.len();
            out.put_slice(name);
            out[start..].make_ascii_lowercase();
            out.put_slice(b": ");
            out.put_slice(value);
            out.put_slice(b"\r\n");
        }
    }
    if !dated {
        out.put_slice(b"date: ");
        date::put(out);
        out.put_slice(b"\r\n");
    }
    match framing {
        ClientFraming::Length(len) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa::Buffer::new().format(len).as_bytes());
            out.put_slice(b"\r\n");
        }
        ClientFraming::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        ClientFraming::Empty => {}
    }
    if close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

/// A header map's fields as [`write_response_head`] takes them (`.iter().copied()`).
pub fn map_fields(headers: &HeaderMap) -> Vec<(&[u8], &[u8])> {
    headers
        .iter()
        .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
        .collect()
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

/// Writes one chunk of a chunked body: size line, data, CRLF.
pub fn put_chunk(out: &mut BytesMut, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.put_slice(format_hex(data.len()).as_bytes());
    out.put_slice(b"\r\n");
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The last chunk, without trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

fn format_hex(mut n: usize) -> HexBuf {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    HexBuf { digits, at }
}

struct HexBuf {
    digits: [u8; 16],
    at: usize,
}

impl HexBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.digits[self.at..]
    }
}

/// Decodes a chunked body (RFC 9112 §7.1) as it arrives, as strictly as hyper: every line
/// ends in CRLF. Chunk extensions and trailers are read and dropped, as hyper's path drops
/// them.
#[derive(Debug, Default)]
pub struct Chunked {
    state: ChunkState,
    /// Data bytes left in the current chunk, or the size being read.
    size: u64,
    /// Bytes of framing read on the current line, against [`MAX_LINE`].
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    #[default]
    Size,
    /// Whitespace after the size digits.
    SizeSpace,
    /// `;` and what follows, up to CR.
    Extension,
    /// CR of the size line seen.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// At the start of a line after the last chunk: a trailer or the final CRLF.
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

/// What [`Chunked::step`] found at the front of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// `skip` bytes of framing, then `len` bytes of data.
    Data { skip: usize, len: usize },
    /// All of the input was framing; more is needed.
    More,
    /// The body ends after `used` bytes.
    End { used: usize },
}

/// Longest framing line accepted: a size with extensions, or a trailer.
const MAX_LINE: usize = 4096;

impl Chunked {
    /// Reads framing from the front of `input` up to the next data or the end.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, BadResponse> {
        use ChunkState as S;
        let mut at = 0;
        while at < input.len() {
            if self.state == S::Data {
                let len = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - at);
                self.size -= len as u64;
                if self.size == 0 {
                    self.state = S::DataCr;
                }
                return Ok(Step::Data { skip: at, len });
            }
            let byte = input[at];
            at += 1;
            self.line += 1;
            if self.line > MAX_LINE {
                return Err(BadResponse::BadChunk);
            }
            self.state = match (self.state, byte) {
                (S::Size, b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F') => {
                    let digit = (byte as char).to_digit(16).unwrap_or(0);
                    self.size = self
                        .size
                        .checked_mul(16)
                        .and_then(|size| size.checked_add(u64::from(digit)))
                        .ok_or(BadResponse::BadChunk)?;
                    S::Size
                }
                (S::Size | S::SizeSpace, b' ' | b'\t') if self.line > 1 => S::SizeSpace,
                (S::Size | S::SizeSpace, b';') if self.line > 1 => S::Extension,
                (S::Size | S::SizeSpace | S::Extension, b'\r') if self.line > 1 => S::SizeLf,
                (S::Extension, b'\n') => return Err(BadResponse::BadChunk),
                (S::Extension, _) => S::Extension,
                (S::SizeLf, b'\n') => {
                    self.line = 0;
                    if self.size == 0 {
                        S::TrailerStart
                    } else {
                        S::Data
                    }
                }
                (S::DataCr, b'\r') => S::DataLf,
                (S::DataLf, b'\n') => {
                    self.line = 0;
                    S::Size
                }
                (S::TrailerStart, b'\r') => S::EndLf,
                (S::Trailer, b'\r') => S::TrailerLf,
                (S::TrailerStart | S::Trailer, b'\n') => return Err(BadResponse::BadChunk),
                (S::TrailerStart | S::Trailer, _) => S::Trailer,
                (S::TrailerLf, b'\n') => {
                    self.line = 0;
                    S::TrailerStart
                }
                (S::EndLf, b'\n') => {
                    self.state = S::Done;
                    return Ok(Step::End { used: at });
                }
                (S::Done, _) => return Ok(Step::End { used: at - 1 }),
                _ => return Err(BadResponse::BadChunk),
            };
        }
        if self.state == S::Done {
            return Ok(Step::End { used: 0 });
        }
        Ok(Step::More)
    }
}

/// `Date` values, formatted once a second per thread (hyper does the same).
mod date {
    use std::cell::RefCell;
    use std::time::{Duration, SystemTime};

    use bytes::{BufMut, BytesMut};

    struct Cached {
        text: [u8; 29],
        next: SystemTime,
    }

    thread_local! {
        static CACHED: RefCell<Cached> = const {
            RefCell::new(Cached { text: [0; 29], next: SystemTime::UNIX_EPOCH })
        };
    }

    pub fn put(out: &mut BytesMut) {
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            let now = SystemTime::now();
            if now >= cached.next {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    cached.text.copy_from_slice(text.as_bytes());
                }
                let into_second = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|since| since.subsec_nanos())
                    .unwrap_or(0);
                cached.next =
                    now + Duration::from_secs(1) - Duration::from_nanos(u64::from(into_second));
            }
            out.put_slice(&cached.text);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> (Parse<RequestHead>, BytesMut) {
        let mut buf = BytesMut::from(text.as_bytes());
        let parsed = parse_request(&mut buf, &mut Vec::new());
        (parsed, buf)
    }

    #[test]
    fn a_plain_request_is_taken_off_the_buffer_whole() {
        let text = "POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer k\r\n\
                    Content-Length: 2\r\nX-Custom: a\r\nConnection: keep-alive, close\r\n\r\n{}NEXT";
        let (parsed, rest) = request(text);
        let Parse::Complete(head) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(head.method, Method::POST);
        assert_eq!(head.target.as_str(), "/v1/chat/completions?x=1");
        assert_eq!(head.body_len, 2);
        assert!(head.close);
        assert_eq!(head.headers.get("x-custom").unwrap(), "a");
        assert_eq!(head.headers.len(), 5);
        assert_eq!(&head.raw[..], &text.as_bytes()[..text.len() - 6]);
        assert_eq!(&rest[..], b"{}NEXT");
    }

    #[test]
    fn anything_but_a_plain_request_goes_to_hyper_untouched() {
        let refer = [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            "GET / HTTP/1.1\r\nConnection: x-drop-me\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET http://other/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x01b\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
            "GET / HTTP/1.1\r\n folded: x\r\n\r\n",
        ];
        for text in refer {
            let (parsed, rest) = request(text);
            assert!(matches!(parsed, Parse::Refer), "{text:?}: {parsed:?}");
            assert_eq!(&rest[..], text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn an_incomplete_head_waits() {
        for text in ["", "GET / HTTP/1.1\r\n", "GET / HTTP/1.1\r\nHost: x\r\n"] {
            let (parsed, rest) = request(text);
            assert!(matches!(parsed, Parse::Partial), "{text:?}");
            assert_eq!(&rest[..], text.as_bytes());
        }
    }

    fn response(text: &str) -> Result<Option<ResponseHead>, BadResponse> {
        parse_response(&mut BytesMut::from(text.as_bytes()), &mut Vec::new())
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 9\r\n\r\n",
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                Framing::UntilClose,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", Framing::UntilClose, false),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                Framing::Empty,
                true,
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", Framing::Empty, true),
            (
                "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n",
                Framing::Length(1),
                true,
            ),
        ];
        for (text, framing, reusable) in cases {
            let head = response(text).unwrap().unwrap();
            assert_eq!(
                (head.framing, head.reusable),
                (framing, reusable),
                "{text:?}"
            );
        }
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "NOT HTTP\r\n\r\n",
        ] {
            assert!(response(bad).is_err(), "{bad:?}");
        }
        assert!(response("HTTP/1.1 200 OK\r\nContent-Le").unwrap().is_none());
    }

    /// Decodes `input` fed in pieces of `step` bytes, as reads would deliver it.
    fn decode(input: &[u8], step: usize) -> Result<(Vec<u8>, usize), BadResponse> {
        let mut chunked = Chunked::default();
        let mut data = Vec::new();
        let mut pending = BytesMut::new();
        let mut fed = 0;
        loop {
            match chunked.step(&pending)? {
                Step::Data { skip, len } => {
                    data.extend_from_slice(&pending[skip..skip + len]);
                    let _ = pending.split_to(skip + len);
                }
                Step::More => {
                    pending.clear();
                    if fed == input.len() {
                        return Err(BadResponse::BadChunk);
                    }
                    let end = (fed + step).min(input.len());
                    pending.extend_from_slice(&input[fed..end]);
                    fed = end;
                }
                Step::End { used } => {
                    let _ = pending.split_to(used);
                    return Ok((data, input.len() - fed + pending.len()));
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_the_same_however_they_are_cut() {
        let body = b"5\r\nhello\r\n7;name=value\r\n, world\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\nOther: y\r\n\r\nREST";
        for step in 1..body.len() {
            let (data, left) = decode(body, step).unwrap();
            assert_eq!(data, b"hello, world0123456789abcdef", "step {step}");
            assert_eq!(left, 4, "step {step}: what follows the body is left");
        }
        assert_eq!(decode(b"0\r\n\r\n", 3).unwrap().0, b"");
        assert_eq!(
            decode(b"A \t;x\r\n0123456789\r\n0\r\n\r\n", 2).unwrap().0,
            b"0123456789"
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for bad in [
            &b"5\r\nhelloXX0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"\r\n",
            b"g\r\n",
            b";x\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"1;a\nb\r\nx\r\n0\r\n\r\n",
            b"10000000000000000\r\n",
        ] {
            for step in [1, 3, bad.len()] {
                assert!(
                    decode(bad, step).is_err(),
                    "{:?} in steps of {step}",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        let long_extension = format!("1;{}\r\nx\r\n0\r\n\r\n", "e".repeat(MAX_LINE));
        assert!(decode(long_extension.as_bytes(), 512).is_err());
    }

    #[test]
    fn response_heads_carry_framing_date_and_close() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        let mut out = BytesMut::new();
        write_response_head(
            &mut out,
            StatusCode::OK,
            map_fields(&headers).iter().copied(),
            ClientFraming::Length(2),
            false,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: "),
            "{text}"
        );
        assert!(
            text.ends_with(" GMT\r\ncontent-length: 2\r\n\r\n"),
            "{text}"
        );

        headers.insert("date", HeaderValue::from_static("upstream's"));
        let mut out = BytesMut::new();
        write_response_head(
            &mut out,
            StatusCode::BAD_GATEWAY,
            map_fields(&headers).iter().copied(),
            ClientFraming::Chunked,
            true,
        );
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert_eq!(
            text,
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ndate: upstream's\r\n\
             transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
        );
        let mut out = BytesMut::new();
        put_chunk(&mut out, &[b'x'; 26]);
        put_chunk(&mut out, b"");
        assert_eq!(&out[..], format!("1a\r\n{}\r\n", "x".repeat(26)).as_bytes());
    }
}
