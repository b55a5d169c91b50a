//! What nodes write to Redis and to each other, and the mirror a node keeps of each peer. Pure
//! data, no I/O: the driver (`cluster::driver`) moves it, the tests here prove it converges.
//!
//! - A node's state is one Redis hash, `<prefix>:state:<node>`: a field per entry (a session's
//!   connection in an account, or its meta in a room) whose value is the entry as JSON, plus
//!   `__epoch` (the incarnation) and `__seq` (the last delta folded in).
//! - A delta is one message on `<prefix>:bus`: `{node, epoch, seq, changes}`. It is written in
//!   the same MULTI as the hash update, so a reader that loads the hash at `__seq = s` and then
//!   applies deltas `s+1, s+2, …` has missed nothing. A delta whose seq is not the next one is a
//!   gap: the reader reloads the hash.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use presence_actors::cluster::{Change, Scope};
use presence_actors::presence::{Key, Meta, Ref, SessionId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const EPOCH_FIELD: &str = "__epoch";
pub const SEQ_FIELD: &str = "__seq";

/// The hash field of an entry: `["<account>", "<room>"|null, "<session>"]` as JSON, so any
/// characters in names are safe.
pub fn field(scope: &Scope, session: SessionId) -> String {
    let v = (
        &**scope.account(),
        scope.room().map(|r| &**r),
        session.to_string(),
    );
    serde_json::to_string(&v).unwrap_or_default()
}

pub fn parse_field(f: &str) -> Option<(Scope, SessionId)> {
    let (account, room, session): (String, Option<String>, String) =
        serde_json::from_str(f).ok()?;
    let session = SessionId::parse(&session)?;
    let account: Arc<str> = account.into();
    let scope = match room {
        Some(r) => Scope::Room {
            account,
            room: r.into(),
        },
        None => Scope::Account { account },
    };
    Some((scope, session))
}

/// An entry as it travels: the key (user), the meta, and for a connection its rooms.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEntry {
    pub u: String,
    /// `phx_ref`, hex.
    pub r: String,
    pub st: String,
    pub o: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub f: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rm: Vec<String>,
}

impl WireEntry {
    pub fn from_parts(user: &Key, meta: &Meta, rooms: &[Arc<str>]) -> WireEntry {
        WireEntry {
            u: user.to_string(),
            r: meta.phx_ref.to_string(),
            st: meta.status.to_string(),
            o: meta.online_at,
            d: meta.device.as_deref().map(String::from),
            f: (*meta.fields).clone(),
            rm: rooms.iter().map(|r| r.to_string()).collect(),
        }
    }

    pub fn into_parts(self, session: SessionId) -> Option<Held> {
        let phx_ref = Ref(u64::from_str_radix(&self.r, 16).ok()?);
        Some(Held {
            user: self.u.into(),
            meta: Meta {
                phx_ref,
                phx_ref_prev: None,
                session,
                status: self.st.into(),
                online_at: self.o,
                device: self.d.map(Into::into),
                fields: Arc::new(self.f),
            },
            rooms: self.rm.into_iter().map(Into::into).collect(),
        })
    }
}

/// One change on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum WireChange {
    /// Put: the entry at field `k` is now `v`.
    #[serde(rename = "p")]
    Put { k: String, v: WireEntry },
    /// Gone: the entry at field `k` (of user `u`) is no more.
    #[serde(rename = "g")]
    Gone { k: String, u: String },
    /// A broadcast to a room.
    #[serde(rename = "c")]
    Cast {
        a: String,
        r: String,
        ev: String,
        p: Value,
    },
}

/// A message on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum Bus {
    /// A batch of one node's changes, the `s`-th since its epoch began.
    #[serde(rename = "d")]
    Delta {
        n: String,
        e: u64,
        s: u64,
        c: Vec<WireChange>,
    },
    /// A node (re)wrote its whole state at `s`: read it.
    #[serde(rename = "h")]
    Hello { n: String, e: u64, s: u64 },
    /// Close session `x` of account `a`, which lives on node `n`.
    #[serde(rename = "k")]
    Kick { n: String, a: String, x: String },
}

/// Local changes of one tick as they go on the bus: one per entry (the last wins, in the order
/// of the last writes), broadcasts kept in place.
pub fn coalesce(changes: Vec<(Scope, Change)>) -> Vec<WireChange> {
    let mut seen: HashSet<String> = HashSet::new();
    let mut out: Vec<WireChange> = Vec::with_capacity(changes.len());
    for (scope, change) in changes.into_iter().rev() {
        match change {
            Change::Put { user, meta, rooms } => {
                let k = field(&scope, meta.session);
                if seen.insert(k.clone()) {
                    out.push(WireChange::Put {
                        k,
                        v: WireEntry::from_parts(&user, &meta, &rooms),
                    });
                }
            }
            Change::Gone { user, session } => {
                let k = field(&scope, session);
                if seen.insert(k.clone()) {
                    out.push(WireChange::Gone {
                        k,
                        u: user.to_string(),
                    });
                }
            }
            Change::Cast { event, payload } => out.push(WireChange::Cast {
                a: scope.account().to_string(),
                r: scope.room().map(|r| r.to_string()).unwrap_or_default(),
                ev: event.to_string(),
                p: (*payload).clone(),
            }),
        }
    }
    out.reverse();
    out
}

/// One mirrored entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub user: Key,
    pub meta: Meta,
    pub rooms: Vec<Arc<str>>,
}

/// What a node knows of one peer: its incarnation, the last delta folded in, and its entries.
#[derive(Debug, Default)]
pub struct Peer {
    pub epoch: u64,
    pub seq: u64,
    pub entries: HashMap<String, (Scope, Held)>,
}

/// How a delta relates to what a mirror has seen.
#[derive(Debug, PartialEq, Eq)]
pub enum Fit {
    /// The next one: apply it.
    Next,
    /// Already folded in (a resync read past it): ignore it.
    Old,
    /// One or more are missing, or the peer restarted: reload its state.
    Gap,
}

impl Peer {
    pub fn fit(&self, epoch: u64, seq: u64) -> Fit {
        if epoch != self.epoch {
            Fit::Gap
        } else if seq == self.seq + 1 {
            Fit::Next
        } else if seq <= self.seq {
            Fit::Old
        } else {
            Fit::Gap
        }
    }

    /// Folds in the next delta; returns what the actor tree must hear (nothing for repeats).
    pub fn apply(&mut self, seq: u64, changes: Vec<WireChange>) -> Vec<(Scope, Change)> {
        self.seq = seq;
        let mut out = Vec::new();
        for c in changes {
            match c {
                WireChange::Put { k, v } => {
                    let Some((scope, session)) = parse_field(&k) else {
                        continue;
                    };
                    let Some(held) = v.into_parts(session) else {
                        continue;
                    };
                    if self.entries.get(&k).is_some_and(|(_, h)| *h == held) {
                        continue;
                    }
                    out.push((scope.clone(), put(&held)));
                    self.entries.insert(k, (scope, held));
                }
                WireChange::Gone { k, .. } => {
                    if let Some((scope, held)) = self.entries.remove(&k) {
                        out.push((scope, gone(&held)));
                    }
                }
                WireChange::Cast { a, r, ev, p } => out.push((
                    Scope::Room {
                        account: a.into(),
                        room: r.into(),
                    },
                    Change::Cast {
                        event: ev.into(),
                        payload: Arc::new(p),
                    },
                )),
            }
        }
        out
    }

    /// Replaces the mirror with a full state read from Redis; returns the difference as
    /// changes (nothing at all when the state is what the mirror already held).
    pub fn replace(
        &mut self,
        epoch: u64,
        seq: u64,
        state: HashMap<String, Held>,
    ) -> Vec<(Scope, Change)> {
        let mut out = Vec::new();
        let mut next: HashMap<String, (Scope, Held)> = HashMap::with_capacity(state.len());
        for (k, held) in state {
            let Some((scope, _)) = parse_field(&k) else {
                continue;
            };
            if self.entries.get(&k).map(|(_, h)| h) != Some(&held) {
                out.push((scope.clone(), put(&held)));
            }
            next.insert(k, (scope, held));
        }
        for (k, (scope, held)) in self.entries.drain() {
            if !next.contains_key(&k) {
                out.push((scope, gone(&held)));
            }
        }
        self.entries = next;
        self.epoch = epoch;
        self.seq = seq;
        out
    }

    /// Everything this peer held, as removals (the peer is down).
    pub fn drain(&mut self) -> Vec<(Scope, Change)> {
        self.entries
            .drain()
            .map(|(_, (scope, held))| {
                let g = gone(&held);
                (scope, g)
            })
            .collect()
    }

    /// The entries of one scope, as puts (an actor there was rebuilt and lost them).
    pub fn refill(&self, scope: &Scope) -> Vec<(Scope, Change)> {
        self.entries
            .values()
            .filter(|(s, _)| s == scope)
            .map(|(s, h)| (s.clone(), put(h)))
            .collect()
    }

    /// Connections (account entries) this peer holds.
    pub fn sessions(&self) -> usize {
        self.entries
            .values()
            .filter(|(s, _)| matches!(s, Scope::Account { .. }))
            .count()
    }
}

fn put(h: &Held) -> Change {
    Change::Put {
        user: h.user.clone(),
        meta: h.meta.clone(),
        rooms: h.rooms.clone(),
    }
}

fn gone(h: &Held) -> Change {
    Change::Gone {
        user: h.user.clone(),
        session: h.meta.session,
    }
}

/// Parses a full state hash (`HGETALL`): `None` when it holds no `__seq` (the peer has not
/// written it since Redis lost it), so a reader never mistakes "not written yet" for "empty".
pub fn parse_state(raw: HashMap<String, String>) -> Option<(u64, u64, HashMap<String, Held>)> {
    let seq = raw.get(SEQ_FIELD)?.parse().ok()?;
    let epoch = raw.get(EPOCH_FIELD)?.parse().ok()?;
    let mut out = HashMap::with_capacity(raw.len());
    for (k, v) in raw {
        if k.starts_with("__") {
            continue;
        }
        let Some((_, session)) = parse_field(&k) else {
            continue;
        };
        let Some(held) = serde_json::from_str::<WireEntry>(&v)
            .ok()
            .and_then(|e| e.into_parts(session))
        else {
            log::warn!("cluster: skipping an unreadable entry {k:?}");
            continue;
        };
        out.insert(k, held);
    }
    Some((epoch, seq, out))
}

#[cfg(test)]
mod tests;
