//! Messages between sessions, rooms, accounts and the registry. Commands are verbs, queries are
//! nouns, events are past tense.

use std::sync::Arc;

use actix::prelude::*;
use bytestring::ByteString;
use serde_json::{Map, Value};

use crate::presence::{Arrival, Departure, Key, Meta, Ref, SessionId};
use crate::protocol::Reason;

/// What a room, an account or the registry tells a session. A session's mailbox is bounded by
/// `limits.max_outbound`: fan-out uses `try_send`, and a full mailbox cuts the session off.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub enum ToSession {
    /// A ready-made frame for `topic`, to write to the socket.
    Frame { topic: Arc<str>, frame: ByteString },
    /// The session could not keep up with `topic` and was dropped from it.
    Evicted { topic: Arc<str>, reason: Reason },
    /// Close the socket: kicked, abusive, or the server is shutting down.
    Close { reason: Reason },
}

/// How a session is reached: one recipient for frames and commands.
pub type SessionAddr = Recipient<ToSession>;

/// Join a room (or re-join it: a duplicate join swaps the meta).
#[derive(Message)]
#[rtype(result = "Result<Joined, Reason>")]
pub struct Join {
    pub user: Key,
    pub arrival: Arrival,
    pub to: SessionAddr,
    /// The lane of the session's socket thread (`fanout::this_threads_lane`), if any: the
    /// room's frames to it go through that lane.
    pub lane: Option<crate::fanout::Lane>,
}

/// A successful join: the meta's ref and the `presence_state` payload, already serialised.
#[derive(Debug, Clone)]
pub struct Joined {
    pub phx_ref: Ref,
    pub state: ByteString,
}

/// Leave a room or an account (explicitly, or by dropping with grace).
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct Leave {
    pub user: Key,
    pub session: SessionId,
    pub how: Departure,
}

/// Change the caller's status and/or meta fields in a room.
#[derive(Message, Debug)]
#[rtype(result = "Result<Ref, Reason>")]
pub struct SetStatus {
    pub user: Key,
    pub session: SessionId,
    pub status: Option<Arc<str>>,
    pub fields: Option<Arc<Map<String, Value>>>,
}

/// Relay a client event to the room's members.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), Reason>")]
pub struct Broadcast {
    pub from: SessionId,
    pub event: String,
    pub payload: Value,
    pub include_self: bool,
}

/// Here-now of a room: one page of members, as its JSON body (`room::Members::here_now`).
/// HTTP reads a ready room's view in place; this is for a room still being rebuilt.
#[derive(Message, Debug)]
#[rtype(result = "String")]
pub struct HereNow {
    pub after: Option<String>,
    pub limit: usize,
}

/// Test and chaos hook: the actor panics, as a bug would make it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Crash;

/// Test and chaos hook: the actor holds its thread for this long, as a stuck computation would,
/// and answers nothing meanwhile (nor does any actor on that thread).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Stall(pub std::time::Duration);

impl Stall {
    /// Holds the calling thread (the actor's, `who`) for the stall's time, saying so.
    pub(crate) fn hold(&self, who: std::fmt::Arguments<'_>) {
        log::warn!(
            "{who} stalls its thread for {} ms on purpose (chaos hook)",
            self.0.as_millis()
        );
        std::thread::sleep(self.0);
    }
}

/// A session's stake in a room, reported to a restarted room so it can rebuild its state.
#[derive(Debug, Clone)]
pub struct RoomMembership {
    pub user: Key,
    pub meta: Meta,
    pub to: SessionAddr,
    /// The lane of the session's socket thread, as in `Join`.
    pub lane: Option<crate::fanout::Lane>,
}

/// A session's stake in its account, reported to a restarted account actor.
#[derive(Debug, Clone)]
pub struct AccountMembership {
    pub session: SessionId,
    /// An end user's connection: their key and connection meta.
    pub connection: Option<(Key, Meta)>,
    pub rooms: Vec<Arc<str>>,
    /// Present when the session follows `account:<id>` (a dashboard).
    pub follower: Option<Key>,
    pub to: SessionAddr,
}

/// What a restarted actor asks every live session of its account.
#[derive(Message, Clone)]
#[rtype(result = "Report")]
pub enum ReportMembership {
    Room {
        room: Arc<str>,
        addr: Addr<crate::room::RoomActor>,
    },
    Account {
        account: Arc<str>,
        addr: Addr<crate::account::AccountActor>,
    },
}

#[derive(Debug, Default)]
pub enum Report {
    #[default]
    None,
    Room(RoomMembership),
    Account(AccountMembership),
}

// Manual impl: actix needs `MessageResponse` for the reply type.
impl<A: Actor, M: Message<Result = Report>> actix::dev::MessageResponse<A, M> for Report {
    fn handle(self, _ctx: &mut A::Context, tx: Option<actix::dev::OneshotSender<Report>>) {
        if let Some(tx) = tx {
            let _ = tx.send(self);
        }
    }
}
