//! Cluster mode over Redis: many nodes, one presence.
//!
//! Redis is used as the engine it is, with no consensus of our own:
//! - **Ownership.** Each node owns the entries of its own sessions and is the only writer of its
//!   state hash `<prefix>:state:<node>` (see `wire`).
//! - **Deltas.** Every `cluster.tick_ms` the node drains the tree's outbox, coalesces it (one
//!   change per entry, so the cost on Redis grows with ticks, not events) and, in one MULTI,
//!   updates its hash, bumps `__seq` and PUBLISHes the delta on `<prefix>:bus`.
//! - **Gaps.** A receiver applies a peer's deltas in seq order. A missing seq, an unknown peer
//!   or a new epoch makes it reload the peer's hash (which carries the seq it reflects). A quiet
//!   peer whose `__seq` stays ahead of the mirror for two checks is reloaded too.
//! - **Leases.** Each node SETs `<prefix>:lease:<node>` = its epoch with a PX a little under
//!   `cluster.node_ttl_ms`, every heartbeat, and is listed in `<prefix>:nodes`. A peer whose
//!   lease is gone is down: its entries leave on this node with `reason: "node_down"`. A node
//!   that restarts while its lease lives reads its own old hash and restores those sessions as
//!   ghosts with the same refs, so nobody sees a flap.
//! - **Outage.** When Redis goes away the node keeps serving its own presence, says so in
//!   `/readyz` and the logs, keeps its peers' entries for one TTL (they may well be alive), then
//!   drops them as `node_down`. When Redis returns it rewrites its whole state, announces it,
//!   and reloads every peer's: all nodes converge without restarts.

pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts};
use redis::aio::{MultiplexedConnection, PubSubStream};
use redis::AsyncConnectionConfig;
use serde_json::{json, Value};

use presence_actors::cluster::{Change, FromNode, NodeId, Outbox, Request, Scope};
use presence_actors::now_ms;
use presence_actors::presence::SessionId;
use presence_actors::registry::{KickSession, Registry};
use presence_actors::snapshot::{self, Restore, RestoredSession};

use wire::{Bus, Fit, Held, Peer, WireEntry, EPOCH_FIELD, SEQ_FIELD};

/// How long one Redis command may take before the connection counts as down.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between reconnection attempts while Redis is away.
const RETRY: Duration = Duration::from_millis(500);
/// After a full state that some actor did not answer for, the first wait before writing it
/// again, and the longest (the wait doubles while they still do not answer).
const REWRITE_FIRST: Duration = Duration::from_secs(1);
const REWRITE_MAX: Duration = Duration::from_secs(60);

/// What a node needs to join a cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub url: String,
    /// Every key and the channel start with it, so clusters (and tests) can share one Redis.
    pub prefix: String,
    pub node: NodeId,
    pub node_ttl: Duration,
    pub tick: Duration,
    pub grace_ms: i64,
}

impl ClusterConfig {
    pub fn from_settings(s: &crate::config::Settings) -> Option<ClusterConfig> {
        let url = s.redis.url.clone()?;
        Some(ClusterConfig {
            url,
            prefix: s.redis.prefix.clone(),
            node: s.node_id().into(),
            node_ttl: Duration::from_millis(s.cluster.node_ttl_ms),
            tick: Duration::from_millis(s.cluster.tick_ms),
            grace_ms: s.presence.grace_ms as i64,
        })
    }

    /// How often peers' leases are checked.
    fn check_every(&self) -> Duration {
        (self.node_ttl / 20).clamp(Duration::from_millis(50), Duration::from_millis(500))
    }

    /// How often this node renews its lease.
    fn heartbeat(&self) -> Duration {
        (self.node_ttl / 10).clamp(Duration::from_millis(100), Duration::from_millis(1000))
    }

    /// The lease's lifetime: short enough that a dead node is noticed within the TTL (its lease
    /// must be seen missing for a heartbeat, by checks a check apart), long enough to survive
    /// several missed heartbeats.
    fn lease(&self) -> Duration {
        self.node_ttl
            .saturating_sub(self.check_every() * 2 + self.heartbeat())
    }

    fn state_key(&self, node: &str) -> String {
        format!("{}:state:{node}", self.prefix)
    }

    fn lease_key(&self, node: &str) -> String {
        format!("{}:lease:{node}", self.prefix)
    }

    fn nodes_key(&self) -> String {
        format!("{}:nodes", self.prefix)
    }

    fn bus(&self) -> String {
        format!("{}:bus", self.prefix)
    }
}

/// Prometheus figures of the cluster layer.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub redis_up: IntGauge,
    pub nodes: IntGauge,
    pub sessions: IntGaugeVec,
    pub deltas_out: IntCounter,
    pub changes_out: IntCounter,
    pub deltas_in: IntCounter,
    pub changes_in: IntCounter,
    pub commands: IntCounter,
    pub resyncs: IntCounterVec,
    pub nodes_down: IntCounter,
    pub partial_states: IntCounter,
}

impl ClusterMetrics {
    fn new(r: &prometheus::Registry) -> ClusterMetrics {
        fn reg<C: prometheus::core::Collector + Clone + 'static>(
            r: &prometheus::Registry,
            c: C,
        ) -> C {
            let _ = r.register(Box::new(c.clone()));
            c
        }
        let c = |n: &str, h: &str| reg(r, IntCounter::new(n, h).expect("valid metric"));
        ClusterMetrics {
            redis_up: reg(
                r,
                IntGauge::new("presenced_cluster_redis_up", "1 while Redis is reachable")
                    .expect("valid metric"),
            ),
            nodes: reg(
                r,
                IntGauge::new(
                    "presenced_cluster_nodes",
                    "Nodes this node sees alive, itself included",
                )
                .expect("valid metric"),
            ),
            sessions: reg(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "presenced_cluster_sessions",
                        "End-user connections per node, as this node sees the cluster",
                    ),
                    &["node"],
                )
                .expect("valid metric"),
            ),
            deltas_out: c(
                "presenced_cluster_deltas_published_total",
                "Deltas published",
            ),
            changes_out: c(
                "presenced_cluster_changes_published_total",
                "Entry changes published (after coalescing)",
            ),
            deltas_in: c(
                "presenced_cluster_deltas_received_total",
                "Peers' deltas applied",
            ),
            changes_in: c(
                "presenced_cluster_changes_received_total",
                "Peers' entry changes that reached the actor tree",
            ),
            commands: c(
                "presenced_cluster_redis_commands_total",
                "Redis commands sent (MULTI and EXEC included)",
            ),
            resyncs: reg(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "presenced_cluster_resyncs_total",
                        "Peer states reloaded, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            nodes_down: c(
                "presenced_cluster_nodes_down_total",
                "Peers declared down (lease gone, or Redis away for a TTL)",
            ),
            partial_states: c(
                "presenced_cluster_partial_states_total",
                "Full states written while some account or room did not answer (their entries kept as they were, the state written again later)",
            ),
        }
    }
}

/// What `/readyz` and the API see of the cluster.
pub struct ClusterStatus {
    pub node: NodeId,
    up: AtomicBool,
    error: Mutex<Option<String>>,
    peers: Mutex<Vec<(String, usize)>>,
    pub metrics: ClusterMetrics,
}

impl ClusterStatus {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn json(&self) -> Value {
        let peers: Vec<Value> = self
            .peers
            .lock()
            .map(|p| {
                p.iter()
                    .map(|(n, s)| json!({ "node": n, "sessions": s }))
                    .collect()
            })
            .unwrap_or_default();
        let error = self.error.lock().ok().and_then(|e| e.clone());
        json!({
            "status": if self.is_up() { "up" } else { "down" },
            "node": &*self.node,
            "peers": peers,
            "error": error,
        })
    }

    fn set_up(&self, up: bool, error: Option<String>) {
        self.up.store(up, Ordering::Relaxed);
        self.metrics.redis_up.set(up as i64);
        if let Ok(mut e) = self.error.lock() {
            *e = error;
        }
    }
}

/// A running cluster membership.
#[derive(Clone)]
pub struct Cluster {
    pub status: Arc<ClusterStatus>,
    pub outbox: Arc<Outbox>,
}

impl Cluster {
    /// Joins the cluster: when Redis answers and this node's lease from a previous run is
    /// still alive, its sessions come back as ghosts (the reply's `true`: the database snapshot
    /// is then older and is not restored). Then the driver starts on `arbiter`. Redis being
    /// away is not an error: the node serves alone and joins when it returns.
    pub async fn start(
        cfg: ClusterConfig,
        outbox: Arc<Outbox>,
        registry: Addr<Registry>,
        prometheus: &prometheus::Registry,
        arbiter: &ArbiterHandle,
    ) -> Result<(Cluster, bool), String> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(|e| e.to_string())?;
        let status = Arc::new(ClusterStatus {
            node: cfg.node.clone(),
            up: AtomicBool::new(false),
            error: Mutex::new(None),
            peers: Mutex::new(Vec::new()),
            metrics: ClusterMetrics::new(prometheus),
        });
        let restored = match restore_own(&cfg, &client, &registry).await {
            Ok(n) => n,
            Err(e) => {
                log::warn!(
                    "cluster: Redis unreachable at start-up ({e}); serving alone until it answers"
                );
                false
            }
        };
        let driver = Driver {
            cfg,
            client,
            registry,
            outbox: outbox.clone(),
            status: status.clone(),
            epoch: rand::random::<u64>() >> 12,
            seq: 0,
            peers: HashMap::new(),
            own_sessions: HashSet::new(),
            ahead: HashMap::new(),
            missing: HashMap::new(),
            down_since: None,
            up_since: Instant::now(),
            rewrite: None,
        };
        arbiter.spawn(driver.run());
        Ok((Cluster { status, outbox }, restored))
    }

    /// Asks the node that owns `session` to close it.
    pub fn kick(&self, node: NodeId, account: &str, session: SessionId) {
        self.outbox.request(Request::Kick {
            node,
            account: account.into(),
            session,
        });
    }
}

async fn connection(client: &redis::Client) -> redis::RedisResult<MultiplexedConnection> {
    let cfg = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// Reads this node's previous state if its lease is still alive and restores it as ghosts.
async fn restore_own(
    cfg: &ClusterConfig,
    client: &redis::Client,
    registry: &Addr<Registry>,
) -> Result<bool, String> {
    let mut conn = connection(client).await.map_err(|e| e.to_string())?;
    let lease: Option<String> = redis::cmd("GET")
        .arg(cfg.lease_key(&cfg.node))
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    if lease.is_none() {
        return Ok(false);
    }
    let raw: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(cfg.state_key(&cfg.node))
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let Some((_, _, entries)) = wire::parse_state(raw) else {
        return Ok(false);
    };
    let until = now_ms() + cfg.grace_ms;
    let mut sessions: HashMap<SessionId, RestoredSession> = HashMap::new();
    let mut rooms: Vec<(SessionId, Arc<str>, Held)> = Vec::new();
    for (k, held) in entries {
        let Some((scope, session)) = wire::parse_field(&k) else {
            continue;
        };
        match scope {
            Scope::Account { account } => {
                sessions.insert(
                    session,
                    RestoredSession {
                        account,
                        user: held.user,
                        meta: held.meta,
                        until,
                        rooms: Vec::new(),
                    },
                );
            }
            Scope::Room { room, .. } => rooms.push((session, room, held)),
        }
    }
    for (session, room, held) in rooms {
        if let Some(s) = sessions.get_mut(&session) {
            s.rooms.push((room, held.meta, until));
        }
    }
    let n = sessions.len();
    let (ghosts, started) = registry
        .send(Restore {
            sessions: sessions.into_values().collect(),
        })
        .await
        .map_err(|e| e.to_string())?;
    log::info!(
        "cluster: node {} restarted within its lease: restored {ghosts} of {n} sessions in {started} rooms from Redis; they stay present for {} ms unless they reconnect",
        cfg.node,
        cfg.grace_ms
    );
    Ok(true)
}

struct Driver {
    cfg: ClusterConfig,
    client: redis::Client,
    registry: Addr<Registry>,
    outbox: Arc<Outbox>,
    status: Arc<ClusterStatus>,
    epoch: u64,
    seq: u64,
    peers: HashMap<NodeId, Peer>,
    /// Fields of this node's own connections (for the per-node session count).
    own_sessions: HashSet<String>,
    /// Peers whose `__seq` was ahead of the mirror at the last check, and by how much.
    ahead: HashMap<NodeId, u64>,
    /// Peers whose lease was missing at a check, since when: one heartbeat later they are down
    /// (a lease Redis lost is renewed by a live peer within a heartbeat).
    missing: HashMap<NodeId, Instant>,
    /// Set while Redis is away.
    down_since: Option<Instant>,
    /// When the current connection came up.
    up_since: Instant,
    /// Set after a full state that left out actors that did not answer: when to write the
    /// whole state again, and the wait that led there.
    rewrite: Option<(Instant, Duration)>,
}

type Failure = String;

impl Driver {
    async fn run(mut self) {
        loop {
            match self.connect().await {
                Ok((conn, stream)) => {
                    let was_down = self.down_since.take();
                    self.up_since = Instant::now();
                    self.status.set_up(true, None);
                    if let Some(since) = was_down {
                        log::info!(
                            "cluster: Redis reachable (after {} ms); resyncing node {}",
                            since.elapsed().as_millis(),
                            self.cfg.node
                        );
                    }
                    let err = self.serve(conn, stream).await;
                    log::error!(
                        "cluster: Redis lost ({err}); node {} serves its own presence and keeps its peers' for {} ms",
                        self.cfg.node,
                        self.cfg.node_ttl.as_millis()
                    );
                    self.status.set_up(false, Some(err));
                    self.down_since = Some(Instant::now());
                }
                Err(e) => {
                    if self
                        .status
                        .error
                        .lock()
                        .map(|x| x.is_none())
                        .unwrap_or(true)
                    {
                        log::warn!("cluster: cannot reach Redis: {e}");
                    }
                    self.status.set_up(false, Some(e));
                }
            }
            self.while_down().await;
        }
    }

    async fn connect(&self) -> Result<(MultiplexedConnection, PubSubStream), Failure> {
        let conn = connection(&self.client).await.map_err(|e| e.to_string())?;
        let mut pubsub = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub())
            .await
            .map_err(|_| "timed out connecting".to_string())?
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(COMMAND_TIMEOUT, pubsub.subscribe(self.cfg.bus()))
            .await
            .map_err(|_| "timed out subscribing".to_string())?
            .map_err(|e| e.to_string())?;
        Ok((conn, pubsub.into_on_message()))
    }

    /// While Redis is away: local changes are dropped (the full state is rewritten on return),
    /// requests are served locally, and after one TTL the peers' entries go.
    async fn while_down(&mut self) {
        let until = Instant::now() + RETRY;
        while Instant::now() < until {
            tokio::time::sleep(self.cfg.tick).await;
            let pending = self.outbox.take();
            for r in pending.requests {
                self.local_request(r);
            }
            let away = self.down_since.map(|t| t.elapsed()).unwrap_or_default();
            if away >= self.cfg.node_ttl && !self.peers.is_empty() {
                let names: Vec<NodeId> = self.peers.keys().cloned().collect();
                log::warn!(
                    "cluster: Redis away for {} ms: dropping the presence of {} peer(s)",
                    away.as_millis(),
                    names.len()
                );
                for n in names {
                    self.node_down(&n);
                }
            }
        }
    }

    /// Requests that need no Redis: refills from the mirror, kicks of local sessions.
    fn local_request(&mut self, r: Request) {
        match r {
            Request::Refill(scope) => {
                for (node, peer) in &self.peers {
                    let changes = peer.refill(&scope);
                    if !changes.is_empty() {
                        self.registry.do_send(FromNode {
                            node: node.clone(),
                            changes,
                            reason: None,
                        });
                    }
                }
            }
            Request::Kick {
                node,
                account,
                session,
            } => {
                if node == self.cfg.node {
                    self.registry.do_send(KickSession { account, session });
                }
            }
        }
    }

    async fn serve(
        &mut self,
        mut conn: MultiplexedConnection,
        mut stream: PubSubStream,
    ) -> Failure {
        if let Err(e) = self.publish_all(&mut conn).await {
            return e;
        }
        if let Err(e) = self.load_peers(&mut conn).await {
            return e;
        }
        let mut tick = tokio::time::interval(self.cfg.tick);
        let mut beat = tokio::time::interval(self.cfg.heartbeat());
        let mut check = tokio::time::interval(self.cfg.check_every());
        for t in [&mut tick, &mut beat, &mut check] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        loop {
            let rewrite_at = self.rewrite.map(|(at, _)| at).unwrap_or_else(Instant::now);
            let res = tokio::select! {
                _ = tokio::time::sleep_until(rewrite_at.into()), if self.rewrite.is_some() => {
                    self.publish_all(&mut conn).await
                }
                _ = tick.tick() => self.flush(&mut conn).await,
                _ = beat.tick() => self.heartbeat(&mut conn).await,
                _ = check.tick() => self.check(&mut conn).await,
                msg = stream.next() => match msg {
                    Some(m) => self.receive(&mut conn, m.get_payload_bytes()).await,
                    None => Err("subscription closed".to_string()),
                },
            };
            if let Err(e) = res {
                return e;
            }
        }
    }

    async fn exec(
        &self,
        conn: &mut MultiplexedConnection,
        pipe: &redis::Pipeline,
    ) -> Result<(), Failure> {
        let n = pipe.cmd_iter().count() as u64 + 2;
        self.status.metrics.commands.inc_by(n);
        let _: redis::Value = pipe.query_async(conn).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    fn lease_cmd(&self, pipe: &mut redis::Pipeline) {
        pipe.cmd("SET")
            .arg(self.cfg.lease_key(&self.cfg.node))
            .arg(self.epoch)
            .arg("PX")
            .arg(self.cfg.lease().as_millis() as u64)
            .ignore();
        pipe.cmd("SADD")
            .arg(self.cfg.nodes_key())
            .arg(&*self.cfg.node)
            .ignore();
        // The state outlives the lease a little, so a restart within the lease finds it.
        pipe.cmd("PEXPIRE")
            .arg(self.cfg.state_key(&self.cfg.node))
            .arg(self.cfg.node_ttl.as_millis() as u64 * 2)
            .ignore();
    }

    /// Writes this node's whole state (its hash replaced in one MULTI) and says hello.
    ///
    /// An account or room that does not answer in time is not taken for empty: what the hash
    /// holds of it stays as it was (it may be a little old, or missing if Redis lost the
    /// keys), and the whole state is written again a little later, until every actor answers.
    async fn publish_all(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Failure> {
        let pending = self.outbox.take();
        // The departures are the persistence writer's: leave them with the accounts.
        let snap = snapshot::collect(
            &self.registry,
            Duration::from_secs(2),
            snapshot::Departures::Leave,
        )
        .await
        .map_err(|e| format!("snapshot: {e}"))?;
        let mut rooms_of: HashMap<SessionId, Vec<Arc<str>>> = HashMap::new();
        for r in &snap.rooms {
            for (_, m, _) in &r.members {
                rooms_of.entry(m.session).or_default().push(r.room.clone());
            }
        }
        let mut fields: Vec<(String, String)> = Vec::new();
        self.own_sessions.clear();
        for a in &snap.accounts {
            let scope = Scope::Account {
                account: a.account.clone(),
            };
            for (user, meta, _) in &a.connections {
                let rooms = rooms_of.get(&meta.session).cloned().unwrap_or_default();
                let k = wire::field(&scope, meta.session);
                self.own_sessions.insert(k.clone());
                let v = WireEntry::from_parts(user, meta, &rooms);
                fields.push((k, serde_json::to_string(&v).unwrap_or_default()));
            }
        }
        for r in &snap.rooms {
            let scope = Scope::Room {
                account: r.account.clone(),
                room: r.room.clone(),
            };
            for (user, meta, _) in &r.members {
                let v = WireEntry::from_parts(user, meta, &[]);
                fields.push((
                    wire::field(&scope, meta.session),
                    serde_json::to_string(&v).unwrap_or_default(),
                ));
            }
        }
        let key = self.cfg.state_key(&self.cfg.node);
        let mut pipe = redis::pipe();
        pipe.atomic();
        if snap.missed() == 0 {
            pipe.cmd("DEL").arg(&key).ignore();
            self.rewrite = None;
        } else {
            let old: Vec<String> = redis::cmd("HKEYS")
                .arg(&key)
                .query_async(conn)
                .await
                .map_err(|e| e.to_string())?;
            self.status.metrics.commands.inc();
            let stale = self.keep_missed(&snap, old, &fields);
            for chunk in stale.chunks(1000) {
                pipe.cmd("HDEL").arg(&key).arg(chunk).ignore();
            }
            let wait = match self.rewrite {
                Some((_, w)) => (w * 2).min(REWRITE_MAX),
                None => REWRITE_FIRST,
            };
            self.rewrite = Some((Instant::now() + wait, wait));
            self.status.metrics.partial_states.inc();
            log::warn!(
                "cluster: {} account(s) and {} room(s) did not answer for the full state; their entries stay as they were, and the state is written again in {} ms",
                snap.missed_accounts.len(),
                snap.missed_rooms.len(),
                wait.as_millis()
            );
        }
        self.seq += 1;
        pipe.cmd("HSET")
            .arg(&key)
            .arg(EPOCH_FIELD)
            .arg(self.epoch)
            .arg(SEQ_FIELD)
            .arg(self.seq)
            .ignore();
        for chunk in fields.chunks(1000) {
            pipe.cmd("HSET").arg(&key).arg(chunk).ignore();
        }
        self.lease_cmd(&mut pipe);
        let hello = Bus::Hello {
            n: self.cfg.node.to_string(),
            e: self.epoch,
            s: self.seq,
        };
        pipe.cmd("PUBLISH")
            .arg(self.cfg.bus())
            .arg(serde_json::to_string(&hello).unwrap_or_default())
            .ignore();
        self.exec(conn, &pipe).await?;
        self.status
            .metrics
            .sessions
            .with_label_values(&[&*self.cfg.node])
            .set(self.own_sessions.len() as i64);
        log::info!(
            "cluster: node {} (epoch {:x}) wrote its state: {} entries",
            self.cfg.node,
            self.epoch,
            fields.len()
        );
        for r in pending.requests {
            self.request(conn, r).await?;
        }
        Ok(())
    }

    /// Of the fields the hash holds (`old`), those to delete before `fresh` is written: the
    /// ones neither in `fresh` nor of an actor `snap` missed. The missed accounts' connections
    /// that stay are counted as this node's sessions.
    fn keep_missed(
        &mut self,
        snap: &snapshot::EngineSnapshot,
        old: Vec<String>,
        fresh: &[(String, String)],
    ) -> Vec<String> {
        let fresh: HashSet<&str> = fresh.iter().map(|(k, _)| k.as_str()).collect();
        let missed = snap.missed_set();
        let mut stale = Vec::new();
        for f in old {
            if fresh.contains(f.as_str()) {
                continue;
            }
            match wire::parse_field(&f) {
                Some((Scope::Account { account }, _)) if missed.account(&account) => {
                    self.own_sessions.insert(f);
                }
                Some((Scope::Room { account, room }, _)) if missed.room(&account, &room) => {}
                // `__epoch` and `__seq` are written again below.
                _ => stale.push(f),
            }
        }
        stale
    }

    /// The other nodes in the cluster's member set (one command, counted).
    async fn other_members(
        &self,
        conn: &mut MultiplexedConnection,
    ) -> Result<Vec<NodeId>, Failure> {
        let members: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.cfg.nodes_key())
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        self.status.metrics.commands.inc();
        Ok(members
            .iter()
            .filter(|n| **n != *self.cfg.node)
            .map(|n| n.as_str().into())
            .collect())
    }

    /// Reads every live peer's state.
    async fn load_peers(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Failure> {
        for n in self.other_members(conn).await? {
            self.resync(conn, &n, "reconnect").await?;
        }
        self.publish_status();
        Ok(())
    }

    async fn request(
        &mut self,
        conn: &mut MultiplexedConnection,
        r: Request,
    ) -> Result<(), Failure> {
        match r {
            Request::Kick {
                node,
                account,
                session,
            } if node != self.cfg.node => {
                let msg = Bus::Kick {
                    n: node.to_string(),
                    a: account.to_string(),
                    x: session.to_string(),
                };
                let mut pipe = redis::pipe();
                pipe.cmd("PUBLISH")
                    .arg(self.cfg.bus())
                    .arg(serde_json::to_string(&msg).unwrap_or_default())
                    .ignore();
                self.exec(conn, &pipe).await
            }
            other => {
                self.local_request(other);
                Ok(())
            }
        }
    }

    /// One tick: this node's changes since the last, as one delta.
    async fn flush(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Failure> {
        let pending = self.outbox.take();
        for r in pending.requests {
            self.request(conn, r).await?;
        }
        if pending.changes.is_empty() {
            return Ok(());
        }
        let changes = wire::coalesce(pending.changes);
        if changes.is_empty() {
            return Ok(());
        }
        let key = self.cfg.state_key(&self.cfg.node);
        let mut puts: Vec<(&str, String)> = Vec::new();
        let mut dels: Vec<&str> = Vec::new();
        for c in &changes {
            match c {
                wire::WireChange::Put { k, v } => {
                    if wire::parse_field(k).is_some_and(|(s, _)| s.room().is_none()) {
                        self.own_sessions.insert(k.clone());
                    }
                    puts.push((k, serde_json::to_string(v).unwrap_or_default()));
                }
                wire::WireChange::Gone { k, .. } => {
                    self.own_sessions.remove(k);
                    dels.push(k);
                }
                wire::WireChange::Cast { .. } => {}
            }
        }
        self.seq += 1;
        let mut pipe = redis::pipe();
        pipe.atomic();
        if !puts.is_empty() {
            pipe.cmd("HSET").arg(&key).arg(&puts).ignore();
        }
        if !dels.is_empty() {
            pipe.cmd("HDEL").arg(&key).arg(&dels).ignore();
        }
        pipe.cmd("HSET")
            .arg(&key)
            .arg(SEQ_FIELD)
            .arg(self.seq)
            .ignore();
        let n = changes.len() as u64;
        let delta = Bus::Delta {
            n: self.cfg.node.to_string(),
            e: self.epoch,
            s: self.seq,
            c: changes,
        };
        pipe.cmd("PUBLISH")
            .arg(self.cfg.bus())
            .arg(serde_json::to_string(&delta).unwrap_or_default())
            .ignore();
        self.exec(conn, &pipe).await?;
        self.status.metrics.deltas_out.inc();
        self.status.metrics.changes_out.inc_by(n);
        self.status
            .metrics
            .sessions
            .with_label_values(&[&*self.cfg.node])
            .set(self.own_sessions.len() as i64);
        Ok(())
    }

    /// Renews the lease. Its previous value tells two things: gone means Redis lost this node's
    /// keys without dropping the connection (a FLUSHALL): the state is rewritten from scratch;
    /// another epoch means a second process runs with this `cluster.node_id`.
    async fn heartbeat(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Failure> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.cfg.lease_key(&self.cfg.node))
            .arg(self.epoch)
            .arg("PX")
            .arg(self.cfg.lease().as_millis() as u64)
            .arg("GET");
        self.lease_cmd(&mut pipe);
        // Not atomic: independent idempotent writes.
        let n = pipe.cmd_iter().count() as u64;
        self.status.metrics.commands.inc_by(n);
        let (previous,): (Option<String>,) =
            pipe.query_async(conn).await.map_err(|e| e.to_string())?;
        match previous {
            None => {
                log::warn!("cluster: this node's lease was gone from Redis; rewriting its state");
                self.publish_all(conn).await
            }
            Some(e) if e != self.epoch.to_string() => {
                log::error!(
                    "cluster: another process uses cluster.node_id {:?} (its epoch {e}, ours {}): give every node its own id",
                    self.cfg.node,
                    self.epoch
                );
                Ok(())
            }
            Some(_) => Ok(()),
        }
    }

    /// Leases and sequence numbers of every peer, in one round trip: the dead go, the
    /// restarted and the lagging are reloaded.
    async fn check(&mut self, conn: &mut MultiplexedConnection) -> Result<(), Failure> {
        let mut names = self.other_members(conn).await?;
        for n in self.peers.keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        if names.is_empty() {
            self.publish_status();
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for n in &names {
            pipe.cmd("GET").arg(self.cfg.lease_key(n));
            pipe.cmd("HGET").arg(self.cfg.state_key(n)).arg(SEQ_FIELD);
        }
        self.status
            .metrics
            .commands
            .inc_by(pipe.cmd_iter().count() as u64);
        let answers: Vec<Option<String>> =
            pipe.query_async(conn).await.map_err(|e| e.to_string())?;
        // A peer may be missing its lease only because Redis came back moments ago: give every
        // peer a full lease to renew it before calling it dead.
        let settled = self.up_since.elapsed() >= self.cfg.lease();
        for (i, n) in names.iter().enumerate() {
            let lease = answers.get(2 * i).cloned().flatten();
            let seq = answers
                .get(2 * i + 1)
                .cloned()
                .flatten()
                .and_then(|s| s.parse::<u64>().ok());
            if lease.is_some() {
                self.missing.remove(n);
            }
            match lease {
                Some(epoch) => {
                    let epoch = epoch.parse::<u64>().unwrap_or(0);
                    match self.peers.get(n) {
                        None => {
                            if seq.is_some() {
                                self.resync(conn, n, "unknown").await?;
                            }
                        }
                        Some(p) if p.epoch != epoch => {
                            if seq.is_some() {
                                self.resync(conn, n, "epoch").await?;
                            }
                        }
                        Some(p) => match seq {
                            Some(s) if s > p.seq => {
                                if self.ahead.get(n) == Some(&s) {
                                    self.resync(conn, n, "lag").await?;
                                } else {
                                    self.ahead.insert(n.clone(), s);
                                }
                            }
                            _ => {
                                self.ahead.remove(n);
                            }
                        },
                    }
                }
                None if settled => {
                    let since = *self.missing.entry(n.clone()).or_insert_with(Instant::now);
                    if since.elapsed() < self.cfg.heartbeat() {
                        continue;
                    }
                    self.missing.remove(n);
                    if self.peers.contains_key(n) {
                        log::warn!(
                            "cluster: node {n} lost its lease: its sessions leave (node_down)"
                        );
                        self.node_down(n);
                    }
                    let _: redis::RedisResult<()> = redis::cmd("SREM")
                        .arg(self.cfg.nodes_key())
                        .arg(&**n)
                        .query_async(conn)
                        .await;
                    self.status.metrics.commands.inc();
                }
                None => {}
            }
        }
        self.publish_status();
        Ok(())
    }

    fn node_down(&mut self, n: &NodeId) {
        self.ahead.remove(n);
        if let Some(mut p) = self.peers.remove(n) {
            self.status.metrics.nodes_down.inc();
            let changes = p.drain();
            self.route(n, changes, Some("node_down".into()));
        }
        let _ = self.status.metrics.sessions.remove_label_values(&[&**n]);
        self.publish_status();
    }

    fn publish_status(&self) {
        let list: Vec<(String, usize)> = self
            .peers
            .iter()
            .map(|(n, p)| (n.to_string(), p.sessions()))
            .collect();
        for (n, s) in &list {
            self.status
                .metrics
                .sessions
                .with_label_values(&[n])
                .set(*s as i64);
        }
        self.status.metrics.nodes.set(list.len() as i64 + 1);
        if let Ok(mut p) = self.status.peers.lock() {
            *p = list;
        }
    }

    fn route(&self, node: &NodeId, changes: Vec<(Scope, Change)>, reason: Option<Arc<str>>) {
        if changes.is_empty() {
            return;
        }
        self.status.metrics.changes_in.inc_by(
            changes
                .iter()
                .filter(|(_, c)| c.session().is_some())
                .count() as u64,
        );
        self.registry.do_send(FromNode {
            node: node.clone(),
            changes,
            reason,
        });
    }

    /// Reloads one peer's state from its hash. A hash without `__seq` has not been written
    /// since Redis lost it: the mirror is kept until the peer says hello or loses its lease.
    async fn resync(
        &mut self,
        conn: &mut MultiplexedConnection,
        n: &NodeId,
        why: &str,
    ) -> Result<(), Failure> {
        let raw: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.cfg.state_key(n))
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        self.status.metrics.commands.inc();
        let Some((epoch, seq, state)) = wire::parse_state(raw) else {
            return Ok(());
        };
        self.status.metrics.resyncs.with_label_values(&[why]).inc();
        self.ahead.remove(n);
        let changes = self
            .peers
            .entry(n.clone())
            .or_default()
            .replace(epoch, seq, state);
        log::debug!(
            "cluster: reloaded node {n} ({why}): epoch {epoch:x} seq {seq}, {} change(s)",
            changes.len()
        );
        self.route(n, changes, None);
        self.publish_status();
        Ok(())
    }

    async fn receive(
        &mut self,
        conn: &mut MultiplexedConnection,
        payload: &[u8],
    ) -> Result<(), Failure> {
        let msg: Bus = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                log::warn!("cluster: ignoring an unreadable bus message: {e}");
                return Ok(());
            }
        };
        match msg {
            Bus::Delta { n, e, s, c } => {
                if *n == *self.cfg.node {
                    return Ok(());
                }
                let node: NodeId = n.as_str().into();
                let fit = self.peers.get(&node).map(|p| p.fit(e, s));
                match fit {
                    Some(Fit::Next) => {
                        self.status.metrics.deltas_in.inc();
                        let changes = self
                            .peers
                            .get_mut(&node)
                            .map(|p| p.apply(s, c))
                            .unwrap_or_default();
                        self.route(&node, changes, None);
                    }
                    Some(Fit::Old) => {}
                    Some(Fit::Gap) => self.resync(conn, &node, "gap").await?,
                    None => self.resync(conn, &node, "unknown").await?,
                }
            }
            Bus::Hello { n, .. } => {
                if *n != *self.cfg.node {
                    self.resync(conn, &n.as_str().into(), "hello").await?;
                }
            }
            Bus::Kick { n, a, x } => {
                if *n == *self.cfg.node {
                    if let Some(session) = SessionId::parse(&x) {
                        self.registry.do_send(KickSession {
                            account: a.into(),
                            session,
                        });
                    }
                }
            }
        }
        Ok(())
    }
}
