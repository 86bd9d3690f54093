//! The model a request names, read where the API carries it: a JSON body's `model`, a
//! multipart `model` field that comes before the first file, or a Realtime `?model=`.
//!
//! Read only when a feature needs it (a span's name, a key's `models`): nothing here runs for
//! a request that no such feature governs. A multipart body is read only as far as its fields
//! before the first file, and those bytes go on ahead of the rest as they came.

use std::borrow::Cow;
use std::io;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use http::uri::PathAndQuery;
use http::{header, HeaderMap};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::message::RequestBody;

/// The longest model name read: longer is not a name.
pub(super) const MODEL_AT_MOST: usize = 256;

/// The most of a multipart body held to find its `model` field: the fields before the file.
/// The SDKs send a few short ones there.
const FIELDS_AT_MOST: usize = 64 << 10;

/// The model a request names, and where a JSON body holds it: the string's bytes, quotes
/// included, so that renaming it needs no second pass over the body.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Named {
    pub(super) model: String,
    pub(super) at: Option<Range<usize>>,
}

impl Named {
    pub(super) fn as_str(&self) -> &str {
        &self.model
    }
}

/// The `model` a JSON request names, if it is short enough to be a name.
pub(super) fn in_json(body: &[u8]) -> Option<String> {
    located_in_json(body).map(|named| named.model)
}

/// The `model` a JSON request names and where its string stands in the body.
pub(super) fn located_in_json(body: &[u8]) -> Option<Named> {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        model: Option<&'a RawValue>,
    }
    let raw = serde_json::from_slice::<Raw>(body).ok()?.model?;
    // A string, decoded (escapes and all); anything else names no model.
    let model: Cow<str> = serde_json::from_str(raw.get()).ok()?;
    if model.len() > MODEL_AT_MOST {
        return None;
    }
    let at = (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    Some(Named {
        model: model.into_owned(),
        at: Some(at..at + raw.get().len()),
    })
}

/// The `model` of a request target's query (`/v1/realtime?model=…`), decoded.
pub(super) fn in_query(target: &PathAndQuery) -> Option<String> {
    let query = target.query()?;
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("model="))?;
    let plus_decoded = value.replace('+', " ");
    let model = percent_encoding::percent_decode_str(&plus_decoded)
        .decode_utf8()
        .ok()?;
    (!model.is_empty() && model.len() <= MODEL_AT_MOST).then(|| model.into_owned())
}

/// The boundary of a `multipart/form-data` body (RFC 7578 §4.1), from its `Content-Type`.
pub(super) fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mut params = content_type.split(';');
    let essence = params.next()?.trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        let value = value.trim().trim_matches('"');
        (name.trim().eq_ignore_ascii_case("boundary") && !value.is_empty() && value.len() <= 70)
            .then(|| value.to_owned())
    })
}

/// What the start of a multipart body says about its `model` field.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fields {
    /// The field, before any file.
    Model(Option<String>),
    /// A file part came first, or the body ended, without one.
    NoModel,
    /// The bytes so far end inside a part before any file: read more.
    NeedMore,
}

/// Reads the parts of `body` (a multipart body's first bytes, separated by `boundary`) up to
/// the first file part, for a `model` field (RFC 7578 §4.2: each part's
/// `Content-Disposition: form-data; name="…"`, with a `filename` for a file).
pub(super) fn scan_fields(body: &[u8], boundary: &str) -> Fields {
    match model_field(body, boundary) {
        Field::At(span) => {
            let value = std::str::from_utf8(&body[span]).ok();
            let model = value.filter(|model| model.len() <= MODEL_AT_MOST);
            Fields::Model(model.map(str::to_owned))
        }
        Field::Absent => Fields::NoModel,
        Field::NeedMore => Fields::NeedMore,
    }
}

/// Where a form's `model` field is, before its first file.
enum Field {
    At(Range<usize>),
    Absent,
    NeedMore,
}

fn model_field(body: &[u8], boundary: &str) -> Field {
    let delimiter = format!("--{boundary}");
    let Some(mut at) = memchr::memmem::find(body, delimiter.as_bytes()) else {
        return Field::NeedMore;
    };
    loop {
        let part = &body[at + delimiter.len()..];
        if part.len() < 2 {
            return Field::NeedMore;
        }
        if part.starts_with(b"--") {
            return Field::Absent;
        }
        let Some(head_len) = memchr::memmem::find(part, b"\r\n\r\n") else {
            return Field::NeedMore;
        };
        let (name, is_file) = disposition(&part[..head_len]);
        if is_file {
            return Field::Absent;
        }
        let content = &part[head_len + 4..];
        let ending = format!("\r\n{delimiter}");
        let Some(content_len) = memchr::memmem::find(content, ending.as_bytes()) else {
            return Field::NeedMore;
        };
        let start = body.len() - content.len();
        if name.as_deref() == Some("model") {
            return Field::At(start..start + content_len);
        }
        at = start + content_len + 2;
    }
}

/// `body` (a JSON request whose `model` string stands `at`, as [`located_in_json`] found
/// it) with that string written as `model`: every other byte goes as the client sent it.
pub(super) fn renamed_in_json(body: &[u8], at: Range<usize>, model: &str) -> Option<Bytes> {
    let quoted = serde_json::to_string(model).ok()?;
    body.get(at.clone())?;
    Some(spliced(body, at, quoted.as_bytes()))
}

/// `body` (a form's first bytes, at least through its `model` field) with that field's
/// value written as `model`; `None` when the form has no such field before its first file.
pub(super) fn renamed_in_form(body: &[u8], boundary: &str, model: &str) -> Option<Bytes> {
    match model_field(body, boundary) {
        Field::At(span) => Some(spliced(body, span, model.as_bytes())),
        Field::Absent | Field::NeedMore => None,
    }
}

/// `body` with the bytes of `span` replaced by `text`.
fn spliced(body: &[u8], span: Range<usize>, text: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() - span.len() + text.len());
    out.extend_from_slice(&body[..span.start]);
    out.extend_from_slice(text);
    out.extend_from_slice(&body[span.end..]);
    out.freeze()
}

/// A part's field name and whether it is a file, from its header lines.
fn disposition(head: &[u8]) -> (Option<String>, bool) {
    let head = String::from_utf8_lossy(head);
    let disposition = head.split("\r\n").find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-disposition")
            .then_some(value)
    });
    let Some(disposition) = disposition else {
        return (None, false);
    };
    let mut name = None;
    let mut is_file = false;
    for param in disposition.split(';').skip(1) {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        let key = key.trim();
        if key.eq_ignore_ascii_case("name") {
            name = Some(value.trim().trim_matches('"').to_owned());
        } else if key.eq_ignore_ascii_case("filename") || key.eq_ignore_ascii_case("filename*") {
            is_file = true;
        }
    }
    (name, is_file)
}

/// A multipart body whose fields before the first file were read, and the model among them.
pub(super) struct HeldFields<S> {
    /// The bytes read so far: the fields, and perhaps the start of a file.
    pub(super) held: Bytes,
    pub(super) rest: S,
    pub(super) model: Option<String>,
}

impl<S> HeldFields<S>
where
    S: Stream<Item = io::Result<Bytes>> + Send + Sync + 'static,
{
    /// The whole body, the held bytes first.
    pub(super) fn into_body(self) -> RequestBody {
        let first = futures_util::stream::iter((!self.held.is_empty()).then(|| Ok(self.held)));
        RequestBody::streaming(first.chain(self.rest))
    }
}

/// Reads `chunks` (a multipart body) until its fields before the first file show whether it
/// names a model, holding at most about [`FIELDS_AT_MOST`].
pub(super) async fn hold_fields<S>(mut chunks: S, boundary: &str) -> io::Result<HeldFields<S>>
where
    S: Stream<Item = io::Result<Bytes>> + Send + Sync + Unpin + 'static,
{
    let mut held = BytesMut::new();
    let model = loop {
        match scan_fields(&held, boundary) {
            Fields::Model(model) => break model,
            Fields::NoModel => break None,
            Fields::NeedMore if held.len() >= FIELDS_AT_MOST => break None,
            Fields::NeedMore => match chunks.next().await {
                Some(chunk) => held.extend_from_slice(&chunk?),
                None => break None,
            },
        }
    };
    Ok(HeldFields {
        held: held.freeze(),
        rest: chunks,
        model,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDARY: &str = "b0undary";

    fn form(parts: &[(&str, Option<&str>, &str)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, filename, content) in parts {
            body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
            let file = filename.map_or(String::new(), |f| format!("; filename=\"{f}\""));
            body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"{file}\r\n").as_bytes(),
            );
            if filename.is_some() {
                body.extend_from_slice(b"Content-Type: audio/wav\r\n");
            }
            body.extend_from_slice(format!("\r\n{content}\r\n").as_bytes());
        }
        body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
        body
    }

    #[test]
    fn a_model_field_before_the_file_is_read() {
        let body = form(&[
            ("language", None, "en"),
            ("model", None, "whisper-1"),
            ("file", Some("a.wav"), "RIFF...."),
        ]);
        assert_eq!(
            scan_fields(&body, BOUNDARY),
            Fields::Model(Some("whisper-1".into()))
        );
        // Every cut of the body before the field's end asks for more.
        let end = memchr::memmem::find(&body, b"whisper-1").unwrap() + 9 + 2 + 2;
        for cut in 0..end {
            assert_eq!(
                scan_fields(&body[..cut], BOUNDARY),
                Fields::NeedMore,
                "{cut}"
            );
        }
    }

    #[test]
    fn a_model_after_the_file_or_none_at_all_is_no_model() {
        let after = form(&[("file", Some("a.wav"), "x"), ("model", None, "whisper-1")]);
        assert_eq!(scan_fields(&after, BOUNDARY), Fields::NoModel);
        let none = form(&[("purpose", None, "batch")]);
        assert_eq!(scan_fields(&none, BOUNDARY), Fields::NoModel);
        // `filename=` is not `name=`.
        let named_file = form(&[("model", Some("model"), "gpt-4o")]);
        assert_eq!(scan_fields(&named_file, BOUNDARY), Fields::NoModel);
    }

    #[tokio::test]
    async fn held_fields_go_on_ahead_of_the_rest_byte_for_byte() {
        let body = form(&[
            ("model", None, "gpt-4o-transcribe"),
            ("file", Some("a"), "data"),
        ]);
        let chunks: Vec<io::Result<Bytes>> = body
            .chunks(7)
            .map(|chunk| Ok(Bytes::copy_from_slice(chunk)))
            .collect();
        let held = hold_fields(futures_util::stream::iter(chunks), BOUNDARY)
            .await
            .unwrap();
        assert_eq!(held.model.as_deref(), Some("gpt-4o-transcribe"));
        let crate::message::Body::Stream(chunks) = held.into_body() else {
            panic!("a held body goes on as a stream");
        };
        let sent = http_body_util::BodyExt::collect(chunks).await.unwrap();
        assert_eq!(sent.to_bytes(), body);
    }

    #[test]
    fn a_rename_changes_the_models_bytes_and_no_other() {
        let rename = |json: &[u8], model: &str| {
            let at = located_in_json(json)?.at?;
            renamed_in_json(json, at, model)
        };
        let json = br#"{ "model" : "fast", "messages":[{"role":"user","content":"model"}]}"#;
        let renamed = rename(json, "llama-3.1-8b-instant").unwrap();
        assert_eq!(
            &renamed[..],
            br#"{ "model" : "llama-3.1-8b-instant", "messages":[{"role":"user","content":"model"}]}"#
        );
        assert_eq!(
            &rename(br#"{"model":"a\u0062"}"#, "say \"b\"").unwrap()[..],
            br#"{"model":"say \"b\""}"#
        );
        assert_eq!(
            located_in_json(br#"{"model":"a\u0062"}"#).unwrap().model,
            "ab"
        );
        assert_eq!(rename(br#"{"model":7}"#, "x"), None);
        assert_eq!(rename(b"[]", "x"), None);
        let body = form(&[("model", None, "fast"), ("file", Some("a.wav"), "model")]);
        let renamed = renamed_in_form(&body, BOUNDARY, "whisper-large-v3").unwrap();
        let expected = form(&[
            ("model", None, "whisper-large-v3"),
            ("file", Some("a.wav"), "model"),
        ]);
        assert_eq!(renamed, expected);
        let after = form(&[("file", Some("a.wav"), "x"), ("model", None, "fast")]);
        assert_eq!(renamed_in_form(&after, BOUNDARY, "y"), None);
    }

    #[test]
    fn the_boundary_and_the_query_model_are_read() {
        let headers =
            crate::headers::test_map(&[("content-type", "multipart/form-data; boundary=\"abc\"")]);
        assert_eq!(multipart_boundary(&headers).as_deref(), Some("abc"));
        let json = crate::headers::test_map(&[("content-type", "application/json")]);
        assert_eq!(multipart_boundary(&json), None);
        let target = PathAndQuery::from_static("/v1/realtime?x=1&model=gpt-4o%2Drealtime");
        assert_eq!(in_query(&target).as_deref(), Some("gpt-4o-realtime"));
        assert_eq!(in_query(&PathAndQuery::from_static("/v1/realtime")), None);
        assert_eq!(
            in_json(br#"{"model":"gpt-4o","n":1}"#).as_deref(),
            Some("gpt-4o")
        );
        assert_eq!(in_json(b"not json"), None);
    }
}
