//! The link between a supervised actor and its supervisor, in the spirit of an Erlang monitor:
//! a `DeathNotice` lives inside the actor and, if the actor is dropped without having stopped
//! on purpose (a panic unwinds its task), tells the registry, which restarts it.

use actix::Recipient;

use crate::registry::{ActorDown, DownKind};

pub struct DeathNotice {
    to: Recipient<ActorDown>,
    kind: Option<DownKind>,
    gen: u64,
}

impl DeathNotice {
    pub fn new(to: Recipient<ActorDown>, kind: DownKind, gen: u64) -> DeathNotice {
        DeathNotice {
            to,
            kind: Some(kind),
            gen,
        }
    }

    pub fn gen(&self) -> u64 {
        self.gen
    }

    /// The actor is stopping on purpose; its death needs no restart.
    pub fn disarm(&mut self) {
        self.kind = None;
    }
}

impl Drop for DeathNotice {
    fn drop(&mut self) {
        if let Some(kind) = self.kind.take() {
            self.to.do_send(ActorDown {
                kind,
                gen: self.gen,
            });
        }
    }
}
