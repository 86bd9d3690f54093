//! What tokens cost: the shipped `prices.toml`, under the manifest's `[prices."GLOB"]`, for
//! keys with a dollar budget.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::model_pattern::ModelPattern;
use super::raw::RawPrice;

/// The list prices shipped with the binary.
pub const SHIPPED_PRICES: &str = include_str!("../../prices.toml");

/// One pico-dollar (10⁻¹² USD) in dollars' terms: spend is counted in whole pico-dollars, so
/// it adds up exactly in memory, in the state file and in Redis. A price of $1 per million
/// tokens is 10⁶ pico-dollars a token.
pub const PICO_PER_USD: f64 = 1e12;

/// A model's price, in pico-dollars a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
}

impl Price {
    /// The cost of an answer's tokens: cached input at its own price, the rest of the input
    /// at the input price, output (reasoning included) at the output price.
    pub fn cost(&self, input: u64, cached_input: u64, output: u64) -> u64 {
        let cached = cached_input.min(input);
        (input - cached)
            .saturating_mul(self.input)
            .saturating_add(cached.saturating_mul(self.cached_input))
            .saturating_add(output.saturating_mul(self.output))
    }
}

/// The prices in force: the manifest's, looked up first, then the shipped list's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prices {
    manifest: Vec<(ModelPattern, Price)>,
    shipped: Vec<(ModelPattern, Price)>,
    /// The day the shipped list was taken.
    pub taken: String,
}

impl Prices {
    /// The price of `model`: from the manifest's `[prices]`, else the shipped list; in each,
    /// the exact name, else the longest glob that matches.
    pub fn of(&self, model: &str) -> Option<Price> {
        lookup(&self.manifest, model).or_else(|| lookup(&self.shipped, model))
    }

    /// How many entries each list has, for `--check`.
    pub fn counts(&self) -> (usize, usize) {
        (self.manifest.len(), self.shipped.len())
    }
}

/// The exact name's price, else the first glob's that matches: [`priced`] sorts them longest
/// first, so that is the longest that matches.
fn lookup(list: &[(ModelPattern, Price)], model: &str) -> Option<Price> {
    let exact = list
        .iter()
        .find(|(pattern, _)| !pattern.is_glob() && pattern.as_str() == model);
    let glob = || {
        list.iter()
            .find(|(pattern, _)| pattern.is_glob() && pattern.matches(model))
    };
    exact.or_else(glob).map(|(_, price)| *price)
}

/// The shipped `prices.toml` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShippedPrices {
    taken: String,
    prices: BTreeMap<String, RawPrice>,
}

/// Validates the manifest's `[prices]` and puts them over the shipped list.
pub(super) fn validate_prices(
    raw: BTreeMap<String, RawPrice>,
    problems: &mut Vec<String>,
) -> Prices {
    let manifest = priced(raw, "prices", problems);
    match toml::from_str::<ShippedPrices>(SHIPPED_PRICES) {
        Ok(shipped) => Prices {
            manifest,
            shipped: priced(shipped.prices, "prices.toml", problems),
            taken: shipped.taken,
        },
        Err(err) => {
            problems.push(format!("the shipped prices.toml does not parse: {err}"));
            Prices::default()
        }
    }
}

fn priced(
    raw: BTreeMap<String, RawPrice>,
    path: &str,
    problems: &mut Vec<String>,
) -> Vec<(ModelPattern, Price)> {
    let mut prices = Vec::with_capacity(raw.len());
    for (pattern, raw) in raw {
        if pattern.trim().is_empty() {
            problems.push(format!("{path}: a price needs a model name or glob"));
            continue;
        }
        let mut per_token = |field: &str, usd_per_million: f64| {
            let valid = usd_per_million.is_finite() && usd_per_million >= 0.0;
            if !valid {
                problems.push(format!(
                    "{path}.\"{pattern}\".{field}: {usd_per_million} is not a price; give US \
                     dollars per million tokens, 0 or more"
                ));
            }
            // Dollars per million tokens to pico-dollars a token.
            (usd_per_million * 1e6).round() as u64
        };
        let input = per_token("input", raw.input);
        let price = Price {
            input,
            cached_input: raw
                .cached_input
                .map_or(input, |cached| per_token("cached_input", cached)),
            output: per_token("output", raw.output),
        };
        prices.push((ModelPattern::new(pattern.trim()), price));
    }
    // Longest first, so the first glob that matches is the longest ([`lookup`]).
    prices.sort_by_key(|(pattern, _)| std::cmp::Reverse(pattern.as_str().len()));
    prices
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prices(manifest: &str) -> Prices {
        let raw: BTreeMap<String, RawPrice> = toml::from_str(manifest).unwrap();
        let mut problems = Vec::new();
        let prices = validate_prices(raw, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        prices
    }

    #[test]
    fn the_shipped_list_parses_and_prices_the_manifests_models() {
        let prices = prices("");
        assert!(prices.taken.len() == 10, "{}", prices.taken);
        let mini = prices.of("gpt-4o-mini-2024-07-18").unwrap();
        assert_eq!(
            mini,
            Price {
                input: 150_000,
                cached_input: 75_000,
                output: 600_000
            }
        );
        // The longest glob wins: gpt-4o-mini-tts is not gpt-4o-mini, nor gpt-4o.
        assert_ne!(prices.of("gpt-4o-mini-tts"), Some(mini));
        assert_ne!(prices.of("gpt-4o"), Some(mini));
        for model in [
            "gpt-5",
            "gpt-5-mini",
            "o3-mini",
            "gpt-realtime",
            "text-embedding-3-small",
        ] {
            assert!(prices.of(model).is_some(), "{model}");
        }
        assert_eq!(prices.of("whisper-1"), None);
        assert_eq!(prices.of("text-embedding-3-small-v2"), None);
    }

    #[test]
    fn the_manifests_prices_come_first() {
        let prices = prices("[\"gpt-4o*\"]\ninput = 1.0\noutput = 2.0\n");
        // The manifest's glob wins over the shipped list's longer one.
        assert_eq!(
            prices.of("gpt-4o-mini"),
            Some(Price {
                input: 1_000_000,
                cached_input: 1_000_000,
                output: 2_000_000
            })
        );
    }

    #[test]
    fn cost_counts_cached_input_at_its_own_price() {
        let price = Price {
            input: 150_000,
            cached_input: 75_000,
            output: 600_000,
        };
        // 1,000 input of which 400 cached, 500 output.
        assert_eq!(
            price.cost(1_000, 400, 500),
            600 * 150_000 + 400 * 75_000 + 500 * 600_000
        );
        assert_eq!(price.cost(10, 50, 0), 10 * 75_000);
    }
}
