//! Presence persistence: the snapshot a node writes every `snapshot.interval_ms` and restores
//! after a restart, the occupancy time series, the join/leave intervals behind "who was here
//! at t", and their pruning.
//!
//! A snapshot batch is one transaction with multi-row statements, each chunked under the
//! backend's bind-parameter limit, so that a node with 20 000 sessions writes its state in a
//! handful of round trips. Pruning works in small batches, each its own short transaction, so
//! that it never holds a lock for long.

use std::collections::BTreeMap;

use diesel::prelude::*;
use diesel::upsert::excluded;
use diesel::PgConnection;

use super::schema::{presence_intervals, presence_samples, presence_snapshots};
use super::{
    max_binds, on_backend, rows_per_statement, upsert_last_seen_rows, write_transaction, DbConn,
    Store, StoreError,
};

/// The presence of one session as a node holds it: one row per (node, session).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(
    table_name = presence_snapshots,
    check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite),
    treat_none_as_default_value = false
)]
pub struct SessionSnapshot {
    /// The node holding the session; must be the batch's `node_id`.
    pub node_id: String,
    pub account_id: String,
    pub session_id: String,
    pub user_id: String,
    pub phx_ref: String,
    pub status: String,
    /// `meta.device`, kept apart so a reconnect from the same device can be matched.
    pub device: Option<String>,
    /// Unix ms.
    pub online_at: i64,
    /// A JSON object as text.
    pub meta: String,
    /// JSON text: the rooms the session is in.
    pub rooms: String,
    /// Set while the session is a grace-period ghost: unix ms at which it leaves.
    pub ghost_until: Option<i64>,
    pub updated_at: i64,
}

/// A snapshot row to upsert, borrowed from a [`SessionSnapshot`]. `None` is written as NULL
/// (not as SQL `DEFAULT`), which lets SQLite take many rows in one statement.
#[derive(Insertable)]
#[diesel(
    table_name = presence_snapshots,
    check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite),
    treat_none_as_default_value = false
)]
struct SnapshotRow<'a> {
    node_id: &'a str,
    account_id: &'a str,
    session_id: &'a str,
    user_id: &'a str,
    phx_ref: &'a str,
    status: &'a str,
    device: Option<&'a str>,
    online_at: i64,
    meta: &'a str,
    rooms: &'a str,
    ghost_until: Option<i64>,
    updated_at: i64,
}

/// Columns of a snapshot row, for the bind-parameter arithmetic.
const SNAPSHOT_COLUMNS: usize = 12;

impl<'a> From<&'a SessionSnapshot> for SnapshotRow<'a> {
    fn from(s: &'a SessionSnapshot) -> Self {
        SnapshotRow {
            node_id: &s.node_id,
            account_id: &s.account_id,
            session_id: &s.session_id,
            user_id: &s.user_id,
            phx_ref: &s.phx_ref,
            status: &s.status,
            device: s.device.as_deref(),
            online_at: s.online_at,
            meta: &s.meta,
            rooms: &s.rooms,
            ghost_until: s.ghost_until,
            updated_at: s.updated_at,
        }
    }
}

/// One point of the occupancy time series of an account (`room` empty) or one of its rooms, as
/// seen by one node.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable, serde::Serialize)]
#[diesel(
    table_name = presence_samples,
    check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite),
    // No column has a default to fall back on: this makes a batch one multi-row `INSERT` on
    // SQLite too, not one statement per row in a transaction of its own.
    treat_none_as_default_value = false
)]
pub struct Sample {
    pub node_id: String,
    pub account_id: String,
    /// `""` for the whole account.
    pub room: String,
    /// Unix ms.
    pub at: i64,
    /// The time this point stands for: the snapshot interval for raw points, the rollup bucket
    /// for downsampled ones (which hold the bucket's maxima).
    pub resolution_ms: i64,
    /// Distinct users present.
    pub users: i64,
    /// Connections (sessions) present.
    pub connections: i64,
}

/// Columns of a sample row, for the bind-parameter arithmetic.
const SAMPLE_COLUMNS: usize = 7;

/// A session entering a room (or, with `room` empty, the account) at `joined_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IntervalOpen {
    pub account_id: String,
    /// `""` for the account.
    pub room: String,
    pub user_id: String,
    pub session_id: String,
    pub joined_at: i64,
}

/// An interval row to insert.
#[derive(Insertable)]
#[diesel(
    table_name = presence_intervals,
    check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite),
    // As for `Sample`: one multi-row `INSERT` per chunk on SQLite, not one per row (a tick
    // under churn opens thousands of intervals; row by row they were a sixth of its CPU).
    treat_none_as_default_value = false
)]
struct NewInterval<'a> {
    node_id: &'a str,
    account_id: &'a str,
    room: &'a str,
    user_id: &'a str,
    session_id: &'a str,
    joined_at: i64,
}

/// Columns of an interval insert, for the bind-parameter arithmetic.
const INTERVAL_COLUMNS: usize = 6;

/// A session leaving, which closes open intervals of this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntervalClose {
    /// The session ended: closes all its open intervals (every room and the account).
    Session { session_id: String, left_at: i64 },
    /// The session left one room (`""`: the account): closes its open intervals there that
    /// began at or before `left_at`, so that a leave and a re-join in one batch close the old
    /// interval and keep the new one.
    Room {
        session_id: String,
        room: String,
        left_at: i64,
    },
}

/// Who was in a room (or the account) from `joined_at` until `left_at` (`None`: still there).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable, serde::Serialize)]
#[diesel(
    table_name = presence_intervals,
    check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite)
)]
pub struct Interval {
    pub id: i64,
    pub node_id: String,
    pub account_id: String,
    pub room: String,
    pub user_id: String,
    pub session_id: String,
    pub joined_at: i64,
    pub left_at: Option<i64>,
}

/// Everything one node persists at one snapshot tick; written all or nothing by
/// [`Store::write_snapshot`].
#[derive(Debug, Clone, Copy)]
pub struct SnapshotBatch<'a> {
    pub node_id: &'a str,
    /// Sessions to insert or replace (by `(node_id, session_id)`); a session listed twice keeps
    /// its last entry.
    pub upserts: &'a [SessionSnapshot],
    /// Session ids of this node whose rows go; applied before `upserts`.
    pub removals: &'a [String],
    pub samples: &'a [Sample],
    /// `(account_id, user_id, at)`: the stored last-seen time becomes the max of the two.
    pub last_seen: &'a [(String, String, i64)],
    /// Intervals to open; inserted before `closed` is applied.
    pub opened: &'a [IntervalOpen],
    pub closed: &'a [IntervalClose],
}

/// How long history is kept, and how finely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    /// Raw samples older than this are folded into rollup buckets.
    pub raw_ms: i64,
    /// The rollup bucket width; must be positive.
    pub rollup_bucket_ms: i64,
    /// Samples older than this, and intervals closed longer ago, are deleted.
    pub rollup_ms: i64,
    /// Rows per batch (each batch is one short transaction); must be positive.
    pub batch: usize,
}

/// What one [`Store::prune_history`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Raw samples folded into rollup rows (and deleted).
    pub downsampled: usize,
    /// Samples deleted for age.
    pub deleted_samples: usize,
    /// Closed intervals deleted for age.
    pub deleted_intervals: usize,
}

impl Store {
    /// Writes one snapshot batch in one transaction: deletes `removals`, upserts `upserts`,
    /// inserts `samples`, raises last-seen times, inserts `opened` and applies `closed`. All or
    /// nothing. Every upsert must belong to `batch.node_id`, or nothing is written and this is
    /// `StoreError::Other`.
    pub fn write_snapshot(&self, batch: &SnapshotBatch) -> Result<(), StoreError> {
        if let Some(stray) = batch.upserts.iter().find(|s| s.node_id != batch.node_id) {
            return Err(StoreError::Other(format!(
                "snapshot of session {} names node {}, in a batch of node {}",
                stray.session_id, stray.node_id, batch.node_id
            )));
        }
        // One row per session, the last one given; a PostgreSQL upsert may not touch a row
        // twice in one statement.
        let mut latest: BTreeMap<&str, &SessionSnapshot> = BTreeMap::new();
        for s in batch.upserts {
            latest.insert(&s.session_id, s);
        }
        let upserts: Vec<SnapshotRow> = latest.into_values().map(SnapshotRow::from).collect();

        self.with_conn(|conn| {
            write_transaction(conn, |conn| {
                remove_snapshots(conn, batch.node_id, batch.removals)?;
                upsert_snapshots(conn, &upserts)?;
                insert_samples(conn, batch.samples)?;
                upsert_last_seen_rows(conn, batch.last_seen)?;
                open_intervals(conn, batch.node_id, batch.opened)?;
                close_intervals(conn, batch.node_id, batch.closed)
            })
        })
    }

    /// Copies what the SQLite WAL holds into the database without waiting for readers (a
    /// passive checkpoint); nothing to do on PostgreSQL. The snapshot writer calls it after
    /// each tick.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| match conn {
            DbConn::Sqlite(c) => Ok(diesel::connection::SimpleConnection::batch_execute(
                c,
                "PRAGMA wal_checkpoint(PASSIVE)",
            )?),
            DbConn::Pg(_) => Ok(()),
        })
    }

    /// The sessions last written by `node_id`, ordered by session id.
    pub fn load_snapshot(&self, node_id: &str) -> Result<Vec<SessionSnapshot>, StoreError> {
        self.with_conn(|conn| {
            Ok(presence_snapshots::table
                .filter(presence_snapshots::node_id.eq(node_id))
                .order(presence_snapshots::session_id.asc())
                .select(SessionSnapshot::as_select())
                .load(conn)?)
        })
    }

    /// Samples of (account, room) with `from <= at < to`, ordered by `at`, at most `limit`.
    /// Every node's samples are returned, raw and downsampled alike (see `resolution_ms`).
    pub fn history_samples(
        &self,
        account_id: &str,
        room: &str,
        from: i64,
        to: i64,
        limit: i64,
    ) -> Result<Vec<Sample>, StoreError> {
        use presence_samples::dsl as s;
        self.with_conn(|conn| {
            Ok(presence_samples::table
                .filter(s::account_id.eq(account_id))
                .filter(s::room.eq(room))
                .filter(s::at.ge(from))
                .filter(s::at.lt(to))
                .order((s::at.asc(), s::id.asc()))
                .limit(limit.max(0))
                .select(Sample::as_select())
                .load(conn)?)
        })
    }

    /// Intervals of (account, room) open at `at` (`joined_at <= at` and `left_at` unset or
    /// after `at`), earliest joined first, at most `limit`.
    pub fn intervals_at(
        &self,
        account_id: &str,
        room: &str,
        at: i64,
        limit: i64,
    ) -> Result<Vec<Interval>, StoreError> {
        use presence_intervals::dsl as i;
        self.with_conn(|conn| {
            Ok(presence_intervals::table
                .filter(i::account_id.eq(account_id))
                .filter(i::room.eq(room))
                .filter(i::joined_at.le(at))
                .filter(i::left_at.is_null().or(i::left_at.gt(at)))
                .order((i::joined_at.asc(), i::id.asc()))
                .limit(limit.max(0))
                .select(Interval::as_select())
                .load(conn)?)
        })
    }

    /// Applies `policy` at `now`:
    ///
    /// 1. deletes samples with `at < now - rollup_ms`;
    /// 2. folds raw samples (`resolution_ms < rollup_bucket_ms`) of whole buckets older than
    ///    `now - raw_ms` into one row per (node, account, room, bucket) holding the bucket's
    ///    maximum users and connections, `at` = the bucket's start and `resolution_ms` =
    ///    `rollup_bucket_ms` (merged into the bucket's row if an earlier run made one), and
    ///    deletes the raw rows;
    /// 3. deletes intervals closed before `now - rollup_ms`.
    ///
    /// Each step selects at most `policy.batch` row ids, acts on them in one short transaction
    /// and repeats until a batch comes back short.
    pub fn prune_history(
        &self,
        policy: &RetentionPolicy,
        now: i64,
    ) -> Result<PruneReport, StoreError> {
        if policy.rollup_bucket_ms <= 0 || policy.batch == 0 {
            return Err(StoreError::Other(format!(
                "invalid retention policy: rollup_bucket_ms and batch must be positive, got \
                 {policy:?}"
            )));
        }
        let batch = i64::try_from(policy.batch).unwrap_or(i64::MAX);
        let drop_before = now.saturating_sub(policy.rollup_ms);
        let bucket = policy.rollup_bucket_ms;
        // Whole buckets only: a bucket is folded once all of it is older than the raw horizon.
        let raw_before = now.saturating_sub(policy.raw_ms).div_euclid(bucket) * bucket;
        let mut report = PruneReport::default();
        self.with_conn(|conn| {
            loop {
                let n = delete_old_samples(conn, drop_before, batch)?;
                report.deleted_samples += n;
                if (n as i64) < batch {
                    break;
                }
            }
            loop {
                let n = downsample_batch(conn, raw_before, bucket, batch)?;
                report.downsampled += n;
                if (n as i64) < batch {
                    break;
                }
            }
            loop {
                let n = delete_old_intervals(conn, drop_before, batch)?;
                report.deleted_intervals += n;
                if (n as i64) < batch {
                    break;
                }
            }
            Ok(report)
        })
    }
}

fn remove_snapshots(
    conn: &mut DbConn,
    node_id: &str,
    session_ids: &[String],
) -> Result<(), StoreError> {
    use presence_snapshots::dsl as s;
    for chunk in session_ids.chunks(max_binds(conn) - 1) {
        diesel::delete(
            presence_snapshots::table
                .filter(s::node_id.eq(node_id))
                .filter(s::session_id.eq_any(chunk)),
        )
        .execute(conn)?;
    }
    Ok(())
}

/// Inserts or replaces snapshot rows. SQLite: multi-row `INSERT … ON CONFLICT DO UPDATE`
/// statements, chunked under its bind limit. PostgreSQL: one statement fed by `unnest` of one
/// array per column (12 bind parameters for 20 000 rows instead of 240 000 over four statements,
/// which PostgreSQL parses and plans about twice as slowly), which updates the rows that exist
/// and differ and inserts the rest. Rows sent unchanged are neither rewritten nor locked, so a
/// steady snapshot leaves no dead tuples behind.
fn upsert_snapshots(conn: &mut DbConn, rows: &[SnapshotRow]) -> Result<(), StoreError> {
    use presence_snapshots::dsl as s;
    let per_statement = rows_per_statement(conn, SNAPSHOT_COLUMNS);
    match conn {
        DbConn::Pg(c) => {
            for chunk in rows.chunks(PG_UNNEST_ROWS) {
                upsert_snapshots_pg(c, chunk)?;
            }
        }
        DbConn::Sqlite(c) => {
            for chunk in rows.chunks(per_statement) {
                diesel::insert_into(presence_snapshots::table)
                    .values(chunk)
                    .on_conflict((s::node_id, s::session_id))
                    .do_update()
                    .set((
                        s::account_id.eq(excluded(s::account_id)),
                        s::user_id.eq(excluded(s::user_id)),
                        s::phx_ref.eq(excluded(s::phx_ref)),
                        s::status.eq(excluded(s::status)),
                        s::device.eq(excluded(s::device)),
                        s::online_at.eq(excluded(s::online_at)),
                        s::meta.eq(excluded(s::meta)),
                        s::rooms.eq(excluded(s::rooms)),
                        s::ghost_until.eq(excluded(s::ghost_until)),
                        s::updated_at.eq(excluded(s::updated_at)),
                    ))
                    .execute(c)?;
            }
        }
    }
    Ok(())
}

/// Rows per `unnest` upsert on PostgreSQL: bounds one statement's size (a few MB), not a limit
/// of the protocol.
const PG_UNNEST_ROWS: usize = 25_000;

fn upsert_snapshots_pg(conn: &mut PgConnection, rows: &[SnapshotRow]) -> QueryResult<usize> {
    use diesel::sql_types::{Array, BigInt, Nullable, Text};
    fn column<'a, T>(rows: &[SnapshotRow<'a>], f: impl Fn(&SnapshotRow<'a>) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    // The UPDATE and the INSERT both see the table as it was before the statement: rows that
    // exist are updated (if they differ), the others inserted. Only this node writes rows of
    // its node_id, so the ON CONFLICT is a safety net, not a path taken.
    diesel::sql_query(
        "WITH u AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
         $5::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::text[], $11::int8[], \
         $12::int8[]) AS u(node_id, account_id, session_id, user_id, phx_ref, status, device, \
         online_at, meta, rooms, ghost_until, updated_at)), \
         changed AS (UPDATE presence_snapshots p SET account_id = u.account_id, \
         user_id = u.user_id, phx_ref = u.phx_ref, status = u.status, device = u.device, \
         online_at = u.online_at, meta = u.meta, rooms = u.rooms, ghost_until = u.ghost_until, \
         updated_at = u.updated_at FROM u \
         WHERE p.node_id = u.node_id AND p.session_id = u.session_id \
         AND (p.account_id, p.user_id, p.phx_ref, p.status, p.device, p.online_at, p.meta, \
         p.rooms, p.ghost_until, p.updated_at) IS DISTINCT FROM (u.account_id, u.user_id, \
         u.phx_ref, u.status, u.device, u.online_at, u.meta, u.rooms, u.ghost_until, \
         u.updated_at) RETURNING 1) \
         INSERT INTO presence_snapshots (node_id, account_id, session_id, user_id, phx_ref, \
         status, device, online_at, meta, rooms, ghost_until, updated_at) \
         SELECT * FROM u WHERE NOT EXISTS (SELECT 1 FROM presence_snapshots p \
         WHERE p.node_id = u.node_id AND p.session_id = u.session_id) \
         ON CONFLICT (node_id, session_id) DO UPDATE SET account_id = excluded.account_id, \
         user_id = excluded.user_id, phx_ref = excluded.phx_ref, status = excluded.status, \
         device = excluded.device, online_at = excluded.online_at, meta = excluded.meta, \
         rooms = excluded.rooms, ghost_until = excluded.ghost_until, \
         updated_at = excluded.updated_at",
    )
    .bind::<Array<Text>, _>(column(rows, |r| r.node_id))
    .bind::<Array<Text>, _>(column(rows, |r| r.account_id))
    .bind::<Array<Text>, _>(column(rows, |r| r.session_id))
    .bind::<Array<Text>, _>(column(rows, |r| r.user_id))
    .bind::<Array<Text>, _>(column(rows, |r| r.phx_ref))
    .bind::<Array<Text>, _>(column(rows, |r| r.status))
    .bind::<Array<Nullable<Text>>, _>(column(rows, |r| r.device))
    .bind::<Array<BigInt>, _>(column(rows, |r| r.online_at))
    .bind::<Array<Text>, _>(column(rows, |r| r.meta))
    .bind::<Array<Text>, _>(column(rows, |r| r.rooms))
    .bind::<Array<Nullable<BigInt>>, _>(column(rows, |r| r.ghost_until))
    .bind::<Array<BigInt>, _>(column(rows, |r| r.updated_at))
    .execute(conn)
}

fn insert_samples(conn: &mut DbConn, samples: &[Sample]) -> Result<(), StoreError> {
    for chunk in samples.chunks(rows_per_statement(conn, SAMPLE_COLUMNS)) {
        on_backend!(&mut *conn, |c| diesel::insert_into(presence_samples::table)
            .values(chunk)
            .execute(c))?;
    }
    Ok(())
}

fn open_intervals(
    conn: &mut DbConn,
    node_id: &str,
    opened: &[IntervalOpen],
) -> Result<(), StoreError> {
    let rows: Vec<NewInterval> = opened
        .iter()
        .map(|o| NewInterval {
            node_id,
            account_id: &o.account_id,
            room: &o.room,
            user_id: &o.user_id,
            session_id: &o.session_id,
            joined_at: o.joined_at,
        })
        .collect();
    for chunk in rows.chunks(rows_per_statement(conn, INTERVAL_COLUMNS)) {
        on_backend!(&mut *conn, |c| diesel::insert_into(
            presence_intervals::table
        )
        .values(chunk)
        .execute(c))?;
    }
    Ok(())
}

/// Session closes become one UPDATE per distinct `left_at` and chunk of session ids, room
/// closes likewise one per `left_at` and chunk of (session, room) pairs (`close_rooms`); both
/// are served by the partial index on open intervals.
fn close_intervals(
    conn: &mut DbConn,
    node_id: &str,
    closed: &[IntervalClose],
) -> Result<(), StoreError> {
    let mut sessions_by_time: BTreeMap<i64, Vec<&str>> = BTreeMap::new();
    let mut rooms_by_time: BTreeMap<i64, Vec<(&str, &str)>> = BTreeMap::new();
    for close in closed {
        match close {
            IntervalClose::Session {
                session_id,
                left_at,
            } => sessions_by_time
                .entry(*left_at)
                .or_default()
                .push(session_id),
            IntervalClose::Room {
                session_id,
                room,
                left_at,
            } => rooms_by_time
                .entry(*left_at)
                .or_default()
                .push((session_id, room)),
        }
    }
    for (left_at, session_ids) in &sessions_by_time {
        close_sessions(conn, node_id, *left_at, session_ids)?;
    }
    for (left_at, pairs) in &rooms_by_time {
        close_rooms(conn, node_id, *left_at, pairs)?;
    }
    Ok(())
}

/// Closes every open interval of these sessions (they ended). SQLite: `IN` lists, chunked
/// under its bind limit, served by the partial index on open intervals.
///
/// PostgreSQL looks each session (here and in `close_rooms`, each pair) up on that index,
/// one `LATERAL` lookup per array element behind an `OFFSET 0` fence. A plain join of the
/// arrays (`unnest`, `= ANY`) is planned from the table's statistics, and before autovacuum
/// has analysed a fast-growing table the planner scans every open interval of the node per
/// element: 1.9 s for 2 000 session closes, 49 s for 3 600 room closes over 40 000 open
/// intervals (`EXPLAIN ANALYZE`, generic plan). With the fence the lookups are planned on the
/// index whatever the statistics: 50–65 ms for either, analysed or not. Without the fence the
/// planner flattens the `LATERAL` back into a join (45 s for the room closes).
fn close_sessions(
    conn: &mut DbConn,
    node_id: &str,
    left_at: i64,
    session_ids: &[&str],
) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, BigInt, Text};
    use presence_intervals::dsl as i;
    let per_statement = max_binds(conn) - 2;
    match conn {
        DbConn::Pg(c) => {
            for chunk in session_ids.chunks(PG_UNNEST_ROWS) {
                diesel::sql_query(
                    "UPDATE presence_intervals p SET left_at = $1 WHERE p.id IN (SELECT o.id \
                     FROM unnest($3::text[]) AS s(session_id) CROSS JOIN LATERAL (SELECT id \
                     FROM presence_intervals WHERE node_id = $2 AND left_at IS NULL \
                     AND session_id = s.session_id OFFSET 0) o)",
                )
                .bind::<BigInt, _>(left_at)
                .bind::<Text, _>(node_id)
                .bind::<Array<Text>, _>(chunk)
                .execute(c)?;
            }
        }
        DbConn::Sqlite(c) => {
            for chunk in session_ids.chunks(per_statement) {
                diesel::update(
                    presence_intervals::table
                        .filter(i::node_id.eq(node_id))
                        .filter(i::left_at.is_null())
                        .filter(i::session_id.eq_any(chunk)),
                )
                .set(i::left_at.eq(Some(left_at)))
                .execute(c)?;
            }
        }
    }
    Ok(())
}

/// Closes the open intervals of these (session, room) pairs that began at or before `left_at`
/// (so that a leave and a re-join in one batch close the old interval and keep the new one),
/// in one statement per chunk instead of one per pair (a tick under churn closes thousands;
/// one by one they were a sixth of the writer's CPU on SQLite).
///
/// SQLite lists the session ids twice: once in an `IN` list, which lets the partial index on
/// open intervals find the sessions (with the row values alone SQLite walks every open
/// interval of the node), once in row values that pick their rooms. PostgreSQL: see
/// `close_sessions`.
fn close_rooms(
    conn: &mut DbConn,
    node_id: &str,
    left_at: i64,
    pairs: &[(&str, &str)],
) -> Result<(), StoreError> {
    use diesel::sql_types::{Array, BigInt, Text};
    // SQLite: three fixed parameters, then three per pair.
    let per_statement = (max_binds(conn) - 3) / 3;
    match conn {
        DbConn::Pg(c) => {
            for chunk in pairs.chunks(PG_UNNEST_ROWS) {
                diesel::sql_query(
                    "UPDATE presence_intervals p SET left_at = $1 WHERE p.id IN (SELECT o.id \
                     FROM unnest($3::text[], $4::text[]) AS s(session_id, room) \
                     CROSS JOIN LATERAL (SELECT id FROM presence_intervals \
                     WHERE node_id = $2 AND left_at IS NULL AND session_id = s.session_id \
                     AND room = s.room AND joined_at <= $1 OFFSET 0) o)",
                )
                .bind::<BigInt, _>(left_at)
                .bind::<Text, _>(node_id)
                .bind::<Array<Text>, _>(chunk.iter().map(|(s, _)| *s).collect::<Vec<_>>())
                .bind::<Array<Text>, _>(chunk.iter().map(|(_, r)| *r).collect::<Vec<_>>())
                .execute(c)?;
            }
        }
        DbConn::Sqlite(c) => {
            for chunk in pairs.chunks(per_statement) {
                let ids = vec!["?"; chunk.len()].join(", ");
                let rows = vec!["(?, ?)"; chunk.len()].join(", ");
                let sql = format!(
                    "UPDATE presence_intervals SET left_at = ? WHERE node_id = ? \
                     AND left_at IS NULL AND joined_at <= ? AND session_id IN ({ids}) \
                     AND (session_id, room) IN (VALUES {rows})"
                );
                let mut q = diesel::sql_query(sql)
                    .into_boxed()
                    .bind::<BigInt, _>(left_at)
                    .bind::<Text, _>(node_id)
                    .bind::<BigInt, _>(left_at);
                for (session, _) in chunk {
                    q = q.bind::<Text, _>(*session);
                }
                for (session, room) in chunk {
                    q = q.bind::<Text, _>(*session).bind::<Text, _>(*room);
                }
                q.execute(c)?;
            }
        }
    }
    Ok(())
}

/// Deletes rows of `table` whose ids are `ids`, in chunks under the bind limit.
macro_rules! delete_ids {
    ($conn:expr, $table:ident, $ids:expr) => {{
        let per_statement = max_binds($conn);
        let mut deleted = 0;
        for chunk in $ids.chunks(per_statement) {
            deleted += diesel::delete($table::table.filter($table::id.eq_any(chunk)))
                .execute(&mut *$conn)?;
        }
        Ok::<usize, StoreError>(deleted)
    }};
}

/// One batch of step 1 of `prune_history`; returns how many samples it deleted.
fn delete_old_samples(conn: &mut DbConn, before: i64, batch: i64) -> Result<usize, StoreError> {
    use presence_samples::dsl as s;
    write_transaction(conn, |conn| {
        let ids: Vec<i64> = presence_samples::table
            .filter(s::at.lt(before))
            .order(s::at.asc())
            .limit(batch)
            .select(s::id)
            .load(conn)?;
        delete_ids!(conn, presence_samples, ids)
    })
}

/// One batch of step 3 of `prune_history`; returns how many intervals it deleted.
fn delete_old_intervals(conn: &mut DbConn, before: i64, batch: i64) -> Result<usize, StoreError> {
    use presence_intervals::dsl as i;
    write_transaction(conn, |conn| {
        let ids: Vec<i64> = presence_intervals::table
            .filter(i::left_at.lt(before))
            .order(i::left_at.asc())
            .limit(batch)
            .select(i::id)
            .load(conn)?;
        delete_ids!(conn, presence_intervals, ids)
    })
}

/// The key of a rollup row: node, account, room, bucket start.
type BucketKey = (String, String, String, i64);

/// One batch of step 2 of `prune_history`: folds up to `batch` raw samples older than `before`
/// into their buckets' rows; returns how many raw samples it folded.
fn downsample_batch(
    conn: &mut DbConn,
    before: i64,
    bucket: i64,
    batch: i64,
) -> Result<usize, StoreError> {
    use presence_samples::dsl as s;
    write_transaction(conn, |conn| {
        let raw: Vec<(i64, String, String, String, i64, i64, i64)> = presence_samples::table
            .filter(s::resolution_ms.lt(bucket))
            .filter(s::at.lt(before))
            .order((s::resolution_ms.asc(), s::at.asc(), s::id.asc()))
            .limit(batch)
            .select((
                s::id,
                s::node_id,
                s::account_id,
                s::room,
                s::at,
                s::users,
                s::connections,
            ))
            .load(conn)?;
        if raw.is_empty() {
            return Ok(0);
        }
        let mut buckets: BTreeMap<BucketKey, (i64, i64)> = BTreeMap::new();
        let mut ids = Vec::with_capacity(raw.len());
        for (id, node_id, account_id, room, at, users, connections) in raw {
            ids.push(id);
            let start = at.div_euclid(bucket) * bucket;
            let peak = buckets
                .entry((node_id, account_id, room, start))
                .or_insert((users, connections));
            *peak = (peak.0.max(users), peak.1.max(connections));
        }
        let folded = ids.len();
        let mut fresh = Vec::new();
        for ((node_id, account_id, room, start), (users, connections)) in buckets {
            let existing: Vec<(i64, i64, i64)> = presence_samples::table
                .filter(s::account_id.eq(&account_id))
                .filter(s::room.eq(&room))
                .filter(s::at.eq(start))
                .filter(s::node_id.eq(&node_id))
                .filter(s::resolution_ms.eq(bucket))
                .select((s::id, s::users, s::connections))
                .load(conn)?;
            match existing.split_first() {
                None => fresh.push(Sample {
                    node_id,
                    account_id,
                    room,
                    at: start,
                    resolution_ms: bucket,
                    users,
                    connections,
                }),
                Some((&(keep, kept_users, kept_connections), extra)) => {
                    let users = extra.iter().fold(users.max(kept_users), |m, e| m.max(e.1));
                    let connections = extra
                        .iter()
                        .fold(connections.max(kept_connections), |m, e| m.max(e.2));
                    diesel::update(presence_samples::table.find(keep))
                        .set((s::users.eq(users), s::connections.eq(connections)))
                        .execute(conn)?;
                    ids.extend(extra.iter().map(|e| e.0));
                }
            }
        }
        delete_ids!(conn, presence_samples, ids)?;
        insert_samples(conn, &fresh)?;
        Ok(folded)
    })
}
