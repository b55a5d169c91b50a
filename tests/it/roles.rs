//! The role matrix: every endpoint × every role × own account / another account, with the exact
//! status. Another account's resources are 404 (never its data, never a 403 that would confirm
//! it exists); inside its own account a role that may not do something gets 403.

use serde_json::{json, Value};

use presenced::store::testdb::TempDatabase;

use crate::helpers::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    Admin,
    Owner,
    Member,
    Viewer,
}

const ROLES: [Role; 4] = [Role::Admin, Role::Owner, Role::Member, Role::Viewer];

/// Who may do what, as the contract's table says.
#[derive(Clone, Copy)]
enum Needs {
    /// Any role of the account (the dashboard).
    AnyRole,
    /// Owners, members and admins (reads).
    Member,
    /// Owners and admins.
    Owner,
}

/// The expected status for `role` of account A acting on A (`own`) or on B.
fn expected(needs: Needs, role: Role, own: bool, ok: u16) -> u16 {
    if role == Role::Admin {
        return ok;
    }
    if !own {
        return 404;
    }
    let allowed = match needs {
        Needs::AnyRole => true,
        Needs::Member => role != Role::Viewer,
        Needs::Owner => role == Role::Owner,
    };
    if allowed {
        ok
    } else {
        403
    }
}

async fn create_user(app: &TestApp, email: &str, role: &str, account: Option<&str>) -> String {
    let (s, v) = app
        .send(
            "POST",
            "/api/v1/users",
            Some(&app.admin_token),
            &json!({"email": email, "password": "password-123", "role": role, "account_id": account})
                .to_string(),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    v["id"].as_str().unwrap().to_string()
}

async fn role_matrix(db: Option<TempDatabase>) {
    let app = spawn_app_with(|s| {
        if let Some(db) = &db {
            s.database.url = db.url().to_string();
        }
    })
    .await;
    let a = app.create_account("A").await;
    let b = app.create_account("B").await;
    let mut tokens = Vec::new();
    for role in ROLES {
        let token = match role {
            Role::Admin => app.admin_token.clone(),
            r => {
                let name = format!("{r:?}").to_lowercase();
                let email = format!("{name}@a.test");
                create_user(&app, &email, &name, Some(&a.id)).await;
                login(&app.http, &email, "password-123").await.unwrap()
            }
        };
        tokens.push((role, token));
    }
    // Someone online in each account, so presence reads have something to hide.
    let _ua = app.connect(&app.user_token(&a, "alice")).await;
    let _ub = app.connect(&app.user_token(&b, "bob")).await;

    let mut failures = Vec::new();
    let mut checked = 0;
    for (role, token) in &tokens {
        for (own, acc) in [(true, &a), (false, &b)] {
            let id = &acc.id;
            // (method, path, body, who may, status when allowed)
            let mut cases: Vec<(&str, String, Value, Needs, u16)> = vec![
                (
                    "GET",
                    format!("/api/v1/dashboard/{id}"),
                    Value::Null,
                    Needs::AnyRole,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/accounts/{id}/presence"),
                    Value::Null,
                    Needs::Member,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/accounts/{id}/rooms"),
                    Value::Null,
                    Needs::Member,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/accounts/{id}/rooms/lobby/presence"),
                    Value::Null,
                    Needs::Member,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/accounts/{id}/users/alice/presence"),
                    Value::Null,
                    Needs::Member,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/accounts/{id}/presence/history"),
                    Value::Null,
                    Needs::Member,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/usage/{id}"),
                    Value::Null,
                    Needs::Member,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/billing/{id}"),
                    Value::Null,
                    Needs::Owner,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/accounts/{id}/users"),
                    Value::Null,
                    Needs::Owner,
                    200,
                ),
                (
                    "GET",
                    format!("/api/v1/audit?account={id}"),
                    Value::Null,
                    Needs::Owner,
                    200,
                ),
                (
                    "PUT",
                    format!("/api/v1/account/{id}"),
                    json!({"name": format!("renamed by {role:?}")}),
                    Needs::Owner,
                    200,
                ),
                (
                    "POST",
                    format!("/api/v1/accounts/{id}/secret/rotate"),
                    json!({}),
                    Needs::Owner,
                    200,
                ),
                (
                    // A well-formed id of no live session: allowed callers learn it is gone.
                    "DELETE",
                    format!("/api/v1/accounts/{id}/sessions/0000000000000001"),
                    Value::Null,
                    Needs::Owner,
                    404,
                ),
                (
                    "POST",
                    "/api/v1/users".to_string(),
                    json!({
                        "email": format!("new-{role:?}-{own}@x.test").to_lowercase(),
                        "password": "password-123",
                        "role": "member",
                        "account_id": id,
                    }),
                    Needs::Owner,
                    201,
                ),
            ];
            // A fresh victim per attempt for the user-changing endpoints.
            let victim = create_user(
                &app,
                &format!("victim-{role:?}-{own}@x.test").to_lowercase(),
                "member",
                Some(id),
            )
            .await;
            cases.push((
                "PUT",
                format!("/api/v1/users/{victim}"),
                json!({"role": "viewer"}),
                Needs::Owner,
                200,
            ));
            cases.push((
                "DELETE",
                format!("/api/v1/users/{victim}"),
                Value::Null,
                Needs::Owner,
                204,
            ));
            for (method, path, body, needs, ok) in cases {
                let want = expected(needs, *role, own, ok);
                let body = if body.is_null() {
                    String::new()
                } else {
                    body.to_string()
                };
                let (got, v) = app.send(method, &path, Some(token), &body).await;
                checked += 1;
                if got != want {
                    failures.push(format!(
                        "{role:?} {method} {path} (own: {own}): {got}, want {want}: {v}"
                    ));
                }
                if got == 404 && !own {
                    // Never another account's data in a refusal.
                    let text = v.to_string();
                    assert!(!text.contains("bob"), "{text}");
                    assert_eq!(v["error"], "not_found", "{method} {path}: {v}");
                }
            }
        }
        // Server-wide endpoints: admins only.
        for (method, path, body, ok) in [
            ("GET", "/api/v1/accounts", String::new(), 200),
            (
                "POST",
                "/api/v1/accounts",
                json!({"name": format!("by {role:?}"), "plan": "free"}).to_string(),
                201,
            ),
            ("GET", "/api/v1/audit", String::new(), 200),
        ] {
            let want = match (role, path) {
                (Role::Admin, _) => ok,
                // An owner's audit without a filter is their own account's.
                (Role::Owner, "/api/v1/audit") => 200,
                _ => 403,
            };
            let (got, v) = app.send(method, path, Some(token), &body).await;
            checked += 1;
            if got != want {
                failures.push(format!("{role:?} {method} {path}: {got}, want {want}: {v}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // Without a token every API endpoint is 401.
    for path in ["/api/v1/accounts", "/api/v1/dashboard/x", "/api/v1/audit"] {
        let (s, v) = app.send("GET", path, None, "").await;
        assert_eq!(s, 401, "{path}: {v}");
    }
}

#[actix_web::test]
async fn the_role_matrix_holds_on_sqlite() {
    role_matrix(None).await;
}

#[actix_web::test]
async fn the_role_matrix_holds_on_postgres() {
    let Some(db) = TempDatabase::postgres() else {
        return;
    };
    role_matrix(Some(db)).await;
}
