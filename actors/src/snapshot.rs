//! Snapshots out of, and restores into, the actor tree. The tree knows nothing of databases: a
//! snapshot is plain data gathered by asking every account and room for its presence (each
//! answers from its own thread in microseconds, so nobody waits on I/O), and a restore is plain
//! data that the registry hands to the accounts and rooms it starts.

use std::collections::{HashMap, HashSet};
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

/// What an account holds of this node's own presence for its users after `after` (key
/// order), at most `users` of them, and the last user taken if any are left after it.
pub(crate) fn held_part(
    presence: &PresenceSet,
    remotes: &Remotes,
    after: Option<&str>,
    users: usize,
) -> (Vec<Held>, Option<Key>) {
    let mut out = Vec::new();
    let mut last = None;
    let mut keys = presence.after_with_ghosts(after);
    for (key, metas) in keys.by_ref().take(users.max(1)) {
        out.extend(
            metas
                .filter(|(m, _)| !remotes.is_remote(m.session))
                .map(|(m, g)| (key.clone(), m.clone(), g)),
        );
        last = Some(key);
    }
    let more = keys.next().is_some();
    (out, last.filter(|_| more).cloned())
}

/// Ask an account for part of its connections: its users after `after`, in key order, at most
/// `users` of them (`ACCOUNT_PART_USERS`). The first part (`after: None`) also drains the
/// users who went away since the last ask. An account of 20 000 connections answered in one
/// go took its thread for ~10 ms, and the rooms on that thread waited behind it.
#[derive(Message)]
#[rtype(result = "AccountPart")]
pub struct SnapshotAccount {
    pub after: Option<Key>,
    pub users: usize,
    /// Whether the first part drains the departures or only copies them.
    pub departures: Departures,
}

/// What a snapshot does with the departures the accounts hold (`AccountSnapshot::departed`).
/// They are the persistence writer's, so only its snapshots take them; any other reader (the
/// cluster writing its full state) leaves them for the writer's next tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departures {
    /// Drain them: this snapshot's caller records them.
    Take,
    /// Copy them and leave them with the account.
    Leave,
}

/// Users per part of an account's snapshot: about half a millisecond of the account's thread.
pub const ACCOUNT_PART_USERS: usize = 1_000;

/// One part of an account's snapshot: its users' connections (`departed` only in the first
/// part), and where the next part starts (`None` once this was the last).
#[derive(Debug, Clone)]
pub struct AccountPart {
    pub part: AccountSnapshot,
    pub next: Option<Key>,
}

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
///
/// An actor that did not answer in time (restarting, or stuck) is named in `missed_accounts`
/// or `missed_rooms`: its presence is unknown in this snapshot, not empty. A writer keeps
/// what it last wrote of its sessions until a snapshot reads the actor again, instead of
/// taking them for gone (closing their intervals, then opening new ones a tick later).
#[derive(Debug, Clone, Default)]
pub struct EngineSnapshot {
    pub taken_at: i64,
    pub accounts: Vec<AccountSnapshot>,
    pub rooms: Vec<RoomSnapshot>,
    pub missed_accounts: Vec<MissedAccount>,
    /// `(account, room)`.
    pub missed_rooms: Vec<(Arc<str>, Arc<str>)>,
}

/// An account that did not answer all of its snapshot in time.
#[derive(Debug, Clone)]
pub struct MissedAccount {
    pub account: Arc<str>,
    /// The departures its first part drained, if that part came: they are the caller's to
    /// keep (`AccountSnapshot::departed`), whether or not the rest came.
    pub departed: Vec<(Key, i64)>,
}

impl EngineSnapshot {
    /// Number of account connections (sessions of end users) in the snapshot, ghosts included.
    pub fn sessions(&self) -> usize {
        self.accounts.iter().map(|a| a.connections.len()).sum()
    }

    /// Actors left out of this snapshot.
    pub fn missed(&self) -> usize {
        self.missed_accounts.len() + self.missed_rooms.len()
    }

    /// The actors left out of this snapshot, to look entries up against.
    pub fn missed_set(&self) -> MissedSet<'_> {
        MissedSet {
            accounts: self.missed_accounts.iter().map(|m| &*m.account).collect(),
            rooms: self
                .missed_rooms
                .iter()
                .map(|(a, r)| (&**a, &**r))
                .collect(),
        }
    }
}

/// The accounts and rooms a snapshot missed (`EngineSnapshot::missed_set`): what a reader
/// of the snapshot must not take for empty.
pub struct MissedSet<'a> {
    accounts: HashSet<&'a str>,
    rooms: HashSet<(&'a str, &'a str)>,
}

impl MissedSet<'_> {
    pub fn account(&self, account: &str) -> bool {
        self.accounts.contains(account)
    }

    pub fn room(&self, account: &str, room: &str) -> bool {
        self.rooms.contains(&(account, room))
    }
}

/// Gathers every live account's and room's presence. A room is read in place, through the
/// view its actor writes (`Members::snapshot`): a tick wakes none of the rooms, and none of
/// the changes queued behind them waits for it (1 000 rooms asked at once had every change of
/// that moment wait behind the asks: BENCHMARKS.md). Accounts, and rooms being rebuilt, are
/// asked, each with `timeout`; one that does not answer in time (restarting, or stuck) is left
/// out of this snapshot and named in its `missed_accounts` or `missed_rooms`.
pub async fn collect(
    registry: &Addr<Registry>,
    timeout: Duration,
    departures: Departures,
) -> Result<EngineSnapshot, MailboxError> {
    let targets = registry.send(SnapshotTargets).await?;
    let taken_at = crate::now_ms();
    let accounts = join_all(
        targets
            .accounts
            .iter()
            .map(|(id, a)| account_snapshot(id, a, timeout, departures)),
    );
    let mut snap = EngineSnapshot {
        taken_at,
        ..EngineSnapshot::default()
    };
    let mut ask = Vec::new();
    for (i, t) in targets.rooms.into_iter().enumerate() {
        // Reading a room's view takes this thread (the registry's) for a few microseconds per
        // member; let the registry's messages in every `ROOMS_PER_YIELD` rooms.
        if i > 0 && i % ROOMS_PER_YIELD == 0 {
            tokio::task::yield_now().await;
        }
        match t.members.as_ref().and_then(|m| m.read().snapshot()) {
            Some(members) => snap.rooms.push(RoomSnapshot {
                account: t.account,
                room: t.room,
                members,
            }),
            None => ask.push((t.account, t.room, t.addr)),
        }
    }
    let asked = join_all(
        ask.iter()
            .map(|(_, _, r)| tokio::time::timeout(timeout, r.send(SnapshotRoom))),
    );
    let (accounts, asked) = futures_util::future::join(accounts, asked).await;
    for a in accounts {
        match a {
            Ok(a) => snap.accounts.push(a),
            Err(missed) => snap.missed_accounts.push(missed),
        }
    }
    for (r, (account, room, _)) in asked.into_iter().zip(ask) {
        match r {
            Ok(Ok(r)) => snap.rooms.push(r),
            _ => snap.missed_rooms.push((account, room)),
        }
    }
    Ok(snap)
}

/// Rooms read in place between two yields of the collecting thread (the registry's).
const ROOMS_PER_YIELD: usize = 100;

/// An account's snapshot, asked for part by part (`SnapshotAccount`), each part within
/// `timeout`; missed if any part did not come (the account restarting, or stuck), with the
/// departures the first part drained. Each user is taken exactly as it was when its part was
/// read.
async fn account_snapshot(
    id: &Arc<str>,
    account: &Addr<crate::account::AccountActor>,
    timeout: Duration,
    departures: Departures,
) -> Result<AccountSnapshot, MissedAccount> {
    let part = |after| async move {
        let ask = SnapshotAccount {
            after,
            users: ACCOUNT_PART_USERS,
            departures,
        };
        match tokio::time::timeout(timeout, account.send(ask)).await {
            Ok(Ok(part)) => Some(part),
            _ => None,
        }
    };
    let missed = |departed| MissedAccount {
        account: id.clone(),
        departed,
    };
    let first = part(None).await.ok_or_else(|| missed(Vec::new()))?;
    let (mut whole, mut next) = (first.part, first.next);
    while let Some(after) = next.take() {
        let Some(more) = part(Some(after)).await else {
            return Err(missed(whole.departed));
        };
        whole.connections.extend(more.part.connections);
        next = more.next;
    }
    Ok(whole)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::account::Connect;
    use crate::config::EngineConfig;
    use crate::messages::Leave;
    use crate::metrics::Metrics;
    use crate::presence::{Arrival, Departure, IdGen, SessionId};
    use crate::registry::tests::Stake;
    use crate::registry::ResolveAccount;

    /// An account larger than one part is read part by part: every connection exactly once,
    /// a user's sessions together, and who went away only once, to the snapshot that takes
    /// the departures.
    #[actix_rt::test]
    async fn an_account_is_read_in_parts_that_hold_every_connection_once() {
        let metrics = Metrics::new(&prometheus::Registry::new());
        let cfg = Arc::new(EngineConfig::default());
        let registry = Registry::new(cfg, Arc::new(IdGen::new()), metrics).start();
        let account = registry
            .send(ResolveAccount {
                account: "acc".into(),
            })
            .await
            .expect("registry answers")
            .expect("account started");
        let sink = Stake.start().recipient();
        let users = ACCOUNT_PART_USERS * 2 + 500;
        // User 0 has a second device: `users + 1` connections.
        for (i, session) in (0..users).chain([0]).zip(1..) {
            account
                .send(Connect {
                    user: format!("u{i:05}").into(),
                    arrival: Arrival {
                        session: SessionId(session),
                        status: "online".into(),
                        online_at: 0,
                        device: Some(format!("d{session}").into()),
                        fields: Arc::default(),
                    },
                    to: sink.clone(),
                })
                .await
                .expect("account answers");
        }
        account
            .send(Leave {
                user: "u00007".into(),
                session: SessionId(8),
                how: Departure::Now,
            })
            .await
            .expect("account answers");

        // A reader other than the persistence writer (the cluster) sees who left and leaves
        // them for the writer.
        let peek = collect(&registry, Duration::from_secs(5), Departures::Leave)
            .await
            .expect("registry answers");
        assert_eq!(peek.accounts[0].connections.len(), users);
        assert_eq!(
            peek.accounts[0].departed.len(),
            1,
            "{:?}",
            peek.accounts[0].departed
        );

        let snap = collect(&registry, Duration::from_secs(5), Departures::Take)
            .await
            .expect("registry answers");
        assert_eq!(snap.missed(), 0);
        let [acc] = &snap.accounts[..] else {
            panic!("one account: {:?}", snap.accounts.len());
        };
        assert_eq!(
            acc.connections.len(),
            users,
            "every connection but the one that left"
        );
        let mut sessions: Vec<u64> = acc
            .connections
            .iter()
            .map(|(_, m, _)| m.session.0)
            .collect();
        sessions.sort_unstable();
        sessions.dedup();
        assert_eq!(sessions.len(), users, "none twice");
        assert!(!sessions.contains(&8));
        let keys: Vec<&str> = acc.connections.iter().map(|(k, _, _)| &**k).collect();
        assert!(
            keys.windows(2).all(|w| w[0] <= w[1]),
            "in key order, parts in sequence"
        );
        assert_eq!(keys.iter().filter(|k| **k == "u00000").count(), 2);
        assert_eq!(acc.departed.len(), 1, "who left: {:?}", acc.departed);

        let again = collect(&registry, Duration::from_secs(5), Departures::Take)
            .await
            .expect("registry answers");
        assert_eq!(again.accounts[0].connections.len(), users);
        assert!(
            again.accounts[0].departed.is_empty(),
            "drained by the first snapshot"
        );
    }
}
