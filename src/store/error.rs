//! `StoreError`, the one error type of the store, and the mapping from diesel and r2d2 errors.
//!
//! Messages come from the database's own text, which names tables, columns and constraints but
//! never the values being written, so no secret or password hash can leak through them.

use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error as DieselError};

/// Everything that can go wrong in the store, sorted by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row asked for does not exist, or a row it refers to (a plan, an account, a user) does
    /// not: HTTP 404.
    #[error("not found")]
    NotFound,
    /// A unique constraint refused the write; the string names the column(s), e.g. `"email"`:
    /// HTTP 409.
    #[error("{0} already exists")]
    Conflict(String),
    /// The pool could not hand out a connection, or the database could not be opened or is
    /// locked: HTTP 503, and `/readyz` fails.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A migration failed at start-up; the string names the migration and the database's message.
    #[error("database migration failed: {0}")]
    Migration(String),
    /// Anything else (a CHECK constraint, a bad URL, a bug): HTTP 500.
    #[error("database error: {0}")]
    Other(String),
}

impl From<DieselError> for StoreError {
    fn from(err: DieselError) -> Self {
        match err {
            DieselError::NotFound => StoreError::NotFound,
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
                StoreError::Conflict(conflict_target(info.as_ref()))
            }
            DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _) => {
                StoreError::NotFound
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                StoreError::Unavailable(info.message().to_owned())
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, info)
                if is_unavailable_message(info.message()) =>
            {
                StoreError::Unavailable(info.message().to_owned())
            }
            other => StoreError::Other(other.to_string()),
        }
    }
}

impl From<r2d2::Error> for StoreError {
    fn from(err: r2d2::Error) -> Self {
        StoreError::Unavailable(err.to_string())
    }
}

/// SQLite reports a busy database, a full disk or a vanished file as plain errors, and libpq a
/// server that went away mid-query; they say "try again later", not "your request is wrong".
fn is_unavailable_message(message: &str) -> bool {
    const SQLITE: [&str; 5] = [
        "database is locked",
        "database table is locked",
        "disk I/O error",
        "database or disk is full",
        "unable to open database file",
    ];
    const POSTGRES: [&str; 6] = [
        "server closed the connection unexpectedly",
        "terminating connection due to administrator command",
        "no connection to the server",
        "could not receive data from server",
        "could not send data to server",
        "the database system is shutting down",
    ];
    SQLITE.iter().any(|t| message.starts_with(t)) || POSTGRES.iter().any(|t| message.contains(t))
}

/// Names the column(s) behind a unique violation: `"email"`, `"token_hash"`, `"id"`.
///
/// SQLite says `UNIQUE constraint failed: users.email` (columns joined by `", "`) and has no
/// constraint name; PostgreSQL names the constraint (`users_email_key`, `users_pkey`) and the
/// table, from which the column is recovered by PostgreSQL's default naming.
pub(crate) fn conflict_target(info: &dyn DatabaseErrorInformation) -> String {
    if let Some(columns) = info.message().strip_prefix("UNIQUE constraint failed: ") {
        return columns
            .split(", ")
            .map(|qualified| qualified.rsplit('.').next().unwrap_or(qualified))
            .collect::<Vec<_>>()
            .join(",");
    }
    if let Some(constraint) = info.constraint_name() {
        let bare = info
            .table_name()
            .and_then(|table| constraint.strip_prefix(table))
            .and_then(|rest| rest.strip_prefix('_'))
            .unwrap_or(constraint);
        return match bare {
            // Every single-column primary key here is `id`, as SQLite's message would say; only
            // user_presence has a composite one, and only upsert_last_seen writes it.
            "pkey" => "id".to_owned(),
            other => other.strip_suffix("_key").unwrap_or(other).to_owned(),
        };
    }
    info.column_name().unwrap_or("unique constraint").to_owned()
}
