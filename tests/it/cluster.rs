//! Cluster mode against the real Redis at 127.0.0.1:6379 (a unique key prefix per test): three
//! nodes in one process sharing one SQLite database, plus child-process nodes for `kill -9`.
//! Redis outages are made with a TCP proxy between one node and Redis; a Redis restart's data
//! loss by deleting that node's keys while it is cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use presence_actors::client_presence::{apply_diff_payload, sync_state, ClientState};

use crate::helpers::*;

const REDIS: &str = "127.0.0.1:6379";

/// The Redis URL, or `None` (the test skips) when Redis is down outside CI; under CI=true a
/// missing Redis is a failure.
fn redis_url() -> Option<String> {
    let up = std::net::TcpStream::connect_timeout(&REDIS.parse().unwrap(), Duration::from_secs(1))
        .is_ok();
    if up {
        return Some(format!("redis://{REDIS}/"));
    }
    assert!(
        std::env::var("CI").is_err(),
        "Redis is not reachable at {REDIS} (CI=true: tests that need it fail)"
    );
    eprintln!("skipping: Redis is not reachable at {REDIS}");
    None
}

fn unique_prefix() -> String {
    format!("presenced-test-{:x}", rand::random::<u64>())
}

/// Deletes every key of `prefix` (as a Redis restart would lose them, or to clean up).
fn delete_keys(prefix: &str) {
    let client = redis::Client::open(format!("redis://{REDIS}/")).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query(&mut conn)
        .expect("KEYS");
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL").arg(keys).query(&mut conn).expect("DEL");
    }
}

struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        delete_keys(&self.0);
    }
}

/// Cluster timings for tests: short, so node death is noticed in seconds.
#[derive(Clone)]
struct Timing {
    ttl_ms: u64,
    grace_ms: u64,
}

const FAST: Timing = Timing {
    // Short enough for tests, long enough that a node starved of CPU on a busy CI machine does
    // not miss its lease.
    ttl_ms: 5_000,
    grace_ms: 300,
};

async fn node(name: &str, db: &std::path::Path, redis: &str, prefix: &str, t: &Timing) -> TestApp {
    let (name, db, redis, prefix, t) = (
        name.to_string(),
        db.to_path_buf(),
        redis.to_string(),
        prefix.to_string(),
        t.clone(),
    );
    spawn_app_with(move |s| {
        s.database.url = format!("sqlite://{}", db.join("cluster.db").display());
        s.redis.url = Some(redis);
        s.redis.prefix = prefix;
        s.cluster.node_id = Some(name);
        s.cluster.node_ttl_ms = t.ttl_ms;
        s.cluster.tick_ms = 10;
        s.presence.grace_ms = t.grace_ms;
        // These clients do not heartbeat.
        s.presence.timeout_ms = 120_000;
    })
    .await
}

/// One test's cluster: Redis keys under a prefix of its own (deleted when the test ends, after
/// its nodes) and a database directory its nodes share.
struct Cluster {
    redis: String,
    prefix: String,
    db: tempfile::TempDir,
    _cleanup: Cleanup,
}

impl Cluster {
    /// `None` when Redis is down outside CI (the test is skipped; under CI it fails).
    fn start() -> Option<Cluster> {
        let redis = redis_url()?;
        let prefix = unique_prefix();
        Some(Cluster {
            _cleanup: Cleanup(prefix.clone()),
            redis,
            prefix,
            db: tempfile::tempdir().unwrap(),
        })
    }

    /// A node of this cluster, in-process.
    async fn node(&self, name: &str, t: &Timing) -> TestApp {
        node(name, self.db.path(), &self.redis, &self.prefix, t).await
    }
}

/// A client's view of one topic, kept as phoenix.js keeps it.
struct View {
    ws: WsClient,
    topic: String,
    state: ClientState,
}

impl View {
    async fn join(mut ws: WsClient, topic: &str, payload: Value) -> View {
        let s = ws.join_ok(topic, payload).await;
        let mut state = ClientState::new();
        sync_state(&mut state, s.as_object().expect("state object"));
        View {
            ws,
            topic: topic.into(),
            state,
        }
    }

    /// Applies frames until `pred` holds of the state.
    async fn until(&mut self, what: &str, pred: impl Fn(&ClientState) -> bool) {
        let deadline = Instant::now() + WAIT * 2;
        while !pred(&self.state) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("timed out waiting for {what}; state {:?}", self.state));
            let topic = self.topic.clone();
            let f = self
                .ws
                .try_expect(left, &|v: &Value| {
                    v[2] == topic.as_str() && (v[3] == "presence_diff" || v[3] == "presence_state")
                })
                .await;
            let Some(f) = f else {
                continue;
            };
            if f[3] == "presence_state" {
                sync_state(&mut self.state, f[4].as_object().expect("state"));
            } else {
                apply_diff_payload(&mut self.state, &f[4]);
            }
        }
    }

    fn metas(&self, user: &str) -> Vec<Value> {
        self.state
            .get(user)
            .and_then(|p| p["metas"].as_array().cloned())
            .unwrap_or_default()
    }

    /// The presence diffs this client ever received on its topic.
    fn diffs(&self) -> Vec<&Value> {
        self.ws
            .seen
            .iter()
            .filter(|v| v[2] == self.topic.as_str() && v[3] == "presence_diff")
            .collect()
    }
}

/// `{user: [status, …sorted]}` of a room's here-now on a node.
async fn here_now(app: &TestApp, acc: &str, room: &str) -> BTreeMap<String, Vec<String>> {
    let (st, v) = app
        .get(
            &format!("/api/v1/accounts/{acc}/rooms/{room}/presence?limit=1000"),
            &app.admin_token,
        )
        .await;
    assert_eq!(st, 200, "{v}");
    let mut out = BTreeMap::new();
    for (u, p) in v["presences"].as_object().cloned().unwrap_or_default() {
        let mut st: Vec<String> = p["metas"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["status"].as_str().unwrap_or("").to_string())
            .collect();
        st.sort();
        out.insert(u, st);
    }
    out
}

#[actix_web::test]
async fn users_on_three_nodes_share_rooms_devices_updates_broadcasts_and_kicks() {
    let Some(cl) = Cluster::start() else { return };
    let a = cl.node("a", &FAST).await;
    let b = cl.node("b", &FAST).await;
    let c = cl.node("c", &FAST).await;
    let acc = a.create_account("acme").await;

    let mut obs = View::join(
        a.connect(&a.user_token(&acc, "watcher")).await,
        "room:lobby",
        json!({}),
    )
    .await;
    let phone = View::join(
        b.connect(&b.user_token(&acc, "ann")).await,
        "room:lobby",
        json!({"meta": {"device": "phone"}}),
    )
    .await;
    let mut laptop = View::join(
        c.connect(&c.user_token(&acc, "ann")).await,
        "room:lobby",
        json!({"meta": {"device": "laptop"}}),
    )
    .await;
    // Multi-device across nodes: one key, two metas, on every node.
    obs.until("ann's two devices on node a", |s| {
        s.get("ann")
            .and_then(|p| p["metas"].as_array().map(|m| m.len()))
            == Some(2)
    })
    .await;
    laptop
        .until("the watcher on a, seen from c", |s| {
            s.contains_key("watcher")
        })
        .await;
    // A dashboard following the account on node a sees every node's connections.
    let mut dash = View::join(
        a.connect(&a.admin_token).await,
        &format!("account:{}", acc.id),
        json!({}),
    )
    .await;
    dash.until("ann's two connections on the dashboard", |s| {
        s.get("ann")
            .and_then(|p| p["metas"].as_array().map(|m| m.len()))
            == Some(2)
    })
    .await;

    // An update on c is one swap on a: a join with phx_ref_prev and a leave, never a gap.
    let r = laptop
        .ws
        .push("1", "room:lobby", "status", json!({"status": "busy"}))
        .await;
    assert_eq!(laptop.ws.expect_reply(&r).await["status"], "ok");
    obs.until("ann busy on the laptop", |s| {
        s.get("ann").is_some_and(|p| {
            let m = p["metas"].as_array().unwrap();
            m.len() == 2 && m.iter().any(|m| m["status"] == "busy")
        })
    })
    .await;
    let swap = obs
        .diffs()
        .into_iter()
        .rev()
        .find(|d| d[4]["joins"].get("ann").is_some())
        .cloned()
        .expect("the update diff");
    assert!(
        swap[4]["joins"]["ann"]["metas"][0]["phx_ref_prev"].is_string(),
        "{swap}"
    );
    assert!(swap[4]["leaves"].get("ann").is_some(), "{swap}");

    // here-now and where-now on any node give the cluster view, with each session's node.
    for app in [&a, &b, &c] {
        let seen = here_now(app, &acc.id, "lobby").await;
        assert_eq!(
            seen.get("ann"),
            Some(&vec!["busy".to_string(), "online".to_string()]),
            "on {}",
            app.http
        );
        assert!(seen.contains_key("watcher"));
        // Each meta names the node its session is on, read from the room's mirror of the
        // other nodes' entries.
        let (_, v) = app
            .get(
                &format!("/api/v1/accounts/{}/rooms/lobby/presence", acc.id),
                &app.admin_token,
            )
            .await;
        let nodes = node_names(&v["presences"]["ann"]["metas"], &v);
        assert_eq!(
            nodes,
            BTreeSet::from(["b".to_string(), "c".to_string()]),
            "on {}: {v}",
            app.http
        );
    }
    let (st, wn) = a
        .get(
            &format!("/api/v1/accounts/{}/users/ann/presence", acc.id),
            &a.admin_token,
        )
        .await;
    assert_eq!(st, 200, "{wn}");
    let nodes = node_names(&wn["sessions"], &wn);
    assert_eq!(
        nodes,
        BTreeSet::from(["b".to_string(), "c".to_string()]),
        "{wn}"
    );
    let (_, acc_view) = b
        .get(
            &format!("/api/v1/accounts/{}/presence", acc.id),
            &b.admin_token,
        )
        .await;
    assert_eq!(acc_view["users"], 2, "{acc_view}");
    assert_eq!(acc_view["connections"], 3, "{acc_view}");

    // A broadcast from c reaches the members on a and b.
    let r = laptop
        .ws
        .push(
            "1",
            "room:lobby",
            "broadcast",
            json!({"event": "wave", "payload": {"n": 1}}),
        )
        .await;
    assert_eq!(laptop.ws.expect_reply(&r).await["status"], "ok");
    let mut phone = phone;
    for v in [&mut obs.ws, &mut phone.ws] {
        let got = v.expect("the broadcast", |f| f[3] == "wave").await;
        assert_eq!(got[4]["n"], 1);
    }

    // The phone leaves on b: ann stays, with the laptop only.
    let r = phone
        .ws
        .push("1", "room:lobby", "phx_leave", json!({}))
        .await;
    phone.ws.expect_reply(&r).await;
    obs.until("the phone gone, the laptop left", |s| {
        s.get("ann")
            .and_then(|p| p["metas"].as_array().map(|m| m.len()))
            == Some(1)
    })
    .await;
    assert_eq!(obs.metas("ann")[0]["status"], "busy");

    // A kick asked of node a closes the laptop's socket on node c.
    let laptop_session = wn["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["node"] == "c")
        .and_then(|s| s["session_id"].as_str())
        .unwrap()
        .to_string();
    let (st, body) = a
        .send(
            "DELETE",
            &format!("/api/v1/accounts/{}/sessions/{laptop_session}", acc.id),
            Some(&a.admin_token),
            "",
        )
        .await;
    assert_eq!(st, 202, "{body}");
    laptop.ws.expect_close().await;
    obs.until("ann gone after the kick", |s| !s.contains_key("ann"))
        .await;

    // The metrics tell the cluster's shape.
    assert_eq!(a.metric("presenced_cluster_nodes", "").await, 3.0);
    assert_eq!(a.metric("presenced_cluster_redis_up", "").await, 1.0);
    assert!(
        a.metric("presenced_cluster_deltas_received_total", "")
            .await
            > 0.0
    );
    let (st, ready) = c.get("/readyz", "").await;
    assert_eq!(st, 200, "{ready}");
    assert_eq!(ready["redis"]["status"], "up", "{ready}");
}

/// A cluster node as a child process, so it can be killed for real.
fn child_node(
    port: u16,
    name: &str,
    db: &std::path::Path,
    redis: &str,
    prefix: &str,
    t: &Timing,
) -> ChildNode {
    ChildNode::start(
        port,
        &[
            ("RUST_LOG", "warn,presenced::cluster=info".into()),
            ("PRESENCED__SERVER__WORKERS", "1".into()),
            (
                "DATABASE_URL",
                format!("sqlite://{}", db.join("cluster.db").display()),
            ),
            ("PRESENCED__DATABASE__POOL_SIZE", "2".into()),
            ("REDIS_URL", redis.into()),
            ("PRESENCED__REDIS__PREFIX", prefix.into()),
            ("PRESENCED__CLUSTER__NODE_ID", name.into()),
            ("PRESENCED__CLUSTER__NODE_TTL_MS", t.ttl_ms.to_string()),
            ("PRESENCED__CLUSTER__TICK_MS", "10".into()),
            ("PRESENCED__PRESENCE__GRACE_MS", t.grace_ms.to_string()),
            ("PRESENCED__PRESENCE__TIMEOUT_MS", "120000".into()),
            ("PRESENCED__PRESENCE__ARBITERS", "1".into()),
        ],
    )
}

fn leaves_with_reason<'a>(diffs: &[&'a Value], user: &str) -> Vec<&'a Value> {
    diffs
        .iter()
        .filter_map(|d| d[4]["leaves"].get(user))
        .flat_map(|p| p["metas"].as_array().into_iter().flatten())
        .collect()
}

#[actix_web::test]
async fn a_killed_nodes_users_leave_every_other_node_once_with_node_down() {
    let Some(cl) = Cluster::start() else { return };
    let a = cl.node("a", &FAST).await;
    let c = cl.node("c", &FAST).await;
    let acc = a.create_account("acme").await;
    let mut b = child_node(free_port(), "b", cl.db.path(), &cl.redis, &cl.prefix, &FAST);
    b.ready().await;

    let mut on_a = View::join(
        a.connect(&a.user_token(&acc, "wa")).await,
        "room:r",
        json!({}),
    )
    .await;
    let mut on_c = View::join(
        c.connect(&c.user_token(&acc, "wc")).await,
        "room:r",
        json!({}),
    )
    .await;
    let _bob = View::join(
        b.connect(&a.user_token(&acc, "bob")).await,
        "room:r",
        json!({}),
    )
    .await;
    on_a.until("bob from the child node", |s| s.contains_key("bob"))
        .await;
    on_c.until("bob from the child node", |s| s.contains_key("bob"))
        .await;

    let killed = Instant::now();
    b.kill9();
    on_a.until("bob gone after the kill", |s| !s.contains_key("bob"))
        .await;
    on_c.until("bob gone after the kill", |s| !s.contains_key("bob"))
        .await;
    // Measured, not asserted (timings are for benchmarks): the TTL bounds it by design.
    eprintln!(
        "node_down noticed {} ms after kill -9 (node_ttl_ms {})",
        killed.elapsed().as_millis(),
        FAST.ttl_ms
    );
    // Nothing more may come: wait past another check cycle, then count.
    actix_web::rt::time::sleep(Duration::from_millis(FAST.ttl_ms / 2)).await;
    let _ = on_a
        .ws
        .try_expect(Duration::from_millis(100), &|_| false)
        .await;
    let _ = on_c
        .ws
        .try_expect(Duration::from_millis(100), &|_| false)
        .await;
    for v in [&on_a, &on_c] {
        let diffs = v.diffs();
        let leaves = leaves_with_reason(&diffs, "bob");
        assert_eq!(leaves.len(), 1, "bob leaves exactly once: {diffs:?}");
        assert_eq!(leaves[0]["reason"], "node_down", "{:?}", leaves[0]);
    }
    for app in [&a, &c] {
        assert!(!here_now(app, &acc.id, "r").await.contains_key("bob"));
        let (_, v) = app
            .get(
                &format!("/api/v1/accounts/{}/presence", acc.id),
                &app.admin_token,
            )
            .await;
        assert!(v["presences"].get("bob").is_none(), "{v}");
    }
    assert_eq!(
        a.metric("presenced_cluster_nodes_down_total", "").await,
        1.0
    );
}

#[actix_web::test]
async fn a_node_restarted_within_its_lease_takes_its_users_back_without_a_flap() {
    let Some(cl) = Cluster::start() else { return };
    // A TTL and grace long enough to cover a child's restart on a busy machine.
    let slow = Timing {
        ttl_ms: 20_000,
        grace_ms: 15_000,
    };
    let a = cl.node("a", &slow).await;
    let acc = a.create_account("acme").await;
    let port = free_port();
    let mut b = child_node(port, "b", cl.db.path(), &cl.redis, &cl.prefix, &slow);
    b.ready().await;
    let mut on_a = View::join(
        a.connect(&a.user_token(&acc, "wa")).await,
        "room:r",
        json!({}),
    )
    .await;
    let bob = View::join(
        b.connect(&a.user_token(&acc, "bob")).await,
        "room:r",
        json!({"status": "busy", "meta": {"device": "d1"}}),
    )
    .await;
    on_a.until("bob from the child node", |s| s.contains_key("bob"))
        .await;
    let ref_before = on_a.metas("bob")[0]["phx_ref"].clone();
    // Everything node a's client hears from here on.
    let mark = on_a.ws.seen.len();

    b.kill9();
    drop(bob);
    let b = child_node(port, "b", cl.db.path(), &cl.redis, &cl.prefix, &slow);
    b.ready().await;
    // bob's device reconnects to the restarted node, as phoenix.js would.
    let bob = View::join(
        b.connect(&a.user_token(&acc, "bob")).await,
        "room:r",
        json!({"status": "busy", "meta": {"device": "d1"}}),
    )
    .await;
    assert!(
        bob.state.contains_key("wa"),
        "the restarted node sees node a's user"
    );
    // Past a few lease checks: node a never showed bob leaving, nor a second bob.
    actix_web::rt::time::sleep(Duration::from_millis(1_500)).await;
    let _ = on_a
        .ws
        .try_expect(Duration::from_millis(100), &|_| false)
        .await;
    let diffs: Vec<&Value> = on_a.ws.seen[mark..]
        .iter()
        .filter(|v| v[3] == "presence_diff")
        .collect();
    assert!(
        leaves_with_reason(&diffs, "bob").is_empty()
            && diffs.iter().all(|d| d[4]["joins"].get("bob").is_none()),
        "no leave/join flap for bob: {diffs:?}"
    );
    assert_eq!(on_a.metas("bob").len(), 1);
    assert_eq!(on_a.metas("bob")[0]["phx_ref"], ref_before);
}

#[actix_web::test]
async fn nodes_serve_alone_through_a_redis_outage_and_converge_when_it_returns() {
    let Some(cl) = Cluster::start() else { return };
    let proxy = Proxy::start(REDIS.to_string()).await;
    let via_proxy = format!("redis://127.0.0.1:{}/", proxy.port);
    let t = Timing {
        ttl_ms: 2_000,
        grace_ms: 300,
    };
    let a = cl.node("a", &t).await;
    let b = node("b", cl.db.path(), &via_proxy, &cl.prefix, &t).await;
    let acc = a.create_account("acme").await;
    let mut on_a = View::join(
        a.connect(&a.user_token(&acc, "wa")).await,
        "room:r",
        json!({}),
    )
    .await;
    let mut on_b = View::join(
        b.connect(&b.user_token(&acc, "wb")).await,
        "room:r",
        json!({}),
    )
    .await;
    on_a.until("wb", |s| s.contains_key("wb")).await;
    on_b.until("wa", |s| s.contains_key("wa")).await;

    // Redis goes away for node b, and with it b's keys (as a Redis restart would lose them).
    proxy.cut();
    eventually("node b to report Redis down", || async {
        let (st, v) = b.get("/readyz", "").await;
        (st == 503 && v["redis"]["status"] == "down").then_some(())
    })
    .await;
    let mut conn = redis::Client::open(cl.redis.as_str())
        .and_then(|c| c.get_connection())
        .expect("a direct Redis connection");
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:state:b", cl.prefix))
        .arg(format!("{}:lease:b", cl.prefix))
        .query(&mut conn)
        .expect("DEL");

    // Node b keeps serving its own presence: a newcomer on b is seen on b.
    let _late = View::join(
        b.connect(&b.user_token(&acc, "late")).await,
        "room:r",
        json!({}),
    )
    .await;
    on_b.until("the newcomer on b", |s| s.contains_key("late"))
        .await;
    // Past one TTL, each side drops the other's users (never zombies), with node_down.
    on_a.until("wb gone from a", |s| !s.contains_key("wb"))
        .await;
    on_b.until("wa gone from b", |s| !s.contains_key("wa"))
        .await;
    let diffs = on_a.diffs();
    assert_eq!(leaves_with_reason(&diffs, "wb")[0]["reason"], "node_down");

    // Redis returns: both nodes resync and converge, without restarts.
    proxy.restore();
    on_a.until("wb and the newcomer back on a", |s| {
        s.contains_key("wb") && s.contains_key("late")
    })
    .await;
    on_b.until("wa back on b", |s| s.contains_key("wa")).await;
    eventually("node b ready again", || async {
        let (st, _) = b.get("/readyz", "").await;
        (st == 200).then_some(())
    })
    .await;
    let (ha, hb) = (
        here_now(&a, &acc.id, "r").await,
        here_now(&b, &acc.id, "r").await,
    );
    assert_eq!(ha, hb);
    assert_eq!(
        ha.keys().cloned().collect::<Vec<_>>(),
        vec!["late", "wa", "wb"]
    );
}

/// Random operations by random users on random nodes: every node ends with the same presence,
/// and it is the presence the operations imply. The seed is printed (set CLUSTER_SEED to
/// replay one).
#[actix_web::test]
async fn random_operations_on_random_nodes_converge_to_the_same_presence_everywhere() {
    let Some(cl) = Cluster::start() else { return };
    let seed: u64 = std::env::var("CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("cluster convergence seed: {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let nodes = [
        cl.node("a", &FAST).await,
        cl.node("b", &FAST).await,
        cl.node("c", &FAST).await,
    ];
    let acc = nodes[0].create_account("acme").await;
    const ROOMS: [&str; 3] = ["r0", "r1", "r2"];
    const STATUSES: [&str; 3] = ["online", "away", "busy"];
    // A socket: (node, user, its joined rooms with status).
    struct Sock {
        ws: WsClient,
        user: String,
        rooms: BTreeMap<&'static str, &'static str>,
    }
    let mut socks: Vec<Sock> = Vec::new();
    for step in 0..60 {
        let op = rng.random_range(0..10);
        if socks.is_empty() || op < 3 {
            let n = rng.random_range(0..3);
            let user = format!("u{}", rng.random_range(0..6));
            let ws = nodes[n].connect(&nodes[n].user_token(&acc, &user)).await;
            socks.push(Sock {
                ws,
                user,
                rooms: BTreeMap::new(),
            });
            continue;
        }
        let i = rng.random_range(0..socks.len());
        let room = ROOMS[rng.random_range(0..ROOMS.len())];
        let topic = format!("room:{room}");
        let s = &mut socks[i];
        match (op, s.rooms.contains_key(room)) {
            (3..=5, false) => {
                s.ws.join_ok(&topic, json!({})).await;
                s.rooms.insert(room, "online");
            }
            (3..=6, true) => {
                let st = STATUSES[rng.random_range(0..STATUSES.len())];
                let r =
                    s.ws.push("1", &topic, "status", json!({"status": st}))
                        .await;
                assert_eq!(s.ws.expect_reply(&r).await["status"], "ok", "step {step}");
                s.rooms.insert(room, st);
            }
            (6..=7, false) => {}
            (7..=8, true) => {
                let r = s.ws.push("1", &topic, "phx_leave", json!({})).await;
                s.ws.expect_reply(&r).await;
                s.rooms.remove(room);
            }
            _ => {
                // Drop the socket (no leave): it goes after the grace window.
                let gone = socks.swap_remove(i);
                gone.ws.close().await;
            }
        }
    }
    // What the operations imply: per room, each user's statuses (one per joined socket).
    let mut want: BTreeMap<&str, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for s in &socks {
        for (room, st) in &s.rooms {
            want.entry(room)
                .or_default()
                .entry(s.user.clone())
                .or_default()
                .push(st.to_string());
        }
    }
    for users in want.values_mut() {
        for st in users.values_mut() {
            st.sort();
        }
    }
    for room in ROOMS {
        let expected = want.get(room).cloned().unwrap_or_default();
        for app in &nodes {
            let what = format!(
                "room {room} on {} to be {expected:?} (seed {seed})",
                app.http
            );
            eventually(&what, || {
                let (expected, id) = (expected.clone(), acc.id.clone());
                async move { (here_now(app, &id, room).await == expected).then_some(()) }
            })
            .await;
        }
    }
}

/// Redis loses every key of the cluster while the connections stay up (a FLUSHALL): each node
/// notices its lease gone at its next heartbeat and rewrites its state; nobody flaps.
#[actix_web::test]
async fn keys_lost_under_live_connections_are_rewritten_without_a_flap() {
    let Some(cl) = Cluster::start() else { return };
    let a = cl.node("a", &FAST).await;
    let b = cl.node("b", &FAST).await;
    let acc = a.create_account("acme").await;
    let mut on_a = View::join(
        a.connect(&a.user_token(&acc, "wa")).await,
        "room:r",
        json!({}),
    )
    .await;
    let mut on_b = View::join(
        b.connect(&b.user_token(&acc, "wb")).await,
        "room:r",
        json!({}),
    )
    .await;
    on_a.until("wb", |s| s.contains_key("wb")).await;
    on_b.until("wa", |s| s.contains_key("wa")).await;
    let marks = (on_a.ws.seen.len(), on_b.ws.seen.len());

    delete_keys(&cl.prefix);
    let client = redis::Client::open(cl.redis.as_str()).unwrap();
    eventually("both states rewritten", || {
        let client = client.clone();
        let prefix = cl.prefix.clone();
        async move {
            let mut c = client.get_connection().ok()?;
            let seqs: Vec<Option<String>> = ["a", "b"]
                .iter()
                .map(|n| {
                    redis::cmd("HGET")
                        .arg(format!("{prefix}:state:{n}"))
                        .arg("__seq")
                        .query(&mut c)
                        .ok()
                        .flatten()
                })
                .collect();
            seqs.iter().all(Option::is_some).then_some(())
        }
    })
    .await;
    // Past a TTL: long enough for any wrong node_down to have happened.
    actix_web::rt::time::sleep(Duration::from_millis(FAST.ttl_ms + 500)).await;
    let _ = on_a
        .ws
        .try_expect(Duration::from_millis(100), &|_| false)
        .await;
    let _ = on_b
        .ws
        .try_expect(Duration::from_millis(100), &|_| false)
        .await;
    for (v, mark) in [(&on_a, marks.0), (&on_b, marks.1)] {
        let diffs: Vec<&Value> = v.ws.seen[mark..]
            .iter()
            .filter(|f| f[3] == "presence_diff")
            .collect();
        assert!(diffs.is_empty(), "no flap: {diffs:?}");
    }
    assert_eq!(
        here_now(&a, &acc.id, "r").await,
        here_now(&b, &acc.id, "r").await
    );
    assert_eq!(
        a.metric("presenced_cluster_nodes_down_total", "").await,
        0.0
    );
}

/// The session ids of the account entries (end users' connections) in node `node`'s state hash.
fn account_entries(prefix: &str, node: &str) -> BTreeSet<String> {
    let client = redis::Client::open(format!("redis://{REDIS}/")).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}:state:{node}"))
        .query(&mut conn)
        .expect("HKEYS");
    fields
        .iter()
        .filter_map(|f| serde_json::from_str::<(String, Option<String>, String)>(f).ok())
        .filter(|(_, room, _)| room.is_none())
        .map(|(_, _, session)| session)
        .collect()
}

/// Node `node`'s `__seq`: it moves at every delta and every full state written.
fn state_seq(prefix: &str, node: &str) -> u64 {
    let client = redis::Client::open(format!("redis://{REDIS}/")).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let seq: Option<u64> = redis::cmd("HGET")
        .arg(format!("{prefix}:state:{node}"))
        .arg("__seq")
        .query(&mut conn)
        .expect("HGET");
    seq.unwrap_or(0)
}

/// Holds the thread of `account`'s actor on `app` for `for_` (chaos hook): it answers nothing
/// meanwhile, so a full state written then misses it.
async fn stall_account(app: &TestApp, account: &str, for_: Duration) {
    use presence_actors::registry::{DownKind, StallActor};
    let kind = DownKind::Account {
        account: account.into(),
    };
    let ok = app
        .state
        .registry
        .send(StallActor { kind, for_ })
        .await
        .expect("registry answers");
    assert!(ok, "the account's actor is live");
}

/// Long enough that a full state begun at the next heartbeat gives up on the account (it
/// waits 2 s for it) while the account is still stalled.
const STALL: Duration = Duration::from_secs(5);

/// Two nodes; a user on node a in a room, followed by a dashboard on node b.
struct UserOnA {
    a: TestApp,
    b: TestApp,
    acc: TestAccount,
    _wa: View,
    dash: View,
    /// The session of that user's account entry in node a's state hash.
    entries: BTreeSet<String>,
    // Last: its keys are deleted once the nodes are gone.
    cl: Cluster,
}

impl UserOnA {
    async fn start() -> Option<UserOnA> {
        let cl = Cluster::start()?;
        let a = cl.node("a", &FAST).await;
        let b = cl.node("b", &FAST).await;
        let acc = a.create_account("acme").await;
        let wa = View::join(
            a.connect(&a.user_token(&acc, "wa")).await,
            "room:r",
            json!({}),
        )
        .await;
        let mut dash = View::join(
            b.connect(&b.admin_token).await,
            &format!("account:{}", acc.id),
            json!({}),
        )
        .await;
        dash.until("wa on b's dashboard", |s| s.contains_key("wa"))
            .await;
        let entries = account_entries(&cl.prefix, "a");
        assert_eq!(entries.len(), 1, "wa's connection: {entries:?}");
        Some(UserOnA {
            a,
            b,
            acc,
            _wa: wa,
            dash,
            entries,
            cl,
        })
    }

    /// Until node a has written a full state that missed an actor.
    async fn partial_state_written(&self) {
        eventually("a full state that missed the account", || async {
            (self
                .a
                .metric("presenced_cluster_partial_states_total", "")
                .await
                >= 1.0)
                .then_some(())
        })
        .await;
    }

    async fn assert_wa_on_b(&self) {
        let (_, v) = self
            .b
            .get(
                &format!("/api/v1/accounts/{}/presence", self.acc.id),
                &self.b.admin_token,
            )
            .await;
        assert!(v["presences"].get("wa").is_some(), "{v}");
    }
}

/// A full state written while an account does not answer (here: its thread is stalled when
/// Redis loses the node's lease, so the node rewrites its state) keeps what the hash holds of
/// that account: no peer sees its users leave. Once it answers, the whole state is written
/// again.
#[actix_web::test]
async fn a_full_state_written_while_an_account_is_stuck_keeps_its_users() {
    let Some(mut t) = UserOnA::start().await else {
        return;
    };
    let mark = t.dash.ws.seen.len();
    let seq = state_seq(&t.cl.prefix, "a");

    stall_account(&t.a, &t.acc.id, STALL).await;
    let client = redis::Client::open(t.cl.redis.as_str()).unwrap();
    let mut conn = client.get_connection().unwrap();
    let _: () = redis::cmd("DEL")
        .arg(format!("{}:lease:a", t.cl.prefix))
        .query(&mut conn)
        .unwrap();
    t.partial_state_written().await;
    assert_eq!(
        account_entries(&t.cl.prefix, "a"),
        t.entries,
        "the stuck account's entry stays in the hash"
    );

    // Once the account answers again, the whole state is written again: more states written
    // than partial ones (nothing changes, so no delta moves the sequence).
    eventually("the whole state written again", || async {
        let writes = state_seq(&t.cl.prefix, "a") - seq;
        let partial =
            t.a.metric("presenced_cluster_partial_states_total", "")
                .await;
        (writes as f64 > partial).then_some(())
    })
    .await;
    assert_eq!(account_entries(&t.cl.prefix, "a"), t.entries);
    let _ = t
        .dash
        .ws
        .try_expect(Duration::from_millis(200), &|_| false)
        .await;
    let diffs: Vec<&Value> = t.dash.ws.seen[mark..]
        .iter()
        .filter(|f| f[3] == "presence_diff")
        .collect();
    assert!(diffs.is_empty(), "no flap on b: {diffs:?}");
    t.assert_wa_on_b().await;
}

/// When Redis has lost the node's state and an account does not answer for the new one, that
/// account's users are missing from it (nothing is left to keep); they come back, on every
/// peer, as soon as the account answers, without any of them doing anything.
#[actix_web::test]
async fn an_account_missing_from_a_rewritten_state_comes_back_once_it_answers() {
    let Some(mut t) = UserOnA::start().await else {
        return;
    };
    stall_account(&t.a, &t.acc.id, STALL).await;
    delete_keys(&t.cl.prefix);
    t.partial_state_written().await;
    eventually("wa's entry back in a's state", || async {
        (account_entries(&t.cl.prefix, "a") == t.entries).then_some(())
    })
    .await;
    t.dash
        .until("wa on b's dashboard", |s| s.contains_key("wa"))
        .await;
    t.assert_wa_on_b().await;
}

/// The `node` of each entry of a JSON array (metas or sessions); `whole` is the response, shown
/// when the array is missing or an entry has no node.
fn node_names(list: &Value, whole: &Value) -> BTreeSet<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("no list in {whole}"))
        .iter()
        .map(|e| {
            e["node"]
                .as_str()
                .unwrap_or_else(|| panic!("an entry without a node in {whole}"))
                .to_string()
        })
        .collect()
}
