//! Throw-away databases for tests, here and in `tests/`: a fresh PostgreSQL database or a SQLite
//! file in a fresh directory, removed again on drop.
//!
//! PostgreSQL is the server at `PRESENCED_TEST_PG` (default
//! `postgres://postgres@127.0.0.1:5432/test`); each [`TempDatabase::postgres`] creates a database
//! named `presenced_t_<random>` there. When the server cannot be reached, CI (`CI=true`) fails
//! loudly, since a missing service there is a broken setup; elsewhere the test is skipped.

use std::path::PathBuf;

use diesel::connection::SimpleConnection;
use diesel::{Connection, PgConnection};

use super::{new_id, redact_database_url};

/// The server tests use when `PRESENCED_TEST_PG` is not set.
pub const DEFAULT_TEST_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database that exists as long as this value does.
#[derive(Debug)]
pub struct TempDatabase {
    url: String,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Postgres { admin_url: String, name: String },
    Sqlite { dir: PathBuf },
}

impl TempDatabase {
    /// A fresh, empty PostgreSQL database, or `None` (after printing why) when no server is
    /// reachable outside CI. Panics in CI (`CI=true`) when the server is unreachable.
    pub fn postgres() -> Option<TempDatabase> {
        let admin_url =
            std::env::var("PRESENCED_TEST_PG").unwrap_or_else(|_| DEFAULT_TEST_PG.to_owned());
        let mut admin = match PgConnection::establish(&admin_url) {
            Ok(conn) => conn,
            Err(e) => {
                let message = format!(
                    "PostgreSQL for tests unreachable at {} (set PRESENCED_TEST_PG): {}",
                    redact_database_url(&admin_url),
                    e.to_string()
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                );
                if std::env::var("CI").is_ok_and(|v| v == "true") {
                    panic!("{message}");
                }
                eprintln!("skipped: {message}");
                return None;
            }
        };
        // new_id's alphabet is [a-z0-9]: a valid unquoted identifier after the prefix.
        let name = new_id("presenced_t_");
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let mut url = url::Url::parse(&admin_url)
            .unwrap_or_else(|e| panic!("PRESENCED_TEST_PG is not a URL: {e}"));
        url.set_path(&format!("/{name}"));
        Some(TempDatabase {
            url: url.to_string(),
            kind: Kind::Postgres { admin_url, name },
        })
    }

    /// A SQLite file URL in a fresh directory under the system's temporary directory; the file
    /// itself is created by whoever opens it.
    pub fn sqlite() -> TempDatabase {
        let dir = std::env::temp_dir().join(new_id("presenced_t_"));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        TempDatabase {
            url: format!("sqlite://{}", dir.join("presenced.db").display()),
            kind: Kind::Sqlite { dir },
        }
    }

    /// The database's URL, for `Store::open`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `"postgres"` or `"sqlite"`.
    pub fn backend(&self) -> &'static str {
        match self.kind {
            Kind::Postgres { .. } => "postgres",
            Kind::Sqlite { .. } => "sqlite",
        }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Postgres { admin_url, name } => {
                // FORCE ends connections a test left open (a pool still alive elsewhere).
                let dropped = PgConnection::establish(admin_url)
                    .map_err(|e| e.to_string())
                    .and_then(|mut admin| {
                        admin
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .map_err(|e| e.to_string())
                    });
                if let Err(e) = dropped {
                    eprintln!("warning: could not drop test database {name}: {e}");
                }
            }
            Kind::Sqlite { dir } => {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}
