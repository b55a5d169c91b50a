//! Unit tests of the store against real SQLite files in temporary directories.

use std::sync::atomic::{AtomicUsize, Ordering};

use diesel::prelude::*;
use diesel::result::{DatabaseErrorInformation, DatabaseErrorKind, Error as DieselError};
use tempfile::TempDir;

use super::connect::{run_migrations, Target};
use super::error::conflict_target;
use super::*;

const T0: i64 = 1_800_000_000_000;

/// A store on a fresh file; the `TempDir` must outlive it.
fn file_store() -> (TempDir, Store) {
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("presenced.db").display());
    let store = Store::open(&url, 4).unwrap();
    (dir, store)
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

/// A store with one account `acc_1` and one owner `usr_1` in it.
fn store_with_user() -> (TempDir, Store) {
    let (dir, store) = file_store();
    store
        .create_account(&new_account("acc_1", "Acme", T0))
        .unwrap();
    store
        .create_user(&new_user("usr_1", "owner@acme.io", "owner", Some("acc_1")))
        .unwrap();
    (dir, store)
}

#[test]
fn opening_the_same_file_twice_migrates_once_and_keeps_the_data() {
    let dir = TempDir::new().unwrap();
    let url = format!("sqlite://{}", dir.path().join("presenced.db").display());
    {
        let store = Store::open(&url, 2).unwrap();
        store
            .create_account(&new_account("acc_1", "Acme", T0))
            .unwrap();
    }
    let store = Store::open(&url, 2).unwrap();
    assert_eq!(store.list_accounts().unwrap().len(), 1);
    assert_eq!(store.list_plans().unwrap().len(), 3);
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
fn ping_answers_and_the_backend_is_sqlite() {
    let (_dir, store) = file_store();
    store.ping().unwrap();
    assert_eq!(store.backend(), "sqlite");
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
}

#[test]
fn database_urls_name_a_file_or_memory() {
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
}

#[test]
fn a_postgres_url_is_refused_without_repeating_its_password() {
    let err = Store::open("postgres://app:hunter2@db:5432/presenced", 1).unwrap_err();
    assert!(matches!(err, StoreError::Other(_)), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("postgres"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
}

#[test]
fn a_failed_migration_names_the_migration_and_the_database_error() {
    let dir = TempDir::new().unwrap();
    let good = dir.path().join("2026-01-01-000000_good");
    let bad = dir.path().join("2026-01-02-000000_broken");
    std::fs::create_dir_all(&good).unwrap();
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(good.join("up.sql"), "CREATE TABLE kept (id TEXT);").unwrap();
    std::fs::write(good.join("down.sql"), "DROP TABLE kept;").unwrap();
    std::fs::write(bad.join("up.sql"), "CREATE TABLE oops (;").unwrap();
    std::fs::write(bad.join("down.sql"), "").unwrap();
    let source = diesel_migrations::FileBasedMigrations::from_path(dir.path()).unwrap();

    let mut conn = DbConn::establish(":memory:").unwrap();
    let err = run_migrations(&mut conn, source).unwrap_err();

    let StoreError::Migration(message) = &err else {
        panic!("expected a migration error, got {err:?}");
    };
    assert!(
        message.starts_with("2026-01-02-000000_broken: "),
        "{message}"
    );
    assert!(message.contains("syntax error"), "{message}");
    // All or nothing: the good migration before it was rolled back too.
    use diesel::connection::SimpleConnection;
    let kept = conn.batch_execute("SELECT * FROM kept").unwrap_err();
    assert!(kept.to_string().contains("no such table"), "{kept}");
}

#[test]
fn the_three_plans_are_seeded_with_their_limits() {
    let (_dir, store) = file_store();
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

#[test]
fn accounts_can_be_created_listed_and_fetched() {
    let (_dir, store) = file_store();
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

#[test]
fn creating_an_account_twice_with_one_id_is_a_conflict_on_id() {
    let (_dir, store) = file_store();
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

#[test]
fn an_account_on_a_missing_plan_is_not_found() {
    let (_dir, store) = file_store();
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

#[test]
fn updating_an_account_changes_only_the_given_fields() {
    let (_dir, store) = store_with_user();
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

#[test]
fn rotating_a_secret_keeps_the_old_one_as_previous_until_it_expires() {
    let (_dir, store) = store_with_user();
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

#[test]
fn a_name_with_sql_metacharacters_round_trips_unchanged() {
    let (_dir, store) = file_store();
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

#[test]
fn a_duplicate_email_is_a_conflict_on_email_whatever_its_case() {
    let (_dir, store) = store_with_user();
    let err = store
        .create_user(&new_user("usr_2", "Owner@ACME.io", "member", Some("acc_1")))
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Conflict(what) if what == "email"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "email already exists");
}

#[test]
fn users_are_stored_with_lowercased_email_and_found_whatever_the_case() {
    let (_dir, store) = file_store();
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

#[test]
fn a_user_of_a_missing_account_is_not_found_and_an_unknown_role_is_refused() {
    let (_dir, store) = file_store();
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

#[test]
fn users_are_listed_per_account_and_admins_are_counted() {
    let (_dir, store) = store_with_user();
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
        .list_users("acc_1")
        .unwrap()
        .into_iter()
        .map(|u| u.id)
        .collect();
    assert_eq!(ids, ["usr_1", "usr_2"]);
    assert_eq!(store.count_admins().unwrap(), 1);
}

#[test]
fn deleting_a_user_removes_its_refresh_tokens_and_a_second_delete_is_not_found() {
    let (_dir, store) = store_with_user();
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

#[test]
fn a_refresh_token_can_be_spent_only_once() {
    let (_dir, store) = store_with_user();
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

#[test]
fn concurrent_spends_of_one_refresh_token_let_exactly_one_win() {
    let (_dir, store) = store_with_user();
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

#[test]
fn a_duplicate_token_hash_is_a_conflict_and_a_token_needs_its_user() {
    let (_dir, store) = store_with_user();
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

#[test]
fn revoke_family_revokes_every_token_of_the_family_and_no_other() {
    let (_dir, store) = store_with_user();
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

#[test]
fn get_or_create_server_key_returns_the_same_key_twice() {
    let (dir, store) = file_store();
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

    drop(store);
    let url = format!("sqlite://{}", dir.path().join("presenced.db").display());
    let reopened = Store::open(&url, 1).unwrap();
    let after_restart = reopened
        .get_or_create_server_key("jwt", || "generated-2".to_owned(), T0 + 2)
        .unwrap();
    assert_eq!(after_restart, "generated-1");
}

#[test]
fn upsert_last_seen_keeps_the_latest_time() {
    let (_dir, store) = file_store();
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

#[test]
fn audit_entries_filter_by_account_and_time_newest_first() {
    let (_dir, store) = file_store();
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

#[test]
fn every_pooled_connection_enforces_foreign_keys() {
    let (_dir, store) = file_store();
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

#[test]
fn concurrent_writers_on_one_file_wait_for_each_other_instead_of_failing() {
    let (_dir, store) = file_store();
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

#[test]
fn debug_output_redacts_secrets_and_hashes() {
    let (_dir, store) = store_with_user();
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
