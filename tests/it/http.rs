//! Admin API and ops endpoints against a real node.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use actix_web::rt::time::sleep;
use awc::error::WsClientError;
use awc::ws::CloseCode;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use presenced::config::{RoomThreads, Scheduling, Settings};
use presenced::store::NewUser;

use crate::helpers::*;

// ---- helpers of this file ----

/// Creates a dashboard user directly in the store and logs it in; returns its access token.
async fn dashboard_user(app: &TestApp, account: Option<&str>, role: &str, email: &str) -> String {
    let password = "dashboard-password-1";
    let hash = presenced::auth::hash_password(password).expect("hash");
    let id = presenced::store::new_id("usr_");
    app.state
        .store
        .create_user(&NewUser {
            id: &id,
            email,
            password_hash: &hash,
            role,
            account_id: account,
            created_at: 0,
        })
        .expect("user created");
    login(&app.http, email, password)
        .await
        .expect("dashboard user logs in")
}

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    app.send("POST", path, token, &body.to_string()).await
}

/// The full login response (access and refresh tokens) of the bootstrap admin.
async fn admin_pair(app: &TestApp) -> Value {
    let (status, v) = post(
        app,
        "/api/v1/auth/login",
        None,
        json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn refresh(app: &TestApp, token: &str) -> (u16, Value) {
    post(
        app,
        "/api/v1/auth/refresh",
        None,
        json!({ "refresh_token": token }),
    )
    .await
}

fn str_of(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .to_string()
}

fn keys_of(v: &Value) -> Vec<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Asks `path` until `ok` holds for the answer (the actors update asynchronously), or fails
/// after `WAIT` with the last answer.
async fn get_until(
    app: &TestApp,
    path: &str,
    token: &str,
    what: &str,
    ok: impl Fn(u16, &Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, v) = app.get(path, token).await;
        if ok(status, &v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what} at {path}: {status} {v}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the metric has the value `want`.
async fn metric_becomes(app: &TestApp, name: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = app.metric(name, "").await;
        if got == want {
            return;
        }
        if Instant::now() > deadline {
            panic!("{name} is {got}, expected {want}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// The HTTP status of a refused WebSocket upgrade.
async fn refused_upgrade(app: &TestApp, token: &str) -> u16 {
    match WsClient::connect(&format!("{}&token={token}", app.ws)).await {
        Ok(_) => panic!("the upgrade succeeded"),
        Err(WsClientError::InvalidResponseStatus(s)) => s.as_u16(),
        Err(e) => panic!("the upgrade failed without a status: {e}"),
    }
}

/// Waits until the audit log (of `account`, or all) has an entry matching `pred`.
async fn audit_has(
    app: &TestApp,
    account: Option<&str>,
    pred: impl Fn(&presenced::store::AuditLog) -> bool,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let audit = app
            .state
            .store
            .list_audit(account, 0, i64::MAX, 100)
            .expect("audit");
        if audit.iter().any(&pred) {
            return;
        }
        if Instant::now() > deadline {
            panic!("no such audit entry in {audit:?}");
        }
        sleep(Duration::from_millis(20)).await;
    }
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn write_config(dir: &tempfile::TempDir, toml: &str) -> std::path::PathBuf {
    let path = dir.path().join("presenced.toml");
    std::fs::write(&path, toml).expect("config written");
    path
}

// ---- 1. auth ----

#[actix_web::test]
async fn login_returns_an_access_token_a_refresh_token_and_its_lifetime() {
    let app = spawn_app().await;
    let v = admin_pair(&app).await;
    assert!(!str_of(&v, "access_token").is_empty());
    assert!(!str_of(&v, "refresh_token").is_empty());
    assert!(v["expires_in"].as_u64().expect("expires_in") > 0, "{v}");
    // The access token opens the admin API.
    let (status, _) = app
        .get("/api/v1/accounts", &str_of(&v, "access_token"))
        .await;
    assert_eq!(status, 200);
}

#[actix_web::test]
async fn login_with_a_wrong_password_is_a_401() {
    let app = spawn_app().await;
    let (status, v) = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({"email": ADMIN_EMAIL, "password": "not-the-password"}),
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "invalid_credentials");
}

#[actix_web::test]
async fn login_with_an_unknown_email_is_a_401_with_the_same_body() {
    let app = spawn_app().await;
    let (s1, wrong_password) = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({"email": ADMIN_EMAIL, "password": "not-the-password"}),
    )
    .await;
    let (s2, unknown) = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({"email": "nobody@test.local", "password": "not-the-password"}),
    )
    .await;
    assert_eq!((s1, s2), (401, 401));
    assert_eq!(unknown["error"], "invalid_credentials");
    assert_eq!(
        unknown, wrong_password,
        "the bodies reveal which emails exist"
    );
}

#[actix_web::test]
async fn a_malformed_json_body_is_a_400() {
    let app = spawn_app().await;
    let (status, v) = app
        .send(
            "POST",
            "/api/v1/auth/login",
            None,
            r#"{"email": "a@b", "pass"#,
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "malformed_json");
    assert!(v["message"].is_string());
}

#[actix_web::test]
async fn a_json_body_with_wrong_types_is_a_422() {
    let app = spawn_app().await;
    let (status, v) = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({"email": 1, "password": []}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"], "invalid_fields");
}

#[actix_web::test]
async fn a_body_over_64_kib_is_a_413() {
    let app = spawn_app().await;
    let body = json!({"email": "a".repeat(70 * 1024), "password": "x"});
    let (status, v) = post(&app, "/api/v1/auth/login", None, body).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["error"], "payload_too_large");
}

#[actix_web::test]
async fn refresh_rotates_the_pair_and_the_spent_token_no_longer_works() {
    let app = spawn_app().await;
    let first = admin_pair(&app).await;
    let (status, second) = refresh(&app, &str_of(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert!(second["expires_in"].as_u64().is_some());

    // The new pair works: its access token opens the API and its refresh token refreshes.
    let (status, _) = app
        .get("/api/v1/accounts", &str_of(&second, "access_token"))
        .await;
    assert_eq!(status, 200);
    let (status, third) = refresh(&app, &str_of(&second, "refresh_token")).await;
    assert_eq!(status, 200, "{third}");

    // The first one is spent.
    let (status, v) = refresh(&app, &str_of(&first, "refresh_token")).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "invalid_refresh_token");
}

#[actix_web::test]
async fn reusing_a_spent_refresh_token_revokes_the_family_and_is_audited() {
    let app = spawn_app().await;
    let first = admin_pair(&app).await;
    // An unrelated login: another family, which must survive.
    let other = admin_pair(&app).await;
    let (status, second) = refresh(&app, &str_of(&first, "refresh_token")).await;
    assert_eq!(status, 200, "{second}");

    // Someone replays the spent token.
    let (status, v) = refresh(&app, &str_of(&first, "refresh_token")).await;
    assert_eq!(status, 401, "{v}");

    // The newest token of that family is revoked too.
    let (status, v) = refresh(&app, &str_of(&second, "refresh_token")).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "invalid_refresh_token");

    // The other family is untouched.
    let (status, v) = refresh(&app, &str_of(&other, "refresh_token")).await;
    assert_eq!(status, 200, "{v}");

    let audit = app
        .state
        .store
        .list_audit(None, 0, i64::MAX, 100)
        .expect("audit");
    let reuse: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "refresh_token_reuse")
        .collect();
    assert_eq!(reuse.len(), 1, "{audit:?}");
    assert_eq!(
        reuse[0].actor.as_deref(),
        first["user"]["id"].as_str(),
        "the audit names the token's user"
    );
}

#[actix_web::test]
async fn logout_is_a_204_and_its_refresh_token_no_longer_works() {
    let app = spawn_app().await;
    let pair = admin_pair(&app).await;
    let (status, v) = post(
        &app,
        "/api/v1/auth/logout",
        Some(&str_of(&pair, "access_token")),
        json!({"refresh_token": str_of(&pair, "refresh_token")}),
    )
    .await;
    assert_eq!(status, 204, "{v}");
    let (status, v) = refresh(&app, &str_of(&pair, "refresh_token")).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "invalid_refresh_token");
}

#[actix_web::test]
async fn an_unknown_refresh_token_is_a_401() {
    let app = spawn_app().await;
    let (status, v) = refresh(&app, "not-a-refresh-token").await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "invalid_refresh_token");
}

#[actix_web::test]
async fn a_body_that_is_not_json_is_a_415() {
    let app = spawn_app().await;
    let mut res = client()
        .post(format!("{}/api/v1/auth/login", app.http))
        .insert_header(("content-type", "text/plain"))
        .send_body(json!({"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}).to_string())
        .await
        .expect("request");
    assert_eq!(res.status().as_u16(), 415);
    let v: Value = res.json().await.expect("json error");
    assert_eq!(v["error"], "unsupported_media_type");
}

#[actix_web::test]
async fn an_end_user_token_does_not_open_the_admin_api() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let token = app.user_token(&acc, "ann");
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}/presence", acc.id), &token)
        .await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "wrong_token_type");
}

#[actix_web::test]
async fn a_refresh_token_reuse_by_an_account_user_is_audited_under_that_account() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    dashboard_user(&app, Some(&acc.id), "owner", "owner@acme.test").await;
    let (status, first) = post(
        &app,
        "/api/v1/auth/login",
        None,
        json!({"email": "owner@acme.test", "password": "dashboard-password-1"}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    let (status, _) = refresh(&app, &str_of(&first, "refresh_token")).await;
    assert_eq!(status, 200);
    let (status, _) = refresh(&app, &str_of(&first, "refresh_token")).await;
    assert_eq!(status, 401);
    // Login, failed login and kick rows carry the user's account; so must the reuse.
    audit_has(&app, Some(&acc.id), |e| e.action == "refresh_token_reuse").await;
}

// ---- 2. accounts ----

#[actix_web::test]
async fn creating_an_account_without_a_token_is_a_401_missing_token() {
    let app = spawn_app().await;
    let (status, v) = post(
        &app,
        "/api/v1/accounts",
        None,
        json!({"name": "Acme", "plan": "pro"}),
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"], "missing_token");
}

#[actix_web::test]
async fn creating_an_account_with_a_garbage_token_is_a_401() {
    let app = spawn_app().await;
    let (status, v) = post(
        &app,
        "/api/v1/accounts",
        Some("garbage.not.ajwt"),
        json!({"name": "Acme", "plan": "pro"}),
    )
    .await;
    assert_eq!(status, 401, "{v}");
    assert!(v["error"].is_string(), "{v}");
    let (status, _) = app.get("/api/v1/accounts", "garbage").await;
    assert_eq!(status, 401);
}

#[actix_web::test]
async fn an_admin_creates_an_account_with_its_signing_secret_and_lists_it() {
    let app = spawn_app().await;
    let (status, v) = post(
        &app,
        "/api/v1/accounts",
        Some(&app.admin_token),
        json!({"name": "Acme", "plan": "pro"}),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let id = str_of(&v, "id");
    assert!(id.starts_with("acc_"), "{id}");
    assert!(!str_of(&v, "signing_secret").is_empty());
    assert_eq!(v["name"], "Acme");
    assert_eq!(v["plan"], "pro");

    let (status, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200, "{list}");
    let found: Vec<&Value> = list["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .filter(|a| a["id"] == id.as_str())
        .collect();
    assert_eq!(found.len(), 1, "{list}");
    assert_eq!(found[0]["name"], "Acme");
    assert!(
        found[0].get("signing_secret").is_none(),
        "the list leaks secrets: {list}"
    );
}

#[actix_web::test]
async fn an_unknown_plan_is_a_422_unknown_plan() {
    let app = spawn_app().await;
    let (status, v) = post(
        &app,
        "/api/v1/accounts",
        Some(&app.admin_token),
        json!({"name": "Acme", "plan": "platinum"}),
    )
    .await;
    assert_eq!(status, 422, "{v}");
    assert_eq!(v["error"], "unknown_plan");
}

#[actix_web::test]
async fn an_empty_name_or_a_name_with_control_characters_is_a_422() {
    let app = spawn_app().await;
    for name in ["", "   ", "bell\u{7}name", "line\nbreak", "nul\u{0}"] {
        let (status, v) = post(
            &app,
            "/api/v1/accounts",
            Some(&app.admin_token),
            json!({"name": name, "plan": "pro"}),
        )
        .await;
        assert_eq!(status, 422, "{name:?}: {v}");
        assert_eq!(v["error"], "invalid_name", "{name:?}");
    }
    let (_, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(list["accounts"].as_array().map(Vec::len), Some(0), "{list}");
}

#[actix_web::test]
async fn a_name_with_sql_metacharacters_round_trips_unchanged() {
    let app = spawn_app().await;
    let name = "Robert'); DROP TABLE accounts;--";
    let acc = app.create_account(name).await;
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}", acc.id), &app.admin_token)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], name);
    assert_eq!(v["id"], acc.id.as_str());

    let other = app.create_account("Acme").await;
    let (status, list) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200, "{list}");
    let names: Vec<(&str, &str)> = list["accounts"]
        .as_array()
        .expect("accounts")
        .iter()
        .map(|a| (a["id"].as_str().unwrap(), a["name"].as_str().unwrap()))
        .collect();
    assert!(names.contains(&(acc.id.as_str(), name)), "{list}");
    assert!(names.contains(&(other.id.as_str(), "Acme")), "{list}");
}

#[actix_web::test]
async fn a_non_admin_gets_403_on_listing_and_creating_accounts() {
    let app = spawn_app().await;
    let a = app.create_account("A").await;
    let owner = dashboard_user(&app, Some(&a.id), "owner", "owner@a.test").await;

    let (status, v) = app.get("/api/v1/accounts", &owner).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "forbidden");
    let (status, v) = post(
        &app,
        "/api/v1/accounts",
        Some(&owner),
        json!({"name": "Mine", "plan": "pro"}),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "forbidden");

    // Their own account is theirs to read.
    let (status, v) = app.get(&format!("/api/v1/accounts/{}", a.id), &owner).await;
    assert_eq!(status, 200, "{v}");
}

// ---- 3. account isolation ----

#[actix_web::test]
async fn an_owner_of_one_account_gets_404_for_every_resource_of_another() {
    let app = spawn_app().await;
    let a = app.create_account("A").await;
    let b = app.create_account("B").await;
    // B has live presence, so there is data that must not leak.
    let mut bob = app.connect(&app.user_token(&b, "bob")).await;
    bob.join_ok("room:x", json!({})).await;
    let owner = dashboard_user(&app, Some(&a.id), "owner", "owner@a.test").await;

    for path in [
        format!("/api/v1/accounts/{}", b.id),
        format!("/api/v1/accounts/{}/presence", b.id),
        format!("/api/v1/accounts/{}/rooms", b.id),
        format!("/api/v1/accounts/{}/rooms/x/presence", b.id),
        format!("/api/v1/accounts/{}/users/bob/presence", b.id),
        format!("/api/v1/accounts/{}/users/u/presence", b.id),
    ] {
        let (status, v) = app.get(&path, &owner).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["error"], "not_found", "{path}");
        assert!(!v.to_string().contains("bob"), "{path} leaks: {v}");
    }
    // The same questions about A are answered.
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}/presence", a.id), &owner)
        .await;
    assert_eq!(status, 200, "{v}");
}

#[actix_web::test]
async fn an_unknown_account_id_is_a_404_even_for_an_admin() {
    let app = spawn_app().await;
    for path in [
        "/api/v1/accounts/acc_doesnotexist",
        "/api/v1/accounts/acc_doesnotexist/presence",
        "/api/v1/accounts/acc_doesnotexist/rooms",
        "/api/v1/accounts/acc_doesnotexist/rooms/x/presence",
        "/api/v1/accounts/acc_doesnotexist/users/u/presence",
    ] {
        let (status, v) = app.get(path, &app.admin_token).await;
        assert_eq!(status, 404, "{path}: {v}");
        assert_eq!(v["error"], "not_found", "{path}");
    }
}

// ---- 4. presence over HTTP ----

const HALL_USERS: [&str; 5] = ["u1", "u2", "u3", "u4", "u5"];

/// Five end users of `acc` joined to `room:hall`.
async fn fill_hall(app: &TestApp, acc: &TestAccount) -> Vec<WsClient> {
    let mut clients = Vec::new();
    for u in HALL_USERS {
        let mut c = app.connect(&app.user_token(acc, u)).await;
        c.join_ok("room:hall", json!({})).await;
        clients.push(c);
    }
    clients
}

#[actix_web::test]
async fn a_rooms_here_now_pages_through_every_user_exactly_once() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let _clients = fill_hall(&app, &acc).await;

    let base = format!("/api/v1/accounts/{}/rooms/hall/presence?limit=2", acc.id);
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            None => base.clone(),
            Some(c) => format!("{base}&cursor={c}"),
        };
        let (status, v) = app.get(&path, &app.admin_token).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["users"], 5, "{v}");
        let page = keys_of(&v["presences"]);
        assert!(page.len() <= 2, "{v}");
        for u in &page {
            assert!(v["presences"][u]["metas"][0]["phx_ref"].is_string(), "{v}");
        }
        seen.extend(page);
        pages += 1;
        assert!(pages <= 5, "paging never ends: {seen:?}");
        match &v["next_cursor"] {
            Value::String(c) => cursor = Some(c.clone()),
            Value::Null => break,
            other => panic!("next_cursor is {other}"),
        }
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        seen.len(),
        "duplicates across pages: {seen:?}"
    );
    assert_eq!(unique, HALL_USERS.to_vec());
}

#[actix_web::test]
async fn here_now_shows_each_session_on_its_node_and_forgets_a_room_once_it_stops() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let mut ann = app.connect(&app.user_token(&acc, "ann")).await;
    // A client field named like the server's own is shown as the server says.
    ann.join_ok(
        "room:brief",
        json!({"status": "online", "meta": {"node": "spoofed", "device": "web"}}),
    )
    .await;
    let path = format!("/api/v1/accounts/{}/rooms/brief/presence", acc.id);
    let (status, v) = app.get(&path, &app.admin_token).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (
            v["room"].as_str(),
            v["users"].as_u64(),
            v["sessions"].as_u64()
        ),
        (Some("brief"), Some(1), Some(1)),
        "{v}"
    );
    let meta = &v["presences"]["ann"]["metas"][0];
    assert_eq!(meta["node"], app.state.engine.cluster.node.as_ref(), "{v}");
    assert_eq!(meta["device"], "web", "{v}");
    assert_eq!(meta["status"], "online", "{v}");
    assert!(meta["phx_ref"].is_string(), "{v}");

    // An update is read at once: the reply to the push means the room has applied it.
    let r = ann
        .push("2", "room:brief", "status", json!({"status": "away"}))
        .await;
    assert_eq!(ann.expect_reply(&r).await["status"], "ok");
    let (_, v) = app.get(&path, &app.admin_token).await;
    assert_eq!(v["presences"]["ann"]["metas"][0]["status"], "away", "{v}");

    // Empty, the room stops after `room_idle_ms`; nothing of it is left to read.
    let r = ann.push("3", "room:brief", "phx_leave", json!({})).await;
    assert_eq!(ann.expect_reply(&r).await["status"], "ok");
    metric_becomes(&app, "presenced_rooms", 0.0).await;
    assert!(app.state.rooms.get(acc.id.as_str(), "brief").is_none());
    let (status, v) = app.get(&path, &app.admin_token).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["users"], 0, "{v}");
    assert!(keys_of(&v["presences"]).is_empty(), "{v}");

    // A join of the stopped room (no longer listed for joins) starts a new one.
    ann.join_ok("room:brief", json!({"status": "back"})).await;
    let (_, v) = app.get(&path, &app.admin_token).await;
    assert_eq!(v["presences"]["ann"]["metas"][0]["status"], "back", "{v}");
}

#[actix_web::test]
async fn a_page_limit_out_of_range_or_an_invalid_room_name_is_a_400() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let room = format!("/api/v1/accounts/{}/rooms/hall/presence", acc.id);
    for q in ["?limit=0", "?limit=5000", "?limit=-1", "?limit=many"] {
        let (status, v) = app.get(&format!("{room}{q}"), &app.admin_token).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(v["error"].is_string(), "{q}: {v}");
    }
    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/rooms/bad%20name/presence", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "invalid_room_name");
}

#[actix_web::test]
async fn a_room_nobody_is_in_has_no_users() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/rooms/empty/presence", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["users"], 0);
    assert!(keys_of(&v["presences"]).is_empty(), "{v}");
    assert!(v["next_cursor"].is_null(), "{v}");
}

#[actix_web::test]
async fn the_accounts_here_now_lists_users_with_their_connections_and_rooms() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let _clients = fill_hall(&app, &acc).await;
    let path = format!("/api/v1/accounts/{}/presence", acc.id);
    let v = get_until(
        &app,
        &path,
        &app.admin_token,
        "five users in hall",
        |s, v| {
            s == 200
                && HALL_USERS.iter().all(|u| {
                    v["presences"][u]["metas"]
                        .as_array()
                        .is_some_and(|m| m.iter().any(|c| c["rooms"] == json!(["hall"])))
                })
        },
    )
    .await;
    assert_eq!(keys_of(&v["presences"]), HALL_USERS.to_vec(), "{v}");
    assert_eq!(v["users"], 5, "{v}");
    for u in HALL_USERS {
        let metas = v["presences"][u]["metas"].as_array().expect("metas");
        assert_eq!(metas.len(), 1, "{u}: {v}");
        assert!(
            metas[0]["session_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{v}"
        );
        assert!(
            metas[0]["rooms"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("hall"))),
            "{v}"
        );
    }
}

#[actix_web::test]
async fn where_now_shows_an_online_users_rooms_and_sessions_and_an_unknown_user_offline() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let _clients = fill_hall(&app, &acc).await;
    let path = format!("/api/v1/accounts/{}/users/u3/presence", acc.id);
    let v = get_until(&app, &path, &app.admin_token, "u3 in hall", |s, v| {
        s == 200 && v["rooms"] == json!(["hall"])
    })
    .await;
    assert_eq!(v["online"], true, "{v}");
    assert_eq!(v["sessions"].as_array().map(Vec::len), Some(1), "{v}");
    assert!(v["sessions"][0]["session_id"].is_string(), "{v}");

    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/users/nobody/presence", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["online"], false, "{v}");
    assert_eq!(v["sessions"], json!([]), "{v}");
    assert_eq!(v["rooms"], json!([]), "{v}");
}

#[actix_web::test]
async fn the_room_list_shows_the_accounts_rooms_in_name_order_with_their_users() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let _clients = fill_hall(&app, &acc).await;
    let mut ann = app.connect(&app.user_token(&acc, "u1")).await;
    ann.join_ok("room:atrium", json!({})).await;
    // Another account's room of the same name is not listed.
    let other = app.create_account("Other").await;
    let mut eve = app.connect(&app.user_token(&other, "eve")).await;
    eve.join_ok("room:atrium", json!({})).await;
    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/rooms", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let rooms = v["rooms"].as_array().expect("rooms");
    assert_eq!(rooms.len(), 2, "{v}");
    assert_eq!(
        (&rooms[0]["room"], &rooms[0]["users"], &rooms[0]["sessions"]),
        (&json!("atrium"), &json!(1), &json!(1)),
        "{v}"
    );
    assert_eq!(
        (&rooms[1]["room"], &rooms[1]["users"], &rooms[1]["sessions"]),
        (&json!("hall"), &json!(5), &json!(5)),
        "{v}"
    );
}

// ---- 5. kick ----

/// The session id of `user`'s only connection, from where-now.
async fn session_of(app: &TestApp, acc: &TestAccount, user: &str) -> String {
    let path = format!("/api/v1/accounts/{}/users/{user}/presence", acc.id);
    let v = get_until(app, &path, &app.admin_token, "one session", |s, v| {
        s == 200 && v["sessions"].as_array().map(Vec::len) == Some(1)
    })
    .await;
    str_of(&v["sessions"][0], "session_id")
}

#[actix_web::test]
async fn an_admin_kicks_a_session_which_is_closed_and_leaves_the_room_at_once() {
    // A grace longer than a test waits: the leave can only come from the kick's leave-now.
    let app = spawn_app_with(|s| s.presence.grace_ms = 600_000).await;
    let acc = app.create_account("Acme").await;
    let mut ann = app.connect(&app.user_token(&acc, "ann")).await;
    ann.join_ok("room:hall", json!({})).await;
    let mut bob = app.connect(&app.user_token(&acc, "bob")).await;
    bob.join_ok("room:hall", json!({})).await;
    let d = ann.expect("bob's join", is_diff("room:hall")).await;
    assert_eq!(joins_of(&d), vec!["bob"]);

    let session = session_of(&app, &acc, "bob").await;
    let (status, v) = app
        .send(
            "DELETE",
            &format!("/api/v1/accounts/{}/sessions/{session}", acc.id),
            Some(&app.admin_token),
            "",
        )
        .await;
    assert_eq!(status, 202, "{v}");

    let close = bob
        .expect("phx_close of room:hall", |v| {
            v[2] == "room:hall" && v[3] == "phx_close"
        })
        .await;
    assert_eq!(close[4]["reason"], "kicked", "{close}");
    let reason = bob.expect_close().await.expect("a close reason");
    assert_eq!(reason.code, CloseCode::Policy);
    assert_eq!(reason.description.as_deref(), Some("kicked"));

    let d = ann
        .expect("bob's leave", |v| {
            is_diff("room:hall")(v) && leaves_of(v).contains(&"bob".to_string())
        })
        .await;
    assert!(joins_of(&d).is_empty(), "{d}");

    // Gone from the account too.
    let path = format!("/api/v1/accounts/{}/users/bob/presence", acc.id);
    get_until(&app, &path, &app.admin_token, "bob offline", |s, v| {
        s == 200 && v["online"] == false
    })
    .await;
    // The kick is audited (the row is written after the reply).
    audit_has(&app, Some(&acc.id), |e| {
        e.action == "session_kicked" && e.target.as_deref() == Some(&*session)
    })
    .await;
}

#[actix_web::test]
async fn kicking_an_unknown_or_malformed_session_is_a_404() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let _ann = app.connect(&app.user_token(&acc, "ann")).await;
    for session in ["sffffffffff", "s", "not-a-session", "sZZ", "123"] {
        let (status, v) = app
            .send(
                "DELETE",
                &format!("/api/v1/accounts/{}/sessions/{session}", acc.id),
                Some(&app.admin_token),
                "",
            )
            .await;
        assert_eq!(status, 404, "{session}: {v}");
        assert_eq!(v["error"], "not_found", "{session}");
    }
}

#[actix_web::test]
async fn a_member_may_not_kick_and_another_accounts_owner_gets_404() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let other = app.create_account("Other").await;
    let mut ann = app.connect(&app.user_token(&acc, "ann")).await;
    ann.join_ok("room:hall", json!({})).await;
    let session = session_of(&app, &acc, "ann").await;
    let kick = format!("/api/v1/accounts/{}/sessions/{session}", acc.id);

    let member = dashboard_user(&app, Some(&acc.id), "member", "member@acme.test").await;
    let (status, v) = app.send("DELETE", &kick, Some(&member), "").await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "forbidden");

    let stranger = dashboard_user(&app, Some(&other.id), "owner", "owner@other.test").await;
    let (status, v) = app.send("DELETE", &kick, Some(&stranger), "").await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"], "not_found");
    // Nor through their own account's path.
    let (status, v) = app
        .send(
            "DELETE",
            &format!("/api/v1/accounts/{}/sessions/{session}", other.id),
            Some(&stranger),
            "",
        )
        .await;
    assert_eq!(status, 404, "{v}");

    // Ann is still connected and served.
    let r = ann.push("1", "phoenix", "heartbeat", json!({})).await;
    assert_eq!(ann.expect_reply(&r).await["status"], "ok");
    assert!(ann.closed.is_none());
}

// ---- 6. ops ----

#[actix_web::test]
async fn healthz_is_ok_and_readyz_reports_the_database_up() {
    let app = spawn_app().await;
    let (status, v) = app.get("/healthz", "").await;
    assert_eq!(status, 200);
    assert_eq!(v, json!({"status": "ok"}));
    let (status, v) = app.get("/readyz", "").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["database"]["status"], "up", "{v}");
    assert_eq!(v["status"], "ready", "{v}");
}

#[actix_web::test]
async fn metrics_are_prometheus_text_and_count_open_sockets() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let mut ann = app.connect(&app.user_token(&acc, "ann")).await;
    ann.join_ok("room:hall", json!({})).await;
    let bob = app.connect(&app.user_token(&acc, "bob")).await;
    let mut eve = app.connect(&app.user_token(&acc, "eve")).await;
    // A socket error: a push on a topic never joined.
    let r = eve
        .push("9", "room:nowhere", "status", json!({"status": "away"}))
        .await;
    let reply = eve.expect_reply(&r).await;
    assert_eq!(reply["status"], "error");
    assert_eq!(reply["response"]["reason"], "not_joined");

    let mut res = client()
        .get(format!("{}/metrics", app.http))
        .send()
        .await
        .expect("metrics");
    assert_eq!(res.status().as_u16(), 200);
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let text = String::from_utf8(res.body().await.expect("body").to_vec()).expect("utf-8");
    for name in [
        "presenced_connections",
        "presenced_joins_total",
        "presenced_rooms",
        "presenced_sessions",
        "presenced_ws_errors_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} missing:\n{text}"
        );
    }
    assert!(app.metric("presenced_joins_total", "").await >= 1.0);
    assert!(app.metric("presenced_ws_errors_total", "not_joined").await >= 1.0);

    metric_becomes(&app, "presenced_connections", 3.0).await;
    bob.close().await;
    metric_becomes(&app, "presenced_connections", 2.0).await;
    drop(eve);
    metric_becomes(&app, "presenced_connections", 1.0).await;
}

#[actix_web::test]
async fn an_unknown_route_is_a_404_json_not_found() {
    let app = spawn_app().await;
    for path in ["/nope", "/api/v1/nope", "/api/v1/accounts/x/nope"] {
        let (status, v) = app.get(path, &app.admin_token).await;
        assert_eq!(status, 404, "{path}");
        assert_eq!(v["error"], "not_found", "{path}: {v}");
        assert!(v["message"].is_string(), "{path}: {v}");
    }
}

// ---- 7. socket upgrade auth ----

#[actix_web::test]
async fn a_user_token_signed_with_the_wrong_secret_is_refused_with_401() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let token =
        presenced::auth::mint_user_token("not-the-secret", &acc.id, "ann", 3600, None, None);
    assert_eq!(refused_upgrade(&app, &token).await, 401);
    assert_eq!(app.metric("presenced_connections", "").await, 0.0);
}

#[actix_web::test]
async fn an_expired_user_token_is_refused_with_401() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let claims = json!({"sub": "ann", "acc": acc.id, "exp": unix_s() - 3600});
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(acc.secret.as_bytes()),
    )
    .expect("jwt");
    assert_eq!(refused_upgrade(&app, &token).await, 401);
    // The same claims, not expired, are fine: it is the expiry that is refused.
    let claims = json!({"sub": "ann", "acc": acc.id, "exp": unix_s() + 3600});
    let token = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(acc.secret.as_bytes()),
    )
    .expect("jwt");
    let mut ok = app.connect(&token).await;
    ok.join_ok("room:x", json!({})).await;
}

#[actix_web::test]
async fn an_admin_access_token_connects_but_may_not_join_a_room() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let mut staff = app.connect(&app.admin_token).await;
    let reply = staff.join("room:x", json!({})).await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");
    // It may follow an account.
    staff
        .join_ok(&format!("account:{}", acc.id), json!({}))
        .await;
}

#[actix_web::test]
async fn a_user_token_of_an_unknown_account_is_refused_with_401() {
    let app = spawn_app().await;
    let token = presenced::auth::mint_user_token(
        "whatever-secret",
        "acc_doesnotexist",
        "ann",
        3600,
        None,
        None,
    );
    assert_eq!(refused_upgrade(&app, &token).await, 401);
}

// ---- 8. config ----

#[test]
fn a_config_file_with_an_unknown_key_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[server]\nbogus = 1\n");
    let e = Settings::load(Some(&path)).expect_err("unknown key accepted");
    assert!(e.to_string().contains("bogus"), "{e}");
    assert!(!e.to_string().contains('\n'), "{e}");
}

#[test]
fn a_config_value_of_the_wrong_type_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[presence]\ngrace_ms = \"soon\"\n");
    let e = Settings::load(Some(&path)).expect_err("grace_ms = \"soon\" accepted");
    assert!(e.to_string().contains("presence.grace_ms"), "{e}");
}

#[test]
fn a_config_with_a_bad_bind_address_is_refused_naming_server_bind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[server]\nbind = \"nowhere\"\n");
    let e = Settings::load(Some(&path)).expect_err("bind = nowhere accepted");
    assert!(e.to_string().contains("server.bind"), "{e}");
    assert_eq!(e.setting, "server.bind");
}

#[test]
fn a_valid_config_file_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(
        &dir,
        "[server]\nbind = \"127.0.0.1:0\"\n[presence]\ngrace_ms = 1234\n",
    );
    let s = Settings::load(Some(&path)).expect("valid config");
    assert_eq!(s.presence.grace_ms, 1234);
    assert_eq!(s.server.bind, "127.0.0.1:0");
}

#[test]
fn the_scheduling_policy_is_batch_or_normal_and_anything_else_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(Settings::default().server.scheduling, Scheduling::Batch);
    let path = write_config(&dir, "[server]\nscheduling = \"normal\"\n");
    let s = Settings::load(Some(&path)).expect("valid config");
    assert_eq!(s.server.scheduling, Scheduling::Normal);
    let path = write_config(&dir, "[server]\nscheduling = \"fifo\"\n");
    let e = Settings::load(Some(&path)).expect_err("scheduling = fifo accepted");
    assert!(e.to_string().contains("scheduling"), "{e}");
}

/// The scheduling policy of every thread of a process, by thread name (`/proc`, Linux):
/// `policy` is the 41st field of `stat`, counted after the name in parentheses.
#[cfg(target_os = "linux")]
fn thread_policies(pid: u32) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("/proc/PID/task") {
        let dir = task.expect("a task").path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue; // a thread that ended meanwhile
        };
        let after_name = &stat[stat.rfind(')').expect("stat has the name") + 2..];
        // Field 3 (state) is the first after the name; policy is field 41.
        let policy = after_name
            .split_whitespace()
            .nth(41 - 3)
            .and_then(|p| p.parse().ok())
            .expect("stat has the policy");
        out.push((comm.trim().to_string(), policy));
    }
    out
}

#[cfg(target_os = "linux")]
#[actix_web::test]
async fn under_batch_every_thread_but_the_http_workers_runs_as_a_batch_thread() {
    const SCHED_OTHER: u32 = 0;
    const SCHED_BATCH: u32 = 3;
    let start = |setting: &str, dir: &tempfile::TempDir| {
        ChildNode::start(
            free_port(),
            &[
                (
                    "DATABASE_URL",
                    format!("sqlite://{}", dir.path().join("p.db").display()),
                ),
                ("PRESENCED__SERVER__SCHEDULING", setting.into()),
                ("PRESENCED__SERVER__WORKERS", "2".into()),
                ("PRESENCED__SERVER__SOCKET_THREADS", "3".into()),
                ("PRESENCED__PRESENCE__ARBITERS", "2".into()),
            ],
        )
    };
    let under = |threads: &[(String, u32)], prefix: &str, policy: u32| {
        threads
            .iter()
            .filter(|(name, p)| name.starts_with(prefix) && *p == policy)
            .count()
    };

    let dir = tempfile::tempdir().expect("tempdir");
    let node = start("batch", &dir);
    node.ready().await;
    let threads = thread_policies(node.pid());
    // The two HTTP workers keep the default policy; the three socket threads, the registry's
    // and the two engine arbiters run under SCHED_BATCH (all of these runtime threads are
    // named "actix-rt|system…").
    assert_eq!(under(&threads, "actix-rt", SCHED_OTHER), 2, "{threads:?}");
    assert!(
        under(&threads, "actix-rt", SCHED_BATCH) >= 3 + 3,
        "{threads:?}"
    );
    // The first thread and the snapshot writer bear the binary's name.
    assert!(
        under(&threads, "presenced", SCHED_BATCH) >= 2,
        "{threads:?}"
    );
    assert_eq!(under(&threads, "presenced", SCHED_OTHER), 0, "{threads:?}");
    drop(node);

    let dir = tempfile::tempdir().expect("tempdir");
    let node = start("normal", &dir);
    node.ready().await;
    let threads = thread_policies(node.pid());
    assert!(threads.len() >= 8, "{threads:?}");
    let batch: Vec<_> = threads.iter().filter(|(_, p)| *p != SCHED_OTHER).collect();
    assert!(
        batch.is_empty(),
        "normal: threads under another policy: {batch:?}"
    );
}

#[test]
fn where_rooms_run_is_arbiters_or_sockets_and_anything_else_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(&dir, "[presence]\nroom_threads = \"sockets\"\n");
    let s = Settings::load(Some(&path)).expect("valid config");
    assert_eq!(s.presence.room_threads, RoomThreads::Sockets);
    assert_eq!(
        Settings::default().presence.room_threads,
        RoomThreads::Arbiters
    );
    let path = write_config(&dir, "[presence]\nroom_threads = \"elsewhere\"\n");
    let e = Settings::load(Some(&path)).expect_err("room_threads = elsewhere accepted");
    assert!(e.to_string().contains("room_threads"), "{e}");
}
