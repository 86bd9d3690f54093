//! `GET /usage`: a named key's own spend, asked with that key. For each of its rates and
//! budgets, what is used, what is left and when it resets. A key sees its own numbers only:
//! the one it presents is the one reported.

use std::net::SocketAddr;
use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};

use super::budget::usd_number;
use super::{Answer, GatewayError, Pipeline};
use crate::config::KeyLimit;
use crate::config::NamedKey;
use crate::ledger::{rfc3339, Periods, Spent};
use crate::message::{Body, Head};

impl Pipeline {
    /// The answer to `GET /usage` from `peer` with `headers`: 401 without a listed key, 404
    /// for a key that is not one of `[keys]` (nothing is counted for it).
    pub(crate) async fn usage(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Answer {
        let access = &self.config.access;
        if let Err(err) = access.check_ip(peer.map(|peer| peer.ip()), headers) {
            return Answer::error(&err);
        }
        let caller = access.identify(headers, self.config.upstream.credential_header);
        let named = match caller {
            Ok(caller) => caller.named,
            Err(err) => return Answer::error(&err),
        };
        let Some(named) = named else {
            return Answer::error(&GatewayError::NoUsage);
        };
        let now = SystemTime::now();
        let periods = Periods::at(now);
        let Some(spent) = self.ledger.read(&named.name, periods).await else {
            return Answer::error(&GatewayError::StoreUnavailable);
        };
        let body = report(&named, &spent, periods);
        let mut head = HeaderMap::new();
        head.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        head.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        Answer {
            status: StatusCode::OK,
            head: Head::Map(head),
            body: Body::Whole(Bytes::from(body.to_string())),
        }
    }
}

/// The report of `key`'s limits given what it has `spent`.
fn report(key: &NamedKey, spent: &Spent, periods: Periods) -> Value {
    let (minute, day, month) = periods.ends();
    let limits = &key.limits;
    let mut rows = Vec::new();
    let mut count = |limit: KeyLimit, used: u64, allowed: Option<u64>, resets: u64| {
        if let Some(allowed) = allowed {
            rows.push(json!({
                "limit": limit.field(),
                "used": used,
                "allowed": allowed,
                "left": allowed.saturating_sub(used),
                "resets_at": rfc3339(resets),
            }));
        }
    };
    count(
        KeyLimit::RequestsPerMinute,
        spent.minute_requests,
        limits.requests_per_minute,
        minute,
    );
    count(
        KeyLimit::TokensPerMinute,
        spent.minute_tokens,
        limits.tokens_per_minute,
        minute,
    );
    count(
        KeyLimit::TokensPerDay,
        spent.day_tokens,
        limits.max_tokens_per_day,
        day,
    );
    count(
        KeyLimit::TokensPerMonth,
        spent.month_tokens,
        limits.max_tokens_per_month,
        month,
    );
    let mut dollars = |limit: KeyLimit, used: u64, allowed: Option<u64>, resets: u64| {
        if let Some(allowed) = allowed {
            // Decimal strings of dollars would be exact; numbers are what a dashboard or a
            // script compares, and four places are a hundredth of a cent.
            let number = usd_number;
            rows.push(json!({
                "limit": limit.field(),
                "used": number(used),
                "allowed": number(allowed),
                "left": number(allowed.saturating_sub(used)),
                "resets_at": rfc3339(resets),
            }));
        }
    };
    dollars(
        KeyLimit::UsdPerDay,
        spent.day_pico_usd,
        limits.max_pico_usd_per_day,
        day,
    );
    dollars(
        KeyLimit::UsdPerMonth,
        spent.month_pico_usd,
        limits.max_pico_usd_per_month,
        month,
    );
    json!({
        "object": "usage",
        "key": &*key.name,
        "expires": key.expires.map(|day| day.to_string()),
        "limits": rows,
        // Tokens and dollars are counted only for a key whose limits count them.
        "spent": limits.counts_tokens().then(|| json!({
            "tokens_today": spent.day_tokens,
            "tokens_this_month": spent.month_tokens,
            "usd_today": usd_number(spent.day_pico_usd),
            "usd_this_month": usd_number(spent.month_pico_usd),
        })),
    })
}
