//! Phase 4 for a named key (`[keys.NAME]`): the model its request names, held to the key's
//! `models` and, with a dollar budget, to the prices; and the request's answer metered
//! against its rates and budgets. A request no named key governs passes through none of
//! this.

use std::sync::Arc;

use bytes::Bytes;

use super::admit::Admitted;
use super::budget::Metered;
use super::model::{self, Named};
use super::GatewayError;
use crate::config::{Config, ModelRoute};

impl<'a> Admitted<'a> {
    /// Whether the model of this request is read: its key has `models`, or a dollar budget
    /// (which needs the model's price).
    pub(super) fn governs_model(&self) -> bool {
        (self.named.as_ref())
            .is_some_and(|named| named.models.is_some() || named.limits.has_dollar_budget())
    }

    /// Whether the answer's usage counts against its key's rates or budgets.
    pub(super) fn metered(&self) -> bool {
        (self.named.as_ref()).is_some_and(|named| named.limits.counts_tokens())
    }

    /// The boundary of a form whose fields are read for its model: a named key's rules, or
    /// `[models]`, read it.
    pub(super) fn scans_fields(&self) -> Option<String> {
        (self.governs_model() || self.route.routes_by_model)
            .then(|| model::multipart_boundary(&self.headers))
            .flatten()
    }

    /// The model a body read whole names (its JSON `model`, or its form's), when a named
    /// key's rules or `[models]` read it; nothing is parsed otherwise.
    pub(super) fn model_in(&self, whole: &[u8]) -> Option<Named> {
        if !(self.governs_model() || self.route.routes_by_model) {
            return None;
        }
        match model::multipart_boundary(&self.headers) {
            Some(boundary) => match model::scan_fields(whole, &boundary) {
                model::Fields::Model(model) => model.map(|model| Named { model, at: None }),
                model::Fields::NoModel | model::Fields::NeedMore => None,
            },
            None => model::located_in_json(whole),
        }
    }

    /// Phase 4 for a named key: the model the request names must match one of its `models`,
    /// and what it is served as must have a price when it has a dollar budget. A usage
    /// route's request must name one the gateway can read; elsewhere, one that names none
    /// (files, vector stores…) is governed by the key's `tags` alone. The model is kept, to
    /// price the answer by.
    pub(super) fn check_model(&mut self, model: Option<&str>) -> Result<(), GatewayError> {
        let Some(named) = &self.named else {
            return Ok(());
        };
        let needs_one = self.route.spec.usage;
        if let Some(models) = &named.models {
            match model {
                Some(model) if named.allows_model(model) => {}
                None if !needs_one => {}
                model => {
                    return Err(GatewayError::ModelNotAllowed {
                        name: Arc::clone(&named.name),
                        model: model.map(str::to_owned),
                        allowed: models.iter().map(|m| m.as_str().to_owned()).collect(),
                    })
                }
            }
        }
        if named.limits.has_dollar_budget() {
            let prices = &self.endpoint.pipeline.config.prices;
            // Each model it may be served as: an alias's targets, or the name itself.
            let priced = match model {
                Some(model) => self
                    .served_as(model)
                    .all(|served| prices.of(served).is_some()),
                None => !needs_one,
            };
            if !priced {
                return Err(GatewayError::ModelNotPriced {
                    name: Arc::clone(&named.name),
                    model: model.map(str::to_owned),
                });
            }
        }
        self.model = model.map(Box::from);
        Ok(())
    }

    /// The names `model` may go upstream as: its `[models]` entry's targets', else its own.
    fn served_as<'m>(&'m self, model: &'m str) -> Box<dyn Iterator<Item = &'m str> + 'm> {
        match self.model_route(Some(model)) {
            Some(route) => Box::new(route.targets.iter().map(move |target| target.served(model))),
            None => Box::new(std::iter::once(model)),
        }
    }

    /// The `[models]` entry a request naming `model` goes by, on a route it routes.
    pub(super) fn model_route(&self, model: Option<&str>) -> Option<&'a ModelRoute> {
        let config: &'a Config = &self.endpoint.pipeline.config;
        (self.route.routes_by_model)
            .then(|| config.models.find(model?))
            .flatten()
    }

    /// Whether this request may be sent somewhere else when its upstream fails: its model has
    /// `[models]` targets, or its mount has `retry = true`.
    pub(super) fn may_go_elsewhere(&self, model: Option<&str>) -> bool {
        self.route.mount.settings.retry || self.model_route(model).is_some()
    }

    /// Whether the body is small enough to be held for another attempt (`retry.max_body`),
    /// by its declared length. One of unknown length streams and gets one attempt, unless
    /// something else reads it whole (a routed JSON body is, for its model).
    pub(super) fn fits_retry(&self) -> bool {
        let max = self.endpoint.pipeline.config.retry.max_body;
        declared_length(&self.headers).is_some_and(|len| len <= max)
    }

    /// A streamed form goes to its first target only: its held fields get that target's
    /// model name, and its declared length follows.
    pub(super) fn rename_held(&mut self, held: &mut Bytes, boundary: &str, model: Option<&str>) {
        let Some(route) = self.model_route(model) else {
            return;
        };
        let Some(served) = route
            .targets
            .first()
            .and_then(|target| target.model.as_deref())
        else {
            return;
        };
        if let Some(renamed) = model::renamed_in_form(held, boundary, served) {
            let (now, was) = (renamed.len() as u64, held.len() as u64);
            let declared = declared_length(&self.headers);
            if let Some(len) = declared.and_then(|len| (len + now).checked_sub(was)) {
                self.headers
                    .insert(http::header::CONTENT_LENGTH, len.into());
            }
            *held = renamed;
        }
    }

    /// What prices this request's answer for its named key (and counts it against the
    /// key's rates and budgets, when it has them).
    pub(super) fn meter(&mut self) -> Option<Box<Metered>> {
        let named = self.named.as_ref()?;
        let pipeline = &self.endpoint.pipeline;
        Some(Box::new(Metered {
            ledger: Arc::clone(&pipeline.ledger),
            metrics: Arc::clone(&pipeline.metrics),
            key: Arc::clone(named),
            config: Arc::clone(&pipeline.config),
            requested: self.model.take(),
        }))
    }
}

/// The body's declared `Content-Length`.
fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    let value = headers.get(http::header::CONTENT_LENGTH)?;
    crate::headers::content_length(value.as_bytes())
}
