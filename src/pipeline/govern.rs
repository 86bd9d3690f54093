//! Phase 4 for a named key (`[keys.NAME]`): the model its request names, held to the key's
//! `models` and, with a dollar budget, to the prices; and the request's answer metered
//! against its rates and budgets. A request no named key governs passes through none of
//! this.

use std::sync::Arc;

use super::admit::Admitted;
use super::budget::Metered;
use super::{model, GatewayError};
use crate::message::{Body, RequestBody};

impl Admitted<'_> {
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

    /// The boundary of a form whose fields are read for its model.
    pub(super) fn scans_fields(&self) -> Option<String> {
        self.governs_model()
            .then(|| model::multipart_boundary(&self.headers))
            .flatten()
    }

    /// [`Admitted::check_model`] for a body read whole: its JSON `model`, or its form's.
    pub(super) fn check_whole_model(&mut self, body: &RequestBody) -> Result<(), GatewayError> {
        let Body::Whole(whole) = body else {
            return Ok(());
        };
        if !self.governs_model() {
            return Ok(());
        }
        let model = match model::multipart_boundary(&self.headers) {
            Some(boundary) => match model::scan_fields(whole, &boundary) {
                model::Fields::Model(model) => model,
                model::Fields::NoModel | model::Fields::NeedMore => None,
            },
            None => model::in_json(whole),
        };
        self.check_model(model)
    }

    /// Phase 4 for a named key: the model the request names must match one of its `models`,
    /// and have a price when it has a dollar budget. A usage route's request must name one
    /// the gateway can read; elsewhere, one that names none (files, vector stores…) is
    /// governed by the key's `tags` alone. The model is kept, to price the answer by.
    pub(super) fn check_model(&mut self, model: Option<String>) -> Result<(), GatewayError> {
        let Some(named) = &self.named else {
            return Ok(());
        };
        let needs_one = self.route.spec.usage;
        if let Some(models) = &named.models {
            match model.as_deref() {
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
            let priced = match model.as_deref() {
                Some(model) => prices.of(model).is_some(),
                None => !needs_one,
            };
            if !priced {
                return Err(GatewayError::ModelNotPriced {
                    name: Arc::clone(&named.name),
                    model,
                });
            }
        }
        self.model = model.map(String::into_boxed_str);
        Ok(())
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
