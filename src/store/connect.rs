//! Opening the database: the URL forms the store accepts, the connection manager that picks the
//! backend from the URL's scheme, the per-connection SQLite PRAGMAs, the r2d2 pool and the
//! embedded migrations.
//!
//! The backend is chosen here, from the scheme, rather than by `DbConn::establish` (the
//! `MultiConnection` derive tries each backend in turn and reports every failure as "Invalid
//! connection url", hiding a refused port or a wrong password). A PostgreSQL URL's password
//! never leaves this file: every message names the URL in its [`redact`]ed form.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::pg::Pg;
use diesel::r2d2::R2D2Connection;
use diesel::sql_types::BigInt;
use diesel::sqlite::Sqlite;
use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{DbConn, Pool, StoreError};

/// The SQLite migrations, compiled into the binary so a fresh node needs no files beside it.
pub(crate) const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
/// The PostgreSQL migrations: the same tables and columns in PostgreSQL's dialect.
pub(crate) const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// How long a query waits for another connection's write lock before failing with
/// "database is locked" (SQLite `busy_timeout`, milliseconds).
const BUSY_TIMEOUT_MS: u32 = 5_000;

/// How long a caller waits for a free pooled SQLite connection before getting
/// `StoreError::Unavailable`; as long as SQLite's own wait for the write lock.
const SQLITE_CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// The same for PostgreSQL: short, so that `/readyz` and requests fail fast while the server is
/// away.
const PG_CHECKOUT_TIMEOUT: Duration = Duration::from_secs(2);

/// The key of the advisory lock that serializes migrations between nodes starting together on
/// one PostgreSQL database (any constant works; this is "presence" in ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x0070_7265_7365_6e63;

/// Where a `database.url` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A private in-memory SQLite database that lives as long as its one connection.
    Memory,
    /// A SQLite database file; its parent directory is created if missing.
    File(String),
    /// A PostgreSQL server.
    Postgres(PgTarget),
}

/// A parsed PostgreSQL URL.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct PgTarget {
    /// The URL as given, password included: handed to libpq and to nothing else.
    url: String,
    /// The URL with its password replaced by `***`: for messages.
    pub(crate) redacted: String,
    /// `host:port` (or the socket directory) for messages.
    pub(crate) host_port: String,
    /// The password as written in the URL and percent-decoded, to scrub from libpq's messages.
    secrets: Vec<String>,
}

impl fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTarget")
            .field("url", &self.redacted)
            .field("host_port", &self.host_port)
            .finish()
    }
}

impl PgTarget {
    /// Removes the password from a message that might repeat it (libpq does not, but a message
    /// is cheap to scrub) and puts a multi-line libpq message on one line.
    fn scrub(&self, message: &str) -> String {
        let mut out = message.split_whitespace().collect::<Vec<_>>().join(" ");
        for secret in &self.secrets {
            if !secret.is_empty() {
                out = out.replace(secret.as_str(), "***");
            }
        }
        out
    }
}

impl Target {
    /// Understands `postgres://…` and `postgresql://…` (libpq URLs, which must name a host, in
    /// the authority or as a `host=` parameter), and for SQLite `sqlite://relative/path.db`,
    /// `sqlite:///absolute/path.db`, `sqlite:path.db`, `sqlite::memory:`, `:memory:` and a bare
    /// path. Other schemes are refused by name only. No message repeats a password.
    pub(crate) fn parse(url: &str) -> Result<Target, StoreError> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return PgTarget::parse(url).map(Target::Postgres);
        }
        let rest = match url.strip_prefix("sqlite:") {
            Some(rest) => rest.strip_prefix("//").unwrap_or(rest),
            None => {
                if let Some((scheme, _)) = url.split_once("://") {
                    return Err(StoreError::Other(format!(
                        "unsupported database URL scheme `{scheme}`: use \
                         postgres://user@host/db, sqlite://path/to/file.db or sqlite::memory:"
                    )));
                }
                url
            }
        };
        match rest {
            "" => Err(StoreError::Other(
                "empty database path in the database URL".to_owned(),
            )),
            ":memory:" => Ok(Target::Memory),
            path => Ok(Target::File(path.to_owned())),
        }
    }

    /// `"postgres"` or `"sqlite"`.
    pub(crate) fn backend(&self) -> &'static str {
        match self {
            Target::Postgres(_) => "postgres",
            Target::Memory | Target::File(_) => "sqlite",
        }
    }
}

impl PgTarget {
    fn parse(url: &str) -> Result<PgTarget, StoreError> {
        // The url crate's messages ("invalid port number", …) never repeat the input.
        let parsed = url::Url::parse(url)
            .map_err(|e| StoreError::Other(format!("invalid PostgreSQL URL: {e}")))?;
        let query_host = parsed
            .query_pairs()
            .find(|(k, _)| k == "host")
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty());
        let port = parsed
            .port()
            .or_else(|| {
                parsed
                    .query_pairs()
                    .find(|(k, _)| k == "port")
                    .and_then(|(_, v)| v.parse().ok())
            })
            .unwrap_or(5432);
        let host_port = match (parsed.host_str().filter(|h| !h.is_empty()), query_host) {
            (Some(host), _) => format!("{host}:{port}"),
            (None, Some(socket_dir)) => format!("{socket_dir}:{port}"),
            (None, None) => {
                return Err(StoreError::Other(
                    "PostgreSQL URL names no host: use postgres://user@host:5432/db".to_owned(),
                ))
            }
        };
        let mut secrets = Vec::new();
        if let Some(password) = parsed.password() {
            secrets.push(password.to_owned());
            if let Ok(decoded) = percent_decode(password) {
                secrets.push(decoded);
            }
        }
        for (key, value) in parsed.query_pairs() {
            if key == "password" {
                secrets.push(value.into_owned());
            }
        }
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Ok(PgTarget {
            url: url.to_owned(),
            redacted: redact_parsed(parsed),
            host_port,
            secrets,
        })
    }
}

/// `url` with any password (`user:secret@` or `?password=secret`) replaced by `***`, for logs:
/// `postgres://app:***@db:5432/presenced`. SQLite URLs and paths come back unchanged; a string
/// that is not a URL at all comes back as `<unparsable URL>` if it might hold a password.
pub fn redact(url: &str) -> String {
    let trimmed = url.trim();
    if !trimmed.contains("://") {
        return trimmed.to_owned();
    }
    match url::Url::parse(trimmed) {
        Ok(parsed) => redact_parsed(parsed),
        Err(_) if trimmed.contains('@') || trimmed.contains("password") => {
            "<unparsable URL>".to_owned()
        }
        Err(_) => trimmed.to_owned(),
    }
}

fn redact_parsed(mut parsed: url::Url) -> String {
    if parsed.password().is_some() {
        // Cannot fail: the URL has a host, or it could not have had a password.
        let _ = parsed.set_password(Some("***"));
    }
    if parsed.query_pairs().any(|(k, _)| k == "password") {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "password" {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // `*` is kept as is in the userinfo, but the query serializer encodes it.
    parsed.to_string().replace("%2A%2A%2A", "***")
}

fn percent_decode(s: &str) -> Result<String, std::string::FromUtf8Error> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
}

/// Applies the PRAGMAs every SQLite connection needs, as each one is opened.
///
/// `busy_timeout` comes first so that switching to WAL waits for other connections rather than
/// failing; `foreign_keys` is per connection in SQLite and off by default; so is
/// `journal_size_limit`, which bounds the WAL file ([`WAL_SIZE_LIMIT_BYTES`]). `temp_store`
/// keeps temporary files in memory: the statement journal of each multi-row statement in a
/// snapshot's transaction was a temporary file, written page by page (7 % of the writer's CPU
/// under churn).
fn apply_sqlite_pragmas(conn: &mut SqliteConnection) -> diesel::QueryResult<()> {
    conn.batch_execute(&format!(
        "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; \
         PRAGMA journal_mode = WAL; \
         PRAGMA foreign_keys = ON; \
         PRAGMA synchronous = NORMAL; \
         PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}; \
         PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}; \
         PRAGMA temp_store = MEMORY;"
    ))
}

/// The most a WAL file keeps on disk once a checkpoint has let it start over. Without a limit
/// SQLite reuses the file at the largest size it ever reached (a burst of ticks while the
/// writer was behind, a restore): disk that a small node never gets back. This is above what
/// churn over 19 500 sessions brings it to (44 MB at most, measured; `WAL_AUTOCHECKPOINT_PAGES`
/// bounds it near there), so the file is not cut and regrown every tick.
pub(crate) const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// WAL pages after which a committing connection checkpoints by itself. The snapshot writer
/// checkpoints after every tick (`Store::checkpoint`), once for all the tick's slices, so that a
/// page rewritten by several slices is copied to the database once; this larger threshold
/// (~40 MB) only bounds the WAL when ticks are rare or stopped.
const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// Why a connection could not be made, already redacted and on one line.
#[derive(Debug)]
pub(crate) struct ConnectError(pub(crate) String);

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// The r2d2 connection manager: opens the backend the URL names and reports the real cause
/// when it cannot.
#[derive(Debug)]
pub(crate) struct Manager {
    target: Target,
}

impl Manager {
    pub(crate) fn new(target: Target) -> Manager {
        Manager { target }
    }

    fn establish(&self) -> Result<DbConn, ConnectError> {
        match &self.target {
            Target::Postgres(pg) => PgConnection::establish(&pg.url)
                .map(DbConn::Pg)
                .map_err(|e| {
                    ConnectError(format!(
                        "cannot connect to PostgreSQL at {}: {}",
                        pg.host_port,
                        pg.scrub(&e.to_string())
                    ))
                }),
            Target::Memory => sqlite_connection(":memory:"),
            Target::File(path) => sqlite_connection(path),
        }
    }
}

fn sqlite_connection(path: &str) -> Result<DbConn, ConnectError> {
    let mut conn = SqliteConnection::establish(path)
        .map_err(|e| ConnectError(format!("cannot open {path}: {e}")))?;
    apply_sqlite_pragmas(&mut conn)
        .map_err(|e| ConnectError(format!("cannot set up {path}: {e}")))?;
    Ok(DbConn::Sqlite(conn))
}

impl r2d2::ManageConnection for Manager {
    type Connection = DbConn;
    type Error = ConnectError;

    fn connect(&self) -> Result<DbConn, ConnectError> {
        self.establish()
    }

    /// Run on checkout for PostgreSQL (`test_on_check_out`): a connection to a server that
    /// restarted is dropped here and r2d2 opens a fresh one, so callers never see it.
    fn is_valid(&self, conn: &mut DbConn) -> Result<(), ConnectError> {
        conn.ping().map_err(|e| ConnectError(e.to_string()))
    }

    /// A connection whose transaction could not be closed (an error during rollback, a panic
    /// inside a transaction) is not returned to the pool.
    fn has_broken(&self, conn: &mut DbConn) -> bool {
        conn.is_broken()
    }
}

/// Opens the database behind `target`, migrated, as a pool of `pool_size` connections
/// (exactly one for an in-memory database, which is private to its connection).
pub(crate) fn open_pool(target: &Target, pool_size: u32) -> Result<Pool, StoreError> {
    let manager = Manager::new(target.clone());
    match target {
        Target::Memory => {
            // One connection kept forever: r2d2 would otherwise retire it after its idle timeout
            // or lifetime, and the whole database with it.
            let pool = r2d2::Pool::builder()
                .max_size(1)
                .connection_timeout(SQLITE_CHECKOUT_TIMEOUT)
                .idle_timeout(None)
                .max_lifetime(None)
                .build(manager)?;
            let mut conn = pool.get()?;
            migrate(&mut conn)?;
            drop(conn);
            Ok(pool)
        }
        Target::File(path) => {
            if let Some(parent) = Path::new(path).parent() {
                if !parent.as_os_str().is_empty() {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        StoreError::Unavailable(format!(
                            "cannot create directory {}: {e}",
                            parent.display()
                        ))
                    })?;
                }
            }
            // A first connection outside the pool: if the file cannot be opened the caller sees
            // SQLite's reason, not r2d2's "timed out waiting for connection".
            let mut conn = manager
                .establish()
                .map_err(|e| StoreError::Unavailable(e.0))?;
            migrate(&mut conn)?;
            drop(conn);
            Ok(r2d2::Pool::builder()
                .max_size(pool_size.max(1))
                .connection_timeout(SQLITE_CHECKOUT_TIMEOUT)
                .idle_timeout(Some(Duration::from_secs(10 * 60)))
                .max_lifetime(Some(Duration::from_secs(30 * 60)))
                .build(manager)?)
        }
        Target::Postgres(_) => {
            // As for a file: the first connection reports the real cause ("Connection refused",
            // "password authentication failed", "database … does not exist").
            let mut conn = manager
                .establish()
                .map_err(|e| StoreError::Unavailable(e.0))?;
            migrate(&mut conn)?;
            drop(conn);
            Ok(r2d2::Pool::builder()
                .max_size(pool_size.max(1))
                // Open connections as they are needed, not pool_size of them per node at once.
                .min_idle(Some(1))
                .connection_timeout(PG_CHECKOUT_TIMEOUT)
                .test_on_check_out(true)
                .idle_timeout(Some(Duration::from_secs(10 * 60)))
                .max_lifetime(Some(Duration::from_secs(30 * 60)))
                .build(manager)?)
        }
    }
}

/// Runs the pending migrations of the connection's backend.
pub(crate) fn migrate(conn: &mut DbConn) -> Result<(), StoreError> {
    match conn {
        DbConn::Pg(conn) => run_pg_migrations(conn, PG_MIGRATIONS),
        DbConn::Sqlite(conn) => run_sqlite_migrations(conn, SQLITE_MIGRATIONS),
    }
}

/// Runs every pending migration of `source` inside one `BEGIN IMMEDIATE` transaction: either all
/// apply or none does, and two processes starting on the same file take turns instead of both
/// trying to create the same tables.
pub(crate) fn run_sqlite_migrations<S>(
    conn: &mut SqliteConnection,
    source: S,
) -> Result<(), StoreError>
where
    S: MigrationSource<Sqlite>,
{
    let applied = conn.immediate_transaction(|conn| apply_pending(conn, source))?;
    log_applied(applied);
    Ok(())
}

/// Runs every pending migration of `source` inside one transaction (PostgreSQL's DDL is
/// transactional, so a failure leaves nothing behind), holding a transaction-level advisory
/// lock so that nodes starting together on one database take turns: the second finds nothing
/// pending.
pub(crate) fn run_pg_migrations<S>(conn: &mut PgConnection, source: S) -> Result<(), StoreError>
where
    S: MigrationSource<Pg>,
{
    let applied = conn.transaction(|conn| {
        diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
            .bind::<BigInt, _>(MIGRATION_LOCK_KEY)
            .execute(conn)?;
        apply_pending(conn, source)
    })?;
    log_applied(applied);
    Ok(())
}

/// Applies what is pending, naming the first migration that fails and the database's reason.
fn apply_pending<C, DB, S>(conn: &mut C, source: S) -> Result<usize, StoreError>
where
    DB: diesel::backend::Backend,
    C: MigrationHarness<DB>,
    S: MigrationSource<DB>,
{
    let pending = conn
        .pending_migrations(source)
        .map_err(|e| StoreError::Migration(e.to_string()))?;
    for migration in &pending {
        conn.run_migration(migration.as_ref()).map_err(|e| {
            let name = migration.name().to_string();
            // The harness says "Failed to run <name> with: <reason>"; keep the reason only.
            let message = e.to_string();
            let prefix = format!("Failed to run {name} with: ");
            let reason = message.strip_prefix(&prefix).unwrap_or(&message);
            let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            StoreError::Migration(format!("{name}: {reason}"))
        })?;
    }
    Ok(pending.len())
}

fn log_applied(applied: usize) {
    if applied > 0 {
        log::info!("store: applied {applied} database migration(s)");
    }
}
