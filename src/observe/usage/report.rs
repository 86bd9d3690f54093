//! The usage object of an answer: OpenAI's token counts in their several shapes, read
//! leniently (a field of an unexpected type counts as absent instead of failing the object).

use serde::Deserialize;

/// The `kind` label of each count, in the order [`Usage::counts`] numbers them.
pub(crate) const TOKEN_KINDS: [&str; 4] = ["input", "output", "cached_input", "reasoning"];

/// Token counts of one answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub model: Option<String>,
    pub input: u64,
    pub output: u64,
    pub cached_input: u64,
    pub reasoning: u64,
}

impl Usage {
    /// The non-zero counts with their place in [`TOKEN_KINDS`].
    pub(crate) fn counts(&self) -> impl Iterator<Item = (usize, u64)> {
        [self.input, self.output, self.cached_input, self.reasoning]
            .into_iter()
            .enumerate()
            .filter(|(_, count)| *count > 0)
    }

    /// Reads OpenAI's usage shapes: `prompt_tokens`/`completion_tokens` (Chat, Completions,
    /// Embeddings) and `input_tokens`/`output_tokens` (Responses, images, audio), with their
    /// cached and reasoning details. `None` when the object counts no tokens at all.
    pub(super) fn from_object(object: UsageObject) -> Option<Usage> {
        let input = object.prompt_tokens.get().or(object.input_tokens.get());
        let output = object
            .completion_tokens
            .get()
            .or(object.output_tokens.get());
        if input.is_none() && output.is_none() {
            return None;
        }
        let detail = |details: &Lenient<Details>, pick: fn(&Details) -> Option<u64>| {
            details.0.as_ref().and_then(pick)
        };
        let cached = |d: &Details| d.cached_tokens.get();
        let reasoning = |d: &Details| d.reasoning_tokens.get();
        Some(Usage {
            model: None,
            input: input.unwrap_or(0),
            output: output.unwrap_or(0),
            cached_input: detail(&object.prompt_tokens_details, cached)
                .or_else(|| detail(&object.input_tokens_details, cached))
                .unwrap_or(0),
            reasoning: detail(&object.completion_tokens_details, reasoning)
                .or_else(|| detail(&object.output_tokens_details, reasoning))
                .unwrap_or(0),
        })
    }
}

/// The fields of a `usage` object the tap reads; everything else is skipped unread.
#[derive(Debug, Deserialize)]
pub(super) struct UsageObject {
    #[serde(default)]
    prompt_tokens: Lenient<u64>,
    #[serde(default)]
    input_tokens: Lenient<u64>,
    #[serde(default)]
    completion_tokens: Lenient<u64>,
    #[serde(default)]
    output_tokens: Lenient<u64>,
    #[serde(default)]
    prompt_tokens_details: Lenient<Details>,
    /// Realtime's `response.done` spells it `input_token_details`.
    #[serde(default, alias = "input_token_details")]
    input_tokens_details: Lenient<Details>,
    #[serde(default)]
    completion_tokens_details: Lenient<Details>,
    #[serde(default, alias = "output_token_details")]
    output_tokens_details: Lenient<Details>,
}

#[derive(Debug, Default)]
struct Details {
    cached_tokens: Lenient<u64>,
    reasoning_tokens: Lenient<u64>,
}

/// A field that may hold something else (null, a string, a float): then it counts as absent
/// instead of failing the whole object. Read by a visitor rather than serde's untagged
/// enums, which buffer every value (allocating for objects) before trying each shape.
#[derive(Debug)]
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl Lenient<u64> {
    fn get(&self) -> Option<u64> {
        self.0
    }
}

/// What a lenient field accepts: a token count takes non-negative integers, the details
/// take objects; every other shape is skipped.
trait LenientValue: Sized {
    fn from_u64(_: u64) -> Option<Self> {
        None
    }

    fn from_map<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(None)
    }
}

impl LenientValue for u64 {
    fn from_u64(value: u64) -> Option<u64> {
        Some(value)
    }
}

impl LenientValue for Details {
    fn from_map<'de, A: serde::de::MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Field {
            CachedTokens,
            ReasoningTokens,
            #[serde(other)]
            Other,
        }
        let mut details = Details::default();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::CachedTokens => details.cached_tokens = map.next_value()?,
                Field::ReasoningTokens => details.reasoning_tokens = map.next_value()?,
                Field::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(Some(details))
    }
}

struct LenientVisitor<T>(std::marker::PhantomData<T>);

impl<'de, T: LenientValue> serde::de::Visitor<'de> for LenientVisitor<T> {
    type Value = Lenient<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Self::Value, E> {
        Ok(Lenient(u64::try_from(value).ok().and_then(T::from_u64)))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Self::Value, E> {
        Ok(Lenient(T::from_u64(value)))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Lenient(None))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Lenient(None))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        T::from_map(map).map(Lenient)
    }
}

impl<'de, T: LenientValue> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(LenientVisitor(std::marker::PhantomData))
    }
}
