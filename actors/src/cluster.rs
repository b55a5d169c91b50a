//! The actor tree's side of a cluster. The tree still knows nothing of Redis: rooms and accounts
//! put their *local* changes into an [`Outbox`] that the server's cluster driver drains every
//! tick, and the driver hands other nodes' changes to the registry as [`FromNode`], which routes
//! them to the rooms and accounts as [`RemoteChanges`].
//!
//! Ownership is the whole design: every entry (a session's meta in a room, or its connection in
//! an account) is owned by the node its session is on. Only the owner changes it; other nodes
//! mirror it, tagged with the owner, and drop it when the owner says so or is declared down.
//! Remote entries are never ghosts on a mirror and never expire there: grace, reclaims and
//! expiry happen on the owner, and the mirror follows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde_json::{Map, Value};

use crate::presence::{Diff, Key, Meta, PresenceSet, SessionId};

/// A node's name (`cluster.node_id`).
pub type NodeId = Arc<str>;

/// Where an entry lives: one account's connections, or one room of an account.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Account { account: Arc<str> },
    Room { account: Arc<str>, room: Arc<str> },
}

impl Scope {
    pub fn account(&self) -> &Arc<str> {
        match self {
            Scope::Account { account } | Scope::Room { account, .. } => account,
        }
    }

    pub fn room(&self) -> Option<&Arc<str>> {
        match self {
            Scope::Room { room, .. } => Some(room),
            Scope::Account { .. } => None,
        }
    }
}

/// One change to a scope, by the node that owns it.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// The entry of `meta.session` under `user` is now `meta` (in an account: with `rooms`).
    Put {
        user: Key,
        meta: Meta,
        rooms: Vec<Arc<str>>,
    },
    /// The entry of `session` under `user` is gone.
    Gone { user: Key, session: SessionId },
    /// A room broadcast, relayed to this node's members of the room.
    Cast {
        event: Arc<str>,
        payload: Arc<Value>,
    },
}

impl Change {
    /// The entry this change is about; `None` for a broadcast.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            Change::Put { meta, .. } => Some(meta.session),
            Change::Gone { session, .. } => Some(*session),
            Change::Cast { .. } => None,
        }
    }
}

/// What the tree asks of the cluster driver besides publishing changes.
#[derive(Clone, Debug, PartialEq)]
pub enum Request {
    /// An actor of `scope` was restarted from its local sessions: send it the remote entries
    /// again.
    Refill(Scope),
    /// Close `session` of `account`, which lives on `node`.
    Kick {
        node: NodeId,
        account: Arc<str>,
        session: SessionId,
    },
}

/// Local changes waiting for the next tick. Pushing is a short mutex hold; the driver takes
/// everything at once. When no driver is attached (a single node), nothing is ever pushed.
#[derive(Default)]
pub struct Outbox {
    inner: Mutex<Pending>,
}

#[derive(Default)]
pub struct Pending {
    pub changes: Vec<(Scope, Change)>,
    pub requests: Vec<Request>,
}

impl Outbox {
    pub fn push(&self, scope: &Scope, change: Change) {
        if let Ok(mut p) = self.inner.lock() {
            p.changes.push((scope.clone(), change));
        }
    }

    pub fn request(&self, r: Request) {
        if let Ok(mut p) = self.inner.lock() {
            p.requests.push(r);
        }
    }

    /// Everything pushed since the last take, in push order.
    pub fn take(&self) -> Pending {
        match self.inner.lock() {
            Ok(mut p) => std::mem::take(&mut *p),
            Err(_) => Pending::default(),
        }
    }
}

/// The cluster as the tree sees it: this node's name and, when clustered, the outbox.
#[derive(Clone, Default)]
pub struct Link {
    pub node: NodeId,
    pub outbox: Option<Arc<Outbox>>,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("node", &self.node)
            .field("clustered", &self.outbox.is_some())
            .finish()
    }
}

impl Link {
    pub fn single(node: &str) -> Link {
        Link {
            node: node.into(),
            outbox: None,
        }
    }

    pub fn publish(&self, scope: &Scope, change: Change) {
        if let Some(o) = &self.outbox {
            o.push(scope, change);
        }
    }

    pub fn request(&self, r: Request) {
        if let Some(o) = &self.outbox {
            o.request(r);
        }
    }

    pub fn clustered(&self) -> bool {
        self.outbox.is_some()
    }
}

/// Another node's changes, from the cluster driver to the registry (which routes them).
/// `reason`, when set, goes into the leave metas of the `Gone`s (`"node_down"`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct FromNode {
    pub node: NodeId,
    pub changes: Vec<(Scope, Change)>,
    pub reason: Option<Arc<str>>,
}

/// Another node's changes to one room or account, from the registry.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RemoteChanges {
    pub node: NodeId,
    pub changes: Vec<Change>,
    pub reason: Option<Arc<str>>,
}

/// Which node owns each remote session an actor mirrors.
#[derive(Default, Debug)]
pub struct Remotes {
    of: HashMap<SessionId, NodeId>,
}

/// What applying remote changes did to a presence set.
#[derive(Default, Debug)]
pub struct Applied {
    pub diff: Diff,
    /// Broadcasts to relay to local members, in order.
    pub casts: Vec<(Arc<str>, Arc<Value>)>,
    /// `(user, session, rooms)` of each `Put` (accounts keep rooms per connection).
    pub rooms: Vec<(Key, SessionId, Vec<Arc<str>>)>,
    /// Sessions whose entries went away (or were re-keyed to a new session).
    pub gone: Vec<(Key, SessionId)>,
}

impl Remotes {
    pub fn is_remote(&self, session: SessionId) -> bool {
        self.of.contains_key(&session)
    }

    pub fn node_of(&self, session: SessionId) -> Option<&NodeId> {
        self.of.get(&session)
    }

    pub fn len(&self) -> usize {
        self.of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.of.is_empty()
    }

    /// Applies one node's changes to `presence` as a single diff: every `Put` first, then every
    /// `Gone` (a batch's puts and removals concern different entries, and a client applies a
    /// diff's joins before its leaves, so a user who moves from one session to another never
    /// blinks out). A `Gone` with `reason` carries it in its leave meta.
    pub fn apply(
        &mut self,
        presence: &mut PresenceSet,
        node: &NodeId,
        changes: Vec<Change>,
        reason: Option<&Arc<str>>,
    ) -> Applied {
        let mut out = Applied::default();
        let mut gones = Vec::new();
        for c in changes {
            match c {
                Change::Put { user, meta, rooms } => {
                    let session = meta.session;
                    // A re-keyed entry (the owner's silent reclaim) leaves its old session id.
                    let before = presence
                        .get(&user)
                        .and_then(|mut m| m.find(|x| x.phx_ref == meta.phx_ref).map(|x| x.session));
                    if let Some(old) = before.filter(|s| *s != session) {
                        self.of.remove(&old);
                        out.gone.push((user.clone(), old));
                    }
                    // Each change of a batch is about another entry (one per entry after
                    // coalescing), so nothing cancels out: appending is merging, in linear time.
                    let d = presence.put_remote(&user, meta);
                    out.diff.joins.extend(d.joins);
                    out.diff.leaves.extend(d.leaves);
                    self.of.insert(session, node.clone());
                    out.rooms.push((user, session, rooms));
                }
                Change::Gone { user, session } => gones.push((user, session)),
                Change::Cast { event, payload } => out.casts.push((event, payload)),
            }
        }
        for (user, session) in gones {
            // Only what this node mirrors for that owner: never a local session.
            if self.of.get(&session) != Some(node) {
                continue;
            }
            self.of.remove(&session);
            let mut d = presence.leave(&user, session, crate::presence::Departure::Now);
            if let Some(why) = reason {
                for (_, m) in d.leaves.iter_mut() {
                    let mut f: Map<String, Value> = (*m.fields).clone();
                    f.insert("reason".into(), Value::from(&**why));
                    m.fields = Arc::new(f);
                }
            }
            out.diff.leaves.extend(d.leaves);
            out.gone.push((user, session));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Arrival, Ref};

    fn meta(session: u64, r: u64, status: &str) -> Meta {
        Arrival {
            session: SessionId(session),
            status: status.into(),
            online_at: 1,
            device: None,
            fields: Arc::new(Map::new()),
        }
        .into_meta(Ref(r))
    }

    fn put(user: &str, m: Meta) -> Change {
        Change::Put {
            user: user.into(),
            meta: m,
            rooms: vec![],
        }
    }

    #[test]
    fn a_remote_reconnect_that_kept_its_ref_is_silent_and_its_old_session_is_forgotten() {
        let (mut p, mut r, n): (_, _, NodeId) =
            (PresenceSet::new(), Remotes::default(), "b".into());
        let a = r.apply(&mut p, &n, vec![put("u", meta(1, 10, "online"))], None);
        assert_eq!(a.diff.joins.len(), 1);
        // The owner's reconnect took its ghost's place: new session, same ref.
        let b = r.apply(
            &mut p,
            &n,
            vec![
                put("u", meta(2, 10, "online")),
                Change::Gone {
                    user: "u".into(),
                    session: SessionId(1),
                },
            ],
            None,
        );
        assert!(b.diff.is_empty(), "{:?}", b.diff);
        assert_eq!(p.metas(), 1);
        assert!(r.is_remote(SessionId(2)) && !r.is_remote(SessionId(1)));
    }

    #[test]
    fn an_update_is_one_swap_and_node_down_says_why() {
        let (mut p, mut r, n): (_, _, NodeId) =
            (PresenceSet::new(), Remotes::default(), "b".into());
        r.apply(&mut p, &n, vec![put("u", meta(1, 10, "online"))], None);
        let up = r.apply(&mut p, &n, vec![put("u", meta(1, 11, "busy"))], None);
        assert_eq!(up.diff.joins[0].1.phx_ref_prev, Some(Ref(10)));
        assert_eq!(up.diff.leaves[0].1.phx_ref, Ref(10));
        let why: Arc<str> = "node_down".into();
        let down = r.apply(
            &mut p,
            &n,
            vec![Change::Gone {
                user: "u".into(),
                session: SessionId(1),
            }],
            Some(&why),
        );
        assert_eq!(down.diff.leaves.len(), 1);
        assert_eq!(down.diff.leaves[0].1.fields["reason"], "node_down");
        assert!(p.is_empty() && r.is_empty());
    }

    #[test]
    fn a_node_cannot_remove_what_it_does_not_own() {
        let (mut p, mut r): (_, Remotes) = (PresenceSet::new(), Remotes::default());
        let local = p.join(
            &"u".into(),
            Arrival {
                session: SessionId(7),
                status: "online".into(),
                online_at: 1,
                device: None,
                fields: Arc::new(Map::new()),
            },
            Ref(70),
        );
        assert_eq!(local.diff.joins.len(), 1);
        let b: NodeId = "b".into();
        let c: NodeId = "c".into();
        r.apply(&mut p, &b, vec![put("u", meta(1, 10, "online"))], None);
        let gone = |s| Change::Gone {
            user: "u".into(),
            session: SessionId(s),
        };
        assert!(r
            .apply(&mut p, &c, vec![gone(1), gone(7)], None)
            .diff
            .is_empty());
        assert_eq!(p.metas(), 2);
    }
}
