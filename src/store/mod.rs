//! The persistence layer: a blocking API over an r2d2 pool of Diesel connections, on SQLite or
//! PostgreSQL, chosen by the URL's scheme.
//!
//! Every method blocks on the database, so callers run it inside `web::block` or a `SyncArbiter`,
//! never on an actor's or an HTTP worker's thread. Queries are written once against [`DbConn`],
//! a `MultiConnection` over both backends, in the Diesel DSL the two share. What that common
//! subset cannot say (`ON CONFLICT` upserts) is written with [`on_backend!`], which expands one
//! Diesel expression for each backend's own connection, so there is still one copy of the code;
//! the one hand-written statement is PostgreSQL's bulk snapshot upsert (see `snapshots.rs`). Writes that return a row read it back in the same
//! transaction, write first so that SQLite takes its write lock where `busy_timeout` applies;
//! transactions that read before they write use [`write_transaction`] (`BEGIN IMMEDIATE` on
//! SQLite). Timestamps are unix milliseconds; ids are text made by [`new_id`].

pub mod admin;
mod connect;
mod error;
pub mod models;
pub mod schema;
mod snapshots;
#[doc(hidden)]
pub mod testdb;
#[cfg(test)]
mod tests;
mod usage;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use diesel::connection::{AnsiTransactionManager, TransactionManager};
use diesel::prelude::*;
use diesel::sql_types::Integer;
use diesel::upsert::excluded;
use diesel::IntoSql;
use rand::Rng;

pub use connect::redact as redact_database_url;
pub use error::StoreError;
pub use models::{
    Account, AuditLog, NewAccount, NewAuditLog, NewRefreshToken, NewUser, Plan, RefreshToken, User,
};
pub use snapshots::{
    Interval, IntervalClose, IntervalOpen, PruneReport, RetentionPolicy, Sample, SessionSnapshot,
    SnapshotBatch,
};
pub use usage::{BillingAlert, NewBillingAlert, UsageRow, UsageTotals};

use models::AccountChanges;
use schema::{accounts, audit_logs, plans, refresh_tokens, server_keys, user_presence, users};

/// Which backend `url` names, `"postgres"` or `"sqlite"`, or why it names none: an unknown
/// scheme, a PostgreSQL URL that does not parse or names no host. Connects to nothing; the
/// message never repeats a password. For validating configuration before start-up.
pub fn database_backend(url: &str) -> Result<&'static str, String> {
    match connect::Target::parse(url) {
        Ok(target) => Ok(target.backend()),
        Err(StoreError::Other(message)) => Err(message),
        Err(other) => Err(other.to_string()),
    }
}

/// The connection every query is written against: PostgreSQL or SQLite, as the URL says.
#[derive(diesel::MultiConnection)]
pub enum DbConn {
    Pg(diesel::PgConnection),
    Sqlite(diesel::SqliteConnection),
}

/// The pool the store draws connections from.
pub(crate) type Pool = r2d2::Pool<connect::Manager>;

/// Runs `$body` with `$c` bound to the backend's own connection (`&mut PgConnection` or
/// `&mut SqliteConnection`), for statements the shared `DbConn` cannot express. The body is
/// written once and compiled for each backend.
macro_rules! on_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::store::DbConn::Pg($c) => $body,
            $crate::store::DbConn::Sqlite($c) => $body,
        }
    };
}
pub(crate) use on_backend;

/// Runs `f` in a transaction that may write after it reads: `BEGIN IMMEDIATE` on SQLite, which
/// takes the write lock up front, where `busy_timeout` applies (a deferred transaction that
/// reads first fails at its first write if another connection wrote meanwhile); plain `BEGIN` on
/// PostgreSQL. Commits if `f` succeeds, rolls back otherwise.
pub(crate) fn write_transaction<T>(
    conn: &mut DbConn,
    f: impl FnOnce(&mut DbConn) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    match conn {
        DbConn::Sqlite(c) => AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?,
        DbConn::Pg(_) => <DbConn as Connection>::TransactionManager::begin_transaction(conn)?,
    }
    match f(conn) {
        Ok(value) => {
            <DbConn as Connection>::TransactionManager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => {
            if let Err(rollback) =
                <DbConn as Connection>::TransactionManager::rollback_transaction(conn)
            {
                log::warn!("store: rollback failed after {e}: {rollback}");
            }
            Err(e)
        }
    }
}

/// Random characters in an id after its prefix: 36^16 ≈ 2^82 possibilities.
const ID_RANDOM_LEN: usize = 16;
const ID_ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A handle on the database; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: Pool,
    /// `"postgres"` or `"sqlite"`; reported by `/readyz` and logs.
    backend: &'static str,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.pool.state();
        f.debug_struct("Store")
            .field("backend", &self.backend)
            .field("connections", &state.connections)
            .field("idle_connections", &state.idle_connections)
            .finish()
    }
}

impl Store {
    /// Opens and migrates the database at `url`.
    ///
    /// PostgreSQL: `postgres://user:password@host:5432/db` (or `postgresql://`); the server must
    /// be reachable, or this is `StoreError::Unavailable` naming `host:port` and libpq's reason
    /// (never the password). Pooled connections are checked on checkout, so the pool survives
    /// the server restarting; a checkout waits at most 2 s.
    ///
    /// SQLite: `sqlite://data/presenced.db`, `sqlite:///abs/path.db`, `sqlite::memory:` or a bare
    /// path. The parent directory of a file is created. Every connection gets WAL,
    /// `busy_timeout = 5000`, `foreign_keys = ON` and `synchronous = NORMAL`. An in-memory
    /// database exists only inside its connection, so its pool holds exactly one.
    ///
    /// `pool_size` connections at most are pooled (at least one). Pending migrations run in one
    /// transaction; a failure is `StoreError::Migration` naming the migration and the
    /// database's message, and nothing of any of them is applied.
    pub fn open(url: &str, pool_size: u32) -> Result<Store, StoreError> {
        let target = connect::Target::parse(url)?;
        let pool = connect::open_pool(&target, pool_size)?;
        Ok(Store {
            pool,
            backend: target.backend(),
        })
    }

    /// Checks that a pooled connection answers a query; for `/readyz`.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            diesel::select(1_i32.into_sql::<Integer>()).get_result::<i32>(conn)?;
            Ok(())
        })
    }

    /// Checks that a connection can be had within `timeout` and answers a query; for `/readyz`,
    /// which should not hang for the pool's whole checkout timeout.
    pub fn ping_within(&self, timeout: Duration) -> Result<(), StoreError> {
        let mut conn = self.pool.get_timeout(timeout)?;
        diesel::select(1_i32.into_sql::<Integer>()).get_result::<i32>(&mut *conn)?;
        Ok(())
    }

    /// The database kind behind this store: `"postgres"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut DbConn) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.get()?;
        f(&mut conn)
    }

    // ---- plans ----

    pub fn get_plan(&self, id: &str) -> Result<Plan, StoreError> {
        self.with_conn(|conn| {
            Ok(plans::table
                .find(id)
                .select(Plan::as_select())
                .first(conn)?)
        })
    }

    /// All plans, smallest first.
    pub fn list_plans(&self) -> Result<Vec<Plan>, StoreError> {
        self.with_conn(|conn| {
            Ok(plans::table
                .select(Plan::as_select())
                .order((plans::max_connections.asc(), plans::id.asc()))
                .load(conn)?)
        })
    }

    // ---- accounts ----

    /// Inserts an account; `NotFound` if its plan does not exist, `Conflict("id")` if the id is
    /// taken.
    pub fn create_account(&self, new: &NewAccount) -> Result<Account, StoreError> {
        self.with_conn(|conn| {
            conn.transaction(|conn| {
                diesel::insert_into(accounts::table)
                    .values(new)
                    .execute(conn)?;
                find_account(conn, new.id)
            })
        })
    }

    /// Every account, oldest first.
    pub fn list_accounts(&self) -> Result<Vec<Account>, StoreError> {
        self.with_conn(|conn| {
            Ok(accounts::table
                .select(Account::as_select())
                .order((accounts::created_at.asc(), accounts::id.asc()))
                .load(conn)?)
        })
    }

    pub fn get_account(&self, id: &str) -> Result<Account, StoreError> {
        self.with_conn(|conn| find_account(conn, id))
    }

    /// Changes the given fields (`None` leaves one alone) and stamps `updated_at`. `NotFound` if
    /// the account or the new plan does not exist.
    pub fn update_account(
        &self,
        id: &str,
        name: Option<&str>,
        plan_id: Option<&str>,
        settings: Option<&str>,
        now_ms: i64,
    ) -> Result<Account, StoreError> {
        let changes = AccountChanges {
            name,
            plan_id,
            settings,
            updated_at: now_ms,
        };
        self.with_conn(|conn| {
            conn.transaction(|conn| {
                match diesel::update(accounts::table.find(id))
                    .set(&changes)
                    .execute(conn)?
                {
                    0 => Err(StoreError::NotFound),
                    _ => find_account(conn, id),
                }
            })
        })
    }

    /// Makes `new_secret` the signing secret and keeps the current one as the previous secret,
    /// accepted until `previous_expires_at`. One UPDATE, so concurrent rotations cannot lose a
    /// secret in between.
    pub fn rotate_secret(
        &self,
        id: &str,
        new_secret: &str,
        previous_expires_at: i64,
        now_ms: i64,
    ) -> Result<Account, StoreError> {
        self.with_conn(|conn| {
            conn.transaction(|conn| {
                let rotated = diesel::update(accounts::table.find(id))
                    .set((
                        // SQL evaluates every right-hand side on the old row.
                        accounts::previous_signing_secret.eq(accounts::signing_secret.nullable()),
                        accounts::signing_secret.eq(new_secret),
                        accounts::previous_secret_expires_at.eq(Some(previous_expires_at)),
                        accounts::updated_at.eq(now_ms),
                    ))
                    .execute(conn)?;
                match rotated {
                    0 => Err(StoreError::NotFound),
                    _ => find_account(conn, id),
                }
            })
        })
    }

    // ---- users ----

    /// Inserts a user with its email lowercased. `Conflict("email")` if the email is taken,
    /// `NotFound` if its account does not exist.
    pub fn create_user(&self, new: &NewUser) -> Result<User, StoreError> {
        let email = normalize_email(new.email);
        let row = NewUser {
            email: &email,
            ..new.clone()
        };
        self.with_conn(|conn| {
            conn.transaction(|conn| {
                diesel::insert_into(users::table)
                    .values(&row)
                    .execute(conn)?;
                Ok(users::table
                    .find(row.id)
                    .select(User::as_select())
                    .first(conn)?)
            })
        })
    }

    /// The user with this email, compared case-insensitively.
    pub fn find_user_by_email(&self, email: &str) -> Result<Option<User>, StoreError> {
        let email = normalize_email(email);
        self.with_conn(|conn| {
            Ok(users::table
                .filter(users::email.eq(&email))
                .select(User::as_select())
                .first(conn)
                .optional()?)
        })
    }

    pub fn get_user(&self, id: &str) -> Result<User, StoreError> {
        self.with_conn(|conn| {
            Ok(users::table
                .find(id)
                .select(User::as_select())
                .first(conn)?)
        })
    }

    /// Deletes a user and, by cascade, its refresh tokens; `NotFound` if there was none.
    pub fn delete_user(&self, id: &str) -> Result<(), StoreError> {
        self.with_conn(
            |conn| match diesel::delete(users::table.find(id)).execute(conn)? {
                0 => Err(StoreError::NotFound),
                _ => Ok(()),
            },
        )
    }

    /// How many users have role `admin`, disabled ones included (so that start-up does not try
    /// to bootstrap a second admin over a disabled one with the same email).
    pub fn count_admins(&self) -> Result<i64, StoreError> {
        self.with_conn(|conn| {
            Ok(users::table
                .filter(users::role.eq("admin"))
                .count()
                .get_result(conn)?)
        })
    }

    // ---- refresh tokens ----

    /// Stores a new token; `NotFound` if its user does not exist.
    pub fn insert_refresh_token(&self, t: &NewRefreshToken) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            diesel::insert_into(refresh_tokens::table)
                .values(t)
                .execute(conn)?;
            Ok(())
        })
    }

    /// The token whose hex SHA-256 is `token_hash`, whatever its state.
    pub fn find_refresh_token(&self, token_hash: &str) -> Result<Option<RefreshToken>, StoreError> {
        self.with_conn(|conn| {
            Ok(refresh_tokens::table
                .filter(refresh_tokens::token_hash.eq(token_hash))
                .select(RefreshToken::as_select())
                .first(conn)
                .optional()?)
        })
    }

    /// Marks the token spent if it is live (neither spent nor revoked) and says whether this
    /// call did it. One conditional UPDATE, so of two concurrent refreshes with the same token
    /// exactly one gets `true`; `false` means reuse (or revocation) and the caller should
    /// revoke the family.
    pub fn spend_refresh_token(&self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let changed = diesel::update(
                refresh_tokens::table
                    .find(id)
                    .filter(refresh_tokens::spent_at.is_null())
                    .filter(refresh_tokens::revoked_at.is_null()),
            )
            .set(refresh_tokens::spent_at.eq(Some(now_ms)))
            .execute(conn)?;
            Ok(changed == 1)
        })
    }

    /// Revokes every not yet revoked token of the family; returns how many it revoked.
    pub fn revoke_family(&self, family_id: &str, now_ms: i64) -> Result<usize, StoreError> {
        self.with_conn(|conn| {
            Ok(diesel::update(
                refresh_tokens::table
                    .filter(refresh_tokens::family_id.eq(family_id))
                    .filter(refresh_tokens::revoked_at.is_null()),
            )
            .set(refresh_tokens::revoked_at.eq(Some(now_ms)))
            .execute(conn)?)
        })
    }

    // ---- server key ----

    /// The secret stored under `id`, storing `make()` first if there is none. `make` runs only
    /// when the key is absent; if two nodes race, both get the one that was stored first.
    pub fn get_or_create_server_key(
        &self,
        id: &str,
        make: impl FnOnce() -> String,
        now_ms: i64,
    ) -> Result<String, StoreError> {
        self.with_conn(|conn| {
            let find = |conn: &mut DbConn| {
                server_keys::table
                    .find(id)
                    .select(server_keys::secret)
                    .first::<String>(conn)
                    .optional()
            };
            if let Some(secret) = find(conn)? {
                return Ok(secret);
            }
            let secret = make();
            let inserted = diesel::insert_into(server_keys::table)
                .values((
                    server_keys::id.eq(id),
                    server_keys::secret.eq(&secret),
                    server_keys::created_at.eq(now_ms),
                ))
                .execute(conn);
            match inserted.map_err(StoreError::from) {
                Ok(_) => Ok(secret),
                // Another node stored its key between our read and our insert: use that one.
                Err(StoreError::Conflict(_)) => find(conn)?.ok_or(StoreError::NotFound),
                Err(e) => Err(e),
            }
        })
    }

    // ---- audit ----

    pub fn append_audit(&self, e: &NewAuditLog) -> Result<(), StoreError> {
        self.with_conn(|conn| {
            diesel::insert_into(audit_logs::table)
                .values(e)
                .execute(conn)?;
            Ok(())
        })
    }

    /// Entries with `from_ms <= at < to_ms`, of one account or (`None`) of all, newest first, at
    /// most `limit` of them.
    pub fn list_audit(
        &self,
        account_id: Option<&str>,
        from_ms: i64,
        to_ms: i64,
        limit: i64,
    ) -> Result<Vec<AuditLog>, StoreError> {
        self.with_conn(|conn| {
            let mut query = audit_logs::table
                .filter(audit_logs::at.ge(from_ms))
                .filter(audit_logs::at.lt(to_ms))
                .select(AuditLog::as_select())
                .order((audit_logs::at.desc(), audit_logs::id.desc()))
                .limit(limit.max(0))
                .into_boxed();
            if let Some(account_id) = account_id {
                query = query.filter(audit_logs::account_id.eq(account_id));
            }
            Ok(query.load(conn)?)
        })
    }

    // ---- last seen ----

    /// Records last-seen times (account id, user id, unix ms) in one transaction, keeping the
    /// later time where a row exists. Duplicate keys in `rows` are fine.
    pub fn upsert_last_seen(&self, rows: &[(String, String, i64)]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        self.with_conn(|conn| conn.transaction(|conn| upsert_last_seen_rows(conn, rows)))
    }

    /// The last-seen time of one end user of an account, if any was recorded.
    pub fn last_seen(&self, account_id: &str, user_id: &str) -> Result<Option<i64>, StoreError> {
        self.with_conn(|conn| {
            Ok(user_presence::table
                .find((account_id, user_id))
                .select(user_presence::last_seen)
                .first(conn)
                .optional()?)
        })
    }
}

fn find_account(conn: &mut DbConn, id: &str) -> Result<Account, StoreError> {
    Ok(accounts::table
        .find(id)
        .select(Account::as_select())
        .first(conn)?)
}

/// How many bind parameters one statement may carry: PostgreSQL's protocol caps them at 65 535,
/// SQLite (3.32 and later, as bundled) at 32 766.
fn max_binds(conn: &DbConn) -> usize {
    match conn {
        DbConn::Pg(_) => 65_535,
        DbConn::Sqlite(_) => 32_766,
    }
}

/// Rows per multi-row statement for a table of `columns` bound columns.
fn rows_per_statement(conn: &DbConn, columns: usize) -> usize {
    (max_binds(conn) / columns.max(1)).max(1)
}

/// Upserts last-seen times keeping the latest, inside the caller's transaction: one entry per
/// key (a PostgreSQL upsert may not touch a row twice), in key order (so that concurrent
/// writers lock rows in the same order and cannot deadlock), in multi-row `INSERT … ON CONFLICT
/// DO UPDATE` statements that keep the later time.
fn upsert_last_seen_rows(
    conn: &mut DbConn,
    rows: &[(String, String, i64)],
) -> Result<(), StoreError> {
    use diesel::dsl::case_when;
    use user_presence::dsl::{account_id, last_seen, user_id};
    let mut latest: BTreeMap<(&str, &str), i64> = BTreeMap::new();
    for (account, user, seen) in rows {
        let entry = latest
            .entry((account.as_str(), user.as_str()))
            .or_insert(*seen);
        *entry = (*entry).max(*seen);
    }
    let values: Vec<_> = latest
        .iter()
        .map(|(&(account, user), &seen)| {
            (account_id.eq(account), user_id.eq(user), last_seen.eq(seen))
        })
        .collect();
    for chunk in values.chunks(rows_per_statement(conn, 3)) {
        on_backend!(&mut *conn, |c| diesel::insert_into(user_presence::table)
            .values(chunk)
            .on_conflict((account_id, user_id))
            .do_update()
            // SQLite's multi-row upsert takes no `WHERE`: keep the max with a CASE instead.
            .set(
                last_seen.eq(
                    case_when(excluded(last_seen).gt(last_seen), excluded(last_seen))
                        .otherwise(last_seen)
                )
            )
            .execute(c))?;
    }
    Ok(())
}

/// Emails are compared and stored lowercased, so `Ann@X.io` and `ann@x.io` are one user.
fn normalize_email(email: &str) -> String {
    email.to_lowercase()
}

/// A fresh id: `prefix` followed by 16 random characters from `[a-z0-9]`, e.g.
/// `new_id("acc_")` → `"acc_3k9xq0z7m2b8c4rt"`. Drawn from the thread's CSPRNG.
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let mut id = String::with_capacity(prefix.len() + ID_RANDOM_LEN);
    id.push_str(prefix);
    id.extend(
        (0..ID_RANDOM_LEN).map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())])),
    );
    id
}
