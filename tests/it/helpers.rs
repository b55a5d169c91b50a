//! Test harness: `spawn_app` starts a real node on 127.0.0.1:0 with its own SQLite file and
//! millisecond timings; `WsClient` is a real WebSocket client speaking Phoenix V2 frames.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::rt::time::timeout;
use awc::ws;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

use presenced::app::Application;
use presenced::config::Settings;
use presenced::http::AppState;

pub const ADMIN_EMAIL: &str = "admin@test.local";
pub const ADMIN_PASSWORD: &str = "admin-password-1";
/// How long a test waits for an event before failing (behaviour, not speed).
/// The database backends every persistence-touching test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database of `backend`; `None` when PostgreSQL is absent outside CI (the test then
/// skips; under CI=true its absence is a failure).
pub fn temp_db(backend: Backend) -> Option<presenced::store::testdb::TempDatabase> {
    use presenced::store::testdb::TempDatabase;
    match backend {
        Backend::Sqlite => Some(TempDatabase::sqlite()),
        Backend::Postgres => TempDatabase::postgres(),
    }
}

pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestApp {
    pub port: u16,
    pub http: String,
    pub ws: String,
    pub state: actix_web::web::Data<AppState>,
    pub handle: actix_web::dev::ServerHandle,
    pub admin_token: String,
    _dir: tempfile::TempDir,
}

/// Settings every test starts from: a fresh database, port 0, short timings.
pub fn test_settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings::default();
    s.server.bind = "127.0.0.1:0".into();
    s.server.workers = 2;
    s.server.socket_threads = 2;
    s.server.shutdown_timeout_s = 1;
    s.database.url = format!("sqlite://{}", dir.join("test.db").display());
    s.database.pool_size = 4;
    s.bootstrap.admin_email = ADMIN_EMAIL.into();
    s.bootstrap.admin_password = Some(ADMIN_PASSWORD.into());
    s.presence.grace_ms = 300;
    s.presence.timeout_ms = 5_000;
    s.presence.room_idle_ms = 200;
    s.presence.recovery_timeout_ms = 1_000;
    s.presence.arbiters = 2;
    s
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

pub async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut settings = test_settings(dir.path());
    tweak(&mut settings);
    let app = Application::build(settings).await.expect("app starts");
    let port = app.port();
    let state = app.state();
    let handle = app.handle();
    actix_web::rt::spawn(app.run_until_stopped());
    let http = format!("http://127.0.0.1:{port}");
    let admin_token = login(&http, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .expect("admin logs in");
    TestApp {
        port,
        ws: format!("ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"),
        http,
        state,
        handle,
        admin_token,
        _dir: dir,
    }
}

pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish()
}

pub async fn login(http: &str, email: &str, password: &str) -> Result<String, u16> {
    let mut res = client()
        .post(format!("{http}/api/v1/auth/login"))
        .send_json(&json!({"email": email, "password": password}))
        .await
        .expect("login request");
    if !res.status().is_success() {
        return Err(res.status().as_u16());
    }
    let v: Value = res.json().await.expect("login json");
    Ok(v["access_token"].as_str().expect("token").to_string())
}

/// A created account: id and signing secret.
pub struct TestAccount {
    pub id: String,
    pub secret: String,
}

impl TestApp {
    pub async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        let mut res = client()
            .get(format!("{}{path}", self.http))
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        let status = res.status().as_u16();
        let body = res.body().limit(16 << 20).await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, Value) {
        let mut req = client()
            .request(
                method.parse().expect("method"),
                format!("{}{path}", self.http),
            )
            .insert_header(("content-type", "application/json"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut res = req.send_body(body.to_string()).await.expect("request");
        let status = res.status().as_u16();
        let body = res.body().await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    pub async fn create_account(&self, name: &str) -> TestAccount {
        let (status, v) = self
            .send(
                "POST",
                "/api/v1/accounts",
                Some(&self.admin_token),
                &json!({"name": name, "plan": "pro"}).to_string(),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        TestAccount {
            id: v["id"].as_str().unwrap().into(),
            secret: v["signing_secret"].as_str().unwrap().into(),
        }
    }

    pub fn user_token(&self, acc: &TestAccount, user: &str) -> String {
        presenced::auth::mint_user_token(&acc.secret, &acc.id, user, 3600, Some(user), None)
    }

    pub async fn connect(&self, token: &str) -> WsClient {
        WsClient::connect(&format!("{}&token={token}", self.ws))
            .await
            .expect("socket connects")
    }

    /// The value of a metric in the node's `/metrics` text (sum over labels matching `label`).
    pub async fn metric(&self, name: &str, label: &str) -> f64 {
        let mut res = client()
            .get(format!("{}/metrics", self.http))
            .send()
            .await
            .expect("metrics");
        let body = res.body().await.expect("body");
        let text = String::from_utf8_lossy(&body).to_string();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l.contains(label))
            .filter(|l| {
                let rest = &l[name.len()..];
                rest.starts_with(' ') || rest.starts_with('{')
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

type Framed = actix_codec::Framed<awc::BoxedSocket, ws::Codec>;

/// A Phoenix V2 client over a real socket. Frames read while waiting for something else are
/// kept, in order, for later `expect`s.
pub struct WsClient {
    framed: Framed,
    buf: VecDeque<Value>,
    /// Every frame ever received, for "this never happened" assertions.
    pub seen: Vec<Value>,
    next_ref: u64,
    pub closed: Option<Option<ws::CloseReason>>,
}

impl WsClient {
    pub async fn connect(url: &str) -> Result<WsClient, awc::error::WsClientError> {
        let (_, framed) = client().ws(url).max_frame_size(16 << 20).connect().await?;
        Ok(WsClient {
            framed,
            buf: VecDeque::new(),
            seen: Vec::new(),
            next_ref: 0,
            closed: None,
        })
    }

    pub fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    pub async fn send_text(&mut self, text: String) {
        self.framed
            .send(ws::Message::Text(text.into()))
            .await
            .expect("send");
    }

    /// Sends a text frame; an error means the server has closed the socket.
    pub async fn framed_send(&mut self, text: String) -> Result<(), awc::error::WsProtocolError> {
        self.framed.send(ws::Message::Text(text.into())).await
    }

    /// Sends `[join_ref, ref, topic, event, payload]` and returns the ref.
    pub async fn push(
        &mut self,
        join_ref: &str,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> String {
        let r = self.next_ref();
        let frame = json!([join_ref, r, topic, event, payload]);
        self.send_text(frame.to_string()).await;
        r
    }

    /// Reads the next frame from the socket (None when closed or after `WAIT`).
    async fn read(&mut self, wait: Duration) -> Option<Value> {
        loop {
            let item = match timeout(wait, self.framed.next()).await {
                Ok(Some(Ok(f))) => f,
                _ => return None,
            };
            match item {
                ws::Frame::Text(b) => {
                    let v: Value = serde_json::from_slice(&b).expect("server sends JSON");
                    self.seen.push(v.clone());
                    return Some(v);
                }
                ws::Frame::Ping(p) => {
                    let _ = self.framed.send(ws::Message::Pong(p)).await;
                }
                ws::Frame::Close(reason) => {
                    self.closed = Some(reason);
                    return None;
                }
                _ => {}
            }
        }
    }

    /// The first frame (buffered or new) matching `pred`, within `WAIT`.
    pub async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.try_expect(WAIT, &pred).await.unwrap_or_else(|| {
            let buffered: Vec<String> = self
                .buf
                .iter()
                .rev()
                .take(5)
                .map(|v| v.to_string().chars().take(160).collect())
                .collect();
            panic!("timed out waiting for {what}; last buffered: {buffered:?}")
        })
    }

    pub async fn try_expect(
        &mut self,
        wait: Duration,
        pred: &impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        if let Some(i) = self.buf.iter().position(pred) {
            return self.buf.remove(i);
        }
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let v = self.read(left).await?;
            if pred(&v) {
                return Some(v);
            }
            self.buf.push_back(v);
        }
    }

    /// Reads until the server closes the socket; returns its close reason.
    pub async fn expect_close(&mut self) -> Option<ws::CloseReason> {
        let deadline = std::time::Instant::now() + WAIT;
        while self.closed.is_none() {
            let left = deadline
                .checked_duration_since(std::time::Instant::now())
                .expect("timed out waiting for the server to close the socket");
            if let Some(v) = self.read(left).await {
                self.buf.push_back(v);
            } else if self.closed.is_none() {
                panic!("socket ended without a close frame");
            }
        }
        self.closed.clone().flatten()
    }

    /// Joins `topic` and returns the reply payload (`{status, response}`).
    pub async fn join(&mut self, topic: &str, payload: Value) -> Value {
        let r = self.next_ref();
        self.send_text(json!([r, r, topic, "phx_join", payload]).to_string())
            .await;
        let reply = self.expect_reply(&r).await;
        reply
    }

    pub async fn join_ok(&mut self, topic: &str, payload: Value) -> Value {
        let reply = self.join(topic, payload).await;
        assert_eq!(reply["status"], "ok", "join {topic}: {reply}");
        // presence_state follows every successful join
        self.expect(&format!("presence_state of {topic}"), |v| {
            v[2] == topic && v[3] == "presence_state"
        })
        .await[4]
            .clone()
    }

    pub async fn expect_reply(&mut self, r: &str) -> Value {
        let v = self
            .expect(&format!("reply to ref {r}"), |v| {
                v[1] == r && v[3] == "phx_reply"
            })
            .await;
        v[4].clone()
    }

    pub async fn close(mut self) {
        let _ = self.framed.send(ws::Message::Close(None)).await;
    }
}

/// A `presence_diff` frame on `topic`.
pub fn is_diff(topic: &str) -> impl Fn(&Value) -> bool + '_ {
    move |v| v[2] == topic && v[3] == "presence_diff"
}

pub fn leaves_of(v: &Value) -> Vec<String> {
    v[4]["leaves"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

pub fn joins_of(v: &Value) -> Vec<String> {
    v[4]["joins"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

/// Polls `f` every 50 ms until it returns `Some`, for at most `WAIT`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        actix_web::rt::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A TCP proxy in front of a service (PostgreSQL, Redis) that a test can cut (existing connections die, new ones
/// are refused) and restore.
pub struct Proxy {
    pub port: u16,
    up: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(AtomicU64::new(0));
        let (up2, gen2) = (up.clone(), generation.clone());
        actix_web::rt::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let born = gen2.load(Ordering::SeqCst);
                let (target, gen3) = (target.clone(), gen2.clone());
                actix_web::rt::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let cut = async {
                        while gen3.load(Ordering::SeqCst) == born {
                            actix_web::rt::time::sleep(Duration::from_millis(20)).await;
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        _ = cut => {}
                    }
                });
            }
        });
        Proxy {
            port,
            up,
            generation,
        }
    }

    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// A node as a child process, so it can be killed for real. It listens on `port`, with the
/// test admin and `env` (settings as `PRESENCED__…` variables, `DATABASE_URL`, `REDIS_URL`);
/// killed when dropped.
pub struct ChildNode {
    child: std::process::Child,
    pub http: String,
    pub ws: String,
}

impl ChildNode {
    pub fn start(port: u16, env: &[(&str, String)]) -> ChildNode {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_presenced"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn")
            .env("PRESENCED__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("PRESENCED__BOOTSTRAP__ADMIN_EMAIL", ADMIN_EMAIL)
            .env("PRESENCED__BOOTSTRAP__ADMIN_PASSWORD", ADMIN_PASSWORD);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("the presenced binary starts");
        ChildNode {
            child,
            http: format!("http://127.0.0.1:{port}"),
            ws: format!("ws://127.0.0.1:{port}/socket/websocket?vsn=2.0.0"),
        }
    }

    pub async fn ready(&self) {
        let url = format!("{}/readyz", self.http);
        eventually("the child node to be ready", || {
            let url = url.clone();
            async move {
                let res = client().get(url).send().await.ok()?;
                res.status().is_success().then_some(())
            }
        })
        .await;
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Child::kill` is SIGKILL on Unix: no shutdown path runs, no final snapshot.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    pub async fn connect(&self, token: &str) -> WsClient {
        WsClient::connect(&format!("{}&token={token}", self.ws))
            .await
            .expect("socket connects")
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `Content-Length` of an HTTP response head written out as text (0 when absent).
pub fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0)
}
