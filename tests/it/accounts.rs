//! Account administration against a real node, on SQLite and on PostgreSQL: dashboard users and
//! their roles, account settings and plan, signing-secret rotation, the audit log, and access
//! tokens that die with their user.

use std::time::{Duration, Instant};

use actix_web::rt::time::sleep;
use awc::error::WsClientError;
use serde_json::{json, Value};

use presenced::store::testdb::TempDatabase;

use crate::helpers::*;

const PASSWORD: &str = "a-good-password";

/// A node on a fresh database of `backend` (kept alive beside it), or `None` when PostgreSQL is
/// absent outside CI.
async fn spawn_on(
    backend: Backend,
    tweak: impl FnOnce(&mut presenced::config::Settings),
) -> Option<(TempDatabase, TestApp)> {
    let db = temp_db(backend)?;
    let app = spawn_app_with(|s| {
        s.database.url = db.url().to_string();
        tweak(s);
    })
    .await;
    Some((db, app))
}

async fn call(
    app: &TestApp,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, Value) {
    app.send(method, path, token, &body.to_string()).await
}

/// Creates a user through the API as `token`; returns its JSON.
async fn create_user(
    app: &TestApp,
    token: &str,
    email: &str,
    role: &str,
    account: Option<&str>,
) -> Value {
    let mut body = json!({ "email": email, "password": PASSWORD, "role": role });
    if let Some(a) = account {
        body["account_id"] = Value::from(a);
    }
    let (status, v) = call(app, "POST", "/api/v1/users", Some(token), body).await;
    assert_eq!(status, 201, "creating {email}: {v}");
    v
}

/// The full login answer (access and refresh token) of `email`.
async fn login_pair(app: &TestApp, email: &str, password: &str) -> Value {
    let (status, v) = call(
        app,
        "POST",
        "/api/v1/auth/login",
        None,
        json!({ "email": email, "password": password }),
    )
    .await;
    assert_eq!(status, 200, "login of {email}: {v}");
    v
}

fn s(v: &Value, key: &str) -> String {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {v}"))
        .to_string()
}

/// An account with an owner: (account, owner's user json, owner's access token).
async fn account_with_owner(
    app: &TestApp,
    name: &str,
    email: &str,
) -> (TestAccount, Value, String) {
    let acc = app.create_account(name).await;
    let owner = create_user(app, &app.admin_token, email, "owner", Some(&acc.id)).await;
    let token = s(&login_pair(app, email, PASSWORD).await, "access_token");
    (acc, owner, token)
}

/// Every audit entry `token` may see with `query` (all pages).
async fn audit(app: &TestApp, token: &str, query: &str) -> Vec<Value> {
    let (status, v) = app
        .get(&format!("/api/v1/audit?limit=1000&{query}"), token)
        .await;
    assert_eq!(status, 200, "audit {query}: {v}");
    assert!(v["next_cursor"].is_null(), "{v}");
    v["entries"].as_array().expect("entries").clone()
}

/// Waits until the audit log (as `token` sees it with `query`) has an entry matching `pred`;
/// some entries are written in the background.
async fn audit_entry(
    app: &TestApp,
    token: &str,
    query: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let entries = audit(app, token, query).await;
        if let Some(e) = entries.iter().find(|e| pred(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no such audit entry for '{query}' in {entries:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// `None` if the socket upgrade with `token` succeeds, else the HTTP status that refused it.
async fn upgrade_status(app: &TestApp, token: &str) -> Option<u16> {
    match WsClient::connect(&format!("{}&token={token}", app.ws)).await {
        Ok(c) => {
            c.close().await;
            None
        }
        Err(WsClientError::InvalidResponseStatus(s)) => Some(s.as_u16()),
        Err(e) => panic!("the upgrade failed without a status: {e}"),
    }
}

// ---- users ----

async fn owners_manage_the_users_of_their_own_account(backend: Backend) {
    let Some((_db, app)) = spawn_on(backend, |_| {}).await else {
        return;
    };
    let (a, owner, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let (b, _, b_owner_token) = account_with_owner(&app, "B", "owner@b.io").await;

    // The owner creates a member (account_id omitted: their own) and a viewer.
    let member = create_user(&app, &owner_token, "Member@A.io", "member", None).await;
    let mut keys: Vec<&String> = member.as_object().unwrap().keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "account_id",
            "created_at",
            "disabled",
            "email",
            "id",
            "role"
        ],
        "no hash, nothing else: {member}"
    );
    assert_eq!(member["account_id"], a.id.as_str());
    assert_eq!(member["email"], "member@a.io");
    assert_eq!(member["disabled"], false);
    let viewer = create_user(&app, &owner_token, "viewer@a.io", "viewer", Some(&a.id)).await;

    // The owner lists them, ordered by email.
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}/users", a.id), &owner_token)
        .await;
    assert_eq!(status, 200, "{v}");
    let emails: Vec<&str> = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].as_str().unwrap())
        .collect();
    assert_eq!(emails, ["member@a.io", "owner@a.io", "viewer@a.io"]);
    assert!(v.to_string().find("argon2").is_none(), "{v}");

    // Members and viewers may not manage users: 403 inside their own account.
    let member_pair = login_pair(&app, "member@a.io", PASSWORD).await;
    let member_token = s(&member_pair, "access_token");
    let viewer_pair = login_pair(&app, "viewer@a.io", PASSWORD).await;
    let viewer_token = s(&viewer_pair, "access_token");
    for t in [&member_token, &viewer_token] {
        let body = json!({"email": "x@a.io", "password": PASSWORD, "role": "viewer"});
        let (status, v) = call(&app, "POST", "/api/v1/users", Some(t), body).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (403, Some("forbidden")),
            "{v}"
        );
        let (status, v) = app
            .get(&format!("/api/v1/accounts/{}/users", a.id), t)
            .await;
        assert_eq!(status, 403, "{v}");
        let path = format!("/api/v1/users/{}", s(&owner, "id"));
        let (status, v) = call(&app, "DELETE", &path, Some(t), json!({})).await;
        assert_eq!(status, 403, "{v}");
        let (status, v) = call(&app, "PUT", &path, Some(t), json!({"disabled": true})).await;
        assert_eq!(status, 403, "{v}");
    }

    // Another account's owner sees none of it: 404, never 403.
    let member_path = format!("/api/v1/users/{}", s(&member, "id"));
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}/users", a.id), &b_owner_token)
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let (status, v) = call(
        &app,
        "DELETE",
        &member_path,
        Some(&b_owner_token),
        json!({}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = call(
        &app,
        "PUT",
        &member_path,
        Some(&b_owner_token),
        json!({"role": "viewer"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let body = json!({"email": "intruder@b.io", "password": PASSWORD, "role": "member", "account_id": a.id});
    let (status, v) = call(&app, "POST", "/api/v1/users", Some(&b_owner_token), body).await;
    assert_eq!(status, 404, "{v}");
    // Nor may an owner reach an admin.
    let (status, accounts) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200);
    assert_eq!(accounts["accounts"].as_array().unwrap().len(), 2);
    let admin_id = app
        .state
        .store
        .find_user_by_email(ADMIN_EMAIL)
        .unwrap()
        .expect("admin")
        .id;
    let admin_path = format!("/api/v1/users/{admin_id}");
    let (status, v) = call(&app, "DELETE", &admin_path, Some(&owner_token), json!({})).await;
    assert_eq!(status, 404, "{v}");

    // An owner cannot create or grant admin, nor change their own role, nor delete themselves.
    let body = json!({"email": "boss@a.io", "password": PASSWORD, "role": "admin"});
    let (status, v) = call(&app, "POST", "/api/v1/users", Some(&owner_token), body).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = call(
        &app,
        "PUT",
        &member_path,
        Some(&owner_token),
        json!({"role": "admin"}),
    )
    .await;
    assert_eq!(status, 403, "{v}");
    let owner_path = format!("/api/v1/users/{}", s(&owner, "id"));
    let (status, v) = call(
        &app,
        "PUT",
        &owner_path,
        Some(&owner_token),
        json!({"role": "member"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("cannot_change_own_role")),
        "{v}"
    );
    let (status, v) = call(&app, "DELETE", &owner_path, Some(&owner_token), json!({})).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("cannot_delete_self")),
        "{v}"
    );
    let (status, v) = call(
        &app,
        "DELETE",
        &format!("/api/v1/users/{admin_id}"),
        Some(&app.admin_token),
        json!({}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("cannot_delete_self")),
        "{v}"
    );

    // The owner changes the member's role: audited with from/to, and the member's access token
    // (which says "member") is refused at once.
    let (status, v) = call(
        &app,
        "PUT",
        &member_path,
        Some(&owner_token),
        json!({"role": "viewer"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["role"], "viewer");
    let entries = audit(&app, &owner_token, "action=role_changed").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(
        entries[0]["detail"],
        json!({"from": "member", "to": "viewer"})
    );
    assert_eq!(entries[0]["target"], member["id"]);
    assert_eq!(entries[0]["actor"], owner["id"]);
    assert_eq!(entries[0]["account_id"], a.id.as_str());
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &member_token)
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("token_revoked")),
        "{v}"
    );
    // A fresh login carries the new role and works.
    let relogged = s(
        &login_pair(&app, "member@a.io", PASSWORD).await,
        "access_token",
    );
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &relogged)
        .await;
    assert_eq!(status, 200, "{v}");

    // The owner deletes the viewer: 204, its access token is refused at once, its refresh token
    // no longer works, and a second delete finds nothing.
    let viewer_path = format!("/api/v1/users/{}", s(&viewer, "id"));
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &viewer_token)
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = call(&app, "DELETE", &viewer_path, Some(&owner_token), json!({})).await;
    assert_eq!(status, 204);
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &viewer_token)
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("token_revoked")),
        "{v}"
    );
    let body = json!({"refresh_token": s(&viewer_pair, "refresh_token")});
    let (status, v) = call(&app, "POST", "/api/v1/auth/refresh", None, body).await;
    assert_eq!(status, 401, "{v}");
    let (status, v) = call(&app, "DELETE", &viewer_path, Some(&owner_token), json!({})).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let entries = audit(&app, &owner_token, "action=user_deleted").await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_eq!(entries[0]["target"], viewer["id"]);
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{}/users", a.id), &owner_token)
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["users"].as_array().unwrap().len(), 2, "{v}");
    // Creations were audited in the account, and B's log has none of A's.
    assert_eq!(
        audit(&app, &owner_token, "action=user_created").await.len(),
        3
    );
    let b_entries = audit(&app, &b_owner_token, "").await;
    assert!(
        b_entries.iter().all(|e| e["account_id"] == b.id.as_str()),
        "{b_entries:?}"
    );
}

#[actix_web::test]
async fn owners_manage_the_users_of_their_own_account_on_sqlite() {
    owners_manage_the_users_of_their_own_account(Backend::Sqlite).await;
}

#[actix_web::test]
async fn owners_manage_the_users_of_their_own_account_on_postgres() {
    owners_manage_the_users_of_their_own_account(Backend::Postgres).await;
}

async fn user_input_is_validated(backend: Backend) {
    let Some((_db, app)) = spawn_on(backend, |_| {}).await else {
        return;
    };
    let (a, _, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let post = |token: String, body: Value| {
        let app = &app;
        async move { call(app, "POST", "/api/v1/users", Some(&token), body).await }
    };
    let long_email = format!("{}@x.io", "a".repeat(320));
    for bad in [
        "",
        "ab",
        "no-at-sign",
        "two words@x.io",
        "tab\t@x.io",
        "nl\n@x.io",
        long_email.as_str(),
    ] {
        let (status, v) = post(
            owner_token.clone(),
            json!({"email": bad, "password": PASSWORD, "role": "member"}),
        )
        .await;
        assert_eq!(
            (status, v["error"].as_str()),
            (422, Some("invalid_email")),
            "{bad:?}: {v}"
        );
    }
    let long_password = "p".repeat(1025);
    for bad in ["", "short", "seven77", long_password.as_str()] {
        let (status, v) = post(
            owner_token.clone(),
            json!({"email": "ok@a.io", "password": bad, "role": "member"}),
        )
        .await;
        assert_eq!(
            (status, v["error"].as_str()),
            (422, Some("invalid_password")),
            "{v}"
        );
    }
    for bad in ["", "root", "Owner", "superuser"] {
        let (status, v) = post(
            owner_token.clone(),
            json!({"email": "ok@a.io", "password": PASSWORD, "role": bad}),
        )
        .await;
        assert_eq!(
            (status, v["error"].as_str()),
            (422, Some("invalid_role")),
            "{v}"
        );
    }
    let (status, v) = post(
        owner_token.clone(),
        json!({"email": "ok@a.io", "password": PASSWORD, "role": "member", "is_admin": true}),
    )
    .await;
    assert_eq!(status, 422, "unknown fields are refused: {v}");
    // The bounds themselves are fine.
    create_user(&app, &owner_token, "a@b", "member", None).await;
    let edge = format!("{}@x.io", "e".repeat(315));
    assert_eq!(edge.chars().count(), 320);
    let (status, v) = post(
        owner_token.clone(),
        json!({"email": edge, "password": "p".repeat(1024), "role": "viewer"}),
    )
    .await;
    assert_eq!(status, 201, "{v}");

    // Duplicate emails, in any case: 409.
    let (status, v) = post(
        owner_token.clone(),
        json!({"email": "A@B", "password": PASSWORD, "role": "viewer"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("email_taken")),
        "{v}"
    );
    let (status, v) = post(
        app.admin_token.clone(),
        json!({"email": ADMIN_EMAIL, "password": PASSWORD, "role": "admin"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("email_taken")),
        "{v}"
    );

    // Admins: account roles need an existing account, admins have none.
    let admin = app.admin_token.clone();
    let (status, v) = post(
        admin.clone(),
        json!({"email": "m@x.io", "password": PASSWORD, "role": "member"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("unknown_account")),
        "{v}"
    );
    let (status, v) = post(
        admin.clone(),
        json!({"email": "m@x.io", "password": PASSWORD, "role": "member", "account_id": "acc_nope"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("unknown_account")),
        "{v}"
    );
    let (status, v) = post(
        admin.clone(),
        json!({"email": "m@x.io", "password": PASSWORD, "role": "admin", "account_id": a.id}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("invalid_role")),
        "{v}"
    );
    let second_admin = create_user(&app, &admin, "second@admin.io", "admin", None).await;
    assert!(second_admin["account_id"].is_null());
    let token = s(
        &login_pair(&app, "second@admin.io", PASSWORD).await,
        "access_token",
    );
    let (status, _) = app.get("/api/v1/accounts", &token).await;
    assert_eq!(status, 200);
    // An admin's role does not cross into an account, nor an account user's into admin.
    let path = format!("/api/v1/users/{}", s(&second_admin, "id"));
    let (status, v) = call(&app, "PUT", &path, Some(&admin), json!({"role": "owner"})).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("invalid_role")),
        "{v}"
    );
    // The PUT body is checked too.
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&admin),
        json!({"password": "short"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (422, Some("invalid_password")),
        "{v}"
    );
    let (status, v) = call(&app, "PUT", &path, Some(&admin), json!({"email": "x@y"})).await;
    assert_eq!(status, 422, "{v}");
    let (status, v) = call(
        &app,
        "PUT",
        "/api/v1/users/usr_nope",
        Some(&admin),
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
}

#[actix_web::test]
async fn user_input_is_validated_on_sqlite() {
    user_input_is_validated(Backend::Sqlite).await;
}

#[actix_web::test]
async fn user_input_is_validated_on_postgres() {
    user_input_is_validated(Backend::Postgres).await;
}

async fn a_new_password_or_disabling_ends_the_users_sessions(backend: Backend) {
    let Some((_db, app)) = spawn_on(backend, |_| {}).await else {
        return;
    };
    let (a, _, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let member = create_user(&app, &owner_token, "m@a.io", "member", None).await;
    let path = format!("/api/v1/users/{}", s(&member, "id"));
    let first = login_pair(&app, "m@a.io", PASSWORD).await;
    let second = login_pair(&app, "m@a.io", PASSWORD).await;

    // A new password revokes every refresh-token family; the old password no longer logs in.
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&owner_token),
        json!({"password": "another-password"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v.get("password_hash").is_none(), "{v}");
    for pair in [&first, &second] {
        let body = json!({"refresh_token": s(pair, "refresh_token")});
        let (status, v) = call(&app, "POST", "/api/v1/auth/refresh", None, body).await;
        assert_eq!(status, 401, "{v}");
    }
    assert_eq!(login(&app.http, "m@a.io", PASSWORD).await, Err(401));
    let third = login_pair(&app, "m@a.io", "another-password").await;
    let token = s(&third, "access_token");
    let (status, _) = app.get(&format!("/api/v1/accounts/{}", a.id), &token).await;
    assert_eq!(status, 200);

    // Disabling refuses its access token at once, its refresh token, and its logins.
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&owner_token),
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["disabled"], true);
    let (status, v) = app.get(&format!("/api/v1/accounts/{}", a.id), &token).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("token_revoked")),
        "{v}"
    );
    let body = json!({"refresh_token": s(&third, "refresh_token")});
    let (status, _) = call(&app, "POST", "/api/v1/auth/refresh", None, body).await;
    assert_eq!(status, 401);
    assert_eq!(
        login(&app.http, "m@a.io", "another-password").await,
        Err(401)
    );
    // Enabled again, the user logs in anew (the old refresh tokens stay dead).
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&owner_token),
        json!({"disabled": false}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let token = login(&app.http, "m@a.io", "another-password")
        .await
        .expect("logs in");
    let (status, _) = app.get(&format!("/api/v1/accounts/{}", a.id), &token).await;
    assert_eq!(status, 200);
    let actions: Vec<String> = audit(&app, &owner_token, "")
        .await
        .iter()
        .map(|e| s(e, "action"))
        .filter(|a| a.starts_with("user_") || a.starts_with("password"))
        .collect();
    // Newest first; the owner's and the member's creations are in the account too.
    assert_eq!(
        actions,
        [
            "user_enabled",
            "user_disabled",
            "password_changed",
            "user_created",
            "user_created"
        ]
    );
    // Nobody disables themselves.
    let owner_id = app
        .state
        .store
        .find_user_by_email("owner@a.io")
        .unwrap()
        .unwrap()
        .id;
    let (status, v) = call(
        &app,
        "PUT",
        &format!("/api/v1/users/{owner_id}"),
        Some(&owner_token),
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (409, Some("cannot_disable_self")),
        "{v}"
    );
}

#[actix_web::test]
async fn a_new_password_or_disabling_ends_the_users_sessions_on_sqlite() {
    a_new_password_or_disabling_ends_the_users_sessions(Backend::Sqlite).await;
}

#[actix_web::test]
async fn a_new_password_or_disabling_ends_the_users_sessions_on_postgres() {
    a_new_password_or_disabling_ends_the_users_sessions(Backend::Postgres).await;
}

// ---- accounts ----

async fn account_updates_are_validated_audited_and_pushed(backend: Backend) {
    let Some((_db, app)) = spawn_on(backend, |_| {}).await else {
        return;
    };
    let (a, owner, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let (_b, _, b_owner_token) = account_with_owner(&app, "B", "owner@b.io").await;
    create_user(&app, &owner_token, "m@a.io", "member", None).await;
    let member_token = login(&app.http, "m@a.io", PASSWORD)
        .await
        .expect("member logs in");
    let path = format!("/api/v1/account/{}", a.id);
    let (_, before) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &owner_token)
        .await;

    // A dashboard follows the account over the socket.
    let mut dash = app.connect(&owner_token).await;
    dash.join_ok(&format!("account:{}", a.id), json!({})).await;

    let body = json!({"name": "  Renamed  ", "plan": "enterprise", "settings": {"theme": "dark"}});
    let (status, v) = call(&app, "PUT", &path, Some(&owner_token), body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["name"], "Renamed");
    assert_eq!(v["plan"], "enterprise");
    assert_eq!(v["settings"], json!({"theme": "dark"}));
    assert!(v.get("signing_secret").is_none(), "{v}");
    assert!(
        v["updated_at"].as_i64().unwrap() > before["updated_at"].as_i64().unwrap(),
        "{before} then {v}"
    );
    let topic = format!("account:{}", a.id);
    let pushed = dash
        .expect("account_update", |f| {
            f[2] == topic.as_str() && f[3] == "account_update"
        })
        .await;
    assert_eq!(pushed[4]["name"], "Renamed", "{pushed}");
    assert_eq!(pushed[4]["plan"], "enterprise", "{pushed}");
    assert!(
        !pushed.to_string().contains(&a.secret),
        "no secret pushed: {pushed}"
    );
    let (_, v) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &member_token)
        .await;
    assert_eq!(
        (v["name"].as_str(), v["plan"].as_str()),
        (Some("Renamed"), Some("enterprise"))
    );

    let changed = audit(&app, &owner_token, "action=plan_changed").await;
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(
        changed[0]["detail"],
        json!({"from": "pro", "to": "enterprise"})
    );
    assert_eq!(changed[0]["actor"], owner["id"]);
    // A change that keeps the plan is audited, without plan_changed.
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&owner_token),
        json!({"plan": "enterprise", "name": "Again"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        audit(&app, &owner_token, "action=plan_changed").await.len(),
        1
    );
    assert_eq!(
        audit(&app, &owner_token, "action=account_updated")
            .await
            .len(),
        2
    );
    // An admin changes it too.
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&app.admin_token),
        json!({"plan": "free"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let changed = audit(&app, &owner_token, "action=plan_changed").await;
    assert_eq!(
        changed[0]["detail"],
        json!({"from": "enterprise", "to": "free"})
    );

    // Bad input: 422 and nothing changes.
    let too_big = json!({"settings": {"blob": "x".repeat(17 * 1024)}});
    for (body, code) in [
        (json!({"plan": "platinum"}), "unknown_plan"),
        (json!({"name": ""}), "invalid_name"),
        (json!({"name": "   "}), "invalid_name"),
        (json!({"name": "x".repeat(101)}), "invalid_name"),
        (json!({"name": "a\u{7}b"}), "invalid_name"),
        (json!({"settings": [1, 2]}), "invalid_settings"),
        (json!({"settings": "dark"}), "invalid_settings"),
        (too_big, "invalid_settings"),
        (json!({"signing_secret": "mine"}), "invalid_fields"),
    ] {
        let (status, v) = call(&app, "PUT", &path, Some(&owner_token), body.clone()).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (422, Some(code)),
            "{body}: {v}"
        );
    }
    let (_, v) = app
        .get(&format!("/api/v1/accounts/{}", a.id), &owner_token)
        .await;
    assert_eq!(
        (v["name"].as_str(), v["plan"].as_str()),
        (Some("Again"), Some("free"))
    );

    // Members may not; other accounts' owners do not see it; unknown accounts are 404.
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&member_token),
        json!({"name": "M"}),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (status, v) = call(
        &app,
        "PUT",
        &path,
        Some(&b_owner_token),
        json!({"name": "B"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = call(
        &app,
        "PUT",
        "/api/v1/account/acc_nope",
        Some(&app.admin_token),
        json!({"name": "N"}),
    )
    .await;
    assert_eq!(status, 404, "{v}");
    dash.close().await;
}

#[actix_web::test]
async fn account_updates_are_validated_audited_and_pushed_on_sqlite() {
    account_updates_are_validated_audited_and_pushed(Backend::Sqlite).await;
}

#[actix_web::test]
async fn account_updates_are_validated_audited_and_pushed_on_postgres() {
    account_updates_are_validated_audited_and_pushed(Backend::Postgres).await;
}

async fn a_rotated_secret_keeps_working_for_the_grace_only(backend: Backend) {
    let Some((_db, app)) = spawn_on(backend, |s| s.auth.rotation_grace_s = 1).await else {
        return;
    };
    let (a, _, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let (_b, _, b_owner_token) = account_with_owner(&app, "B", "owner@b.io").await;
    create_user(&app, &owner_token, "m@a.io", "member", None).await;
    let member_token = login(&app.http, "m@a.io", PASSWORD)
        .await
        .expect("member logs in");
    let rotate = format!("/api/v1/accounts/{}/secret/rotate", a.id);

    let (status, v) = call(&app, "POST", &rotate, Some(&member_token), json!({})).await;
    assert_eq!(status, 403, "{v}");
    let (status, v) = call(&app, "POST", &rotate, Some(&b_owner_token), json!({})).await;
    assert_eq!(status, 404, "{v}");
    let (status, v) = call(
        &app,
        "POST",
        "/api/v1/accounts/acc_nope/secret/rotate",
        Some(&app.admin_token),
        json!({}),
    )
    .await;
    assert_eq!(status, 404, "{v}");

    let old_token = app.user_token(&a, "ann");
    let (status, v) = call(&app, "POST", &rotate, Some(&owner_token), json!({})).await;
    assert_eq!(status, 200, "{v}");
    let new_secret = s(&v, "signing_secret");
    assert_ne!(new_secret, a.secret);
    assert!(v["previous_expires_at"].as_i64().is_some(), "{v}");

    // Inside the grace the old secret still signs; the new one signs from now on.
    assert_eq!(
        upgrade_status(&app, &old_token).await,
        None,
        "old secret in grace"
    );
    let rotated = TestAccount {
        id: a.id.clone(),
        secret: new_secret.clone(),
    };
    let new_token = app.user_token(&rotated, "bob");
    let mut bob = app.connect(&new_token).await;
    bob.join_ok("room:lobby", json!({})).await;
    bob.close().await;

    // After the grace the old secret is refused.
    let deadline = Instant::now() + WAIT;
    loop {
        match upgrade_status(&app, &old_token).await {
            Some(status) => {
                assert!(status == 401 || status == 403, "refused with {status}");
                break;
            }
            None => assert!(Instant::now() < deadline, "the old secret still works"),
        }
        sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        upgrade_status(&app, &new_token).await,
        None,
        "the new secret works"
    );

    // A second rotation makes the then-current secret the previous one: the first secret stays
    // refused, tokens of the second keep working through the grace.
    let (status, v) = call(&app, "POST", &rotate, Some(&app.admin_token), json!({})).await;
    assert_eq!(status, 200, "{v}");
    let third = s(&v, "signing_secret");
    assert_eq!(
        upgrade_status(&app, &new_token).await,
        None,
        "second secret in grace"
    );
    assert!(
        upgrade_status(&app, &old_token).await.is_some(),
        "the first secret is gone"
    );

    // Audited, with no secret in the log.
    let entries = audit(&app, &owner_token, "action=secret_rotated").await;
    assert_eq!(entries.len(), 2, "{entries:?}");
    let text = serde_json::to_string(&entries).unwrap();
    for secret in [&a.secret, &new_secret, &third] {
        assert!(
            !text.contains(secret.as_str()),
            "a secret in the audit log: {text}"
        );
    }
}

#[actix_web::test]
async fn a_rotated_secret_keeps_working_for_the_grace_only_on_sqlite() {
    a_rotated_secret_keeps_working_for_the_grace_only(Backend::Sqlite).await;
}

#[actix_web::test]
async fn a_rotated_secret_keeps_working_for_the_grace_only_on_postgres() {
    a_rotated_secret_keeps_working_for_the_grace_only(Backend::Postgres).await;
}

// ---- audit ----

async fn the_audit_log_filters_and_pages(backend: Backend) {
    let Some((_db, app)) = spawn_on(backend, |_| {}).await else {
        return;
    };
    let (a, owner, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let (b, _, b_owner_token) = account_with_owner(&app, "B", "owner@b.io").await;
    let admin = app.admin_token.clone();

    // Login, failed login, refresh-token reuse and logout are on record (written in the
    // background, so wait for them).
    let owner_id = s(&owner, "id");
    let login_entry = audit_entry(&app, &owner_token, "action=login", |e| {
        e["actor"] == owner_id.as_str()
    })
    .await;
    assert_eq!(login_entry["account_id"], a.id.as_str());
    assert!(login_entry["ip"].is_string(), "{login_entry}");
    assert_eq!(
        login(&app.http, "owner@a.io", "wrong-password").await,
        Err(401)
    );
    audit_entry(&app, &owner_token, "action=login_failed", |e| {
        e["actor"] == owner_id.as_str()
    })
    .await;
    let pair = login_pair(&app, "owner@a.io", PASSWORD).await;
    let spent = json!({"refresh_token": s(&pair, "refresh_token")});
    let (status, renewed) = call(&app, "POST", "/api/v1/auth/refresh", None, spent.clone()).await;
    assert_eq!(status, 200, "{renewed}");
    let (status, _) = call(&app, "POST", "/api/v1/auth/refresh", None, spent).await;
    assert_eq!(status, 401);
    audit_entry(&app, &owner_token, "action=refresh_token_reuse", |e| {
        e["actor"] == owner_id.as_str()
    })
    .await;
    let fresh = login_pair(&app, "owner@a.io", PASSWORD).await;
    let body = json!({"refresh_token": s(&fresh, "refresh_token")});
    let (status, v) = call(
        &app,
        "POST",
        "/api/v1/auth/logout",
        Some(&s(&fresh, "access_token")),
        body,
    )
    .await;
    assert_eq!(status, 204, "{v}");
    audit_entry(&app, &owner_token, "action=logout", |e| {
        e["actor"] == owner_id.as_str()
    })
    .await;
    // The admin's own login has no account: admins see it, owners do not.
    audit_entry(&app, &admin, "action=login", |e| e["account_id"].is_null()).await;

    // The owner logged in three times; wait until all three are written before comparing lists.
    let deadline = Instant::now() + WAIT;
    while audit(&app, &owner_token, "action=login").await.len() < 3 {
        assert!(
            Instant::now() < deadline,
            "three logins never reached the log"
        );
        sleep(Duration::from_millis(20)).await;
    }

    // More entries in both accounts.
    for i in 0..5 {
        create_user(&app, &owner_token, &format!("u{i}@a.io"), "viewer", None).await;
    }
    create_user(&app, &b_owner_token, "u@b.io", "viewer", None).await;

    // Owners see only their account; newest first.
    let mine = audit(&app, &owner_token, "").await;
    assert!(
        mine.iter().all(|e| e["account_id"] == a.id.as_str()),
        "{mine:?}"
    );
    let ids: Vec<i64> = mine.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    assert!(mine.iter().all(|e| e["detail"].is_object()), "{mine:?}");
    assert_eq!(
        audit(&app, &owner_token, &format!("account={}", a.id)).await,
        mine
    );
    // An admin filters by account, or sees all.
    assert_eq!(
        audit(&app, &admin, &format!("account={}", a.id)).await,
        mine
    );
    let theirs = audit(&app, &admin, &format!("account={}", b.id)).await;
    assert!(!theirs.is_empty());
    assert!(
        theirs.iter().all(|e| e["account_id"] == b.id.as_str()),
        "{theirs:?}"
    );
    let all = audit(&app, &admin, "").await;
    assert!(
        all.len() > mine.len() + theirs.len(),
        "admins also see server-wide entries"
    );

    // Pages of two, by cursor, give the same entries in the same order, each once.
    let mut paged: Vec<Value> = Vec::new();
    let mut cursor: Option<i64> = None;
    loop {
        let q = match cursor {
            Some(c) => format!("/api/v1/audit?limit=2&cursor={c}"),
            None => "/api/v1/audit?limit=2".to_string(),
        };
        let (status, v) = app.get(&q, &owner_token).await;
        assert_eq!(status, 200, "{v}");
        let page = v["entries"].as_array().unwrap();
        assert!(page.len() <= 2);
        paged.extend(page.iter().cloned());
        match v["next_cursor"].as_i64() {
            Some(c) => {
                assert_eq!(Some(c), page.last().and_then(|e| e["id"].as_i64()));
                cursor = Some(c);
            }
            None => break,
        }
        assert!(paged.len() <= mine.len(), "paging does not end");
    }
    assert_eq!(paged, mine);

    // By time: [from, to) in unix ms.
    let pivot = &mine[mine.len() / 2];
    let at = pivot["at"].as_i64().unwrap();
    let exact = audit(&app, &owner_token, &format!("from={at}&to={}", at + 1)).await;
    assert!(exact.contains(pivot), "{exact:?}");
    assert!(exact.iter().all(|e| e["at"] == at), "{exact:?}");
    let before = audit(&app, &owner_token, &format!("to={at}")).await;
    assert!(
        before.iter().all(|e| e["at"].as_i64().unwrap() < at),
        "{before:?}"
    );
    let after = audit(&app, &owner_token, &format!("from={}", at + 1)).await;
    assert_eq!(before.len() + exact.len() + after.len(), mine.len());
    // By action.
    let created = audit(&app, &owner_token, "action=user_created").await;
    assert_eq!(created.len(), 6, "the owner and five viewers: {created:?}");
    assert!(created.iter().all(|e| e["action"] == "user_created"));

    // Who may read what.
    let (status, v) = app
        .get(&format!("/api/v1/audit?account={}", b.id), &owner_token)
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let member_token = login(&app.http, "u0@a.io", PASSWORD)
        .await
        .expect("logs in");
    let (status, v) = app.get("/api/v1/audit", &member_token).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("forbidden")),
        "{v}"
    );
    let (status, _) = app
        .get(&format!("/api/v1/audit?account={}", b.id), &member_token)
        .await;
    assert_eq!(status, 404);

    // Bad queries: 400.
    for q in ["limit=0", "limit=1001", "limit=-1"] {
        let (status, v) = app.get(&format!("/api/v1/audit?{q}"), &owner_token).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("invalid_limit")),
            "{q}: {v}"
        );
    }
    for q in ["cursor=abc", "from=yesterday", "verbose=1", "from=10&to=5"] {
        let (status, v) = app.get(&format!("/api/v1/audit?{q}"), &owner_token).await;
        assert_eq!(status, 400, "{q}: {v}");
    }
    let (status, v) = app.get("/api/v1/audit?limit=1000", &owner_token).await;
    assert_eq!(status, 200, "{v}");
}

#[actix_web::test]
async fn the_audit_log_filters_and_pages_on_sqlite() {
    the_audit_log_filters_and_pages(Backend::Sqlite).await;
}

#[actix_web::test]
async fn the_audit_log_filters_and_pages_on_postgres() {
    the_audit_log_filters_and_pages(Backend::Postgres).await;
}

// ---- two nodes, one database ----

async fn a_second_node_honours_the_first_nodes_keys_and_rotations(backend: Backend) {
    let Some((db, a)) = spawn_on(backend, |_| {}).await else {
        return;
    };
    // No auth.jwt_secret configured: the key generated by the first node is in the database,
    // so the second node (or the first, restarted) accepts its access tokens.
    let b = spawn_app_with(|s| s.database.url = db.url().to_string()).await;
    let (s, v) = b.get("/api/v1/accounts", &a.admin_token).await;
    assert_eq!(s, 200, "{v}");

    let acc = a.create_account("Rotated").await;
    assert_eq!(upgrade_status(&b, &b.user_token(&acc, "u")).await, None);
    let (s, v) = call(
        &a,
        "POST",
        &format!("/api/v1/accounts/{}/secret/rotate", acc.id),
        Some(&a.admin_token),
        json!({}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let rotated = TestAccount {
        id: acc.id.clone(),
        secret: s_of(&v, "signing_secret"),
    };
    // Node b learns the new secret from the database on the first token it cannot verify
    // (at most one reload a second per account): poll, bounded.
    let deadline = Instant::now() + WAIT;
    loop {
        match upgrade_status(&b, &b.user_token(&rotated, "u")).await {
            None => break,
            Some(status) => {
                assert_eq!(status, 401);
                assert!(
                    Instant::now() < deadline,
                    "node b never accepted the new secret"
                );
                sleep(Duration::from_millis(200)).await;
            }
        }
    }
    // The old secret still works there during the grace.
    assert_eq!(upgrade_status(&b, &b.user_token(&acc, "u")).await, None);
}

fn s_of(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

#[actix_web::test]
async fn a_second_node_honours_the_first_nodes_keys_and_rotations_on_sqlite() {
    a_second_node_honours_the_first_nodes_keys_and_rotations(Backend::Sqlite).await;
}

#[actix_web::test]
async fn a_second_node_honours_the_first_nodes_keys_and_rotations_on_postgres() {
    a_second_node_honours_the_first_nodes_keys_and_rotations(Backend::Postgres).await;
}

/// A user deleted where this node's cache did not see it (another node, or straight in the
/// database) loses access once the cached facts are reloaded, which happens in the background
/// while requests keep being answered from the cache.
#[actix_web::test]
async fn a_user_deleted_behind_the_nodes_back_is_refused_after_the_cache_reloads_it() {
    let app = spawn_app().await;
    let (a, owner, owner_token) = account_with_owner(&app, "A", "owner@a.io").await;
    let path = format!("/api/v1/accounts/{}", a.id);
    let (status, v) = app.get(&path, &owner_token).await;
    assert_eq!(status, 200, "{v}");

    app.state
        .store
        .delete_user(&s(&owner, "id"))
        .expect("the owner is deleted");
    let refused = eventually("the deleted owner's token is refused", || async {
        let (status, v) = app.get(&path, &owner_token).await;
        (status != 200).then_some((status, v))
    })
    .await;
    assert_eq!(
        (refused.0, refused.1["error"].as_str()),
        (401, Some("token_revoked")),
        "{}",
        refused.1
    );
}
