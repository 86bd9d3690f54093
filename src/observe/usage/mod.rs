//! The token usage tap: reads the `usage` object and the model name out of an answer as it
//! streams past, without holding back or changing a byte of it.
//!
//! The tap sees each chunk after it has been handed on. It reads the value after the first
//! `"model"` key (the name) and after each `"usage"` key (the object) straight from the
//! chunk; only a value the chunk's end cuts is copied, up to a small cap, and read once the
//! rest has come. It works the same on one JSON document and on a server-sent event stream:
//! - Chat Completions, Completions, Embeddings, images, audio: the top-level `usage` object.
//! - Chat streams with `stream_options.include_usage`: every chunk says `"usage":null` except
//!   the last, which carries the object.
//! - Responses streams: `response.completed` (or `.incomplete`, `.failed`) carries it.
//!
//! The last `usage` object seen wins; the first `model` string names the model. A key is
//! recognised lexically: `"usage"` preceded by a backslash is text inside a string (every
//! quote in a JSON string is escaped), so it is skipped.

mod report;

use std::sync::LazyLock;

use memchr::memmem::Finder;

use report::UsageObject;

use crate::sse::{self, USAGE_FINDER, USAGE_KEY};
pub(crate) use report::{Usage, TOKEN_KINDS};

/// The usage a Realtime server event reports: `response.done`'s `response.usage`, read only
/// from an event of that type (every other event is passed over after one search).
pub(crate) fn realtime_usage(event: &str) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Done {
        #[serde(rename = "type")]
        kind: String,
        response: Response,
    }
    #[derive(serde::Deserialize)]
    struct Response {
        usage: Option<UsageObject>,
    }
    if !event.contains("\"response.done\"") {
        return None;
    }
    let done: Done = serde_json::from_str(event).ok()?;
    if done.kind != "response.done" {
        return None;
    }
    Usage::from_object(done.response.usage?)
}

/// Bytes kept after a `"usage"` key: the object with every detail is well under this.
const USAGE_CAPTURE: usize = 4096;
/// Bytes kept after a `"model"` key.
const MODEL_CAPTURE: usize = 512;

const MODEL_KEY: &[u8] = b"\"model\"";
/// Both keys are this long, so one tail serves both searches.
const KEY_LEN: usize = 7;
const _: () = assert!(USAGE_KEY.len() == KEY_LEN && MODEL_KEY.len() == KEY_LEN);
static MODEL_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(MODEL_KEY));

/// Bytes being copied after a key was seen, up to a cap.
#[derive(Debug)]
struct Capture {
    bytes: Vec<u8>,
    cap: usize,
}

impl Capture {
    /// Starts copying with `first`, the bytes after the key in the chunk that had it.
    fn starting_with(first: &[u8], cap: usize) -> Capture {
        let mut capture = Capture {
            bytes: Vec::new(),
            cap,
        };
        capture.push(first);
        capture
    }

    fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.bytes.len());
        self.bytes.extend_from_slice(within(data, room));
    }
}

/// The last bytes of what the tap has seen, up to a key's length, kept in place.
#[derive(Debug, Clone, Copy, Default)]
struct Tail {
    bytes: [u8; KEY_LEN],
    len: usize,
}

impl Tail {
    fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// Appends `chunk`, keeping only the last [`KEY_LEN`] bytes.
    fn push(&mut self, chunk: &[u8]) {
        if let Some(last) = chunk.last_chunk::<KEY_LEN>() {
            self.bytes = *last;
            self.len = KEY_LEN;
        } else {
            let kept = (KEY_LEN - chunk.len()).min(self.len);
            self.bytes.copy_within(self.len - kept..self.len, 0);
            self.bytes[kept..kept + chunk.len()].copy_from_slice(chunk);
            self.len = kept + chunk.len();
        }
    }
}

/// The model the answer names: its first `"model"` key's value.
#[derive(Debug)]
enum Model {
    Unseen,
    /// The value did not end in the chunk that began it.
    Copying(Capture),
    Read(Option<String>),
}

/// Watches one answer go by. Feed it every chunk in order, then call [`UsageTap::finish`].
pub(crate) struct UsageTap {
    /// The previous chunk's last bytes, to find a key split across two chunks.
    tail: Tail,
    /// A `usage` value that did not end in the chunk that began it.
    usage: Option<Capture>,
    model: Model,
    best: Option<Usage>,
}

impl std::fmt::Debug for UsageTap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageTap")
            .field("best", &self.best)
            .finish_non_exhaustive()
    }
}

impl Default for UsageTap {
    fn default() -> Self {
        UsageTap::new()
    }
}

impl UsageTap {
    pub(crate) fn new() -> UsageTap {
        UsageTap {
            tail: Tail::default(),
            usage: None,
            model: Model::Unseen,
            best: None,
        }
    }

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        // A copy stops at its cap by itself.
        if let Some(capture) = self.usage.as_mut() {
            capture.push(chunk);
        }
        if let Model::Copying(capture) = &mut self.model {
            capture.push(chunk);
        }
        self.find_split_keys(chunk);
        let before = self.tail.as_slice().last().copied();
        for start in sse::usage_keys(chunk, before) {
            self.start_usage(&chunk[start + KEY_LEN..]);
        }
        if matches!(self.model, Model::Unseen) {
            if let Some(start) = sse::keys(&MODEL_FINDER, chunk, before).next() {
                self.start_model(&chunk[start + KEY_LEN..]);
            }
        }
        // Keep the last bytes for the next chunk: enough for a key minus one byte, plus the
        // byte before it (to tell an escaped quote).
        self.tail.push(chunk);
    }

    /// A key that began in the previous chunk and ends in this one.
    fn find_split_keys(&mut self, chunk: &[u8]) {
        let tail = self.tail;
        let tail = tail.as_slice();
        if tail.is_empty() {
            return;
        }
        // The tail and the chunk's first bytes, on the stack: this runs for every chunk.
        let head = &chunk[..chunk.len().min(KEY_LEN - 1)];
        let mut joint = [0u8; 2 * KEY_LEN - 1];
        let joint_len = tail.len() + head.len();
        joint[..tail.len()].copy_from_slice(tail);
        joint[tail.len()..joint_len].copy_from_slice(head);
        let joint = &joint[..joint_len];
        for (finder, is_usage) in [(&*USAGE_FINDER, true), (&*MODEL_FINDER, false)] {
            let Some(start) = finder.find(joint) else {
                continue;
            };
            let end = start + KEY_LEN;
            // Only a key that straddles the boundary: one wholly in the tail was already
            // seen, one wholly in the chunk is found by the chunk's own search.
            if start >= tail.len() || end <= tail.len() {
                continue;
            }
            if start > 0 && joint[start - 1] == b'\\' {
                continue;
            }
            let rest = &chunk[end - tail.len()..];
            if is_usage {
                self.start_usage(rest);
            } else if matches!(self.model, Model::Unseen) {
                self.start_model(rest);
            }
        }
    }

    /// The first `"model"` key: its value is read from the chunk when it ends there (a
    /// JSON answer usually arrives whole), else copied from here on.
    fn start_model(&mut self, rest: &[u8]) {
        self.model = match value_after_colon::<String>(within(rest, MODEL_CAPTURE)) {
            Read::Value(name) => Model::Read(Some(name)),
            Read::Incomplete => Model::Copying(Capture::starting_with(rest, MODEL_CAPTURE)),
            Read::Nothing => Model::Read(None),
        };
    }

    /// A new `"usage"` key: one still being copied is read now (it may hold the object,
    /// while the new one may say `null`); the new value is read from the chunk when it ends
    /// there, else copied from here on.
    fn start_usage(&mut self, rest: &[u8]) {
        if let Some(previous) = self.usage.take() {
            self.settle(&previous);
        }
        match value_after_colon::<UsageObject>(within(rest, USAGE_CAPTURE)) {
            Read::Value(object) => self.record(object),
            Read::Incomplete => {
                self.usage = Some(Capture::starting_with(rest, USAGE_CAPTURE));
            }
            Read::Nothing => {}
        }
    }

    /// Reads a copied value; one cut short by the copy's cap counts as absent.
    fn settle(&mut self, capture: &Capture) {
        if let Read::Value(object) = value_after_colon::<UsageObject>(&capture.bytes) {
            self.record(object);
        }
    }

    fn record(&mut self, object: UsageObject) {
        if let Some(usage) = Usage::from_object(object) {
            self.best = Some(usage);
        }
    }

    /// The usage of the whole answer, if it reported any, with the model when it named one.
    pub(crate) fn finish(mut self) -> Option<Usage> {
        if let Some(capture) = self.usage.take() {
            self.settle(&capture);
        }
        let mut usage = self.best.take()?;
        usage.model = match std::mem::replace(&mut self.model, Model::Unseen) {
            Model::Read(name) => name,
            Model::Copying(capture) => match value_after_colon::<String>(&capture.bytes) {
                Read::Value(name) => Some(name),
                Read::Incomplete | Read::Nothing => None,
            },
            Model::Unseen => None,
        };
        Some(usage)
    }
}

/// The first `cap` bytes of `bytes`: a value read in place is held to the same cap as a
/// copied one, so a longer one is absent either way.
fn within(bytes: &[u8], cap: usize) -> &[u8] {
    &bytes[..bytes.len().min(cap)]
}

/// What [`value_after_colon`] found.
enum Read<T> {
    Value(T),
    /// The bytes end before the value does: more may follow in the next chunk.
    Incomplete,
    /// Something else: `null`, a number, a value of another shape, not JSON.
    Nothing,
}

/// Parses the JSON value after `: ` at the start of `bytes`, ignoring what follows it.
fn value_after_colon<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Read<T> {
    let rest = bytes.trim_ascii_start();
    let Some(rest) = rest.strip_prefix(b":") else {
        return if rest.is_empty() {
            Read::Incomplete
        } else {
            Read::Nothing
        };
    };
    let rest = rest.trim_ascii_start();
    // Only self-delimiting values are read: a number cut at the chunk's end would parse.
    match rest.first() {
        None => return Read::Incomplete,
        Some(b'{' | b'"') => {}
        Some(_) => return Read::Nothing,
    }
    match serde_json::Deserializer::from_slice(rest)
        .into_iter::<T>()
        .next()
    {
        Some(Ok(value)) => Read::Value(value),
        Some(Err(err)) if err.is_eof() => Read::Incomplete,
        Some(Err(_)) | None => Read::Nothing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap_all(chunks: &[&[u8]]) -> Option<Usage> {
        let mut tap = UsageTap::new();
        for chunk in chunks {
            tap.feed(chunk);
        }
        tap.finish()
    }

    /// Every way of cutting `text` in two, and one byte at a time.
    fn all_splits(text: &[u8]) -> Vec<Option<Usage>> {
        let mut results = Vec::new();
        for cut in 0..=text.len() {
            results.push(tap_all(&[&text[..cut], &text[cut..]]));
        }
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        results.push(tap_all(&bytes));
        results
    }

    const CHAT: &str = r#"{
  "id": "chatcmpl-1",
  "object": "chat.completion",
  "model": "gpt-4o-mini-2024-07-18",
  "choices": [{"index": 0, "message": {"role": "assistant", "content": "say \"usage\": {\"prompt_tokens\": 999}"}}],
  "usage": {
    "prompt_tokens": 19,
    "completion_tokens": 10,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2}
  },
  "system_fingerprint": "fp_1"
}"#;

    #[test]
    fn reads_a_pretty_printed_chat_completion_at_every_split() {
        let expected = Usage {
            model: Some("gpt-4o-mini-2024-07-18".to_owned()),
            input: 19,
            output: 10,
            cached_input: 4,
            reasoning: 2,
        };
        for result in all_splits(CHAT.as_bytes()) {
            assert_eq!(result.as_ref(), Some(&expected));
        }
    }

    #[test]
    fn a_chat_stream_counts_the_final_chunk_not_the_nulls() {
        let stream = concat!(
            "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
            "data: {\"id\":\"c\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":3,\"total_tokens\":10}}\n\n",
            "data: [DONE]\n\n"
        );
        for result in all_splits(stream.as_bytes()) {
            let usage = result.expect("usage");
            assert_eq!((usage.input, usage.output), (7, 3));
            assert_eq!(usage.model.as_deref(), Some("gpt-4o"));
        }
    }

    #[test]
    fn a_responses_stream_counts_response_completed() {
        let stream = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"gpt-5\",\"usage\":null}}\n\n",
            "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"\\\"usage\\\":{\\\"input_tokens\\\":1}\"}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-5\",\"usage\":{\"input_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":0},\"output_tokens\":22,\"output_tokens_details\":{\"reasoning_tokens\":5},\"total_tokens\":33}}}\n\n",
        );
        for result in all_splits(stream.as_bytes()) {
            let usage = result.expect("usage");
            assert_eq!(
                (
                    usage.input,
                    usage.output,
                    usage.reasoning,
                    usage.cached_input
                ),
                (11, 22, 5, 0)
            );
            assert_eq!(usage.model.as_deref(), Some("gpt-5"));
        }
    }

    #[test]
    fn no_usage_means_nothing_counted() {
        assert_eq!(tap_all(&[b"{\"object\":\"list\",\"data\":[]}"]), None);
        assert_eq!(tap_all(&[b"{\"usage\":null}"]), None);
        assert_eq!(
            tap_all(&[b"{\"usage\":{\"type\":\"duration\",\"seconds\":3}}"]),
            None
        );
        // Cut off mid-object: nothing is guessed.
        assert_eq!(tap_all(&[b"{\"usage\":{\"prompt_tokens\":5,"]), None);
    }

    #[test]
    fn a_model_name_over_the_cap_is_absent_whole_or_cut() {
        let body = |model: &str| {
            format!(r#"{{"model":"{model}","usage":{{"prompt_tokens":3,"completion_tokens":4}}}}"#)
        };
        let long = "m".repeat(MODEL_CAPTURE);
        let fits = "m".repeat(MODEL_CAPTURE - 10);
        for (model, expected) in [(&long, None), (&fits, Some(fits.clone()))] {
            let body = body(model);
            let whole = tap_all(&[body.as_bytes()]).expect("usage");
            assert_eq!(whole.model, expected);
            let (head, rest) = body.as_bytes().split_at(20);
            let cut = tap_all(&[head, rest]).expect("usage");
            assert_eq!(cut.model, expected);
            assert_eq!((whole.input, whole.output), (3, 4));
        }
    }

    #[test]
    fn embeddings_count_input_only() {
        let body = br#"{"object":"list","data":[{"embedding":[0.1,0.2]}],"model":"text-embedding-3-small","usage":{"prompt_tokens":8,"total_tokens":8}}"#;
        let usage = tap_all(&[body]).expect("usage");
        assert_eq!((usage.input, usage.output), (8, 0));
        assert_eq!(usage.counts().collect::<Vec<_>>(), vec![(0, 8)]);
        assert_eq!(usage.model.as_deref(), Some("text-embedding-3-small"));
    }

    /// Fields of another shape count as absent, never failing the object or the fields
    /// beside them.
    #[test]
    fn fields_of_other_shapes_count_as_absent() {
        /// Input, output, cached input, reasoning.
        type Counts = (u64, u64, u64, u64);
        let cases: [(&str, Option<Counts>); 8] = [
            (
                r#"{"prompt_tokens":5,"completion_tokens":"7"}"#,
                Some((5, 0, 0, 0)),
            ),
            (
                r#"{"prompt_tokens":-1,"completion_tokens":2.5,"output_tokens":3}"#,
                Some((0, 3, 0, 0)),
            ),
            (
                r#"{"prompt_tokens":{"a":[1,{"b":null}]},"completion_tokens":4}"#,
                Some((0, 4, 0, 0)),
            ),
            (
                r#"{"input_tokens":9,"output_tokens":[1,2],"input_tokens_details":null}"#,
                Some((9, 0, 0, 0)),
            ),
            (
                r#"{"prompt_tokens":9,"completion_tokens":1,"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":2,"cached_tokens":6},"completion_tokens_details":{"reasoning_tokens":"x","extra":{"deep":[true]}}}"#,
                Some((9, 1, 6, 0)),
            ),
            (
                r#"{"input_tokens":2,"output_tokens":3,"input_tokens_details":"none","output_tokens_details":{"reasoning_tokens":1}}"#,
                Some((2, 3, 0, 1)),
            ),
            (r#"{"total_tokens":5,"prompt_tokens":true}"#, None),
            (r#"{"prompt_tokens":null,"completion_tokens":null}"#, None),
        ];
        for (object, expected) in cases {
            let body = format!(r#"{{"model":"m","usage":{object}}}"#);
            let usage = tap_all(&[body.as_bytes()]);
            let counts = usage.map(|u| (u.input, u.output, u.cached_input, u.reasoning));
            assert_eq!(counts, expected, "{object}");
        }
    }
}
