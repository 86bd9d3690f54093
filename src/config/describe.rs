//! `--check`: the effective settings and the route table, as text, with secrets masked.
//!
//! Every manifest key is shown here, a section at a time; a test holds the list against the
//! keys the manifest takes (`config::raw`), so a key added there and forgotten here fails.

use std::fmt::Write;
use std::num::NonZeroU32;

use super::units::{format_duration, format_size};
use super::values::mask_url;
use super::{
    AccessConfig, Config, CorsConfig, LimitsConfig, LogConfig, LogFormat, MetricsConfig,
    OpenApiConfig, RealtimeConfig, ServerConfig, StoreConfig, StreamingConfig, TracingConfig,
    UpstreamConfig, UsageConfig,
};
use crate::routes::RouteSpec;

/// One line of `--check`: a key path and the value in force.
type Line = (String, String);

fn line(key: &str, value: impl Into<String>) -> Line {
    (key.to_owned(), value.into())
}

impl Config {
    /// The named keys and what each may do, for `oa-bypass keys list`.
    pub fn describe_keys(&self) -> String {
        let mut out = String::new();
        for (key, value) in super::keys::key_lines(&self.access.named_keys) {
            let _ = writeln!(out, "{key:<34} {value}");
        }
        out
    }

    /// The effective settings and route table, with secrets masked, for `--check`.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "manifest: {}", self.source);
        let _ = writeln!(out, "\nsettings:");
        let sections = [
            server_lines(&self.server),
            upstream_lines(&self.upstream),
            streaming_lines(&self.streaming, &self.tracing, &self.usage),
            limits_lines(&self.limits),
            cors_and_realtime_lines(&self.cors, &self.realtime),
            access_lines(&self.access),
            openapi_lines(&self.openapi),
            log_and_metrics_lines(&self.log, &self.metrics),
            routing_lines(self),
        ];
        for (key, value) in sections.iter().flatten() {
            let _ = writeln!(out, "  {key:<34} {value}");
        }
        for mount in &self.mounts {
            let (name, prefix) = (&mount.upstream.mount, &mount.prefix);
            let _ = writeln!(out, "\nmount {name} under {prefix}:");
            let routes = match &mount.routes {
                Some(routes) => format!("{} of its own", routes.len()),
                None => "the manifest's".to_owned(),
            };
            let key_path = &mount.upstream.key_path;
            let lines = upstream_lines(&mount.upstream)
                .into_iter()
                .filter(|(key, _)| !key.ends_with(".ready_check"))
                .chain([line(&format!("{key_path}.routes"), routes)]);
            for (key, value) in lines {
                let _ = writeln!(out, "  {key:<34} {value}");
            }
        }
        if !self.access.named_keys.is_empty() {
            let (manifest, shipped) = self.prices.counts();
            let _ = writeln!(
                out,
                "\nprices: {manifest} in [prices], then {shipped} in prices.toml (taken {})",
                self.prices.taken
            );
            let _ = writeln!(out, "\nkeys ({}):", self.access.named_keys.len());
            for (key, value) in super::keys::key_lines(&self.access.named_keys) {
                let _ = writeln!(out, "  {key:<34} {value}");
            }
        }
        for warning in self.warnings() {
            let _ = writeln!(out, "\nwarning: {warning}");
        }
        let _ = writeln!(out, "\nroutes ({}):", self.routes.len());
        for route in self.routes.routes() {
            let _ = writeln!(out, "{}", route_line(route).trim_end());
        }
        out
    }
}

fn server_lines(server: &ServerConfig) -> Vec<Line> {
    let workers = server.workers.map_or_else(
        || format!("auto ({})", server.worker_count()),
        |n| n.to_string(),
    );
    let tls = server.tls.as_ref().map_or("(off)".to_owned(), |tls| {
        format!("cert={} key={}", tls.cert.display(), tls.key.display())
    });
    let acme = server.acme.as_ref().map_or("(off)".to_owned(), |acme| {
        let (cache, directory) = (acme.cache_dir.display(), &acme.directory);
        format!(
            "domains={:?} cache_dir={cache} directory={directory}",
            acme.domains
        )
    });
    vec![
        line("server.host", server.host.to_string()),
        line("server.port", server.port.to_string()),
        line(
            "server.shutdown_grace",
            format_duration(server.shutdown_grace),
        ),
        line(
            "server.header_read_timeout",
            format_duration(server.header_read_timeout),
        ),
        line(
            "server.body_read_timeout",
            format_duration(server.body_read_timeout),
        ),
        line(
            "server.max_header_bytes",
            format_size(server.max_header_bytes),
        ),
        line("server.max_connections", show_limit(server.max_connections)),
        line("server.workers", workers),
        line("server.fast_lane", server.fast_lane.to_string()),
        line("server.tls", tls),
        line("server.acme", acme),
    ]
}

/// The settings of `[upstream]` or a mount, under its key path; the keys it holds by
/// variable name, never by value.
fn upstream_lines(upstream: &UpstreamConfig) -> Vec<Line> {
    let at = |key: &str| format!("{}.{key}", upstream.key_path);
    let proxy = upstream.proxy.as_ref().map_or_else(
        || "(none: HTTPS_PROXY/ALL_PROXY/NO_PROXY apply)".to_owned(),
        mask_url,
    );
    let vars: Vec<&str> = upstream.keys.iter().map(|key| key.var.as_str()).collect();
    let keys = if vars.is_empty() {
        "(none: the client's key goes up)".to_owned()
    } else {
        format!("{} (held by the gateway, each set)", vars.join(", "))
    };
    let streams = upstream.http2_max_concurrent_streams.to_string();
    vec![
        (at("base_url"), mask_url(&upstream.base_url)),
        (
            at("connect_timeout"),
            format_duration(upstream.connect_timeout),
        ),
        (at("read_timeout"), format_duration(upstream.read_timeout)),
        (at("proxy"), proxy),
        (at("http2"), upstream.http2.to_string()),
        (
            at("max_idle_connections"),
            upstream.max_idle_connections.to_string(),
        ),
        (at("http2_max_concurrent_streams"), streams),
        (at("ready_check"), upstream.ready_check.to_string()),
        (
            at("credential_header"),
            upstream.credential_header.as_str().to_owned(),
        ),
        (at("keys_env"), keys),
        (at("retry"), upstream.retry.to_string()),
    ]
}

/// `[retry]`, and each `[models]` entry with its targets in order.
fn routing_lines(config: &Config) -> Vec<Line> {
    let retry = &config.retry;
    let mut lines = vec![
        line("retry.max_attempts", retry.max_attempts.to_string()),
        line("retry.max_body", format_size(retry.max_body)),
        line("retry.budget", format!("{}%", retry.budget * 100.0)),
        line("retry.eject_after", retry.eject_after.to_string()),
        line("retry.eject_for", format_duration(retry.eject_for)),
    ];
    for route in config.models.iter() {
        let targets: Vec<String> = (route.targets.iter())
            .map(|target| match &target.model {
                Some(model) => format!("{}/{model}", target.mount),
                None => target.mount.to_string(),
            })
            .collect();
        let key = format!("models.{:?}.targets", route.pattern.as_str());
        lines.push((key, targets.join(", ")));
    }
    lines
}

fn streaming_lines(
    streaming: &StreamingConfig,
    tracing: &TracingConfig,
    usage: &UsageConfig,
) -> Vec<Line> {
    let keepalive = streaming
        .keepalive
        .map_or("(off)".to_owned(), format_duration);
    let otlp = match (&tracing.otlp_endpoint, tracing.otlp_from_environment) {
        (Some(endpoint), _) => mask_url(endpoint),
        (None, true) => "(from OTEL_EXPORTER_OTLP_*)".to_owned(),
        (None, false) => "(off)".to_owned(),
    };
    vec![
        line("streaming.keepalive", keepalive),
        line("tracing.server_timing", tracing.server_timing.to_string()),
        line("tracing.otlp_endpoint", otlp),
        line(
            "usage.inject_stream_usage",
            usage.inject_stream_usage.to_string(),
        ),
    ]
}

fn limits_lines(limits: &LimitsConfig) -> Vec<Line> {
    let admission = &limits.admission;
    let store = admission.store.as_ref();
    let store_setting = |show: fn(&StoreConfig) -> String| store.map_or("(no store)".into(), show);
    vec![
        line("limits.max_json_body", format_size(limits.max_json_body)),
        line(
            "limits.max_upload_body",
            format_size(limits.max_upload_body),
        ),
        line(
            "limits.requests_per_minute_per_key",
            show_limit(admission.requests_per_minute_per_key),
        ),
        line(
            "limits.requests_per_minute_per_ip",
            show_limit(admission.requests_per_minute_per_ip),
        ),
        line("limits.burst", show_limit(admission.burst)),
        line(
            "limits.max_concurrent_requests",
            show_limit(admission.max_concurrent_requests),
        ),
        line(
            "limits.max_concurrent_per_key",
            show_limit(admission.max_concurrent_per_key),
        ),
        line(
            "limits.store",
            store.map_or_else(
                || "(off: limits are per process)".into(),
                StoreConfig::shown,
            ),
        ),
        line(
            "limits.store_failure",
            store_setting(|s| s.failure.as_str().into()),
        ),
        line(
            "limits.store_timeout",
            store_setting(|s| format_duration(s.timeout)),
        ),
        line(
            "limits.store_lease",
            store_setting(|s| format_duration(s.lease)),
        ),
        line(
            "limits.state_file",
            (limits.state_file.as_ref())
                .map_or_else(|| "(none)".into(), |path| path.display().to_string()),
        ),
    ]
}

fn cors_and_realtime_lines(cors: &CorsConfig, realtime: &RealtimeConfig) -> Vec<Line> {
    vec![
        line("cors.allow_origins", format!("{:?}", cors.allow_origins)),
        line("realtime.max_message", format_size(realtime.max_message)),
        line(
            "realtime.idle_timeout",
            format_duration(realtime.idle_timeout),
        ),
    ]
}

fn access_lines(access: &AccessConfig) -> Vec<Line> {
    let secret = if access.path_secret.is_some() {
        "(set)"
    } else {
        "(none)"
    };
    vec![
        line(
            "access.allowed_key_hashes",
            format!("{} listed", access.allowed_key_hashes.len()),
        ),
        line("access.allowed_ips", format!("{:?}", access.allowed_ips)),
        line(
            "access.trusted_proxies",
            format!("{:?}", access.trusted_proxies),
        ),
        line("access.path_secret", secret),
    ]
}

fn openapi_lines(openapi: &OpenApiConfig) -> Vec<Line> {
    let schemas = (openapi.schemas.as_ref())
        .map_or_else(|| "(none)".to_owned(), |path| path.display().to_string());
    vec![
        line("openapi.enabled", openapi.enabled.to_string()),
        line("openapi.title", format!("{:?}", openapi.title)),
        line("openapi.version", format!("{:?}", openapi.version)),
        line("openapi.tag_order", format!("{:?}", openapi.tag_order)),
        line("openapi.schemas", schemas),
    ]
}

fn log_and_metrics_lines(log: &LogConfig, metrics: &MetricsConfig) -> Vec<Line> {
    let format = match log.format {
        LogFormat::Text => "text",
        LogFormat::Json => "json",
    };
    vec![
        line("log.format", format),
        line("log.level", format!("{:?}", log.level)),
        line("log.buffer", format_size(log.buffer)),
        line("metrics.enabled", metrics.enabled.to_string()),
        line("metrics.tokens_by_key", metrics.tokens_by_key.to_string()),
        line("metrics.max_models", metrics.max_models.to_string()),
    ]
}

/// A route as `--check` lists it: method, template, body kinds, and what it sets itself.
fn route_line(route: &RouteSpec) -> String {
    let kinds: Vec<&str> = route.body.iter().map(|kind| kind.as_str()).collect();
    let mut extras = Vec::new();
    if route.streaming {
        extras.push("streaming".to_owned());
    }
    if let Some(timeout) = route.read_timeout {
        extras.push(format!("read_timeout={}", format_duration(timeout)));
    }
    if let Some(keepalive) = route.keepalive {
        extras.push(format!("keepalive={}", format_duration(keepalive)));
    }
    if let Some(max) = route.max_body {
        extras.push(format!("max_body={}", format_size(max)));
    }
    if route.usage {
        extras.push("usage".to_owned());
    }
    if route.stream_usage_option {
        extras.push("stream_usage_option".to_owned());
    }
    if let Some(upstream) = &route.upstream {
        extras.push(format!("upstream={upstream}"));
    }
    if route.route_by_model {
        extras.push("route_by_model".to_owned());
    }
    format!(
        "  {:<6} {:<80} {:<16} {}",
        route.method.as_str(),
        route.template.as_str(),
        kinds.join("|"),
        extras.join(" ")
    )
}

fn show_limit(limit: Option<NonZeroU32>) -> String {
    limit.map_or_else(|| "off".to_owned(), |n| n.to_string())
}

#[cfg(test)]
mod tests {
    use figment::Figment;

    use super::super::raw::{RawConfig, RawMount};
    use super::*;

    /// Every key the manifest takes, as `section.key`, from its raw shape with every
    /// default; and a mount's, as `mounts.NAME.key`.
    fn manifest_keys() -> (Vec<String>, Vec<String>) {
        let raw: RawConfig = Figment::new().extract().unwrap();
        let raw = serde_json::to_value(raw).unwrap();
        let mut keys = Vec::new();
        for (section, table) in raw.as_object().unwrap() {
            let Some(table) = table.as_object() else {
                continue;
            };
            keys.extend(table.keys().map(|key| format!("{section}.{key}")));
        }
        let mount = RawMount {
            prefix: "/m".into(),
            base_url: "http://m".into(),
            connect_timeout: None,
            read_timeout: None,
            proxy: None,
            http2: None,
            max_idle_connections: None,
            http2_max_concurrent_streams: None,
            credential_header: None,
            keys_env: Vec::new(),
            retry: false,
            routes: None,
        };
        let mount = serde_json::to_value(mount).unwrap();
        let mount_keys = mount.as_object().unwrap().keys().cloned().collect();
        (keys, mount_keys)
    }

    #[test]
    fn check_shows_every_key_the_manifest_takes() {
        let (keys, mount_keys) = manifest_keys();
        assert!(keys.len() > 50, "{keys:?}");
        let manifest = "[mounts.m]\nprefix = \"/m\"\nbase_url = \"http://m\"\n\
                        [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";
        let described = Config::from_manifest_str(manifest).unwrap().describe();
        for key in &keys {
            assert!(
                described.contains(&format!("  {key} ")),
                "{key} missing from --check"
            );
        }
        assert!(described.contains("mount m under /m:"), "{described}");
        for key in mount_keys.iter().filter(|key| *key != "prefix") {
            let key = format!("mounts.m.{key}");
            assert!(
                described.contains(&format!("  {key} ")),
                "{key} missing from --check"
            );
        }
    }

    /// Whether a row of `readme`'s settings tables documents `section.key`: by its name,
    /// by the name of something inside it (`server.tls.cert`, `server.acme.*`), or in the
    /// short forms the tables use beside a key of the same section (`.key`, `…_per_ip`).
    fn documented(readme: &str, section: &str, key: &str) -> bool {
        let full = format!("`{section}.{key}");
        readme
            .lines()
            .filter(|line| line.starts_with("| `"))
            .map(|row| row.split(" | ").next().unwrap_or(""))
            .any(|cell| {
                let same_section = cell.contains(&format!("`{section}."));
                let short = cell.split('`').any(|name| {
                    name == format!(".{key}")
                        || name
                            .strip_prefix('…')
                            .is_some_and(|tail| key.ends_with(tail))
                });
                cell.contains(&format!("{full}`"))
                    || cell.contains(&format!("{full}."))
                    || (same_section && short)
            })
    }

    #[test]
    fn both_readmes_document_every_key_the_manifest_takes() {
        let (keys, mount_keys) = manifest_keys();
        for (readme, text) in [
            ("README.md", include_str!("../../README.md")),
            ("README.ru.md", include_str!("../../README.ru.md")),
        ] {
            for key in &keys {
                let (section, key) = key.split_once('.').unwrap();
                assert!(
                    documented(text, section, key),
                    "{readme} lacks `{section}.{key}`"
                );
            }
            // The Russian README translates the placeholder (as tests/it/readmes.rs knows).
            let text = &text.replace("ИМЯ", "NAME");
            let key = super::super::raw::RawKey {
                hash: String::new(),
                models: Some(Vec::new()),
                tags: Some(Vec::new()),
                expires: Some(String::new()),
                requests_per_minute: Some(1),
                tokens_per_minute: Some(1),
                max_tokens_per_day: Some(1),
                max_tokens_per_month: Some(1),
                max_usd_per_day: Some(1.0),
                max_usd_per_month: Some(1.0),
            };
            let key = serde_json::to_value(key).unwrap();
            for field in key.as_object().unwrap().keys() {
                assert!(
                    documented(text, "keys.NAME", field),
                    "{readme} lacks `keys.NAME.{field}`"
                );
            }
            // A mount takes `[upstream]`'s settings (the README says so), and its own are in
            // its example.
            for key in &mount_keys {
                let in_example = text
                    .lines()
                    .any(|line| line.starts_with(&format!("{key} = ")));
                assert!(
                    documented(text, "upstream", key) || in_example,
                    "{readme} lacks a mount's `{key}`"
                );
            }
        }
    }
}
