//! `presenced-floor`, the no-actor baseline server: it speaks enough Phoenix V2 for a load
//! generator (join, heartbeat, status fan-out) and answers its set-up calls with fake JSON.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

use crate::helpers::{client, is_diff, joins_of, WsClient};

/// The floor binary on a free port, killed when dropped.
struct Floor {
    child: Child,
    addr: String,
}

impl Floor {
    fn start() -> Floor {
        let mut child = Command::new(env!("CARGO_BIN_EXE_presenced-floor"))
            .args(["--bind", "127.0.0.1:0", "--threads", "2"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("floor starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("floor prints its address");
        let addr = line
            .trim()
            .strip_prefix("presenced-floor listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Floor { child, addr }
    }

    async fn connect(&self, user: &str) -> WsClient {
        // An unsigned token: the floor reads `sub` and checks nothing.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = b64.encode(json!({"sub": user}).to_string());
        let token = format!("{}.{claims}.sig", b64.encode(r#"{"alg":"HS256"}"#));
        WsClient::connect(&format!(
            "ws://{}/socket/websocket?vsn=2.0.0&token={token}",
            self.addr
        ))
        .await
        .expect("socket connects")
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[actix_web::test]
async fn the_floor_fans_a_status_out_to_the_other_members() {
    let floor = Floor::start();
    let mut a = floor.connect("ann").await;
    let mut b = floor.connect("bob").await;
    let mut c = floor.connect("cid").await;
    for s in [&mut a, &mut b, &mut c] {
        s.join_ok("room:floor", json!({"status": "online"})).await;
    }

    let r = a
        .push(
            "1",
            "room:floor",
            "status",
            json!({"status": "away", "meta": {"t": 42}}),
        )
        .await;
    assert_eq!(a.expect_reply(&r).await["status"], "ok");
    for s in [&mut b, &mut c] {
        let d = s.expect("ann's diff", is_diff("room:floor")).await;
        assert_eq!(joins_of(&d), vec!["ann".to_string()]);
        let meta = &d[4]["joins"]["ann"]["metas"][0];
        assert_eq!(meta["status"], "away");
        assert_eq!(meta["t"], 42);
    }

    // A broadcast reaches the others, not the sender; heartbeats are answered.
    let r = b
        .push(
            "1",
            "room:floor",
            "broadcast",
            json!({"event": "cursor", "payload": {"x": 1}}),
        )
        .await;
    assert_eq!(b.expect_reply(&r).await["status"], "ok");
    for s in [&mut a, &mut c] {
        let f = s
            .expect("bob's cursor", |v| v[2] == "room:floor" && v[3] == "cursor")
            .await;
        assert_eq!(f[4], json!({"x": 1}));
    }
    let r = c.push("", "phoenix", "heartbeat", json!({})).await;
    assert_eq!(c.expect_reply(&r).await["status"], "ok");
    let r = c
        .push("", "room:other", "status", json!({"status": "busy"}))
        .await;
    assert_eq!(c.expect_reply(&r).await["response"]["reason"], "not_joined");
}

#[actix_web::test]
async fn the_floor_fakes_login_and_account_creation() {
    let floor = Floor::start();
    let post = |path: &str, body: Value| {
        client()
            .post(format!("http://{}{path}", floor.addr))
            .insert_header(("content-type", "application/json"))
            .send_body(body.to_string())
    };
    let mut res = post(
        "/api/v1/auth/login",
        json!({"email": "admin@localhost", "password": "x"}),
    )
    .await
    .expect("login");
    assert_eq!(res.status().as_u16(), 200);
    let v: Value = serde_json::from_slice(&res.body().await.expect("body")).expect("json");
    assert!(v["access_token"].is_string());
    let mut res = post(
        "/api/v1/accounts",
        json!({"name": "Load", "plan": "enterprise"}),
    )
    .await
    .expect("accounts");
    assert_eq!(res.status().as_u16(), 201);
    let v: Value = serde_json::from_slice(&res.body().await.expect("body")).expect("json");
    assert!(
        v["id"].is_string() && v["signing_secret"].is_string(),
        "{v}"
    );
}

/// The benchmarks drive the floor with `presenced-load`, set-up calls and all: a tiny fanout
/// and a tiny connect run get every session in and every change to the other members.
#[actix_web::test]
async fn the_load_generator_runs_fanout_and_connect_against_the_floor() {
    use presenced::load::{self, LoadOptions, Scenario};
    let floor = Floor::start();
    for scenario in [Scenario::Fanout, Scenario::Connect] {
        let s = load::run(LoadOptions {
            scenario,
            url: format!("http://{}", floor.addr),
            email: "admin@localhost".into(),
            password: "any".into(),
            sessions: 20,
            rooms: 4,
            rate: 200,
            changes: 20,
            duration: std::time::Duration::from_secs(1),
            heartbeat: std::time::Duration::from_secs(1),
            progress: false,
            ..LoadOptions::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{scenario:?} against the floor: {e}"));
        assert_eq!(s.sessions_connected, 20, "{}", s.table());
        assert_eq!(s.errors_total, 0, "{:?}", s.errors);
        if scenario == Scenario::Fanout {
            assert!(s.changes > 0, "{}", s.table());
            assert!(s.steady_deliveries >= s.changes, "{}", s.table());
        }
    }
}
