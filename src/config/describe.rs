//! `--check`: the effective settings and the route table, as text, with secrets masked.

use std::num::NonZeroU32;

use super::units::{format_duration, format_size};
use super::values::mask_url;
use super::{Config, LogFormat, StoreConfig, UpstreamConfig};

impl Config {
    /// The effective settings and route table, with secrets masked, for `--check`.
    pub fn describe(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(out, "manifest: {}", self.source);
        let _ = writeln!(out, "\nsettings:");
        let settings = [
            ("server.host", self.server.host.to_string()),
            ("server.port", self.server.port.to_string()),
            (
                "server.shutdown_grace",
                format_duration(self.server.shutdown_grace),
            ),
            (
                "server.header_read_timeout",
                format_duration(self.server.header_read_timeout),
            ),
            (
                "server.body_read_timeout",
                format_duration(self.server.body_read_timeout),
            ),
            (
                "server.max_header_bytes",
                format_size(self.server.max_header_bytes),
            ),
            (
                "server.max_connections",
                show_limit(self.server.max_connections),
            ),
            (
                "server.workers",
                self.server.workers.map_or_else(
                    || format!("auto ({})", self.server.worker_count()),
                    |n| n.to_string(),
                ),
            ),
            ("server.fast_lane", self.server.fast_lane.to_string()),
            (
                "server.tls",
                self.server.tls.as_ref().map_or("(off)".to_owned(), |tls| {
                    format!("cert={} key={}", tls.cert.display(), tls.key.display())
                }),
            ),
            (
                "server.acme",
                self.server
                    .acme
                    .as_ref()
                    .map_or("(off)".to_owned(), |acme| {
                        format!(
                            "domains={:?} cache_dir={} directory={}",
                            acme.domains,
                            acme.cache_dir.display(),
                            acme.directory
                        )
                    }),
            ),
            ("upstream.base_url", mask_url(&self.upstream.base_url)),
            (
                "upstream.connect_timeout",
                format_duration(self.upstream.connect_timeout),
            ),
            (
                "upstream.read_timeout",
                format_duration(self.upstream.read_timeout),
            ),
            (
                "upstream.proxy",
                self.upstream.proxy.as_ref().map_or(
                    "(none: HTTPS_PROXY/ALL_PROXY/NO_PROXY apply)".into(),
                    mask_url,
                ),
            ),
            ("upstream.http2", self.upstream.http2.to_string()),
            (
                "upstream.max_idle_connections",
                self.upstream.max_idle_connections.to_string(),
            ),
            (
                "upstream.http2_max_concurrent_streams",
                self.upstream.http2_max_concurrent_streams.to_string(),
            ),
            (
                "upstream.ready_check",
                self.upstream.ready_check.to_string(),
            ),
            (
                "streaming.keepalive",
                self.streaming
                    .keepalive
                    .map_or("(off)".to_owned(), format_duration),
            ),
            (
                "tracing.server_timing",
                self.tracing.server_timing.to_string(),
            ),
            (
                "tracing.otlp_endpoint",
                match (
                    &self.tracing.otlp_endpoint,
                    self.tracing.otlp_from_environment,
                ) {
                    (Some(endpoint), _) => mask_url(endpoint),
                    (None, true) => "(from OTEL_EXPORTER_OTLP_*)".to_owned(),
                    (None, false) => "(off)".to_owned(),
                },
            ),
            (
                "usage.inject_stream_usage",
                self.usage.inject_stream_usage.to_string(),
            ),
            (
                "limits.max_json_body",
                format_size(self.limits.max_json_body),
            ),
            (
                "limits.max_upload_body",
                format_size(self.limits.max_upload_body),
            ),
            (
                "limits.requests_per_minute_per_key",
                show_limit(self.limits.admission.requests_per_minute_per_key),
            ),
            (
                "limits.requests_per_minute_per_ip",
                show_limit(self.limits.admission.requests_per_minute_per_ip),
            ),
            ("limits.burst", show_limit(self.limits.admission.burst)),
            (
                "limits.max_concurrent_requests",
                show_limit(self.limits.admission.max_concurrent_requests),
            ),
            (
                "limits.max_concurrent_per_key",
                show_limit(self.limits.admission.max_concurrent_per_key),
            ),
            (
                "limits.store",
                self.limits.admission.store.as_ref().map_or_else(
                    || "(off: limits are per process)".to_owned(),
                    StoreConfig::shown,
                ),
            ),
            (
                "limits.store_failure",
                (self.limits.admission.store.as_ref())
                    .map_or("(no store)", |store| store.failure.as_str())
                    .to_owned(),
            ),
            (
                "limits.store_timeout",
                (self.limits.admission.store.as_ref())
                    .map_or_else(|| "(no store)".to_owned(), |s| format_duration(s.timeout)),
            ),
            (
                "limits.store_lease",
                (self.limits.admission.store.as_ref())
                    .map_or_else(|| "(no store)".to_owned(), |s| format_duration(s.lease)),
            ),
            (
                "cors.allow_origins",
                format!("{:?}", self.cors.allow_origins),
            ),
            (
                "realtime.max_message",
                format_size(self.realtime.max_message),
            ),
            (
                "realtime.idle_timeout",
                format_duration(self.realtime.idle_timeout),
            ),
            (
                "access.allowed_key_hashes",
                format!("{} listed", self.access.allowed_key_hashes.len()),
            ),
            (
                "access.allowed_ips",
                format!("{:?}", self.access.allowed_ips),
            ),
            (
                "access.trusted_proxies",
                format!("{:?}", self.access.trusted_proxies),
            ),
            (
                "access.path_secret",
                if self.access.path_secret.is_some() {
                    "(set)"
                } else {
                    "(none)"
                }
                .to_owned(),
            ),
            ("openapi.enabled", self.openapi.enabled.to_string()),
            ("openapi.title", format!("{:?}", self.openapi.title)),
            ("openapi.version", format!("{:?}", self.openapi.version)),
            ("openapi.tag_order", format!("{:?}", self.openapi.tag_order)),
            (
                "openapi.schemas",
                (self.openapi.schemas.as_ref())
                    .map_or_else(|| "(none)".to_owned(), |path| path.display().to_string()),
            ),
            (
                "log.format",
                match self.log.format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
                .to_owned(),
            ),
            ("log.level", format!("{:?}", self.log.level)),
            ("log.buffer", format_size(self.log.buffer)),
            ("metrics.enabled", self.metrics.enabled.to_string()),
            (
                "metrics.tokens_by_key",
                self.metrics.tokens_by_key.to_string(),
            ),
            ("metrics.max_models", self.metrics.max_models.to_string()),
        ];
        for (key, value) in settings {
            let _ = writeln!(out, "  {key:<34} {value}");
        }
        for (key, value) in upstream_lines(&self.upstream) {
            let _ = writeln!(out, "  {key:<34} {value}");
        }
        for mount in &self.mounts {
            let key_path = &mount.upstream.key_path;
            let _ = writeln!(
                out,
                "\nmount {} under {}:",
                mount.upstream.mount, mount.prefix
            );
            for (key, value) in [
                ("base_url", mask_url(&mount.upstream.base_url)),
                (
                    "connect_timeout",
                    format_duration(mount.upstream.connect_timeout),
                ),
                ("read_timeout", format_duration(mount.upstream.read_timeout)),
                ("http2", mount.upstream.http2.to_string()),
                (
                    "max_idle_connections",
                    mount.upstream.max_idle_connections.to_string(),
                ),
                (
                    "http2_max_concurrent_streams",
                    mount.upstream.http2_max_concurrent_streams.to_string(),
                ),
                (
                    "proxy",
                    mount
                        .upstream
                        .proxy
                        .as_ref()
                        .map_or("(none)".into(), mask_url),
                ),
                (
                    "routes",
                    match &mount.routes {
                        Some(routes) => format!("{} of its own", routes.len()),
                        None => "the manifest's".to_owned(),
                    },
                ),
            ] {
                let key = format!("{key_path}.{key}");
                let _ = writeln!(out, "  {key:<34} {value}");
            }
            for (key, value) in upstream_lines(&mount.upstream) {
                let _ = writeln!(out, "  {key:<34} {value}");
            }
        }
        let _ = writeln!(out, "\nroutes ({}):", self.routes.len());
        for route in self.routes.routes() {
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
            let line = format!(
                "  {:<6} {:<80} {:<16} {}",
                route.method.as_str(),
                route.template.as_str(),
                kinds.join("|"),
                extras.join(" ")
            );
            let _ = writeln!(out, "{}", line.trim_end());
        }
        out
    }
}

/// The credential settings of `[upstream]` or a mount: the keys it holds by variable name,
/// never by value.
fn upstream_lines(upstream: &UpstreamConfig) -> [(String, String); 2] {
    let vars: Vec<&str> = upstream.keys.iter().map(|key| key.var.as_str()).collect();
    [
        (
            format!("{}.credential_header", upstream.key_path),
            upstream.credential_header.as_str().to_owned(),
        ),
        (
            format!("{}.keys_env", upstream.key_path),
            if vars.is_empty() {
                "(none: the client's key goes up)".to_owned()
            } else {
                format!("{} (held by the gateway, each set)", vars.join(", "))
            },
        ),
    ]
}

fn show_limit(limit: Option<NonZeroU32>) -> String {
    limit.map_or_else(|| "off".to_owned(), |n| n.to_string())
}
