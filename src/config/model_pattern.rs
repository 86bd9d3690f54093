//! A model name as the manifest writes one: exact, or a glob (`gpt-4.1*`), for keys' `models`
//! and for prices.

/// A model name, or a glob of one where `*` stands for any run of characters
/// (`gpt-4.1*`). Case matters, as it does to the API. Split at its `*`s once, when read: a
/// price is looked up for every answer of a key with a dollar budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelPattern {
    text: String,
    /// The text between the `*`s: one part for a plain name.
    parts: Vec<String>,
}

impl ModelPattern {
    pub fn new(pattern: &str) -> ModelPattern {
        ModelPattern {
            text: pattern.to_owned(),
            parts: pattern.split('*').map(str::to_owned).collect(),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether it has a `*`, so it names more than one model.
    pub fn is_glob(&self) -> bool {
        self.parts.len() > 1
    }

    pub fn matches(&self, model: &str) -> bool {
        let (first, rest) = match self.parts.split_first() {
            Some(split) => split,
            None => return model.is_empty(),
        };
        let Some(mut tail) = model.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return tail.is_empty();
        };
        for part in middle {
            match tail.find(part.as_str()) {
                Some(at) => tail = &tail[at + part.len()..],
                None => return false,
            }
        }
        // The last part after a `*` anchors at the end.
        tail.ends_with(last.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_globs_match_whole_names() {
        let p = ModelPattern::new;
        assert!(p("gpt-4o-mini").matches("gpt-4o-mini"));
        assert!(!p("gpt-4o-mini").matches("gpt-4o-mini-2024-07-18"));
        assert!(p("gpt-4.1*").matches("gpt-4.1"));
        assert!(p("gpt-4.1*").matches("gpt-4.1-nano"));
        assert!(!p("gpt-4.1*").matches("gpt-4o"));
        assert!(p("*").matches("anything"));
        assert!(p("*-mini").matches("o4-mini"));
        assert!(!p("*-mini").matches("o4-mini-high"));
        assert!(p("gpt-*-mini*").matches("gpt-4o-mini-2024"));
        assert!(!p("gpt-*-mini").matches("gpt-mini"));
        assert!(p("a*a").matches("aa"));
        assert!(!p("a*a").matches("a"));
        assert!(!p("GPT-4o").matches("gpt-4o"));
    }
}
