//! A timer an engine may lend a request's waits: one per connection, for the deadline of
//! whatever it waits for (a head, a body, the upstream's answer).
//!
//! Why: a wait only moves it when its deadline comes sooner than the one armed (requests come
//! far faster than any timeout runs out), and a firing before the wait's own deadline re-arms
//! it there, so a busy connection does not touch the timer wheel per request. An engine that
//! lends none leaves the request a sleep of its own.

use std::pin::Pin;

use tokio::time::{Instant, Sleep};

/// One sleep, re-armed for whatever its owner waits for next.
pub(crate) struct Timer<'s> {
    sleep: Pin<&'s mut Sleep>,
    /// When `sleep` fires; `None` once it has.
    armed: Option<Instant>,
}

impl<'s> Timer<'s> {
    pub(crate) fn new(sleep: Pin<&'s mut Sleep>) -> Timer<'s> {
        Timer { sleep, armed: None }
    }

    /// Resolves once `deadline` has passed.
    pub(crate) async fn expired(&mut self, deadline: Instant) {
        loop {
            if self.armed.is_none_or(|armed| armed > deadline) {
                self.sleep.as_mut().reset(deadline);
                self.armed = Some(deadline);
            }
            self.sleep.as_mut().await;
            self.armed = None;
            if Instant::now() >= deadline {
                return;
            }
        }
    }
}

/// Resolves once `deadline` has passed, on the lent `timer`, else on `own`, a sleep made on
/// the first wait.
pub(super) async fn until(
    timer: &mut Option<&mut Timer<'_>>,
    mut own: Pin<&mut Option<Sleep>>,
    deadline: Instant,
) {
    if let Some(timer) = timer {
        return timer.expired(deadline).await;
    }
    match own.as_mut().as_pin_mut() {
        Some(sleep) => sleep.reset(deadline),
        None => own.set(Some(tokio::time::sleep_until(deadline))),
    }
    if let Some(sleep) = own.as_pin_mut() {
        sleep.await;
    }
}
