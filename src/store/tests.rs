//! Unit tests of the store. Most run once per backend: on a SQLite file in a fresh directory
//! and on a fresh PostgreSQL database (skipped outside CI when no server is reachable; see
//! [`super::testdb`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error as DieselError};
use diesel_migrations::MigrationHarness;
use tempfile::TempDir;

use super::connect::{run_pg_migrations, run_sqlite_migrations, Target};
use super::error::conflict_target;
use super::testdb::TempDatabase;
use super::*;

const T0: i64 = 1_800_000_000_000;

/// A migrated store on a fresh database, and that database (dropped after the store).
struct Db {
    store: Store,
    temp: TempDatabase,
}

impl Db {
    fn open(temp: TempDatabase) -> Db {
        let store = Store::open(temp.url(), 4).unwrap();
        Db { store, temp }
    }

    fn sqlite() -> Db {
        Db::open(TempDatabase::sqlite())
    }

    fn postgres() -> Option<Db> {
        TempDatabase::postgres().map(Db::open)
    }

    /// A second store on the same database, as after a restart or on another node.
    fn reopen(&self, pool_size: u32) -> Store {
        Store::open(self.temp.url(), pool_size).unwrap()
    }

    /// Runs SQL outside the store's API, to set up or inspect what a test needs.
    fn sql(&self, sql: &str) {
        self.store.pool.get().unwrap().batch_execute(sql).unwrap();
    }

    /// How many rows `table` holds.
    fn count(&self, table: &str) -> i64 {
        #[derive(QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table}"))
            .get_result::<Count>(&mut *self.store.pool.get().unwrap())
            .unwrap()
            .n
    }
}

impl std::ops::Deref for Db {
    type Target = Store;
    fn deref(&self) -> &Store {
        &self.store
    }
}

/// Turns each `fn name(db: Db) { … }` into a module `name` with two tests, `sqlite` and
/// `postgres`, that run the body on a fresh store of that backend.
macro_rules! on_both_backends {
    ($( $(#[$meta:meta])* fn $name:ident($db:ident: Db) $body:block )*) => {$(
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            fn run($db: Db) $body

            #[test]
            fn sqlite() {
                run(Db::sqlite());
            }

            #[test]
            fn postgres() {
                match Db::postgres() {
                    Some(db) => run(db),
                    None => eprintln!("skipped {} on postgres", stringify!($name)),
                }
            }
        }
    )*};
}

fn new_account<'a>(id: &'a str, name: &'a str, created_at: i64) -> NewAccount<'a> {
    NewAccount {
        id,
        name,
        plan_id: "free",
        signing_secret: "sk_current",
        settings: "{}",
        created_at,
        updated_at: created_at,
    }
}

fn new_user<'a>(
    id: &'a str,
    email: &'a str,
    role: &'a str,
    account: Option<&'a str>,
) -> NewUser<'a> {
    NewUser {
        id,
        email,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA",
        role,
        account_id: account,
        created_at: T0,
    }
}

fn new_token<'a>(
    id: &'a str,
    user: &'a str,
    family: &'a str,
    hash: &'a str,
) -> NewRefreshToken<'a> {
    NewRefreshToken {
        id,
        user_id: user,
        family_id: family,
        token_hash: hash,
        issued_at: T0,
        expires_at: T0 + 86_400_000,
    }
}

/// Adds account `acc_1` and its owner `usr_1`.
fn add_user(store: &Store) {
    store
        .create_account(&new_account("acc_1", "Acme", T0))
        .unwrap();
    store
        .create_user(&new_user("usr_1", "owner@acme.io", "owner", Some("acc_1")))
        .unwrap();
}

#[test]
fn the_parent_directory_of_the_database_file_is_created() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("nested/deeper/presenced.db");
    let store = Store::open(path.to_str().unwrap(), 1).unwrap();
    store.ping().unwrap();
    assert!(path.exists());
}

#[test]
fn every_sqlite_connection_bounds_the_wal_file_it_leaves_behind() {
    #[derive(QueryableByName)]
    struct Limit {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        journal_size_limit: i64,
    }
    let db = Db::sqlite();
    // The PRAGMA is per connection: ask two at once, so they are two.
    let mut conns = [db.store.pool.get().unwrap(), db.store.pool.get().unwrap()];
    for conn in conns.iter_mut() {
        let limit = diesel::sql_query("PRAGMA journal_size_limit")
            .get_result::<Limit>(&mut **conn)
            .unwrap();
        assert_eq!(
            limit.journal_size_limit,
            super::connect::WAL_SIZE_LIMIT_BYTES
        );
    }
}

#[test]
fn an_in_memory_store_keeps_one_database_across_calls() {
    let store = Store::open("sqlite::memory:", 8).unwrap();
    store
        .create_account(&new_account("acc_1", "Acme", T0))
        .unwrap();
    let clone = store.clone();
    assert_eq!(clone.get_account("acc_1").unwrap().name, "Acme");
    assert_eq!(store.pool.max_size(), 1);
    assert_eq!(store.backend(), "sqlite");
}

#[test]
fn database_urls_name_a_file_memory_or_a_postgres_server() {
    let parse = |url| Target::parse(url).ok();
    let file = |p: &str| Some(Target::File(p.to_owned()));
    assert_eq!(
        parse("sqlite://data/presenced.db"),
        file("data/presenced.db")
    );
    assert_eq!(parse("sqlite:///abs/path.db"), file("/abs/path.db"));
    assert_eq!(parse("sqlite:rel.db"), file("rel.db"));
    assert_eq!(parse("data/presenced.db"), file("data/presenced.db"));
    assert_eq!(parse("sqlite::memory:"), Some(Target::Memory));
    assert_eq!(parse(":memory:"), Some(Target::Memory));
    assert_eq!(parse("sqlite://"), None);

    let pg = |url| match Target::parse(url) {
        Ok(Target::Postgres(pg)) => (pg.host_port.clone(), pg.redacted.clone()),
        other => panic!("{url}: {other:?}"),
    };
    assert_eq!(
        pg("postgres://app:hunter2@db.internal/presenced"),
        (
            "db.internal:5432".to_owned(),
            "postgres://app:***@db.internal/presenced".to_owned()
        )
    );
    assert_eq!(
        pg("postgresql://app@[::1]:6432/presenced?sslmode=disable").0,
        "[::1]:6432"
    );
    assert_eq!(
        pg("postgres:///presenced?host=/run/postgresql&password=hunter2"),
        (
            "/run/postgresql:5432".to_owned(),
            "postgres:///presenced?host=%2Frun%2Fpostgresql&password=***".to_owned()
        )
    );
    for bad in [
        "postgres://app:hunter2@/presenced",
        "postgres://app:hunter2@db:port/presenced",
        "mysql://root:hunter2@db/presenced",
    ] {
        let err = Target::parse(bad).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{bad}: {err}");
    }
}

#[test]
fn redacting_a_database_url_hides_every_password_and_keeps_the_rest() {
    assert_eq!(
        redact_database_url("postgres://app:s3cr%40t@db:5432/presenced?sslmode=disable"),
        "postgres://app:***@db:5432/presenced?sslmode=disable"
    );
    assert_eq!(
        redact_database_url("postgres://app@db/presenced"),
        "postgres://app@db/presenced"
    );
    assert_eq!(
        redact_database_url("sqlite://data/presenced.db"),
        "sqlite://data/presenced.db"
    );
    assert_eq!(redact_database_url("data/p.db"), "data/p.db");
    assert_eq!(
        redact_database_url("postgres://app:hunter2@db:port/x"),
        "<unparsable URL>"
    );
}

#[test]
fn an_unreachable_postgres_is_unavailable_naming_host_and_port_but_not_the_password() {
    let err = Store::open("postgres://app:hunter2@127.0.0.1:1/presenced", 4).unwrap_err();
    let StoreError::Unavailable(message) = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(message.contains("127.0.0.1:1"), "{message}");
    assert!(message.contains("refused"), "the cause: {message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");
}

#[test]
fn a_missing_postgres_database_is_unavailable_with_the_servers_reason() {
    let Some(temp) = TempDatabase::postgres() else {
        return eprintln!("skipped: no PostgreSQL");
    };
    let mut url = url::Url::parse(temp.url()).unwrap();
    url.set_path("/presenced_t_does_not_exist");
    let err = Store::open(url.as_str(), 1).unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("does not exist")),
        "{err:?}"
    );
}

/// Two migrations in a directory: a good one, then `bad_sql`.
fn migration_dir(bad_sql: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("2026-01-01-000000_good");
    let bad = dir.path().join("2026-01-02-000000_broken");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(good.join("up.sql"), "CREATE TABLE kept (id TEXT);").unwrap();
    std::fs::write(good.join("down.sql"), "DROP TABLE kept;").unwrap();
    std::fs::write(bad.join("up.sql"), bad_sql).unwrap();
    std::fs::write(bad.join("down.sql"), "").unwrap();
    dir
}

#[test]
fn a_failed_sqlite_migration_names_the_migration_and_applies_none() {
    let dir = migration_dir("CREATE TABLE oops (;");
    let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).unwrap();

    let mut conn = SqliteConnection::establish(":memory:").unwrap();
    let err = run_sqlite_migrations(&mut conn, source).unwrap_err();

    let StoreError::Migration(message) = &err else {
        panic!("expected a migration error, got {err:?}");
    };
    assert!(
        message.starts_with("2026-01-02-000000_broken: "),
        "{message}"
    );
    assert!(message.contains("syntax error"), "{message}");
    // All or nothing: the good migration before it was rolled back too.
    let kept = conn.batch_execute("SELECT * FROM kept").unwrap_err();
    assert!(kept.to_string().contains("no such table"), "{kept}");
}

#[test]
fn a_failed_postgres_migration_names_the_migration_and_applies_none() {
    let Some(temp) = TempDatabase::postgres() else {
        return eprintln!("skipped: no PostgreSQL");
    };
    // The real migrations: the second one's first table already exists, so it fails after the
    // first migration has run inside the same transaction.
    let mut conn = PgConnection::establish(temp.url()).unwrap();
    conn.batch_execute("CREATE TABLE presence_snapshots (squatter INT)")
        .unwrap();
    drop(conn);

    let err = Store::open(temp.url(), 2).unwrap_err();
    let StoreError::Migration(message) = &err else {
        panic!("expected a migration error, got {err:?}");
    };
    assert!(
        message.starts_with("2026-11-21-000002_presence_history: "),
        "{message}"
    );
    assert!(message.contains("already exists"), "{message}");
    assert!(!message.contains('\n'), "one line: {message}");

    #[derive(QueryableByName)]
    struct Name {
        #[diesel(sql_type = diesel::sql_types::Text)]
        table_name: String,
    }
    let mut conn = PgConnection::establish(temp.url()).unwrap();
    let tables: Vec<String> = diesel::sql_query(
        "SELECT table_name::text AS table_name FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY 1",
    )
    .load::<Name>(&mut conn)
    .unwrap()
    .into_iter()
    .map(|n| n.table_name)
    .collect();
    // Not `accounts` of the first migration, not even diesel's bookkeeping table.
    assert_eq!(tables, ["presence_snapshots"]);
}

#[test]
fn a_failed_postgres_migration_from_files_rolls_back_the_good_one_too() {
    let Some(temp) = TempDatabase::postgres() else {
        return eprintln!("skipped: no PostgreSQL");
    };
    let dir = migration_dir("CREATE TABLE oops (;");
    let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).unwrap();
    let mut conn = PgConnection::establish(temp.url()).unwrap();
    let err = run_pg_migrations(&mut conn, source).unwrap_err();
    assert!(
        matches!(&err, StoreError::Migration(m) if m.starts_with("2026-01-02-000000_broken: ")
            && m.contains("syntax error")),
        "{err:?}"
    );
    let kept = conn.batch_execute("SELECT * FROM kept").unwrap_err();
    assert!(kept.to_string().contains("does not exist"), "{kept}");
}

#[test]
fn nodes_starting_together_on_one_postgres_take_turns_migrating() {
    let Some(temp) = TempDatabase::postgres() else {
        return eprintln!("skipped: no PostgreSQL");
    };
    let url = temp.url();
    std::thread::scope(|s| {
        let nodes: Vec<_> = (0..3)
            .map(|_| s.spawn(move || Store::open(url, 1).map(|_| ())))
            .collect();
        for node in nodes {
            node.join().unwrap().unwrap();
        }
    });
    let store = Store::open(url, 1).unwrap();
    assert_eq!(store.list_plans().unwrap().len(), 3);
}

#[test]
fn a_postgres_pool_recovers_when_its_connections_are_cut() {
    let Some(db) = Db::postgres() else {
        return eprintln!("skipped: no PostgreSQL");
    };
    // Fill the pool with live connections, then return them.
    drop((0..3).map(|_| db.pool.get().unwrap()).collect::<Vec<_>>());
    db.ping().unwrap();
    // What a server restart does to them: every session of the database is terminated.
    let mut admin = PgConnection::establish(db.temp.url()).unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    // Checkout tests each connection and replaces the dead ones: no caller sees an error.
    for _ in 0..5 {
        db.ping().unwrap();
        db.list_plans().unwrap();
    }
}

#[test]
fn ping_within_fails_fast_when_the_pool_is_exhausted() {
    let store = Store::open("sqlite::memory:", 1).unwrap();
    store.ping_within(Duration::from_millis(200)).unwrap();
    let held = store.pool.get().unwrap();
    let err = store.ping_within(Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    drop(held);
}

on_both_backends! {
fn opening_the_same_database_twice_migrates_once_and_keeps_the_data(db: Db) {
    db.create_account(&new_account("acc_1", "Acme", T0)).unwrap();
    let migrations = db.count("__diesel_schema_migrations");
    let again = db.reopen(2);
    assert_eq!(again.list_accounts().unwrap().len(), 1);
    assert_eq!(again.list_plans().unwrap().len(), 3);
    assert_eq!(db.count("__diesel_schema_migrations"), migrations);
}

fn ping_answers_and_the_backend_is_named(db: Db) {
    db.ping().unwrap();
    db.ping_within(Duration::from_secs(1)).unwrap();
    assert_eq!(db.backend(), db.temp.backend());
}
}

on_both_backends! {
fn the_three_plans_are_seeded_with_their_limits(db: Db) {
    let store = &db.store;
    let plans: Vec<_> = store
        .list_plans()
        .unwrap()
        .into_iter()
        .map(|p| (p.id, p.max_connections, p.max_rooms, p.max_messages_per_day))
        .collect();
    assert_eq!(
        plans,
        vec![
            ("free".to_owned(), 100, 50, 100_000),
            ("pro".to_owned(), 10_000, 5_000, 10_000_000),
            ("enterprise".to_owned(), 1_000_000, 1_000_000, 1_000_000_000),
        ]
    );
    assert_eq!(store.get_plan("pro").unwrap().max_connections, 10_000);
    assert!(matches!(store.get_plan("gold"), Err(StoreError::NotFound)));
}

fn accounts_can_be_created_listed_and_fetched(db: Db) {
    let store = &db.store;
    let created = store
        .create_account(&new_account("acc_b", "Beta", T0 + 1))
        .unwrap();
    store
        .create_account(&new_account("acc_a", "Alpha", T0))
        .unwrap();

    assert_eq!(created.name, "Beta");
    assert_eq!(created.plan_id, "free");
    assert_eq!(created.signing_secret, "sk_current");
    assert_eq!(created.previous_signing_secret, None);
    assert_eq!(created.settings, "{}");
    assert_eq!(store.get_account("acc_b").unwrap(), created);
    let ids: Vec<_> = store
        .list_accounts()
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, ["acc_a", "acc_b"], "oldest first");
    assert!(matches!(
        store.get_account("acc_zz"),
        Err(StoreError::NotFound)
    ));
}

fn creating_an_account_twice_with_one_id_is_a_conflict_on_id(db: Db) {
    let store = &db.store;
    store
        .create_account(&new_account("acc_1", "Acme", T0))
        .unwrap();
    let err = store
        .create_account(&new_account("acc_1", "Other", T0))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "id"),
        "{err:?}"
    );
}

fn an_account_on_a_missing_plan_is_not_found(db: Db) {
    let store = &db.store;
    let account = NewAccount {
        plan_id: "gold",
        ..new_account("acc_1", "Acme", T0)
    };
    assert!(matches!(
        store.create_account(&account),
        Err(StoreError::NotFound)
    ));
    assert!(store.list_accounts().unwrap().is_empty());
}

fn updating_an_account_changes_only_the_given_fields(db: Db) {
    let store = &db.store;
    add_user(store);
    let updated = store
        .update_account(
            "acc_1",
            None,
            Some("pro"),
            Some(r#"{"webhook":"x"}"#),
            T0 + 5,
        )
        .unwrap();
    assert_eq!(updated.name, "Acme");
    assert_eq!(updated.plan_id, "pro");
    assert_eq!(updated.settings, r#"{"webhook":"x"}"#);
    assert_eq!(updated.updated_at, T0 + 5);
    assert_eq!(updated.created_at, T0);

    let renamed = store
        .update_account("acc_1", Some("Acme Inc"), None, None, T0 + 6)
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.plan_id.as_str()),
        ("Acme Inc", "pro")
    );

    let missing_plan = store.update_account("acc_1", None, Some("gold"), None, T0 + 7);
    assert!(matches!(missing_plan, Err(StoreError::NotFound)));
    let missing_account = store.update_account("acc_zz", Some("x"), None, None, T0 + 7);
    assert!(matches!(missing_account, Err(StoreError::NotFound)));
}

fn rotating_a_secret_keeps_the_old_one_as_previous_until_it_expires(db: Db) {
    let store = &db.store;
    add_user(store);
    let rotated = store
        .rotate_secret("acc_1", "sk_next", T0 + 60_000, T0 + 1)
        .unwrap();
    assert_eq!(rotated.signing_secret, "sk_next");
    assert_eq!(
        rotated.previous_signing_secret.as_deref(),
        Some("sk_current")
    );
    assert_eq!(rotated.previous_secret_expires_at, Some(T0 + 60_000));
    assert_eq!(rotated.updated_at, T0 + 1);
    assert_eq!(rotated.previous_secret_at(T0 + 59_999), Some("sk_current"));
    assert_eq!(rotated.previous_secret_at(T0 + 60_000), None);

    let again = store
        .rotate_secret("acc_1", "sk_third", T0 + 90_000, T0 + 2)
        .unwrap();
    assert_eq!(again.previous_signing_secret.as_deref(), Some("sk_next"));
    assert!(matches!(
        store.rotate_secret("acc_zz", "sk", T0, T0),
        Err(StoreError::NotFound)
    ));
}

fn a_name_with_sql_metacharacters_round_trips_unchanged(db: Db) {
    let store = &db.store;
    let name = "'); DROP TABLE accounts;-- \"x\" \\ % _ ? $1";
    store
        .create_account(&new_account("acc_1", name, T0))
        .unwrap();
    assert_eq!(store.get_account("acc_1").unwrap().name, name);
    let renamed = store
        .update_account("acc_1", Some(name), None, Some(name), T0)
        .unwrap();
    assert_eq!(
        (renamed.name.as_str(), renamed.settings.as_str()),
        (name, name)
    );
    assert_eq!(store.list_accounts().unwrap().len(), 1);
}

fn a_duplicate_email_is_a_conflict_on_email_whatever_its_case(db: Db) {
    let store = &db.store;
    add_user(store);
    let err = store
        .create_user(&new_user("usr_2", "Owner@ACME.io", "member", Some("acc_1")))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "email"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "email already exists");
}

fn users_are_stored_with_lowercased_email_and_found_whatever_the_case(db: Db) {
    let store = &db.store;
    store
        .create_account(&new_account("acc_1", "Acme", T0))
        .unwrap();
    let user = store
        .create_user(&new_user(
            "usr_1",
            "Ann.Lee@Example.COM",
            "viewer",
            Some("acc_1"),
        ))
        .unwrap();
    assert_eq!(user.email, "ann.lee@example.com");
    assert!(!user.disabled);
    let found = store
        .find_user_by_email("ANN.LEE@example.com")
        .unwrap()
        .unwrap();
    assert_eq!(found, user);
    assert_eq!(store.get_user("usr_1").unwrap(), user);
    assert_eq!(
        store.find_user_by_email("nobody@example.com").unwrap(),
        None
    );
}

fn a_user_of_a_missing_account_is_not_found_and_an_unknown_role_is_refused(db: Db) {
    let store = &db.store;
    let orphan = new_user("usr_1", "a@b.io", "owner", Some("acc_zz"));
    assert!(matches!(
        store.create_user(&orphan),
        Err(StoreError::NotFound)
    ));
    let admin_typo = new_user("usr_2", "c@d.io", "Admin", None);
    assert!(matches!(
        store.create_user(&admin_typo),
        Err(StoreError::Other(_))
    ));
}

fn users_are_listed_per_account_and_admins_are_counted(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .create_account(&new_account("acc_2", "Other", T0))
        .unwrap();
    store
        .create_user(&new_user("usr_2", "m@acme.io", "member", Some("acc_1")))
        .unwrap();
    store
        .create_user(&new_user("usr_3", "o@other.io", "owner", Some("acc_2")))
        .unwrap();
    assert_eq!(store.count_admins().unwrap(), 0);
    store
        .create_user(&new_user("usr_4", "root@presenced.io", "admin", None))
        .unwrap();

    let ids: Vec<_> = store
        .list_users_by_email("acc_1")
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    // Ordered by email: m@acme.io before owner@acme.io.
    assert_eq!(ids, ["usr_2", "usr_1"]);
    assert_eq!(store.count_admins().unwrap(), 1);
}

fn deleting_a_user_removes_its_refresh_tokens_and_a_second_delete_is_not_found(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .insert_refresh_token(&new_token("rt_1", "usr_1", "fam_1", "aa11"))
        .unwrap();
    store.delete_user("usr_1").unwrap();
    assert!(matches!(store.get_user("usr_1"), Err(StoreError::NotFound)));
    assert_eq!(store.find_refresh_token("aa11").unwrap(), None);
    assert!(matches!(
        store.delete_user("usr_1"),
        Err(StoreError::NotFound)
    ));
}

fn a_refresh_token_can_be_spent_only_once(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .insert_refresh_token(&new_token("rt_1", "usr_1", "fam_1", "aa11"))
        .unwrap();
    let stored = store.find_refresh_token("aa11").unwrap().unwrap();
    assert_eq!((stored.spent_at, stored.revoked_at), (None, None));

    assert!(store.spend_refresh_token("rt_1", T0 + 10).unwrap());
    assert!(!store.spend_refresh_token("rt_1", T0 + 20).unwrap());
    let spent = store.find_refresh_token("aa11").unwrap().unwrap();
    assert_eq!(
        spent.spent_at,
        Some(T0 + 10),
        "the second spend changed nothing"
    );
    assert!(!store.spend_refresh_token("rt_missing", T0).unwrap());
}

fn concurrent_spends_of_one_refresh_token_let_exactly_one_win(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .insert_refresh_token(&new_token("rt_1", "usr_1", "fam_1", "aa11"))
        .unwrap();
    let wins = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for i in 0..4 {
            let (store, wins) = (&store, &wins);
            s.spawn(move || {
                if store.spend_refresh_token("rt_1", T0 + i).unwrap() {
                    wins.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert_eq!(wins.load(Ordering::SeqCst), 1);
}

fn a_duplicate_token_hash_is_a_conflict_and_a_token_needs_its_user(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .insert_refresh_token(&new_token("rt_1", "usr_1", "fam_1", "aa11"))
        .unwrap();
    let err = store
        .insert_refresh_token(&new_token("rt_2", "usr_1", "fam_1", "aa11"))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "token_hash"),
        "{err:?}"
    );
    let orphan = new_token("rt_3", "usr_zz", "fam_1", "bb22");
    assert!(matches!(
        store.insert_refresh_token(&orphan),
        Err(StoreError::NotFound)
    ));
}

fn revoke_family_revokes_every_token_of_the_family_and_no_other(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .insert_refresh_token(&new_token("rt_1", "usr_1", "fam_1", "aa11"))
        .unwrap();
    store
        .insert_refresh_token(&new_token("rt_2", "usr_1", "fam_1", "aa22"))
        .unwrap();
    store
        .insert_refresh_token(&new_token("rt_3", "usr_1", "fam_2", "bb11"))
        .unwrap();
    store.spend_refresh_token("rt_1", T0 + 1).unwrap();

    assert_eq!(store.revoke_family("fam_1", T0 + 5).unwrap(), 2);
    assert_eq!(
        store.revoke_family("fam_1", T0 + 6).unwrap(),
        0,
        "already revoked"
    );
    let revoked_at = |hash| store.find_refresh_token(hash).unwrap().unwrap().revoked_at;
    assert_eq!(revoked_at("aa11"), Some(T0 + 5));
    assert_eq!(revoked_at("aa22"), Some(T0 + 5));
    assert_eq!(revoked_at("bb11"), None);
    assert!(
        !store.spend_refresh_token("rt_2", T0 + 7).unwrap(),
        "revoked tokens stay unspendable"
    );
}

fn get_or_create_server_key_returns_the_same_key_twice(db: Db) {
    let store = &db.store;
    let first = store
        .get_or_create_server_key("jwt", || "generated-1".to_owned(), T0)
        .unwrap();
    let second = store
        .get_or_create_server_key("jwt", || panic!("must not generate again"), T0 + 1)
        .unwrap();
    assert_eq!(
        (first.as_str(), second.as_str()),
        ("generated-1", "generated-1")
    );

    let reopened = db.reopen(1);
    let after_restart = reopened
        .get_or_create_server_key("jwt", || "generated-2".to_owned(), T0 + 2)
        .unwrap();
    assert_eq!(after_restart, "generated-1");
}

fn upsert_last_seen_keeps_the_latest_time(db: Db) {
    let store = &db.store;
    let row = |a: &str, u: &str, t: i64| (a.to_owned(), u.to_owned(), t);
    store
        .upsert_last_seen(&[
            row("acc_1", "u1", T0 + 10),
            row("acc_1", "u2", T0),
            row("acc_1", "u1", T0 + 3),
        ])
        .unwrap();
    assert_eq!(store.last_seen("acc_1", "u1").unwrap(), Some(T0 + 10));
    assert_eq!(store.last_seen("acc_1", "u2").unwrap(), Some(T0));

    store
        .upsert_last_seen(&[
            row("acc_1", "u1", T0 + 5),
            row("acc_1", "u2", T0 + 7),
            row("acc_2", "u1", T0 + 1),
        ])
        .unwrap();
    assert_eq!(
        store.last_seen("acc_1", "u1").unwrap(),
        Some(T0 + 10),
        "an older time is ignored"
    );
    assert_eq!(store.last_seen("acc_1", "u2").unwrap(), Some(T0 + 7));
    assert_eq!(
        store.last_seen("acc_2", "u1").unwrap(),
        Some(T0 + 1),
        "accounts are separate"
    );
    assert_eq!(store.last_seen("acc_2", "u2").unwrap(), None);
    store.upsert_last_seen(&[]).unwrap();
}

fn audit_entries_filter_by_account_and_time_newest_first(db: Db) {
    let store = &db.store;
    let entry = |at, account, action| NewAuditLog {
        at,
        account_id: account,
        actor: Some("usr_1"),
        action,
        target: None,
        ip: Some("127.0.0.1"),
        detail: "{}",
    };
    store
        .append_audit(&entry(T0, Some("acc_1"), "login"))
        .unwrap();
    store
        .append_audit(&entry(T0 + 10, Some("acc_1"), "secret_rotated"))
        .unwrap();
    store
        .append_audit(&entry(T0 + 10, Some("acc_2"), "plan_changed"))
        .unwrap();
    store
        .append_audit(&entry(T0 + 20, None, "login_failed"))
        .unwrap();
    store
        .append_audit(&entry(T0 + 30, Some("acc_1"), "kick"))
        .unwrap();

    let actions = |list: Vec<AuditLog>| list.into_iter().map(|e| e.action).collect::<Vec<_>>();
    assert_eq!(
        actions(store.list_audit(Some("acc_1"), T0, T0 + 30, 100).unwrap()),
        ["secret_rotated", "login"],
        "one account, from inclusive, to exclusive, newest first"
    );
    assert_eq!(
        actions(store.list_audit(None, T0 + 10, T0 + 31, 100).unwrap()),
        ["kick", "login_failed", "plan_changed", "secret_rotated"],
        "every account; same-ms entries newest id first"
    );
    assert_eq!(
        actions(store.list_audit(None, T0, T0 + 100, 2).unwrap()),
        ["kick", "login_failed"]
    );
    assert!(store.list_audit(None, T0, T0 + 100, -1).unwrap().is_empty());
    let first = &store.list_audit(Some("acc_2"), T0, T0 + 100, 10).unwrap()[0];
    assert_eq!(
        (first.ip.as_deref(), first.detail.as_str()),
        (Some("127.0.0.1"), "{}")
    );
}

fn every_pooled_connection_enforces_foreign_keys(db: Db) {
    let store = &db.store;
    let mut held = Vec::new();
    for _ in 0..store.pool.max_size() {
        let mut conn = store.pool.get().unwrap();
        let orphan = new_user("usr_x", "x@y.io", "owner", Some("acc_zz"));
        let err = diesel::insert_into(schema::users::table)
            .values(&orphan)
            .execute(&mut *conn)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DieselError::DatabaseError(DatabaseErrorKind::ForeignKeyViolation, _)
            ),
            "{err:?}"
        );
        held.push(conn);
    }
}

fn concurrent_writers_wait_for_each_other_instead_of_failing(db: Db) {
    let store = &db.store;
    std::thread::scope(|s| {
        for worker in 0..4_i64 {
            let store = &store;
            s.spawn(move || {
                for i in 0..50 {
                    let user = format!("u{}", i % 7);
                    store
                        .upsert_last_seen(&[("acc_1".to_owned(), user, T0 + worker * 100 + i)])
                        .unwrap();
                    store
                        .append_audit(&NewAuditLog {
                            at: T0 + i,
                            account_id: Some("acc_1"),
                            actor: None,
                            action: "tick",
                            target: None,
                            ip: None,
                            detail: "{}",
                        })
                        .unwrap();
                }
            });
        }
    });
    assert_eq!(
        store
            .list_audit(Some("acc_1"), 0, i64::MAX, 1_000)
            .unwrap()
            .len(),
        200
    );
    assert_eq!(store.last_seen("acc_1", "u0").unwrap(), Some(T0 + 349));
}

fn debug_output_redacts_secrets_and_hashes(db: Db) {
    let store = &db.store;
    add_user(store);
    store
        .insert_refresh_token(&new_token("rt_1", "usr_1", "fam_1", "aa11deadbeef"))
        .unwrap();
    let account = store.rotate_secret("acc_1", "sk_next", T0 + 1, T0).unwrap();
    let user = store.get_user("usr_1").unwrap();
    let token = store.find_refresh_token("aa11deadbeef").unwrap().unwrap();
    let printed = format!(
        "{account:?} {user:?} {token:?} {:?} {:?} {:?}",
        new_account("a", "n", T0),
        new_user("u", "e@x.io", "owner", None),
        new_token("t", "u", "f", "aa11deadbeef"),
    );
    for secret in ["sk_current", "sk_next", "$argon2id", "aa11deadbeef"] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
    assert!(printed.contains("[redacted]"));
    assert!(
        printed.contains("owner@acme.io"),
        "non-secret fields still print"
    );
}
}

#[test]
fn new_ids_are_the_prefix_and_sixteen_lowercase_alphanumerics() {
    let id = new_id("acc_");
    let random = id.strip_prefix("acc_").unwrap();
    assert_eq!(random.len(), 16);
    assert!(
        random
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
        "{id}"
    );
    assert_ne!(new_id("acc_"), new_id("acc_"));
}

/// A PostgreSQL-shaped error, whose message does not name the column.
struct PgUnique {
    table: &'static str,
    constraint: &'static str,
}

impl DatabaseErrorInformation for PgUnique {
    fn message(&self) -> &str {
        "duplicate key value violates unique constraint"
    }
    fn details(&self) -> Option<&str> {
        Some("Key (email)=(secret@example.com) already exists.")
    }
    fn hint(&self) -> Option<&str> {
        None
    }
    fn table_name(&self) -> Option<&str> {
        Some(self.table)
    }
    fn column_name(&self) -> Option<&str> {
        None
    }
    fn constraint_name(&self) -> Option<&str> {
        Some(self.constraint)
    }
    fn statement_position(&self) -> Option<i32> {
        None
    }
}

#[test]
fn unique_violations_name_the_column_on_both_backends() {
    let sqlite = |m: &str| conflict_target(&m.to_owned());
    assert_eq!(sqlite("UNIQUE constraint failed: users.email"), "email");
    assert_eq!(
        sqlite("UNIQUE constraint failed: user_presence.account_id, user_presence.user_id"),
        "account_id,user_id"
    );
    let pg = |table, constraint| conflict_target(&PgUnique { table, constraint });
    assert_eq!(pg("users", "users_email_key"), "email");
    assert_eq!(
        pg("refresh_tokens", "refresh_tokens_token_hash_key"),
        "token_hash"
    );
    assert_eq!(pg("accounts", "accounts_pkey"), "id");

    let err = StoreError::from(DieselError::DatabaseError(
        DatabaseErrorKind::UniqueViolation,
        Box::new(PgUnique {
            table: "users",
            constraint: "users_email_key",
        }),
    ));
    assert!(!err.to_string().contains("secret@example.com"), "{err}");
}

// ---- presence snapshots and history ----

fn snapshot(node: &str, session: &str, user: &str, updated_at: i64) -> SessionSnapshot {
    SessionSnapshot {
        node_id: node.to_owned(),
        account_id: "acc_1".to_owned(),
        session_id: session.to_owned(),
        user_id: user.to_owned(),
        phx_ref: format!("ref-{session}"),
        status: "online".to_owned(),
        device: None,
        online_at: T0,
        meta: r#"{"name":"Ann"}"#.to_owned(),
        rooms: r#"["lobby"]"#.to_owned(),
        ghost_until: None,
        updated_at,
    }
}

fn sample(node: &str, room: &str, at: i64, resolution_ms: i64, users: i64) -> Sample {
    Sample {
        node_id: node.to_owned(),
        account_id: "acc_1".to_owned(),
        room: room.to_owned(),
        at,
        resolution_ms,
        users,
        connections: users * 2,
    }
}

fn open(room: &str, user: &str, session: &str, joined_at: i64) -> IntervalOpen {
    IntervalOpen {
        account_id: "acc_1".to_owned(),
        room: room.to_owned(),
        user_id: user.to_owned(),
        session_id: session.to_owned(),
        joined_at,
    }
}

/// A batch of `node` with nothing in it.
fn empty_batch(node: &str) -> SnapshotBatch<'_> {
    SnapshotBatch {
        node_id: node,
        upserts: &[],
        removals: &[],
        samples: &[],
        last_seen: &[],
        opened: &[],
        closed: &[],
    }
}

/// `(session, user, joined_at, left_at)` of intervals, for compact assertions.
fn spans(intervals: Vec<Interval>) -> Vec<(String, String, i64, Option<i64>)> {
    intervals
        .into_iter()
        .map(|i| (i.session_id, i.user_id, i.joined_at, i.left_at))
        .collect()
}

fn span(
    session: &str,
    user: &str,
    joined: i64,
    left: Option<i64>,
) -> (String, String, i64, Option<i64>) {
    (session.to_owned(), user.to_owned(), joined, left)
}

#[test]
fn a_snapshot_row_of_another_node_is_refused_before_anything_is_written() {
    let store = Store::open("sqlite::memory:", 1).unwrap();
    let upserts = [snapshot("node_b", "s1", "u1", T0)];
    let err = store
        .write_snapshot(&SnapshotBatch {
            upserts: &upserts,
            ..empty_batch("node_a")
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Other(_)), "{err:?}");
    assert!(store.load_snapshot("node_b").unwrap().is_empty());
}

on_both_backends! {
fn snapshots_upsert_remove_and_load_per_node(db: Db) {
    let mut ghost = snapshot("node_a", "s2", "u2", T0);
    ghost.device = Some("phone".to_owned());
    ghost.ghost_until = Some(T0 + 5_000);
    let first = [snapshot("node_a", "s1", "u1", T0), ghost.clone(), snapshot("node_a", "s3", "u3", T0)];
    db.write_snapshot(&SnapshotBatch { upserts: &first, ..empty_batch("node_a") }).unwrap();
    let other = [snapshot("node_b", "s1", "u9", T0)];
    db.write_snapshot(&SnapshotBatch { upserts: &other, ..empty_batch("node_b") }).unwrap();
    assert_eq!(db.load_snapshot("node_a").unwrap(), first.to_vec());

    // s1 changes (listed twice: the last wins), s3 goes, s4 arrives; node_b is untouched.
    let mut moved = snapshot("node_a", "s1", "u1", T0 + 10);
    moved.status = "away".to_owned();
    moved.meta = r#"{"name":"Ann","x":"'; DROP TABLE presence_snapshots;--"}"#.to_owned();
    let second = [snapshot("node_a", "s1", "u1", T0 + 5), moved.clone(), snapshot("node_a", "s4", "u4", T0 + 10)];
    let removals = ["s3".to_owned(), "s_unknown".to_owned()];
    db.write_snapshot(&SnapshotBatch { upserts: &second, removals: &removals, ..empty_batch("node_a") }).unwrap();
    assert_eq!(
        db.load_snapshot("node_a").unwrap(),
        vec![moved, ghost, snapshot("node_a", "s4", "u4", T0 + 10)]
    );
    assert_eq!(db.load_snapshot("node_b").unwrap(), other.to_vec());
    assert!(db.load_snapshot("node_c").unwrap().is_empty());
}

fn a_snapshot_of_twenty_thousand_sessions_is_written_in_chunks(db: Db) {
    // More rows than one statement can bind on either backend.
    let many: Vec<_> = (0..20_000)
        .map(|i| snapshot("node_a", &format!("s{i:05}"), &format!("u{}", i % 5_000), T0))
        .collect();
    // Written twice: inserts, then the same rows as updates.
    db.write_snapshot(&SnapshotBatch { upserts: &many, ..empty_batch("node_a") }).unwrap();
    db.write_snapshot(&SnapshotBatch { upserts: &many, ..empty_batch("node_a") }).unwrap();
    let loaded = db.load_snapshot("node_a").unwrap();
    assert_eq!(loaded.len(), 20_000);
    assert_eq!(loaded[19_999], many[19_999]);

    let removals: Vec<String> = many.iter().map(|s| s.session_id.clone()).collect();
    db.write_snapshot(&SnapshotBatch { removals: &removals, ..empty_batch("node_a") }).unwrap();
    assert_eq!(db.count("presence_snapshots"), 0);
}

fn a_failing_snapshot_batch_writes_nothing(db: Db) {
    let kept = [snapshot("node_a", "s1", "u1", T0)];
    db.write_snapshot(&SnapshotBatch { upserts: &kept, ..empty_batch("node_a") }).unwrap();
    // Make the last step of the next batch fail: two intervals of one session in one room.
    db.sql("CREATE UNIQUE INDEX one_interval_per_session ON presence_intervals (session_id)");
    let upserts = [snapshot("node_a", "s2", "u2", T0)];
    let removals = ["s1".to_owned()];
    let samples = [sample("node_a", "", T0, 5_000, 1)];
    let seen = [("acc_1".to_owned(), "u2".to_owned(), T0)];
    let opened = [open("lobby", "u2", "s2", T0), open("", "u2", "s2", T0)];
    let err = db
        .write_snapshot(&SnapshotBatch {
            node_id: "node_a",
            upserts: &upserts,
            removals: &removals,
            samples: &samples,
            last_seen: &seen,
            opened: &opened,
            closed: &[],
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(db.load_snapshot("node_a").unwrap(), kept.to_vec());
    assert_eq!(db.count("presence_samples"), 0);
    assert_eq!(db.count("presence_intervals"), 0);
    assert_eq!(db.last_seen("acc_1", "u2").unwrap(), None);
}

fn last_seen_in_a_snapshot_keeps_the_latest_time(db: Db) {
    let row = |u: &str, t: i64| ("acc_1".to_owned(), u.to_owned(), t);
    let seen = [row("u1", T0 + 10), row("u1", T0 + 3), row("u2", T0)];
    db.write_snapshot(&SnapshotBatch { last_seen: &seen, ..empty_batch("node_a") }).unwrap();
    let seen = [row("u1", T0 + 5), row("u2", T0 + 7)];
    db.write_snapshot(&SnapshotBatch { last_seen: &seen, ..empty_batch("node_b") }).unwrap();
    assert_eq!(db.last_seen("acc_1", "u1").unwrap(), Some(T0 + 10));
    assert_eq!(db.last_seen("acc_1", "u2").unwrap(), Some(T0 + 7));
}

fn history_samples_filter_by_account_room_and_time_in_order(db: Db) {
    let samples = [
        sample("node_a", "", T0 + 10, 5_000, 3),
        sample("node_a", "lobby", T0, 5_000, 1),
        sample("node_b", "lobby", T0 + 5, 5_000, 2),
        sample("node_a", "lobby", T0 + 20, 5_000, 4),
        sample("node_a", "lobby", T0 + 30, 5_000, 5),
        Sample { account_id: "acc_2".to_owned(), ..sample("node_a", "lobby", T0 + 1, 5_000, 9) },
    ];
    db.write_snapshot(&SnapshotBatch { samples: &samples, ..empty_batch("node_a") }).unwrap();
    let users = |list: Vec<Sample>| list.into_iter().map(|s| s.users).collect::<Vec<_>>();
    assert_eq!(users(db.history_samples("acc_1", "lobby", T0, T0 + 30, 100).unwrap()), [1, 2, 4]);
    assert_eq!(users(db.history_samples("acc_1", "lobby", T0, T0 + 100, 2).unwrap()), [1, 2]);
    assert_eq!(users(db.history_samples("acc_1", "", 0, i64::MAX, 100).unwrap()), [3]);
    assert!(db.history_samples("acc_1", "lobby", T0, T0 + 100, -1).unwrap().is_empty());
    let first = &db.history_samples("acc_2", "lobby", 0, i64::MAX, 1).unwrap()[0];
    assert_eq!(first, &samples[5]);
}

fn intervals_record_who_was_present_when(db: Db) {
    let opened = [
        open("lobby", "u1", "s1", T0),
        open("", "u1", "s1", T0),
        open("lobby", "u2", "s2", T0 + 10),
        open("lobby", "u3", "s3", T0 + 20),
    ];
    db.write_snapshot(&SnapshotBatch { opened: &opened, ..empty_batch("node_a") }).unwrap();
    // Another node's session with the same id is not closed by node_a's closes.
    let elsewhere = [open("lobby", "u9", "s1", T0)];
    db.write_snapshot(&SnapshotBatch { opened: &elsewhere, ..empty_batch("node_b") }).unwrap();

    // s1 ends; s2 leaves the lobby and comes back in the same batch; s3 joins and leaves.
    let opened = [open("lobby", "u2", "s2", T0 + 40), open("lobby", "u4", "s4", T0 + 42)];
    let closed = [
        IntervalClose::Session { session_id: "s1".to_owned(), left_at: T0 + 30 },
        IntervalClose::Room { session_id: "s2".to_owned(), room: "lobby".to_owned(), left_at: T0 + 35 },
        IntervalClose::Room { session_id: "s4".to_owned(), room: "lobby".to_owned(), left_at: T0 + 45 },
        IntervalClose::Session { session_id: "s3".to_owned(), left_at: T0 + 30 },
    ];
    db.write_snapshot(&SnapshotBatch { opened: &opened, closed: &closed, ..empty_batch("node_a") }).unwrap();

    assert_eq!(
        spans(db.intervals_at("acc_1", "lobby", T0 + 25, 100).unwrap()),
        [
            span("s1", "u1", T0, Some(T0 + 30)),
            span("s1", "u9", T0, None),
            span("s2", "u2", T0 + 10, Some(T0 + 35)),
            span("s3", "u3", T0 + 20, Some(T0 + 30)),
        ]
    );
    assert_eq!(
        spans(db.intervals_at("acc_1", "lobby", T0 + 40, 100).unwrap()),
        [span("s1", "u9", T0, None), span("s2", "u2", T0 + 40, None)],
        "left_at is exclusive, joined_at inclusive"
    );
    assert_eq!(
        spans(db.intervals_at("acc_1", "", T0 + 29, 100).unwrap()),
        [span("s1", "u1", T0, Some(T0 + 30))]
    );
    assert!(db.intervals_at("acc_1", "lobby", T0 - 1, 100).unwrap().is_empty());
    assert_eq!(db.intervals_at("acc_1", "lobby", T0 + 25, 2).unwrap().len(), 2);
    assert!(db.intervals_at("acc_2", "lobby", T0 + 25, 100).unwrap().is_empty());
}

fn twelve_thousand_room_closes_in_one_batch_close_exactly_their_intervals(db: Db) {
    // Each session is in two rooms and leaves one: only that room's interval closes.
    let opened: Vec<_> = (0..12_000)
        .flat_map(|i| {
            let s = format!("s{i:05}");
            [open("a", "u", &s, T0), open("b", "u", &s, T0)]
        })
        .collect();
    db.write_snapshot(&SnapshotBatch { opened: &opened, ..empty_batch("node_a") }).unwrap();
    let closed: Vec<_> = (0..12_000)
        .map(|i| IntervalClose::Room {
            session_id: format!("s{i:05}"),
            room: if i % 2 == 0 { "a" } else { "b" }.to_owned(),
            left_at: T0 + 10,
        })
        .collect();
    db.write_snapshot(&SnapshotBatch { closed: &closed, ..empty_batch("node_a") }).unwrap();
    assert_eq!(db.intervals_at("acc_1", "a", T0 + 10, 100_000).unwrap().len(), 6_000);
    assert_eq!(db.intervals_at("acc_1", "b", T0 + 10, 100_000).unwrap().len(), 6_000);
    assert_eq!(db.intervals_at("acc_1", "a", T0 + 9, 100_000).unwrap().len(), 12_000);
    let still_open = db.intervals_at("acc_1", "a", T0 + 10, 100_000).unwrap();
    assert!(still_open.iter().all(|i| i.session_id[1..].parse::<u32>().unwrap() % 2 == 1));
}

fn pruning_downsamples_old_samples_and_deletes_expired_history(db: Db) {
    const MIN: i64 = 60_000;
    let now = T0 + 100 * MIN;
    let policy = RetentionPolicy { raw_ms: 10 * MIN, rollup_bucket_ms: MIN, rollup_ms: 50 * MIN, batch: 2 };
    let at = |minutes: i64, secs: i64| now - minutes * MIN + secs * 1_000;
    let samples = [
        // Too old for anything: deleted.
        sample("node_a", "lobby", at(60, 0), 5_000, 7),
        sample("node_a", "lobby", at(55, 0), MIN, 7),
        // Two minutes of raw samples past the raw horizon: one row per minute, with the max.
        sample("node_a", "lobby", at(20, 0), 5_000, 1),
        sample("node_a", "lobby", at(20, 5), 5_000, 3),
        sample("node_a", "lobby", at(20, 10), 5_000, 2),
        sample("node_a", "lobby", at(19, 0), 5_000, 4),
        // Same minute, another node and another room: rows of their own.
        sample("node_b", "lobby", at(20, 5), 5_000, 6),
        sample("node_a", "", at(20, 5), 5_000, 8),
        // Recent: kept raw.
        sample("node_a", "lobby", at(5, 0), 5_000, 9),
    ];
    let opened = [open("lobby", "u1", "s1", at(70, 0)), open("lobby", "u2", "s2", at(70, 0)), open("lobby", "u3", "s3", at(70, 0))];
    let closed = [
        IntervalClose::Session { session_id: "s1".to_owned(), left_at: at(60, 0) },
        IntervalClose::Session { session_id: "s2".to_owned(), left_at: at(40, 0) },
    ];
    db.write_snapshot(&SnapshotBatch { samples: &samples, opened: &opened, closed: &closed, ..empty_batch("node_a") }).unwrap();

    let report = db.prune_history(&policy, now).unwrap();
    assert_eq!(report, PruneReport { downsampled: 6, deleted_samples: 2, deleted_intervals: 1 });
    let rows = |room: &str| {
        db.history_samples("acc_1", room, 0, i64::MAX, 100)
            .unwrap()
            .into_iter()
            .map(|s| (s.node_id, s.at, s.resolution_ms, s.users, s.connections))
            .collect::<Vec<_>>()
    };
    let a = |s: &str| s.to_owned();
    assert_eq!(
        rows("lobby"),
        [
            (a("node_a"), at(20, 0), MIN, 3, 6),
            (a("node_b"), at(20, 0), MIN, 6, 12),
            (a("node_a"), at(19, 0), MIN, 4, 8),
            (a("node_a"), at(5, 0), 5_000, 9, 18),
        ]
    );
    assert_eq!(rows(""), [(a("node_a"), at(20, 0), MIN, 8, 16)]);
    // The open interval and the one closed within the horizon stay.
    assert_eq!(db.count("presence_intervals"), 2);

    // A late raw sample of an already folded minute is merged into its row.
    let late = [sample("node_a", "lobby", at(20, 30), 5_000, 5)];
    db.write_snapshot(&SnapshotBatch { samples: &late, ..empty_batch("node_a") }).unwrap();
    let report = db.prune_history(&policy, now).unwrap();
    assert_eq!(report, PruneReport { downsampled: 1, ..PruneReport::default() });
    assert_eq!(rows("lobby")[0], (a("node_a"), at(20, 0), MIN, 5, 10));
    assert_eq!(db.prune_history(&policy, now).unwrap(), PruneReport::default());

    let bad = RetentionPolicy { batch: 0, ..policy };
    assert!(matches!(db.prune_history(&bad, now), Err(StoreError::Other(_))));
}
}

/// A database made before `cheaper_snapshot_writes` (presence_snapshots as a rowid table, every
/// interval in the left_at index) keeps its snapshot rows and history through the upgrade.
#[test]
fn snapshot_rows_survive_the_upgrade_to_a_without_rowid_table() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("old.db");
    {
        let mut conn = SqliteConnection::establish(path.to_str().unwrap()).unwrap();
        for _ in 0..3 {
            conn.run_next_migration(connect::SQLITE_MIGRATIONS).unwrap();
        }
        conn.batch_execute(
            "INSERT INTO presence_snapshots (node_id, account_id, session_id, user_id, phx_ref, \
             status, device, online_at, meta, rooms, ghost_until, updated_at) VALUES \
             ('node_a', 'acc_1', 's1', 'u1', 'a1', 'online', 'web', 1, '{}', '[]', NULL, 2); \
             INSERT INTO presence_intervals (node_id, account_id, room, user_id, session_id, \
             joined_at, left_at) VALUES ('node_a', 'acc_1', 'lobby', 'u1', 's1', 1, NULL), \
             ('node_a', 'acc_1', 'lobby', 'u2', 's2', 1, 5);",
        )
        .unwrap();
    }
    let store = Store::open(&format!("sqlite://{}", path.display()), 2).unwrap();
    let rows = store.load_snapshot("node_a").unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].session_id.as_str(), rows[0].user_id.as_str()),
        ("s1", "u1")
    );
    let mut conn = store.pool.get().unwrap();
    let err = conn
        .batch_execute("SELECT rowid FROM presence_snapshots")
        .unwrap_err();
    assert!(err.to_string().contains("no such column"), "{err}");
    drop(conn);
    // Upserts still find the row by its key.
    let mut row = rows[0].clone();
    row.status = "away".into();
    store
        .write_snapshot(&SnapshotBatch {
            upserts: &[row],
            ..empty_batch("node_a")
        })
        .unwrap();
    assert_eq!(store.load_snapshot("node_a").unwrap()[0].status, "away");
    // The closed interval is pruned through the now partial left_at index; the open one stays.
    let policy = RetentionPolicy {
        raw_ms: 1,
        rollup_bucket_ms: 1,
        rollup_ms: 1,
        batch: 10,
    };
    assert_eq!(
        store.prune_history(&policy, 100).unwrap().deleted_intervals,
        1
    );
    assert_eq!(
        spans(store.intervals_at("acc_1", "lobby", 50, 10).unwrap()),
        [span("s1", "u1", 1, None)]
    );
}
