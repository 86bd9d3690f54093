//! Loading and validating the manifest (routes.toml) into typed settings and a route table.
//!
//! Sources, later wins: built-in defaults → the manifest (a file, or the copy compiled into the
//! binary) → `OA_BYPASS_<SECTION>__<KEY>` environment variables. Everything is checked once,
//! here, at start-up; a [`ConfigError`] names the key, the bad value and what is allowed, and
//! never echoes the whole file.

mod describe;
mod keys;
mod model_pattern;
mod mount;
mod prices;
mod raw;
mod route;
mod routing;
mod store;
pub mod units;
mod validate;
mod values;

use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use url::Url;

use crate::routes::RouteTable;
pub(crate) use keys::days_from_civil;
pub use keys::{new_key_block, Day, KeyLimit, KeyLimits, NamedKey, NamedKeys};
pub use model_pattern::ModelPattern;
pub use mount::{CredentialHeader, MountConfig, UpstreamKey, DEFAULT_MOUNT};
pub use prices::{Price, Prices, PICO_PER_USD, SHIPPED_PRICES};
use raw::RawConfig;
pub use routing::{ModelRoute, ModelRoutes, ModelTarget, RetryConfig};
pub use store::{StoreConfig, StoreFailure};
use validate::validate;
use values::describe_figment_error;

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
    /// Shared with the pipeline's mounts, which read it on every request.
    pub upstream: Arc<UpstreamConfig>,
    /// `[mounts.NAME]`, by name.
    pub mounts: Vec<MountConfig>,
    pub limits: LimitsConfig,
    pub cors: CorsConfig,
    pub openapi: OpenApiConfig,
    pub realtime: RealtimeConfig,
    pub streaming: StreamingConfig,
    pub tracing: TracingConfig,
    pub usage: UsageConfig,
    pub access: AccessConfig,
    /// What tokens cost, for dollar budgets.
    pub prices: Prices,
    /// `[models]`: the upstream a request goes to by its model.
    pub models: ModelRoutes,
    pub retry: RetryConfig,
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
    /// Bytes of log lines that may wait for the writer thread; more are dropped (and
    /// counted), so a slow log sink never holds a request up.
    pub buffer: u64,
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

#[derive(Debug, Clone, Default)]
pub struct StreamingConfig {
    /// After this long without a byte from the upstream, an event stream gets an SSE
    /// comment (`: keep-alive`) at its next event boundary; `None`: never (the default).
    pub keepalive: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
pub struct TracingConfig {
    /// A forwarded answer carries `Server-Timing: gateway;dur=…, upstream;dur=…`.
    pub server_timing: bool,
    /// The OTLP/HTTP collector's base URL (spans go to its `/v1/traces`).
    pub otlp_endpoint: Option<Url>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: traces
    /// are on, to where they say, when `otlp_endpoint` is not.
    pub otlp_from_environment: bool,
}

impl Config {
    /// What a sound manifest may still want to hear: logged at start-up and on reload, and
    /// shown by `--check`.
    pub fn warnings(&self) -> Vec<String> {
        routing::routing_warnings(&self.models, &self.mounts)
    }
}

impl TracingConfig {
    /// Spans are made and exported.
    pub fn traces_on(&self) -> bool {
        self.otlp_endpoint.is_some() || self.otlp_from_environment
    }
}

#[derive(Debug, Clone, Default)]
pub struct UsageConfig {
    /// A stream on a route with `stream_usage_option` whose request does not ask for usage
    /// is asked for it upstream, and the usage-only chunk is kept from the client.
    pub inject_stream_usage: bool,
}

#[derive(Debug, Clone)]
pub struct OpenApiConfig {
    /// Serve `/openapi.json` and `/docs`.
    pub enabled: bool,
    pub title: String,
    pub version: String,
    /// The sections (tags) that come first, in this order; the others follow
    /// alphabetically, then the mounts'.
    pub tag_order: Vec<String>,
    /// `openapi.schemas`: the official spec to take request and answer schemas from, read
    /// when the document is first built; relative paths are from the manifest's directory.
    pub schemas: Option<PathBuf>,
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
    /// Plain HTTP/1.1 requests to routes without parameters are served by the fast engine
    /// (`engine::fast`) instead of poem and hyper.
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

/// `[upstream]` or one mount's upstream.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The mount's name (`default` for `[upstream]`): a bounded label for logs and metrics.
    pub mount: Arc<str>,
    /// Where it is in the manifest (`upstream`, `mounts.groq`), for messages.
    pub key_path: Arc<str>,
    pub base_url: Url,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub proxy: Option<Url>,
    /// HTTP/2 by ALPN where an `https://` upstream offers it. False: HTTP/1.1 only, and a
    /// request whose body is whole goes on the raw transport, as to a plain upstream.
    pub http2: bool,
    /// Idle connections each worker keeps to this upstream (both transports' pools); idle
    /// ones close after 90 s.
    pub max_idle_connections: usize,
    /// Requests each HTTP/2 connection carries at once; more open another connection.
    pub http2_max_concurrent_streams: usize,
    /// `/ready` also checks that the upstream answers.
    pub ready_check: bool,
    pub credential_header: CredentialHeader,
    /// Keys the gateway sends in place of the client's, in turn; empty: the client's own
    /// key goes up unchanged.
    pub keys: Vec<UpstreamKey>,
    /// A failed request is tried again on this mount (`[retry]`).
    pub retry: bool,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    /// `limits.state_file`: where named keys' counters are kept without a store.
    pub state_file: Option<PathBuf>,
    pub max_json_body: u64,
    pub max_upload_body: u64,
    pub admission: AdmissionConfig,
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

/// The `[access]` settings, validated. All off by default, so the open passthrough works.
#[derive(Debug, Clone, Default)]
pub struct AccessConfig {
    /// SHA-256 digests of the keys that may be forwarded; empty (and no named keys): any key.
    pub allowed_key_hashes: Vec<[u8; 32]>,
    /// `[keys.NAME]`: allowed keys with a name and rules of their own.
    pub named_keys: NamedKeys,
    /// Client networks that may use the API; empty: any.
    pub allowed_ips: Vec<IpNet>,
    /// Peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// When set, the API lives under `/<secret>` only.
    pub path_secret: Option<String>,
}

/// The `[limits]` admission settings, validated (`None`: off).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdmissionConfig {
    pub requests_per_minute_per_key: Option<NonZeroU32>,
    pub requests_per_minute_per_ip: Option<NonZeroU32>,
    /// Requests allowed at once above the steady rate; defaults to the per-minute rate.
    pub burst: Option<NonZeroU32>,
    pub max_concurrent_requests: Option<NonZeroU32>,
    pub max_concurrent_per_key: Option<NonZeroU32>,
    /// `limits.store`: the rates and caps above, and held keys' cool-downs, are shared
    /// through it.
    pub store: Option<StoreConfig>,
}

/// `sha256:<hex>` of a key, as `oa-bypass hash-key` prints it and `access.allowed_key_hashes`
/// lists it: the manifest never holds a key.
pub fn hash_line(key: &str) -> String {
    format!("sha256:{}", hex(&Sha256::digest(key.as_bytes())))
}

/// A hash in lowercase hex, as `hash_line` and the limits store write it.
pub fn hex(hash: &[u8]) -> String {
    use std::fmt::Write as _;
    hash.iter()
        .fold(String::with_capacity(hash.len() * 2), |mut text, byte| {
            let _ = write!(text, "{byte:02x}");
            text
        })
}

/// Parses `sha256:<64 hex digits>`.
pub fn parse_hash_line(text: &str) -> Option<[u8; 32]> {
    let hex = text.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
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
        // Two variables under the prefix are not settings: the manifest's path, and a debug
        // build's log hold (observe::log::DEBUG_HOLD_ENV).
        let env = Env::prefixed(ENV_PREFIX).split("__").filter(|key| {
            !["config", "debug_log_hold_ms"]
                .iter()
                .any(|name| key.as_str().eq_ignore_ascii_case(name))
        });
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::BodyKind;

    fn error_of(text: &str) -> String {
        Config::from_manifest_str(text).unwrap_err().to_string()
    }

    const ONE_ROUTE: &str = "[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n";

    #[test]
    fn hash_lines_round_trip() {
        let line = hash_line("sk-test");
        assert!(line.starts_with("sha256:") && line.len() == 71, "{line}");
        assert!(parse_hash_line(&line).is_some());
        assert!(parse_hash_line("sha256:zz").is_none());
        assert!(parse_hash_line("md5:00").is_none());
    }

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
        let text = "[[routes]]\nmethod = \"POST\"\npath = \"/v1/x\"\nbody = \"json\"\n\
                    stream_usage_option = true\n";
        assert_eq!(
            error_of(text),
            "routes[0].stream_usage_option: needs usage = true and a json body"
        );
    }

    #[test]
    fn keepalives_must_fire_before_the_read_timeout() {
        let streaming = "[[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\n\
                         body = \"json\"\nstreaming = true\n";
        let with = |settings: &str, route: &str| format!("{settings}\n{streaming}{route}");
        assert_eq!(
            error_of(&with("[streaming]\nkeepalive = \"0s\"", "")),
            "streaming.keepalive: must be more than 0s (leave it out for none)"
        );
        assert_eq!(
            error_of(&with("[streaming]\nkeepalive = \"10m\"", "")),
            "streaming.keepalive: 10m is not below upstream.read_timeout (10m), which ends a \
             silent stream first"
        );
        assert_eq!(
            error_of(&with(
                "[streaming]\nkeepalive = \"15s\"",
                "read_timeout = \"10s\"\n"
            )),
            "streaming.keepalive: 15s is not below routes[0].read_timeout (10s), which ends a \
             silent stream first"
        );
        assert_eq!(
            error_of(&with("", "keepalive = \"11m\"\n")),
            "routes[0].keepalive: 11m is not below upstream.read_timeout (10m), which ends a \
             silent stream first"
        );
        let config = Config::from_manifest_str(&with(
            "[streaming]\nkeepalive = \"15s\"",
            "keepalive = \"5s\"\n",
        ))
        .unwrap();
        assert_eq!(config.streaming.keepalive, Some(Duration::from_secs(15)));
        let route = &config.routes.routes()[0];
        assert_eq!(route.keepalive, Some(Duration::from_secs(5)));
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
