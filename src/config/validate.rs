//! From the manifest as written to validated, typed settings: every problem is collected and
//! named by its key, with the bad value and what is allowed; a value that may be secret is
//! never echoed.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use http::Method;
use url::Url;

use super::raw::{self, RawConfig, RawRoute};
use super::units::format_duration;
use super::{
    AccessConfig, AcmeConfig, AdmissionConfig, Config, ConfigError, CorsConfig, LimitsConfig,
    LogConfig, LogFormat, ManifestSource, MetricsConfig, OpenApiConfig, RealtimeConfig,
    ServerConfig, StreamingConfig, TlsConfig, TracingConfig, UpstreamConfig, UsageConfig,
    ENV_PREFIX, METHODS,
};
use crate::routes::{BodyKind, PathTemplate, RouteSpec, RouteTable};

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

pub(super) fn validate(raw: RawConfig, source: ManifestSource) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();

    let host = raw.server.host.parse::<IpAddr>().map_err(|_| {
        format!(
            "server.host: {:?} is not an IP address (use 0.0.0.0 for every IPv4 interface, \
             :: for every IPv6 one, 127.0.0.1 for this machine only)",
            raw.server.host
        )
    });
    let base_url = parse_http_url("upstream.base_url", &raw.upstream.base_url);
    let proxy = raw
        .upstream
        .proxy
        .as_deref()
        .map(parse_proxy_url)
        .transpose();
    let allow_origins = raw.cors.allow_origins;
    for origin in &allow_origins {
        if origin != "*" && http::HeaderValue::from_str(origin).is_err() {
            problems.push(format!(
                "cors.allow_origins: {origin:?} is not a valid origin (like \"https://app.example.com\" or \"*\")"
            ));
        }
    }
    for (name, value) in [
        ("limits.max_json_body", raw.limits.max_json_body.0),
        ("limits.max_upload_body", raw.limits.max_upload_body.0),
    ] {
        if value == 0 {
            problems.push(format!("{name}: must be more than 0 bytes"));
        }
    }
    if raw.server.header_read_timeout.0.is_zero() || raw.server.body_read_timeout.0.is_zero() {
        problems.push(
            "server.header_read_timeout and server.body_read_timeout must be more than 0s"
                .to_owned(),
        );
    }
    if !(8192..=(16 << 20)).contains(&raw.server.max_header_bytes.0) {
        problems.push("server.max_header_bytes: must be between 8KiB and 16MiB".to_owned());
    }
    if raw.realtime.max_message.0 == 0 {
        problems.push("realtime.max_message: must be more than 0 bytes".to_owned());
    }
    if raw.realtime.idle_timeout.0.is_zero() {
        problems.push("realtime.idle_timeout: must be more than 0s".to_owned());
    }
    if raw.upstream.read_timeout.0.is_zero() {
        problems.push("upstream.read_timeout: must be more than 0s".to_owned());
    }
    if raw.upstream.connect_timeout.0.is_zero() {
        problems.push("upstream.connect_timeout: must be more than 0s".to_owned());
    }

    let access = validate_access(raw.access, &mut problems);
    let log = validate_log(raw.log, &mut problems);
    let tls = raw.server.tls.map(|tls| TlsConfig {
        cert: PathBuf::from(tls.cert),
        key: PathBuf::from(tls.key),
    });
    let acme = raw
        .server
        .acme
        .and_then(|acme| validate_acme(acme, &mut problems));
    if tls.is_some() && acme.is_some() {
        problems.push(
            "server.tls and server.acme: choose one source for the certificate, not both"
                .to_owned(),
        );
    }
    let otlp_endpoint = raw.tracing.otlp_endpoint.as_deref().and_then(|text| {
        parse_http_url("tracing.otlp_endpoint", text)
            .map_err(|err| problems.push(err))
            .ok()
    });
    if raw.metrics.max_models == 0 {
        problems.push("metrics.max_models: must be at least 1".to_owned());
    }

    let mut specs = Vec::with_capacity(raw.routes.len());
    for (index, value) in raw.routes.into_iter().enumerate() {
        match validate_route(index, value, &source) {
            Ok(spec) => specs.push(spec),
            Err(mut route_problems) => problems.append(&mut route_problems),
        }
    }
    let streaming = StreamingConfig {
        keepalive: raw.streaming.keepalive.map(|t| t.0),
    };
    check_keepalives(
        &streaming,
        raw.upstream.read_timeout.0,
        &specs,
        &mut problems,
    );
    if specs.is_empty() && problems.is_empty() {
        problems.push(
            "routes: the manifest declares no [[routes]]; there would be nothing to serve"
                .to_owned(),
        );
    }

    let (host, base_url, proxy) = match (host, base_url, proxy) {
        (Ok(host), Ok(base_url), Ok(proxy)) if problems.is_empty() => (host, base_url, proxy),
        (host, base_url, proxy) => {
            problems.extend(host.err());
            problems.extend(base_url.err());
            problems.extend(proxy.err());
            return Err(ConfigError::Invalid(problems));
        }
    };
    let routes = RouteTable::new(specs).map_err(|err| ConfigError::one(err.to_string()))?;

    Ok(Config {
        server: ServerConfig {
            host,
            port: raw.server.port,
            shutdown_grace: raw.server.shutdown_grace.0,
            header_read_timeout: raw.server.header_read_timeout.0,
            body_read_timeout: raw.server.body_read_timeout.0,
            max_header_bytes: raw.server.max_header_bytes.0,
            max_connections: NonZeroU32::new(raw.server.max_connections),
            workers: NonZeroU32::new(raw.server.workers),
            fast_lane: raw.server.fast_lane,
            tls,
            acme,
        },
        upstream: UpstreamConfig {
            base_url,
            connect_timeout: raw.upstream.connect_timeout.0,
            read_timeout: raw.upstream.read_timeout.0,
            proxy,
            ready_check: raw.upstream.ready_check,
        },
        limits: LimitsConfig {
            max_json_body: raw.limits.max_json_body.0,
            max_upload_body: raw.limits.max_upload_body.0,
            // 0 means off for each of these.
            admission: AdmissionConfig {
                requests_per_minute_per_key: NonZeroU32::new(
                    raw.limits.requests_per_minute_per_key,
                ),
                requests_per_minute_per_ip: NonZeroU32::new(raw.limits.requests_per_minute_per_ip),
                burst: NonZeroU32::new(raw.limits.burst),
                max_concurrent_requests: NonZeroU32::new(raw.limits.max_concurrent_requests),
                max_concurrent_per_key: NonZeroU32::new(raw.limits.max_concurrent_per_key),
            },
        },
        cors: CorsConfig { allow_origins },
        access,
        streaming,
        tracing: TracingConfig {
            server_timing: raw.tracing.server_timing,
            otlp_endpoint,
            otlp_from_environment: [
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ]
            .iter()
            .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty())),
        },
        usage: UsageConfig {
            inject_stream_usage: raw.usage.inject_stream_usage,
        },
        realtime: RealtimeConfig {
            max_message: raw.realtime.max_message.0,
            idle_timeout: raw.realtime.idle_timeout.0,
        },
        openapi: OpenApiConfig {
            enabled: raw.openapi.enabled,
            title: raw.openapi.title,
            version: raw.openapi.version,
        },
        log,
        metrics: MetricsConfig {
            enabled: raw.metrics.enabled,
            tokens_by_key: raw.metrics.tokens_by_key,
            max_models: usize::try_from(raw.metrics.max_models).unwrap_or(usize::MAX),
        },
        routes,
        source,
    })
}

/// A keep-alive must be more than zero and come before the read timeout that applies to the
/// same route ends the stream: keep-alives do not hold it off, so one that never fires in
/// time is a mistake.
fn check_keepalives(
    streaming: &StreamingConfig,
    read_timeout: Duration,
    specs: &[RouteSpec],
    problems: &mut Vec<String>,
) {
    let mut check = |at: String, keepalive: Duration, read_timeout: (Duration, String)| {
        if keepalive.is_zero() {
            problems.push(format!(
                "{at}: must be more than 0s (leave it out for none)"
            ));
        } else if keepalive >= read_timeout.0 {
            problems.push(format!(
                "{at}: {} is not below {} ({}), which ends a silent stream first",
                format_duration(keepalive),
                read_timeout.1,
                format_duration(read_timeout.0),
            ));
        }
    };
    let global = (read_timeout, "upstream.read_timeout".to_owned());
    if let Some(keepalive) = streaming.keepalive {
        check("streaming.keepalive".to_owned(), keepalive, global.clone());
    }
    for spec in specs {
        let at = format!("routes[{}]", spec.index);
        let read_timeout = match spec.read_timeout {
            Some(own) => (own, format!("{at}.read_timeout")),
            None => global.clone(),
        };
        match (spec.keepalive, streaming.keepalive) {
            (Some(own), _) => check(format!("{at}.keepalive"), own, read_timeout),
            // The global one, under a streaming route's own read timeout.
            (None, Some(keepalive)) if spec.streaming && spec.read_timeout.is_some() => {
                check("streaming.keepalive".to_owned(), keepalive, read_timeout)
            }
            _ => {}
        }
    }
}

fn validate_log(raw: raw::RawLog, problems: &mut Vec<String>) -> LogConfig {
    let format = match raw.format.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            problems.push(format!(
                "log.format: {other:?} is not one of \"text\", \"json\""
            ));
            LogFormat::Text
        }
    };
    if let Err(err) = tracing_subscriber::EnvFilter::builder().parse(&raw.level) {
        problems.push(format!(
            "log.level: {:?} is not a log filter like \"info\" or \"info,oa_bypass=debug\" ({err})",
            raw.level
        ));
    }
    LogConfig {
        format,
        level: raw.level,
    }
}

fn validate_acme(raw: raw::RawAcme, problems: &mut Vec<String>) -> Option<AcmeConfig> {
    let before = problems.len();
    if raw.domains.is_empty() {
        problems.push("server.acme.domains: list at least one domain name".to_owned());
    }
    for domain in &raw.domains {
        let valid = !domain.is_empty()
            && domain.len() <= 253
            && domain
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'));
        if !valid {
            problems.push(format!(
                "server.acme.domains: {domain:?} is not a domain name like \"gw.example.com\""
            ));
        }
    }
    if raw.cache_dir.is_empty() {
        problems.push(
            "server.acme.cache_dir: needed, so a restart reuses the certificate instead of \
             asking for a new one"
                .to_owned(),
        );
    }
    let directory = match raw.directory.as_str() {
        "letsencrypt" => Url::parse(poem::listener::acme::LETS_ENCRYPT_PRODUCTION).ok(),
        "letsencrypt-staging" => Url::parse(poem::listener::acme::LETS_ENCRYPT_STAGING).ok(),
        other => Url::parse(other).ok().filter(|url| url.scheme() == "https"),
    };
    if directory.is_none() {
        problems.push(format!(
            "server.acme.directory: {:?} is not \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL",
            raw.directory
        ));
    }
    match directory {
        Some(directory) if problems.len() == before => Some(AcmeConfig {
            domains: raw.domains,
            cache_dir: PathBuf::from(raw.cache_dir),
            contacts: raw.contacts,
            directory,
        }),
        _ => None,
    }
}

fn validate_access(raw: raw::RawAccess, problems: &mut Vec<String>) -> AccessConfig {
    let mut access = AccessConfig::default();
    for (i, line) in raw.allowed_key_hashes.iter().enumerate() {
        match super::parse_hash_line(line.trim()) {
            Some(hash) => access.allowed_key_hashes.push(hash),
            // The value is not echoed: someone may have pasted a key here by mistake.
            None => problems.push(format!(
                "access.allowed_key_hashes[{i}]: not a \"sha256:<64 hex digits>\" line; \
                 make one with `oa-bypass hash-key`"
            )),
        }
    }
    for (key, list, into) in [
        (
            "access.allowed_ips",
            &raw.allowed_ips,
            &mut access.allowed_ips,
        ),
        (
            "access.trusted_proxies",
            &raw.trusted_proxies,
            &mut access.trusted_proxies,
        ),
    ] {
        for (i, text) in list.iter().enumerate() {
            let parsed = text
                .parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => into.push(net.trunc()),
                Err(_) => problems.push(format!(
                    "{key}[{i}]: {text:?} is not an address or CIDR network like \"203.0.113.0/24\" or \"::1\""
                )),
            }
        }
    }
    if let Some(secret) = raw.path_secret {
        let valid = (8..=128).contains(&secret.len())
            && secret
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'));
        if valid {
            access.path_secret = Some(secret);
        } else {
            problems.push(
                "access.path_secret: must be 8 to 128 characters of letters, digits, '-', '_', \
                 '.' or '~' (it becomes a path segment)"
                    .to_owned(),
            );
        }
    }
    access
}

/// An `http://` or `https://` URL with a host and no query: `upstream.base_url`,
/// `tracing.otlp_endpoint` (paths are appended to both).
fn parse_http_url(setting: &str, text: &str) -> Result<Url, String> {
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

fn parse_proxy_url(text: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("upstream.proxy: {:?} {why}", redact_userinfo(text));
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

fn validate_route(
    index: usize,
    value: figment::value::Value,
    source: &ManifestSource,
) -> Result<RouteSpec, Vec<String>> {
    let at = format!("routes[{index}]");
    let raw: RawRoute = value
        .deserialize()
        .map_err(|err| describe_figment_error(err, Some(&at), source))?;
    let mut problems = Vec::new();

    let method = if METHODS.contains(&raw.method.as_str()) {
        raw.method.parse::<Method>().ok()
    } else {
        None
    };
    if method.is_none() {
        problems.push(format!(
            "{at}.method: {:?} is not one of {}",
            raw.method,
            METHODS.join(", ")
        ));
    }

    let template = PathTemplate::parse(&raw.path)
        .map_err(|err| problems.push(format!("{at}.path: {:?} {err}", raw.path)))
        .ok();

    let body_names = raw
        .body
        .map_or_else(|| vec!["none".to_owned()], |b| b.into_vec());
    let mut body = Vec::with_capacity(body_names.len());
    if body_names.is_empty() {
        problems.push(format!(
            "{at}.body: the list is empty; use \"none\" for no body"
        ));
    }
    for name in &body_names {
        match BodyKind::parse(name) {
            Some(kind) if !body.contains(&kind) => body.push(kind),
            Some(kind) => problems.push(format!("{at}.body: {kind:?} is listed twice")),
            None => problems.push(format!(
                "{at}.body: {name:?} is not one of {}",
                BodyKind::ALL.map(BodyKind::as_str).join(", ")
            )),
        }
    }
    if body.contains(&BodyKind::WebSocket) {
        if body.len() > 1 {
            problems.push(format!(
                "{at}.body: \"websocket\" cannot be combined with other kinds"
            ));
        }
        if method.as_ref().is_some_and(|m| m != Method::GET) {
            problems.push(format!(
                "{at}.method: a websocket route must be GET (WebSockets open with GET + Upgrade)"
            ));
        }
    }
    if raw.stream_usage_option && !(raw.usage && body.contains(&BodyKind::Json)) {
        problems.push(format!(
            "{at}.stream_usage_option: needs usage = true and a json body"
        ));
    }
    if let Some(timeout) = raw.read_timeout {
        if timeout.0.is_zero() {
            problems.push(format!("{at}.read_timeout: must be more than 0s"));
        }
    }
    if let Some(size) = raw.max_body {
        if size.0 == 0 {
            problems.push(format!("{at}.max_body: must be more than 0 bytes"));
        }
    }
    if let Some(id) = &raw.operation_id {
        let valid = !id.is_empty()
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !valid {
            problems.push(format!(
                "{at}.operation_id: {id:?} may only hold letters, digits, '_', '-' and '.'"
            ));
        }
    }
    for media_type in raw.produces.iter().flatten() {
        if !crate::routes::is_media_type(media_type) {
            problems.push(format!(
                "{at}.produces: {media_type:?} is not a media type like \"application/zip\""
            ));
        }
    }

    match (method, template) {
        (Some(method), Some(template)) if problems.is_empty() => Ok(RouteSpec {
            index,
            method,
            template,
            body,
            summary: raw.summary,
            tag: raw.tag,
            streaming: raw.streaming,
            read_timeout: raw.read_timeout.map(|t| t.0),
            keepalive: raw.keepalive.map(|t| t.0),
            max_body: raw.max_body.map(|s| s.0),
            operation_id: raw.operation_id,
            produces: raw.produces,
            usage: raw.usage,
            stream_usage_option: raw.stream_usage_option,
        }),
        _ => Err(problems),
    }
}
