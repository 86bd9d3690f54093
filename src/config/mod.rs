//! Loading and validating the manifest (routes.toml) into typed settings and a route table.
//!
//! Sources, later wins: built-in defaults → the manifest (a file, or the copy compiled into the
//! binary) → `OA_BYPASS_<SECTION>__<KEY>` environment variables. Everything is checked once,
//! here, at start-up; a [`ConfigError`] names the key, the bad value and what is allowed, and
//! never echoes the whole file.

mod raw;
pub mod units;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use http::Method;
use url::Url;

use crate::routes::{BodyKind, PathTemplate, RouteSpec, RouteTable};
use raw::{RawConfig, RawRoute};
use units::{format_duration, format_size};

/// The manifest shipped in the repository, compiled in so the binary runs from any folder.
pub const BUILT_IN_MANIFEST: &str = include_str!("../../routes.toml");

/// Environment variable naming the manifest file; not itself a setting.
pub const CONFIG_PATH_ENV: &str = "OA_BYPASS_CONFIG";
const ENV_PREFIX: &str = "OA_BYPASS_";
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// A configuration that cannot be served. Fatal at start-up.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read manifest {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// One or more problems, each already phrased as `key: problem`.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

impl ConfigError {
    fn one(message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid(vec![message.into()])
    }
}

/// Where the manifest came from, for logs and `--check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestSource {
    File(PathBuf),
    BuiltIn,
    /// Given as text by the embedding program (tests).
    Inline,
}

impl fmt::Display for ManifestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestSource::File(path) => write!(f, "{}", path.display()),
            ManifestSource::BuiltIn => f.write_str("built-in manifest"),
            ManifestSource::Inline => f.write_str("inline manifest"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub limits: LimitsConfig,
    pub cors: CorsConfig,
    pub openapi: OpenApiConfig,
    pub realtime: RealtimeConfig,
    pub access: crate::access::AccessConfig,
    pub log: LogConfig,
    pub metrics: MetricsConfig,
    pub routes: RouteTable,
    pub source: ManifestSource,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable `key=value` lines.
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter like `info` or `info,oa_bypass=debug`; `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Serve `GET /metrics`.
    pub enabled: bool,
    /// Also count tokens per key (the first 8 hex digits of the key's SHA-256).
    pub tokens_by_key: bool,
    /// Distinct model names kept as label values; later ones are counted as `other`.
    pub max_models: usize,
}

/// `[server.tls]`: certificate chain and private key, PEM files re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `[server.acme]`: a certificate obtained over ACME (TLS-ALPN-01 on this port).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    pub domains: Vec<String>,
    pub cache_dir: PathBuf,
    pub contacts: Vec<String>,
    pub directory: Url,
}

#[derive(Debug, Clone)]
pub struct RealtimeConfig {
    /// Largest WebSocket message (and frame) relayed either way.
    pub max_message: u64,
    /// A session with no frame either way for this long is closed with 1001.
    pub idle_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct OpenApiConfig {
    /// Serve `/openapi.json` and `/docs`.
    pub enabled: bool,
    pub title: String,
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub host: IpAddr,
    pub port: u16,
    pub shutdown_grace: Duration,
    /// Longest a client may take to send its request head.
    pub header_read_timeout: Duration,
    /// Longest silence allowed between two chunks of a request body.
    pub body_read_timeout: Duration,
    /// Largest request head (HTTP/1 buffer, HTTP/2 header list).
    pub max_header_bytes: u64,
    /// Connections served at once; `None` is unlimited.
    pub max_connections: Option<NonZeroU32>,
    /// Worker threads, each with its own event loop, listener and upstream pool; `None`:
    /// one per CPU core.
    pub workers: Option<NonZeroU32>,
    /// Plain HTTP/1.1 requests to routes without parameters skip poem and hyper when the
    /// upstream is `http://` and reached directly (`proxy::lane`).
    pub fast_lane: bool,
    pub tls: Option<TlsConfig>,
    pub acme: Option<AcmeConfig>,
}

impl ServerConfig {
    /// How many workers to run: `workers`, else one per CPU core this process may use.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            Some(n) => n.get() as usize,
            None => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub base_url: Url,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub proxy: Option<Url>,
    /// `/ready` also checks that the upstream answers.
    pub ready_check: bool,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub max_json_body: u64,
    pub max_upload_body: u64,
    pub admission: crate::limits::AdmissionConfig,
}

#[derive(Debug, Clone)]
pub struct CorsConfig {
    /// Empty means CORS is off: no CORS headers are added.
    pub allow_origins: Vec<String>,
}

impl CorsConfig {
    pub fn allows_any(&self) -> bool {
        self.allow_origins.iter().any(|origin| origin == "*")
    }
}

impl Config {
    /// Loads the manifest the way the binary does: `explicit` (from `--config`), else
    /// `$OA_BYPASS_CONFIG`, else `./routes.toml` if present, else the built-in copy; then the
    /// `OA_BYPASS_*` environment overrides.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from);
        let local = Path::new("routes.toml");
        let source = match (explicit, from_env) {
            (Some(path), _) => ManifestSource::File(path.to_owned()),
            (None, Some(path)) => ManifestSource::File(path),
            (None, None) if local.is_file() => ManifestSource::File(local.to_owned()),
            (None, None) => ManifestSource::BuiltIn,
        };
        let text = match &source {
            ManifestSource::File(path) => {
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?
            }
            ManifestSource::BuiltIn | ManifestSource::Inline => BUILT_IN_MANIFEST.to_owned(),
        };
        let env = Env::prefixed(ENV_PREFIX)
            .split("__")
            .filter(|key| !key.as_str().eq_ignore_ascii_case("config"));
        let figment = Figment::new().merge(Toml::string(&text)).merge(env);
        Config::from_figment(figment, source)
    }

    /// Builds a config from manifest text alone, with no file and no environment.
    pub fn from_manifest_str(text: &str) -> Result<Config, ConfigError> {
        let figment = Figment::new().merge(Toml::string(text));
        Config::from_figment(figment, ManifestSource::Inline)
    }

    fn from_figment(figment: Figment, source: ManifestSource) -> Result<Config, ConfigError> {
        let raw: RawConfig = figment
            .extract()
            .map_err(|err| ConfigError::Invalid(describe_figment_error(err, None, &source)))?;
        validate(raw, source)
    }

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
            (
                "upstream.ready_check",
                self.upstream.ready_check.to_string(),
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
            (
                "log.format",
                match self.log.format {
                    LogFormat::Text => "text",
                    LogFormat::Json => "json",
                }
                .to_owned(),
            ),
            ("log.level", format!("{:?}", self.log.level)),
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
            if let Some(max) = route.max_body {
                extras.push(format!("max_body={}", format_size(max)));
            }
            if route.usage {
                extras.push("usage".to_owned());
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

fn show_limit(limit: Option<NonZeroU32>) -> String {
    limit.map_or_else(|| "off".to_owned(), |n| n.to_string())
}

/// A URL with any password replaced, so `--check` output can be pasted into an issue.
fn mask_url(url: &Url) -> String {
    let mut masked = url.clone();
    if masked.password().is_some() {
        let _ = masked.set_password(Some("****"));
    }
    masked.to_string()
}

/// Turns figment's errors into `key: problem (source)` lines.
fn describe_figment_error(
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

fn validate(raw: RawConfig, source: ManifestSource) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();

    let host = raw.server.host.parse::<IpAddr>().map_err(|_| {
        format!(
            "server.host: {:?} is not an IP address (use 0.0.0.0 for every IPv4 interface, \
             :: for every IPv6 one, 127.0.0.1 for this machine only)",
            raw.server.host
        )
    });
    let base_url = parse_base_url(&raw.upstream.base_url);
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
            admission: crate::limits::AdmissionConfig {
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

fn validate_access(raw: raw::RawAccess, problems: &mut Vec<String>) -> crate::access::AccessConfig {
    let mut access = crate::access::AccessConfig::default();
    for (i, line) in raw.allowed_key_hashes.iter().enumerate() {
        match crate::access::parse_hash_line(line.trim()) {
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

fn parse_base_url(text: &str) -> Result<Url, String> {
    let bad = |why: &str| format!("upstream.base_url: {text:?} {why}");
    let url = Url::parse(text).map_err(|err| bad(&format!("is not a URL ({err})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("must start with http:// or https://"));
    }
    if url.host().is_none() {
        return Err(bad("has no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad(
            "must not have a query or fragment (the request's own path and query are appended)",
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
            max_body: raw.max_body.map(|s| s.0),
            operation_id: raw.operation_id,
            produces: raw.produces,
            usage: raw.usage,
        }),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::from_manifest_str(text).unwrap_err().to_string()
    }

    const ONE_ROUTE: &str = "[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";

    #[test]
    fn built_in_manifest_is_valid() {
        let config = Config::from_manifest_str(BUILT_IN_MANIFEST).unwrap();
        assert!(config.routes.len() >= 281);
        assert_eq!(config.server.port, 8080);
        assert_eq!(config.upstream.base_url.as_str(), "https://api.openai.com/");
    }

    #[test]
    fn defaults_apply_when_sections_are_missing() {
        let config = Config::from_manifest_str(ONE_ROUTE).unwrap();
        assert_eq!(config.server.host.to_string(), "0.0.0.0");
        assert_eq!(config.upstream.read_timeout, Duration::from_secs(600));
        assert_eq!(config.limits.max_upload_body, 1 << 30);
        assert_eq!(config.cors.allow_origins, ["*"]);
        assert_eq!(config.routes.routes()[0].body, [BodyKind::None]);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_path() {
        let err = error_of(&format!("[server]\nprot = 80\n{ONE_ROUTE}"));
        assert_eq!(
            err,
            "server.prot: unknown key; allowed here: host, port, shutdown_grace, header_read_timeout, body_read_timeout, max_header_bytes, max_connections, workers, fast_lane, tls, acme (in inline manifest)"
        );
        let err =
            error_of("[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\nbodee = \"json\"\n");
        assert!(
            err.starts_with("routes[0].bodee: unknown key; allowed here: method, path, body"),
            "{err}"
        );
    }

    #[test]
    fn route_errors_name_index_value_and_allowed_values() {
        let text =
            format!("{ONE_ROUTE}[[routes]]\nmethod = \"POST\"\npath = \"/v1/x\"\nbody = \"xml\"\n");
        assert_eq!(
            error_of(&text),
            "routes[1].body: \"xml\" is not one of none, json, multipart, binary, sdp, websocket"
        );
        let text = "[[routes]]\nmethod = \"FETCH\"\npath = \"/v1/{unclosed\"\n";
        assert_eq!(
            error_of(text),
            "routes[0].method: \"FETCH\" is not one of GET, POST, PUT, PATCH, DELETE\n\
             routes[0].path: \"/v1/{unclosed\" has an unclosed '{' in segment \"{unclosed\""
        );
        let err = error_of("[[routes]]\nmethod = \"GET\"\n");
        assert!(err.contains("routes[0]: missing field `path`"), "{err}");
    }

    #[test]
    fn bad_base_url_and_sizes_are_explained() {
        let err = error_of(&format!("[upstream]\nbase_url = \"ftp://x\"\n{ONE_ROUTE}"));
        assert_eq!(
            err,
            "upstream.base_url: \"ftp://x\" must start with http:// or https://"
        );
        let err = error_of(&format!("[limits]\nmax_json_body = \"lots\"\n{ONE_ROUTE}"));
        assert!(
            err.contains("limits.max_json_body: \"lots\" is not a size like \"64MiB\""),
            "{err}"
        );
    }

    #[test]
    fn proxy_credentials_never_reach_messages_or_check_output() {
        let err = error_of(&format!(
            "[upstream]\nproxy = \"gopher://user:hunter2@proxy\"\n{ONE_ROUTE}"
        ));
        assert!(!err.contains("hunter2"), "{err}");
        let config = Config::from_manifest_str(&format!(
            "[upstream]\nproxy = \"socks5h://user:hunter2@127.0.0.1:1080\"\n{ONE_ROUTE}"
        ))
        .unwrap();
        let described = config.describe();
        assert!(!described.contains("hunter2"), "{described}");
        assert!(described.contains("socks5h://user:****@127.0.0.1:1080"));
    }
}
