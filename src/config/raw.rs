//! The manifest exactly as written: serde shapes of routes.toml with their defaults.
//!
//! Each key the manifest takes is declared here once: its name, its type, its default (the
//! `Default` impl beside it) and a doc line. `--check` shows every one, and both READMEs
//! document every one: tests in `config::describe` hold both against this list.
//!
//! Unknown keys are refused here (`deny_unknown_fields`), so a typo fails at start-up instead
//! of being silently ignored. Nothing in this module checks meaning; `config::validate` does.

use serde::Deserialize;

use super::units::{ByteSize, HumanDuration};

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    /// `[mounts.NAME]`: more upstreams, each behind its own path prefix.
    #[serde(default)]
    pub mounts: std::collections::BTreeMap<String, RawMount>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub cors: RawCors,
    #[serde(default)]
    pub openapi: RawOpenApi,
    #[serde(default)]
    pub realtime: RawRealtime,
    #[serde(default)]
    pub streaming: RawStreaming,
    #[serde(default)]
    pub tracing: RawTracing,
    #[serde(default)]
    pub usage: RawUsage,
    #[serde(default)]
    pub access: RawAccess,
    /// `[keys.NAME]`: allowed keys with a name, and what each may call.
    #[serde(default)]
    pub keys: std::collections::BTreeMap<String, RawKey>,
    /// `[prices."GLOB"]`: USD per million tokens, over the shipped `prices.toml`.
    #[serde(default)]
    pub prices: std::collections::BTreeMap<String, RawPrice>,
    /// `[models."PATTERN"]`: where requests naming a model go.
    #[serde(default)]
    pub models: std::collections::BTreeMap<String, RawModelRoute>,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub metrics: RawMetrics,
    /// Kept as loose values so each entry is deserialized on its own and an error can name
    /// its index (`routes[12].body`).
    #[serde(default)]
    pub routes: Vec<figment::value::Value>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    /// The address to listen on.
    pub host: String,
    /// The port to listen on; 0 picks one.
    pub port: u16,
    /// How long requests and streams may finish after SIGTERM.
    pub shutdown_grace: HumanDuration,
    /// The time a client has to send its request head.
    pub header_read_timeout: HumanDuration,
    /// The longest silence inside a request body.
    pub body_read_timeout: HumanDuration,
    /// The largest request head.
    pub max_header_bytes: ByteSize,
    /// Connections at once; 0: unlimited.
    pub max_connections: u32,
    /// Worker threads; 0: one per core.
    pub workers: u32,
    /// The fast HTTP/1 engine for plain requests to routes without path parameters.
    pub fast_lane: bool,
    /// HTTPS from PEM files.
    pub tls: Option<RawTls>,
    /// HTTPS with a certificate obtained and renewed over ACME.
    pub acme: Option<RawAcme>,
}

/// `[server.tls]`: serve HTTPS with these PEM files.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub cert: String,
    pub key: String,
}

/// `[server.acme]`: serve HTTPS with a certificate obtained and renewed over ACME.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    pub domains: Vec<String>,
    pub cache_dir: String,
    #[serde(default)]
    pub contacts: Vec<String>,
    #[serde(default = "default_acme_directory")]
    pub directory: String,
}

fn default_acme_directory() -> String {
    "letsencrypt".to_owned()
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    /// `text` or `json` lines.
    pub format: String,
    /// A level filter (`RUST_LOG` wins).
    pub level: String,
    /// Log lines that may wait for a slow stdout before further ones are dropped.
    pub buffer: ByteSize,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "text".to_owned(),
            level: "info".to_owned(),
            buffer: ByteSize(4 << 20),
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    /// Serve `/metrics`.
    pub enabled: bool,
    /// Count tokens per key hash prefix too.
    pub tokens_by_key: bool,
    /// Distinct model labels before the rest count as `other`.
    pub max_models: u32,
}

impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics {
            enabled: true,
            tokens_by_key: false,
            max_models: 200,
        }
    }
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            host: "0.0.0.0".to_owned(),
            port: 8080,
            shutdown_grace: HumanDuration(std::time::Duration::from_secs(30)),
            header_read_timeout: HumanDuration(std::time::Duration::from_secs(10)),
            body_read_timeout: HumanDuration(std::time::Duration::from_secs(60)),
            max_header_bytes: ByteSize(64 << 10),
            max_connections: 10_000,
            workers: 0,
            fast_lane: true,
            tls: None,
            acme: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    /// Where requests go; their path and query are appended unchanged.
    pub base_url: String,
    /// The longest wait for a connection.
    pub connect_timeout: HumanDuration,
    /// The longest silence before the answer's head or between two body chunks.
    pub read_timeout: HumanDuration,
    /// The outbound proxy (`http`, `https`, `socks5`, `socks5h`).
    pub proxy: Option<String>,
    /// HTTP/2 by ALPN where an `https://` upstream offers it; false: HTTP/1.1 only.
    pub http2: bool,
    /// Idle connections each worker keeps.
    pub max_idle_connections: u32,
    /// Requests on one HTTP/2 connection before another opens.
    pub http2_max_concurrent_streams: u32,
    /// `/ready` also checks that the upstream answers.
    pub ready_check: bool,
    /// Where the client's key is read, and a held key written.
    pub credential_header: String,
    /// Names of environment variables holding the keys the gateway sends in place of the
    /// client's; empty: the client's own key goes up.
    pub keys_env: Vec<String>,
    /// A failed request is tried again here (`[retry]`): its next held key, or a new
    /// connection.
    pub retry: bool,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            base_url: "https://api.openai.com".to_owned(),
            connect_timeout: HumanDuration(std::time::Duration::from_secs(10)),
            read_timeout: HumanDuration(std::time::Duration::from_secs(600)),
            proxy: None,
            http2: true,
            max_idle_connections: 256,
            http2_max_concurrent_streams: 100,
            ready_check: false,
            credential_header: super::CredentialHeader::Authorization.as_str().to_owned(),
            keys_env: Vec::new(),
            retry: false,
        }
    }
}

/// One `[mounts.NAME]` table: an upstream behind `prefix`. Unset settings take
/// `[upstream]`'s.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawMount {
    pub prefix: String,
    pub base_url: String,
    pub connect_timeout: Option<HumanDuration>,
    pub read_timeout: Option<HumanDuration>,
    pub proxy: Option<String>,
    pub http2: Option<bool>,
    pub max_idle_connections: Option<u32>,
    pub http2_max_concurrent_streams: Option<u32>,
    pub credential_header: Option<String>,
    #[serde(default)]
    pub keys_env: Vec<String>,
    #[serde(default)]
    pub retry: bool,
    /// Another routes file (its `[[routes]]` only); absent: the manifest's own routes.
    pub routes: Option<String>,
}

/// A mount's own routes file: nothing but `[[routes]]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoutesFile {
    #[serde(default)]
    pub routes: Vec<figment::value::Value>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    /// The largest JSON (and SDP) body.
    pub max_json_body: ByteSize,
    /// The largest multipart or binary body.
    pub max_upload_body: ByteSize,
    /// A token bucket per key (by its hash); 0: off.
    pub requests_per_minute_per_key: u32,
    /// A token bucket per client address; 0: off.
    pub requests_per_minute_per_ip: u32,
    /// Requests allowed at once above the steady rate; 0: the rate.
    pub burst: u32,
    /// Requests in flight in all; 0: off.
    pub max_concurrent_requests: u32,
    /// Requests in flight per key; 0: off.
    pub max_concurrent_per_key: u32,
    /// `redis://…` or `rediss://…`; empty: limits are per process.
    pub store: String,
    /// While the store is down: `open` serves unlimited, `closed` answers 503.
    pub store_failure: String,
    /// The longest wait for the store.
    pub store_timeout: HumanDuration,
    /// How long a dead replica's slots stay taken.
    pub store_lease: HumanDuration,
    /// Where keys' token and dollar counters are kept without a store; empty: nowhere.
    pub state_file: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_json_body: ByteSize(64 << 20),
            max_upload_body: ByteSize(1 << 30),
            requests_per_minute_per_key: 0,
            requests_per_minute_per_ip: 0,
            burst: 0,
            max_concurrent_requests: 0,
            max_concurrent_per_key: 0,
            store: String::new(),
            store_failure: "open".to_owned(),
            store_timeout: HumanDuration(std::time::Duration::from_millis(50)),
            store_lease: HumanDuration(std::time::Duration::from_secs(30)),
            state_file: String::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCors {
    /// Origins browsers may call from; empty: CORS off.
    pub allow_origins: Vec<String>,
}

impl Default for RawCors {
    fn default() -> Self {
        RawCors {
            allow_origins: vec!["*".to_owned()],
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawOpenApi {
    /// Serve `/openapi.json` and `/docs`.
    pub enabled: bool,
    /// The document's title.
    pub title: String,
    /// The document's version.
    pub version: String,
    /// The order of the document's sections; `None`: [`DEFAULT_TAG_ORDER`].
    pub tag_order: Option<Vec<String>>,
    /// The official OpenAPI spec whose schemas the document takes, by operationId.
    pub schemas: Option<String>,
}

/// Sections in the order people reach for them: the everyday APIs first, the
/// administrative ones after (those not listed follow in alphabetical order).
pub(super) const DEFAULT_TAG_ORDER: [&str; 23] = [
    "Responses",
    "Conversations",
    "Chat",
    "Completions",
    "Realtime",
    "Audio",
    "Images",
    "Embeddings",
    "Moderations",
    "Videos",
    "Files",
    "Uploads",
    "Vector stores",
    "Batch",
    "Assistants",
    "Fine-tuning",
    "Evals",
    "Models",
    "Containers",
    "Skills",
    "Hosted tools",
    "ChatKit",
    "Content provenance",
];

impl Default for RawOpenApi {
    fn default() -> Self {
        RawOpenApi {
            enabled: true,
            title: "oa-bypass: OpenAI API passthrough".to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            tag_order: None,
            schemas: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRealtime {
    /// The largest WebSocket message.
    pub max_message: ByteSize,
    /// A session silent this long closes with 1001.
    pub idle_timeout: HumanDuration,
}

impl Default for RawRealtime {
    fn default() -> Self {
        RawRealtime {
            max_message: ByteSize(16 << 20),
            idle_timeout: HumanDuration(std::time::Duration::from_secs(600)),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawStreaming {
    /// Write an SSE comment to the client after this long without upstream bytes.
    pub keepalive: Option<HumanDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawTracing {
    /// Answers carry a `Server-Timing` header: the gateway's time and the upstream's.
    pub server_timing: bool,
    /// An OTLP/HTTP collector: a span per request.
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUsage {
    /// Streams ask the upstream for their usage; the added chunk is not passed on.
    pub inject_stream_usage: bool,
}

#[derive(Debug, Default, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccess {
    /// Only these keys (`sha256:` hex) are forwarded; empty: any.
    pub allowed_key_hashes: Vec<String>,
    /// Only these networks may call; empty: any.
    pub allowed_ips: Vec<String>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<String>,
    /// The API (and docs) live only under `/<secret>/…`.
    pub path_secret: Option<String>,
}

/// One `[keys.NAME]`.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    /// The key's `sha256:` hex (`oa-bypass keys new NAME` prints it).
    pub hash: String,
    /// Globs the request's model must match; unset: any.
    pub models: Option<Vec<String>>,
    /// The route tags it may call; unset: any.
    pub tags: Option<Vec<String>>,
    /// The last day (UTC, `YYYY-MM-DD`) the key works.
    pub expires: Option<String>,
    /// Requests a minute (UTC calendar minute).
    pub requests_per_minute: Option<i64>,
    /// Tokens a minute, input and output, as the answers report them.
    pub tokens_per_minute: Option<i64>,
    /// Tokens a day (UTC).
    pub max_tokens_per_day: Option<i64>,
    /// Tokens a calendar month (UTC).
    pub max_tokens_per_month: Option<i64>,
    /// US dollars a day (UTC), priced by `prices.toml` and `[prices]`.
    pub max_usd_per_day: Option<f64>,
    /// US dollars a calendar month (UTC).
    pub max_usd_per_month: Option<f64>,
}

/// One `[prices."GLOB"]`, or an entry of the shipped `prices.toml`: USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawPrice {
    /// Input (prompt) tokens.
    pub input: f64,
    /// Cached input tokens; unset: the input price.
    pub cached_input: Option<f64>,
    /// Output tokens, reasoning included.
    pub output: f64,
}

/// One `[models."PATTERN"]`: the targets a model goes to, in order.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawModelRoute {
    /// `MOUNT/UPSTREAM_MODEL`, or `MOUNT` alone to keep the client's model name.
    pub targets: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRetry {
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// The largest body held for another attempt; larger ones go to the first target only.
    pub max_body: ByteSize,
    /// Retries may add this many per cent to the requests sent, over any 10 s.
    pub budget: f64,
    /// Consecutive failures that take a target out of turn.
    pub eject_after: u32,
    /// How long an ejected target stays out before one request tries it again.
    pub eject_for: HumanDuration,
}

impl Default for RawRetry {
    fn default() -> Self {
        RawRetry {
            max_attempts: 3,
            max_body: ByteSize(1 << 20),
            budget: 20.0,
            eject_after: 5,
            eject_for: HumanDuration(std::time::Duration::from_secs(30)),
        }
    }
}

/// One `[[routes]]` entry.
#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub method: String,
    pub path: String,
    /// One kind or a list; a route that leaves it out takes no body.
    pub body: Option<OneOrMany>,
    pub summary: Option<String>,
    pub tag: Option<String>,
    #[serde(default)]
    pub streaming: bool,
    pub read_timeout: Option<HumanDuration>,
    /// Overrides `streaming.keepalive` for this route.
    pub keepalive: Option<HumanDuration>,
    pub max_body: Option<ByteSize>,
    /// The OpenAPI operationId; derived from method and path when absent.
    pub operation_id: Option<String>,
    /// Response media types when they are not just JSON (files, audio, zip, SDP…).
    pub produces: Option<Vec<String>>,
    /// Count the token usage reported in this route's answers.
    #[serde(default)]
    pub usage: bool,
    /// This route's streams report usage only when the request asks with
    /// `stream_options.include_usage` (Chat Completions, Completions).
    #[serde(default)]
    pub stream_usage_option: bool,
    /// The mount whose upstream serves this route (without its prefix).
    pub upstream: Option<String>,
    /// On the unprefixed path, `[models]` picks the upstream by the request's model.
    #[serde(default)]
    pub route_by_model: bool,
    /// A small, valid JSON request, for the docs to prefill.
    pub example: Option<String>,
    /// The same request as a stream (a streaming route's second example).
    pub stream_example: Option<String>,
    /// Multipart form fields as curl's `-F` arguments: `purpose=batch`, `file=@data.jsonl`.
    pub form: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub(super) fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        }
    }
}
