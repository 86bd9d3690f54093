//! Upstreams: `[upstream]` (the default, unprefixed) and each `[mounts.NAME]` behind its own
//! prefix, validated; and the keys the gateway holds for them (`keys_env`), read from the
//! environment. A key's value is never put in a message: only its variable's name.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::providers::{Format, Toml};
use figment::Figment;

use super::raw::{RawMount, RawRoutesFile, RawUpstream};
use super::route::validate_route;
use super::values::{describe_figment_error, parse_http_url, parse_proxy_url};
use super::{ManifestSource, UpstreamConfig};
use crate::headers;
use crate::routes::{RouteSpec, RouteTable, GATEWAY_PATHS};

/// The name `[upstream]` goes by in logs and metrics.
pub const DEFAULT_MOUNT: &str = "default";

/// `credential_header`: where the client's credential is read from, and where a key the
/// gateway holds is written. In the order of [`headers::CREDENTIALS`], whose names they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialHeader {
    /// `Authorization: Bearer …` (OpenAI and most compatible APIs).
    Authorization,
    /// Azure OpenAI's.
    ApiKey,
    /// Anthropic's.
    XApiKey,
    /// Google's.
    XGoogApiKey,
}

impl CredentialHeader {
    pub const ALL: [CredentialHeader; headers::KEY_HEADER_COUNT] = [
        CredentialHeader::Authorization,
        CredentialHeader::ApiKey,
        CredentialHeader::XApiKey,
        CredentialHeader::XGoogApiKey,
    ];

    /// The header's name, lowercase.
    pub fn as_str(self) -> &'static str {
        headers::CREDENTIALS[self as usize]
    }

    /// The header's name.
    pub(crate) fn name(self) -> &'static http::HeaderName {
        &headers::KEY_HEADERS[self as usize]
    }

    fn parse(text: &str) -> Option<CredentialHeader> {
        CredentialHeader::ALL
            .into_iter()
            .find(|header| header.as_str().eq_ignore_ascii_case(text))
    }
}

/// A key the gateway holds: the variable it came from, and its value, which `Debug` hides.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    /// The environment variable's name: what logs and metrics say.
    pub var: String,
    pub value: String,
}

impl fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpstreamKey({}=****)", self.var)
    }
}

/// One `[mounts.NAME]`: its upstream, reached under `prefix`.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// `/groq`: no trailing slash.
    pub prefix: String,
    pub upstream: Arc<UpstreamConfig>,
    /// The mount's own routes file, read; `None`: the manifest's own `[[routes]]`.
    pub routes: Option<RouteTable>,
}

impl MountConfig {
    /// The routes served under the prefix.
    pub fn routes<'a>(&'a self, manifest: &'a RouteTable) -> &'a RouteTable {
        self.routes.as_ref().unwrap_or(manifest)
    }
}

/// `[upstream]`, or a mount's upstream settings, checked; `key_path` is where they are in the manifest.
pub(super) fn validate_upstream(
    key_path: &str,
    name: &str,
    raw: &RawUpstream,
    allowed_keys: bool,
    problems: &mut Vec<String>,
) -> Option<UpstreamConfig> {
    let before = problems.len();
    let base_url = parse_http_url(&format!("{key_path}.base_url"), &raw.base_url)
        .map_err(|err| problems.push(err))
        .ok();
    let proxy = raw
        .proxy
        .as_deref()
        .map(|text| parse_proxy_url(&format!("{key_path}.proxy"), text))
        .transpose()
        .map_err(|err| problems.push(err))
        .ok()
        .flatten();
    for (key, value) in [
        ("connect_timeout", raw.connect_timeout.0),
        ("read_timeout", raw.read_timeout.0),
    ] {
        if value.is_zero() {
            problems.push(format!("{key_path}.{key}: must be more than 0s"));
        }
    }
    if raw.http2_max_concurrent_streams == 0 {
        problems.push(format!(
            "{key_path}.http2_max_concurrent_streams: must be at least 1"
        ));
    }
    let credential_header = CredentialHeader::parse(&raw.credential_header).unwrap_or_else(|| {
        problems.push(format!(
            "{key_path}.credential_header: {:?} is not one of {}",
            raw.credential_header,
            CredentialHeader::ALL
                .map(CredentialHeader::as_str)
                .join(", ")
        ));
        CredentialHeader::Authorization
    });
    if !raw.keys_env.is_empty() && !allowed_keys {
        problems.push(format!(
            "{key_path}.keys_env: the gateway would lend its keys to anyone; list the clients' keys \
             in [keys] or access.allowed_key_hashes first"
        ));
    }
    let keys = read_keys(key_path, &raw.keys_env, problems);
    let base_url = base_url.filter(|_| problems.len() == before)?;
    Some(UpstreamConfig {
        mount: Arc::from(name),
        key_path: Arc::from(key_path),
        base_url,
        connect_timeout: raw.connect_timeout.0,
        read_timeout: raw.read_timeout.0,
        proxy,
        http2: raw.http2,
        max_idle_connections: raw.max_idle_connections as usize,
        http2_max_concurrent_streams: raw.http2_max_concurrent_streams as usize,
        ready_check: raw.ready_check,
        credential_header,
        keys,
        retry: raw.retry,
    })
}

/// The keys named by `keys_env`, from the environment: re-read at every load, so a reload
/// picks up new values.
fn read_keys(key_path: &str, vars: &[String], problems: &mut Vec<String>) -> Vec<UpstreamKey> {
    let mut keys = Vec::with_capacity(vars.len());
    for (i, var) in vars.iter().enumerate() {
        if vars[..i].contains(var) {
            problems.push(format!("{key_path}.keys_env[{i}]: {var} is listed twice"));
            continue;
        }
        match std::env::var(var) {
            Ok(value) if !value.trim().is_empty() => {
                let value = value.trim().to_owned();
                // Checked as it will be sent; the value itself is never shown.
                if http::HeaderValue::from_str(&format!("Bearer {value}")).is_err() {
                    problems.push(format!(
                        "{key_path}.keys_env[{i}]: the value of {var} cannot go in a header \
                         (control characters or non-ASCII)"
                    ));
                } else {
                    keys.push(UpstreamKey {
                        var: var.clone(),
                        value,
                    });
                }
            }
            Ok(_) | Err(std::env::VarError::NotPresent) => problems.push(format!(
                "{key_path}.keys_env[{i}]: environment variable {var} is not set or empty"
            )),
            Err(std::env::VarError::NotUnicode(_)) => problems.push(format!(
                "{key_path}.keys_env[{i}]: environment variable {var} is not UTF-8"
            )),
        }
    }
    keys
}

/// Every `[mounts.NAME]`, checked against each other, the manifest's routes and the
/// gateway's own paths.
pub(super) fn validate_mounts(
    raw: BTreeMap<String, RawMount>,
    defaults: &RawUpstream,
    manifest_routes: &[RouteSpec],
    allowed_keys: bool,
    source: &ManifestSource,
    problems: &mut Vec<String>,
) -> Vec<MountConfig> {
    let mut mounts: Vec<MountConfig> = Vec::with_capacity(raw.len());
    let top_segments: Vec<&str> = manifest_routes
        .iter()
        .map(|route| first_segment(route.template.as_str()))
        .chain(GATEWAY_PATHS.iter().map(|path| first_segment(path)))
        .filter(|segment| !segment.is_empty())
        .collect();
    for (name, mount) in raw {
        let key_path = format!("mounts.{name}");
        let valid_name = !name.is_empty()
            && name != DEFAULT_MOUNT
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            problems.push(format!(
                "{key_path}: a mount's name is lowercase letters, digits and '_' (so \
                 OA_BYPASS_MOUNTS__<NAME>__* can set it), and not \"{DEFAULT_MOUNT}\""
            ));
            continue;
        }
        let before = problems.len();
        check_prefix(&key_path, &mount.prefix, &top_segments, &mounts, problems);
        let routes = mount
            .routes
            .as_deref()
            .and_then(|file| read_routes_file(&key_path, file, source, problems));
        let upstream = RawUpstream {
            base_url: mount.base_url,
            connect_timeout: mount.connect_timeout.unwrap_or(defaults.connect_timeout),
            read_timeout: mount.read_timeout.unwrap_or(defaults.read_timeout),
            proxy: mount.proxy.or_else(|| defaults.proxy.clone()),
            http2: mount.http2.unwrap_or(defaults.http2),
            max_idle_connections: mount
                .max_idle_connections
                .unwrap_or(defaults.max_idle_connections),
            http2_max_concurrent_streams: mount
                .http2_max_concurrent_streams
                .unwrap_or(defaults.http2_max_concurrent_streams),
            ready_check: false,
            credential_header: mount
                .credential_header
                .unwrap_or_else(|| CredentialHeader::Authorization.as_str().to_owned()),
            keys_env: mount.keys_env,
            retry: mount.retry,
        };
        let upstream = validate_upstream(&key_path, &name, &upstream, allowed_keys, problems);
        if let (Some(upstream), true) = (upstream, problems.len() == before) {
            mounts.push(MountConfig {
                prefix: mount.prefix,
                upstream: Arc::new(upstream),
                routes,
            });
        }
    }
    mounts
}

fn first_segment(path: &str) -> &str {
    path.trim_start_matches('/').split('/').next().unwrap_or("")
}

/// A prefix is one or more plain segments, apart from every other prefix (neither equal nor
/// one inside another) and from the first segment of the manifest's routes and the gateway's
/// own paths, so no path could belong to two places.
fn check_prefix(
    key_path: &str,
    prefix: &str,
    top_segments: &[&str],
    earlier: &[MountConfig],
    problems: &mut Vec<String>,
) {
    let segments: Vec<&str> = prefix.strip_prefix('/').unwrap_or("").split('/').collect();
    let plain = prefix.starts_with('/')
        && segments.iter().all(|segment| {
            !segment.is_empty()
                && *segment != "."
                && *segment != ".."
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '~'))
        });
    if !plain {
        problems.push(format!(
            "{key_path}.prefix: {prefix:?} is not a path like \"/groq\" (segments of letters, \
             digits, '-', '_', '.', '~'; no trailing '/')"
        ));
        return;
    }
    if let Some(taken) = top_segments.iter().find(|top| **top == segments[0]) {
        problems.push(format!(
            "{key_path}.prefix: {prefix:?} would shadow /{taken}, which the manifest's routes or \
             the gateway itself already serve"
        ));
    }
    let inside = |outer: &str, inner: &str| {
        inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with('/'))
    };
    for other in earlier {
        if inside(&other.prefix, prefix) || inside(prefix, &other.prefix) {
            problems.push(format!(
                "{key_path}.prefix: {prefix:?} overlaps {}.prefix {:?}; prefixes must be apart",
                other.upstream.key_path, other.prefix
            ));
        }
    }
}

/// Where a relative routes file is looked for: beside the manifest, or in the current
/// folder when the manifest is not a file.
fn resolve(file: &str, source: &ManifestSource) -> PathBuf {
    let path = Path::new(file);
    match source {
        ManifestSource::File(manifest) if path.is_relative() => manifest
            .parent()
            .map_or_else(|| path.to_owned(), |dir| dir.join(path)),
        ManifestSource::File(_) | ManifestSource::BuiltIn | ManifestSource::Inline => {
            path.to_owned()
        }
    }
}

fn read_routes_file(
    key_path: &str,
    file: &str,
    source: &ManifestSource,
    problems: &mut Vec<String>,
) -> Option<RouteTable> {
    let path = resolve(file, source);
    if !path.is_file() {
        problems.push(format!(
            "{key_path}.routes: {} is not a file (a relative path is read beside the manifest)",
            path.display()
        ));
        return None;
    }
    let file_source = ManifestSource::File(path.clone());
    let raw: RawRoutesFile = match Figment::new().merge(Toml::file(&path)).extract() {
        Ok(raw) => raw,
        Err(err) => {
            problems.extend(describe_figment_error(err, Some(key_path), &file_source));
            return None;
        }
    };
    let before = problems.len();
    let mut specs = Vec::with_capacity(raw.routes.len());
    for (index, value) in raw.routes.into_iter().enumerate() {
        match validate_route(index, value, &file_source) {
            Ok(spec) if spec.upstream.is_some() => problems.push(format!(
                "{key_path}.routes ({}): routes[{index}].upstream: a mount's routes all go to that \
                 mount; `upstream` is for the manifest's own routes",
                path.display()
            )),
            Ok(spec) => specs.push(spec),
            Err(route_problems) => problems.extend(
                route_problems
                    .into_iter()
                    .map(|problem| format!("{key_path}.routes ({}): {problem}", path.display())),
            ),
        }
    }
    if specs.is_empty() && problems.len() == before {
        problems.push(format!(
            "{key_path}.routes: {} declares no [[routes]]",
            path.display()
        ));
    }
    if problems.len() > before {
        return None;
    }
    RouteTable::new(specs)
        .map_err(|err| problems.push(format!("{key_path}.routes ({}): {err}", path.display())))
        .ok()
}

/// Each route's `upstream` names a mount.
pub(super) fn check_route_upstreams(
    routes: &[RouteSpec],
    mounts: &[MountConfig],
    problems: &mut Vec<String>,
) {
    for route in routes {
        let Some(name) = &route.upstream else {
            continue;
        };
        if !mounts.iter().any(|mount| *mount.upstream.mount == **name) {
            let declared: Vec<&str> = mounts.iter().map(|mount| &*mount.upstream.mount).collect();
            problems.push(format!(
                "routes[{}].upstream: {name:?} is not a mount (declared: {})",
                route.index,
                if declared.is_empty() {
                    "none".to_owned()
                } else {
                    declared.join(", ")
                }
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{hash_line, Config, CredentialHeader};

    const ROUTES: &str = "[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n\n\
                          [[routes]]\nmethod = \"POST\"\npath = \"/v1/files\"\nbody = \"multipart\"\n";

    fn load(settings: &str) -> Result<Config, String> {
        Config::from_manifest_str(&format!("{settings}\n{ROUTES}")).map_err(|err| err.to_string())
    }

    fn allowed() -> String {
        format!(
            "[access]\nallowed_key_hashes = [\"{}\"]\n",
            hash_line("sk-client")
        )
    }

    #[test]
    fn a_mount_takes_upstreams_settings_it_does_not_set() {
        let config = load(
            "[upstream]\nread_timeout = \"42s\"\nproxy = \"socks5h://127.0.0.1:1080\"\n\
             [mounts.groq]\nprefix = \"/groq\"\nbase_url = \"https://api.groq.com/openai\"\n\
             [mounts.anthropic]\nprefix = \"/anthropic\"\nbase_url = \"https://api.anthropic.com\"\n\
             credential_header = \"x-api-key\"\nconnect_timeout = \"3s\"\n",
        )
        .unwrap();
        let names: Vec<&str> = config.mounts.iter().map(|m| &*m.upstream.mount).collect();
        assert_eq!(names, ["anthropic", "groq"]);
        let groq = &config.mounts[1];
        assert_eq!(groq.prefix, "/groq");
        assert_eq!(&*groq.upstream.key_path, "mounts.groq");
        assert_eq!(groq.upstream.read_timeout.as_secs(), 42);
        assert_eq!(groq.upstream.proxy.as_ref().unwrap().scheme(), "socks5h");
        assert_eq!(
            groq.upstream.credential_header,
            CredentialHeader::Authorization
        );
        assert_eq!(groq.routes(&config.routes).len(), 2);
        let anthropic = &config.mounts[0];
        assert_eq!(
            anthropic.upstream.credential_header,
            CredentialHeader::XApiKey
        );
        assert_eq!(anthropic.upstream.connect_timeout.as_secs(), 3);
        assert_eq!(&*config.upstream.mount, "default");
    }

    #[test]
    fn mount_mistakes_are_named_by_their_key() {
        let mount = |name: &str, prefix: &str| {
            format!("[mounts.{name}]\nprefix = \"{prefix}\"\nbase_url = \"http://127.0.0.1:9\"\n")
        };
        let err = load(&format!("{}{}", mount("a", "/x"), mount("b", "/x"))).unwrap_err();
        assert_eq!(
            err,
            "mounts.b.prefix: \"/x\" overlaps mounts.a.prefix \"/x\"; prefixes must be apart"
        );
        let err = load(&format!("{}{}", mount("a", "/x"), mount("b", "/x/y"))).unwrap_err();
        assert!(
            err.contains("mounts.b.prefix: \"/x/y\" overlaps mounts.a.prefix"),
            "{err}"
        );
        let err = load(&mount("a", "/v1")).unwrap_err();
        assert_eq!(
            err,
            "mounts.a.prefix: \"/v1\" would shadow /v1, which the manifest's routes or the \
             gateway itself already serve"
        );
        assert!(load(&mount("a", "/docs"))
            .unwrap_err()
            .contains("would shadow /docs"));
        assert!(load(&mount("a", "/x/"))
            .unwrap_err()
            .contains("is not a path like"));
        assert!(load(&mount("Groq", "/x"))
            .unwrap_err()
            .starts_with("mounts.Groq: a mount's name"));
        let err = load("[mounts.a]\nprefix = \"/a\"\nbase_url = \"ftp://host\"\n").unwrap_err();
        assert_eq!(
            err,
            "mounts.a.base_url: \"ftp://host\" must start with http:// or https://"
        );
        let err = load(&format!(
            "{}credential_header = \"cookie\"\n",
            mount("a", "/a")
        ))
        .unwrap_err();
        assert!(
            err.starts_with(
                "mounts.a.credential_header: \"cookie\" is not one of authorization, api-key"
            ),
            "{err}"
        );
        let err = load(&format!("{}routes = \"nowhere.toml\"\n", mount("a", "/a"))).unwrap_err();
        assert!(
            err.starts_with("mounts.a.routes: nowhere.toml is not a file"),
            "{err}"
        );
    }

    #[test]
    fn a_route_may_only_name_a_declared_mount() {
        let text = "[mounts.files]\nprefix = \"/files-host\"\nbase_url = \"http://127.0.0.1:9\"\n\
                    [[routes]]\nmethod = \"GET\"\npath = \"/v1/files\"\nupstream = \"files\"\n\
                    [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\nupstream = \"filez\"\n";
        let err = Config::from_manifest_str(text).unwrap_err().to_string();
        assert_eq!(
            err,
            "routes[1].upstream: \"filez\" is not a mount (declared: files)"
        );
    }

    #[test]
    fn held_keys_need_an_allow_list_and_every_variable_set() {
        let err = load("[upstream]\nkeys_env = [\"OA_BYPASS_TEST_HELD_A\"]\n").unwrap_err();
        assert!(
            err.starts_with("upstream.keys_env: the gateway would lend its keys to anyone"),
            "{err}"
        );
        let err = load(&format!(
            "{}[mounts.g]\nprefix = \"/g\"\nbase_url = \"http://127.0.0.1:9\"\n\
             keys_env = [\"OA_BYPASS_TEST_SURELY_UNSET\"]\n",
            allowed()
        ))
        .unwrap_err();
        assert_eq!(
            err,
            "mounts.g.keys_env[0]: environment variable OA_BYPASS_TEST_SURELY_UNSET is not set or empty"
        );
        std::env::set_var("OA_BYPASS_TEST_HELD_ONE", "sk-held-VALUE-one");
        std::env::set_var("OA_BYPASS_TEST_HELD_BAD", "sk-held-VALUE\u{1}");
        let err = load(&format!(
            "{}[upstream]\nkeys_env = [\"OA_BYPASS_TEST_HELD_ONE\", \"OA_BYPASS_TEST_HELD_BAD\"]\n",
            allowed()
        ))
        .unwrap_err();
        assert_eq!(
            err,
            "upstream.keys_env[1]: the value of OA_BYPASS_TEST_HELD_BAD cannot go in a header \
             (control characters or non-ASCII)"
        );
        let config = load(&format!(
            "{}[upstream]\nkeys_env = [\"OA_BYPASS_TEST_HELD_ONE\"]\n",
            allowed()
        ))
        .unwrap();
        assert_eq!(config.upstream.keys.len(), 1);
        let described = config.describe();
        assert!(described.contains("OA_BYPASS_TEST_HELD_ONE"), "{described}");
        assert!(!described.contains("VALUE"), "{described}");
        assert!(!format!("{config:?}").contains("VALUE"));
    }
}
