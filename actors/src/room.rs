//! `RoomActor`: the presence of one room of one account, and the fan-out to its members.
//!
//! A room is started by the registry on one of the engine's arbiters, or on a socket thread
//! (`registry::PlaceRooms`); there, past `EngineConfig::scatter_past` members, its frames are
//! pushed from an arbiter by a `fanout::Scatter`. On an arbiter, it hands each frame once to
//! each socket thread its members joined from, through that thread's lane (`fanout::Lane`).
//! It owns its `PresenceSet`;
//! every change becomes a `presence_diff` frame, serialised once and shared by all members; the
//! changes handled in one drain of its mailbox share one frame, and a room in a storm of joins
//! and leaves sends them at a paced rate, each frame with all since the last (see
//! `RoomActor::emit`).
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
use crate::fanout::{Cutoff, Dropped, Fanout, Scatter, Subscriber};
use crate::messages::{
    Broadcast, Crash, HereNow, Join, Joined, Leave, RoomMembership, SetStatus, Stall,
};
use crate::metrics::Metrics;
use crate::now_ms;
use crate::pace::Pacer;
use crate::presence::{Departure, Diff, IdGen, Meta, MetaOnNode, PresenceSet, Ref, StateLen};
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
    /// Sizes the next `presence_state` (`StateLen`).
    state_len: StateLen,
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
    /// Changes not yet sent to the members (see `emit`).
    pending: Pending,
    /// Paces the diffs of a busy room (`EngineConfig::diff_pace`).
    pace: Pacer,
    /// Handed to `subs` when the room starts (`RoomSpec::scatter`).
    scatter: Option<Addr<Scatter>>,
}

/// Most changes one `presence_diff` carries: past this many the batch is sent at once, so a
/// long burst in the mailbox cannot hold the first change back for long.
const MAX_BATCH: usize = 64;

/// The changes a room made since it last sent a diff, sent when its mailbox is drained.
#[derive(Default)]
struct Pending {
    /// Each change's diff, in order.
    parts: Vec<Diff>,
    /// Members that joined during the batch, and the first part they have not seen: their join
    /// reply's `presence_state` already holds every part before it, their own join included.
    joined: Vec<(crate::presence::SessionId, usize)>,
    /// When they go, if that is decided.
    scheduled: Option<Flush>,
}

enum Flush {
    /// A `FlushDiffs` is queued behind the mailbox.
    Drained,
    /// A `FlushDiffs` is due once the pace allows (a busy room's joins and leaves).
    Paced(SpawnHandle),
}

/// Sends the pending changes: queued behind the messages already in the mailbox, so every
/// change they make joins the same `presence_diff`.
#[derive(Message)]
#[rtype(result = "()")]
struct FlushDiffs;

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
    /// Where its frames go once it is large (`EngineConfig::scatter_past`); given to rooms that
    /// run on the socket threads.
    pub scatter: Option<Addr<Scatter>>,
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
            pending: Pending::default(),
            pace: Pacer::new(spec.cfg.diff_pace),
            account: spec.account,
            name: spec.name,
            topic,
            members: spec.members,
            state_len: StateLen::default(),
            subs: Fanout::default(),
            ids: spec.ids,
            cfg: spec.cfg,
            metrics: spec.metrics,
            registry: spec.registry,
            recovery: spec.recovery,
            scatter: spec.scatter,
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

    /// Queues a change's diff for the members; `joiner` is the member whose join made it, who
    /// has it (and everything before it) in its join reply's state already.
    ///
    /// The diff goes out once the messages already in the mailbox are handled, merged with the
    /// changes they make: a room that is keeping up sends each change on its own, as soon as
    /// its handler returns; one that fell behind (a burst of joins, a thread starved of CPU)
    /// sends one `presence_diff` for the whole backlog instead of one per change to each of
    /// its members, and so catches up instead of falling further behind.
    ///
    /// Joins and leaves also keep the room's pace (`EngineConfig::diff_pace`): past a burst, a
    /// room in a storm of them (a class starting, everyone back after an outage longer than the
    /// grace window: reconnects within it are silent) sends one diff per interval with all of
    /// them. An update (a status change) goes out at once, with whatever is pending.
    fn emit(
        &mut self,
        diff: Diff,
        joiner: Option<crate::presence::SessionId>,
        ctx: &mut Context<Self>,
    ) {
        let update = diff.carries_update();
        if !diff.is_empty() {
            self.pending.parts.push(diff);
        }
        if let Some(session) = joiner {
            let seen = self.pending.parts.len();
            self.pending.joined.retain(|(s, _)| *s != session);
            self.pending.joined.push((session, seen));
        }
        if self.pending.parts.len() >= MAX_BATCH {
            return self.flush();
        }
        if self.pending.parts.is_empty() {
            return;
        }
        match self.pending.scheduled {
            // Already going as soon as the mailbox is drained, or paced and nothing hurries it.
            Some(Flush::Drained) => return,
            Some(Flush::Paced(_)) if !update => return,
            _ => {}
        }
        if let Some(Flush::Paced(timer)) = self.pending.scheduled.take() {
            ctx.cancel_future(timer);
        }
        let wait = match update {
            true => Duration::ZERO,
            false => self.pace.wait(tokio::time::Instant::now()),
        };
        self.pending.scheduled = Some(if wait.is_zero() {
            ctx.notify(FlushDiffs);
            Flush::Drained
        } else {
            self.metrics.diffs_paced.inc();
            Flush::Paced(ctx.notify_later(FlushDiffs, wait))
        });
    }

    /// Sends the pending changes: one diff of all of them to the members from before the
    /// batch, and to each member that joined during it the part it has not seen. Members that
    /// cannot take theirs leave (slow consumers), and their leaves go out the same way.
    fn flush(&mut self) {
        if self.pending.parts.is_empty() {
            return;
        }
        // A diff nobody from before the batch receives (a room's first members) costs nothing.
        let newcomers = self
            .pending
            .joined
            .iter()
            .filter(|(s, _)| self.subs.contains(*s))
            .count();
        if self.subs.len() > newcomers {
            self.pace.sent(tokio::time::Instant::now());
        }
        loop {
            let parts = std::mem::take(&mut self.pending.parts);
            let joined = std::mem::take(&mut self.pending.joined);
            if parts.is_empty() {
                return;
            }
            let skip: Vec<_> = joined.iter().map(|(s, _)| *s).collect();
            let mut dropped = Vec::new();
            for (from, to) in audiences(&parts, &joined) {
                let diff = merged(&parts[from..]);
                if diff.is_empty() {
                    continue;
                }
                self.metrics.diffs.inc();
                let frame = protocol::broadcast(&self.topic, "presence_diff", &*diff);
                dropped.extend(match to {
                    None => self
                        .subs
                        .send_skipping(&frame, &skip, &self.topic, &self.metrics),
                    Some(sessions) => {
                        let mut d = Vec::new();
                        for s in sessions {
                            d.extend(self.subs.send_one(s, &frame, &self.topic, &self.metrics));
                        }
                        d
                    }
                });
            }
            let leaves = self.slow_ones_leave(dropped);
            if !leaves.is_empty() {
                self.pending.parts.push(leaves);
            }
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
    /// Changes still pending go first, so members see events in the order they happened.
    fn relay(
        &mut self,
        frame: &ByteString,
        except: Option<crate::presence::SessionId>,
        ctx: &mut Context<Self>,
    ) {
        self.flush();
        let dropped = self.subs.send(frame, except, &self.topic, &self.metrics);
        let diff = self.slow_ones_leave(dropped);
        self.emit(diff, None, ctx);
    }

    /// Schedules the expiry of ghosts that a fan-out left behind.
    fn arm_expiry(&mut self, ctx: &mut Context<Self>) {
        if let Some(until) = self.expiry_due.take() {
            self.schedule_expiry(ctx, until);
        }
    }

    /// `presence_state` as a ready frame (refs null: the same bytes suit any member).
    fn state_frame(&self) -> ByteString {
        self.members
            .read()
            .presence
            .state_frame(&self.topic, &self.state_len)
    }

    fn schedule_expiry(&mut self, ctx: &mut Context<Self>, until: i64) {
        self.expiry.arm(ctx, until, Self::expire_ghosts);
    }

    fn expire_ghosts(&mut self, ctx: &mut Context<Self>) {
        self.expiry.fired();
        let d = self.members.write().presence.expire(now_ms());
        self.metrics.leaves.inc_by(d.leaves.len() as u64);
        self.publish_gone(&d);
        self.emit(d, None, ctx);
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
        match self.scatter.take() {
            Some(to) => {
                self.subs
                    .scatter_past(self.cfg.scatter_past, to, ctx.address().recipient())
            }
            None => self.subs.use_lanes(ctx.address().recipient()),
        }
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
                                lane: m.lane,
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
                lane: msg.lane,
            },
        );
        self.emit(out.diff, Some(session), ctx);
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
        self.emit(diff, None, ctx);
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
        self.emit(diff, None, ctx);
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
        self.relay(&frame, except, ctx);
        self.arm_expiry(ctx);
        Ok(())
    }
}

impl Handler<Cutoff> for RoomActor {
    type Result = ();

    /// Members the scatter could not reach: the slow ones leave with grace, as in `flush`;
    /// the gone ones are only forgotten (their own leave is on its way).
    fn handle(&mut self, msg: Cutoff, ctx: &mut Context<Self>) {
        let dropped = msg
            .sessions
            .into_iter()
            .filter_map(|(session, slow)| {
                self.subs.remove(session).map(|user| Dropped {
                    session,
                    user,
                    slow,
                })
            })
            .collect();
        let diff = self.slow_ones_leave(dropped);
        self.emit(diff, None, ctx);
        self.arm_expiry(ctx);
        self.check_idle(ctx);
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
        self.emit(applied.diff, None, ctx);
        for (event, payload) in applied.casts {
            let frame = protocol::broadcast(&self.topic, &event, &*payload);
            self.relay(&frame, None, ctx);
        }
        self.arm_expiry(ctx);
        self.check_idle(ctx);
    }
}

impl Handler<FlushDiffs> for RoomActor {
    type Result = ();

    fn handle(&mut self, _: FlushDiffs, _: &mut Context<Self>) {
        self.pending.scheduled = None;
        self.flush();
    }
}

/// Who gets which suffix of a batch: `(first part, None)` for every member from before it,
/// then `(first part, Some(members))` for those that joined during it, by the part they have
/// not seen. A suffix past the last part is empty and sends nothing.
fn audiences(
    parts: &[Diff],
    joined: &[(crate::presence::SessionId, usize)],
) -> Vec<(usize, Option<Vec<crate::presence::SessionId>>)> {
    let mut out = vec![(0, None)];
    let mut by_part: Vec<(usize, Vec<crate::presence::SessionId>)> = Vec::new();
    for (s, from) in joined {
        if *from >= parts.len() {
            continue;
        }
        match by_part.iter_mut().find(|(f, _)| f == from) {
            Some((_, v)) => v.push(*s),
            None => by_part.push((*from, vec![*s])),
        }
    }
    out.extend(by_part.into_iter().map(|(f, v)| (f, Some(v))));
    out
}

/// The parts as one diff (a meta that joined and left within them is in neither side).
fn merged(parts: &[Diff]) -> std::borrow::Cow<'_, Diff> {
    match parts {
        [one] => std::borrow::Cow::Borrowed(one),
        _ => {
            let mut d = Diff::default();
            for p in parts {
                d.merge(p.clone());
            }
            std::borrow::Cow::Owned(d)
        }
    }
}

impl Handler<Stall> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Stall, _: &mut Context<Self>) {
        msg.hold(format_args!("room {}/{}", self.account, self.name));
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
    use crate::config::DiffPace;
    use crate::fanout::tests::{session, Kind};
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

    /// A member that records the frames it is sent.
    struct Recorder(std::rc::Rc<std::cell::RefCell<Vec<String>>>);

    impl Actor for Recorder {
        type Context = Context<Self>;
    }

    impl Handler<crate::messages::ToSession> for Recorder {
        type Result = ();
        fn handle(&mut self, msg: crate::messages::ToSession, _: &mut Context<Self>) {
            if let crate::messages::ToSession::Frame { frame, .. } = msg {
                self.0.borrow_mut().push(frame.to_string());
            }
        }
    }

    type Frames = std::rc::Rc<std::cell::RefCell<Vec<String>>>;

    /// A room started on the test's own thread, so that messages sent before the test awaits
    /// are all in its mailbox when it first runs.
    fn room_here() -> (Addr<RoomActor>, View<Members>) {
        room_paced(DiffPace::default())
    }

    fn room_paced(pace: DiffPace) -> (Addr<RoomActor>, View<Members>) {
        let cfg = EngineConfig {
            diff_pace: pace,
            ..EngineConfig::default()
        };
        room_with(cfg, Metrics::new(&prometheus::Registry::new()), None)
    }

    fn room_with(
        cfg: EngineConfig,
        metrics: Metrics,
        scatter: Option<Addr<Scatter>>,
    ) -> (Addr<RoomActor>, View<Members>) {
        let cfg = Arc::new(cfg);
        let ids = Arc::new(IdGen::new());
        let registry = Registry::new(cfg.clone(), ids.clone(), metrics.clone()).start();
        let members = View::new(Members::new(true));
        let room = RoomActor::new(RoomSpec {
            account: "acc".into(),
            name: "lobby".into(),
            gen: 1,
            ids,
            cfg,
            metrics,
            registry,
            recovery: None,
            members: members.clone(),
            scatter,
        })
        .start();
        (room, members)
    }

    fn join(
        room: &Addr<RoomActor>,
        user: &str,
        session: u64,
    ) -> (Frames, actix::dev::Request<RoomActor, Join>) {
        let frames = Frames::default();
        let to = Recorder(frames.clone()).start().recipient();
        (frames, join_to(room, user, session, to))
    }

    fn join_to(
        room: &Addr<RoomActor>,
        user: &str,
        session: u64,
        to: crate::messages::SessionAddr,
    ) -> actix::dev::Request<RoomActor, Join> {
        room.send(Join {
            user: user.into(),
            arrival: Arrival {
                session: crate::presence::SessionId(session),
                status: "online".into(),
                online_at: 1,
                device: None,
                fields: Arc::new(serde_json::Map::new()),
            },
            to,
            lane: None,
        })
    }

    fn status(
        room: &Addr<RoomActor>,
        user: &str,
        session: u64,
        to: &str,
    ) -> actix::dev::Request<RoomActor, SetStatus> {
        room.send(SetStatus {
            user: user.into(),
            session: crate::presence::SessionId(session),
            status: Some(to.into()),
            fields: None,
        })
    }

    /// Lets the recorders run until nothing moves.
    async fn settle() {
        for _ in 0..50 {
            actix_rt::task::yield_now().await;
        }
    }

    /// What a phoenix.js client of this member holds: its join reply's state, then each diff,
    /// checking that no diff brings it a meta it already has (a join it would report twice).
    fn client_view(state: &ByteString, frames: &[String]) -> crate::client_presence::ClientState {
        let state: serde_json::Value = serde_json::from_str(state).unwrap();
        let mut client = crate::client_presence::ClientState::new();
        crate::client_presence::sync_state(&mut client, state[4].as_object().unwrap());
        for f in frames {
            let v: serde_json::Value = serde_json::from_str(f).unwrap();
            assert_eq!(v[3], "presence_diff", "{f}");
            for (key, entry) in v[4]["joins"].as_object().unwrap() {
                for meta in entry["metas"].as_array().unwrap() {
                    let seen = client.get(key).is_some_and(|e| {
                        e["metas"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .any(|m| m["phx_ref"] == meta["phx_ref"])
                    });
                    assert!(
                        !seen,
                        "{key} {meta} was already in this member's state: {f}"
                    );
                }
            }
            crate::client_presence::apply_diff_payload(&mut client, &v[4]);
        }
        without_prev(client)
    }

    /// The state without `phx_ref_prev`, which diffs carry and `presence_state` does not.
    fn without_prev(
        mut state: crate::client_presence::ClientState,
    ) -> crate::client_presence::ClientState {
        for entry in state.values_mut() {
            for meta in entry["metas"].as_array_mut().unwrap() {
                meta.as_object_mut().unwrap().remove("phx_ref_prev");
            }
        }
        state
    }

    fn room_state(members: &View<Members>) -> crate::client_presence::ClientState {
        let frame = members
            .read()
            .presence
            .state_frame("room:lobby", &Default::default());
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        without_prev(v[4].as_object().unwrap().clone())
    }

    #[actix_rt::test]
    async fn changes_queued_together_reach_each_member_as_one_diff_of_what_it_has_not_seen() {
        queued_changes_reach_each_member_as_one_diff(room_here()).await;
    }

    /// The same through a scatter (a room on a socket thread past `scatter_past` members): the
    /// frames leave the room's thread but each member still sees them in order.
    #[actix_rt::test]
    async fn a_room_past_scatter_past_sends_through_its_scatter_and_every_member_converges() {
        let cfg = EngineConfig {
            scatter_past: 1,
            ..EngineConfig::default()
        };
        let metrics = Metrics::new(&prometheus::Registry::new());
        let scatter = Scatter::new(metrics.clone()).start();
        queued_changes_reach_each_member_as_one_diff(room_with(cfg, metrics, Some(scatter))).await;
    }

    #[actix_rt::test]
    async fn a_member_its_scatter_cannot_reach_leaves_with_grace_and_the_room_goes_on() {
        let cfg = EngineConfig {
            scatter_past: 0,
            grace_ms: 60_000,
            ..EngineConfig::default()
        };
        let metrics = Metrics::new(&prometheus::Registry::new());
        let scatter = Scatter::new(metrics.clone()).start();
        let (room, members) = room_with(cfg, metrics.clone(), Some(scatter));
        let (frames, old) = join(&room, "old", 1);
        old.await.unwrap().unwrap();
        join_to(&room, "stuck", 2, session(Kind::Stuck).1.to)
            .await
            .unwrap()
            .unwrap();
        for i in 0..8 {
            status(&room, "old", 1, if i % 2 == 0 { "away" } else { "busy" })
                .await
                .unwrap()
                .unwrap();
            settle().await;
        }
        assert_eq!(
            metrics
                .outbound_drops
                .with_label_values(&["slow_consumer"])
                .get(),
            1
        );
        let held = members.read().snapshot().unwrap();
        let stuck = held
            .iter()
            .find(|h| &*h.0 == "stuck")
            .expect("still present");
        assert!(stuck.2.is_some(), "a ghost until its grace runs out");
        let before = frames.borrow().len();
        status(&room, "old", 1, "online").await.unwrap().unwrap();
        settle().await;
        assert_eq!(
            frames.borrow().len(),
            before + 1,
            "the others are still served"
        );
    }

    async fn queued_changes_reach_each_member_as_one_diff(
        (room, members): (Addr<RoomActor>, View<Members>),
    ) {
        let (old_frames, old) = join(&room, "old", 1);
        let old_state = old.await.unwrap().unwrap().state;
        settle().await;
        assert!(old_frames.borrow().is_empty());

        // Three joins and a status change, all in the room's mailbox before it runs.
        let (a_frames, a) = join(&room, "a", 2);
        let (b_frames, b) = join(&room, "b", 3);
        let (c_frames, c) = join(&room, "c", 4);
        let away = status(&room, "a", 2, "away");
        let (a, b, c) = (
            a.await.unwrap().unwrap(),
            b.await.unwrap().unwrap(),
            c.await.unwrap().unwrap(),
        );
        away.await.unwrap().unwrap();
        settle().await;

        let want = room_state(&members);
        assert_eq!(want.len(), 4);
        assert_eq!(want["a"]["metas"][0]["status"], "away");
        // The member from before gets one diff of all four changes; each newcomer one diff of
        // what came after its join (c: only a's status).
        for (who, state, frames) in [
            ("old", &old_state, &old_frames),
            ("a", &a.state, &a_frames),
            ("b", &b.state, &b_frames),
            ("c", &c.state, &c_frames),
        ] {
            let frames = frames.borrow();
            assert_eq!(frames.len(), 1, "{who}: {frames:?}");
            assert_eq!(client_view(state, &frames), want, "{who} converges");
        }
        // A join that was updated within the batch reaches the member from before as its latest
        // meta only.
        let old_diff: serde_json::Value = serde_json::from_str(&old_frames.borrow()[0]).unwrap();
        assert_eq!(old_diff[4]["leaves"], serde_json::json!({}));
        assert_eq!(
            old_diff[4]["joins"]["a"]["metas"].as_array().unwrap().len(),
            1
        );
    }

    #[actix_rt::test]
    async fn a_long_burst_is_sent_in_batches_of_at_most_max_batch_changes() {
        let (room, members) = room_here();
        let (old_frames, old) = join(&room, "old", 1);
        old.await.unwrap().unwrap();
        let (_, a) = join(&room, "a", 2);
        a.await.unwrap().unwrap();
        settle().await;
        // Where `old` stands before the burst: it has seen a's join.
        old_frames.borrow_mut().clear();
        let old_state = members
            .read()
            .presence
            .state_frame("room:lobby", &Default::default());

        let n = 2 * MAX_BATCH + 1;
        let updates: Vec<_> = (0..n)
            .map(|i| status(&room, "a", 2, if i % 2 == 0 { "away" } else { "busy" }))
            .collect();
        for u in updates {
            u.await.unwrap().unwrap();
        }
        settle().await;
        let frames = old_frames.borrow();
        assert_eq!(
            frames.len(),
            3,
            "{} changes: two full batches and the rest",
            n
        );
        assert_eq!(client_view(&old_state, &frames), room_state(&members));
    }

    #[actix_rt::test]
    async fn a_broadcast_follows_the_diffs_of_the_changes_before_it() {
        let (room, _) = room_here();
        let (old_frames, old) = join(&room, "old", 1);
        old.await.unwrap().unwrap();
        let (_, a) = join(&room, "a", 2);
        let cast = room.send(Broadcast {
            from: crate::presence::SessionId(1),
            event: "ping".into(),
            payload: serde_json::json!({}),
            include_self: true,
        });
        a.await.unwrap().unwrap();
        cast.await.unwrap().unwrap();
        settle().await;
        let frames = old_frames.borrow();
        let events: Vec<String> = frames
            .iter()
            .map(|f| serde_json::from_str::<serde_json::Value>(f).unwrap()[3].to_string())
            .collect();
        assert_eq!(events, ["\"presence_diff\"", "\"ping\""]);
    }

    #[test]
    fn each_newcomer_of_a_batch_gets_the_parts_after_its_join() {
        use crate::presence::SessionId;
        let parts = vec![Diff::default(), Diff::default(), Diff::default()];
        let got = audiences(
            &parts,
            &[(SessionId(7), 1), (SessionId(8), 3), (SessionId(9), 1)],
        );
        assert_eq!(
            got,
            vec![(0, None), (1, Some(vec![SessionId(7), SessionId(9)]))],
            "8 joined last: it has seen everything"
        );
    }

    /// The keys a diff frame joins and leaves.
    fn keys(frame: &str) -> (Vec<String>, Vec<String>) {
        let v: serde_json::Value = serde_json::from_str(frame).unwrap();
        let side = |s: &str| v[4][s].as_object().unwrap().keys().cloned().collect();
        (side("joins"), side("leaves"))
    }

    #[actix_rt::test]
    async fn past_its_burst_a_room_sends_joins_once_per_interval_and_an_update_at_once() {
        tokio::time::pause();
        let interval = Duration::from_millis(300);
        let (room, members) = room_paced(DiffPace {
            interval_ms: 300,
            burst: 2,
        });
        let (obs_frames, obs) = join(&room, "obs", 1);
        let obs_state = obs.await.unwrap().unwrap().state;
        settle().await;

        // The burst: two joins, one at a time, each sent as it comes.
        for (session, user) in [(2, "a"), (3, "b")] {
            let (_, j) = join(&room, user, session);
            j.await.unwrap().unwrap();
            settle().await;
        }
        assert_eq!(obs_frames.borrow().len(), 2);

        // Two more: held until the pace allows, then sent together.
        let (c_frames, c) = join(&room, "c", 4);
        let c_state = c.await.unwrap().unwrap().state;
        settle().await;
        let (_, d) = join(&room, "d", 5);
        d.await.unwrap().unwrap();
        settle().await;
        assert_eq!(obs_frames.borrow().len(), 2, "held for the pace");
        tokio::time::sleep(interval).await;
        settle().await;
        assert_eq!(obs_frames.borrow().len(), 3);
        assert_eq!(keys(&obs_frames.borrow()[2]).0, ["c", "d"]);
        // c joined during the wait: its state had itself, the diff brings it only d.
        assert_eq!(c_frames.borrow().len(), 1);
        assert_eq!(keys(&c_frames.borrow()[0]).0, ["d"]);

        // A join waits again; an update does not, and takes the join with it.
        let (_, e) = join(&room, "e", 6);
        e.await.unwrap().unwrap();
        settle().await;
        assert_eq!(obs_frames.borrow().len(), 3, "held for the pace");
        status(&room, "a", 2, "away").await.unwrap().unwrap();
        settle().await;
        assert_eq!(obs_frames.borrow().len(), 4, "an update goes at once");
        let (joins, leaves) = keys(&obs_frames.borrow()[3]);
        assert_eq!(joins, ["e", "a"]);
        assert_eq!(leaves, ["a"]);
        // Nothing else was left behind.
        tokio::time::sleep(interval * 2).await;
        settle().await;
        assert_eq!(obs_frames.borrow().len(), 4);

        let want = room_state(&members);
        assert_eq!(client_view(&obs_state, &obs_frames.borrow()), want);
        let c_seen = client_view(&c_state, &c_frames.borrow()[..1]);
        assert!(c_seen.contains_key("d") && c_seen.contains_key("c"));
    }

    #[actix_rt::test]
    async fn a_diff_that_reaches_nobody_does_not_spend_the_burst() {
        tokio::time::pause();
        let (room, _) = room_paced(DiffPace {
            interval_ms: 300,
            burst: 1,
        });
        // The first member's own join reaches nobody; a newcomer that left before its batch
        // went out is nobody either.
        let (first_frames, first) = join(&room, "first", 1);
        let (_, gone) = join(&room, "gone", 2);
        let leave = room.send(Leave {
            user: "gone".into(),
            session: crate::presence::SessionId(2),
            how: Departure::Now,
        });
        first.await.unwrap().unwrap();
        gone.await.unwrap().unwrap();
        leave.await.unwrap();
        settle().await;
        assert!(first_frames.borrow().is_empty(), "nothing to tell");
        // So the burst of one is still there for the next join.
        let (_, a) = join(&room, "a", 3);
        a.await.unwrap().unwrap();
        settle().await;
        assert_eq!(first_frames.borrow().len(), 1, "sent at once");
        let (_, b) = join(&room, "b", 4);
        b.await.unwrap().unwrap();
        settle().await;
        assert_eq!(first_frames.borrow().len(), 1, "the burst is spent");
        tokio::time::sleep(Duration::from_millis(300)).await;
        settle().await;
        assert_eq!(first_frames.borrow().len(), 2);
    }

    #[actix_rt::test]
    async fn without_pacing_every_join_goes_at_once() {
        tokio::time::pause();
        let (room, _) = room_paced(DiffPace {
            interval_ms: 0,
            burst: 1,
        });
        let (obs_frames, obs) = join(&room, "obs", 1);
        obs.await.unwrap().unwrap();
        for session in 2..40 {
            let (_, j) = join(&room, &format!("u{session}"), session);
            j.await.unwrap().unwrap();
            settle().await;
        }
        assert_eq!(obs_frames.borrow().len(), 38);
    }
}
