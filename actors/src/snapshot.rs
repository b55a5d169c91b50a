//! Snapshots out of, and restores into, the actor tree. The tree knows nothing of databases: a
//! snapshot is plain data gathered by asking every account and room for its presence (each
//! answers from its own thread in microseconds, so nobody waits on I/O), and a restore is plain
//! data that the registry hands to the accounts and rooms it starts.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;

use crate::cluster::Remotes;
use crate::presence::{Key, Meta, PresenceSet};
use crate::registry::{Registry, SnapshotTargets};

/// A meta as a snapshot holds it: the key, the meta, and its ghost deadline (`None` while the
/// session is connected).
pub type Held = (Key, Meta, Option<i64>);

/// What a room or an account holds of this node's own presence (other nodes persist theirs),
/// as a snapshot holds it.
pub(crate) fn held(presence: &PresenceSet, remotes: &Remotes) -> Vec<Held> {
    presence
        .entries()
        .filter(|(_, m, _)| !remotes.is_remote(m.session))
        .map(|(k, m, g)| (k.clone(), m.clone(), g))
        .collect()
}

/// Ask a room for its presence.
#[derive(Message)]
#[rtype(result = "RoomSnapshot")]
pub struct SnapshotRoom;

#[derive(Debug, Clone)]
pub struct RoomSnapshot {
    pub account: Arc<str>,
    pub room: Arc<str>,
    pub members: Vec<Held>,
}

/// Ask an account for its connections, and the users who went away since the last ask.
#[derive(Message)]
#[rtype(result = "AccountSnapshot")]
pub struct SnapshotAccount;

#[derive(Debug, Clone)]
pub struct AccountSnapshot {
    pub account: Arc<str>,
    pub connections: Vec<Held>,
    /// `(user, unix ms)`: when each user's last connection dropped or left, since the last
    /// snapshot. Drained by the ask: the caller keeps them until they are written.
    pub departed: Vec<(Key, i64)>,
    /// Dashboards following the account.
    pub followers: usize,
}

/// The whole node's presence at one instant (each actor's part is exact; the parts are taken
/// within a few milliseconds of each other).
#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    pub taken_at: i64,
    pub accounts: Vec<AccountSnapshot>,
    pub rooms: Vec<RoomSnapshot>,
}

impl EngineSnapshot {
    /// Number of account connections (sessions of end users) in the snapshot, ghosts included.
    pub fn sessions(&self) -> usize {
        self.accounts.iter().map(|a| a.connections.len()).sum()
    }
}

/// Gathers every live account's and room's presence. A room is read in place, through the
/// view its actor writes (`Members::snapshot`): a tick wakes none of the rooms, and none of
/// the changes queued behind them waits for it (1 000 rooms asked at once had every change of
/// that moment wait behind the asks: BENCHMARKS.md). Accounts, and rooms being rebuilt, are
/// asked, each with `timeout`; one that does not answer in time (restarting, or stuck) is left
/// out of this snapshot and counted in the second value.
pub async fn collect(
    registry: &Addr<Registry>,
    timeout: Duration,
) -> Result<(EngineSnapshot, usize), MailboxError> {
    let targets = registry.send(SnapshotTargets).await?;
    let taken_at = crate::now_ms();
    let accounts = join_all(
        targets
            .accounts
            .iter()
            .map(|a| tokio::time::timeout(timeout, a.send(SnapshotAccount))),
    );
    let mut snap = EngineSnapshot {
        taken_at,
        ..EngineSnapshot::default()
    };
    let mut ask = Vec::new();
    for t in targets.rooms {
        match t.members.as_ref().and_then(|m| m.read().snapshot()) {
            Some(members) => snap.rooms.push(RoomSnapshot {
                account: t.account,
                room: t.room,
                members,
            }),
            None => ask.push(t.addr),
        }
    }
    let asked = join_all(
        ask.iter()
            .map(|r| tokio::time::timeout(timeout, r.send(SnapshotRoom))),
    );
    let (accounts, asked) = futures_util::future::join(accounts, asked).await;
    let mut missed = 0;
    for a in accounts {
        match a {
            Ok(Ok(a)) => snap.accounts.push(a),
            _ => missed += 1,
        }
    }
    for r in asked {
        match r {
            Ok(Ok(r)) => snap.rooms.push(r),
            _ => missed += 1,
        }
    }
    Ok((snap, missed))
}

/// One session of a node as its last snapshot held it.
#[derive(Debug, Clone)]
pub struct RestoredSession {
    pub account: Arc<str>,
    pub user: Key,
    /// The connection's meta in the account.
    pub meta: Meta,
    /// Until when the connection stays present without coming back.
    pub until: i64,
    /// The rooms it was in: name, meta in that room, and deadline.
    pub rooms: Vec<(Arc<str>, Meta, i64)>,
}

/// Sent to the registry once at start-up, before the node serves: every session of the last
/// snapshot comes back as a ghost. The reply counts the ghosts restored and the rooms started.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct Restore {
    pub sessions: Vec<RestoredSession>,
}

/// Ghosts for one account or one room, each with its deadline.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct RestoreGhosts {
    pub ghosts: Vec<(Key, Meta, i64)>,
    /// For accounts: the rooms of each ghost session (where-now keeps answering).
    pub rooms: Vec<(crate::presence::SessionId, Vec<Arc<str>>)>,
}

type PerAccount = HashMap<Arc<str>, RestoreGhosts>;
type PerRoom = HashMap<(Arc<str>, Arc<str>), RestoreGhosts>;

/// Groups restored sessions per account and per room.
pub(crate) fn group(sessions: Vec<RestoredSession>) -> (PerAccount, PerRoom) {
    let mut accounts: HashMap<Arc<str>, RestoreGhosts> = HashMap::new();
    let mut rooms: HashMap<(Arc<str>, Arc<str>), RestoreGhosts> = HashMap::new();
    for s in sessions {
        let names: Vec<Arc<str>> = s.rooms.iter().map(|(r, _, _)| r.clone()).collect();
        let acc = accounts
            .entry(s.account.clone())
            .or_insert_with(|| RestoreGhosts {
                ghosts: Vec::new(),
                rooms: Vec::new(),
            });
        acc.rooms.push((s.meta.session, names));
        acc.ghosts.push((s.user.clone(), s.meta, s.until));
        for (room, meta, until) in s.rooms {
            rooms
                .entry((s.account.clone(), room))
                .or_insert_with(|| RestoreGhosts {
                    ghosts: Vec::new(),
                    rooms: Vec::new(),
                })
                .ghosts
                .push((s.user.clone(), meta, until));
        }
    }
    (accounts, rooms)
}
