//! One upstream as the pipeline reaches it: `[upstream]` or a `[mounts.NAME]`, with its
//! transports (this worker's), read timeout, credential header and, when the gateway holds
//! the keys, their pool (shared by all workers). Phases 3, 5 and 6 read it from the route.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{ConfigError, CredentialHeader, UpstreamConfig};
use crate::observe::traces;
use crate::upstream::Upstream;

use super::keys::KeyPool;

pub(crate) struct Mount {
    /// `default`, or the mount's name: a bounded label.
    pub name: Arc<str>,
    /// Its key path (`upstream`, `mounts.groq`), for messages that name a setting.
    pub at: Arc<str>,
    pub upstream: Upstream,
    pub read_timeout: Duration,
    pub credential: CredentialHeader,
    /// Present when the gateway sends its own keys (`keys_env`).
    pub keys: Option<Arc<KeyPool>>,
    /// `gen_ai.provider.name` of its spans.
    pub provider: &'static str,
    /// `server.address` of its spans.
    pub server: Option<String>,
}

impl Mount {
    pub(crate) fn new(
        config: &UpstreamConfig,
        keys: Option<Arc<KeyPool>>,
        tls: &rustls::ClientConfig,
    ) -> Result<Mount, ConfigError> {
        let host = config.base_url.host_str();
        Ok(Mount {
            name: Arc::from(config.mount.as_str()),
            at: Arc::from(config.at.as_str()),
            upstream: Upstream::new(config, tls)?,
            read_timeout: config.read_timeout,
            credential: config.credential_header,
            keys,
            provider: traces::provider(host.unwrap_or("")),
            server: host.map(str::to_owned),
        })
    }

    /// Its name for log lines: the default mount (`[upstream]`) goes unnamed, as before
    /// mounts. A shared copy, so naming a request allocates nothing.
    pub(crate) fn log_name(&self) -> Option<Arc<str>> {
        (&*self.name != crate::config::DEFAULT_MOUNT).then(|| Arc::clone(&self.name))
    }
}
