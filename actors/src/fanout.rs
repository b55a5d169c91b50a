//! Bounded fan-out: one serialised frame to many sessions without letting any mailbox grow past
//! its capacity. A subscriber whose mailbox is full is cut off, never waited for.

use std::collections::HashMap;
use std::sync::Arc;

use actix::dev::SendError;
use bytestring::ByteString;

use crate::messages::{SessionAddr, ToSession};
use crate::metrics::Metrics;
use crate::presence::{Key, SessionId};
use crate::protocol::Reason;

pub struct Subscriber {
    pub user: Key,
    pub to: SessionAddr,
}

#[derive(Default)]
pub struct Fanout {
    subs: HashMap<SessionId, Subscriber>,
}

/// Subscribers that could not take a frame, and why.
pub struct Dropped {
    pub session: SessionId,
    pub user: Key,
    /// `false` when the session is already gone (its own stop will clean up).
    pub slow: bool,
}

impl Fanout {
    pub fn insert(&mut self, session: SessionId, sub: Subscriber) {
        self.subs.insert(session, sub);
    }

    pub fn remove(&mut self, session: SessionId) -> Option<Subscriber> {
        self.subs.remove(&session)
    }

    pub fn contains(&self, session: SessionId) -> bool {
        self.subs.contains_key(&session)
    }

    pub fn len(&self) -> usize {
        self.subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// Sends `frame` to everyone except `except`. Subscribers that cannot take it are removed
    /// from the fan-out and returned; slow ones are told why, once, past their capacity.
    pub fn send(
        &mut self,
        frame: &ByteString,
        except: Option<SessionId>,
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        self.send_skipping(frame, except.as_slice(), topic, metrics)
    }

    /// `send` to everyone but the sessions in `skip` (a few, so a slice).
    pub fn send_skipping(
        &mut self,
        frame: &ByteString,
        skip: &[SessionId],
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        let mut dropped = Vec::new();
        let mut delivered = 0u64;
        for (id, sub) in self.subs.iter() {
            if skip.contains(id) {
                continue;
            }
            match offer(sub, topic, frame) {
                Ok(()) => delivered += 1,
                Err(slow) => dropped.push(Dropped {
                    session: *id,
                    user: sub.user.clone(),
                    slow,
                }),
            }
        }
        self.settle(delivered, dropped, topic, metrics)
    }

    /// `send` to one subscriber only (none if it is not one).
    pub fn send_one(
        &mut self,
        session: SessionId,
        frame: &ByteString,
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        let Some(sub) = self.subs.get(&session) else {
            return Vec::new();
        };
        match offer(sub, topic, frame) {
            Ok(()) => self.settle(1, Vec::new(), topic, metrics),
            Err(slow) => {
                let d = Dropped {
                    session,
                    user: sub.user.clone(),
                    slow,
                };
                self.settle(0, vec![d], topic, metrics)
            }
        }
    }

    /// Counts the deliveries and cuts off those that could not take the frame.
    fn settle(
        &mut self,
        delivered: u64,
        dropped: Vec<Dropped>,
        topic: &Arc<str>,
        metrics: &Metrics,
    ) -> Vec<Dropped> {
        metrics.deliveries.inc_by(delivered);
        for d in &dropped {
            if let Some(sub) = self.subs.remove(&d.session) {
                if d.slow {
                    metrics
                        .outbound_drops
                        .with_label_values(&["slow_consumer"])
                        .inc();
                    // One message past capacity, once: the session closes itself when it runs.
                    sub.to.do_send(ToSession::Evicted {
                        topic: topic.clone(),
                        reason: Reason::SlowConsumer,
                    });
                }
            }
        }
        dropped
    }
}

/// Hands `frame` to one subscriber; `Err(true)` if its queue is full, `Err(false)` if it is gone.
fn offer(sub: &Subscriber, topic: &Arc<str>, frame: &ByteString) -> Result<(), bool> {
    match sub.to.try_send(ToSession::Frame {
        topic: topic.clone(),
        frame: frame.clone(),
    }) {
        Ok(()) => Ok(()),
        Err(SendError::Full(_)) => Err(true),
        Err(SendError::Closed(_)) => Err(false),
    }
}
