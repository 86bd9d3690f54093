//! `[models]` and `[retry]`: which upstream a request goes to by the model it names, and how
//! a failed attempt is tried again elsewhere before the client has seen a byte.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::model_pattern::ModelPattern;
use super::raw::{RawModelRoute, RawRetry};
use super::{MountConfig, DEFAULT_MOUNT};

/// Where one attempt goes: a mount, and the model name the upstream gets there (`None`:
/// the client's own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTarget {
    pub mount: Arc<str>,
    pub model: Option<Arc<str>>,
}

impl ModelTarget {
    /// `MOUNT/UPSTREAM_MODEL`, split at its first `/`: mount names have none, model names
    /// may (`openrouter/openai/gpt-4o-mini`).
    fn parse(text: &str) -> ModelTarget {
        match text.split_once('/') {
            Some((mount, model)) => ModelTarget {
                mount: Arc::from(mount),
                model: Some(Arc::from(model)),
            },
            None => ModelTarget {
                mount: Arc::from(text),
                model: None,
            },
        }
    }

    /// The model the upstream gets when the client names `requested`.
    pub fn served<'m>(&'m self, requested: &'m str) -> &'m str {
        self.model.as_deref().unwrap_or(requested)
    }

    /// `mount/model` as the log line names it.
    pub fn label(&self, requested: &str) -> String {
        format!("{}/{}", self.mount, self.served(requested))
    }
}

/// One `[models."PATTERN"]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRoute {
    pub pattern: ModelPattern,
    pub targets: Vec<ModelTarget>,
}

/// Every `[models]` entry, in the order they are tried: exact names first, then globs,
/// the longest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRoutes {
    routes: Vec<ModelRoute>,
}

impl ModelRoutes {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The entry `model` goes by: its exact name, else the longest glob that matches it.
    pub fn find(&self, model: &str) -> Option<&ModelRoute> {
        self.routes
            .iter()
            .find(|route| route.pattern.matches(model))
    }

    /// The names clients may send that are not globs: what `GET /v1/models` adds.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        (self.routes.iter())
            .filter(|route| !route.pattern.is_glob())
            .map(|route| route.pattern.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = &ModelRoute> {
        self.routes.iter()
    }
}

/// `[retry]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub max_attempts: u32,
    pub max_body: u64,
    /// Retries may add this fraction (0–1) to the requests sent, over any 10 s.
    pub budget: f64,
    /// Consecutive failures that eject a target; 0: never.
    pub eject_after: u32,
    pub eject_for: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        let raw = RawRetry::default();
        RetryConfig {
            max_attempts: raw.max_attempts,
            max_body: raw.max_body.0,
            budget: raw.budget / 100.0,
            eject_after: raw.eject_after,
            eject_for: raw.eject_for.0,
        }
    }
}

/// `[models]` and `[retry]`, checked against the mounts; problems named by their key.
pub(super) fn validate_routing(
    raw: (BTreeMap<String, RawModelRoute>, RawRetry),
    mounts: &[MountConfig],
    problems: &mut Vec<String>,
) -> (ModelRoutes, RetryConfig) {
    let (models, retry) = raw;
    if retry.max_attempts == 0 {
        problems.push("retry.max_attempts: must be at least 1 (the first attempt)".to_owned());
    }
    if !(0.0..=100.0).contains(&retry.budget) {
        problems.push(format!(
            "retry.budget: {} is outside 0–100 (per cent of the requests sent)",
            retry.budget
        ));
    }
    if retry.eject_for.0.is_zero() && retry.eject_after > 0 {
        problems.push("retry.eject_for: must be more than 0s (or eject_after = 0)".to_owned());
    }
    let known =
        |name: &str| name == DEFAULT_MOUNT || mounts.iter().any(|m| *m.upstream.mount == *name);
    let mut routes: Vec<ModelRoute> = Vec::with_capacity(models.len());
    for (pattern, route) in models {
        let key_path = format!("models.{pattern:?}");
        if pattern.is_empty() {
            problems.push(format!("{key_path}: a pattern names a model; it is empty"));
            continue;
        }
        if route.targets.is_empty() {
            problems.push(format!(
                "{key_path}.targets: is empty; list MOUNT or MOUNT/MODEL"
            ));
        }
        let mut targets = Vec::with_capacity(route.targets.len());
        for (i, text) in route.targets.iter().enumerate() {
            let target = ModelTarget::parse(text);
            if !known(&target.mount) {
                let names: Vec<&str> = std::iter::once(DEFAULT_MOUNT)
                    .chain(mounts.iter().map(|m| &*m.upstream.mount))
                    .collect();
                problems.push(format!(
                    "{key_path}.targets[{i}]: {text:?} names the mount {:?}, which is not \
                     declared (mounts: {})",
                    target.mount,
                    names.join(", ")
                ));
            } else if target.model.as_deref() == Some("") {
                problems.push(format!(
                    "{key_path}.targets[{i}]: {text:?} has an empty model after the '/'"
                ));
            }
            targets.push(target);
        }
        // `a**b` is `a*b`: two ways of writing one pattern.
        let canonical = collapse_stars(&pattern);
        if let Some(same) = routes
            .iter()
            .find(|seen| collapse_stars(seen.pattern.as_str()) == canonical)
        {
            problems.push(format!(
                "{key_path}: the same pattern as models.{:?}",
                same.pattern.as_str()
            ));
            continue;
        }
        routes.push(ModelRoute {
            pattern: ModelPattern::new(&pattern),
            targets,
        });
    }
    // Exact names first; then globs, the longest first.
    routes.sort_by_key(|route| {
        let pattern = &route.pattern;
        (pattern.is_glob(), std::cmp::Reverse(pattern.as_str().len()))
    });
    let retry = RetryConfig {
        max_attempts: retry.max_attempts,
        max_body: retry.max_body.0,
        budget: retry.budget / 100.0,
        eject_after: retry.eject_after,
        eject_for: retry.eject_for.0,
    };
    (ModelRoutes { routes }, retry)
}

fn collapse_stars(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    for c in pattern.chars() {
        if !(c == '*' && out.ends_with('*')) {
            out.push(c);
        }
    }
    out
}

/// What a sound manifest may still want to hear: a routed mount that reads the client's own
/// key would send the client's OpenAI key to another provider.
pub(super) fn routing_warnings(routes: &ModelRoutes, mounts: &[MountConfig]) -> Vec<String> {
    let mut warnings = Vec::new();
    for route in routes.iter() {
        for (i, target) in route.targets.iter().enumerate() {
            let Some(mount) = mounts.iter().find(|m| *m.upstream.mount == *target.mount) else {
                continue;
            };
            if mount.upstream.keys.is_empty() {
                warnings.push(format!(
                    "models.{:?}.targets[{i}]: the mount {} holds no keys (keys_env), so the \
                     client's own key goes to {}",
                    route.pattern.as_str(),
                    target.mount,
                    mount.upstream.base_url.host_str().unwrap_or("its upstream")
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    fn load(settings: &str) -> Result<Config, String> {
        let manifest = format!(
            "[mounts.groq]\nprefix = \"/groq\"\nbase_url = \"http://127.0.0.1:9\"\n{settings}\n\
             [[routes]]\nmethod = \"POST\"\npath = \"/v1/chat/completions\"\nbody = \"json\"\n\
             route_by_model = true\n"
        );
        Config::from_manifest_str(&manifest).map_err(|err| err.to_string())
    }

    #[test]
    fn exact_names_win_over_globs_and_longer_globs_over_shorter() {
        let config = load(
            "[models.\"gpt-4o*\"]\ntargets = [\"default\"]\n\
             [models.\"gpt-4o-mini*\"]\ntargets = [\"groq\"]\n\
             [models.\"gpt-4o-mini\"]\ntargets = [\"groq/llama\", \"default\"]\n\
             [models.fast]\ntargets = [\"groq/openai/gpt-oss-20b\"]\n",
        )
        .unwrap();
        let models = &config.models;
        let mount_of = |model: &str| models.find(model).map(|r| r.targets[0].label(model));
        assert_eq!(mount_of("gpt-4o-mini").as_deref(), Some("groq/llama"));
        assert_eq!(
            mount_of("gpt-4o-mini-2024").as_deref(),
            Some("groq/gpt-4o-mini-2024")
        );
        assert_eq!(mount_of("gpt-4o").as_deref(), Some("default/gpt-4o"));
        // A model name may hold '/': the target splits at its first.
        assert_eq!(mount_of("fast").as_deref(), Some("groq/openai/gpt-oss-20b"));
        assert_eq!(mount_of("o3"), None);
        let aliases: Vec<&str> = models.aliases().collect();
        assert_eq!(aliases, ["gpt-4o-mini", "fast"]);
    }

    #[test]
    fn routing_mistakes_are_named_by_their_key() {
        let refused = load(
            "[models.fast]\ntargets = [\"nowhere/x\"]\n[models.empty]\ntargets = []\n\
             [models.\"a*\"]\ntargets = [\"groq\"]\n[models.\"a**\"]\ntargets = [\"groq\"]\n\
             [retry]\nmax_attempts = 0\nbudget = 150\n",
        )
        .unwrap_err();
        for expected in [
            "models.\"fast\".targets[0]: \"nowhere/x\" names the mount \"nowhere\", which is not declared (mounts: default, groq)",
            "models.\"empty\".targets: is empty",
            "models.\"a**\": the same pattern as models.\"a*\"",
            "retry.max_attempts: must be at least 1",
            "retry.budget: 150 is outside 0–100",
        ] {
            assert!(refused.contains(expected), "{expected}\n{refused}");
        }
        let no_body = Config::from_manifest_str(
            "[[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\nroute_by_model = true\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            no_body.contains("routes[0].route_by_model: needs a json or multipart body"),
            "{no_body}"
        );
    }

    #[test]
    fn a_routed_mount_reading_the_clients_key_is_warned_about() {
        let config = load("[models.fast]\ntargets = [\"groq/llama\", \"default\"]\n").unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("models.\"fast\".targets[0]: the mount groq holds no keys"),
            "{warnings:?}"
        );
    }
}
