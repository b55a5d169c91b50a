//! One expiry timer per actor, armed at the earliest deadline it has been asked for.
//!
//! actix polls every future an actor has spawned each time the actor wakes, so a timer per
//! ghost made every message to an account with thousands of dropped sessions poll thousands of
//! sleeps. A `Deadline` keeps at most one: asking for a later time than the armed one is free,
//! asking for an earlier one re-arms it. When it fires, the actor handles everything that is
//! due and asks again for the next deadline its state holds.

use std::time::Duration;

use actix::prelude::*;

use crate::now_ms;

#[derive(Default)]
pub struct Deadline {
    armed: Option<(i64, SpawnHandle)>,
}

impl Deadline {
    /// Makes sure `fire` runs on the actor at `until` (unix ms) or earlier.
    pub fn arm<A>(&mut self, ctx: &mut Context<A>, until: i64, fire: fn(&mut A, &mut Context<A>))
    where
        A: Actor<Context = Context<A>>,
    {
        if let Some((at, handle)) = self.armed {
            if at <= until {
                return;
            }
            ctx.cancel_future(handle);
        }
        let wait = (until - now_ms()).max(0) as u64 + 1;
        let handle = ctx.run_later(Duration::from_millis(wait), fire);
        self.armed = Some((until, handle));
    }

    /// Called first thing when the timer fires: nothing is armed any more.
    pub fn fired(&mut self) {
        self.armed = None;
    }
}
