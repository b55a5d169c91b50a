//! Plans, usage, billing, rate limits and CORS, against a real node (SQLite and PostgreSQL).

use std::time::Duration;

use serde_json::{json, Value};

use presenced::config::PlanQuota;
use presenced::store::Store;
use presenced::usage::{FlushUsage, Ticks};

use crate::helpers::*;

async fn create_account_on(app: &TestApp, name: &str, plan: &str) -> TestAccount {
    let (status, v) = app
        .send(
            "POST",
            "/api/v1/accounts",
            Some(&app.admin_token),
            &json!({"name": name, "plan": plan}).to_string(),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    TestAccount {
        id: v["id"].as_str().unwrap().into(),
        secret: v["signing_secret"].as_str().unwrap().into(),
    }
}

/// A plain GET of the socket endpoint: the upgrade's refusal, as status and JSON body.
async fn upgrade_status(app: &TestApp, token: &str) -> (u16, Value) {
    app.get(&format!("/socket/websocket?vsn=2.0.0&token={token}"), "")
        .await
}

fn is_event<'a>(topic: &'a str, event: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |v| v[2] == topic && v[3] == event
}

fn alert<'a>(topic: &'a str, kind: &'a str, threshold: i64) -> impl Fn(&Value) -> bool + 'a {
    move |v| {
        v[2] == topic
            && v[3] == "billing_alert"
            && v[4]["kind"] == kind
            && v[4]["threshold"] == threshold
    }
}

async fn plans_limit_connections_rooms_and_messages_and_usage_is_metered(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let quota = PlanQuota {
        max_connections: 3,
        max_rooms: 2,
        max_messages_per_day: 4,
    };
    let app = spawn_app_with(|s| {
        s.database.url = db.url().to_string();
        s.plans.enterprise = quota.clone();
    })
    .await;
    let acc = create_account_on(&app, "Metered", "enterprise").await;
    let topic = format!("account:{}", acc.id);
    let mut dash = app.connect(&app.admin_token).await;
    dash.join_ok(&topic, json!({})).await;

    // Connections: three fit, the fourth is refused with plan_limit and nothing joins.
    let mut c1 = app.connect(&app.user_token(&acc, "u1")).await;
    let _c2 = app.connect(&app.user_token(&acc, "u2")).await;
    let c3 = app.connect(&app.user_token(&acc, "u3")).await;
    let (s, v) = upgrade_status(&app, &app.user_token(&acc, "u4")).await;
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"], "plan_limit", "{v}");
    dash.expect("80 % of connections", alert(&topic, "connections", 80))
        .await;
    dash.expect("100 % of connections", alert(&topic, "connections", 100))
        .await;
    let used = dash
        .expect("usage_changed with 3 connections", |v| {
            is_event(&topic, "usage_changed")(v) && v[4]["connections"]["used"] == 3
        })
        .await;
    assert_eq!(used[4]["connections"]["limit"], 3, "{used}");
    // A slot comes back when a connection goes.
    c3.close().await;
    let mut back = None;
    for _ in 0..100 {
        let (s, _) = upgrade_status(&app, &app.user_token(&acc, "u4")).await;
        if s != 403 {
            back = Some(s);
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    // A plain GET is no WebSocket handshake: past the plan check it fails as a bad upgrade.
    assert_eq!(back, Some(400), "the freed slot is usable again");

    // Rooms: two fit, a third is refused with plan_limit; the socket stays usable.
    c1.join_ok("room:a", json!({})).await;
    c1.join_ok("room:b", json!({})).await;
    let reply = c1.join("room:c", json!({})).await;
    assert_eq!(reply["response"]["reason"], "plan_limit", "{reply}");
    dash.expect("100 % of rooms", alert(&topic, "rooms", 100))
        .await;

    // Messages: four pushes a day, the fifth is refused with plan_limit.
    for i in 0..4 {
        let r = c1
            .push(
                "1",
                "room:a",
                "broadcast",
                json!({"event": "ping", "payload": {"i": i}}),
            )
            .await;
        assert_eq!(c1.expect_reply(&r).await["status"], "ok");
    }
    let r = c1
        .push("1", "room:a", "status", json!({"status": "busy"}))
        .await;
    let reply = c1.expect_reply(&r).await;
    assert_eq!(reply["response"]["reason"], "plan_limit", "{reply}");
    dash.expect("100 % of messages", alert(&topic, "messages", 100))
        .await;

    // Usage per minute reaches the table and the API.
    app.state.meter.send(FlushUsage).await.unwrap().unwrap();
    let (s, v) = app
        .get(&format!("/api/v1/usage/{}", acc.id), &app.admin_token)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["totals"]["messages_in"], 4, "{v}");
    assert_eq!(v["totals"]["peak_connections"], 3, "{v}");
    assert!(v["totals"]["joins"].as_i64().unwrap() >= 2, "{v}");
    // At least the two presence_state pushes of its joins.
    assert!(v["totals"]["messages_out"].as_i64().unwrap() >= 2, "{v}");
    assert!(!v["series"].as_array().unwrap().is_empty());
    let store = Store::open(db.url(), 1).unwrap();
    let rows = store
        .usage_rows(&acc.id, 0, presence_actors::now_ms() + 60_000, 100)
        .unwrap();
    assert_eq!(rows.iter().map(|r| r.messages_in).sum::<i64>(), 4);

    // Billing: plan, limits, usage this period and the alerts, once each.
    let (s, v) = app
        .get(&format!("/api/v1/billing/{}", acc.id), &app.admin_token)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plan"]["id"], "enterprise", "{v}");
    assert_eq!(v["plan"]["max_connections"], 3, "{v}");
    assert_eq!(v["usage"]["messages_in"], 4, "{v}");
    let alerts = v["alerts"].as_array().unwrap();
    let mut kinds: Vec<String> = alerts
        .iter()
        .map(|a| format!("{}:{}", a["kind"].as_str().unwrap(), a["threshold"]))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            "connections:100",
            "connections:80",
            "messages:100",
            "messages:80",
            "rooms:100",
            "rooms:80"
        ],
        "{v}"
    );

    // The dashboard's first call has it all.
    let (s, v) = app
        .get(&format!("/api/v1/dashboard/{}", acc.id), &app.admin_token)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["account"]["plan"], "enterprise", "{v}");
    assert_eq!(v["online"]["users"], 2, "{v}");
    assert_eq!(v["rooms"]["total"], 2, "{v}");
    assert_eq!(v["usage"]["messages_today"]["used"], 4, "{v}");
    assert_eq!(v["usage"]["messages_today"]["limit"], 4, "{v}");
    assert_eq!(v["alerts"].as_array().unwrap().len(), 6, "{v}");

    // Once per period, across restarts: a second node on the same database at the same limits
    // records nothing new.
    drop(dash);
    let app2 = spawn_app_with(|s| {
        s.database.url = db.url().to_string();
        s.plans.enterprise = quota.clone();
    })
    .await;
    let mut again = Vec::new();
    for u in ["v1", "v2", "v3"] {
        again.push(app2.connect(&app2.user_token(&acc, u)).await);
    }
    // The new node's messages_today was loaded from usage_metrics: still at the limit.
    let r = again[0].join("room:z", json!({})).await;
    assert_eq!(r["status"], "ok", "{r}");
    let p = again[0]
        .push("1", "room:z", "status", json!({"status": "away"}))
        .await;
    assert_eq!(
        again[0].expect_reply(&p).await["response"]["reason"],
        "plan_limit"
    );
    // Give the meter a few ticks to try (and fail) to record the same alerts again.
    actix_web::rt::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(store.list_alerts(&acc.id, 0).unwrap().len(), 6);
    drop((c1, again));
}

#[actix_web::test]
async fn plans_limit_connections_rooms_and_messages_and_usage_is_metered_on_sqlite() {
    plans_limit_connections_rooms_and_messages_and_usage_is_metered(Backend::Sqlite).await;
}

#[actix_web::test]
async fn plans_limit_connections_rooms_and_messages_and_usage_is_metered_on_postgres() {
    plans_limit_connections_rooms_and_messages_and_usage_is_metered(Backend::Postgres).await;
}

#[actix_web::test]
async fn a_plan_change_applies_its_limits_at_once() {
    let app = spawn_app_with(|s| {
        s.plans.enterprise = PlanQuota {
            max_connections: 1,
            max_rooms: 1,
            max_messages_per_day: 1,
        };
    })
    .await;
    let acc = create_account_on(&app, "Upgrader", "enterprise").await;
    let _c = app.connect(&app.user_token(&acc, "a")).await;
    let (s, v) = upgrade_status(&app, &app.user_token(&acc, "b")).await;
    assert_eq!((s, v["error"].as_str()), (403, Some("plan_limit")));
    let (s, v) = app
        .send(
            "PUT",
            &format!("/api/v1/account/{}", acc.id),
            Some(&app.admin_token),
            &json!({"plan": "pro"}).to_string(),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, _) = upgrade_status(&app, &app.user_token(&acc, "b")).await;
    assert_eq!(
        s, 400,
        "past the plan check: only the missing handshake fails"
    );
}

#[actix_web::test]
async fn api_requests_past_the_per_ip_and_per_account_limits_get_429_with_retry_after() {
    let app = spawn_app_with(|s| {
        s.limits.api_per_ip_per_s = 1_000;
        s.limits.api_per_account_per_s = 2;
    })
    .await;
    let a = app.create_account("A").await;
    // Admin requests spend the admin's own budget ("user:<id>"), so use it up.
    let mut limited = None;
    for _ in 0..50 {
        let mut res = client()
            .get(format!("{}/api/v1/accounts/{}/presence", app.http, a.id))
            .bearer_auth(&app.admin_token)
            .send()
            .await
            .unwrap();
        if res.status().as_u16() == 429 {
            let retry: u64 = res
                .headers()
                .get("retry-after")
                .expect("Retry-After")
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(retry >= 1);
            let v: Value = res.json().await.unwrap();
            assert_eq!(v["error"], "rate_limited", "{v}");
            limited = Some(v);
            break;
        }
    }
    assert!(limited.is_some(), "the admin's budget runs out");
    // Other callers' budgets are their own: an anonymous call is not affected.
    let (s, v) = app
        .send(
            "POST",
            "/api/v1/auth/refresh",
            None,
            r#"{"refresh_token":"x"}"#,
        )
        .await;
    assert_eq!(s, 401, "{v}");

    // Per IP: a tight budget for anonymous callers too.
    let app = spawn_app_with(|s| s.limits.api_per_ip_per_s = 3).await;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        statuses.push(
            app.send(
                "POST",
                "/api/v1/auth/refresh",
                None,
                r#"{"refresh_token":"x"}"#,
            )
            .await
            .0,
        );
    }
    assert!(statuses.contains(&401), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    // Ops endpoints are not behind the API limit.
    assert_eq!(app.get("/healthz", "").await.0, 200);
}

#[actix_web::test]
async fn socket_connects_and_joins_past_their_rates_are_refused() {
    let app = spawn_app_with(|s| {
        s.limits.connects_per_ip_per_s = 2;
        s.limits.joins_per_account_per_s = 1;
    })
    .await;
    let acc = app.create_account("Busy").await;
    let mut ok = Vec::new();
    let mut refused = None;
    for i in 0..20 {
        let t = app.user_token(&acc, &format!("u{i}"));
        let mut res = client()
            .get(format!("{}/socket/websocket?vsn=2.0.0&token={t}", app.http))
            .send()
            .await
            .unwrap();
        if res.status().as_u16() == 429 {
            assert!(res.headers().get("retry-after").is_some());
            let v: Value = res.json().await.unwrap();
            refused = Some(v);
            break;
        }
        ok.push(i);
    }
    let v = refused.expect("connects are throttled");
    assert_eq!(v["error"], "rate_limited", "{v}");
    assert!(!ok.is_empty());

    // Joins: the account's budget runs out, the socket stays usable.
    let app = spawn_app_with(|s| s.limits.joins_per_account_per_s = 1).await;
    let acc = app.create_account("Joiner").await;
    let mut c = app.connect(&app.user_token(&acc, "j")).await;
    let mut reasons = Vec::new();
    for i in 0..10 {
        let r = c.join(&format!("room:r{i}"), json!({})).await;
        reasons.push(r["response"]["reason"].as_str().unwrap_or("ok").to_string());
    }
    assert!(reasons.iter().any(|r| r == "rate_limited"), "{reasons:?}");
    let hb = c.push("", "phoenix", "heartbeat", json!({})).await;
    assert_eq!(c.expect_reply(&hb).await["status"], "ok");

    // Joins per client IP: two accounts behind one address share its budget.
    let app = spawn_app_with(|s| s.limits.joins_per_ip_per_s = 1).await;
    let (x, y) = (app.create_account("X").await, app.create_account("Y").await);
    let mut cx = app.connect(&app.user_token(&x, "x")).await;
    let mut cy = app.connect(&app.user_token(&y, "y")).await;
    let mut reasons = Vec::new();
    for i in 0..5 {
        for c in [&mut cx, &mut cy] {
            let r = c.join(&format!("room:r{i}"), json!({})).await;
            reasons.push(r["response"]["reason"].as_str().unwrap_or("ok").to_string());
        }
    }
    assert!(reasons.iter().any(|r| r == "rate_limited"), "{reasons:?}");
}

async fn login_from(app: &TestApp, ip: &str, email: &str, password: &str) -> (u16, Option<String>) {
    let res = client()
        .post(format!("{}/api/v1/auth/login", app.http))
        .insert_header(("x-forwarded-for", ip))
        .send_json(&json!({"email": email, "password": password}))
        .await
        .unwrap();
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|h| h.to_str().ok())
        .map(String::from);
    (res.status().as_u16(), retry)
}

async fn a_brute_force_run_is_throttled_and_audited(backend: Backend) {
    let Some(db) = temp_db(backend) else { return };
    let app = spawn_app_with(|s| {
        s.database.url = db.url().to_string();
        s.server.trusted_proxies = vec!["127.0.0.1".into()];
        s.limits.login_per_ip_per_minute =
            presence_actors::Limits::default().login_per_ip_per_minute;
    })
    .await;
    let (mut wrong, mut throttled) = (0, 0);
    for i in 0..1000 {
        let (s, retry) = login_from(&app, "203.0.113.7", ADMIN_EMAIL, &format!("guess-{i}")).await;
        match s {
            401 => wrong += 1,
            429 => {
                assert!(retry.is_some(), "429 carries Retry-After");
                throttled += 1
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(wrong <= 10, "{wrong} attempts reached the password check");
    assert_eq!(wrong + throttled, 1000);
    // From another address the right password still works.
    assert_eq!(
        login_from(&app, "198.51.100.2", ADMIN_EMAIL, ADMIN_PASSWORD)
            .await
            .0,
        200
    );
    // Audited: each failed check, and the throttling (once a minute per address). Entries are
    // written off the request path: poll until they are all there.
    let store = Store::open(db.url(), 1).unwrap();
    let (mut failed, mut throttle_entries) = (0, 0);
    for _ in 0..200 {
        let entries = store.list_audit(None, 0, i64::MAX, 10_000).unwrap();
        for e in &entries {
            if e.action.starts_with("login_") && e.action != "login" {
                assert_eq!(e.ip.as_deref(), Some("203.0.113.7"), "{}", e.action);
            }
        }
        failed = entries
            .iter()
            .filter(|e| e.action == "login_failed")
            .count();
        throttle_entries = entries
            .iter()
            .filter(|e| e.action == "login_throttled")
            .count();
        if failed == wrong && throttle_entries > 0 {
            break;
        }
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(failed, wrong);
    assert_eq!(throttle_entries, 1, "one entry per minute per address");
}

#[actix_web::test]
async fn a_brute_force_run_is_throttled_and_audited_on_sqlite() {
    a_brute_force_run_is_throttled_and_audited(Backend::Sqlite).await;
}

#[actix_web::test]
async fn a_brute_force_run_is_throttled_and_audited_on_postgres() {
    a_brute_force_run_is_throttled_and_audited(Backend::Postgres).await;
}

async fn cors_headers(app: &TestApp, method: &str, origin: &str) -> (u16, Option<String>) {
    let res = client()
        .request(
            method.parse().unwrap(),
            format!("{}/api/v1/accounts", app.http),
        )
        .insert_header(("origin", origin))
        .insert_header(("access-control-request-method", "GET"))
        .insert_header(("access-control-request-headers", "authorization"))
        .bearer_auth(&app.admin_token)
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.headers()
            .get("access-control-allow-origin")
            .and_then(|h| h.to_str().ok())
            .map(String::from),
    )
}

#[actix_web::test]
async fn cors_allows_configured_origins_only_and_defaults_to_same_origin() {
    let app = spawn_app().await;
    let (s, allow) = cors_headers(&app, "GET", "http://evil.example").await;
    assert_eq!(s, 200, "the server does not refuse; the browser does");
    assert_eq!(allow, None);
    let (_, allow) = cors_headers(&app, "OPTIONS", "http://evil.example").await;
    assert_eq!(allow, None);

    let app = spawn_app_with(|s| s.server.cors_origins = vec!["https://dash.example".into()]).await;
    let (s, allow) = cors_headers(&app, "GET", "https://dash.example").await;
    assert_eq!(s, 200);
    assert_eq!(allow.as_deref(), Some("https://dash.example"));
    let (s, allow) = cors_headers(&app, "OPTIONS", "https://dash.example").await;
    assert_eq!(s, 200);
    assert_eq!(allow.as_deref(), Some("https://dash.example"));
    let (_, allow) = cors_headers(&app, "GET", "https://dash.example.evil").await;
    assert_eq!(allow, None);
}

#[actix_web::test]
async fn usage_changed_goes_out_at_most_once_per_meter_tick_however_busy_the_account() {
    let app = spawn_app().await;
    let acc = app.create_account("Chatty").await;
    let topic = format!("account:{}", acc.id);
    let mut dash = app.connect(&app.admin_token).await;
    dash.join_ok(&topic, json!({})).await;
    let mut c = app.connect(&app.user_token(&acc, "talker")).await;
    c.join_ok("room:r", json!({})).await;
    let before = app.state.meter.send(Ticks).await.unwrap();
    for i in 0..200 {
        let r = c
            .push(
                "1",
                "room:r",
                "broadcast",
                json!({"event": "e", "payload": {"i": i}}),
            )
            .await;
        assert_eq!(c.expect_reply(&r).await["status"], "ok");
    }
    // Count every usage_changed until one shows all 200 pushes.
    let mut pushes = 0;
    loop {
        let v = dash
            .expect("usage_changed", is_event(&topic, "usage_changed"))
            .await;
        // Only those that saw a push: earlier ones came from ticks before `before`.
        if v[4]["messages_today"]["used"].as_i64().unwrap_or(0) > 0 {
            pushes += 1;
        }
        if v[4]["messages_today"]["used"] == 200 {
            break;
        }
    }
    let after = app.state.meter.send(Ticks).await.unwrap();
    // Every push came from a distinct tick (the first may be from the tick before `before`).
    assert!(
        pushes <= after - before + 1,
        "{pushes} usage_changed in {} ticks",
        after - before
    );
    assert!(pushes < 200, "coalesced, not one per message");
}
