//! Opening the database: the URL forms the store accepts, the per-connection PRAGMAs, the r2d2
//! pool and the embedded migrations.
//!
//! This is the one backend-specific file of the store. When PostgreSQL arrives, `DbConn` becomes a
//! `MultiConnection` enum and the functions here grow a branch per backend; the queries in
//! `mod.rs` stay as they are.

use std::path::Path;
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::migration::MigrationSource;
use diesel::r2d2::ConnectionManager;
use diesel::sqlite::Sqlite;
use diesel::Connection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use super::{DbConn, Pool, StoreError};

/// The SQLite migrations, compiled into the binary so a fresh node needs no files beside it.
pub(crate) const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// How long a query waits for another connection's write lock before failing with
/// "database is locked" (SQLite `busy_timeout`, milliseconds).
const BUSY_TIMEOUT_MS: u32 = 5_000;

/// How long a caller waits for a free pooled connection before getting
/// `StoreError::Unavailable`; short, so that `/readyz` and requests fail fast.
const POOL_CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a `database.url` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// A private in-memory database that lives as long as its one connection.
    Memory,
    /// A database file; its parent directory is created if missing.
    File(String),
}

impl Target {
    /// Understands `sqlite://relative/path.db`, `sqlite:///absolute/path.db`, `sqlite:path.db`,
    /// `sqlite::memory:`, `:memory:` and a bare path. Other schemes are refused by name only, so
    /// that a password in a PostgreSQL URL never reaches a log line.
    pub(crate) fn parse(url: &str) -> Result<Target, StoreError> {
        let url = url.trim();
        let rest = match url.strip_prefix("sqlite:") {
            Some(rest) => rest.strip_prefix("//").unwrap_or(rest),
            None => {
                if let Some((scheme, _)) = url.split_once("://") {
                    return Err(StoreError::Other(format!(
                        "unsupported database URL scheme `{scheme}`: this build supports \
                         sqlite only (sqlite://path/to/file.db or sqlite::memory:)"
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
}

/// Applies the PRAGMAs every connection needs, as each one is opened.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SqlitePragmas;

impl SqlitePragmas {
    /// `busy_timeout` comes first so that switching to WAL waits for other connections rather
    /// than failing; `foreign_keys` is per connection in SQLite and off by default.
    fn apply(conn: &mut DbConn) -> diesel::QueryResult<()> {
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; \
             PRAGMA journal_mode = WAL; \
             PRAGMA foreign_keys = ON; \
             PRAGMA synchronous = NORMAL;"
        ))
    }
}

impl r2d2::CustomizeConnection<DbConn, diesel::r2d2::Error> for SqlitePragmas {
    fn on_acquire(&self, conn: &mut DbConn) -> Result<(), diesel::r2d2::Error> {
        SqlitePragmas::apply(conn).map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Opens the database behind `target`, migrated, as a pool of `pool_size` connections
/// (exactly one for an in-memory database, which is private to its connection).
pub(crate) fn open_pool(target: &Target, pool_size: u32) -> Result<Pool, StoreError> {
    match target {
        Target::Memory => {
            // One connection kept forever: r2d2 would otherwise retire it after its idle timeout
            // or lifetime, and the whole database with it.
            let pool = build_pool(":memory:", 1, None)?;
            run_migrations(&mut *pool.get()?, SQLITE_MIGRATIONS)?;
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
            let mut conn = DbConn::establish(path)
                .map_err(|e| StoreError::Unavailable(format!("cannot open {path}: {e}")))?;
            SqlitePragmas::apply(&mut conn)?;
            run_migrations(&mut conn, SQLITE_MIGRATIONS)?;
            drop(conn);
            build_pool(path, pool_size.max(1), Some(Duration::from_secs(10 * 60)))
        }
    }
}

fn build_pool(
    database: &str,
    max_size: u32,
    idle_timeout: Option<Duration>,
) -> Result<Pool, StoreError> {
    let lifetime = idle_timeout.map(|_| Duration::from_secs(30 * 60));
    r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(POOL_CHECKOUT_TIMEOUT)
        .idle_timeout(idle_timeout)
        .max_lifetime(lifetime)
        .connection_customizer(Box::new(SqlitePragmas))
        .build(ConnectionManager::<DbConn>::new(database))
        .map_err(StoreError::from)
}

/// Runs every pending migration of `source` inside one `BEGIN IMMEDIATE` transaction: either all
/// apply or none does, and two processes starting on the same file take turns instead of both
/// trying to create the same tables.
pub(crate) fn run_migrations<S>(conn: &mut DbConn, source: S) -> Result<(), StoreError>
where
    S: MigrationSource<Sqlite>,
{
    let applied = conn.immediate_transaction(|conn| {
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
                StoreError::Migration(format!("{name}: {reason}"))
            })?;
        }
        Ok::<_, StoreError>(pending.len())
    })?;
    if applied > 0 {
        log::info!("store: applied {applied} database migration(s)");
    }
    Ok(())
}
