//! `presenced demo` against a real node in this process: the simulated users show up through
//! the API and on a dashboard's `account:<id>` topic, and they move.

use std::collections::HashSet;
use std::time::Duration;

use actix_web::rt::time::timeout;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use presenced::demo::{self, DemoError, DemoOptions};

use crate::helpers::*;

fn options(app: &TestApp) -> DemoOptions {
    DemoOptions {
        url: app.http.clone(),
        email: ADMIN_EMAIL.into(),
        password: ADMIN_PASSWORD.into(),
        users: 20,
        rooms: 6,
        // Fast ticks so that every kind of action happens soon; heartbeats well inside the
        // test node's 5 s socket timeout.
        tick: Duration::from_millis(10),
        heartbeat: Duration::from_secs(1),
        seed: Some(7),
        verbose: false,
        ..DemoOptions::default()
    }
}

/// A diff in which some user's connection changed its status (an update: the new meta in
/// `joins` with `phx_ref_prev`, the old one in `leaves`).
fn status_change(v: &Value) -> bool {
    let (Some(joins), Some(leaves)) = (v[4]["joins"].as_object(), v[4]["leaves"].as_object())
    else {
        return false;
    };
    joins.iter().any(|(user, new)| {
        let olds = &leaves
            .get(user)
            .map(|l| l["metas"].clone())
            .unwrap_or_default();
        new["metas"].as_array().into_iter().flatten().any(|m| {
            m.get("phx_ref_prev").is_some()
                && olds
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|o| o["phx_ref"] == m["phx_ref_prev"] && o["status"] != m["status"])
        })
    })
}

/// A diff in which a user left the account altogether (in `leaves`, not back in `joins`).
fn departure(v: &Value) -> bool {
    let joined: HashSet<String> = joins_of(v).into_iter().collect();
    leaves_of(v).iter().any(|u| !joined.contains(u))
}

#[actix_web::test]
async fn demo_users_are_online_in_several_rooms_and_move() {
    let app = spawn_app().await;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (ready_tx, ready_rx) = oneshot::channel();
    let opts = options(&app);
    let demo = actix_web::rt::spawn(demo::run_with(
        opts,
        async {
            let _ = stop_rx.await;
        },
        Some(ready_tx),
    ));
    let ready = timeout(WAIT * 3, ready_rx)
        .await
        .expect("the demo's users are in")
        .expect("the demo reports readiness");
    assert_eq!(ready.sessions, 20, "every initial user connected");
    assert!(ready.rooms >= 3, "users spread over rooms: {}", ready.rooms);
    let id = ready.account_id.clone();

    // The account is the one named Demo, on plan pro.
    let (status, v) = app.get("/api/v1/accounts", &app.admin_token).await;
    assert_eq!(status, 200);
    let acc = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == id.as_str())
        .expect("the demo account is listed")
        .clone();
    assert_eq!(acc["name"], "Demo");
    assert_eq!(acc["plan"], "pro");

    // Here-now through the API: people with names and devices, in several rooms.
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{id}/presence"), &app.admin_token)
        .await;
    assert_eq!(status, 200, "{v}");
    let presences = v["presences"].as_object().expect("presences");
    assert!(presences.len() >= 10, "users online: {}", presences.len());
    let metas: Vec<&Value> = presences
        .values()
        .flat_map(|p| p["metas"].as_array().into_iter().flatten())
        .collect();
    assert!(metas
        .iter()
        .all(|m| m["name"].as_str().is_some_and(|n| n.contains(' '))));
    let devices: HashSet<&str> = metas.iter().filter_map(|m| m["device"].as_str()).collect();
    assert!(
        !devices.is_empty()
            && devices
                .iter()
                .all(|d| ["web", "ios", "android", "desktop"].contains(d))
    );
    let (status, v) = app
        .get(&format!("/api/v1/accounts/{id}/rooms"), &app.admin_token)
        .await;
    assert_eq!(status, 200, "{v}");
    let occupied = v["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["users"].as_u64().unwrap_or(0) > 0)
        .count();
    assert!(occupied >= 3, "occupied rooms: {v}");

    // A dashboard following the account sees a status change and someone leaving.
    let mut dash = app.connect(&app.admin_token).await;
    let topic = format!("account:{id}");
    dash.join_ok(&topic, json!({})).await;
    dash.expect("a status change", |v| {
        is_diff(&topic)(v) && status_change(v)
    })
    .await;
    dash.expect("a user leaving", |v| is_diff(&topic)(v) && departure(v))
        .await;

    let _ = stop_tx.send(());
    let report = timeout(WAIT, demo)
        .await
        .expect("the demo stops when told")
        .expect("the demo task")
        .expect("the demo ran without error");
    assert_eq!(report.account_id, id);
    assert!(report.status_changes >= 1, "{report:?}");
    assert!(report.leaves >= 1, "room leaves acknowledged: {report:?}");
    assert!(report.joins >= 20, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
}

#[actix_web::test]
async fn demo_reuses_an_existing_account_by_rotating_its_secret() {
    let app = spawn_app().await;
    let existing = app.create_account("Demo").await;
    let opts = DemoOptions {
        users: 3,
        max_events: Some(5),
        ..options(&app)
    };
    let report = demo::run(opts, std::future::pending())
        .await
        .expect("the demo runs");
    assert_eq!(report.account_id, existing.id);
    assert!(report.connects >= 3, "{report:?}");
    // Still one account of that name.
    let (_, v) = app.get("/api/v1/accounts", &app.admin_token).await;
    let named = v["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == "Demo")
        .count();
    assert_eq!(named, 1);
}

#[actix_web::test]
async fn demo_with_a_wrong_password_fails_with_one_clear_line() {
    let app = spawn_app().await;
    let opts = DemoOptions {
        password: "not-the-password".into(),
        ..options(&app)
    };
    let err = demo::run(opts, std::future::pending())
        .await
        .expect_err("a wrong password is an error");
    assert!(matches!(err, DemoError::Login { .. }), "{err:?}");
    let line = err.to_string();
    assert!(line.contains("wrong email or password"), "{line}");
    assert!(line.contains(ADMIN_EMAIL), "{line}");
    assert!(!line.contains('\n'), "{line}");
}

#[actix_web::test]
async fn demo_against_no_node_says_it_cannot_reach_it() {
    // A port that nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let opts = DemoOptions {
        url: format!("http://127.0.0.1:{port}"),
        password: "whatever".into(),
        verbose: false,
        ..DemoOptions::default()
    };
    let err = demo::run(opts, std::future::pending())
        .await
        .expect_err("no node, no demo");
    assert!(matches!(err, DemoError::Unreachable { .. }), "{err:?}");
    let line = err.to_string();
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    assert!(!line.contains('\n'), "{line}");
}
