//! Response heads: parsed in place on the upstream side, written on the client side.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;

use super::{offset, part, valid_value, Span, MAX_HEADERS};
use crate::headers::{content_length, is_named, list_items_of};

fn slice(head: &Bytes, (start, len): (usize, usize)) -> Bytes {
    head.slice(start..start + len)
}

/// How a body is delimited (RFC 9112 §6.3): as the upstream's answer says on the way in, and
/// as the fast engine writes it on the way out. The one framing type of the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body, and no length either (204, 304).
    Empty,
    Length(u64),
    /// Chunked; for an answer that came over HTTP/2, one whose length is not known ahead.
    Chunked,
    /// Until the connection closes.
    UntilClose,
}

/// An upstream response head.
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: StatusCode,
    pub fields: Fields,
    pub framing: Framing,
    /// The connection can carry another request afterwards.
    pub reusable: bool,
}

/// A head's header fields as they arrived: read, filtered and written in place, with no
/// header map built in between.
#[derive(Debug)]
pub(crate) struct Fields {
    raw: Bytes,
    spans: Vec<Span>,
    /// Fields the gateway adds (rare: usually empty, which allocates nothing), after the
    /// ones that arrived.
    added: Vec<(HeaderName, HeaderValue)>,
}

impl Fields {
    /// Every field, name and value, in the order received.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let arrived = self
            .spans
            .iter()
            .filter(|span| span.name.1 > 0)
            .map(|span| (part(&self.raw, span.name), part(&self.raw, span.value)));
        let added = self
            .added
            .iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()));
        arrived.chain(added)
    }

    /// Adds a field after the others.
    pub(crate) fn append(&mut self, name: HeaderName, value: HeaderValue) {
        self.added.push((name, value));
    }

    /// The first value of the header `name`.
    pub(crate) fn get(&self, name: &HeaderName) -> Option<&[u8]> {
        match self.find(name) {
            Some(span) => Some(part(&self.raw, span.value)),
            None => self.added(name).map(HeaderValue::as_bytes),
        }
    }

    /// Every value of the header `name`, in order.
    pub(crate) fn get_all<'a>(
        &'a self,
        name: &'a HeaderName,
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let name = name.as_str().as_bytes();
        self.iter()
            .filter(move |(field, _)| is_named(field, name))
            .map(|(_, value)| value)
    }

    /// The first value of the header `name`, sharing the head's storage.
    pub(crate) fn value(&self, name: &HeaderName) -> Option<HeaderValue> {
        match self.find(name) {
            Some(span) => HeaderValue::from_maybe_shared(slice(&self.raw, span.value)).ok(),
            None => self.added(name).cloned(),
        }
    }

    fn added(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.added
            .iter()
            .find(|(added, _)| added == name)
            .map(|(_, value)| value)
    }

    fn find(&self, name: &HeaderName) -> Option<&Span> {
        let name = name.as_str().as_bytes();
        self.spans
            .iter()
            .find(|span| is_named(part(&self.raw, span.name), name))
    }

    /// Keeps the fields whose name `keep` accepts, in order. Why a field is blanked rather
    /// than taken out: nothing behind it has to move.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) {
        let raw = &self.raw;
        for span in &mut self.spans {
            if span.name.1 > 0 && !keep(part(raw, span.name)) {
                span.name = (0, 0);
            }
        }
        self.added
            .retain(|(name, _)| keep(name.as_str().as_bytes()));
    }

    /// The fields as a header map (values share the head's storage), for an engine that
    /// needs one.
    pub(crate) fn to_header_map(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.spans.len());
        for span in self.spans.iter().filter(|span| span.name.1 > 0) {
            let name = HeaderName::from_bytes(part(&self.raw, span.name));
            let value = HeaderValue::from_maybe_shared(slice(&self.raw, span.value));
            // The parser let through only fields `http` takes.
            if let (Ok(name), Ok(value)) = (name, value) {
                map.append(name, value);
            }
        }
        for (name, value) in &self.added {
            map.append(name.clone(), value.clone());
        }
        map
    }
}

// Why: every answer's head has a field list; recycling them per thread spares an allocation
// per request on the fast path (workers are single-threaded, so a list stays on its thread).
thread_local! {
    static FREE_SPANS: RefCell<Vec<Vec<Span>>> = const { RefCell::new(Vec::new()) };
}

/// Field lists kept for reuse per thread, and the largest kept.
const FREE_LISTS: usize = 256;
const KEEP_SPANS: usize = 2 * MAX_HEADERS;

fn take_spans() -> Vec<Span> {
    FREE_SPANS
        .with(|free| free.borrow_mut().pop())
        .unwrap_or_default()
}

fn give_spans(mut spans: Vec<Span>) {
    if spans.capacity() == 0 || spans.capacity() > KEEP_SPANS {
        return;
    }
    spans.clear();
    FREE_SPANS.with(|free| {
        let mut free = free.borrow_mut();
        if free.len() < FREE_LISTS {
            free.push(spans);
        }
    });
}

impl Drop for Fields {
    fn drop(&mut self) {
        give_spans(std::mem::take(&mut self.spans));
    }
}

/// Why an upstream's answer cannot be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadResponse {
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
pub(crate) fn parse_response(buf: &mut BytesMut) -> Result<Option<ResponseHead>, BadResponse> {
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
    let mut spans = take_spans();
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
        spans,
        added: Vec::new(),
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

/// Writes a response head: the status line, the fields as they stand (the framing fields
/// are the writer's: the ones given are left out), `Date` when there is none, then the
/// framing and `Connection: close` when this is the connection's last answer. A body that
/// ends with the connection (`UntilClose`) gets no framing field: its end is the close.
pub(crate) fn write_response_head<'h>(
    out: &mut BytesMut,
    status: StatusCode,
    fields: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    framing: Framing,
    close: bool,
) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.put_slice(b"\r\n");
    let mut dated = false;
    for (name, value) in fields {
        dated |= name.eq_ignore_ascii_case(b"date");
        if !name.eq_ignore_ascii_case(b"content-length")
            && !name.eq_ignore_ascii_case(b"transfer-encoding")
        {
            // Lowercase, as hyper writes names from its map.
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
        super::date::put(out);
        out.put_slice(b"\r\n");
    }
    match framing {
        Framing::Length(len) => {
            out.put_slice(b"content-length: ");
            out.put_slice(itoa::Buffer::new().format(len).as_bytes());
            out.put_slice(b"\r\n");
        }
        Framing::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        Framing::Empty | Framing::UntilClose => {}
    }
    if close {
        out.put_slice(b"connection: close\r\n");
    }
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::put_chunk;

    fn map_fields(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
        headers
            .iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes()))
    }

    fn response(text: &str) -> Result<Option<ResponseHead>, BadResponse> {
        parse_response(&mut BytesMut::from(text.as_bytes()))
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

    #[test]
    fn response_heads_carry_framing_date_and_close() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        let mut out = BytesMut::new();
        write_response_head(
            &mut out,
            StatusCode::OK,
            map_fields(&headers),
            Framing::Length(2),
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
            map_fields(&headers),
            Framing::Chunked,
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
