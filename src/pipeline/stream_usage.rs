//! `[usage] inject_stream_usage`: a Chat Completions or Completions stream whose request did
//! not ask for usage is asked for it upstream, so the tap can count its tokens, and the one
//! chunk that only carries the usage is kept from the client, who did not ask for it.
//!
//! The request's JSON is edited as text, never re-serialised: the client's bytes stay as
//! they were, with `"stream_options":{"include_usage":true}` (or the one missing member)
//! written in. A body that is not such a request (not JSON, not an object, `stream` not
//! `true`, a duplicate key) is forwarded unchanged: this feature never refuses a request.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::sse::{self, event_end, last_event_end, names_usage_object};

/// What asking for usage writes in: where `stream_options` is missing, where it is `null`,
/// and where it lacks the member.
const STREAM_OPTIONS: &[u8] = br#""stream_options":{"include_usage":true}"#;
const OPTIONS: &[u8] = br#"{"include_usage":true}"#;
const INCLUDE_USAGE: &[u8] = br#""include_usage":true"#;

/// The members of a chat or completions request this reads; every other one is skipped.
#[derive(Deserialize)]
struct StreamRequest<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    include_usage: Option<&'a RawValue>,
}

/// A member that is there, even as `null` (`Option`'s own reading would take `null` for
/// absent, and writing the member in then would duplicate it).
fn present<'de, D: Deserializer<'de>>(value: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(value).map(Some)
}

/// The request with usage asked for, when it is a stream that did not ask for it; `None`
/// when it goes upstream as it is.
pub(super) fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    let request: StreamRequest = serde_json::from_slice(body).ok()?;
    if request.stream?.get() != "true" {
        return None;
    }
    let edit = match request.stream_options {
        // Missing: written in as the object's first member.
        None => {
            let open = body.iter().position(|byte| *byte == b'{')?;
            Edit::insert(open + 1, STREAM_OPTIONS, true)
        }
        Some(raw) if raw.get() == "null" => {
            let at = offset(body, raw)?;
            Edit::replace(at, raw.get().len(), OPTIONS)
        }
        Some(raw) => {
            let options: StreamOptions = serde_json::from_str(raw.get()).ok()?;
            match options.include_usage {
                Some(value) if value.get() == "true" => return None,
                Some(value) => Edit::replace(offset(body, value)?, value.get().len(), b"true"),
                None => {
                    let open = offset(body, raw)?;
                    let empty = raw.get()[1..].trim_start().starts_with('}');
                    Edit::insert(open + 1, INCLUDE_USAGE, !empty)
                }
            }
        }
    };
    Some(edit.apply(body))
}

/// Where `raw`, read from `body`, starts in it.
fn offset(body: &[u8], raw: &RawValue) -> Option<usize> {
    (raw.get().as_ptr() as usize).checked_sub(body.as_ptr() as usize)
}

/// One change to the request's text.
struct Edit<'a> {
    at: usize,
    removed: usize,
    text: &'a [u8],
    /// A comma follows the text (it goes before another member).
    comma: bool,
}

impl<'a> Edit<'a> {
    fn insert(at: usize, text: &'a [u8], comma: bool) -> Edit<'a> {
        Edit {
            at,
            removed: 0,
            text,
            comma,
        }
    }

    fn replace(at: usize, removed: usize, text: &'a [u8]) -> Edit<'a> {
        Edit {
            at,
            removed,
            text,
            comma: false,
        }
    }

    fn apply(&self, body: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(body.len() + self.text.len() + 1);
        out.extend_from_slice(&body[..self.at]);
        out.extend_from_slice(self.text);
        if self.comma {
            out.extend_from_slice(b",");
        }
        out.extend_from_slice(&body[self.at + self.removed..]);
        out.freeze()
    }
}

/// An event longer than this without its end passes on as it comes: the usage-only chunk
/// is far smaller, so an event this long is not it.
const HELD_AT_MOST: usize = 64 << 10;

/// Keeps the usage-only chunk (`"choices": []` with a `usage` object) out of an event
/// stream. Whole events pass on as soon as their blank line has come; only a partial event
/// is held back, until it ends.
#[derive(Default)]
pub(crate) struct UsageChunkFilter {
    /// The start of an event whose end has not come.
    held: BytesMut,
    /// The current event's start has already passed on (it grew past [`HELD_AT_MOST`]).
    passing: bool,
}

impl UsageChunkFilter {
    /// What of `chunk` goes on to the client now (possibly nothing).
    pub(crate) fn pass(&mut self, chunk: Bytes) -> Bytes {
        if self.held.is_empty() && !self.passing {
            // Most chunks are whole events: passed on as they are, or without the usage one.
            if let Some(end) = last_event_end(&chunk) {
                if !names_usage_object(&chunk) {
                    self.held.extend_from_slice(&chunk[end..]);
                    return chunk.slice(..end);
                }
            }
        }
        self.held.extend_from_slice(&chunk);
        let mut out = BytesMut::new();
        while let Some(end) = event_end(&self.held) {
            let event = self.held.split_to(end);
            if std::mem::take(&mut self.passing) || !is_usage_only(&event) {
                out.extend_from_slice(&event);
            }
        }
        if self.held.len() > HELD_AT_MOST {
            self.passing = true;
            out.extend_from_slice(&self.held);
            self.held.clear();
        } else if self.passing {
            out.extend_from_slice(&self.held);
            self.held.clear();
        }
        out.freeze()
    }

    /// What is left when the upstream's stream has ended: an event it never finished.
    pub(crate) fn finish(&mut self) -> Bytes {
        self.passing = false;
        let rest = std::mem::take(&mut self.held);
        if is_usage_only(&rest) {
            Bytes::new()
        } else {
            rest.freeze()
        }
    }
}

/// Whether `event` is the chunk that carries only the usage: its data is an object with an
/// empty `choices` and a `usage` object.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk<'a> {
        choices: Vec<serde::de::IgnoredAny>,
        #[serde(borrow)]
        usage: Option<&'a RawValue>,
    }
    if !names_usage_object(event) {
        return false;
    }
    let data = sse::data(event);
    match serde_json::from_slice::<Chunk>(&data) {
        Ok(chunk) => chunk.choices.is_empty() && chunk.usage.is_some_and(|u| u.get() != "null"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(body: &str) -> Option<String> {
        ask_for_usage(body.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    #[test]
    fn a_stream_that_did_not_ask_is_asked_for_usage_in_its_own_text() {
        assert_eq!(
            asked(r#"{"model":"m","stream":true,"n":1.50}"#).as_deref(),
            Some(r#"{"stream_options":{"include_usage":true},"model":"m","stream":true,"n":1.50}"#)
        );
        assert_eq!(
            asked(r#" { "stream": true, "stream_options": null }"#).as_deref(),
            Some(r#" { "stream": true, "stream_options": {"include_usage":true} }"#)
        );
        assert_eq!(
            asked(r#"{"stream":true,"stream_options":{ }}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true }}"#)
        );
        assert_eq!(
            asked(r#"{"stream":true,"stream_options":{"x":1}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true,"x":1}}"#)
        );
        assert_eq!(
            asked(r#"{"stream":true,"stream_options":{"include_usage":false}}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true}}"#)
        );
        for unchanged in [
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":false}"#,
            r#"{"model":"m"}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream":true}"#,
            r#"{"stream":true"#,
            r#"[{"stream":true}]"#,
            "not json",
        ] {
            assert_eq!(asked(unchanged), None, "{unchanged}");
        }
    }

    fn filtered(chunks: &[&str]) -> String {
        let mut filter = UsageChunkFilter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend_from_slice(&filter.pass(Bytes::copy_from_slice(chunk.as_bytes())));
        }
        out.extend_from_slice(&filter.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn only_the_usage_chunk_is_kept_back_however_the_stream_is_cut() {
        let first = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n";
        let usage = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n";
        let done = "data: [DONE]\n\n";
        let stream = format!("{first}{usage}{done}");
        let expected = format!("{first}{done}");
        for cut in 0..stream.len() {
            let (a, b) = stream.split_at(cut);
            assert_eq!(filtered(&[a, b]), expected, "cut at {cut}");
        }
        let bytes: Vec<String> = stream.chars().map(String::from).collect();
        let refs: Vec<&str> = bytes.iter().map(String::as_str).collect();
        assert_eq!(filtered(&refs), expected);
        let crlf = stream.replace('\n', "\r\n");
        assert_eq!(filtered(&[&crlf]), expected.replace('\n', "\r\n"));
        // Not the usage-only chunk: an Azure content-filter chunk, an unfinished stream.
        let azure = "data: {\"choices\":[],\"prompt_filter_results\":[]}\n\n";
        assert_eq!(filtered(&[azure]), azure);
        assert_eq!(filtered(&["data: {\"choices\":[],\"usage\":{}}"]), "");
        assert_eq!(filtered(&["data: {\"choi"]), "data: {\"choi");
    }
}
