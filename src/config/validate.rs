//! From the manifest as written to validated, typed settings: every problem is collected and
//! named by its key, with the bad value and what is allowed; a value that may be secret is
//! never echoed.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use url::Url;

use super::keys::{validate_keys, Known};
use super::mount::{check_route_upstreams, validate_mounts, validate_upstream, DEFAULT_MOUNT};
use super::prices::validate_prices;
use super::raw::{self, RawConfig, DEFAULT_TAG_ORDER};
use super::route;
use super::routing::validate_routing;
use super::store::validate_store;
use super::units::format_duration;
use super::values::parse_http_url;
use super::{
    AccessConfig, AcmeConfig, AdmissionConfig, Config, ConfigError, CorsConfig, LimitsConfig,
    LogConfig, LogFormat, ManifestSource, MetricsConfig, MountConfig, OpenApiConfig,
    RealtimeConfig, ServerConfig, StreamingConfig, TlsConfig, TracingConfig, UsageConfig,
};
use crate::routes::{RouteSpec, RouteTable};

pub(super) fn validate(raw: RawConfig, source: ManifestSource) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let host = server_host(&raw.server.host);
    check_bounds(&raw, &mut problems);
    let mut access = validate_access(raw.access, &mut problems);
    let store = validate_store(&raw.limits, &mut problems);
    let allowed_keys = !access.allowed_key_hashes.is_empty() || !raw.keys.is_empty();
    let upstream = validate_upstream(
        "upstream",
        DEFAULT_MOUNT,
        &raw.upstream,
        allowed_keys,
        &mut problems,
    );
    let log = validate_log(raw.log, &mut problems);
    let server = server_config(&raw.server);
    let (tls, acme) = certificate_source(raw.server.tls, raw.server.acme, &mut problems);
    let tracing = tracing_config(raw.tracing, &mut problems);
    if raw.metrics.max_models == 0 {
        problems.push("metrics.max_models: must be at least 1".to_owned());
    }
    let specs = validate_routes(raw.routes, &source, &mut problems);
    let streaming = StreamingConfig {
        keepalive: raw.streaming.keepalive.map(|t| t.0),
    };
    check_keepalives(
        &streaming,
        raw.upstream.read_timeout.0,
        &specs,
        &mut problems,
    );
    let mounts = validate_mounts(
        raw.mounts,
        &raw.upstream,
        &specs,
        allowed_keys,
        &source,
        &mut problems,
    );
    check_route_upstreams(&specs, &mounts, &mut problems);
    let (models, retry) = validate_routing((raw.models, raw.retry), &mounts, &mut problems);
    let (named_keys, prices) = team_keys(
        (raw.keys, raw.prices),
        &access,
        (&specs, &mounts),
        (&raw.limits, store.is_some()),
        &mut problems,
    );
    access.named_keys = named_keys;
    check_something_served(&specs, &mounts, &mut problems);
    let tag_order = tag_order(raw.openapi.tag_order, &specs, &mounts, &mut problems);
    let schemas = (raw.openapi.schemas.as_deref())
        .and_then(|path| schemas_file(path, &source, &mut problems));
    let (host, upstream) = match (host, upstream) {
        (Ok(host), Some(upstream)) if problems.is_empty() => (host, upstream),
        (host, _) => {
            problems.extend(host.err());
            return Err(ConfigError::Invalid(problems));
        }
    };
    let routes = RouteTable::new(specs).map_err(|err| ConfigError::one(err.to_string()))?;
    Ok(Config {
        server: ServerConfig {
            host,
            tls,
            acme,
            ..server
        },
        upstream: Arc::new(upstream),
        mounts,
        limits: limits_config(&raw.limits, store, &source),
        prices,
        models,
        retry,
        cors: CorsConfig {
            allow_origins: raw.cors.allow_origins,
        },
        access,
        streaming,
        tracing,
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
            tag_order,
            schemas,
        },
        log,
        metrics: metrics_config(&raw.metrics),
        routes,
        source,
    })
}

/// `server.host`, an address.
fn server_host(host: &str) -> Result<IpAddr, String> {
    host.parse::<IpAddr>().map_err(|_| {
        format!(
            "server.host: {host:?} is not an IP address (use 0.0.0.0 for every IPv4 interface, \
             :: for every IPv6 one, 127.0.0.1 for this machine only)"
        )
    })
}

/// `[keys]` and `[prices]`, the keys checked against the anonymous keys, the routes' tags,
/// the prices, and where their counts are kept (`limits.state_file`, or a store).
fn team_keys(
    (keys, prices): (
        std::collections::BTreeMap<String, raw::RawKey>,
        std::collections::BTreeMap<String, raw::RawPrice>,
    ),
    access: &AccessConfig,
    (specs, mounts): (&[RouteSpec], &[MountConfig]),
    (limits, has_store): (&raw::RawLimits, bool),
    problems: &mut Vec<String>,
) -> (super::NamedKeys, super::Prices) {
    let prices = validate_prices(prices, problems);
    let has_file = !limits.state_file.trim().is_empty();
    if has_file && has_store {
        problems.push(
            "limits.state_file: with limits.store the counts are kept there, for every replica; \
             leave one of them out"
                .to_owned(),
        );
    }
    let tags = route_tags(specs, mounts);
    let known = Known {
        anonymous: &access.allowed_key_hashes,
        tags: &tags,
        prices: &prices,
        kept: has_file || has_store,
    };
    (validate_keys(keys, &known, problems), prices)
}

/// Every tag of the routes served, the manifest's and the mounts' own, sorted.
fn route_tags<'a>(specs: &'a [RouteSpec], mounts: &'a [MountConfig]) -> Vec<&'a str> {
    let own = (mounts.iter())
        .filter_map(|mount| mount.routes.as_ref())
        .flat_map(|table| table.routes());
    let mut tags: Vec<&str> = specs
        .iter()
        .chain(own)
        .map(RouteSpec::tag_or_default)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    tags
}

/// `[server]`, but for the address and the certificate, which are checked on their own.
fn server_config(raw: &raw::RawServer) -> ServerConfig {
    ServerConfig {
        host: IpAddr::from([0, 0, 0, 0]),
        port: raw.port,
        shutdown_grace: raw.shutdown_grace.0,
        header_read_timeout: raw.header_read_timeout.0,
        body_read_timeout: raw.body_read_timeout.0,
        max_header_bytes: raw.max_header_bytes.0,
        max_connections: NonZeroU32::new(raw.max_connections),
        workers: NonZeroU32::new(raw.workers),
        fast_lane: raw.fast_lane,
        tls: None,
        acme: None,
    }
}

/// `[metrics]`.
fn metrics_config(raw: &raw::RawMetrics) -> MetricsConfig {
    MetricsConfig {
        enabled: raw.enabled,
        tokens_by_key: raw.tokens_by_key,
        max_models: usize::try_from(raw.max_models).unwrap_or(usize::MAX),
    }
}

/// Some route is served: the manifest's, or a mount's routes file of its own (a manifest of
/// such mounts may declare none itself).
fn check_something_served(specs: &[RouteSpec], mounts: &[MountConfig], problems: &mut Vec<String>) {
    let mounts_serve = mounts.iter().any(|mount| mount.routes.is_some());
    if specs.is_empty() && !mounts_serve && problems.is_empty() {
        problems.push(
            "routes: the manifest declares no [[routes]]; there would be nothing to serve"
                .to_owned(),
        );
    }
}

/// The settings that only need to be within their bounds: origins that are origins, body
/// limits and timeouts above zero, a head limit a server can keep.
fn check_bounds(raw: &RawConfig, problems: &mut Vec<String>) {
    for origin in &raw.cors.allow_origins {
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
}

/// `server.tls` or `server.acme`, not both.
fn certificate_source(
    tls: Option<raw::RawTls>,
    acme: Option<raw::RawAcme>,
    problems: &mut Vec<String>,
) -> (Option<TlsConfig>, Option<AcmeConfig>) {
    let tls = tls.map(|tls| TlsConfig {
        cert: PathBuf::from(tls.cert),
        key: PathBuf::from(tls.key),
    });
    let acme = acme.and_then(|acme| validate_acme(acme, problems));
    if tls.is_some() && acme.is_some() {
        problems.push(
            "server.tls and server.acme: choose one source for the certificate, not both"
                .to_owned(),
        );
    }
    (tls, acme)
}

/// `[tracing]`: the collector's URL, or the `OTEL_EXPORTER_OTLP_*` variables that turn
/// traces on without one.
fn tracing_config(raw: raw::RawTracing, problems: &mut Vec<String>) -> TracingConfig {
    let otlp_endpoint = raw.otlp_endpoint.as_deref().and_then(|text| {
        parse_http_url("tracing.otlp_endpoint", text)
            .map_err(|err| problems.push(err))
            .ok()
    });
    let from_environment = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|name| std::env::var_os(name).is_some_and(|value| !value.is_empty()));
    TracingConfig {
        server_timing: raw.server_timing,
        otlp_endpoint,
        otlp_from_environment: from_environment,
    }
}

/// Every `[[routes]]` entry, each problem named by its index.
fn validate_routes(
    routes: Vec<figment::value::Value>,
    source: &ManifestSource,
    problems: &mut Vec<String>,
) -> Vec<RouteSpec> {
    let mut specs = Vec::with_capacity(routes.len());
    for (index, value) in routes.into_iter().enumerate() {
        match route::validate_route(index, value, source) {
            Ok(spec) => specs.push(spec),
            Err(mut route_problems) => problems.append(&mut route_problems),
        }
    }
    specs
}

/// `[limits]`, where 0 means off for each rate and cap.
fn limits_config(
    raw: &raw::RawLimits,
    store: Option<super::StoreConfig>,
    source: &ManifestSource,
) -> LimitsConfig {
    let state_file = Some(raw.state_file.trim())
        .filter(|path| !path.is_empty())
        .map(|path| beside_manifest(path, source));
    LimitsConfig {
        state_file,
        max_json_body: raw.max_json_body.0,
        max_upload_body: raw.max_upload_body.0,
        admission: AdmissionConfig {
            requests_per_minute_per_key: NonZeroU32::new(raw.requests_per_minute_per_key),
            requests_per_minute_per_ip: NonZeroU32::new(raw.requests_per_minute_per_ip),
            burst: NonZeroU32::new(raw.burst),
            max_concurrent_requests: NonZeroU32::new(raw.max_concurrent_requests),
            max_concurrent_per_key: NonZeroU32::new(raw.max_concurrent_per_key),
            store,
        },
    }
}

/// `openapi.tag_order` as written, each a tag some route or mount has; else the default
/// order, of the tags this manifest has.
fn tag_order(
    written: Option<Vec<String>>,
    specs: &[RouteSpec],
    mounts: &[MountConfig],
    problems: &mut Vec<String>,
) -> Vec<String> {
    let exists = |tag: &str| {
        specs.iter().any(|spec| spec.tag_or_default() == tag)
            || mounts.iter().any(|mount| &*mount.upstream.mount == tag)
    };
    let Some(written) = written else {
        return (DEFAULT_TAG_ORDER.iter())
            .filter(|tag| exists(tag))
            .map(|tag| (*tag).to_owned())
            .collect();
    };
    for (i, tag) in written.iter().enumerate() {
        if written[..i].contains(tag) {
            problems.push(format!("openapi.tag_order[{i}]: {tag:?} is listed twice"));
        } else if !exists(tag) {
            problems.push(format!(
                "openapi.tag_order[{i}]: {tag:?} is not the tag of any route or mount"
            ));
        }
    }
    written
}

/// `openapi.schemas`, from the manifest's directory when relative; it must be a file (its
/// content is read when the document is first built, or by `--check`).
/// A path the manifest names: a relative one is read from the manifest's folder.
fn beside_manifest(written: &str, source: &ManifestSource) -> PathBuf {
    let path = Path::new(written);
    match source {
        ManifestSource::File(manifest) if path.is_relative() => {
            (manifest.parent()).map_or_else(|| path.to_owned(), |dir| dir.join(path))
        }
        _ => path.to_owned(),
    }
}

fn schemas_file(
    written: &str,
    source: &ManifestSource,
    problems: &mut Vec<String>,
) -> Option<PathBuf> {
    let path = beside_manifest(written, source);
    match std::fs::metadata(&path) {
        Ok(meta) if meta.is_file() => Some(path),
        Ok(_) => {
            problems.push(format!("openapi.schemas: {} is not a file", path.display()));
            None
        }
        Err(err) => {
            problems.push(format!("openapi.schemas: {}: {err}", path.display()));
            None
        }
    }
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
    if raw.buffer.0 < 32 << 10 {
        problems.push("log.buffer: must be at least 32KiB (one batch of lines)".to_owned());
    }
    LogConfig {
        format,
        level: raw.level,
        buffer: raw.buffer.0,
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
