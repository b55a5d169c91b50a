//! `Registry`: the supervisor. It starts account and room actors on demand, spread over the
//! engine's arbiters; it knows every live session (so it can kick one, shut all down, and ask them
//! to rebuild an actor); and when an account or room actor dies it starts a new generation and
//! feeds it the state reported by the live sessions.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::join_all;
use tokio::sync::oneshot;

use crate::account::{AccountActor, AccountSpec};
use crate::cluster::{Change, FromNode, RemoteChanges, Scope};
use crate::config::EngineConfig;
use crate::fanout::Scatter;
use crate::messages::{Crash, Report, ReportMembership, SessionAddr, Stall, ToSession};
use crate::metrics::Metrics;
use crate::presence::{IdGen, Key, SessionId};
use crate::protocol::Reason;
use crate::room::{Members, RoomActor, RoomSpec};
use crate::snapshot::Restore;
use crate::view::{RoomDirectory, View};

/// Which supervised actor died.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DownKind {
    Room { account: Arc<str>, room: Arc<str> },
    Account { account: Arc<str> },
}

/// Sent by a `DeathNotice` when its actor died without stopping on purpose.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ActorDown {
    pub kind: DownKind,
    pub gen: u64,
}

/// A new WebSocket session. For an end user's connection the reply is its account's actor,
/// started if needed; dashboards (staff) get `None` and follow accounts by topic.
#[derive(Message)]
#[rtype(result = "Result<Option<Addr<AccountActor>>, Reason>")]
pub struct RegisterSession {
    pub session: SessionId,
    pub account: Arc<str>,
    /// An end user's connection (counted in the account's presence), not a dashboard.
    pub connection: bool,
    pub user: Key,
    pub to: SessionAddr,
    pub report: Recipient<ReportMembership>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct UnregisterSession {
    pub session: SessionId,
}

/// The room actor for `(account, room)`, started if needed (within the account's room limit).
#[derive(Message)]
#[rtype(result = "Result<Addr<RoomActor>, Reason>")]
pub struct ResolveRoom {
    pub account: Arc<str>,
    pub room: Arc<str>,
}

/// How many rooms an account's plan allows; a join that would start one more is refused with
/// `plan_limit` (live rooms are never stopped by a lower limit).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPlanRooms {
    pub account: Arc<str>,
    pub max_rooms: usize,
}

/// Live rooms per account (for usage and plan alerts).
#[derive(Message)]
#[rtype(result = "HashMap<Arc<str>, usize>")]
pub struct RoomCounts;

/// The room actor if it is live; never starts one.
#[derive(Message)]
#[rtype(result = "Option<Addr<RoomActor>>")]
pub struct LookupRoom {
    pub account: Arc<str>,
    pub room: Arc<str>,
}

/// The account actor, started if needed (dashboards may follow an account nobody is in yet).
#[derive(Message)]
#[rtype(result = "Result<Addr<AccountActor>, Reason>")]
pub struct ResolveAccount {
    pub account: Arc<str>,
}

/// The account actor if it is live; never starts one.
#[derive(Message)]
#[rtype(result = "Option<Addr<AccountActor>>")]
pub struct LookupAccount {
    pub account: Arc<str>,
}

/// An idle room asks to stop; `true` means it was removed and may stop.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RoomIdle {
    pub account: Arc<str>,
    pub room: Arc<str>,
    pub gen: u64,
    /// Batches of remote changes the room has handled (see `Slot::routed`).
    pub remote_seen: u64,
}

/// Disconnect one session (an admin's kick). `account` scopes it: another account's session is
/// "not found".
#[derive(Message)]
#[rtype(result = "bool")]
pub struct KickSession {
    pub account: Arc<str>,
    pub session: SessionId,
}

/// Chaos hook: make a live room or account actor panic.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct CrashActor {
    pub kind: DownKind,
}

/// Chaos hook: make a live room or account actor hold its thread for `for_`
/// (`messages::Stall`), so that it misses whatever asks it meanwhile.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct StallActor {
    pub kind: DownKind,
    pub for_: std::time::Duration,
}

/// Graceful shutdown: every session is closed with 1001; the reply is how many were told.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Shutdown;

/// Start rooms on these threads from now on, round-robin (the server's socket threads, where
/// the sessions are), instead of the engine's arbiters. Accounts stay on the arbiters.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PlaceRooms {
    pub on: Vec<ArbiterHandle>,
}

/// Totals for `/metrics` and readiness.
#[derive(Message)]
#[rtype(result = "RegistryStats")]
pub struct Stats;

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct RegistryStats {
    pub sessions: usize,
    pub accounts: usize,
    pub rooms: usize,
    pub restarts: u64,
}

struct Slot<A: Actor> {
    addr: Addr<A>,
    gen: u64,
    /// Batches of remote changes sent to this actor: a room that has not seen them all is not
    /// idle, whatever it looked like when it asked.
    routed: u64,
}

struct SessionEntry {
    account: Arc<str>,
    /// An end user's connection (dashboards are not counted per account).
    connection: bool,
    to: SessionAddr,
    report: Recipient<ReportMembership>,
}

pub struct Registry {
    cfg: Arc<EngineConfig>,
    ids: Arc<IdGen>,
    metrics: Metrics,
    arbiters: Vec<Arbiter>,
    next_arbiter: usize,
    /// Where rooms start, if not on `arbiters` (`PlaceRooms`).
    room_threads: Vec<ArbiterHandle>,
    next_room_thread: usize,
    /// One per arbiter: where rooms on `room_threads` send their frames once large.
    scatters: Vec<Addr<Scatter>>,
    next_gen: u64,
    accounts: HashMap<Arc<str>, Slot<AccountActor>>,
    rooms: HashMap<(Arc<str>, Arc<str>), Slot<RoomActor>>,
    /// The live rooms' members, for readers outside the tree (`directory()`).
    directory: RoomDirectory,
    rooms_per_account: HashMap<Arc<str>, usize>,
    /// Rooms each account's plan allows (absent: only `limits.max_rooms_per_account`).
    plan_rooms: HashMap<Arc<str>, usize>,
    sessions: HashMap<SessionId, SessionEntry>,
    by_account: HashMap<Arc<str>, HashSet<SessionId>>,
    restarts: u64,
    shutting_down: bool,
}

impl Registry {
    pub fn new(cfg: Arc<EngineConfig>, ids: Arc<IdGen>, metrics: Metrics) -> Registry {
        Registry {
            cfg,
            ids,
            metrics,
            arbiters: Vec::new(),
            next_arbiter: 0,
            room_threads: Vec::new(),
            next_room_thread: 0,
            scatters: Vec::new(),
            next_gen: 1,
            accounts: HashMap::new(),
            rooms: HashMap::new(),
            directory: RoomDirectory::default(),
            rooms_per_account: HashMap::new(),
            plan_rooms: HashMap::new(),
            sessions: HashMap::new(),
            by_account: HashMap::new(),
            restarts: 0,
            shutting_down: false,
        }
    }

    /// Where HTTP reads a live room's members without asking the room (here-now), and where
    /// sessions find a live room to join without asking the registry. Take it before starting
    /// the registry.
    pub fn directory(&self) -> RoomDirectory {
        self.directory.clone()
    }

    fn arbiter(&mut self) -> ArbiterHandle {
        let i = self.next_arbiter % self.arbiters.len().max(1);
        self.next_arbiter = self.next_arbiter.wrapping_add(1);
        match self.arbiters.get(i) {
            Some(a) => a.handle(),
            None => Arbiter::current(),
        }
    }

    /// Where the next room runs, and the scatter it uses once large (only on `room_threads`:
    /// a room on an arbiter pushes its own frames from a thread of its own already).
    fn room_arbiter(&mut self) -> (ArbiterHandle, Option<Addr<Scatter>>) {
        if self.room_threads.is_empty() {
            return (self.arbiter(), None);
        }
        let i = self.next_room_thread;
        self.next_room_thread = self.next_room_thread.wrapping_add(1);
        (
            self.room_threads[i % self.room_threads.len()].clone(),
            (!self.scatters.is_empty()).then(|| self.scatters[i % self.scatters.len()].clone()),
        )
    }

    fn gen(&mut self) -> u64 {
        self.next_gen += 1;
        self.next_gen
    }

    fn start_account(
        &mut self,
        account: &Arc<str>,
        me: Addr<Registry>,
        recovery: Option<oneshot::Receiver<Vec<crate::messages::AccountMembership>>>,
    ) -> Addr<AccountActor> {
        let spec = AccountSpec {
            id: account.clone(),
            gen: self.gen(),
            ids: self.ids.clone(),
            cfg: self.cfg.clone(),
            metrics: self.metrics.clone(),
            registry: me,
            recovery,
        };
        let gen = spec.gen;
        let addr =
            AccountActor::start_in_arbiter(&self.arbiter(), move |_| AccountActor::new(spec));
        self.accounts.insert(
            account.clone(),
            Slot {
                addr: addr.clone(),
                gen,
                routed: 0,
            },
        );
        addr
    }

    fn ensure_account(&mut self, account: &Arc<str>, me: Addr<Registry>) -> Addr<AccountActor> {
        match self.accounts.get(account) {
            Some(s) if s.addr.connected() => s.addr.clone(),
            // It died and its `ActorDown` is still on its way: whoever finds it restarts it.
            Some(_) => self.restart_account(account, me),
            None => self.start_account(account, me, None),
        }
    }

    /// A new generation of a dead account actor, rebuilt from the live sessions' stakes. Its
    /// `ActorDown`, whenever it arrives, names the old generation and is ignored.
    fn restart_account(&mut self, account: &Arc<str>, me: Addr<Registry>) -> Addr<AccountActor> {
        self.restarts += 1;
        self.metrics.restarts.with_label_values(&["account"]).inc();
        log::warn!("account {account} died; restarting it from its live sessions");
        let (tx, rx) = oneshot::channel();
        let addr = self.start_account(account, me, Some(rx));
        self.collect(
            account,
            true,
            ReportMembership::Account {
                account: account.clone(),
                addr: addr.clone(),
            },
            |r| match r {
                Report::Account(m) => Some(m),
                _ => None,
            },
            tx,
        );
        addr
    }

    /// A new generation of a dead room actor, rebuilt from the live sessions' stakes (see
    /// `restart_account`).
    fn restart_room(
        &mut self,
        account: &Arc<str>,
        room: &Arc<str>,
        me: Addr<Registry>,
    ) -> Addr<RoomActor> {
        self.restarts += 1;
        self.metrics.restarts.with_label_values(&["room"]).inc();
        log::warn!("room {account}/{room} died; restarting it from its live sessions");
        let (tx, rx) = oneshot::channel();
        let addr = self.start_room(account, room, me, Some(rx));
        self.collect(
            account,
            false,
            ReportMembership::Room {
                room: room.clone(),
                addr: addr.clone(),
            },
            |r| match r {
                Report::Room(m) => Some(m),
                _ => None,
            },
            tx,
        );
        addr
    }

    fn start_room(
        &mut self,
        account: &Arc<str>,
        room: &Arc<str>,
        me: Addr<Registry>,
        recovery: Option<oneshot::Receiver<Vec<crate::messages::RoomMembership>>>,
    ) -> Addr<RoomActor> {
        let members = View::new(Members::new(recovery.is_none()));
        let (arbiter, scatter) = self.room_arbiter();
        let spec = RoomSpec {
            scatter,
            members: members.clone(),
            account: account.clone(),
            name: room.clone(),
            gen: self.gen(),
            ids: self.ids.clone(),
            cfg: self.cfg.clone(),
            metrics: self.metrics.clone(),
            registry: me,
            recovery,
        };
        let gen = spec.gen;
        let addr = RoomActor::start_in_arbiter(&arbiter, move |_| RoomActor::new(spec));
        self.directory
            .insert(account.clone(), room.clone(), members, addr.clone());
        self.rooms.insert(
            (account.clone(), room.clone()),
            Slot {
                addr: addr.clone(),
                gen,
                routed: 0,
            },
        );
        addr
    }

    /// The live room actor for `(account, room)`, or a new one within the account's room limit.
    fn ensure_room(
        &mut self,
        account: &Arc<str>,
        room: &Arc<str>,
        me: Addr<Registry>,
    ) -> Result<Addr<RoomActor>, Reason> {
        let key = (account.clone(), room.clone());
        if let Some(slot) = self.rooms.get(&key) {
            if slot.addr.connected() {
                return Ok(slot.addr.clone());
            }
            // It died and its `ActorDown` is still on its way: whoever finds it restarts it.
            return Ok(self.restart_room(account, room, me));
        }
        let count = self.rooms_per_account.get(account).copied().unwrap_or(0);
        // The node's own cap first: past it the plan does not matter.
        if count >= self.cfg.limits.max_rooms_per_account {
            return Err(Reason::RoomLimit);
        }
        if self
            .plan_rooms
            .get(account)
            .is_some_and(|max| count >= *max)
        {
            return Err(Reason::PlanLimit);
        }
        *self.rooms_per_account.entry(account.clone()).or_default() += 1;
        Ok(self.start_room(account, room, me, None))
    }

    /// Asks every live session of `account` for its stake, with a deadline, and hands the
    /// answers to the restarted actor.
    /// `everyone`: ask all sessions, not only the account's own (dashboards of staff follow
    /// accounts they do not belong to).
    fn collect<T: Send + 'static>(
        &self,
        account: &Arc<str>,
        everyone: bool,
        ask: ReportMembership,
        pick: fn(Report) -> Option<T>,
        tx: oneshot::Sender<Vec<T>>,
    ) {
        let targets: Vec<Recipient<ReportMembership>> = if everyone {
            self.sessions.values().map(|s| s.report.clone()).collect()
        } else {
            self.by_account
                .get(account)
                .map(|ids| {
                    ids.iter()
                        .filter_map(|id| self.sessions.get(id).map(|s| s.report.clone()))
                        .collect()
                })
                .unwrap_or_default()
        };
        let timeout = Duration::from_millis(self.cfg.recovery_timeout_ms);
        let fut = async move {
            let answers = join_all(
                targets
                    .iter()
                    .map(|r| tokio::time::timeout(timeout, r.send(ask.clone()))),
            )
            .await;
            let members: Vec<T> = answers
                .into_iter()
                .filter_map(|a| match a {
                    Ok(Ok(report)) => pick(report),
                    _ => None,
                })
                .collect();
            let _ = tx.send(members);
        };
        actix::spawn(fut);
    }
}

impl Actor for Registry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(64 * 1024);
        for _ in 0..self.cfg.arbiters.max(1) {
            let arbiter = Arbiter::new();
            let metrics = self.metrics.clone();
            self.scatters
                .push(Scatter::start_in_arbiter(&arbiter.handle(), move |_| {
                    Scatter::new(metrics)
                }));
            self.arbiters.push(arbiter);
        }
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for a in self.arbiters.drain(..) {
            a.stop();
        }
    }
}

impl Handler<RegisterSession> for Registry {
    type Result = Result<Option<Addr<AccountActor>>, Reason>;

    fn handle(&mut self, msg: RegisterSession, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Err(Reason::ServerShutdown);
        }
        let addr = msg
            .connection
            .then(|| self.ensure_account(&msg.account, ctx.address()));
        if msg.connection {
            self.metrics
                .sessions_by_account
                .with_label_values(&[&msg.account])
                .inc();
        }
        self.by_account
            .entry(msg.account.clone())
            .or_default()
            .insert(msg.session);
        self.sessions.insert(
            msg.session,
            SessionEntry {
                account: msg.account,
                connection: msg.connection,
                to: msg.to,
                report: msg.report,
            },
        );
        let _ = msg.user;
        Ok(addr)
    }
}

impl Handler<UnregisterSession> for Registry {
    type Result = ();

    fn handle(&mut self, msg: UnregisterSession, _: &mut Context<Self>) {
        if let Some(entry) = self.sessions.remove(&msg.session) {
            if entry.connection {
                self.metrics
                    .sessions_by_account
                    .with_label_values(&[&entry.account])
                    .dec();
            }
            if let Some(set) = self.by_account.get_mut(&entry.account) {
                set.remove(&msg.session);
                if set.is_empty() {
                    self.by_account.remove(&entry.account);
                    let _ = self
                        .metrics
                        .sessions_by_account
                        .remove_label_values(&[&entry.account]);
                }
            }
        }
    }
}

impl Handler<ResolveRoom> for Registry {
    type Result = Result<Addr<RoomActor>, Reason>;

    fn handle(&mut self, msg: ResolveRoom, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Err(Reason::ServerShutdown);
        }
        self.ensure_room(&msg.account, &msg.room, ctx.address())
    }
}

impl Handler<LookupRoom> for Registry {
    type Result = Option<Addr<RoomActor>>;

    fn handle(&mut self, msg: LookupRoom, _: &mut Context<Self>) -> Self::Result {
        self.rooms
            .get(&(msg.account, msg.room))
            .map(|s| s.addr.clone())
    }
}

impl Handler<LookupAccount> for Registry {
    type Result = Option<Addr<AccountActor>>;

    fn handle(&mut self, msg: LookupAccount, _: &mut Context<Self>) -> Self::Result {
        self.accounts
            .get(&msg.account)
            .filter(|s| s.addr.connected())
            .map(|s| s.addr.clone())
    }
}

impl Handler<ResolveAccount> for Registry {
    type Result = Result<Addr<AccountActor>, Reason>;

    fn handle(&mut self, msg: ResolveAccount, ctx: &mut Context<Self>) -> Self::Result {
        if self.shutting_down {
            return Err(Reason::ServerShutdown);
        }
        Ok(self.ensure_account(&msg.account, ctx.address()))
    }
}

impl Handler<RoomIdle> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: RoomIdle, _: &mut Context<Self>) -> bool {
        let key = (msg.account.clone(), msg.room);
        match self.rooms.get(&key) {
            Some(slot) if slot.gen == msg.gen && slot.routed == msg.remote_seen => {
                self.rooms.remove(&key);
                self.directory.remove(&key.0, &key.1);
                if let Some(n) = self.rooms_per_account.get_mut(&msg.account) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        self.rooms_per_account.remove(&msg.account);
                    }
                }
                true
            }
            _ => false,
        }
    }
}

impl Handler<ActorDown> for Registry {
    type Result = ();

    fn handle(&mut self, msg: ActorDown, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        match msg.kind {
            DownKind::Room { account, room } => {
                let key = (account.clone(), room.clone());
                // Another generation: this one was already restarted by whoever found it dead.
                if self.rooms.get(&key).map(|s| s.gen) != Some(msg.gen) {
                    return;
                }
                self.restart_room(&account, &room, ctx.address());
            }
            DownKind::Account { account } => {
                if self.accounts.get(&account).map(|s| s.gen) != Some(msg.gen) {
                    return;
                }
                self.restart_account(&account, ctx.address());
            }
        }
    }
}

impl Handler<FromNode> for Registry {
    type Result = ();

    /// Routes another node's changes to the rooms and accounts they concern, in order, one
    /// message per actor. A room that nobody on this node is in is started to mirror them
    /// (limits were checked by the owner); a room is never started for removals alone.
    fn handle(&mut self, msg: FromNode, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let mut order: Vec<Scope> = Vec::new();
        let mut by_scope: HashMap<Scope, Vec<Change>> = HashMap::new();
        for (scope, change) in msg.changes {
            let list = by_scope.entry(scope.clone()).or_insert_with(|| {
                order.push(scope);
                Vec::new()
            });
            list.push(change);
        }
        for scope in order {
            let Some(changes) = by_scope.remove(&scope) else {
                continue;
            };
            let batch = RemoteChanges {
                node: msg.node.clone(),
                changes,
                reason: msg.reason.clone(),
            };
            match scope {
                Scope::Account { account } => {
                    let addr = self.ensure_account(&account, ctx.address());
                    addr.do_send(batch);
                }
                Scope::Room { account, room } => {
                    let key = (account.clone(), room.clone());
                    match self.rooms.get(&key).map(|s| s.addr.connected()) {
                        Some(true) => {}
                        // Dead, its `ActorDown` still on its way.
                        Some(false) => {
                            self.restart_room(&account, &room, ctx.address());
                        }
                        None => {
                            let puts = batch
                                .changes
                                .iter()
                                .any(|c| matches!(c, Change::Put { .. }));
                            if !puts {
                                continue;
                            }
                            *self.rooms_per_account.entry(account.clone()).or_default() += 1;
                            self.start_room(&account, &room, ctx.address(), None);
                        }
                    }
                    if let Some(slot) = self.rooms.get_mut(&key) {
                        slot.routed += 1;
                        slot.addr.do_send(batch);
                    }
                }
            }
        }
    }
}

/// Every live account and room actor, for a snapshot.
#[derive(Message)]
#[rtype(result = "Targets")]
pub struct SnapshotTargets;

pub struct Targets {
    /// Each account's id and actor.
    pub accounts: Vec<(Arc<str>, Addr<AccountActor>)>,
    pub rooms: Vec<RoomTarget>,
}

pub struct RoomTarget {
    pub account: Arc<str>,
    pub room: Arc<str>,
    pub addr: Addr<RoomActor>,
    /// The room's members, readable without asking the room.
    pub members: Option<View<Members>>,
}

impl Handler<SnapshotTargets> for Registry {
    type Result = MessageResult<SnapshotTargets>;

    fn handle(&mut self, _: SnapshotTargets, _: &mut Context<Self>) -> Self::Result {
        MessageResult(Targets {
            accounts: self
                .accounts
                .iter()
                .map(|(id, s)| (id.clone(), s.addr.clone()))
                .collect(),
            rooms: self
                .rooms
                .iter()
                .map(|((account, room), s)| RoomTarget {
                    account: account.clone(),
                    room: room.clone(),
                    addr: s.addr.clone(),
                    members: self.directory.get(account, room),
                })
                .collect(),
        })
    }
}

impl Handler<Restore> for Registry {
    type Result = MessageResult<Restore>;

    fn handle(&mut self, msg: Restore, ctx: &mut Context<Self>) -> Self::Result {
        let ghosts = msg.sessions.len();
        let (accounts, rooms) = crate::snapshot::group(msg.sessions);
        for (account, restore) in accounts {
            self.ensure_account(&account, ctx.address())
                .do_send(restore);
        }
        let mut started = 0;
        for ((account, room), restore) in rooms {
            match self.ensure_room(&account, &room, ctx.address()) {
                Ok(addr) => {
                    started += 1;
                    addr.do_send(restore);
                }
                Err(reason) => log::warn!(
                    "restore: room {account}/{room} not restored ({}): its {} ghost(s) are dropped",
                    reason.as_str(),
                    restore.ghosts.len()
                ),
            }
        }
        MessageResult((ghosts, started))
    }
}

impl Handler<SetPlanRooms> for Registry {
    type Result = ();

    fn handle(&mut self, msg: SetPlanRooms, _: &mut Context<Self>) {
        self.plan_rooms.insert(msg.account, msg.max_rooms);
    }
}

impl Handler<RoomCounts> for Registry {
    type Result = MessageResult<RoomCounts>;

    fn handle(&mut self, _: RoomCounts, _: &mut Context<Self>) -> Self::Result {
        MessageResult(
            self.rooms_per_account
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(a, n)| (a.clone(), *n))
                .collect(),
        )
    }
}

impl Handler<KickSession> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: KickSession, _: &mut Context<Self>) -> bool {
        match self.sessions.get(&msg.session) {
            Some(s) if s.account == msg.account => {
                s.to.do_send(ToSession::Close {
                    reason: Reason::Kicked,
                });
                true
            }
            _ => false,
        }
    }
}

impl Registry {
    /// Sends a chaos message to the live room or account actor `kind` names; `false` if there
    /// is none or its mailbox is full.
    fn poke<M>(&self, kind: DownKind, msg: M) -> bool
    where
        M: Message<Result = ()> + Send + 'static,
        RoomActor: Handler<M>,
        AccountActor: Handler<M>,
    {
        match kind {
            DownKind::Room { account, room } => self
                .rooms
                .get(&(account, room))
                .is_some_and(|s| s.addr.try_send(msg).is_ok()),
            DownKind::Account { account } => self
                .accounts
                .get(&account)
                .is_some_and(|s| s.addr.try_send(msg).is_ok()),
        }
    }
}

impl Handler<CrashActor> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: CrashActor, _: &mut Context<Self>) -> bool {
        self.poke(msg.kind, Crash)
    }
}

impl Handler<StallActor> for Registry {
    type Result = bool;

    fn handle(&mut self, msg: StallActor, _: &mut Context<Self>) -> bool {
        self.poke(msg.kind, Stall(msg.for_))
    }
}

impl Handler<Shutdown> for Registry {
    type Result = usize;

    fn handle(&mut self, _: Shutdown, _: &mut Context<Self>) -> usize {
        self.shutting_down = true;
        self.directory.close();
        for s in self.sessions.values() {
            s.to.do_send(ToSession::Close {
                reason: Reason::ServerShutdown,
            });
        }
        self.sessions.len()
    }
}

impl Handler<PlaceRooms> for Registry {
    type Result = ();

    fn handle(&mut self, msg: PlaceRooms, _: &mut Context<Self>) {
        self.room_threads = msg.on;
    }
}

impl Handler<Stats> for Registry {
    type Result = MessageResult<Stats>;

    fn handle(&mut self, _: Stats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(RegistryStats {
            sessions: self.sessions.len(),
            accounts: self.accounts.len(),
            rooms: self.rooms.len(),
            restarts: self.restarts,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A registry (not started) whose rooms stop after `room_idle_ms` empty.
    fn registry(room_idle_ms: u64) -> Registry {
        let cfg = Arc::new(EngineConfig {
            room_idle_ms,
            ..EngineConfig::default()
        });
        let metrics = Metrics::new(&prometheus::Registry::new());
        Registry::new(cfg, Arc::new(IdGen::new()), metrics)
    }

    /// Waits (a few seconds at most) for a room to stop; whether it did.
    async fn stops(room: &Addr<RoomActor>) -> bool {
        for _ in 0..500 {
            if !room.connected() {
                return true;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    async fn resolve(registry: &Addr<Registry>, room: &str) -> Addr<RoomActor> {
        registry
            .send(ResolveRoom {
                account: "acc".into(),
                room: room.into(),
            })
            .await
            .expect("registry answers")
            .expect("room started")
    }

    /// A session joins a live room through the directory, without the registry; a room that
    /// stopped, or any room once the node shuts down, is not listed (the registry answers).
    #[actix_rt::test]
    async fn the_directory_lists_live_rooms_for_joins_until_they_stop_or_the_node_shuts_down() {
        let registry = registry(50);
        let directory = registry.directory();
        let registry = registry.start();
        assert!(
            directory.live_room("acc", "lobby").is_none(),
            "not started yet"
        );
        let lobby = resolve(&registry, "lobby").await;
        assert!(directory.live_room("acc", "lobby") == Some(lobby.clone()));
        assert!(
            directory.live_room("other", "lobby").is_none(),
            "rooms are per account"
        );
        // Nobody joined: the room stops once idle, and is no longer listed.
        assert!(stops(&lobby).await, "the idle room stopped");
        assert!(directory.live_room("acc", "lobby").is_none());
        let hall = resolve(&registry, "hall").await;
        assert!(directory.live_room("acc", "hall") == Some(hall.clone()));
        registry.send(Shutdown).await.expect("registry answers");
        assert!(
            directory.live_room("acc", "hall").is_none(),
            "joins go to the registry while shutting down"
        );
        assert!(
            directory.get("acc", "hall").is_some(),
            "here-now still reads it"
        );
        let refused = registry
            .send(ResolveRoom {
                account: "acc".into(),
                room: "hall".into(),
            })
            .await
            .expect("registry answers");
        assert_eq!(refused.err(), Some(Reason::ServerShutdown));
    }

    /// A session's stand-in: it takes frames and drops them, and reports a stake in whichever
    /// room it is asked about.
    pub(crate) struct Stake;

    impl Actor for Stake {
        type Context = Context<Self>;
    }

    impl Handler<ToSession> for Stake {
        type Result = ();

        fn handle(&mut self, _: ToSession, _: &mut Context<Self>) {}
    }

    impl Handler<ReportMembership> for Stake {
        type Result = Report;

        fn handle(&mut self, msg: ReportMembership, ctx: &mut Context<Self>) -> Report {
            match msg {
                ReportMembership::Room { .. } => Report::Room(crate::messages::RoomMembership {
                    user: "ann".into(),
                    meta: crate::presence::Meta {
                        phx_ref: crate::presence::Ref(1),
                        phx_ref_prev: None,
                        session: SessionId(1),
                        status: "online".into(),
                        online_at: 0,
                        device: None,
                        fields: Arc::default(),
                    },
                    to: ctx.address().recipient(),
                    lane: None,
                }),
                ReportMembership::Account { .. } => Report::None,
            }
        }
    }

    /// The address of an actor that is gone.
    fn dead<A: Actor>() -> Addr<A> {
        let (tx, rx) = actix::dev::channel::channel(1);
        drop(rx);
        Addr::new(tx)
    }

    /// Registers a connection of `user` to `account`, with a `Stake` for its session; the
    /// account the registry gives it.
    async fn connect(
        registry: &Addr<Registry>,
        session: u64,
        account: &str,
        user: &str,
    ) -> Option<Addr<AccountActor>> {
        let stake = Stake.start();
        registry
            .send(RegisterSession {
                session: SessionId(session),
                account: account.into(),
                connection: true,
                user: user.into(),
                to: stake.clone().recipient(),
                report: stake.recipient(),
            })
            .await
            .expect("registry answers")
            .expect("registered")
    }

    /// What a crash leaves in the registry until its notice arrives: the slot, with a dead
    /// address.
    fn dead_slot<A: Actor>(gen: u64) -> Slot<A> {
        Slot {
            addr: dead(),
            gen,
            routed: 0,
        }
    }

    /// Account `acc` and its room `lobby`, both crashed (dead slots of these generations).
    fn dead_account_and_room(registry: &mut Registry, account_gen: u64, room_gen: u64) {
        let (account, room): (Arc<str>, Arc<str>) = ("acc".into(), "lobby".into());
        registry
            .rooms
            .insert((account.clone(), room), dead_slot(room_gen));
        registry.rooms_per_account.insert(account.clone(), 1);
        registry.accounts.insert(account, dead_slot(account_gen));
    }

    /// A snapshot names the actors that did not answer it, so that a writer does not take
    /// their sessions for gone: here an account and a room (one being rebuilt, so asked) whose
    /// actors are dead, beside a live account that answers.
    #[actix_rt::test]
    async fn a_snapshot_names_the_actors_it_missed() {
        let mut registry = registry(60_000);
        dead_account_and_room(&mut registry, 1, 1);
        let registry = registry.start();
        connect(&registry, 2, "other", "bob").await;

        let snap = crate::snapshot::collect(
            &registry,
            Duration::from_millis(500),
            crate::snapshot::Departures::Take,
        )
        .await
        .expect("registry answers");
        let missed: Vec<&str> = snap.missed_accounts.iter().map(|m| &*m.account).collect();
        assert_eq!(missed, ["acc"]);
        assert_eq!(snap.missed_rooms, [("acc".into(), "lobby".into())]);
        assert_eq!(snap.missed(), 2);
        let answered: Vec<&str> = snap.accounts.iter().map(|a| &*a.account).collect();
        assert_eq!(answered, ["other"]);
    }

    /// An actor that died and whose `ActorDown` has not reached the registry yet is restarted
    /// the supervisor's way by whoever finds it first (here a join): rebuilt from the live
    /// sessions' stakes, and the late `ActorDown` restarts nothing more.
    #[actix_rt::test]
    async fn an_actor_found_dead_before_its_down_notice_is_restarted_with_its_members() {
        let mut registry = registry(60_000);
        let directory = registry.directory();
        dead_account_and_room(&mut registry, 8, 7);
        let (account, room): (Arc<str>, Arc<str>) = ("acc".into(), "lobby".into());
        let registry = registry.start();
        let account_addr = connect(&registry, 1, &account, "ann")
            .await
            .expect("a connection's account");
        assert!(account_addr.connected(), "the dead account was restarted");

        let lobby = resolve(&registry, "lobby").await;
        assert!(lobby.connected());
        let members = directory.get("acc", "lobby").expect("listed");
        for _ in 0..500 {
            if members.read().is_ready() {
                break;
            }
            actix_rt::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(members.read().is_ready(), "the room was rebuilt");
        assert_eq!(members.read().counts(), (1, 1), "with ann's stake");

        // The notices arrive late: both name generations that are already replaced.
        for (kind, gen) in [
            (
                DownKind::Room {
                    account: account.clone(),
                    room: room.clone(),
                },
                7,
            ),
            (
                DownKind::Account {
                    account: account.clone(),
                },
                8,
            ),
        ] {
            registry
                .send(ActorDown { kind, gen })
                .await
                .expect("registry answers");
        }
        let stats = registry.send(Stats).await.expect("registry answers");
        assert_eq!(stats.restarts, 2, "one restart each, not two");
        assert_eq!(
            stats.rooms, 1,
            "the replacement took the slot, not a new room"
        );
        assert!(directory.live_room("acc", "lobby") == Some(lobby));
    }

    /// A room started after `PlaceRooms` runs on the thread it names: it dies with that thread,
    /// while one started before stays on the engine's arbiters.
    #[actix_rt::test]
    async fn rooms_start_where_they_are_placed_and_die_with_that_thread() {
        let registry = registry(60_000).start();
        let before = resolve(&registry, "before").await;
        let thread = Arbiter::new();
        registry
            .send(PlaceRooms {
                on: vec![thread.handle()],
            })
            .await
            .expect("registry answers");
        let placed = resolve(&registry, "placed").await;
        assert!(placed.connected());
        thread.stop();
        assert!(stops(&placed).await, "the room ran on the stopped thread");
        assert!(before.connected(), "the earlier room is on an arbiter");
    }
}
