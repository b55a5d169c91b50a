//! The snapshot writer: a `SyncArbiter` actor that owns the database side of persistence. It
//! turns an `EngineSnapshot` (plain data from the actor tree) into rows, diffs them against what
//! the database is known to hold, and writes only the difference, in slices of at most
//! `SLICE_SESSIONS` sessions, one transaction each. A periodic tick rests between slices
//! (`Pace`), so a heavy tick under churn spreads over the snapshot interval instead of taking a
//! core in one burst; a flush writes at once.
//!
//! Nothing is queued per tick: the desired state is recomputed from the live actors every time,
//! so a tick that fails (database down) costs nothing but a retry, and the first tick that
//! succeeds writes the state as it is then. What cannot be recomputed — history samples and
//! `last_seen` of users who went away — waits in bounded buffers until a write succeeds.

use std::collections::{BTreeMap, VecDeque};

// The writer's maps are keyed by session ids and user keys of its own node, hashed tens of
// thousands of times per tick: SipHash's resistance to chosen keys is not needed there, and it
// was a tenth of the writer's own (non-database) CPU.
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use std::hash::{Hash, Hasher};

use presence_actors::presence::{Key, Meta, SessionId};
use presence_actors::snapshot::{EngineSnapshot, Held as HeldMeta};

use super::PersistMetrics;
use crate::store::{
    IntervalClose, IntervalOpen, PruneReport, RetentionPolicy, Sample, SessionSnapshot,
    SnapshotBatch, Store,
};

/// How often the `last_seen` of a user who stays online is refreshed in the database. A node
/// killed without a final snapshot leaves its users' `last_seen` at most this old.
const LAST_SEEN_REFRESH_MS: i64 = 60_000;

/// `(account, room)`; room `""` is the whole account.
type Place = (String, String);

/// The writer's knobs.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub node_id: String,
    /// The snapshot period: the resolution of raw samples.
    pub interval_ms: i64,
    /// Unchanged counts are sampled again after this long.
    pub sample_interval_ms: i64,
    pub max_buffered_samples: usize,
    pub retention: RetentionPolicy,
}

/// One room entry of a session row (`presence_snapshots.rooms`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomEntry {
    pub room: String,
    pub phx_ref: String,
    pub status: String,
    pub online_at: i64,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub meta: Map<String, Value>,
    #[serde(default)]
    pub ghost_until: Option<i64>,
}

/// What the database holds for one session: a fingerprint of its row and the places (`""` for
/// the account, then its rooms) it has open intervals in. A few dozen bytes per session instead
/// of the row itself.
#[derive(Debug, Clone)]
struct Held {
    /// Which account the session is in: while that account (or one of these rooms) is missed
    /// by a snapshot, what is held stands (`EngineSnapshot::missed_accounts`).
    account: Arc<str>,
    fingerprint: u64,
    places: Vec<Box<str>>,
}

/// A session as the snapshot holds it, borrowed.
struct View<'a> {
    account: &'a Arc<str>,
    user: &'a str,
    meta: &'a Meta,
    ghost: Option<i64>,
    /// Sorted by room name.
    rooms: Vec<(&'a str, &'a Meta, Option<i64>)>,
}

/// Fingerprint of what a row says. Any change of a meta (status, fields, device) gives it a new
/// `phx_ref`, so refs, ghost deadlines and room names identify a row's content without
/// serialising it.
fn fingerprint<'r>(
    account: &str,
    user: &str,
    phx_ref: u64,
    online_at: i64,
    ghost: Option<i64>,
    rooms: impl Iterator<Item = (&'r str, u64, i64, Option<i64>)>,
) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (account, user, phx_ref, online_at, ghost).hash(&mut h);
    for r in rooms {
        r.hash(&mut h);
    }
    h.finish()
}

impl View<'_> {
    fn fingerprint(&self) -> u64 {
        fingerprint(
            self.account,
            self.user,
            self.meta.phx_ref.0,
            self.meta.online_at,
            self.ghost,
            self.rooms
                .iter()
                .map(|(r, m, g)| (*r, m.phx_ref.0, m.online_at, *g)),
        )
    }

    fn places(&self) -> Vec<Box<str>> {
        std::iter::once("")
            .chain(self.rooms.iter().map(|(r, _, _)| *r))
            .map(Box::from)
            .collect()
    }

    fn row(&self, node: &str, taken_at: i64) -> SessionSnapshot {
        let rooms: Vec<RoomEntry> = self
            .rooms
            .iter()
            .map(|(room, meta, ghost)| RoomEntry {
                room: room.to_string(),
                phx_ref: meta.phx_ref.to_string(),
                status: meta.status.to_string(),
                online_at: meta.online_at,
                device: meta.device.as_deref().map(String::from),
                meta: (*meta.fields).clone(),
                ghost_until: *ghost,
            })
            .collect();
        SessionSnapshot {
            node_id: node.to_string(),
            account_id: self.account.to_string(),
            session_id: self.meta.session.to_string(),
            user_id: self.user.to_string(),
            phx_ref: self.meta.phx_ref.to_string(),
            status: self.meta.status.to_string(),
            device: self.meta.device.as_deref().map(String::from),
            online_at: self.meta.online_at,
            meta: serde_json::to_string(&*self.meta.fields).unwrap_or_else(|_| "{}".into()),
            rooms: serde_json::to_string(&rooms).unwrap_or_else(|_| "[]".into()),
            ghost_until: self.ghost,
            updated_at: taken_at,
        }
    }
}

/// The same fingerprint and places from a stored row (the baseline at start-up). A row that
/// does not parse gets fingerprint 0, so the first tick rewrites it.
fn held_of(row: &SessionSnapshot) -> Option<(u64, Held)> {
    let session = SessionId::parse(&row.session_id)?.0;
    let rooms: Vec<RoomEntry> = serde_json::from_str(&row.rooms).unwrap_or_default();
    let mut parsed: Vec<(&str, u64, i64, Option<i64>)> = Vec::with_capacity(rooms.len());
    let mut ok = true;
    for r in &rooms {
        match u64::from_str_radix(&r.phx_ref, 16) {
            Ok(x) => parsed.push((r.room.as_str(), x, r.online_at, r.ghost_until)),
            Err(_) => ok = false,
        }
    }
    parsed.sort_by(|a, b| a.0.cmp(b.0));
    let fp = match (ok, u64::from_str_radix(&row.phx_ref, 16)) {
        (true, Ok(phx_ref)) => fingerprint(
            &row.account_id,
            &row.user_id,
            phx_ref,
            row.online_at,
            row.ghost_until,
            parsed.iter().copied(),
        ),
        _ => 0,
    };
    let places = std::iter::once("")
        .chain(parsed.iter().map(|p| p.0))
        .map(Box::from)
        .collect();
    Some((
        session,
        Held {
            account: row.account_id.as_str().into(),
            fingerprint: fp,
            places,
        },
    ))
}

/// Every account connection of the snapshot with the rooms its session is in. Room members
/// without an account connection (staff sessions) are not persisted.
fn views(snap: &EngineSnapshot) -> HashMap<u64, View<'_>> {
    let mut out: HashMap<u64, View<'_>> = HashMap::with_capacity(snap.sessions());
    for a in &snap.accounts {
        for (user, meta, ghost) in &a.connections {
            out.insert(
                meta.session.0,
                View {
                    account: &a.account,
                    user,
                    meta,
                    ghost: *ghost,
                    rooms: Vec::new(),
                },
            );
        }
    }
    for r in &snap.rooms {
        for (_, meta, ghost) in &r.members {
            if let Some(v) = out.get_mut(&meta.session.0) {
                if *v.account == r.account {
                    v.rooms.push((&r.room, meta, *ghost));
                }
            }
        }
    }
    for v in out.values_mut() {
        v.rooms.sort_by(|a, b| a.0.cmp(b.0));
    }
    out
}

/// Write what the actor tree holds now; paced for a periodic tick, at once for a flush.
#[derive(Message)]
#[rtype(result = "Result<TickReport, String>")]
pub struct WriteTick {
    pub snap: EngineSnapshot,
    pub pace: Option<Pace>,
}

/// What the database held for this node at start-up (restored into the actors): the baseline
/// the first tick diffs against.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Baseline {
    pub rows: Vec<SessionSnapshot>,
}

/// Downsample and delete old history.
#[derive(Message)]
#[rtype(result = "Result<PruneReport, String>")]
pub struct Prune {
    pub now: i64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TickReport {
    pub sessions: usize,
    pub upserted: usize,
    pub removed: usize,
    pub samples: usize,
    pub last_seen: usize,
    pub intervals_opened: usize,
    pub intervals_closed: usize,
    /// Transactions the tick took (see `SLICE_SESSIONS`).
    pub slices: usize,
    pub build_ms: f64,
    pub write_ms: f64,
    /// The snapshot was older than one already written (a flush overtook a tick) and skipped.
    pub stale: bool,
}

pub struct Writer {
    store: Store,
    cfg: Arc<WriterConfig>,
    metrics: PersistMetrics,
    /// What the database holds for this node, by session.
    committed: HashMap<u64, Held>,
    committed_at: i64,
    pending_samples: VecDeque<Sample>,
    /// `(account, user)` → unix ms: departures not yet written.
    pending_seen: HashMap<(Arc<str>, Key), i64>,
    /// When the `last_seen` of each online user was last written.
    written_seen: HashMap<(Arc<str>, Key), i64>,
    /// Last sample taken per `(account, room)`: users, connections, when.
    last_sample: HashMap<Place, (i64, i64, i64)>,
}

impl Writer {
    pub fn new(store: Store, cfg: Arc<WriterConfig>, metrics: PersistMetrics) -> Writer {
        Writer {
            store,
            cfg,
            metrics,
            committed: HashMap::new(),
            committed_at: 0,
            pending_samples: VecDeque::new(),
            pending_seen: HashMap::new(),
            written_seen: HashMap::new(),
            last_sample: HashMap::new(),
        }
    }

    fn buffer_samples(&mut self, samples: Vec<Sample>) {
        for s in samples {
            if self.pending_samples.len() >= self.cfg.max_buffered_samples.max(1) {
                self.pending_samples.pop_front();
                self.metrics.samples_dropped.inc();
            }
            self.pending_samples.push_back(s);
        }
        self.metrics
            .samples_buffered
            .set(self.pending_samples.len() as i64);
    }

    /// Samples for every account and room whose counts changed, went to zero, or were last
    /// sampled more than `sample_interval_ms` ago.
    fn take_samples(&mut self, snap: &EngineSnapshot) -> Vec<Sample> {
        let now = snap.taken_at;
        let mut current: HashMap<(String, String), (i64, i64)> = HashMap::new();
        for a in &snap.accounts {
            current.insert(
                (a.account.to_string(), String::new()),
                counts(&a.connections),
            );
        }
        for r in &snap.rooms {
            current.insert(
                (r.account.to_string(), r.room.to_string()),
                counts(&r.members),
            );
        }
        let mut out = Vec::new();
        let gone: Vec<(Place, (i64, i64, i64))> = self
            .last_sample
            .iter()
            .filter(|(k, _)| !current.contains_key(*k))
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (key, (u, c, _)) in gone {
            // A room that stopped (or an account that emptied) drops to zero once.
            if (u, c) != (0, 0) {
                out.push(self.sample(&key, now, 0, 0));
            }
            self.last_sample.remove(&key);
        }
        for (key, (u, c)) in current {
            let due = match self.last_sample.get(&key) {
                Some((lu, lc, at)) => {
                    (*lu, *lc) != (u, c) || now - *at >= self.cfg.sample_interval_ms
                }
                None => true,
            };
            if due {
                out.push(self.sample(&key, now, u, c));
                self.last_sample.insert(key, (u, c, now));
            }
        }
        out
    }

    fn sample(&self, key: &(String, String), at: i64, users: i64, connections: i64) -> Sample {
        Sample {
            node_id: self.cfg.node_id.clone(),
            account_id: key.0.clone(),
            room: key.1.clone(),
            at,
            resolution_ms: self.cfg.interval_ms,
            users,
            connections,
        }
    }

    /// What the database holds for this node (loaded at start-up): the first tick diffs
    /// against it instead of rewriting everything.
    pub fn set_baseline(&mut self, rows: Vec<SessionSnapshot>) {
        self.committed = rows.iter().filter_map(held_of).collect();
        self.metrics.rows.set(self.committed.len() as i64);
    }

    /// Writes one tick at once (a flush, the benchmarks); see `write_paced`.
    pub fn write(&mut self, snap: EngineSnapshot) -> Result<TickReport, String> {
        self.write_paced(snap, None)
    }

    /// Writes one tick: the sessions whose row changed since the last commit, the sessions that
    /// went away, the samples and `last_seen` due. The work is cut into slices of at most
    /// `SLICE_SESSIONS` sessions, each its own transaction holding everything about its
    /// sessions (row, opened and closed intervals), so the database is consistent per session
    /// after every slice and `committed` follows it slice by slice: a slice that fails leaves
    /// its sessions to the next tick.
    ///
    /// With a `pace`, the writer rests after each slice (see `Pace`), spreading a heavy tick
    /// over the snapshot interval instead of taking a core from the actors in one burst.
    pub fn write_paced(
        &mut self,
        snap: EngineSnapshot,
        pace: Option<&Pace>,
    ) -> Result<TickReport, String> {
        if snap.taken_at < self.committed_at {
            return Ok(TickReport {
                stale: true,
                ..TickReport::default()
            });
        }
        let started = Instant::now();
        // The work before the first slice (every session's view and fingerprint) is paced too,
        // in steps: in one go it held a core for tens of milliseconds at every tick.
        let mut steps = Steps {
            pace,
            since: started,
            rested: Duration::ZERO,
        };
        let now = snap.taken_at;
        let samples = self.take_samples(&snap);
        self.buffer_samples(samples);
        let departed = snap
            .accounts
            .iter()
            .map(|a| (&a.account, &a.departed))
            .chain(
                snap.missed_accounts
                    .iter()
                    .map(|m| (&m.account, &m.departed)),
            );
        for (account, departed) in departed {
            for (user, at) in departed {
                let e = self
                    .pending_seen
                    .entry((account.clone(), user.clone()))
                    .or_insert(*at);
                *e = (*e).max(*at);
            }
        }
        // Users with a connected (non-ghost) session: their last_seen is "now", refreshed.
        let mut online: HashSet<(&Arc<str>, &Key)> = HashSet::new();
        for a in &snap.accounts {
            for (user, _, ghost) in &a.connections {
                if ghost.is_none() {
                    online.insert((&a.account, user));
                }
            }
        }
        let mut seen: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for ((a, u), at) in &self.pending_seen {
            seen.insert((a, u), *at);
        }
        let mut refreshed: Vec<(Arc<str>, Key)> = Vec::new();
        for (a, u) in &online {
            let due = self
                .written_seen
                .get(&((*a).clone(), (*u).clone()))
                .is_none_or(|at| now - *at >= LAST_SEEN_REFRESH_MS);
            if due {
                let e = seen.entry((a, u)).or_insert(now);
                *e = (*e).max(now);
                refreshed.push(((*a).clone(), (*u).clone()));
            }
        }
        let last_seen: Vec<(String, String, i64)> = seen
            .into_iter()
            .map(|((a, u), t)| (a.to_string(), u.to_string(), t))
            .collect();

        steps.breathe();
        let views = views(&snap);
        let frozen = self.frozen(&snap);
        steps.breathe();
        let mut dirty: Vec<(u64, u64)> = Vec::new();
        for (i, (session, view)) in views.iter().enumerate() {
            if i > 0 && i % FINGERPRINTS_PER_STEP == 0 {
                steps.breathe();
            }
            if frozen.contains(session) {
                continue;
            }
            let fp = view.fingerprint();
            if self
                .committed
                .get(session)
                .is_none_or(|b| b.fingerprint != fp)
            {
                dirty.push((*session, fp));
            }
        }
        let mut gone: Vec<u64> = self
            .committed
            .keys()
            .filter(|s| !views.contains_key(*s) && !frozen.contains(*s))
            .copied()
            .collect();
        // In key order, so that each slice touches a narrow range of the tables' pages: a page
        // dirtied by several slices is written (and checkpointed) once per slice.
        dirty.sort_by_cached_key(|(s, _)| SessionId(*s).to_string());
        gone.sort_by_cached_key(|s| SessionId(*s).to_string());
        steps.breathe();
        let mut report = TickReport {
            sessions: views.len(),
            build_ms: (started.elapsed() - steps.rested).as_secs_f64() * 1000.0,
            ..TickReport::default()
        };

        // Slice 0 also carries the samples and last_seen; there is always one, so a quiet tick
        // still writes those.
        let mut slices = dirty
            .chunks(SLICE_SESSIONS)
            .map(|d| (d, &[][..]))
            .chain(gone.chunks(SLICE_SESSIONS).map(|g| (&[][..], g)))
            .peekable();
        let mut first = true;
        while first || slices.peek().is_some() {
            let (dirty, gone) = slices.next().unwrap_or((&[], &[]));
            let slice_started = Instant::now();
            let slice = self.slice(&views, dirty, gone, now);
            let samples: Vec<Sample> = match first {
                true => self.pending_samples.iter().cloned().collect(),
                false => Vec::new(),
            };
            let batch = SnapshotBatch {
                node_id: &self.cfg.node_id,
                upserts: &slice.upserts,
                removals: &slice.removals,
                samples: &samples,
                last_seen: if first { &last_seen } else { &[] },
                opened: &slice.opened,
                closed: &slice.closed,
            };
            let build_ms = slice_started.elapsed().as_secs_f64() * 1000.0;
            let write_started = Instant::now();
            self.store
                .write_snapshot(&batch)
                .map_err(|e| e.to_string())?;
            report.build_ms += build_ms;
            report.write_ms += write_started.elapsed().as_secs_f64() * 1000.0;
            report.slices += 1;
            report.upserted += slice.upserts.len();
            report.removed += slice.removals.len();
            report.intervals_opened += slice.opened.len();
            report.intervals_closed += slice.closed.len();
            // Committed: now the database holds this slice.
            for s in gone {
                self.committed.remove(s);
            }
            self.committed.extend(slice.changed);
            if first {
                report.samples = samples.len();
                report.last_seen = last_seen.len();
                self.pending_samples.clear();
                self.metrics.samples_buffered.set(0);
                self.pending_seen.clear();
                for k in refreshed.drain(..) {
                    self.written_seen.insert(k, now);
                }
                self.written_seen
                    .retain(|(a, u), _| online.contains(&(a, u)));
                first = false;
            }
            self.metrics.rows.set(self.committed.len() as i64);
            // Rest only between slices: after the last one the tick is done.
            if let (Some(pace), true) = (pace, slices.peek().is_some()) {
                pace.rest(slice_started.elapsed());
            }
        }
        // One checkpoint for all the slices (see `Store::checkpoint`); a failed one only
        // leaves the WAL to the next tick.
        let checkpoint_started = Instant::now();
        if let Err(e) = self.store.checkpoint() {
            log::warn!("snapshot: WAL checkpoint failed: {e}");
        }
        report.write_ms += checkpoint_started.elapsed().as_secs_f64() * 1000.0;
        self.committed_at = now;
        Ok(report)
    }

    /// The committed sessions this snapshot cannot say anything about: those of an account it
    /// missed, and those held in a room it missed. Their rows and intervals stand as they are
    /// until a snapshot reads those actors again; closing them would put a gap in their
    /// history, and drop them from the rows a restart restores.
    fn frozen(&self, snap: &EngineSnapshot) -> HashSet<u64> {
        if snap.missed() == 0 {
            return HashSet::new();
        }
        let missed = snap.missed_set();
        self.committed
            .iter()
            .filter(|(_, h)| {
                missed.account(&h.account)
                    || h.places.iter().skip(1).any(|p| missed.room(&h.account, p))
            })
            .map(|(s, _)| *s)
            .collect()
    }

    /// Rows, interval changes and new `committed` entries for the sessions of one slice.
    fn slice(
        &self,
        views: &HashMap<u64, View<'_>>,
        dirty: &[(u64, u64)],
        gone: &[u64],
        now: i64,
    ) -> Slice {
        let mut out = Slice::default();
        for (session, fp) in dirty {
            let view = &views[session];
            let before = self.committed.get(session);
            let row = view.row(&self.cfg.node_id, now);
            let places = view.places();
            for (i, place) in places.iter().enumerate() {
                if before.is_none_or(|b| !b.places.contains(place)) {
                    let joined = match i {
                        0 => view.meta.online_at,
                        _ => view.rooms[i - 1].1.online_at,
                    };
                    out.opened.push(IntervalOpen {
                        account_id: row.account_id.clone(),
                        room: place.to_string(),
                        user_id: row.user_id.clone(),
                        session_id: row.session_id.clone(),
                        joined_at: joined.min(now),
                    });
                }
            }
            if let Some(b) = before {
                for place in &b.places {
                    if !places.contains(place) {
                        out.closed.push(IntervalClose::Room {
                            session_id: row.session_id.clone(),
                            room: place.to_string(),
                            left_at: now,
                        });
                    }
                }
            }
            out.upserts.push(row);
            out.changed.push((
                *session,
                Held {
                    account: view.account.clone(),
                    fingerprint: *fp,
                    places,
                },
            ));
        }
        for s in gone {
            let sid = SessionId(*s).to_string();
            out.closed.push(IntervalClose::Session {
                session_id: sid.clone(),
                left_at: now,
            });
            out.removals.push(sid);
        }
        out
    }
}

/// The steps of a tick's work before its first slice, with a rest after each when paced.
struct Steps<'a> {
    pace: Option<&'a Pace>,
    /// When the current step began.
    since: Instant,
    /// Time spent resting so far (not work: left out of `TickReport::build_ms`).
    rested: Duration,
}

impl Steps<'_> {
    fn breathe(&mut self) {
        if let Some(pace) = self.pace {
            let resting = Instant::now();
            pace.rest(resting - self.since);
            self.since = Instant::now();
            self.rested += self.since - resting;
        }
    }
}

/// Sessions fingerprinted between two rests of a paced tick (a few milliseconds).
const FINGERPRINTS_PER_STEP: usize = 4_000;

/// Sessions per transaction of a tick. Small enough that a slice takes a few tens of
/// milliseconds of CPU (so a paced writer can rest between them), large enough that the
/// per-transaction cost (commit, WAL frames) stays small next to the rows.
pub const SLICE_SESSIONS: usize = 500;

/// What one slice of a tick writes.
#[derive(Default)]
struct Slice {
    upserts: Vec<SessionSnapshot>,
    removals: Vec<String>,
    opened: Vec<IntervalOpen>,
    closed: Vec<IntervalClose>,
    changed: Vec<(u64, Held)>,
}

/// How a periodic tick spreads its work: after each slice the writer rests so that it is busy
/// at most `duty` of the time, but never past `deadline` (the tick must end well before the
/// next one), and not at all while `flushes` is above zero (a flush is waiting behind this
/// tick: shutdown must not wait for a paced write).
pub struct Pace {
    pub duty: f64,
    pub deadline: Instant,
    pub flushes: Arc<AtomicUsize>,
}

impl Pace {
    fn hurry(&self) -> bool {
        self.flushes.load(Ordering::Relaxed) > 0
    }

    fn rest(&self, worked: Duration) {
        let duty = self.duty.clamp(0.01, 1.0);
        let want = worked.mul_f64((1.0 - duty) / duty);
        let left = self.deadline.saturating_duration_since(Instant::now());
        // Rest in short naps so a flush that arrives meanwhile cuts it short.
        let until = Instant::now() + want.min(left);
        while !self.hurry() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

impl Actor for Writer {
    type Context = SyncContext<Self>;

    /// Snapshots are background work: on a saturated machine they must not take CPU from the
    /// actors (a 20 000-session tick under churn costs ~0.7 s, which showed as p99 spikes every
    /// snapshot interval). Niceness 10 gives this thread about a tenth of a busy core's share;
    /// it still gets all the idle CPU there is.
    fn started(&mut self, _: &mut SyncContext<Self>) {
        crate::app::os::lower_this_threads_priority(10);
    }
}

impl Handler<WriteTick> for Writer {
    type Result = Result<TickReport, String>;

    fn handle(&mut self, msg: WriteTick, _: &mut SyncContext<Self>) -> Self::Result {
        self.write_paced(msg.snap, msg.pace.as_ref())
    }
}

impl Handler<Baseline> for Writer {
    type Result = ();

    fn handle(&mut self, msg: Baseline, _: &mut SyncContext<Self>) {
        self.set_baseline(msg.rows);
    }
}

impl Handler<Prune> for Writer {
    type Result = Result<PruneReport, String>;

    fn handle(&mut self, msg: Prune, _: &mut SyncContext<Self>) -> Self::Result {
        self.store
            .prune_history(&self.cfg.retention, msg.now)
            .map_err(|e| e.to_string())
    }
}

/// Distinct users and metas among `held`.
fn counts(held: &[HeldMeta]) -> (i64, i64) {
    let users: HashSet<&str> = held.iter().map(|(k, _, _)| &**k).collect();
    (users.len() as i64, held.len() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence_actors::presence::Ref;
    use presence_actors::snapshot::{AccountSnapshot, RoomSnapshot};

    fn meta(session: u64, phx_ref: u64, status: &str) -> Meta {
        let mut fields = Map::new();
        fields.insert("name".into(), Value::from("Ada <b>"));
        Meta {
            phx_ref: Ref(phx_ref),
            phx_ref_prev: None,
            session: SessionId(session),
            status: status.into(),
            online_at: 1_000 + session as i64,
            device: Some("phone".into()),
            fields: Arc::new(fields),
        }
    }

    fn snap(room_ref: u64) -> EngineSnapshot {
        EngineSnapshot {
            taken_at: 5_000,
            accounts: vec![AccountSnapshot {
                account: "acc".into(),
                connections: vec![("ada".into(), meta(7, 70, "online"), None)],
                departed: vec![],
                followers: 0,
            }],
            rooms: ["zeta", "alpha"]
                .into_iter()
                .map(|r| RoomSnapshot {
                    account: "acc".into(),
                    room: r.into(),
                    members: vec![("ada".into(), meta(7, room_ref, "busy"), Some(9_000))],
                })
                .collect(),
            ..EngineSnapshot::default()
        }
    }

    #[test]
    fn a_stored_row_has_the_fingerprint_and_places_of_the_session_it_was_made_from() {
        let s = snap(71);
        let views = views(&s);
        let view = &views[&7];
        let row = view.row("node", s.taken_at);
        let (session, held) = held_of(&row).expect("parses");
        assert_eq!(session, 7);
        assert_eq!(held.fingerprint, view.fingerprint());
        assert_eq!(held.places, view.places());
        let want: [Box<str>; 3] = ["".into(), "alpha".into(), "zeta".into()];
        assert_eq!(&*held.places, &want);
        let rooms: Vec<RoomEntry> = serde_json::from_str(&row.rooms).unwrap();
        assert_eq!(rooms[0].room, "alpha");
        assert_eq!(rooms[0].ghost_until, Some(9_000));
        assert_eq!(rooms[0].meta["name"], "Ada <b>");
    }

    #[test]
    fn a_new_ref_in_any_room_changes_the_fingerprint() {
        let a = snap(71);
        let b = snap(72);
        assert_ne!(views(&a)[&7].fingerprint(), views(&b)[&7].fingerprint());
    }

    /// A session per id of `ids` (user `u<id>`), session `i` in room `room(i)`, all with `phx_ref`.
    fn crowd(
        ids: std::ops::Range<u64>,
        room: impl Fn(u64) -> String,
        phx_ref: u64,
    ) -> EngineSnapshot {
        let mut rooms: BTreeMap<String, Vec<HeldMeta>> = BTreeMap::new();
        let mut connections = Vec::new();
        for i in ids {
            let m = meta(i, phx_ref, "online");
            connections.push((format!("u{i}").into(), m.clone(), None));
            rooms
                .entry(room(i))
                .or_default()
                .push((format!("u{i}").into(), m, None));
        }
        EngineSnapshot {
            taken_at: 5_000 + phx_ref as i64,
            accounts: vec![AccountSnapshot {
                account: "acc".into(),
                connections,
                departed: vec![],
                followers: 0,
            }],
            rooms: rooms
                .into_iter()
                .map(|(room, members)| RoomSnapshot {
                    account: "acc".into(),
                    room: room.into(),
                    members,
                })
                .collect(),
            ..EngineSnapshot::default()
        }
    }

    fn writer(store: &Store) -> Writer {
        let cfg = WriterConfig {
            node_id: "node".into(),
            interval_ms: 5_000,
            sample_interval_ms: 60_000,
            max_buffered_samples: 1_000,
            retention: crate::store::RetentionPolicy {
                raw_ms: 1,
                rollup_bucket_ms: 1,
                rollup_ms: 1,
                batch: 1,
            },
        };
        Writer::new(
            store.clone(),
            Arc::new(cfg),
            PersistMetrics::new(&prometheus::Registry::new()),
        )
    }

    fn members(store: &Store, room: &str, at: i64) -> usize {
        store.intervals_at("acc", room, at, 100_000).unwrap().len()
    }

    #[test]
    fn a_tick_of_many_sessions_is_written_in_slices_that_add_up_to_the_whole() {
        let temp = crate::store::testdb::TempDatabase::sqlite();
        let store = Store::open(temp.url(), 2).unwrap();
        let mut w = writer(&store);
        let n = 2 * SLICE_SESSIONS as u64 + 200;
        let pace = Pace {
            duty: 0.5,
            deadline: Instant::now(),
            flushes: Arc::new(AtomicUsize::new(0)),
        };
        let r = w
            .write_paced(crowd(1..n + 1, |i| format!("r{}", i % 2), 1), Some(&pace))
            .unwrap();
        assert_eq!(
            (r.upserted, r.slices, r.intervals_opened),
            (n as usize, 3, 2 * n as usize)
        );
        assert_eq!(store.load_snapshot("node").unwrap().len(), n as usize);
        assert_eq!(
            members(&store, "r0", 5_001) + members(&store, "r1", 5_001),
            n as usize
        );

        // Every session moves to room r2; the first 300 are gone and 100 new ones come.
        let r = w
            .write(crowd(301..n + 101, |_| "r2".to_string(), 2))
            .unwrap();
        assert_eq!(r.removed, 300);
        assert_eq!(r.upserted, n as usize - 200);
        let rows = store.load_snapshot("node").unwrap();
        assert_eq!(rows.len(), n as usize - 200);
        assert!(rows.iter().all(|r| r.rooms.contains("\"r2\"")));
        assert_eq!(
            members(&store, "r0", 5_002) + members(&store, "r1", 5_002),
            0
        );
        assert_eq!(members(&store, "r2", 5_002), n as usize - 200);
        assert_eq!(members(&store, "", 5_002), n as usize - 200);

        // What every slice committed is what the writer now diffs against: nothing to do.
        let r = w
            .write(crowd(301..n + 101, |_| "r2".to_string(), 2))
            .unwrap();
        assert_eq!((r.upserted, r.removed, r.intervals_opened), (0, 0, 0));
    }

    #[test]
    fn a_waiting_flush_cuts_a_paced_tick_s_rest_short() {
        let pace = Pace {
            duty: 0.01,
            deadline: Instant::now() + Duration::from_secs(3_600),
            flushes: Arc::new(AtomicUsize::new(1)),
        };
        // Without the flush this would rest for the hour the deadline allows.
        pace.rest(Duration::from_secs(60));
    }

    #[test]
    fn a_slice_that_fails_leaves_its_sessions_to_the_next_tick_and_keeps_the_others() {
        let temp = crate::store::testdb::TempDatabase::sqlite();
        let store = Store::open(temp.url(), 2).unwrap();
        let mut w = writer(&store);
        let n = 3 * SLICE_SESSIONS as u64;
        let fail = |on: bool| {
            use diesel::connection::SimpleConnection;
            use diesel::Connection;
            let sql = if on {
                "CREATE TRIGGER refuse BEFORE INSERT ON presence_snapshots \
                 WHEN NEW.user_id = 'u1000' BEGIN SELECT RAISE(ABORT, 'refused'); END;"
            } else {
                "DROP TRIGGER refuse;"
            };
            let path = temp.url().trim_start_matches("sqlite://");
            let mut conn = diesel::SqliteConnection::establish(path).unwrap();
            conn.batch_execute(sql).unwrap();
        };
        fail(true);
        let err = w
            .write(crowd(1..n + 1, |_| "r".to_string(), 1))
            .unwrap_err();
        assert!(err.contains("refused"), "{err}");
        let landed = store.load_snapshot("node").unwrap().len();
        assert!(
            landed > 0 && landed < n as usize && landed % SLICE_SESSIONS == 0,
            "{landed}"
        );
        fail(false);
        let r = w.write(crowd(1..n + 1, |_| "r".to_string(), 1)).unwrap();
        assert_eq!(r.upserted, n as usize - landed);
        assert_eq!(store.load_snapshot("node").unwrap().len(), n as usize);
        assert_eq!(members(&store, "r", 5_001), n as usize);
    }

    #[test]
    fn what_a_snapshot_missed_stands_until_a_later_one_reads_it() {
        use presence_actors::snapshot::MissedAccount;
        let temp = crate::store::testdb::TempDatabase::sqlite();
        let store = Store::open(temp.url(), 2).unwrap();
        let mut w = writer(&store);
        let room = |i: u64| format!("r{}", i % 2);
        w.write(crowd(1..101, room, 1)).unwrap();
        assert_eq!(members(&store, "", 5_002), 100);

        // The account did not answer (its rooms did): nothing of its sessions is gone, and the
        // departure its first part drained is still written.
        let mut snap = crowd(1..101, room, 2);
        snap.accounts.clear();
        snap.missed_accounts.push(MissedAccount {
            account: "acc".into(),
            departed: vec![("u7".into(), 5_003)],
        });
        let r = w.write(snap).unwrap();
        assert_eq!((r.upserted, r.removed, r.intervals_closed), (0, 0, 0));
        assert_eq!(r.intervals_opened, 0);
        assert_eq!(store.load_snapshot("node").unwrap().len(), 100);
        assert_eq!(members(&store, "", 5_008), 100);
        assert_eq!(
            members(&store, "r0", 5_008) + members(&store, "r1", 5_008),
            100
        );
        assert_eq!(store.last_seen("acc", "u7").unwrap(), Some(5_003));

        // Room r0 did not answer: its members' rows and intervals stand, r1's are written.
        let mut snap = crowd(1..101, room, 3);
        snap.rooms.retain(|r| &*r.room != "r0");
        snap.missed_rooms.push(("acc".into(), "r0".into()));
        let r = w.write(snap).unwrap();
        assert_eq!((r.upserted, r.removed, r.intervals_closed), (50, 0, 0));
        assert_eq!(r.intervals_opened, 0);
        assert_eq!(members(&store, "r0", 5_008), 50);

        // Read again, r0's members are written, and none of their intervals was ever closed.
        let r = w.write(crowd(1..101, room, 4)).unwrap();
        assert_eq!((r.upserted, r.removed), (100, 0));
        assert_eq!((r.intervals_opened, r.intervals_closed), (0, 0));
        assert_eq!(members(&store, "r0", 5_009), 50);
        assert_eq!(members(&store, "r1", 5_009), 50);
    }
}
