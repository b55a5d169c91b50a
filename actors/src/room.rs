//! `RoomActor`: the presence of one room of one account, and the fan-out to its members.
//!
//! A room is started by the registry on one of the engine's arbiters. It owns its `PresenceSet`;
//! every change becomes one `presence_diff` frame, serialised once and shared by all members.
//! An empty room lingers for `room_idle_ms`, then asks the registry for leave to stop. If it
//! dies, the registry starts a new one that waits (mailbox paused) for the live sessions'
//! reports, rebuilds the same state, and re-sends `presence_state` so clients reconcile silently.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use tokio::sync::oneshot;

use crate::cluster::{Change, RemoteChanges, Remotes, Request, Scope};
use crate::config::EngineConfig;
use crate::fanout::{Dropped, Fanout, Subscriber};
use crate::messages::{Broadcast, Crash, HereNow, Join, Joined, Leave, RoomMembership, SetStatus};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::presence::{Departure, Diff, IdGen, Meta, MetaOnNode, PresenceSet, Ref};
use crate::protocol::{self, Reason};
use crate::registry::{ActorDown, DownKind, Registry, RoomIdle};
use crate::snapshot::{Held, RestoreGhosts, RoomSnapshot, SnapshotRoom};
use crate::supervision::DeathNotice;
use crate::timer::Deadline;
use crate::view::View;

pub struct RoomActor {
    account: Arc<str>,
    name: Arc<str>,
    /// `room:<name>`, shared by every frame this room emits.
    topic: Arc<str>,
    /// Presence and the remote owners of entries; this actor alone writes it, here-now reads it
    /// in place.
    members: View<Members>,
    subs: Fanout,
    ids: Arc<IdGen>,
    cfg: Arc<EngineConfig>,
    metrics: Metrics,
    registry: Addr<Registry>,
    /// Present while this room was restarted and waits for the sessions' reports.
    recovery: Option<oneshot::Receiver<Vec<RoomMembership>>>,
    idle_timer: Option<SpawnHandle>,
    /// Earliest deadline of ghosts made while fanning out (slow consumers), to schedule.
    expiry_due: Option<i64>,
    /// The one timer that expires ghosts.
    expiry: Deadline,
    notice: DeathNotice,
    /// This room as the cluster names it.
    scope: Scope,
    /// Batches of remote changes handled, so the registry never lets the room stop with one
    /// still on its way.
    remote_seen: u64,
}

/// A room's members: its presence, and which of its entries other nodes own. Only the room's
/// handlers write it; here-now reads it in place (see `view`).
pub struct Members {
    presence: PresenceSet,
    /// Members on other nodes, mirrored from their owners.
    remotes: Remotes,
    /// False while a restarted room waits for its sessions' reports: until then this is not
    /// the room's presence, and readers ask the actor, which answers once it is rebuilt.
    ready: bool,
}

impl Members {
    /// The members of a room that starts empty, or (`ready: false`) one being rebuilt.
    pub fn new(ready: bool) -> Members {
        Members {
            presence: PresenceSet::new(),
            remotes: Remotes::default(),
            ready,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// This node's own members, as a snapshot holds them.
    fn held(&self) -> Vec<Held> {
        crate::snapshot::held(&self.presence, &self.remotes)
    }

    /// `held()`, read in place by the snapshotter; `None` while the room is being rebuilt
    /// (its actor answers once it is).
    pub fn snapshot(&self) -> Option<Vec<Held>> {
        self.ready.then(|| self.held())
    }

    /// `(users, sessions)`.
    pub fn counts(&self) -> (usize, usize) {
        (self.presence.keys(), self.presence.metas())
    }

    /// One page of here-now, as its JSON body: up to `limit` users (1 to 1 000) after the
    /// cursor `after`, each with their metas and the node each session is on.
    pub fn here_now(&self, room: &str, node: &str, after: Option<&str>, limit: usize) -> String {
        let limit = limit.clamp(1, 1000);
        let next_cursor = self.presence.after(after).nth(limit - 1).map(|(k, _)| &**k);
        let page = HereNowPage {
            room,
            users: self.presence.keys(),
            sessions: self.presence.metas(),
            presences: Presences {
                members: self,
                node,
                after,
                limit,
            },
            next_cursor,
        };
        serde_json::to_string(&page).unwrap_or_else(|_| String::from("{}"))
    }
}

#[derive(serde::Serialize)]
struct HereNowPage<'a> {
    room: &'a str,
    users: usize,
    sessions: usize,
    presences: Presences<'a>,
    next_cursor: Option<&'a str>,
}

struct Presences<'a> {
    members: &'a Members,
    node: &'a str,
    after: Option<&'a str>,
    limit: usize,
}

impl serde::Serialize for Presences<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        struct Metas<'a, I> {
            metas: I,
            remotes: &'a Remotes,
            node: &'a str,
        }
        impl<'a, I: ExactSizeIterator<Item = &'a Meta> + Clone> serde::Serialize for Metas<'a, I> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.metas.len()))?;
                for meta in self.metas.clone() {
                    let node = self
                        .remotes
                        .node_of(meta.session)
                        .map_or(self.node, |n| &**n);
                    seq.serialize_element(&MetaOnNode { meta, node })?;
                }
                seq.end()
            }
        }
        /// `{"metas": [...]}`
        struct Entry<M> {
            metas: M,
        }
        impl<M: serde::Serialize> serde::Serialize for Entry<M> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("metas", &self.metas)?;
                m.end()
            }
        }
        let mut m = s.serialize_map(None)?;
        for (key, metas) in self.members.presence.after(self.after).take(self.limit) {
            let metas = Metas {
                metas,
                remotes: &self.members.remotes,
                node: self.node,
            };
            m.serialize_entry(&**key, &Entry { metas })?;
        }
        m.end()
    }
}

/// Everything a room needs at birth.
pub struct RoomSpec {
    pub account: Arc<str>,
    pub name: Arc<str>,
    pub gen: u64,
    pub ids: Arc<IdGen>,
    pub cfg: Arc<EngineConfig>,
    pub metrics: Metrics,
    pub registry: Addr<Registry>,
    pub recovery: Option<oneshot::Receiver<Vec<RoomMembership>>>,
    /// Where the room keeps its members (made by the registry, which lists it for readers).
    pub members: View<Members>,
}

impl RoomActor {
    pub fn new(spec: RoomSpec) -> RoomActor {
        let topic: Arc<str> = format!("room:{}", spec.name).into();
        let notice = DeathNotice::new(
            spec.registry.clone().recipient::<ActorDown>(),
            DownKind::Room {
                account: spec.account.clone(),
                room: spec.name.clone(),
            },
            spec.gen,
        );
        RoomActor {
            scope: Scope::Room {
                account: spec.account.clone(),
                room: spec.name.clone(),
            },
            remote_seen: 0,
            account: spec.account,
            name: spec.name,
            topic,
            members: spec.members,
            subs: Fanout::default(),
            ids: spec.ids,
            cfg: spec.cfg,
            metrics: spec.metrics,
            registry: spec.registry,
            recovery: spec.recovery,
            idle_timer: None,
            expiry_due: None,
            expiry: Deadline::default(),
            notice,
        }
    }

    /// Tells the cluster a local entry's current meta (no-op on a single node).
    fn publish_put(&self, user: &crate::presence::Key, session: crate::presence::SessionId) {
        if !self.cfg.cluster.clustered() {
            return;
        }
        let meta = self.members.read().presence.meta_of(user, session).cloned();
        if let Some(meta) = meta {
            self.cfg.cluster.publish(
                &self.scope,
                Change::Put {
                    user: user.clone(),
                    meta,
                    rooms: Vec::new(),
                },
            );
        }
    }

    /// Tells the cluster that the local entries among `diff`'s leaves are gone.
    fn publish_gone(&self, diff: &Diff) {
        if !self.cfg.cluster.clustered() {
            return;
        }
        let members = self.members.read();
        for (user, m) in &diff.leaves {
            if !members.remotes.is_remote(m.session) {
                self.cfg.cluster.publish(
                    &self.scope,
                    Change::Gone {
                        user: user.clone(),
                        session: m.session,
                    },
                );
            }
        }
    }

    /// Sends a diff to every member, then handles whoever could not take it.
    fn emit(&mut self, diff: Diff, except: Option<crate::presence::SessionId>) {
        let mut diff = diff;
        loop {
            if diff.is_empty() {
                return;
            }
            self.metrics.diffs.inc();
            let frame = protocol::broadcast(&self.topic, "presence_diff", &diff);
            let dropped = self.subs.send(&frame, except, &self.topic, &self.metrics);
            diff = self.slow_ones_leave(dropped);
        }
    }

    /// Members cut off as slow consumers leave like any dropped session, with grace, so a
    /// prompt reconnect is seamless. Their leaves, to emit.
    fn slow_ones_leave(&mut self, dropped: Vec<Dropped>) -> Diff {
        let mut diff = Diff::default();
        let mut slow = dropped.into_iter().filter(|d| d.slow).peekable();
        if slow.peek().is_none() {
            return diff;
        }
        let until = now_ms() + self.cfg.grace_ms as i64;
        let mut members = self.members.write();
        for d in slow {
            diff.merge(
                members
                    .presence
                    .leave(&d.user, d.session, Departure::Grace { until }),
            );
        }
        drop(members);
        self.expiry_due = Some(self.expiry_due.map_or(until, |t| t.min(until)));
        diff
    }

    /// Sends a non-presence frame (a broadcast) to every member but `except`; members that
    /// cannot take it are cut off as slow consumers and leave with grace.
    fn relay(&mut self, frame: &ByteString, except: Option<crate::presence::SessionId>) {
        let dropped = self.subs.send(frame, except, &self.topic, &self.metrics);
        let diff = self.slow_ones_leave(dropped);
        self.emit(diff, None);
    }

    /// Schedules the expiry of ghosts that a fan-out left behind.
    fn arm_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(until) = self.expiry_due.take() {
            self.schedule_expiry(ctx, until);
        }
    }

    /// `presence_state` as a ready frame (refs null: the same bytes suit any member).
    fn state_frame(&self) -> ByteString {
        self.members.read().presence.state_frame(&self.topic)
    }

    fn schedule_expiry(&mut self, ctx: &mut Context<Self>, until: i64) {
        self.expiry.arm(ctx, until, Self::expire_ghosts);
    }

    fn expire_ghosts(&mut self, ctx: &mut Context<Self>) {
        self.expiry.fired();
        let d = self.members.write().presence.expire(now_ms());
        self.metrics.leaves.inc_by(d.leaves.len() as u64);
        self.publish_gone(&d);
        self.emit(d, None);
        let next = self.members.read().presence.next_expiry();
        if let Some(next) = next {
            self.schedule_expiry(ctx, next);
        }
        self.arm_expiry(ctx);
        self.check_idle(ctx);
    }

    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if !(self.members.read().presence.is_empty() && self.subs.is_empty()) {
            if let Some(h) = self.idle_timer.take() {
                ctx.cancel_future(h);
            }
            return;
        }
        if self.idle_timer.is_some() {
            return;
        }
        let h = ctx.run_later(Duration::from_millis(self.cfg.room_idle_ms), |act, ctx| {
            act.idle_timer = None;
            if !(act.members.read().presence.is_empty() && act.subs.is_empty()) {
                return;
            }
            let ask = act.registry.send(RoomIdle {
                account: act.account.clone(),
                room: act.name.clone(),
                gen: act.notice.gen(),
                remote_seen: act.remote_seen,
            });
            // `wait` pauses the mailbox: no join can slip in between the registry's yes and
            // the stop. Joins queued meanwhile fail with Closed and are retried by sessions.
            ctx.wait(ask.into_actor(act).map(|res, act, ctx| {
                if res.unwrap_or(false) {
                    act.notice.disarm();
                    ctx.stop();
                }
            }));
        });
        self.idle_timer = Some(h);
    }
}

impl Actor for RoomActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(self.cfg.limits.max_outbound.max(1024));
        self.metrics.rooms.inc();
        if let Some(rx) = self.recovery.take() {
            let wait =
                tokio::time::timeout(Duration::from_millis(self.cfg.recovery_timeout_ms * 2), rx);
            ctx.wait(actix::fut::wrap_future::<_, Self>(wait).map(
                |res, act: &mut RoomActor, ctx| {
                    let members = match res {
                        Ok(Ok(m)) => m,
                        _ => Vec::new(),
                    };
                    log::info!(
                        "room {}/{} rebuilt from {} live sessions",
                        act.account,
                        act.name,
                        members.len()
                    );
                    for m in members {
                        let session = m.meta.session;
                        act.members.write().presence.restore(&m.user, m.meta);
                        act.subs.insert(
                            session,
                            Subscriber {
                                user: m.user,
                                to: m.to,
                            },
                        );
                    }
                    // Clients reconcile against the rebuilt state: nothing changes for live members,
                    // and anything the crash lost (ghosts, an unacknowledged update) is corrected.
                    act.members.write().ready = true;
                    let frame = act.state_frame();
                    act.subs.send(&frame, None, &act.topic, &act.metrics);
                    // Members on other nodes died with the old actor: the driver sends them again.
                    act.cfg.cluster.request(Request::Refill(act.scope.clone()));
                    act.check_idle(ctx);
                },
            ));
        } else {
            self.check_idle(ctx);
        }
    }
}

impl Drop for RoomActor {
    fn drop(&mut self) {
        // Exactly once per actor, however it ended. (`stopped()` also runs after a panic:
        // actix polls a dropped context to a stop, so it cannot tell a crash from a stop.)
        self.metrics.rooms.dec();
    }
}

impl Handler<Join> for RoomActor {
    type Result = Result<Joined, Reason>;

    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) -> Self::Result {
        let session = msg.arrival.session;
        let known = self.subs.contains(session);
        if !known && self.subs.len() >= self.cfg.limits.max_room_members {
            return Err(Reason::RoomFull);
        }
        let out = self
            .members
            .write()
            .presence
            .join(&msg.user, msg.arrival, self.ids.next_ref());
        self.metrics.joins.inc();
        self.publish_put(&msg.user, session);
        if let Some(old) = out.replaced {
            self.cfg.cluster.publish(
                &self.scope,
                Change::Gone {
                    user: msg.user.clone(),
                    session: old,
                },
            );
        }
        self.subs.insert(
            session,
            Subscriber {
                user: msg.user,
                to: msg.to,
            },
        );
        self.emit(out.diff, Some(session));
        self.arm_expiry(ctx);
        self.check_idle(ctx);
        Ok(Joined {
            phx_ref: out.phx_ref,
            state: self.state_frame(),
        })
    }
}

impl Handler<Leave> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, ctx: &mut Context<Self>) {
        self.subs.remove(msg.session);
        let diff = self
            .members
            .write()
            .presence
            .leave(&msg.user, msg.session, msg.how);
        match msg.how {
            Departure::Grace { until } => self.schedule_expiry(ctx, until),
            Departure::Now => self.metrics.leaves.inc_by(diff.leaves.len() as u64),
        }
        self.publish_gone(&diff);
        self.emit(diff, None);
        self.arm_expiry(ctx);
        self.check_idle(ctx);
    }
}

impl Handler<SetStatus> for RoomActor {
    type Result = Result<Ref, Reason>;

    fn handle(&mut self, msg: SetStatus, ctx: &mut Context<Self>) -> Self::Result {
        if !self.subs.contains(msg.session) {
            return Err(Reason::NotJoined);
        }
        let (diff, meta) = self
            .members
            .write()
            .presence
            .update(
                &msg.user,
                msg.session,
                msg.status,
                msg.fields,
                self.ids.next_ref(),
            )
            .ok_or(Reason::NotJoined)?;
        self.metrics.updates.inc();
        self.publish_put(&msg.user, msg.session);
        self.emit(diff, None);
        self.arm_expiry(ctx);
        Ok(meta.phx_ref)
    }
}

impl Handler<Broadcast> for RoomActor {
    type Result = Result<(), Reason>;

    fn handle(&mut self, msg: Broadcast, ctx: &mut Context<Self>) -> Self::Result {
        if !self.subs.contains(msg.from) {
            return Err(Reason::NotJoined);
        }
        self.metrics.broadcasts.inc();
        let frame = protocol::broadcast(&self.topic, &msg.event, &msg.payload);
        if self.cfg.cluster.clustered() {
            self.cfg.cluster.publish(
                &self.scope,
                Change::Cast {
                    event: msg.event.as_str().into(),
                    payload: Arc::new(msg.payload),
                },
            );
        }
        let except = (!msg.include_self).then_some(msg.from);
        self.relay(&frame, except);
        self.arm_expiry(ctx);
        Ok(())
    }
}

impl Handler<HereNow> for RoomActor {
    type Result = MessageResult<HereNow>;

    fn handle(&mut self, msg: HereNow, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.members.read().here_now(
            &self.name,
            &self.cfg.cluster.node,
            msg.after.as_deref(),
            msg.limit,
        ))
    }
}

/// Occupancy of a room, for dashboards and listings.
#[derive(Message)]
#[rtype(result = "(usize, usize)")]
pub struct Occupancy;

impl Handler<Occupancy> for RoomActor {
    type Result = MessageResult<Occupancy>;

    fn handle(&mut self, _: Occupancy, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.members.read().counts())
    }
}

impl Handler<SnapshotRoom> for RoomActor {
    type Result = MessageResult<SnapshotRoom>;

    fn handle(&mut self, _: SnapshotRoom, _: &mut Context<Self>) -> Self::Result {
        MessageResult(RoomSnapshot {
            account: self.account.clone(),
            room: self.name.clone(),
            members: self.members.read().held(),
        })
    }
}

impl Handler<RestoreGhosts> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: RestoreGhosts, ctx: &mut Context<Self>) {
        for (user, meta, until) in msg.ghosts {
            let session = meta.session;
            self.members
                .write()
                .presence
                .restore_ghost(&user, meta, until);
            self.publish_put(&user, session);
        }
        let next = self.members.read().presence.next_expiry();
        if let Some(until) = next {
            self.schedule_expiry(ctx, until);
        }
        self.check_idle(ctx);
    }
}

impl Handler<RemoteChanges> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: RemoteChanges, ctx: &mut Context<Self>) {
        self.remote_seen += 1;
        let applied = {
            let mut members = self.members.write();
            let Members {
                presence, remotes, ..
            } = &mut *members;
            remotes.apply(presence, &msg.node, msg.changes, msg.reason.as_ref())
        };
        self.metrics.leaves.inc_by(applied.diff.leaves.len() as u64);
        self.emit(applied.diff, None);
        for (event, payload) in applied.casts {
            let frame = protocol::broadcast(&self.topic, &event, &*payload);
            self.relay(&frame, None);
        }
        self.arm_expiry(ctx);
        self.check_idle(ctx);
    }
}

impl Handler<Crash> for RoomActor {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        panic!(
            "room {}/{} crashed on purpose (chaos hook)",
            self.account, self.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{Arrival, IdGen};

    fn with_ann(ready: bool) -> Members {
        let ids = IdGen::new();
        let mut m = Members::new(ready);
        let meta = Arrival {
            session: ids.next_session(),
            status: "online".into(),
            online_at: 1,
            device: None,
            fields: Arc::new(serde_json::Map::new()),
        }
        .into_meta(ids.next_ref());
        m.presence.restore(&"ann".into(), meta);
        m
    }

    #[test]
    fn a_snapshot_reads_a_ready_room_in_place_and_leaves_one_being_rebuilt_to_its_actor() {
        let held = with_ann(true)
            .snapshot()
            .expect("a ready room is read in place");
        assert_eq!(held.len(), 1);
        assert_eq!(&*held[0].0, "ann");
        assert_eq!(held[0].2, None, "connected, not a ghost");
        // Rebuilding: what it holds is not yet the room's presence.
        let rebuilding = with_ann(false);
        assert!(rebuilding.snapshot().is_none());
        assert_eq!(
            rebuilding.held().len(),
            1,
            "its actor answers from the same members"
        );
    }
}
