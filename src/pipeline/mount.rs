//! One upstream as the pipeline reaches it: `[upstream]` or a `[mounts.NAME]`, with its
//! settings (shared with the manifest), this worker's transports and, when the gateway holds
//! the keys, their pool (shared by all workers). Phases 3, 5 and 6 read it from the route.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, StatusCode};

use super::health::Health;
use super::keys::KeyPool;
use crate::config::{ConfigError, UpstreamConfig, DEFAULT_MOUNT};
use crate::message::Head;
use crate::observe::metrics::Metrics;
use crate::observe::traces;
use crate::upstream::Upstream;

pub(crate) struct Mount {
    pub(crate) settings: Arc<UpstreamConfig>,
    pub(crate) upstream: Upstream,
    /// Present when the gateway sends its own keys (`keys_env`).
    pub(crate) keys: Option<Arc<KeyPool>>,
    /// `gen_ai.provider.name` of its spans.
    pub(crate) provider: &'static str,
    /// Its run of failures, for requests that may go elsewhere (shared by all workers).
    pub(crate) health: Arc<Health>,
}

/// A held key a request went up with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lent {
    index: usize,
}

impl Mount {
    /// The mount of `settings`, lending the keys of `keys`. A mount whose settings hold keys
    /// is refused without their pool: it would send the client's own key upstream.
    pub(crate) fn new(
        settings: &Arc<UpstreamConfig>,
        keys: Option<Arc<KeyPool>>,
        health: Arc<Health>,
        tls: &rustls::ClientConfig,
    ) -> Result<Mount, ConfigError> {
        if !settings.keys.is_empty() && keys.is_none() {
            return Err(ConfigError::Invalid(vec![format!(
                "{}.keys_env: the keys could not be made ready; nothing is served without them",
                settings.key_path
            )]));
        }
        Ok(Mount {
            settings: Arc::clone(settings),
            upstream: Upstream::new(settings, tls)?,
            keys,
            provider: traces::provider(settings.base_url.host_str().unwrap_or("")),
            health,
        })
    }

    /// Its name for log lines: the default mount (`[upstream]`) goes unnamed. A shared copy,
    /// so naming a request allocates nothing.
    pub(crate) fn log_name(&self) -> Option<Arc<str>> {
        (*self.settings.mount != *DEFAULT_MOUNT).then(|| Arc::clone(&self.settings.mount))
    }

    /// `server.address` of its spans.
    pub(crate) fn server(&self) -> Option<&str> {
        self.settings.base_url.host_str()
    }

    /// When the gateway holds this mount's keys: every credential of the client's out of
    /// `headers` (an HTTP request's, or a WebSocket handshake's), the next key in turn in,
    /// counted under its variable. The one place a held key is lent.
    pub(crate) fn lend_key(&self, headers: &mut HeaderMap, metrics: &Metrics) -> Option<Lent> {
        let pool = self.keys.as_ref()?;
        let index = pool.pick()?;
        pool.lend(index, headers);
        if let Some(var) = pool.var(index) {
            metrics.count_key_use(&self.settings.mount, var);
        }
        Some(Lent { index })
    }

    /// Whether a held key other than `lent` is free, so a 429 to `lent` can be retried here.
    pub(crate) fn has_another_key(&self, lent: Lent) -> bool {
        (self.keys.as_ref()).is_some_and(|pool| pool.has_another(lent.index))
    }

    /// The variable of the key `lent`, for the log line.
    pub(crate) fn lent_var(&self, lent: Lent) -> Option<Arc<str>> {
        self.keys.as_ref()?.var(lent.index).cloned()
    }

    /// The answer's head came back to a request that went up with the key `lent`: a 429
    /// rests that key as long as the head says, counted and logged under its variable.
    pub(crate) fn key_answered(
        &self,
        lent: Lent,
        status: StatusCode,
        head: &Head,
        metrics: &Metrics,
    ) {
        if status != StatusCode::TOO_MANY_REQUESTS {
            return;
        }
        let Some((pool, var)) = self
            .keys
            .as_ref()
            .and_then(|pool| Some((pool, pool.var(lent.index)?)))
        else {
            return;
        };
        let rest = pool.rest(lent.index, |name| {
            HeaderName::from_bytes(name.as_bytes())
                .ok()
                .and_then(|name| head.get(&name))
        });
        metrics.count_key_rest(&self.settings.mount, var);
        tracing::warn!(
            mount = %self.settings.mount,
            upstream_key = %var,
            rest_ms = u64::try_from(rest.as_millis()).unwrap_or(u64::MAX),
            "the upstream answered 429; this key rests while the others serve"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{hash_line, Config};

    #[test]
    fn a_mount_holding_keys_is_not_built_without_their_pool() {
        std::env::set_var("OA_TEST_MOUNT_HELD", "sk-held");
        let manifest = format!(
            "[upstream]\nbase_url = \"http://127.0.0.1:9\"\nkeys_env = [\"OA_TEST_MOUNT_HELD\"]\n\
             [access]\nallowed_key_hashes = [\"{}\"]\n\
             [[routes]]\nmethod = \"GET\"\npath = \"/v1/models\"\n",
            hash_line("sk-client")
        );
        let config = Config::from_manifest_str(&manifest).unwrap();
        let tls = crate::upstream::tls::client_config().unwrap();
        let health = || Arc::new(Health::new(&config.upstream.mount, None));
        let Err(refused) = Mount::new(&config.upstream, None, health(), &tls) else {
            panic!("a held-key mount was built without its keys");
        };
        assert!(
            refused.to_string().contains("upstream.keys_env"),
            "{refused}"
        );
        let pool = KeyPool::new(&config.upstream, None).map(Arc::new);
        assert!(Mount::new(&config.upstream, pool, health(), &tls).is_ok());
    }
}
