//! Persistence against real databases: every test runs on SQLite and on the real PostgreSQL
//! (a fresh database per test, dropped afterwards). A node is killed with SIGKILL and restarted
//! as a child process; the database is cut with a TCP proxy while the node runs.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use presenced::store::testdb::TempDatabase;
use presenced::store::Store;

use crate::helpers::*;

/// A persistence test's node: SQLite or PostgreSQL, fast snapshots and history samples.
fn start_node(port: u16, db_url: &str, node_id: &str, grace_ms: u64) -> ChildNode {
    ChildNode::start(
        port,
        &[
            ("PRESENCED__SERVER__WORKERS", "2".into()),
            ("DATABASE_URL", db_url.into()),
            ("PRESENCED__DATABASE__POOL_SIZE", "4".into()),
            ("PRESENCED__CLUSTER__NODE_ID", node_id.into()),
            ("PRESENCED__PRESENCE__GRACE_MS", grace_ms.to_string()),
            ("PRESENCED__PRESENCE__ARBITERS", "2".into()),
            ("PRESENCED__SNAPSHOT__INTERVAL_MS", "100".into()),
            ("PRESENCED__HISTORY__SAMPLE_INTERVAL_MS", "1000".into()),
        ],
    )
}

/// A `TestApp`-like view of a child node, for the HTTP helpers.
async fn admin_of(node: &ChildNode) -> String {
    login(&node.http, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .expect("admin logs in")
}

async fn get_json(http: &str, path: &str, token: &str) -> (u16, Value) {
    let mut res = client()
        .get(format!("{http}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request");
    let status = res.status().as_u16();
    let body = res.body().limit(16 << 20).await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn metric_of(http: &str, name: &str, label: &str) -> f64 {
    let mut res = client()
        .get(format!("{http}/metrics"))
        .send()
        .await
        .expect("metrics");
    let body = res.body().await.expect("body");
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#') && l.starts_with(name) && l.contains(label))
        .filter(|l| matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn refs_in_state(state: &Value, user: &str) -> Vec<String> {
    state[user]["metas"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|x| x["phx_ref"].as_str().unwrap_or("").to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Frames on `topic` that mention `user` in a diff.
fn diffs_about(c: &WsClient, topic: &str, user: &str) -> Vec<Value> {
    c.seen
        .iter()
        .filter(|v| v[2] == topic && v[3] == "presence_diff")
        .filter(|v| {
            joins_of(v)
                .iter()
                .chain(leaves_of(v).iter())
                .any(|k| k == user)
        })
        .cloned()
        .collect()
}

/// Waits until a snapshot tick that began after this call has been committed. The sessions
/// gauge alone is not enough: a tick collected just before a room join can commit after it,
/// with the session but without its room.
async fn snapshot_taken_after_now(http: &str) {
    let ok = r#"result="ok""#;
    let start = metric_of(http, "presenced_snapshot_ticks_total", ok).await;
    // Ticks never overlap: the one in flight (if any) commits first, the next began after now.
    eventually("a snapshot tick begun after now", || async move {
        (metric_of(http, "presenced_snapshot_ticks_total", ok).await >= start + 2.0).then_some(())
    })
    .await;
}

/// The heart of the issue: kill -9, restart, and nobody flaps.
async fn kill9_restart_restores_presence_without_flapping(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let port = free_port();
    let grace = 4_000;
    let mut node = start_node(port, db.url(), "node-k9", grace);
    node.ready().await;
    let admin = admin_of(&node).await;
    let mut res = client()
        .post(format!("{}/api/v1/accounts", node.http))
        .bearer_auth(&admin)
        .send_json(&json!({"name": "Kill Nine", "plan": "pro"}))
        .await
        .expect("create account");
    assert_eq!(res.status().as_u16(), 201);
    let acc: Value = res.json().await.expect("account json");
    let (acc_id, secret) = (
        acc["id"].as_str().unwrap().to_string(),
        acc["signing_secret"].as_str().unwrap().to_string(),
    );
    let token =
        |u: &str| presenced::auth::mint_user_token(&secret, &acc_id, u, 3600, Some(u), None);
    let topic = "room:lobby";
    let join = |device: &str| json!({"status": "online", "meta": {"device": device}});

    let mut obs = node.connect(&token("observer")).await;
    obs.join_ok(topic, join("obs-tab")).await;
    let mut back = node.connect(&token("comes_back")).await;
    back.join_ok(topic, join("phone")).await;
    let mut gone = node.connect(&token("never_returns")).await;
    gone.join_ok(topic, join("laptop")).await;
    for u in ["comes_back", "never_returns"] {
        obs.expect(&format!("{u} joins"), |v| {
            is_diff(topic)(v) && joins_of(v).contains(&u.to_string())
        })
        .await;
    }
    // A snapshot holding all three, in the room, has been written.
    snapshot_taken_after_now(&node.http).await;
    assert_eq!(
        metric_of(&node.http, "presenced_snapshot_sessions", "").await,
        3.0
    );
    let before_crash = presence_actors::now_ms();
    let state_before = {
        let (s, v) = get_json(
            &node.http,
            &format!("/api/v1/accounts/{acc_id}/rooms/lobby/presence"),
            &admin,
        )
        .await;
        assert_eq!(s, 200, "{v}");
        v["presences"].clone()
    };

    node.kill9();
    drop((obs, back, gone));
    let mut node = start_node(port, db.url(), "node-k9", grace);
    node.ready().await;
    let restarted = Instant::now();

    // The observer reconnects (as phoenix.js does by itself) and finds everyone present, with
    // the very refs it knew: nothing to reconcile, nothing flaps.
    let mut obs = node.connect(&token("observer")).await;
    let state = obs.join_ok(topic, join("obs-tab")).await;
    for u in ["observer", "comes_back", "never_returns"] {
        assert_eq!(
            refs_in_state(&state, u),
            refs_in_state(&state_before, u),
            "{u} must be restored with the same ref: {state}"
        );
    }
    let mut back = node.connect(&token("comes_back")).await;
    let state = back.join_ok(topic, join("phone")).await;
    assert_eq!(
        refs_in_state(&state, "comes_back"),
        refs_in_state(&state_before, "comes_back")
    );
    assert!(
        restarted.elapsed() < Duration::from_millis(grace),
        "internal: the reconnects must happen within the grace window"
    );

    // The one that never comes back leaves once, after the grace window.
    let leave = obs
        .expect("never_returns leaves after the grace window", |v| {
            is_diff(topic)(v) && leaves_of(v).contains(&"never_returns".to_string())
        })
        .await;
    assert!(joins_of(&leave).is_empty(), "a leave-only diff: {leave}");
    // Let anything else that could come, come.
    let _ = obs.try_expect(Duration::from_millis(800), &|_| false).await;
    assert!(
        diffs_about(&obs, topic, "comes_back").is_empty(),
        "the session that came back must cause no diff: {:?}",
        diffs_about(&obs, topic, "comes_back")
    );
    assert!(diffs_about(&obs, topic, "observer").is_empty());
    assert_eq!(diffs_about(&obs, topic, "never_returns").len(), 1);

    // last_seen of the user who never came back survives the crash.
    let admin = admin_of(&node).await;
    let (s, v) = get_json(
        &node.http,
        &format!("/api/v1/accounts/{acc_id}/users/never_returns/presence"),
        &admin,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["online"], false, "{v}");
    let seen = v["last_seen"]
        .as_i64()
        .unwrap_or_else(|| panic!("last_seen: {v}"));
    assert!(seen <= presence_actors::now_ms(), "{v}");
    assert!(
        seen >= before_crash - 120_000,
        "last_seen {seen} is far older than the crash: {v}"
    );
    node.kill9();
}

#[actix_web::test]
async fn kill9_restart_restores_presence_without_flapping_on_sqlite() {
    kill9_restart_restores_presence_without_flapping(Backend::Sqlite).await;
}

#[actix_web::test]
async fn kill9_restart_restores_presence_without_flapping_on_postgres() {
    kill9_restart_restores_presence_without_flapping(Backend::Postgres).await;
}

/// Fast snapshots and samples for in-process nodes.
fn fast_snapshots(s: &mut presenced::config::Settings, db: &TempDatabase, node: &str) {
    s.database.url = db.url().to_string();
    s.cluster.node_id = Some(node.into());
    s.snapshot.interval_ms = 100;
    s.snapshot.retry_max_ms = 400;
    s.history.sample_interval_ms = 500;
    // These clients never heartbeat; a slow machine must not time them out mid-test.
    s.presence.timeout_ms = 120_000;
}

async fn wait_snapshot_sessions(app: &TestApp, n: f64) {
    snapshot_taken_after_now(&app.http).await;
    eventually(&format!("a snapshot of {n} sessions"), || async {
        (app.metric("presenced_snapshot_sessions", "").await == n).then_some(())
    })
    .await;
}

async fn history_and_last_seen_survive_a_restart(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let app = spawn_app_with(|s| fast_snapshots(s, &db, "node-h")).await;
    let acc = app.create_account("History").await;
    let t0 = presence_actors::now_ms();
    let mut a = app.connect(&app.user_token(&acc, "alice")).await;
    a.join_ok("room:hall", json!({"status": "online"})).await;
    let mut b = app.connect(&app.user_token(&acc, "bob")).await;
    b.join_ok("room:hall", json!({"status": "away"})).await;
    wait_snapshot_sessions(&app, 2.0).await;
    let both_at = presence_actors::now_ms();
    b.close().await;
    // bob's grace (300 ms) runs out, then a snapshot without him is written.
    wait_snapshot_sessions(&app, 1.0).await;
    let after = presence_actors::now_ms() + 1;

    // A series over the account and over the room shows 2 connections, then 1.
    for room in ["", "&room=hall"] {
        let (s, v) = app
            .get(
                &format!(
                    "/api/v1/accounts/{}/presence/history?from={t0}&to={after}&step=1000{room}",
                    acc.id
                ),
                &app.admin_token,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let series = v["series"].as_array().expect("series");
        assert!(!series.is_empty(), "{v}");
        let max = series
            .iter()
            .map(|p| p["connections"].as_i64().unwrap())
            .max();
        assert_eq!(max, Some(2), "{v}");
        // From the moment bob's departure was written, one user (the last sample carries on).
        let (s, v) = app
            .get(
                &format!(
                    "/api/v1/accounts/{}/presence/history?from={after}&to={}{room}",
                    acc.id,
                    after + 1000
                ),
                &app.admin_token,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["series"][0]["users"], 1, "{v}");
        assert_eq!(v["series"][0]["connections"], 1, "{v}");
    }
    // Time travel: who was in the hall when both were there.
    let (s, v) = app
        .get(
            &format!(
                "/api/v1/accounts/{}/presence/history?at={both_at}&room=hall",
                acc.id
            ),
            &app.admin_token,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let users: Vec<&str> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["user"].as_str().unwrap())
        .collect();
    assert_eq!(users, vec!["alice", "bob"], "{v}");
    assert_eq!(v["users"], 2);

    // Bad queries are clear 400s.
    for q in [
        "from=10&to=5",
        "at=5&from=1",
        "step=10",
        "room=no%20spaces",
        "bogus=1",
    ] {
        let (s, v) = app
            .get(
                &format!("/api/v1/accounts/{}/presence/history?{q}", acc.id),
                &app.admin_token,
            )
            .await;
        assert_eq!(s, 400, "{q}: {v}");
    }
    // A long range without a step is bounded in points, with or without a step given.
    let now = presence_actors::now_ms();
    for q in ["", "&step=1000"] {
        let month = 30 * 24 * 3_600_000_i64;
        let (s, v) = app
            .get(
                &format!(
                    "/api/v1/accounts/{}/presence/history?from={}&to={now}{q}",
                    acc.id,
                    now - month
                ),
                &app.admin_token,
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let points = v["series"].as_array().unwrap().len();
        assert!((1..=2_000).contains(&points), "{q}: {points} points");
        assert!(v["step"].as_i64().unwrap() >= month / 2_000, "{v}");
    }

    // bob is offline with a last_seen between his join and now.
    let (s, v) = app
        .get(
            &format!("/api/v1/accounts/{}/users/bob/presence", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["online"], false);
    let seen = v["last_seen"].as_i64().expect("last_seen");
    assert!(seen >= t0 && seen <= after, "{v}");

    // After a restart on the same database, the answers are the same.
    a.close().await;
    presenced::app::shutdown(app.handle.clone(), app.state.clone()).await;
    let app2 = spawn_app_with(|s| fast_snapshots(s, &db, "node-h")).await;
    let token = login(&app2.http, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .unwrap();
    let (s, v2) = app2
        .get(
            &format!("/api/v1/accounts/{}/users/bob/presence", acc.id),
            &token,
        )
        .await;
    assert_eq!(s, 200, "{v2}");
    assert_eq!(v2["last_seen"], v["last_seen"], "{v2}");
    let (s, v) = app2
        .get(
            &format!(
                "/api/v1/accounts/{}/presence/history?at={both_at}&room=hall",
                acc.id
            ),
            &token,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["users"], 2, "{v}");
}

#[actix_web::test]
async fn history_and_last_seen_survive_a_restart_on_sqlite() {
    history_and_last_seen_survive_a_restart(Backend::Sqlite).await;
}

#[actix_web::test]
async fn history_and_last_seen_survive_a_restart_on_postgres() {
    history_and_last_seen_survive_a_restart(Backend::Postgres).await;
}

async fn two_nodes_on_one_database_keep_their_own_snapshots(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let a = spawn_app_with(|s| fast_snapshots(s, &db, "node-a")).await;
    let b = spawn_app_with(|s| fast_snapshots(s, &db, "node-b")).await;
    let acc = a.create_account("Shared").await;
    let mut ca = a.connect(&a.user_token(&acc, "on_a")).await;
    ca.join_ok("room:x", json!({})).await;
    let mut cb = b.connect(&b.user_token(&acc, "on_b")).await;
    cb.join_ok("room:x", json!({})).await;
    wait_snapshot_sessions(&a, 1.0).await;
    wait_snapshot_sessions(&b, 1.0).await;
    // Several more ticks of each: neither deletes the other's rows.
    actix_web::rt::time::sleep(Duration::from_millis(500)).await;
    let store = Store::open(db.url(), 1).expect("store");
    let users = |node: &str| -> Vec<String> {
        store
            .load_snapshot(node)
            .unwrap()
            .into_iter()
            .map(|r| r.user_id)
            .collect()
    };
    assert_eq!(users("node-a"), vec!["on_a".to_string()]);
    assert_eq!(users("node-b"), vec!["on_b".to_string()]);
    drop((ca, cb));
}

#[actix_web::test]
async fn two_nodes_on_one_database_keep_their_own_snapshots_on_sqlite() {
    two_nodes_on_one_database_keep_their_own_snapshots(Backend::Sqlite).await;
}

#[actix_web::test]
async fn two_nodes_on_one_database_keep_their_own_snapshots_on_postgres() {
    two_nodes_on_one_database_keep_their_own_snapshots(Backend::Postgres).await;
}

#[actix_web::test]
async fn presence_survives_a_database_outage_and_the_next_snapshot_writes_it() {
    let Some(db) = temp_db(Backend::Postgres) else {
        return;
    };
    let real = url::Url::parse(db.url()).unwrap();
    let target = format!(
        "{}:{}",
        real.host_str().unwrap(),
        real.port().unwrap_or(5432)
    );
    let proxy = Proxy::start(target).await;
    let mut via = real.clone();
    via.set_port(Some(proxy.port)).unwrap();
    let proxied = TempDatabaseUrl(via.to_string());
    let app = spawn_app_with(|s| {
        s.database.url = proxied.0.clone();
        s.cluster.node_id = Some("node-outage".into());
        s.snapshot.interval_ms = 100;
        s.snapshot.retry_max_ms = 300;
        s.snapshot.max_buffered_samples = 5;
        s.history.sample_interval_ms = 100;
        // The outage phase can outlast the default test heartbeat timeout on a loaded machine
        // (each failing checkout waits for the pool); these clients never heartbeat.
        s.presence.timeout_ms = 120_000;
    })
    .await;
    let acc = app.create_account("Outage").await;
    let mut obs = app.connect(&app.user_token(&acc, "obs")).await;
    obs.join_ok("room:r", json!({})).await;
    wait_snapshot_sessions(&app, 1.0).await;

    proxy.cut();
    // Presence keeps working from memory: a join and a status change reach the observer.
    let mut late = app.connect(&app.user_token(&acc, "late")).await;
    late.join_ok("room:r", json!({"status": "online"})).await;
    obs.expect("late joins", |v| {
        is_diff("room:r")(v) && joins_of(v).contains(&"late".into())
    })
    .await;
    late.push("1", "room:r", "status", json!({"status": "busy"}))
        .await;
    obs.expect("late is busy", |v| {
        is_diff("room:r")(v) && v[4]["joins"]["late"]["metas"][0]["status"] == "busy"
    })
    .await;
    // readyz says the database is down; metrics count failed snapshots.
    let (s, v) = eventually("readyz to report the database down", || async {
        let r = app.get("/readyz", "").await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!(s, 503);
    assert_eq!(v["database"]["status"], "down", "{v}");
    eventually("failed snapshots counted", || async {
        (app.metric("presenced_snapshot_ticks_total", "error").await >= 2.0).then_some(())
    })
    .await;
    // The sample buffer is bounded: old samples are dropped, counted, never piled up.
    eventually("samples dropped while the database is down", || async {
        (app.metric("presenced_history_samples_dropped_total", "")
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(app.metric("presenced_history_samples_buffered", "").await <= 5.0);
    assert_eq!(app.metric("presenced_database_up", "").await, 0.0);

    proxy.restore();
    eventually("readyz to report the database up", || async {
        (app.get("/readyz", "").await.0 == 200).then_some(())
    })
    .await;
    eventually("the snapshot to catch up", || async {
        (app.metric("presenced_database_up", "").await == 1.0).then_some(())
    })
    .await;
    wait_snapshot_sessions(&app, 2.0).await;
    // What the database holds now is what the node acknowledged during the outage.
    let store = Store::open(db.url(), 1).expect("store");
    let rows = store.load_snapshot("node-outage").unwrap();
    let late_row = rows
        .iter()
        .find(|r| r.user_id == "late")
        .expect("the session that joined during the outage is in the snapshot");
    let rooms: Value = serde_json::from_str(&late_row.rooms).unwrap();
    assert_eq!(rooms[0]["room"], "r", "{rooms}");
    assert_eq!(rooms[0]["status"], "busy", "{rooms}");
    drop((obs, late));
}

/// Keeps the proxied URL apart from the `TempDatabase`, which must drop the real database.
struct TempDatabaseUrl(String);

#[actix_web::test]
async fn a_failing_migration_stops_startup_with_one_clear_error_and_applies_nothing() {
    use diesel::connection::SimpleConnection;
    use diesel::{Connection, RunQueryDsl};
    let Some(db) = temp_db(Backend::Postgres) else {
        return;
    };
    {
        let mut conn = diesel::PgConnection::establish(db.url()).unwrap();
        // A table in the way of the second migration.
        conn.batch_execute("CREATE TABLE presence_samples (nonsense INT)")
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path());
    settings.database.url = db.url().to_string();
    let err = match presenced::app::Application::build(settings).await {
        Ok(_) => panic!("start-up must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("database.url:"), "{err}");
    assert!(
        err.contains("presence_history"),
        "names the migration: {err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let mut conn = diesel::PgConnection::establish(db.url()).unwrap();
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let n: N = diesel::sql_query(
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_schema = 'public' \
         AND table_name IN ('accounts', 'users', '__diesel_schema_migrations')",
    )
    .get_result(&mut conn)
    .unwrap();
    assert_eq!(n.n, 0, "nothing of the first migration may remain");
}
