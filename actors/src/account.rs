//! `AccountActor`: one tenant's live view. It tracks every connection of the account's end users
//! (presence keyed by user, one meta per connection, with the same grace rules as rooms), which
//! rooms each connection is in (for where-now), and fans `presence_diff` out to the dashboard
//! sessions that follow `account:<id>`. Restarted by the registry like a room when it dies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::cluster::{Change, NodeId, RemoteChanges, Remotes, Request, Scope};
use crate::config::EngineConfig;
use crate::fanout::{Fanout, Subscriber};
use crate::messages::{AccountMembership, Crash, Leave, SessionAddr, Stall, ToSession};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::presence::{
    Arrival, Departure, Diff, IdGen, Key, PresenceSet, Ref, SessionId, StateLen,
};
use crate::protocol::{self, Reason};
use crate::registry::{ActorDown, DownKind, Registry};
use crate::snapshot::{AccountPart, AccountSnapshot, Departures, RestoreGhosts, SnapshotAccount};
use crate::supervision::DeathNotice;
use crate::timer::Deadline;

/// A connection of an end user arrives in the account.
#[derive(Message)]
#[rtype(result = "Ref")]
pub struct Connect {
    pub user: Key,
    pub arrival: Arrival,
    pub to: SessionAddr,
}

/// The rooms a connection is in changed (sent after each join and leave).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RoomsChanged {
    pub session: SessionId,
    pub rooms: Vec<Arc<str>>,
}

/// A connection changed its status (the latest status pushed in any room).
#[derive(Message)]
#[rtype(result = "Option<Ref>")]
pub struct ConnectionStatus {
    pub user: Key,
    pub session: SessionId,
    pub status: Arc<str>,
}

/// A dashboard session follows `account:<id>`; the reply is the `presence_state` frame.
#[derive(Message)]
#[rtype(result = "Result<ByteString, Reason>")]
pub struct Subscribe {
    pub session: SessionId,
    pub user: Key,
    pub to: SessionAddr,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub session: SessionId,
}

/// Here-now of the whole account.
#[derive(Message)]
#[rtype(result = "Value")]
pub struct AccountHereNow;

/// Where-now of one user: their connections, with rooms and status.
#[derive(Message)]
#[rtype(result = "Value")]
pub struct WhereNow {
    pub user: String,
}

/// Push a non-presence event (`account_update`, `usage_changed`, `billing_alert`) to followers.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Notify {
    pub event: String,
    pub payload: Value,
}

/// Counts for dashboards and plan checks.
#[derive(Message)]
#[rtype(result = "AccountCounts")]
pub struct Counts;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AccountCounts {
    /// Users present anywhere in the cluster.
    pub users: usize,
    /// Open connections on this node.
    pub connections: usize,
    /// Connections present anywhere in the cluster (ghosts in their grace included).
    pub cluster_connections: usize,
    pub followers: usize,
}

/// The node a session of this account is on (this node's name for a local one), if present.
#[derive(Message)]
#[rtype(result = "Option<NodeId>")]
pub struct SessionNode {
    pub session: SessionId,
}

pub struct AccountActor {
    id: Arc<str>,
    topic: Arc<str>,
    presence: PresenceSet,
    /// Sizes the next `presence_state` (`StateLen`).
    state_len: StateLen,
    rooms_of: HashMap<SessionId, Vec<Arc<str>>>,
    /// Connections still open, so a session that reports again after a restart is not doubled.
    live: HashMap<SessionId, (Key, SessionAddr)>,
    followers: Fanout,
    ids: Arc<IdGen>,
    cfg: Arc<EngineConfig>,
    metrics: Metrics,
    recovery: Option<oneshot::Receiver<Vec<AccountMembership>>>,
    /// Users whose connection went away since the last snapshot, and when (for `last_seen`).
    departed: HashMap<Key, i64>,
    /// Held for its `Drop`: tells the registry if this actor dies. Accounts never stop on purpose.
    _notice: DeathNotice,
    scope: Scope,
    /// Connections on other nodes, mirrored from their owners.
    remotes: Remotes,
    /// The one timer that expires ghosts.
    expiry: Deadline,
}

pub struct AccountSpec {
    pub id: Arc<str>,
    pub gen: u64,
    pub ids: Arc<IdGen>,
    pub cfg: Arc<EngineConfig>,
    pub metrics: Metrics,
    pub registry: Addr<Registry>,
    pub recovery: Option<oneshot::Receiver<Vec<AccountMembership>>>,
}

impl AccountActor {
    pub fn new(spec: AccountSpec) -> AccountActor {
        let notice = DeathNotice::new(
            spec.registry.recipient::<ActorDown>(),
            DownKind::Account {
                account: spec.id.clone(),
            },
            spec.gen,
        );
        AccountActor {
            scope: Scope::Account {
                account: spec.id.clone(),
            },
            remotes: Remotes::default(),
            topic: format!("account:{}", spec.id).into(),
            id: spec.id,
            presence: PresenceSet::new(),
            state_len: StateLen::default(),
            rooms_of: HashMap::new(),
            live: HashMap::new(),
            followers: Fanout::default(),
            ids: spec.ids,
            cfg: spec.cfg,
            metrics: spec.metrics,
            recovery: spec.recovery,
            departed: HashMap::new(),
            _notice: notice,
            expiry: Deadline::default(),
        }
    }

    /// Tells the cluster a local connection's meta and rooms (no-op on a single node).
    fn publish_put(&self, user: &Key, session: SessionId) {
        if !self.cfg.cluster.clustered() || self.remotes.is_remote(session) {
            return;
        }
        if let Some(meta) = self.presence.meta_of(user, session) {
            self.cfg.cluster.publish(
                &self.scope,
                Change::Put {
                    user: user.clone(),
                    meta: meta.clone(),
                    rooms: self.rooms_of.get(&session).cloned().unwrap_or_default(),
                },
            );
        }
    }

    fn publish_gone(&self, user: &Key, session: SessionId) {
        if !self.remotes.is_remote(session) {
            self.cfg.cluster.publish(
                &self.scope,
                Change::Gone {
                    user: user.clone(),
                    session,
                },
            );
        }
    }

    fn emit(&mut self, diff: Diff) {
        if diff.is_empty() {
            return;
        }
        self.metrics.diffs.inc();
        let frame = protocol::broadcast(&self.topic, "presence_diff", &diff);
        // Followers are dashboards, not presences: a slow one is simply cut off.
        self.followers
            .send(&frame, None, &self.topic, &self.metrics);
    }

    /// The rooms a user is in, over all their connections (sorted, no duplicates).
    fn user_rooms(&self, user: &str) -> Vec<Arc<str>> {
        let mut rooms: Vec<Arc<str>> = self
            .presence
            .get(user)
            .into_iter()
            .flatten()
            .filter_map(|m| self.rooms_of.get(&m.session))
            .flatten()
            .cloned()
            .collect();
        rooms.sort();
        rooms.dedup();
        rooms
    }

    /// Tells dashboards which rooms `user` is in now (`rooms` event; `[]` when none).
    fn emit_rooms(&mut self, user: &str) {
        if self.followers.is_empty() {
            return;
        }
        let rooms = self.user_rooms(user);
        let rooms: Vec<&str> = rooms.iter().map(|r| &**r).collect();
        let frame = protocol::broadcast(
            &self.topic,
            "rooms",
            &json!({ "user": user, "rooms": rooms }),
        );
        self.followers
            .send(&frame, None, &self.topic, &self.metrics);
    }

    /// Every present user's rooms, for a dashboard that just followed (`rooms_state`).
    fn rooms_state_frame(&self) -> ByteString {
        let mut out = Map::new();
        for (user, _) in self.presence.iter() {
            let rooms = self.user_rooms(user);
            let rooms: Vec<&str> = rooms.iter().map(|r| &**r).collect();
            if !rooms.is_empty() {
                out.insert(user.to_string(), json!(rooms));
            }
        }
        protocol::broadcast(&self.topic, "rooms_state", &out)
    }

    fn state_frame(&self) -> ByteString {
        self.presence.state_frame(&self.topic, &self.state_len)
    }

    fn schedule_expiry(&mut self, ctx: &mut Context<Self>, until: i64) {
        self.expiry.arm(ctx, until, Self::expire_ghosts);
    }

    fn expire_ghosts(&mut self, ctx: &mut Context<Self>) {
        self.expiry.fired();
        let d = self.presence.expire(now_ms());
        for (u, m) in &d.leaves {
            self.rooms_of.remove(&m.session);
            self.publish_gone(u, m.session);
        }
        let users: Vec<Key> = d.leaves.iter().map(|(k, _)| k.clone()).collect();
        self.emit(d);
        for u in users {
            self.emit_rooms(&u);
        }
        if let Some(next) = self.presence.next_expiry() {
            self.schedule_expiry(ctx, next);
        }
    }

    fn connection_json(&self, user: &str, session: SessionId) -> Option<Value> {
        let meta = self.presence.meta_of(user, session)?;
        let rooms: Vec<&str> = self
            .rooms_of
            .get(&session)
            .map(|r| r.iter().map(|s| &**s).collect())
            .unwrap_or_default();
        let mut v = serde_json::to_value(meta).unwrap_or(Value::Null);
        if let Some(o) = v.as_object_mut() {
            o.insert("session_id".into(), Value::from(session.to_string()));
            o.insert("rooms".into(), json!(rooms));
            let node = self.remotes.node_of(session);
            o.insert(
                "connected".into(),
                Value::from(node.is_some() || self.live.contains_key(&session)),
            );
            o.insert(
                "node".into(),
                Value::from(&**node.unwrap_or(&self.cfg.cluster.node)),
            );
        }
        Some(v)
    }
}

impl Actor for AccountActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.cfg.limits.max_outbound.max(1024));
        self.metrics.accounts.inc();
        if let Some(rx) = self.recovery.take() {
            let wait =
                tokio::time::timeout(Duration::from_millis(self.cfg.recovery_timeout_ms * 2), rx);
            ctx.wait(actix::fut::wrap_future::<_, Self>(wait).map(
                |res, act: &mut AccountActor, _| {
                    let members = match res {
                        Ok(Ok(m)) => m,
                        _ => Vec::new(),
                    };
                    log::info!(
                        "account {} rebuilt from {} live sessions",
                        act.id,
                        members.len()
                    );
                    for m in members {
                        if let Some((user, meta)) = m.connection {
                            act.presence.restore(&user, meta);
                            act.rooms_of.insert(m.session, m.rooms);
                            act.live.insert(m.session, (user, m.to.clone()));
                        }
                        if let Some(user) = m.follower {
                            act.followers.insert(
                                m.session,
                                Subscriber {
                                    user,
                                    to: m.to,
                                    lane: None,
                                },
                            );
                        }
                    }
                    let frame = act.state_frame();
                    act.followers.send(&frame, None, &act.topic, &act.metrics);
                    // Connections on other nodes died with the old actor: the driver sends them
                    // again.
                    act.cfg.cluster.request(Request::Refill(act.scope.clone()));
                },
            ));
        }
    }
}

impl Drop for AccountActor {
    fn drop(&mut self) {
        // Exactly once per actor, however it ended. (`stopped()` also runs after a panic:
        // actix polls a dropped context to a stop, so it cannot tell a crash from a stop.)
        self.metrics.accounts.dec();
    }
}

impl Handler<Connect> for AccountActor {
    type Result = MessageResult<Connect>;

    fn handle(&mut self, msg: Connect, _: &mut Context<Self>) -> Self::Result {
        let session = msg.arrival.session;
        self.live.insert(session, (msg.user.clone(), msg.to));
        let mut arrival = msg.arrival;
        // A reconnect keeps its connection's status (set by its room joins and status pushes),
        // so it takes its ghost's place silently instead of flickering back to "online".
        if let Some(status) = self
            .presence
            .ghost_status(&msg.user, arrival.device.as_deref())
        {
            arrival.status = status.clone();
        }
        let out = self.presence.join(&msg.user, arrival, self.ids.next_ref());
        // A reconnect that replaced a ghost inherits nothing of its rooms: it will join again.
        let replaced = out.replaced.is_some();
        if let Some(old) = out.replaced {
            self.rooms_of.remove(&old);
        }
        self.publish_put(&msg.user, session);
        if let Some(old) = out.replaced {
            self.publish_gone(&msg.user, old);
        }
        self.emit(out.diff);
        if replaced {
            self.emit_rooms(&msg.user);
        }
        MessageResult(out.phx_ref)
    }
}

impl Handler<Leave> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        if self.live.remove(&msg.session).is_some() {
            self.departed.insert(msg.user.clone(), now_ms());
        }
        self.followers.remove(msg.session);
        let diff = self.presence.leave(&msg.user, msg.session, msg.how);
        match msg.how {
            Departure::Grace { until } => self.schedule_expiry(ctx, until),
            Departure::Now => {
                self.rooms_of.remove(&msg.session);
                if !diff.is_empty() {
                    self.publish_gone(&msg.user, msg.session);
                }
            }
        }
        self.emit(diff);
        if matches!(msg.how, Departure::Now) {
            self.emit_rooms(&msg.user);
        }
    }
}

impl Handler<RoomsChanged> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: RoomsChanged, _: &mut Context<Self>) {
        if let Some((user, _)) = self.live.get(&msg.session) {
            let user = user.clone();
            let before = self.user_rooms(&user);
            self.rooms_of.insert(msg.session, msg.rooms);
            self.publish_put(&user, msg.session);
            if self.user_rooms(&user) != before {
                self.emit_rooms(&user);
            }
        }
    }
}

impl Handler<ConnectionStatus> for AccountActor {
    type Result = Option<Ref>;

    fn handle(&mut self, msg: ConnectionStatus, _: &mut Context<Self>) -> Option<Ref> {
        let current = self.presence.meta_of(&msg.user, msg.session)?;
        if current.status == msg.status {
            return Some(current.phx_ref);
        }
        let (diff, meta) = self.presence.update(
            &msg.user,
            msg.session,
            Some(msg.status),
            None,
            self.ids.next_ref(),
        )?;
        self.publish_put(&msg.user, msg.session);
        self.emit(diff);
        Some(meta.phx_ref)
    }
}

impl Handler<Subscribe> for AccountActor {
    type Result = Result<ByteString, Reason>;

    fn handle(&mut self, msg: Subscribe, _: &mut Context<Self>) -> Self::Result {
        // Rooms follow the presence_state: the session holds frames for this topic until it
        // has written the join reply and the state, so the order is kept.
        let _ = msg.to.try_send(ToSession::Frame {
            topic: self.topic.clone(),
            frame: self.rooms_state_frame(),
        });
        self.followers.insert(
            msg.session,
            Subscriber {
                user: msg.user,
                to: msg.to,
                lane: None,
            },
        );
        Ok(self.state_frame())
    }
}

impl Handler<Unsubscribe> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Unsubscribe, _: &mut Context<Self>) {
        self.followers.remove(msg.session);
    }
}

impl Handler<AccountHereNow> for AccountActor {
    type Result = MessageResult<AccountHereNow>;

    fn handle(&mut self, _: AccountHereNow, _: &mut Context<Self>) -> Self::Result {
        let mut users = Map::new();
        for (k, metas) in self.presence.iter() {
            let conns: Vec<Value> = metas
                .filter_map(|m| self.connection_json(k, m.session))
                .collect();
            users.insert(k.to_string(), json!({ "metas": conns }));
        }
        MessageResult(json!({
            "account": &*self.id,
            "users": self.presence.keys(),
            "connections": self.presence.metas(),
            "presences": users,
        }))
    }
}

impl Handler<WhereNow> for AccountActor {
    type Result = MessageResult<WhereNow>;

    fn handle(&mut self, msg: WhereNow, _: &mut Context<Self>) -> Self::Result {
        let sessions: Vec<Value> = match self.presence.get(&msg.user) {
            Some(metas) => metas
                .filter_map(|m| self.connection_json(&msg.user, m.session))
                .collect(),
            None => Vec::new(),
        };
        let mut rooms: Vec<String> = sessions
            .iter()
            .filter_map(|s| s.get("rooms").and_then(Value::as_array))
            .flatten()
            .filter_map(|r| r.as_str().map(String::from))
            .collect();
        rooms.sort();
        rooms.dedup();
        let status = sessions
            .iter()
            .filter_map(|s| s.get("status").and_then(Value::as_str))
            .next()
            .map(String::from);
        let last_seen = if sessions.is_empty() {
            self.departed.get(msg.user.as_str()).copied()
        } else {
            None
        };
        MessageResult(json!({
            "user": msg.user,
            "last_seen": last_seen,
            "online": !sessions.is_empty(),
            "status": status,
            "rooms": rooms,
            "sessions": sessions,
        }))
    }
}

impl Handler<Notify> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Notify, _: &mut Context<Self>) {
        let frame = protocol::broadcast(&self.topic, &msg.event, &msg.payload);
        self.followers
            .send(&frame, None, &self.topic, &self.metrics);
    }
}

impl Handler<Counts> for AccountActor {
    type Result = MessageResult<Counts>;

    fn handle(&mut self, _: Counts, _: &mut Context<Self>) -> Self::Result {
        MessageResult(AccountCounts {
            users: self.presence.keys(),
            connections: self.live.len(),
            cluster_connections: self.presence.metas(),
            followers: self.followers.len(),
        })
    }
}

impl Handler<SnapshotAccount> for AccountActor {
    type Result = MessageResult<SnapshotAccount>;

    fn handle(&mut self, msg: SnapshotAccount, _: &mut Context<Self>) -> Self::Result {
        let first = msg.after.is_none();
        let (connections, next) = crate::snapshot::held_part(
            &self.presence,
            &self.remotes,
            msg.after.as_deref(),
            msg.users,
        );
        MessageResult(AccountPart {
            part: AccountSnapshot {
                account: self.id.clone(),
                connections,
                departed: match (first, msg.departures) {
                    (true, Departures::Take) => self.departed.drain().collect(),
                    (true, Departures::Leave) => self
                        .departed
                        .iter()
                        .map(|(k, at)| (k.clone(), *at))
                        .collect(),
                    (false, _) => Vec::new(),
                },
                followers: self.followers.len(),
            },
            next,
        })
    }
}

impl Handler<RestoreGhosts> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: RestoreGhosts, ctx: &mut Context<Self>) {
        let mut restored = Vec::with_capacity(msg.ghosts.len());
        for (user, meta, until) in msg.ghosts {
            restored.push((user.clone(), meta.session));
            self.presence.restore_ghost(&user, meta, until);
        }
        for (session, rooms) in msg.rooms {
            self.rooms_of.insert(session, rooms);
        }
        for (user, session) in restored {
            self.publish_put(&user, session);
        }
        if let Some(until) = self.presence.next_expiry() {
            self.schedule_expiry(ctx, until);
        }
    }
}

impl Handler<RemoteChanges> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: RemoteChanges, _: &mut Context<Self>) {
        // Rooms per user before, for the users this batch touches, to tell dashboards of moves
        // (a resync's batch holds a whole node: no quadratic work, none without dashboards).
        let mut touched: HashMap<Key, Vec<Arc<str>>> = HashMap::new();
        if !self.followers.is_empty() {
            for c in &msg.changes {
                if let Change::Put { user, .. } | Change::Gone { user, .. } = c {
                    if !touched.contains_key(user) {
                        let before = self.user_rooms(user);
                        touched.insert(user.clone(), before);
                    }
                }
            }
        }
        let applied = self.remotes.apply(
            &mut self.presence,
            &msg.node,
            msg.changes,
            msg.reason.as_ref(),
        );
        for (_, session, rooms) in applied.rooms {
            self.rooms_of.insert(session, rooms);
        }
        for (_, session) in &applied.gone {
            self.rooms_of.remove(session);
        }
        self.emit(applied.diff);
        for (user, before) in touched {
            if self.user_rooms(&user) != before {
                self.emit_rooms(&user);
            }
        }
    }
}

impl Handler<SessionNode> for AccountActor {
    type Result = Option<NodeId>;

    fn handle(&mut self, msg: SessionNode, _: &mut Context<Self>) -> Option<NodeId> {
        if let Some(n) = self.remotes.node_of(msg.session) {
            return Some(n.clone());
        }
        self.presence
            .entries()
            .any(|(_, m, _)| m.session == msg.session)
            .then(|| self.cfg.cluster.node.clone())
    }
}

impl Handler<Stall> for AccountActor {
    type Result = ();

    fn handle(&mut self, msg: Stall, _: &mut Context<Self>) {
        msg.hold(format_args!("account {}", self.id));
    }
}

impl Handler<Crash> for AccountActor {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        panic!("account {} crashed on purpose (chaos hook)", self.id);
    }
}
