//! Persistence of live presence: periodic snapshots, restore at start-up, history and pruning.
//!
//! - `Snapshotter` (an async actor on the registry's arbiter) ticks every `snapshot.interval_ms`:
//!   it asks every account and room actor for its presence (`presence_actors::snapshot::collect`)
//!   and hands the plain data to the writer. It never waits on the database itself, skips a tick
//!   while the previous write is still running, and backs off (doubling up to
//!   `snapshot.retry_max_ms`) while the database fails.
//! - `writer::Writer` runs on a one-thread `SyncArbiter` with the store's r2d2 pool: rows,
//!   diffs and the transactions (a slice of sessions each, paced; see `writer`) happen there,
//!   off the actors' and HTTP workers' threads.
//! - `restore` reads this node's rows at start-up and turns them into ghosts in the actor tree,
//!   so users online at the crash stay present for the grace window.

pub mod history;
pub mod writer;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts};
use serde_json::{json, Map, Value};

use presence_actors::now_ms;
use presence_actors::presence::{Key, Meta, Ref, SessionId};
use presence_actors::registry::Registry;
use presence_actors::snapshot::{self, Restore, RestoredSession};

use crate::store::{SessionSnapshot, Store};
use writer::{Prune, TickReport, WriteTick, Writer};

/// Metrics of persistence, registered on the node's prometheus registry.
#[derive(Clone)]
pub struct PersistMetrics {
    pub ticks: IntCounterVec,
    pub seconds: Histogram,
    pub rows: IntGauge,
    pub samples_buffered: IntGauge,
    pub samples_dropped: prometheus::IntCounter,
    pub database_up: IntGauge,
}

impl PersistMetrics {
    pub fn new(registry: &prometheus::Registry) -> PersistMetrics {
        let m = PersistMetrics {
            ticks: IntCounterVec::new(
                Opts::new(
                    "presenced_snapshot_ticks_total",
                    "Snapshot ticks by result: ok, error, skipped (previous write still running)",
                ),
                &["result"],
            )
            .expect("valid metric"),
            seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "presenced_snapshot_seconds",
                    "Time from collecting a snapshot to its last commit (a periodic tick \
                     rests between its slices, up to half the interval)",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )
            .expect("valid metric"),
            rows: IntGauge::new(
                "presenced_snapshot_sessions",
                "Sessions of this node held in the database's snapshot",
            )
            .expect("valid metric"),
            samples_buffered: IntGauge::new(
                "presenced_history_samples_buffered",
                "History samples waiting for the database",
            )
            .expect("valid metric"),
            samples_dropped: prometheus::IntCounter::new(
                "presenced_history_samples_dropped_total",
                "History samples dropped because the buffer was full while the database was down",
            )
            .expect("valid metric"),
            database_up: IntGauge::new(
                "presenced_database_up",
                "1 while the last database write succeeded",
            )
            .expect("valid metric"),
        };
        for c in [
            Box::new(m.ticks.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.seconds.clone()),
            Box::new(m.rows.clone()),
            Box::new(m.samples_buffered.clone()),
            Box::new(m.samples_dropped.clone()),
            Box::new(m.database_up.clone()),
        ] {
            // A second node in the same process (tests) has its own registry; a clash here
            // would be a programming error, which the metric simply stays out of.
            let _ = registry.register(c);
        }
        m
    }
}

/// What `/readyz` reports about persistence.
#[derive(Debug, Default)]
pub struct Health {
    up: AtomicBool,
    last_ok_at: AtomicI64,
    consecutive_failures: AtomicI64,
    last_error: Mutex<Option<String>>,
}

impl Health {
    pub fn json(&self) -> Value {
        json!({
            "up": self.up.load(Ordering::Relaxed),
            "last_ok_at": match self.last_ok_at.load(Ordering::Relaxed) { 0 => Value::Null, t => Value::from(t) },
            "consecutive_failures": self.consecutive_failures.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().map(|e| e.clone()).unwrap_or(None),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn ok(&self) {
        self.up.store(true, Ordering::Relaxed);
        self.last_ok_at.store(now_ms(), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = None;
        }
    }

    fn failed(&self, error: &str) -> i64 {
        self.up.store(false, Ordering::Relaxed);
        if let Ok(mut e) = self.last_error.lock() {
            *e = Some(error.to_string());
        }
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Ticks snapshots and prunes; see the module docs.
pub struct Snapshotter {
    registry: Addr<Registry>,
    writer: Addr<Writer>,
    interval: Duration,
    retry_max: Duration,
    prune_every: Duration,
    collect_timeout: Duration,
    busy: bool,
    /// Flushes under way: a paced tick stops resting while there are any.
    flushes: Arc<AtomicUsize>,
    /// No attempt before this (backoff while the database fails).
    not_before: Instant,
    last_prune: Instant,
    health: Arc<Health>,
    metrics: PersistMetrics,
}

/// Take and write a snapshot now (shutdown, tests); waits for it.
#[derive(Message)]
#[rtype(result = "Result<TickReport, String>")]
pub struct Flush;

impl Snapshotter {
    fn backoff(&mut self, failures: i64) {
        let exp = (failures - 1).clamp(0, 16) as u32;
        let wait = self
            .interval
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.retry_max);
        self.not_before = Instant::now() + wait;
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            self.metrics.ticks.with_label_values(&["skipped"]).inc();
            return;
        }
        if Instant::now() < self.not_before {
            return;
        }
        self.busy = true;
        let started = Instant::now();
        // A tick spreads its write over at most half the interval (see `writer::Pace`).
        let pace = writer::Pace {
            duty: WRITE_DUTY,
            deadline: started + self.interval / 2,
            flushes: self.flushes.clone(),
        };
        let fut = take_and_write(
            self.registry.clone(),
            self.writer.clone(),
            self.collect_timeout,
            Some(pace),
        );
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            act.busy = false;
            act.metrics.seconds.observe(started.elapsed().as_secs_f64());
            act.record(&res);
            if res.is_ok() && act.last_prune.elapsed() >= act.prune_every {
                act.last_prune = Instant::now();
                act.prune(ctx);
            }
        }));
    }

    fn record(&mut self, res: &Result<TickReport, String>) {
        match res {
            Ok(r) => {
                if !self.health.is_up() && self.health.last_ok_at.load(Ordering::Relaxed) != 0 {
                    log::info!("snapshot: database is back; wrote the current state");
                }
                self.health.ok();
                self.not_before = Instant::now();
                self.metrics.ticks.with_label_values(&["ok"]).inc();
                self.metrics.database_up.set(1);
                log::debug!("snapshot: {r:?}");
            }
            Err(e) => {
                let n = self.health.failed(e);
                self.metrics.ticks.with_label_values(&["error"]).inc();
                self.metrics.database_up.set(0);
                self.backoff(n);
                // Loud on the first failure, then once in a while, not every retry.
                if n == 1 || n % 10 == 0 {
                    log::warn!(
                        "snapshot failed ({n} in a row), presence keeps running from memory: {e}"
                    );
                }
            }
        }
    }

    fn prune(&mut self, ctx: &mut Context<Self>) {
        let ask = self.writer.send(Prune { now: now_ms() });
        ctx.spawn(ask.into_actor(self).map(|res, _, _| match res {
            Ok(Ok(r)) => log::debug!(
                "history pruned: {} downsampled, {} samples and {} intervals deleted",
                r.downsampled,
                r.deleted_samples,
                r.deleted_intervals
            ),
            Ok(Err(e)) => log::warn!("history pruning failed: {e}"),
            Err(e) => log::warn!("history pruning failed: {e}"),
        }));
    }
}

/// The share of time a periodic tick's writer may be busy (see `writer::Pace`): a heavy tick
/// (~0.5 s of CPU for 10 000 changed sessions) spread at this duty takes ~2 s of the 5 s
/// interval, instead of a core for half a second, which showed as the actors' p99 latency
/// rising every snapshot.
const WRITE_DUTY: f64 = 0.25;

async fn take_and_write(
    registry: Addr<Registry>,
    writer: Addr<Writer>,
    timeout: Duration,
    pace: Option<writer::Pace>,
) -> Result<TickReport, String> {
    let snap = snapshot::collect(&registry, timeout, snapshot::Departures::Take)
        .await
        .map_err(|e| format!("registry unavailable: {e}"))?;
    let missed = snap.missed();
    if missed > 0 {
        log::warn!(
            "snapshot: {missed} actor(s) did not answer in time; what was written of their sessions stands until a snapshot reads them"
        );
    }
    let report = writer
        .send(WriteTick { snap, pace })
        .await
        .map_err(|e| format!("snapshot writer unavailable: {e}"))??;
    Ok(report)
}

impl Actor for Snapshotter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| act.tick(ctx));
    }
}

impl Handler<Flush> for Snapshotter {
    type Result = ResponseActFuture<Self, Result<TickReport, String>>;

    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let started = Instant::now();
        // A paced tick still writing stops resting, so this flush does not wait for its pauses.
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let fut = take_and_write(
            self.registry.clone(),
            self.writer.clone(),
            self.collect_timeout,
            None,
        );
        Box::pin(fut.into_actor(self).map(move |res, act, _| {
            act.flushes.fetch_sub(1, Ordering::Relaxed);
            act.metrics.seconds.observe(started.elapsed().as_secs_f64());
            act.record(&res);
            res
        }))
    }
}

/// Everything persistence needs from the node's settings.
#[derive(Debug, Clone)]
pub struct PersistConfig {
    pub writer: writer::WriterConfig,
    pub interval: Duration,
    pub retry_max: Duration,
    pub prune_every: Duration,
    pub grace_ms: i64,
    /// Restore this node's last snapshot at start-up (off when the cluster restored a fresher
    /// state from Redis).
    pub restore: bool,
}

impl PersistConfig {
    pub fn from_settings(s: &crate::config::Settings) -> PersistConfig {
        let h = &s.history;
        PersistConfig {
            writer: writer::WriterConfig {
                node_id: s.node_id(),
                interval_ms: s.snapshot.interval_ms as i64,
                sample_interval_ms: h.sample_interval_ms as i64,
                max_buffered_samples: s.snapshot.max_buffered_samples,
                retention: crate::store::RetentionPolicy {
                    raw_ms: (h.raw_retention_s as i64).saturating_mul(1000),
                    rollup_bucket_ms: (h.rollup_bucket_s as i64).saturating_mul(1000),
                    rollup_ms: (h.retention_s as i64).saturating_mul(1000),
                    batch: 5_000,
                },
            },
            interval: Duration::from_millis(s.snapshot.interval_ms),
            retry_max: Duration::from_millis(s.snapshot.retry_max_ms.max(s.snapshot.interval_ms)),
            prune_every: Duration::from_secs(h.prune_interval_s),
            grace_ms: s.presence.grace_ms as i64,
            restore: true,
        }
    }
}

/// The running persistence of a node.
#[derive(Clone)]
pub struct Persistence {
    pub snapshotter: Addr<Snapshotter>,
    pub health: Arc<Health>,
    pub node_id: String,
}

impl Persistence {
    /// Restores this node's last snapshot into the registry (as ghosts), then starts the writer
    /// and the ticker. Call before the node serves.
    pub async fn start(
        cfg: PersistConfig,
        store: Store,
        registry: Addr<Registry>,
        prometheus: &prometheus::Registry,
        arbiter: &ArbiterHandle,
    ) -> Result<Persistence, crate::store::StoreError> {
        let metrics = PersistMetrics::new(prometheus);
        let node = cfg.writer.node_id.clone();
        let rows = {
            let (store, node) = (store.clone(), node.clone());
            actix_web::rt::task::spawn_blocking(move || store.load_snapshot(&node))
                .await
                .map_err(|e| crate::store::StoreError::Other(e.to_string()))??
        };
        let until = now_ms() + cfg.grace_ms;
        let sessions: Vec<RestoredSession> = rows
            .iter()
            .filter_map(|r| match restored(r, until) {
                Ok(s) => Some(s),
                Err(e) => {
                    log::warn!(
                        "restore: skipping session {} of node {node}: {e}",
                        r.session_id
                    );
                    None
                }
            })
            .collect();
        if !sessions.is_empty() && !cfg.restore {
            log::info!(
                "restore: node {node}'s {} snapshot session(s) not restored: the cluster restored a fresher state",
                sessions.len()
            );
        } else if !sessions.is_empty() {
            let n = sessions.len();
            match registry.send(Restore { sessions }).await {
                Ok((ghosts, rooms)) => log::info!(
                    "restored {ghosts} of {n} sessions in {rooms} rooms from node {node}'s last \
                     snapshot; they stay present for {} ms unless they reconnect",
                    cfg.grace_ms
                ),
                Err(e) => log::error!("restore failed: {e}"),
            }
        }
        let writer = {
            let (store, wcfg, metrics) =
                (store.clone(), Arc::new(cfg.writer.clone()), metrics.clone());
            SyncArbiter::start(1, move || {
                Writer::new(store.clone(), wcfg.clone(), metrics.clone())
            })
        };
        writer.do_send(writer::Baseline { rows });
        let health = Arc::new(Health::default());
        health.ok();
        metrics.database_up.set(1);
        let snapshotter = {
            let (health, metrics) = (health.clone(), metrics.clone());
            let collect_timeout = cfg.interval.min(Duration::from_secs(2));
            Snapshotter::start_in_arbiter(arbiter, move |_| Snapshotter {
                registry,
                writer,
                interval: cfg.interval,
                retry_max: cfg.retry_max,
                prune_every: cfg.prune_every,
                collect_timeout,
                busy: false,
                flushes: Arc::new(AtomicUsize::new(0)),
                not_before: Instant::now(),
                last_prune: Instant::now() - cfg.prune_every,
                health,
                metrics,
            })
        };
        Ok(Persistence {
            snapshotter,
            health,
            node_id: node,
        })
    }
}

fn parse_ref(s: &str) -> Result<Ref, String> {
    u64::from_str_radix(s, 16)
        .map(Ref)
        .map_err(|_| format!("bad phx_ref {s:?}"))
}

fn parse_fields(s: &str) -> Result<Arc<Map<String, Value>>, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(Value::Object(m)) => Ok(Arc::new(m)),
        _ => Err("meta is not a JSON object".into()),
    }
}

/// A snapshot row back into a session the registry can restore as a ghost until `until`.
fn restored(row: &SessionSnapshot, until: i64) -> Result<RestoredSession, String> {
    let session = SessionId::parse(&row.session_id).ok_or("bad session id")?;
    let meta = Meta {
        phx_ref: parse_ref(&row.phx_ref)?,
        phx_ref_prev: None,
        session,
        status: row.status.as_str().into(),
        online_at: row.online_at,
        device: row.device.as_deref().map(Into::into),
        fields: parse_fields(&row.meta)?,
    };
    let entries: Vec<writer::RoomEntry> =
        serde_json::from_str(&row.rooms).map_err(|e| format!("rooms: {e}"))?;
    let mut rooms = Vec::with_capacity(entries.len());
    for e in entries {
        let m = Meta {
            phx_ref: parse_ref(&e.phx_ref)?,
            phx_ref_prev: None,
            session,
            status: e.status.as_str().into(),
            online_at: e.online_at,
            device: e.device.as_deref().map(Into::into),
            fields: Arc::new(e.meta),
        };
        rooms.push((e.room.as_str().into(), m, until));
    }
    Ok(RestoredSession {
        account: row.account_id.as_str().into(),
        user: Key::from(row.user_id.as_str()),
        meta,
        until,
        rooms,
    })
}
