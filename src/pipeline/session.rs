//! Phases 5–8 for a WebSocket route: the session opens upstream first, so a refusal reaches
//! the client as the upstream's own answer; then [`crate::realtime`] relays its frames and
//! writes its line when it ends.

use std::sync::Arc;

use http::StatusCode;

use super::admit::Admitted;
use super::{answer, model, outbound, Answer, GatewayError};
use crate::message::{Body, Head};
use crate::observe::usage::Usage;
use crate::realtime::{self, ClientUpgrade, Session};

impl Admitted<'_> {
    /// Opens the session, or answers why not (counted and logged as a failed request).
    pub(super) async fn open_session(self, upgrade: Option<ClientUpgrade>) -> Answer {
        let (endpoint, route) = (self.endpoint, self.route);
        // The session writes its own line when it ends; this one is for a failure.
        let record = self.record.clone();
        match self.session(upgrade).await {
            Ok(answer) => {
                endpoint.answered(route, &record, answer.status);
                answer
            }
            Err(err) => endpoint.failed(route, &record, &err),
        }
    }

    async fn session(mut self, upgrade: Option<ClientUpgrade>) -> Result<Answer, GatewayError> {
        let client_key =
            realtime::client_key(&self.headers).map_err(GatewayError::NotAWebSocket)?;
        let upgrade = upgrade.ok_or_else(|| {
            GatewayError::Internal(
                "this connection cannot switch to a WebSocket (it needs HTTP/1.1)".to_owned(),
            )
        })?;
        // 4, for a named key: the session's `?model=`.
        self.check_model(model::in_query(&self.target).as_deref())?;
        // Each `response.done` counts against the key's rates and budgets, when it has them.
        let on_usage = self.meter().map(|metered| {
            Box::new(move |usage: &Usage| metered.record(usage)) as realtime::OnUsage
        });
        let pipeline = &*self.endpoint.pipeline;
        let mount = &*self.route.mount;
        let prefix_len = self.endpoint.prefix_len;
        let joined = outbound::path(mount.upstream.target(), &self.target, prefix_len)?;
        let mut headers = outbound::headers(self.headers, None);
        mount.lend_key(&mut headers, &pipeline.metrics);
        let session = Session {
            route: Arc::clone(&self.endpoint.template),
            metrics: Arc::clone(&self.route.metrics),
            key_hash: (self.record.key).map_or_else(String::new, |key| (*key).to_owned()),
            start: self.record.start,
            held: self.admission,
            on_usage,
        };
        let upstream = &mount.upstream;
        let realtime = &pipeline.realtime;
        let opened = realtime
            .open(upstream, joined, headers, &client_key, upgrade, session)
            .await;
        match opened {
            Ok(realtime::Opened::Switching(headers)) => Ok(Answer {
                status: StatusCode::SWITCHING_PROTOCOLS,
                head: Head::Map(headers),
                body: Body::Whole(bytes::Bytes::new()),
            }),
            Ok(realtime::Opened::Refused(refusal)) => {
                let (parts, body) = refusal.into_parts();
                let mut head = Head::Map(parts.headers);
                answer::strip_connection_headers(&mut head);
                Ok(Answer {
                    status: parts.status,
                    head,
                    body: Body::Whole(body),
                })
            }
            Err(realtime::Failed::TimedOut(timeout)) => Err(GatewayError::UpstreamConnectTimeout {
                key_path: Arc::clone(&mount.settings.key_path),
                timeout,
            }),
            Err(realtime::Failed::Unreachable(err)) => Err(GatewayError::UpstreamUnreachable(err)),
        }
    }
}
