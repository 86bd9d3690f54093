//! `[keys.NAME]`: the keys a team's people use, each with a name and what it may do.
//!
//! A named key is an allowed key, like a line of `access.allowed_key_hashes`, that also says
//! who it is (the name shows in logs and errors) and what it may call: the route tags, the
//! models (globs), and until when. The manifest holds the key's SHA-256, never the key.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::model_pattern::ModelPattern;
use super::prices::{Prices, PICO_PER_USD};
use super::raw::RawKey;

/// The validated `[keys]` table: each named key by the SHA-256 of its value.
pub type NamedKeys = HashMap<[u8; 32], Arc<NamedKey>>;

/// One `[keys.NAME]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedKey {
    /// `[a-z0-9_-]`, so it is safe in a log line, a metric label and a message.
    pub name: Arc<str>,
    /// The models its requests may name; `None`: any.
    pub models: Option<Vec<ModelPattern>>,
    /// The route tags it may call; `None`: any.
    pub tags: Option<Vec<String>>,
    /// The last day it works (UTC); it is refused from the next midnight.
    pub expires: Option<Day>,
    pub limits: KeyLimits,
}

/// One of a named key's rates and budgets, by its field in `[keys.NAME]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLimit {
    RequestsPerMinute,
    TokensPerMinute,
    TokensPerDay,
    TokensPerMonth,
    UsdPerDay,
    UsdPerMonth,
}

impl KeyLimit {
    /// Its field in `[keys.NAME]`.
    pub fn field(self) -> &'static str {
        match self {
            KeyLimit::RequestsPerMinute => "requests_per_minute",
            KeyLimit::TokensPerMinute => "tokens_per_minute",
            KeyLimit::TokensPerDay => "max_tokens_per_day",
            KeyLimit::TokensPerMonth => "max_tokens_per_month",
            KeyLimit::UsdPerDay => "max_usd_per_day",
            KeyLimit::UsdPerMonth => "max_usd_per_month",
        }
    }
}

/// A named key's rates and budgets, each over a UTC calendar period (`None`: none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_tokens_per_day: Option<u64>,
    pub max_tokens_per_month: Option<u64>,
    /// In pico-dollars ([`super::prices::PICO_PER_USD`]).
    pub max_pico_usd_per_day: Option<u64>,
    pub max_pico_usd_per_month: Option<u64>,
}

impl KeyLimits {
    /// Whether any limit counts tokens: the answers' usage must then be read and kept.
    pub fn counts_tokens(&self) -> bool {
        self.tokens_per_minute.is_some()
            || self.max_tokens_per_day.is_some()
            || self.max_tokens_per_month.is_some()
            || self.has_dollar_budget()
    }

    pub fn has_dollar_budget(&self) -> bool {
        self.max_pico_usd_per_day.is_some() || self.max_pico_usd_per_month.is_some()
    }

    /// Whether any limit is set.
    pub fn any(&self) -> bool {
        self.requests_per_minute.is_some() || self.counts_tokens()
    }
}

impl NamedKey {
    /// Whether a request naming `model` may go up with this key.
    pub fn allows_model(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|pattern| pattern.matches(model)))
    }

    /// Whether this key may call a route tagged `tag`.
    pub fn allows_tag(&self, tag: &str) -> bool {
        self.tags
            .as_ref()
            .is_none_or(|tags| tags.iter().any(|allowed| allowed == tag))
    }

    /// Whether the key's last day is over at `now`.
    pub fn expired_at(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|day| {
            let secs = now.duration_since(UNIX_EPOCH).map_or(0, |t| t.as_secs());
            secs >= day.next_midnight()
        })
    }
}

/// A calendar day, as `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Day {
    pub year: i32,
    pub month: u32,
    pub day: u32,
}

impl Day {
    /// Parses `YYYY-MM-DD`, a real date of the proleptic Gregorian calendar.
    pub fn parse(text: &str) -> Option<Day> {
        let mut fields = text.split('-');
        let (year, month, day) = (fields.next()?, fields.next()?, fields.next()?);
        let digits = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit());
        if fields.next().is_some() || !digits(year, 4) || !digits(month, 2) || !digits(day, 2) {
            return None;
        }
        let day = Day {
            year: year.parse().ok()?,
            month: month.parse().ok()?,
            day: day.parse().ok()?,
        };
        ((1..=12).contains(&day.month)
            && (1..=days_in_month(day.year, day.month)).contains(&day.day))
        .then_some(day)
    }

    /// Seconds since the Unix epoch at the midnight (UTC) that ends this day.
    pub fn next_midnight(&self) -> u64 {
        let days = days_from_civil(self.year, self.month, self.day) + 1;
        u64::try_from(days).unwrap_or(0) * 86_400
    }
}

impl std::fmt::Display for Day {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given date (Howard Hinnant's `days_from_civil`).
pub(crate) fn days_from_civil(year: i32, month: u32, day: u32) -> i64 {
    let year = i64::from(year) - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// A key's rates and budgets, each a positive number.
fn key_limits(path: &str, raw: &RawKey, problems: &mut Vec<String>) -> KeyLimits {
    let mut count = |field: &str, value: Option<i64>| {
        let value = value?;
        match u64::try_from(value) {
            Ok(value) if value > 0 => Some(value),
            _ => {
                problems.push(format!(
                    "{path}.{field}: {value} is not a limit; give a whole number above 0, or \
                     leave it out for none"
                ));
                None
            }
        }
    };
    let requests_per_minute = count("requests_per_minute", raw.requests_per_minute);
    let tokens_per_minute = count("tokens_per_minute", raw.tokens_per_minute);
    let max_tokens_per_day = count("max_tokens_per_day", raw.max_tokens_per_day);
    let max_tokens_per_month = count("max_tokens_per_month", raw.max_tokens_per_month);
    let mut dollars = |field: &str, value: Option<f64>| {
        let value = value?;
        if value.is_finite() && value > 0.0 {
            Some((value * PICO_PER_USD).round() as u64)
        } else {
            problems.push(format!(
                "{path}.{field}: {value} is not a budget; give US dollars above 0, or leave it \
                 out for none"
            ));
            None
        }
    };
    KeyLimits {
        requests_per_minute,
        tokens_per_minute,
        max_tokens_per_day,
        max_tokens_per_month,
        max_pico_usd_per_day: dollars("max_usd_per_day", raw.max_usd_per_day),
        max_pico_usd_per_month: dollars("max_usd_per_month", raw.max_usd_per_month),
    }
}

/// `--check`'s and `oa-bypass keys list`'s lines for each named key, by name: what it may
/// do, and its hash's first 8 hex digits (never the whole hash).
pub(super) fn key_lines(keys: &NamedKeys) -> Vec<(String, String)> {
    let mut named: Vec<(&[u8; 32], &Arc<NamedKey>)> = keys.iter().collect();
    named.sort_by(|a, b| a.1.name.cmp(&b.1.name));
    let mut lines = Vec::new();
    for (hash, key) in named {
        let path = format!("keys.{}", key.name);
        let hex = super::hex(&hash[..4]);
        let models = key.models.as_ref().map_or_else(
            || "any".to_owned(),
            |models| {
                models
                    .iter()
                    .map(ModelPattern::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        let tags = (key.tags.as_ref()).map_or_else(|| "any".to_owned(), |tags| tags.join(", "));
        let expires = key
            .expires
            .map_or_else(|| "never".to_owned(), |day| day.to_string());
        lines.push((format!("{path}.hash"), format!("sha256:{hex}…")));
        lines.push((format!("{path}.models"), models));
        lines.push((format!("{path}.tags"), tags));
        lines.push((format!("{path}.expires"), expires));
        let limits = &key.limits;
        let usd = |pico: Option<u64>| pico.map(|pico| format!("{:.2}", pico as f64 / PICO_PER_USD));
        for (field, value) in [
            (
                "requests_per_minute",
                limits.requests_per_minute.map(|n| n.to_string()),
            ),
            (
                "tokens_per_minute",
                limits.tokens_per_minute.map(|n| n.to_string()),
            ),
            (
                "max_tokens_per_day",
                limits.max_tokens_per_day.map(|n| n.to_string()),
            ),
            (
                "max_tokens_per_month",
                limits.max_tokens_per_month.map(|n| n.to_string()),
            ),
            ("max_usd_per_day", usd(limits.max_pico_usd_per_day)),
            ("max_usd_per_month", usd(limits.max_pico_usd_per_month)),
        ] {
            lines.push((
                format!("{path}.{field}"),
                value.unwrap_or_else(|| "none".to_owned()),
            ));
        }
    }
    lines
}

/// A new key for `name` (`sk-oab-` and 256 random bits in hex) and the `[keys.NAME]` block
/// that allows it. `Err`: a name a key may not have, or no randomness from the OS.
pub fn new_key_block(name: &str) -> Result<(String, String), String> {
    if !valid_name(name) {
        return Err(format!(
            "{name:?}: a key's name is 1 to 64 of a-z, 0-9, '_' and '-'"
        ));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|err| format!("cannot read random bytes from the system: {err}"))?;
    let key = format!("sk-oab-{}", super::hex(&secret));
    let block = format!("[keys.{name}]\nhash = \"{}\"\n", super::hash_line(&key));
    Ok((key, block))
}

/// A name a key may have: what a log line, a metric label and an env variable all carry
/// without quoting.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
}

/// What `[keys]` is checked against.
pub(super) struct Known<'a> {
    /// `access.allowed_key_hashes`' keys, which a named key may not repeat.
    pub anonymous: &'a [[u8; 32]],
    /// The tags of the manifest's routes.
    pub tags: &'a [&'a str],
    pub prices: &'a Prices,
    /// Whether counters outlive a restart (`limits.state_file` or `limits.store`).
    pub kept: bool,
}

/// Validates `[keys]`.
pub(super) fn validate_keys(
    raw: std::collections::BTreeMap<String, RawKey>,
    known: &Known<'_>,
    problems: &mut Vec<String>,
) -> NamedKeys {
    let Known {
        anonymous,
        tags,
        prices,
        kept,
    } = *known;
    let mut keys = NamedKeys::new();
    for (name, raw) in raw {
        let path = format!("keys.{name}");
        let before = problems.len();
        let limits = key_limits(&path, &raw, problems);
        if !valid_name(&name) {
            problems.push(format!(
                "{path}: a key's name is 1 to 64 of a-z, 0-9, '_' and '-' (it shows in logs, \
                 metrics and messages)"
            ));
        }
        // The value is not echoed: someone may have pasted a key here by mistake.
        let hash = super::parse_hash_line(raw.hash.trim());
        match hash {
            None => problems.push(format!(
                "{path}.hash: not a \"sha256:<64 hex digits>\" line; `oa-bypass keys new {name}` \
                 makes a key and prints its block"
            )),
            Some(hash) if anonymous.contains(&hash) => problems.push(format!(
                "{path}.hash: the same key is in access.allowed_key_hashes; list it once"
            )),
            Some(hash) => {
                if let Some(other) = keys.get(&hash) {
                    problems.push(format!(
                        "{path}.hash: the same key as keys.{}; each person needs a key of their own",
                        other.name
                    ));
                }
            }
        }
        let models = raw.models.map(|models| {
            if models.is_empty() || models.iter().any(|m| m.trim().is_empty()) {
                problems.push(format!(
                    "{path}.models: list at least one model or glob (\"gpt-4o-mini\", \
                     \"gpt-4.1*\"), or leave it out for any model"
                ));
            }
            models.iter().map(|m| ModelPattern::new(m.trim())).collect()
        });
        let tags = raw.tags.inspect(|wanted| {
            if wanted.is_empty() {
                problems.push(format!(
                    "{path}.tags: list at least one route tag, or leave it out for every route"
                ));
            }
            for tag in wanted.iter().filter(|tag| !tags.contains(&tag.as_str())) {
                problems.push(format!(
                    "{path}.tags: {tag:?} is not a tag of this manifest's routes; they are {}",
                    tags.join(", ")
                ));
            }
        });
        let expires = raw.expires.and_then(|text| {
            let day = Day::parse(text.trim());
            if day.is_none() {
                problems.push(format!(
                    "{path}.expires: {text:?} is not a date like \"2027-03-31\" (the key works \
                     through that day, UTC)"
                ));
            }
            day
        });
        if limits.counts_tokens() && !kept {
            problems.push(format!(
                "{path}: token rates and budgets must outlive a restart; set limits.state_file \
                 (a file this process may write) or limits.store (a Redis, for replicas)"
            ));
        }
        if limits.has_dollar_budget() {
            let unpriced = (models.iter().flatten())
                .filter(|m: &&ModelPattern| prices.of(m.as_str()).is_none());
            for model in unpriced {
                problems.push(format!(
                    "{path}.models: {:?} has no price, and the key has a dollar budget; add \
                     [prices.\"{}\"] with input and output in USD per million tokens",
                    model.as_str(),
                    model.as_str()
                ));
            }
        }
        if let (Some(hash), true) = (hash, problems.len() == before) {
            let key = NamedKey {
                name: Arc::from(name.as_str()),
                models,
                tags,
                expires,
                limits,
            };
            keys.insert(hash, Arc::new(key));
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_parse_strictly_and_end_at_the_next_utc_midnight() {
        assert_eq!(
            Day::parse("2027-03-31"),
            Some(Day {
                year: 2027,
                month: 3,
                day: 31
            })
        );
        for bad in [
            "2027-02-29",
            "2027-13-01",
            "2027-3-31",
            "31.03.2027",
            "2027-03-31T00",
            "",
        ] {
            assert_eq!(Day::parse(bad), None, "{bad}");
        }
        assert!(Day::parse("2028-02-29").is_some());
        assert_eq!(
            Day::parse("1970-01-01").map(|d| d.next_midnight()),
            Some(86_400)
        );
        // 2027-04-01T00:00:00Z.
        assert_eq!(
            Day::parse("2027-03-31").map(|d| d.next_midnight()),
            Some(1_806_537_600)
        );
    }
}
