//! The WebSocket engine end to end: presence semantics, supervision, bad input, back-pressure,
//! shutdown.

use serde_json::json;

use crate::helpers::*;

#[actix_web::test]
async fn a_room_member_sees_joins_status_updates_and_leaves_of_another() {
    member_sees_joins_status_updates_and_leaves(&spawn_app().await).await;
}

/// Rooms on the socket threads (`presence.room_threads = "sockets"`): the same presence, with
/// the members spread over both socket threads, and the same rebuild after a crash.
#[actix_web::test]
async fn with_rooms_on_the_socket_threads_presence_and_supervision_work_the_same() {
    let app = spawn_app_with(|s| s.presence.room_threads = RoomThreads::Sockets).await;
    member_sees_joins_status_updates_and_leaves(&app).await;
    crashed_room_is_rebuilt_without_any_leave(&app).await;
}

async fn member_sees_joins_status_updates_and_leaves(app: &TestApp) {
    let acc = app.create_account("Acme").await;
    let mut a = app.connect(&app.user_token(&acc, "ann")).await;
    let state = a.join_ok("room:lobby", json!({"status": "online"})).await;
    assert!(state["ann"]["metas"][0]["phx_ref"].is_string());

    let mut b = app.connect(&app.user_token(&acc, "bob")).await;
    b.join_ok(
        "room:lobby",
        json!({"status": "busy", "meta": {"device": "phone"}}),
    )
    .await;
    let d = a.expect("bob's join", is_diff("room:lobby")).await;
    assert_eq!(joins_of(&d), vec!["bob"]);
    assert_eq!(d[4]["joins"]["bob"]["metas"][0]["status"], "busy");
    assert_eq!(d[4]["joins"]["bob"]["metas"][0]["device"], "phone");

    let r = b
        .push("1", "room:lobby", "status", json!({"status": "away"}))
        .await;
    assert_eq!(b.expect_reply(&r).await["status"], "ok");
    let d = a.expect("bob's update", is_diff("room:lobby")).await;
    assert_eq!(joins_of(&d), vec!["bob"]);
    assert_eq!(leaves_of(&d), vec!["bob"]);
    let prev = d[4]["joins"]["bob"]["metas"][0]["phx_ref_prev"].clone();
    assert_eq!(prev, d[4]["leaves"]["bob"]["metas"][0]["phx_ref"]);

    let r = b.push("1", "room:lobby", "phx_leave", json!({})).await;
    assert_eq!(b.expect_reply(&r).await["status"], "ok");
    let d = a.expect("bob's leave", is_diff("room:lobby")).await;
    assert_eq!(leaves_of(&d), vec!["bob"]);
    assert!(joins_of(&d).is_empty());
}

use presence_actors::registry::{CrashActor, DownKind};
use presenced::config::RoomThreads;

async fn crash(app: &TestApp, kind: DownKind) {
    let ok = app
        .state
        .registry
        .send(CrashActor { kind })
        .await
        .expect("registry answers");
    assert!(ok, "the actor to crash is live");
}

#[actix_web::test]
async fn a_room_actor_that_crashes_is_rebuilt_from_live_sessions_without_any_leave() {
    crashed_room_is_rebuilt_without_any_leave(&spawn_app().await).await;
}

async fn crashed_room_is_rebuilt_without_any_leave(app: &TestApp) {
    let acc = app.create_account("Ops").await;
    let mut a = app.connect(&app.user_token(&acc, "ann")).await;
    a.join_ok("room:ops", json!({"status": "online"})).await;
    let mut b = app.connect(&app.user_token(&acc, "bob")).await;
    b.join_ok("room:ops", json!({"status": "busy"})).await;
    a.expect("bob's join", is_diff("room:ops")).await;

    crash(
        app,
        DownKind::Room {
            account: acc.id.as_str().into(),
            room: "ops".into(),
        },
    )
    .await;

    // Here-now never sees the room empty, however soon it asks: while the new room waits
    // for its sessions' reports, the request waits for the rebuilt room.
    let here_now = format!("/api/v1/accounts/{}/rooms/ops/presence", acc.id);
    for _ in 0..20 {
        let (status, v) = app.get(&here_now, &app.admin_token).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["users"], 2, "{v}");
    }

    // The rebuilt room re-sends its state: the same two members with the same refs.
    for c in [&mut a, &mut b] {
        let st = c
            .expect("presence_state after the restart", |v| {
                v[2] == "room:ops" && v[3] == "presence_state"
            })
            .await;
        let mut users: Vec<&String> = st[4].as_object().unwrap().keys().collect();
        users.sort();
        assert_eq!(users, vec!["ann", "bob"]);
    }
    assert_eq!(
        app.metric("presenced_actor_restarts_total", "room").await,
        1.0
    );

    // The new room works: a status change and a newcomer reach everyone, as one diff each.
    let r = b
        .push("1", "room:ops", "status", json!({"status": "away"}))
        .await;
    assert_eq!(b.expect_reply(&r).await["status"], "ok");
    let d = a.expect("bob's update", is_diff("room:ops")).await;
    assert_eq!(d[4]["joins"]["bob"]["metas"][0]["status"], "away");
    let mut c = app.connect(&app.user_token(&acc, "cat")).await;
    let st = c.join_ok("room:ops", json!({})).await;
    assert_eq!(st.as_object().unwrap().len(), 3);
    let d = a.expect("cat's join", is_diff("room:ops")).await;
    assert_eq!(joins_of(&d), vec!["cat"]);

    // Nobody was dropped and nobody ever saw a leave.
    for cl in [&a, &b] {
        assert!(cl.closed.is_none(), "a session was dropped by the crash");
        assert!(
            !cl.seen.iter().any(|v| v[3] == "presence_diff"
                && !leaves_of(v).is_empty()
                && v[4]["joins"].as_object().is_none_or(|j| j.is_empty())),
            "a leave-only diff was sent: {:?}",
            cl.seen
        );
    }
}

#[actix_web::test]
async fn an_account_actor_that_crashes_is_rebuilt_and_dashboards_keep_following() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let topic = format!("account:{}", acc.id);
    let mut dash = app.connect(&app.admin_token).await;
    dash.join_ok(&topic, json!({})).await;
    let mut a = app.connect(&app.user_token(&acc, "ann")).await;
    a.join_ok("room:x", json!({})).await;
    dash.expect("ann's connection", is_diff(&topic)).await;

    crash(
        &app,
        DownKind::Account {
            account: acc.id.as_str().into(),
        },
    )
    .await;
    let st = dash
        .expect("account presence_state after the restart", |v| {
            v[2] == topic.as_str() && v[3] == "presence_state"
        })
        .await;
    assert!(st[4]["ann"]["metas"].is_array(), "{st}");
    let (status, v) = app
        .get(
            &format!("/api/v1/accounts/{}/users/ann/presence", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["online"], true);
    assert_eq!(v["rooms"], json!(["x"]), "{v}");

    // Still live: a new connection reaches the dashboard.
    let mut b = app.connect(&app.user_token(&acc, "bob")).await;
    b.join_ok("room:x", json!({})).await;
    let d = dash.expect("bob's connection", is_diff(&topic)).await;
    assert_eq!(joins_of(&d), vec!["bob"]);
    assert!(a.closed.is_none());
}

#[actix_web::test]
async fn ten_thousand_joins_on_one_socket_get_errors_then_the_abuser_is_closed_and_the_node_stays_up(
) {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let mut abuser = app.connect(&app.user_token(&acc, "mallory")).await;
    for i in 0..10_000 {
        let f = json!([
            i.to_string(),
            i.to_string(),
            format!("room:r{i}"),
            "phx_join",
            {}
        ]);
        if abuser.framed_send(f.to_string()).await.is_err() {
            break;
        }
    }
    let refused = abuser
        .expect("a too_many_joins reply", |v| {
            v[3] == "phx_reply" && v[4]["response"]["reason"] == "too_many_joins"
        })
        .await;
    assert_eq!(refused[4]["status"], "error");
    let reason = abuser.expect_close().await.expect("a close reason");
    assert_eq!(reason.description.as_deref(), Some("too_many_errors"));
    assert_eq!(u16::from(reason.code), 1008);

    // The node is fine and serves others.
    let (status, _) = app.get("/healthz", "").await;
    assert_eq!(status, 200);
    let mut ok = app.connect(&app.user_token(&acc, "ann")).await;
    ok.join_ok("room:r1", json!({})).await;
}

#[actix_web::test]
async fn a_lone_surrogate_in_a_frame_is_a_malformed_frame_and_the_socket_stays_usable() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let mut c = app.connect(&app.user_token(&acc, "ann")).await;
    c.send_text(r#"["1","1","room:\ud800x","phx_join",{}]"#.into())
        .await;
    // The frame is not valid JSON at all, so nothing of it can be echoed.
    let v = c
        .expect("malformed_frame", |v| {
            v[2] == "phoenix" && v[3] == "phx_reply"
        })
        .await;
    assert_eq!(v[4]["response"]["reason"], "malformed_frame");
    c.join_ok("room:fine", json!({})).await;
}

#[actix_web::test]
async fn invalid_utf8_in_a_text_frame_closes_only_that_socket() {
    use std::io::Read;
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let token = app.user_token(&acc, "ann");
    let port = app.port;
    // A raw client: the WebSocket handshake by hand, then a masked text frame of invalid UTF-8.
    let closed = actix_web::rt::task::spawn_blocking(move || {
        let mut s = raw::connect(port);
        std::io::Write::write_all(&mut s, raw::handshake(&token).as_bytes()).unwrap();
        let head = raw::read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw::send_text_bytes(&mut s, &[0xff, 0xfe, 0xfd]);
        // The server closes this socket (a close frame, then EOF).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        rest.first().map(|b| b & 0x0f) == Some(0x8) || rest.is_empty()
    })
    .await
    .unwrap();
    assert!(closed);
    let (status, _) = app.get("/healthz", "").await;
    assert_eq!(status, 200);
    let mut other = app.connect(&app.user_token(&acc, "bob")).await;
    other.join_ok("room:a", json!({})).await;
}

#[actix_web::test]
async fn a_subscriber_that_stops_reading_is_cut_off_and_the_room_goes_on() {
    let app = spawn_app_with(|s| {
        s.limits.max_outbound = 8;
        s.limits.max_frame_bytes = 64 * 1024;
    })
    .await;
    let acc = app.create_account("Acme").await;
    let mut slow = app.connect(&app.user_token(&acc, "slow")).await;
    slow.join_ok("room:flood", json!({})).await;
    let mut fast = app.connect(&app.user_token(&acc, "fast")).await;
    fast.join_ok("room:flood", json!({})).await;
    let mut talker = app.connect(&app.user_token(&acc, "talker")).await;
    talker.join_ok("room:flood", json!({})).await;

    // `slow` never reads again. The talker floods the room with 32 KiB broadcasts until the
    // room gives up on it; kernel buffers absorb a few MB first.
    let blob = "x".repeat(32 * 1024);
    let mut cut = false;
    for i in 0..2_000 {
        let r = talker
            .push(
                "1",
                "room:flood",
                "broadcast",
                json!({"event": "blob", "payload": blob}),
            )
            .await;
        assert_eq!(talker.expect_reply(&r).await["status"], "ok");
        // `fast` keeps up: it drains what it gets.
        while fast
            .try_expect(std::time::Duration::from_millis(5), &|v| v[3] == "blob")
            .await
            .is_some()
        {}
        if i % 50 == 49
            && app
                .metric("presenced_outbound_drops_total", "slow_consumer")
                .await
                >= 1.0
        {
            cut = true;
            break;
        }
    }
    assert!(cut, "the slow subscriber was never cut off");
    // The room saw `slow` go (after grace) and the others are still served.
    let d = fast
        .expect("slow's leave", |v| {
            v[3] == "presence_diff" && leaves_of(v).contains(&"slow".to_string())
        })
        .await;
    assert!(joins_of(&d).is_empty());
    let r = talker
        .push(
            "1",
            "room:flood",
            "broadcast",
            json!({"event": "after", "payload": 1}),
        )
        .await;
    assert_eq!(talker.expect_reply(&r).await["status"], "ok");
    fast.expect("a broadcast after the cut", |v| v[3] == "after")
        .await;
}

#[actix_web::test]
async fn shutdown_closes_every_socket_with_1001_and_stops_the_server() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let mut a = app.connect(&app.user_token(&acc, "ann")).await;
    a.join_ok("room:x", json!({})).await;
    let mut dash = app.connect(&app.admin_token).await;
    dash.join_ok(&format!("account:{}", acc.id), json!({}))
        .await;
    let stop = actix_web::rt::spawn(presenced::app::shutdown(
        app.handle.clone(),
        app.state.clone(),
    ));
    for c in [&mut a, &mut dash] {
        let reason = c.expect_close().await.expect("close reason");
        assert_eq!(u16::from(reason.code), 1001);
        assert_eq!(reason.description.as_deref(), Some("server_shutdown"));
    }
    stop.await.unwrap();
    assert!(WsClient::connect(&format!("{}&token=x", app.ws))
        .await
        .is_err());
}

#[actix_web::test]
async fn an_account_past_its_room_limit_gets_room_limit_and_a_full_room_gets_room_full() {
    let app = spawn_app_with(|s| {
        s.limits.max_rooms_per_account = 2;
        s.limits.max_room_members = 2;
    })
    .await;
    let acc = app.create_account("Acme").await;
    let mut a = app.connect(&app.user_token(&acc, "ann")).await;
    a.join_ok("room:one", json!({})).await;
    a.join_ok("room:two", json!({})).await;
    let reply = a.join("room:three", json!({})).await;
    assert_eq!(reply["status"], "error");
    assert_eq!(reply["response"]["reason"], "room_limit");

    let mut b = app.connect(&app.user_token(&acc, "bob")).await;
    b.join_ok("room:one", json!({})).await;
    let mut c = app.connect(&app.user_token(&acc, "cat")).await;
    let reply = c.join("room:one", json!({})).await;
    assert_eq!(reply["response"]["reason"], "room_full");
    // the socket stays usable and another account is not affected by this one's limit
    c.join_ok("room:two", json!({})).await;
    let other = app.create_account("Other").await;
    let mut d = app.connect(&app.user_token(&other, "dan")).await;
    d.join_ok("room:three", json!({})).await;
}

#[actix_web::test]
async fn dashboards_learn_which_rooms_each_user_is_in_live() {
    let app = spawn_app().await;
    let acc = app.create_account("Rooms").await;
    let topic = format!("account:{}", acc.id);
    let mut ann = app.connect(&app.user_token(&acc, "ann")).await;
    ann.join_ok("room:hall", json!({})).await;
    let mut dash = app.connect(&app.admin_token).await;
    dash.join_ok(&topic, json!({})).await;
    // Right after the presence_state: every present user's rooms.
    let state = dash
        .expect("rooms_state", |v| {
            v[2] == topic.as_str() && v[3] == "rooms_state"
        })
        .await;
    assert_eq!(state[4], json!({"ann": ["hall"]}), "{state}");
    // Then each change of a user's rooms.
    ann.join_ok("room:kitchen", json!({})).await;
    let v = dash
        .expect("ann in two rooms", |v| {
            v[3] == "rooms" && v[4]["user"] == "ann" && v[4]["rooms"].as_array().unwrap().len() == 2
        })
        .await;
    assert_eq!(v[4]["rooms"], json!(["hall", "kitchen"]), "{v}");
    let r = ann.push("1", "room:hall", "phx_leave", json!({})).await;
    ann.expect_reply(&r).await;
    dash.expect("ann in the kitchen only", |v| {
        v[3] == "rooms" && v[4]["user"] == "ann" && v[4]["rooms"] == json!(["kitchen"])
    })
    .await;
}

/// Dropped sessions leave one by one, each when its own grace runs out, from the room and the
/// account alike (one expiry timer per actor, re-armed for the next ghost); a device that comes
/// back in time never leaves.
#[actix_web::test]
async fn ghosts_leave_in_order_at_their_own_deadlines_and_a_reclaimed_one_never_leaves() {
    let app = spawn_app_with(|s| s.presence.grace_ms = 3_000).await;
    let acc = app.create_account("Ghosts").await;
    let topic = "room:lobby";
    let on = |d: &str| json!({"status": "online", "meta": {"device": d}});
    let mut obs = app.connect(&app.user_token(&acc, "obs")).await;
    obs.join_ok(topic, on("tab")).await;
    let mut socks = Vec::new();
    for u in ["ann", "bob", "cid"] {
        let mut c = app.connect(&app.user_token(&acc, u)).await;
        c.join_ok(topic, on("phone")).await;
        obs.expect(&format!("{u} joins"), |v| {
            is_diff(topic)(v) && joins_of(v).contains(&u.to_string())
        })
        .await;
        socks.push(c);
    }
    let pause = || actix_web::rt::time::sleep(std::time::Duration::from_millis(400));
    let mut socks = socks.into_iter();
    socks.next().unwrap().close().await; // ann drops first
    pause().await;
    socks.next().unwrap().close().await; // then bob
    pause().await;
    socks.next().unwrap().close().await; // then cid
    let mut bob = app.connect(&app.user_token(&acc, "bob")).await;
    let state = bob.join_ok(topic, on("phone")).await;
    assert!(
        state["bob"]["metas"].is_array(),
        "bob reclaims his ghost: {state}"
    );

    let first = obs
        .expect("a leave", |v| is_diff(topic)(v) && !leaves_of(v).is_empty())
        .await;
    assert_eq!(leaves_of(&first), vec!["ann"], "{first}");
    let second = obs
        .expect("another leave", |v| {
            is_diff(topic)(v) && !leaves_of(v).is_empty()
        })
        .await;
    assert_eq!(leaves_of(&second), vec!["cid"], "{second}");
    // bob came back in time: nothing about him, ever.
    let _ = obs
        .try_expect(std::time::Duration::from_millis(2_000), &|_| false)
        .await;
    let about_bob = obs
        .seen
        .iter()
        .filter(|v| is_diff(topic)(v))
        .filter(|v| leaves_of(v).contains(&"bob".to_string()))
        .count();
    assert_eq!(about_bob, 0, "bob never leaves");

    // The account's connections went the same way.
    let path = format!("/api/v1/accounts/{}/presence", acc.id);
    let (status, v) = app.get(&path, &app.admin_token).await;
    assert_eq!(status, 200, "{v}");
    let mut users: Vec<&str> = v["presences"]
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    users.sort();
    assert_eq!(users, vec!["bob", "obs"], "{v}");
}

/// A raw client's side of the socket tests below: the handshake written by hand, masked text
/// frames out, the server's frames read back.
mod raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub fn handshake(token: &str) -> String {
        format!(
            "GET /socket/websocket?vsn=2.0.0&token={token} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
    }

    /// Reads one HTTP response head (and its `Content-Length` body); returns the head.
    pub fn read_response(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") {
            assert_eq!(
                s.read(&mut byte).unwrap(),
                1,
                "closed inside a response head"
            );
            buf.push(byte[0]);
        }
        let head = String::from_utf8(buf).unwrap();
        let mut body = vec![0u8; crate::helpers::content_length(&head)];
        s.read_exact(&mut body).unwrap();
        head
    }

    /// A final, masked text frame of any bytes (valid UTF-8 or not), shorter than 126.
    pub fn send_text_bytes(s: &mut TcpStream, payload: &[u8]) {
        assert!(payload.len() < 126);
        let mask = [7u8, 1, 9, 3];
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        s.write_all(&frame).unwrap();
    }

    pub fn send_text(s: &mut TcpStream, text: &str) {
        send_text_bytes(s, text.as_bytes());
    }

    /// The next text frame from the server.
    pub fn read_text(s: &mut TcpStream) -> serde_json::Value {
        let mut h = [0u8; 2];
        s.read_exact(&mut h).unwrap();
        assert_eq!(h[0], 0x81, "a final text frame");
        let len = match h[1] & 0x7f {
            126 => {
                let mut l = [0u8; 2];
                s.read_exact(&mut l).unwrap();
                u16::from_be_bytes(l) as usize
            }
            127 => {
                let mut l = [0u8; 8];
                s.read_exact(&mut l).unwrap();
                u64::from_be_bytes(l) as usize
            }
            n => n as usize,
        };
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        serde_json::from_slice(&payload).unwrap()
    }

    /// A heartbeat, answered: the session is live.
    pub fn heartbeat(s: &mut TcpStream) {
        send_text(s, r#"[null,"7","phoenix","heartbeat",{}]"#);
        let reply = read_text(s);
        assert_eq!(reply[1], "7", "{reply}");
        assert_eq!(reply[4]["status"], "ok", "{reply}");
    }

    pub fn connect(port: u16) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        s
    }
}

/// The server looks at a new connection's first request line to decide which thread serves
/// it; a client that sends that line in pieces must be upgraded all the same.
#[actix_web::test]
async fn a_socket_whose_request_line_comes_byte_by_byte_is_upgraded() {
    use std::io::Write;
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let token = app.user_token(&acc, "ann");
    let port = app.port;
    actix_web::rt::task::spawn_blocking(move || {
        let mut s = raw::connect(port);
        s.set_nodelay(true).unwrap();
        let hello = raw::handshake(&token);
        for b in hello.as_bytes().iter().take(40) {
            s.write_all(&[*b]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
        s.write_all(&hello.as_bytes()[40..]).unwrap();
        let head = raw::read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw::heartbeat(&mut s);
    })
    .await
    .unwrap();
    // And one that only asks for the health check, in pieces too, gets its answer.
    actix_web::rt::task::spawn_blocking(move || {
        let mut s = raw::connect(port);
        s.set_nodelay(true).unwrap();
        for part in ["GE", "T /he", "althz HTTP/1.1\r\nHost: x\r\n\r\n"] {
            s.write_all(part.as_bytes()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let head = raw::read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    })
    .await
    .unwrap();
}

/// A socket opened on a kept-alive connection that first made API calls is served where that
/// connection already is, and works like any other.
#[actix_web::test]
async fn a_socket_upgraded_on_a_kept_alive_connection_after_api_calls_works() {
    use std::io::Write;
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let token = app.user_token(&acc, "ann");
    let port = app.port;
    let open = actix_web::rt::task::spawn_blocking(move || {
        let mut s = raw::connect(port);
        for _ in 0..2 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let head = raw::read_response(&mut s);
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        }
        s.write_all(raw::handshake(&token).as_bytes()).unwrap();
        let head = raw::read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw::heartbeat(&mut s);
        raw::send_text(
            &mut s,
            r#"["1","1","room:lobby","phx_join",{"status":"online"}]"#,
        );
        let reply = raw::read_text(&mut s);
        assert_eq!(reply[4]["status"], "ok", "{reply}");
        s
    })
    .await
    .unwrap();
    // Joined for the API too, while the socket is still open.
    let (status, body) = app
        .get(
            &format!("/api/v1/accounts/{}/rooms/lobby/presence", acc.id),
            &app.admin_token,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["presences"]["ann"]["metas"][0]["status"], "online",
        "{body}"
    );
    drop(open);
}

#[actix_web::test]
async fn the_connections_of_each_socket_thread_are_in_the_metrics() {
    let app = spawn_app().await;
    let acc = app.create_account("Acme").await;
    let gauge = "presenced_socket_thread_connections";
    let ann = app.connect(&app.user_token(&acc, "ann")).await;
    let bob = app.connect(&app.user_token(&acc, "bob")).await;
    // The test node runs two socket threads; each took one socket (the least loaded gets it).
    eventually("two sockets counted", || async {
        let (t0, t1) = (
            app.metric(gauge, "thread=\"0\"").await,
            app.metric(gauge, "thread=\"1\"").await,
        );
        (t0 == 1.0 && t1 == 1.0).then_some(())
    })
    .await;
    ann.close().await;
    eventually("the closed socket uncounted", || async {
        (app.metric(gauge, "").await == 1.0).then_some(())
    })
    .await;
    drop(bob);
}
