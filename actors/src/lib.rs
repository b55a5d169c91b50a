//! presence-actors: the OTP-style actor tree of presenced. No database, no HTTP, no Redis: the
//! outside world reaches it through messages and the `Recipient`s handed to it.
//!
//! The tree, in words:
//! - `Registry` (one per node, on its own arbiter) supervises. It starts an `AccountActor` per
//!   tenant and a `RoomActor` per `(account, room)` on demand, spread round-robin over
//!   `EngineConfig::arbiters` worker threads so a hot room does not stall the others, or rooms
//!   over the server's socket threads, next to the sessions (`registry::PlaceRooms`). It keeps
//!   the directory of live sessions: to kick one, to close all at shutdown, and to ask them to
//!   rebuild an actor that died.
//! - Every WebSocket connection is a session actor (in the server crate's transport module). It
//!   registers with the registry, announces its connection to its account (`Connect`), joins
//!   rooms (`Join`, `SetStatus`, `Broadcast`, `Leave`) and follows `account:<id>` (`Subscribe`).
//!   The session is the source of truth for its own memberships.
//! - Rooms and accounts own presence (`presence::PresenceSet`) and fan diffs out through a
//!   bounded `fanout::Fanout`: `try_send` into each session's bounded mailbox, or, through the
//!   lane of the session's socket thread, a push into its bounded `outbox`; a full one cuts the
//!   session off as a slow consumer instead of growing memory.
//! - Let it crash: a room or account that panics is dropped by its arbiter; its `DeathNotice`
//!   tells the registry, which starts the next generation paused, asks every live session of the
//!   account for its stake (`ReportMembership`), rebuilds the same presence (same refs), and
//!   re-sends `presence_state` so clients reconcile with no leave for anyone still connected.
pub mod account;
pub mod client_presence;
pub mod cluster;
pub mod config;
pub mod fanout;
pub mod messages;
pub mod metrics;
pub mod outbox;
pub mod pace;
pub mod presence;
pub mod protocol;
pub mod registry;
pub mod room;
pub mod snapshot;
pub mod supervision;
pub mod timer;
pub mod view;

pub use config::{DiffPace, EngineConfig, Limits};
pub use metrics::Metrics;

/// Wall-clock unix milliseconds: what `online_at`, grace deadlines and `last_seen` are made of.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
