//! presenced-floor: the floor under presenced's figures. A minimal WebSocket broadcast server on
//! tokio + tokio-tungstenite with no actors and no presence logic, speaking just enough Phoenix
//! Channels V2 for the load generator's `connect` and `fanout` scenarios:
//!
//! - `GET /socket/websocket?...` (or `/api/v1/realtime/websocket`) upgrades; tokens are not
//!   checked. The user id shown in diffs is the token's `sub` claim, read without verifying
//!   (else `anon-<n>`). Subprotocol `phoenix` is selected when offered.
//! - `phx_join` → `phx_reply ok` and an empty `presence_state`; `phx_leave` and `heartbeat` →
//!   `phx_reply ok`.
//! - `status` → a `presence_diff`-shaped frame (one join carrying the push's `status` and `meta`,
//!   no leaves) to every member of the topic, the sender included, as presenced does;
//!   `broadcast` (`{event, payload, self?}`) → `[null,null,topic,event,payload]` to the others.
//!   The frame is encoded once into a reference-counted `Utf8Bytes` (tungstenite's text
//!   payload, a `bytes::Bytes`), so every member gets a pointer copy, not a byte copy.
//! - Each connection has one bounded queue (`--outbound`, 256 like presenced's mailbox); a full
//!   queue cuts the connection off as a slow consumer, as presenced does.
//! - Plain HTTP, so a load generator can run its usual set-up against it: `POST
//!   /api/v1/auth/login` and `POST /api/v1/accounts` answer minimal fake JSON (any credentials),
//!   `/healthz` and `/readyz` answer ok, `/metrics` a few counters.
//!
//! Nothing of presenced is linked in: this is what the machine does with sockets alone.
//!
//! Usage: `presenced-floor [--bind 127.0.0.1:4100] [--threads N] [--outbound 256]`

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

const USAGE: &str = "\
presenced-floor: a minimal Phoenix V2 WebSocket broadcast server (no actors, no presence), the
baseline that presenced's load figures are compared with.

USAGE: presenced-floor [OPTIONS]

OPTIONS:
  --bind ADDR       listen address (default 127.0.0.1:4100; port 0 picks one)
  --threads N       tokio worker threads (default: the number of CPUs)
  --outbound N      frames queued per connection before it is cut off (default 256)
  -h, --help        this text

Prints `presenced-floor listening on ADDR` on stdout once it accepts connections.";

struct Opts {
    bind: String,
    threads: usize,
    outbound: usize,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        bind: "127.0.0.1:4100".into(),
        threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        outbound: 256,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            "--bind" => o.bind = value()?,
            "--threads" => {
                o.threads = value()?
                    .parse()
                    .map_err(|_| "--threads: a number".to_string())?
            }
            "--outbound" => {
                o.outbound = value()?
                    .parse()
                    .map_err(|_| "--outbound: a number".to_string())?
            }
            _ => return Err(format!("unknown argument {a}\n\n{USAGE}")),
        }
    }
    if o.threads == 0 || o.outbound == 0 {
        return Err("--threads and --outbound must be at least 1".into());
    }
    Ok(o)
}

struct Member {
    tx: mpsc::Sender<Utf8Bytes>,
    kill: Arc<Notify>,
}

#[derive(Default)]
struct Topic {
    members: Mutex<HashMap<u64, Member>>,
}

#[derive(Default)]
struct Stats {
    connections: AtomicI64,
    deliveries: AtomicU64,
    slow_consumers: AtomicU64,
    pushes: AtomicU64,
}

struct State {
    topics: RwLock<HashMap<Arc<str>, Arc<Topic>>>,
    next_conn: AtomicU64,
    next_account: AtomicU64,
    outbound: usize,
    stats: Stats,
}

impl State {
    /// Adds `conn` to topic `name` (made if needed). Done under the directory's lock, so a
    /// concurrent last leave cannot drop the topic between the lookup and the insert.
    fn join(&self, name: &str, conn: u64, member: Member) -> Arc<Topic> {
        {
            let all = self.topics.read().expect("lock");
            if let Some(t) = all.get(name) {
                t.members.lock().expect("lock").insert(conn, member);
                return t.clone();
            }
        }
        let mut all = self.topics.write().expect("lock");
        let t = all.entry(name.into()).or_default().clone();
        t.members.lock().expect("lock").insert(conn, member);
        t
    }

    fn leave(&self, name: &str, topic: &Topic, conn: u64) {
        let empty = {
            let mut m = topic.members.lock().expect("lock");
            m.remove(&conn);
            m.is_empty()
        };
        if empty {
            let mut all = self.topics.write().expect("lock");
            // Someone may have joined since: drop the topic only if it is still empty.
            if all
                .get(name)
                .is_some_and(|t| t.members.lock().expect("lock").is_empty())
            {
                all.remove(name);
            }
        }
    }

    /// One frame to every member but `except`; members whose queue is full are cut off.
    fn fanout(&self, topic: &Topic, frame: &Utf8Bytes, except: Option<u64>) {
        let mut members = topic.members.lock().expect("lock");
        let mut gone = Vec::new();
        let mut sent = 0u64;
        for (id, m) in members.iter() {
            if Some(*id) == except {
                continue;
            }
            match m.tx.try_send(frame.clone()) {
                Ok(()) => sent += 1,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    m.kill.notify_one();
                    self.stats.slow_consumers.fetch_add(1, Ordering::Relaxed);
                    gone.push(*id);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => gone.push(*id),
            }
        }
        for id in gone {
            members.remove(&id);
        }
        self.stats.deliveries.fetch_add(sent, Ordering::Relaxed);
    }
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.threads)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run(opts));
}

async fn run(opts: Opts) {
    let listener = match TcpListener::bind(&opts.bind).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("presenced-floor: cannot bind {}: {e}", opts.bind);
            std::process::exit(1);
        }
    };
    let addr = listener.local_addr().expect("local addr");
    println!("presenced-floor listening on {addr}");
    let state = Arc::new(State {
        topics: RwLock::default(),
        next_conn: AtomicU64::new(1),
        next_account: AtomicU64::new(1),
        outbound: opts.outbound,
        stats: Stats::default(),
    });
    tokio::spawn(report(state.clone()));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    serve(stream, state).await;
                });
            }
            Err(e) => {
                // Out of file descriptors, most likely: wait instead of spinning.
                eprintln!("presenced-floor: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A line on stderr every 10 s while anything moves.
async fn report(state: Arc<State>) {
    let mut last = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let s = &state.stats;
        let now = (
            s.deliveries.load(Ordering::Relaxed),
            s.pushes.load(Ordering::Relaxed),
        );
        if now != last {
            eprintln!(
                "presenced-floor: {} connections, {} pushes, {} deliveries ({}/s), {} slow consumers cut off",
                s.connections.load(Ordering::Relaxed),
                now.1,
                now.0,
                (now.0 - last.0) / 10,
                s.slow_consumers.load(Ordering::Relaxed),
            );
            last = now;
        }
    }
}

const MAX_HEAD: usize = 16 * 1024;
const MAX_BODY: usize = 64 * 1024;

struct Head {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    len: usize,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, ()> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            Ok(Some(Head {
                method: req.method.unwrap_or("").to_string(),
                path: path.to_string(),
                query: query.to_string(),
                headers: req
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect(),
                len,
            }))
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => Ok(None),
        _ => Err(()),
    }
}

/// HTTP/1.1 with keep-alive until a WebSocket upgrade takes the connection over.
async fn serve(mut stream: TcpStream, state: Arc<State>) {
    let mut buf: Vec<u8> = Vec::with_capacity(2048);
    loop {
        let head = loop {
            match parse_head(&buf) {
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(()) => {
                    let _ = respond(
                        &mut stream,
                        400,
                        "application/json",
                        "{\"error\":\"bad_request\"}",
                        true,
                    )
                    .await;
                    return;
                }
            }
            let mut chunk = [0u8; 2048];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        buf.drain(..head.len);
        let upgrade = head.method == "GET"
            && head.has_token("upgrade", "websocket")
            && (head.path == "/socket/websocket" || head.path == "/api/v1/realtime/websocket");
        if upgrade {
            return websocket(stream, head, buf, state).await;
        }
        let body_len: usize = head
            .header("content-length")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if body_len > MAX_BODY {
            let _ = respond(
                &mut stream,
                413,
                "application/json",
                "{\"error\":\"too_large\"}",
                true,
            )
            .await;
            return;
        }
        while buf.len() < body_len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..body_len).collect();
        let close = head.has_token("connection", "close");
        let (status, ctype, text) = route(&head, &body, &state);
        if respond(&mut stream, status, ctype, &text, close)
            .await
            .is_err()
            || close
        {
            return;
        }
    }
}

/// The fake HTTP API: enough for a load generator's set-up, nothing checked.
fn route(head: &Head, body: &[u8], state: &State) -> (u16, &'static str, String) {
    let input: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/healthz") | ("GET", "/readyz") => {
            (200, "application/json", json!({"status": "ok"}).to_string())
        }
        ("POST", "/api/v1/auth/login") => {
            let email = input["email"].as_str().unwrap_or("floor@localhost");
            let v = json!({
                "access_token": "floor-access-token",
                "refresh_token": "floor-refresh-token",
                "token_type": "Bearer",
                "expires_in": 3600,
                "user": {"id": "usr_floor", "email": email, "role": "admin", "account_id": null},
            });
            (200, "application/json", v.to_string())
        }
        // The load generator looks for its account first; the floor never has one.
        ("GET", "/api/v1/accounts") => (
            200,
            "application/json",
            json!({"accounts": [], "next": null}).to_string(),
        ),
        ("POST", "/api/v1/accounts") => {
            let n = state.next_account.fetch_add(1, Ordering::Relaxed);
            let v = json!({
                "id": format!("acc_floor{n}"),
                "name": input["name"].as_str().unwrap_or("Floor"),
                "plan": input["plan"].as_str().unwrap_or("enterprise"),
                "created_at": now,
                "updated_at": now,
                "signing_secret": format!("floor-secret-{n}"),
            });
            (201, "application/json", v.to_string())
        }
        ("GET", "/metrics") => {
            let s = &state.stats;
            let text = format!(
                "# presenced-floor\npresenced_connections {}\npresenced_deliveries_total {}\npresenced_pushes_total {}\npresenced_outbound_drops_total{{reason=\"slow_consumer\"}} {}\n",
                s.connections.load(Ordering::Relaxed),
                s.deliveries.load(Ordering::Relaxed),
                s.pushes.load(Ordering::Relaxed),
                s.slow_consumers.load(Ordering::Relaxed),
            );
            (200, "text/plain; version=0.0.4", text)
        }
        _ => (
            404,
            "application/json",
            json!({"error": "not_found", "floor": true}).to_string(),
        ),
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &str,
    close: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        413 => "Payload Too Large",
        _ => "",
    };
    let conn = if close { "close" } else { "keep-alive" };
    let msg = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: {conn}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(msg.as_bytes()).await
}

/// The token's `sub`, read without checking the signature (the floor trusts everyone).
fn user_of(head: &Head) -> Option<String> {
    let token = url::form_urlencoded::parse(head.query.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .or_else(|| {
            head.header("sec-websocket-protocol")?
                .split(',')
                .find_map(|p| p.trim().strip_prefix("base64url.bearer.phx."))
                .and_then(|b| {
                    let b = b.trim_end_matches('=').replace('+', "-").replace('/', "_");
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .decode(b)
                        .ok()
                })
                .and_then(|b| String::from_utf8(b).ok())
        })?;
    let claims = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v["sub"].as_str().map(str::to_string)
}

async fn websocket(mut stream: TcpStream, head: Head, rest: Vec<u8>, state: Arc<State>) {
    let Some(key) = head.header("sec-websocket-key") else {
        let _ = respond(
            &mut stream,
            400,
            "application/json",
            "{\"error\":\"no_websocket_key\"}",
            true,
        )
        .await;
        return;
    };
    let accept = derive_accept_key(key.trim().as_bytes());
    let phoenix = head.has_token("sec-websocket-protocol", "phoenix");
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n{}\r\n",
        if phoenix { "sec-websocket-protocol: phoenix\r\n" } else { "" }
    );
    if stream.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let conn = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let user: Arc<str> = user_of(&head)
        .unwrap_or_else(|| format!("anon-{conn}"))
        .into();
    drop(head);
    // Small buffers: 4 KiB to read into, frames written out once 4 KiB are queued or on flush.
    let cfg = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_write_buffer_size(1 << 20)
        .max_message_size(Some(64 << 10))
        .max_frame_size(Some(64 << 10));
    let ws = WebSocketStream::from_partially_read(stream, rest, Role::Server, Some(cfg)).await;
    state.stats.connections.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel::<Utf8Bytes>(state.outbound);
    let mut session = Session {
        conn,
        user,
        state: state.clone(),
        tx,
        kill: Arc::new(Notify::new()),
        joined: HashMap::new(),
        next_ref: 1,
    };
    let _ = session.run(ws, rx).await;
    for (name, topic) in std::mem::take(&mut session.joined) {
        state.leave(&name, &topic, conn);
    }
    state.stats.connections.fetch_sub(1, Ordering::Relaxed);
}

struct Session {
    conn: u64,
    user: Arc<str>,
    state: Arc<State>,
    /// This connection's queue, handed to every topic it joins.
    tx: mpsc::Sender<Utf8Bytes>,
    kill: Arc<Notify>,
    joined: HashMap<Arc<str>, Arc<Topic>>,
    next_ref: u64,
}

type Ws = WebSocketStream<TcpStream>;
type WsResult = Result<(), tokio_tungstenite::tungstenite::Error>;

fn frame(
    join_ref: &Value,
    msg_ref: &Value,
    topic: &str,
    event: &str,
    payload: &Value,
) -> Utf8Bytes {
    json!([join_ref, msg_ref, topic, event, payload])
        .to_string()
        .into()
}

fn reply(join_ref: &Value, msg_ref: &Value, topic: &str, status: &str, response: Value) -> Message {
    Message::Text(frame(
        join_ref,
        msg_ref,
        topic,
        "phx_reply",
        &json!({"status": status, "response": response}),
    ))
}

fn error(join_ref: &Value, msg_ref: &Value, topic: &str, reason: &str) -> Message {
    reply(join_ref, msg_ref, topic, "error", json!({"reason": reason}))
}

impl Session {
    async fn run(&mut self, mut ws: Ws, mut rx: mpsc::Receiver<Utf8Bytes>) -> WsResult {
        loop {
            tokio::select! {
                biased;
                _ = self.kill.notified() => {
                    let close = CloseFrame { code: CloseCode::Policy, reason: "slow_consumer".into() };
                    let _ = ws.send(Message::Close(Some(close))).await;
                    return Ok(());
                }
                out = rx.recv() => {
                    let Some(f) = out else { return Ok(()) };
                    ws.feed(Message::Text(f)).await?;
                    while let Ok(f) = rx.try_recv() {
                        ws.feed(Message::Text(f)).await?;
                    }
                    ws.flush().await?;
                }
                inc = ws.next() => {
                    match inc {
                        Some(Ok(Message::Text(t))) => {
                            self.handle(&t, &mut ws).await?;
                            ws.flush().await?;
                        }
                        Some(Ok(Message::Binary(_))) => {
                            ws.send(error(&Value::Null, &Value::Null, "phoenix", "binary_not_supported")).await?;
                        }
                        // Pings are answered by tungstenite on the next write or flush.
                        Some(Ok(Message::Ping(_))) => ws.flush().await?,
                        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Ok(()),
                        Some(Ok(_)) => {}
                    }
                }
            }
        }
    }

    async fn handle(&mut self, text: &str, ws: &mut Ws) -> WsResult {
        let parsed: Option<Vec<Value>> = match serde_json::from_str(text) {
            Ok(Value::Array(a)) if a.len() == 5 => Some(a),
            _ => None,
        };
        let Some(mut a) = parsed else {
            return ws
                .feed(error(
                    &Value::Null,
                    &Value::Null,
                    "phoenix",
                    "malformed_frame",
                ))
                .await;
        };
        let payload = a.pop().unwrap_or(Value::Null);
        let (event, topic) = match (a.pop(), a.pop()) {
            (Some(Value::String(e)), Some(Value::String(t))) => (e, t),
            _ => {
                return ws
                    .feed(error(&a[0], &a[1], "phoenix", "malformed_frame"))
                    .await
            }
        };
        let (join_ref, msg_ref) = (&a[0], &a[1]);
        match (topic.as_str(), event.as_str()) {
            ("phoenix", "heartbeat") => {
                ws.feed(reply(join_ref, msg_ref, "phoenix", "ok", json!({})))
                    .await
            }
            (_, "phx_join") => {
                if !self.joined.contains_key(topic.as_str()) {
                    let member = Member {
                        tx: self.tx.clone(),
                        kill: self.kill.clone(),
                    };
                    let t = self.state.join(&topic, self.conn, member);
                    self.joined.insert(topic.as_str().into(), t);
                }
                ws.feed(reply(join_ref, msg_ref, &topic, "ok", json!({})))
                    .await?;
                // The floor tracks nobody: the state a joiner gets is empty.
                ws.feed(Message::Text(frame(
                    &Value::Null,
                    &Value::Null,
                    &topic,
                    "presence_state",
                    &json!({}),
                )))
                .await
            }
            (_, "phx_leave") => {
                if let Some((name, t)) = self.joined.remove_entry(topic.as_str()) {
                    self.state.leave(&name, &t, self.conn);
                }
                ws.feed(reply(join_ref, msg_ref, &topic, "ok", json!({})))
                    .await
            }
            (_, "status") | (_, "broadcast") => {
                let Some(t) = self.joined.get(topic.as_str()) else {
                    return ws
                        .feed(error(join_ref, msg_ref, &topic, "not_joined"))
                        .await;
                };
                self.state.stats.pushes.fetch_add(1, Ordering::Relaxed);
                let (out, except) = if event == "status" {
                    self.next_ref += 1;
                    let mut meta = match payload.get("meta") {
                        Some(Value::Object(m)) => m.clone(),
                        _ => serde_json::Map::new(),
                    };
                    meta.insert(
                        "phx_ref".into(),
                        Value::from(format!("{:x}.{:x}", self.conn, self.next_ref)),
                    );
                    meta.insert(
                        "status".into(),
                        payload
                            .get("status")
                            .cloned()
                            .unwrap_or(Value::from("online")),
                    );
                    let mut joins = serde_json::Map::new();
                    joins.insert(self.user.to_string(), json!({"metas": [meta]}));
                    let diff = json!({"joins": joins, "leaves": {}});
                    (
                        frame(&Value::Null, &Value::Null, &topic, "presence_diff", &diff),
                        None,
                    )
                } else {
                    let ev = payload
                        .get("event")
                        .and_then(Value::as_str)
                        .unwrap_or("broadcast");
                    let inner = payload.get("payload").cloned().unwrap_or(Value::Null);
                    let include_self = payload
                        .get("self")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    (
                        frame(&Value::Null, &Value::Null, &topic, ev, &inner),
                        (!include_self).then_some(self.conn),
                    )
                };
                self.state.fanout(t, &out, except);
                ws.feed(reply(join_ref, msg_ref, &topic, "ok", json!({})))
                    .await
            }
            _ => {
                ws.feed(error(join_ref, msg_ref, &topic, "unknown_event"))
                    .await
            }
        }
    }
}
