//! Request heads: parsed in place on the client side, written on the upstream side.

use std::mem::MaybeUninit;

use bytes::{BufMut, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::Method;

use super::{offset, valid_value, Parse, Span, MAX_HEADERS};
use crate::headers::content_length;

/// A request head the fast engine can serve.
#[derive(Debug)]
pub(crate) struct RequestHead {
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
    /// Where the target sits in `raw`.
    target_span: (usize, usize),
}

impl RequestHead {
    /// The target without its first `skip` bytes (a path prefix the router took), sharing the
    /// head's storage; `None` when what is left is not a path.
    pub(crate) fn target_after(&self, skip: usize) -> Option<http::uri::PathAndQuery> {
        if skip == 0 {
            return Some(self.target.clone());
        }
        let (start, len) = self.target_span;
        let rest = self.raw.slice(start + skip.min(len)..start + len);
        http::uri::PathAndQuery::from_maybe_shared(rest).ok()
    }
}

/// Parses the request head at the front of `buf` and, when it is complete and plain, takes
/// it off the buffer. Everything that could send it to hyper is decided before the buffer
/// is touched.
pub(crate) fn parse_request(buf: &mut BytesMut, spans: &mut Vec<Span>) -> Parse<RequestHead> {
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
    let target_span = offset(buf, path.as_bytes());
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
    let Ok(target) = http::uri::PathAndQuery::from_maybe_shared(slice(&head, target_span)) else {
        return unsplit(buf, &head);
    };
    Parse::Complete(RequestHead {
        method,
        target,
        headers,
        body_len: body_len.unwrap_or(0),
        close,
        raw: head,
        target_span,
    })
}

/// Puts a head taken off the buffer back in front of it, for hyper.
fn unsplit<T>(buf: &mut BytesMut, head: &Bytes) -> Parse<T> {
    *buf = rejoin(head, buf);
    Parse::Refer
}

/// A head's bytes followed by what came after it: what hyper must read when the fast engine hands
/// a request over.
pub(crate) fn rejoin(head: &[u8], rest: &[u8]) -> BytesMut {
    let mut whole = BytesMut::with_capacity(head.len() + rest.len());
    whole.extend_from_slice(head);
    whole.extend_from_slice(rest);
    whole
}

fn slice(head: &Bytes, (start, len): (usize, usize)) -> Bytes {
    head.slice(start..start + len)
}

/// A request's `Connection` value the fast engine understands: `Some(true)` for `close`,
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

/// Writes a request head for the upstream: the request line with `target` (path and query as
/// the upstream should see them), then every header of `headers` as it stands (the pipeline
/// has already applied the header rules and set `Host`), and `Content-Length` for a body the
/// headers do not declare.
pub(crate) fn write_request_head(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body_len: usize,
) {
    out.put_slice(method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    let mut declared = false;
    for (name, value) in headers {
        declared |= name == http::header::CONTENT_LENGTH;
        out.put_slice(name.as_str().as_bytes());
        out.put_slice(b": ");
        out.put_slice(value.as_bytes());
        out.put_slice(b"\r\n");
    }
    if body_len > 0 && !declared {
        out.put_slice(b"content-length: ");
        out.put_slice(itoa::Buffer::new().format(body_len).as_bytes());
        out.put_slice(b"\r\n");
    }
    out.put_slice(b"\r\n");
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

    #[test]
    fn a_request_head_is_written_as_the_headers_stand() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("upstream:8000"));
        headers.insert("authorization", HeaderValue::from_static("Bearer k"));
        let mut out = BytesMut::new();
        write_request_head(&mut out, &Method::POST, "/base/v1/x?a=1", &headers, 2);
        assert_eq!(
            &out[..],
            b"POST /base/v1/x?a=1 HTTP/1.1\r\nhost: upstream:8000\r\nauthorization: Bearer k\r\n\
              content-length: 2\r\n\r\n"
        );
    }
}
