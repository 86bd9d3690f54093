//! Reading single values of the manifest and phrasing what is wrong with them, shared by
//! the validators of every section: figment's errors as `key: problem (source)` lines, and
//! URLs whose secrets (a proxy's password) never reach a message.

use url::Url;

use super::{ManifestSource, ENV_PREFIX};

/// Turns figment's errors into `key: problem (source)` lines.
pub(super) fn describe_figment_error(
    err: figment::Error,
    prefix: Option<&str>,
    source: &ManifestSource,
) -> Vec<String> {
    err.into_iter()
        .map(|err| {
            let mut key: Vec<String> = prefix.map(str::to_owned).into_iter().collect();
            key.extend(err.path.iter().cloned());
            let origin = match &err.metadata {
                Some(meta) if meta.name.contains("environment") => format!(
                    " (from environment variable {ENV_PREFIX}{})",
                    err.path.join("__").to_uppercase()
                ),
                Some(_) | None => format!(" (in {source})"),
            };
            let problem = match &err.kind {
                figment::error::Kind::UnknownField(_, allowed) => {
                    format!("unknown key; allowed here: {}", allowed.join(", "))
                }
                figment::error::Kind::Message(message)
                    if message.starts_with("TOML parse error") =>
                {
                    summarize_toml_error(message)
                }
                kind => kind.to_string(),
            };
            if key.is_empty() {
                format!("{problem}{origin}")
            } else {
                format!("{}: {problem}{origin}", key.join("."))
            }
        })
        .collect()
}

/// A TOML syntax error names its position and problem; the quoted source line is dropped,
/// since it may hold a secret (a proxy password, say).
fn summarize_toml_error(message: &str) -> String {
    let mut lines = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty());
    let position = lines.next().unwrap_or(message);
    let problem = lines
        .rfind(|line| !line.contains('|') && !line.starts_with('^'))
        .unwrap_or("");
    format!("{position}: {problem}")
}

/// An `http://` or `https://` URL with a host and no query: `upstream.base_url`,
/// `tracing.otlp_endpoint` (paths are appended to both).
pub(super) fn parse_http_url(setting: &str, text: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("{setting}: {:?} {why}", redact_userinfo(text));
    let url = Url::parse(text).map_err(|err| bad(&format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if url.host().is_none() {
        return Err(bad("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "must not have a query or fragment (paths and queries are appended to it)",
        ));
    }
    Ok(url)
}

pub(super) fn parse_proxy_url(setting: &str, text: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("{setting}: {:?} {why}", redact_userinfo(text));
    let url = Url::parse(text).map_err(|err| bad(&format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https" | "socks5" | "socks5h") {
        return Err(bad(
            "must use one of http://, https://, socks5://, socks5h://",
        ));
    }
    if url.host().is_none() {
        return Err(bad("has no host"));
    }
    Ok(url)
}

/// Drops `user:password@` from a URL-ish string that may not even parse.
fn redact_userinfo(text: &str) -> String {
    match (text.find("://"), text.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}****@{}", &text[..scheme_end + 3], &text[at + 1..])
        }
        _ => text.to_owned(),
    }
}

/// `url` with its password, if any, masked: what messages and `--check` show.
pub(super) fn mask_url(url: &Url) -> String {
    let mut masked = url.clone();
    if masked.password().is_some() {
        let _ = masked.set_password(Some("****"));
    }
    masked.to_string()
}
