//! `presenced demo`: simulated people, so a newcomer's first dashboard is alive.
//!
//! It logs in as an admin over the HTTP API, finds (or creates) an account, learns a signing
//! secret (from the creation, or by rotating the secret of an existing account: the previous one
//! keeps working for `auth.rotation_grace_s`), then opens one WebSocket session per simulated
//! user, each in one to three rooms. From then on it keeps things moving: status changes, room
//! moves, dropped connections that come back on the same device, visitors that come and go, the
//! odd broadcast. One summary line every 10 s, never a line per event.
//!
//! Everything runs on the current actix System: one task per session (awc WebSocket client) and
//! one director task that decides what happens next and counts what the server acknowledged.
//! New connections go through one limiter: at most `connect_rate` per second, halved (at most
//! once a second, with a 1 s pause) whenever the server answers an upgrade with 429 and raised
//! again by one per second for every connection that succeeds. awc does not expose the headers of
//! a refused upgrade, so `Retry-After` is read on the HTTP calls only; the server's connect limits
//! are per-second windows, which the 1 s pause matches.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::future::Future;
use std::rc::Rc;
use std::time::Duration;

use actix_web::rt::time::{interval_at, sleep, sleep_until, timeout, Instant};
use awc::error::{WsClientError, WsProtocolError};
use awc::http::Method;
use awc::ws;
use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

/// The most simulated users one demo process runs: each is a socket, and a process may hold
/// 20 000 open files here (see STACK.md); the rest is headroom for visitors and the HTTP client.
pub const MAX_USERS: usize = 15_000;
/// Above this many users the demo account is created on the `enterprise` plan: `pro` allows
/// 10 000 concurrent connections, and visitors and reconnects need some room.
const PRO_HEADROOM: usize = 9_000;
/// A room's `presence_state` grows with the room; frames up to this size are accepted.
const MAX_FRAME: usize = 64 << 20;
/// Lifetime of the minted user tokens (a reconnect mints a new one).
const TOKEN_TTL_S: u64 = 24 * 3600;

const FIRST: &[&str] = &[
    "Ada",
    "Amara",
    "Aiko",
    "Alejandro",
    "Anika",
    "Bruno",
    "Camille",
    "Chen",
    "Dmitri",
    "Elena",
    "Emeka",
    "Farah",
    "Felix",
    "Grace",
    "Hana",
    "Hugo",
    "Ines",
    "Ivan",
    "Jamal",
    "Julia",
    "Kai",
    "Leila",
    "Lucas",
    "Maya",
    "Mateo",
    "Nadia",
    "Noah",
    "Olga",
    "Omar",
    "Priya",
    "Rafael",
    "Rosa",
    "Sami",
    "Sofia",
    "Tariq",
    "Thea",
    "Uma",
    "Viktor",
    "Wei",
    "Yara",
    "Yusuf",
    "Zoe",
];
const LAST: &[&str] = &[
    "Abebe",
    "Andersen",
    "Bianchi",
    "Costa",
    "Dubois",
    "Eriksson",
    "Fernandes",
    "Garcia",
    "Haddad",
    "Ito",
    "Jensen",
    "Kowalski",
    "Kim",
    "Lopez",
    "Mensah",
    "Müller",
    "Nakamura",
    "Novak",
    "Okafor",
    "Olsen",
    "Patel",
    "Petrov",
    "Quinn",
    "Rossi",
    "Santos",
    "Schmidt",
    "Singh",
    "Tanaka",
    "Torres",
    "Umarov",
    "Vasquez",
    "Wang",
    "Weber",
    "Xu",
    "Yilmaz",
    "Zhang",
];
const ROOMS: &[&str] = &[
    "lobby",
    "support",
    "design-review",
    "engineering",
    "standup",
    "sales",
    "marketing",
    "product",
    "random",
    "ops",
    "hiring",
    "watercooler",
    "release-planning",
    "customer-success",
    "data",
    "security",
];
/// Weighted: most people are on the web.
const DEVICES: &[&str] = &["web", "web", "web", "ios", "android", "desktop"];
const STATUSES: &[&str] = &["online", "away", "busy"];

/// What `presenced demo` does; `DemoOptions::default()` is the command line's defaults.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The node's HTTP base URL (`http://host:port`); the socket is `ws://host:port/socket/websocket`.
    pub url: String,
    pub email: String,
    pub password: String,
    /// The account the simulated users belong to; created (plan `pro`) when missing.
    pub account: String,
    pub users: usize,
    pub rooms: usize,
    /// New WebSocket connections per second, at most.
    pub connect_rate: u32,
    /// Mean time between two simulated actions (each wait is a random 0.5–1.5 of it). Every
    /// delay of the simulation (a reconnect, a visitor's stay) is counted in these ticks.
    pub tick: Duration,
    pub heartbeat: Duration,
    pub summary_every: Duration,
    /// Stop after this many simulated actions (counted once the first users are in).
    pub max_events: Option<u64>,
    /// Seed of the simulation's choices (random when `None`).
    pub seed: Option<u64>,
    /// Print the start lines and the periodic summary.
    pub verbose: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            url: "http://127.0.0.1:4000".into(),
            email: "admin@localhost".into(),
            password: String::new(),
            account: "Demo".into(),
            users: 200,
            rooms: 12,
            connect_rate: 100,
            tick: Duration::from_millis(250),
            heartbeat: Duration::from_secs(30),
            summary_every: Duration::from_secs(10),
            max_events: None,
            seed: None,
            verbose: true,
        }
    }
}

/// Why the demo could not run. Each is one line, fit for a terminal.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the node at {url}: {cause} (is `presenced` running there?)")]
    Unreachable { url: String, cause: String },
    #[error("login as {email} failed: {why}")]
    Login { email: String, why: String },
    #[error("{what} failed: HTTP {status}: {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
    },
    #[error("no simulated user could connect (last refusal: {0})")]
    NoSession(String),
}

/// Sent once, when the initial users are connected and in their rooms (or were refused).
#[derive(Debug, Clone)]
pub struct Ready {
    pub account_id: String,
    /// Sessions online at that moment.
    pub sessions: usize,
    /// Rooms with at least one of them.
    pub rooms: usize,
}

/// What happened, as acknowledged by the server (replies `ok`), when the demo ends.
#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    pub account_id: String,
    /// Simulated actions taken.
    pub events: u64,
    /// WebSocket sessions established (first connections and reconnects).
    pub connects: u64,
    pub joins: u64,
    pub leaves: u64,
    pub status_changes: u64,
    pub broadcasts: u64,
    /// Connections dropped on purpose (no leave: the server holds the user for its grace).
    pub drops: u64,
    pub reconnects: u64,
    pub visitors: u64,
    /// Upgrades refused (other than 429) and connections the server ended.
    pub refused: u64,
    pub disconnects: u64,
    /// Error replies to joins, leaves, status or broadcast pushes.
    pub errors: u64,
    /// 429 answers (HTTP API and socket upgrades).
    pub throttled: u64,
}

/// Runs the demo until `stop` completes (or `max_events`), then closes every socket.
pub async fn run(
    opts: DemoOptions,
    stop: impl Future<Output = ()>,
) -> Result<DemoReport, DemoError> {
    run_with(opts, stop, None).await
}

/// `run`, telling `ready` when the initial users are in.
pub async fn run_with(
    opts: DemoOptions,
    stop: impl Future<Output = ()>,
    ready: Option<oneshot::Sender<Ready>>,
) -> Result<DemoReport, DemoError> {
    validate(&opts)?;
    let mut stop = std::pin::pin!(stop);
    let base = base_url(&opts.url)?;
    let ws_base = format!(
        "ws{}/socket/websocket?vsn=2.0.0&token=",
        base.trim_start_matches("http")
    );
    let client = awc::Client::builder()
        // Every session holds its connection for good: no pool limit.
        .connector(
            awc::Connector::new()
                .limit(0)
                .timeout(Duration::from_secs(10)),
        )
        .timeout(Duration::from_secs(30))
        .finish();
    let throttled = Rc::new(Cell::new(0));
    let mut api = Api {
        client: client.clone(),
        base: base.clone(),
        token: None,
        throttled: throttled.clone(),
        verbose: opts.verbose,
    };
    let plan = if opts.users > PRO_HEADROOM {
        "enterprise"
    } else {
        "pro"
    };
    let account = tokio::select! {
        r = setup(&mut api, &opts, plan) => r?,
        _ = &mut stop => return Ok(DemoReport::default()),
    };
    if opts.verbose {
        println!(
            "demo: logged in as {}; account \"{}\" ({}) {}; connecting {} users at up to {}/s",
            opts.email,
            opts.account,
            account.id,
            if account.created {
                "created"
            } else {
                "found, signing secret rotated"
            },
            opts.users,
            opts.connect_rate
        );
    }
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let shared = Rc::new(Shared {
        client,
        limiter: RefCell::new(Limiter::new(opts.connect_rate)),
        heartbeat: opts.heartbeat,
        reports: reports_tx,
        throttled,
    });
    let rng = match opts.seed {
        Some(s) => StdRng::seed_from_u64(s),
        None => StdRng::from_os_rng(),
    };
    let mut director = Director {
        room_names: room_names(opts.rooms),
        visitor_cap: (opts.users / 20).max(2),
        opts,
        account,
        ws_base,
        shared,
        rng,
        users: Vec::new(),
        names: HashSet::new(),
        visitor_serial: 0,
        tick_no: 0,
        schedule: Vec::new(),
        stats: DemoReport::default(),
        tasks: 0,
        initial_left: 0,
        last_refusal: None,
        ready,
        is_ready: false,
    };
    director.stats.account_id = director.account.id.clone();
    director.run(reports, stop).await
}

fn validate(o: &DemoOptions) -> Result<(), DemoError> {
    let bad = |m: String| Err(DemoError::Usage(m));
    if o.users == 0 {
        return bad("--users must be at least 1".into());
    }
    if o.users > MAX_USERS {
        return bad(format!(
            "--users {} is too many for one process: at most {MAX_USERS} (each user is an open socket, and a process may hold 20 000 open files here); run several demos for more",
            o.users
        ));
    }
    if o.rooms == 0 || o.rooms > 1000 {
        return bad("--rooms must be between 1 and 1000".into());
    }
    if o.connect_rate == 0 || o.connect_rate > 10_000 {
        return bad("--connect-rate must be between 1 and 10000".into());
    }
    if o.password.is_empty() {
        return bad(
            "the demo needs the admin's password: --password or PRESENCED_DEMO_PASSWORD".into(),
        );
    }
    if o.tick.is_zero() || o.heartbeat.is_zero() || o.summary_every.is_zero() {
        return bad("tick, heartbeat and summary intervals must be positive".into());
    }
    Ok(())
}

/// `http://host:port` without a trailing slash; refuses anything but plain http.
pub fn base_url(raw: &str) -> Result<String, DemoError> {
    let u = url::Url::parse(raw)
        .map_err(|e| DemoError::Usage(format!("--url '{raw}' is not a URL ({e})")))?;
    match u.scheme() {
        "http" => {}
        "https" => {
            return Err(DemoError::Usage(
                "--url: https is not supported by the demo (it has no TLS); point it at the node's own http address".into(),
            ))
        }
        s => {
            return Err(DemoError::Usage(format!(
                "--url: scheme '{s}' is not supported, use http://host:port"
            )))
        }
    }
    let host = u
        .host_str()
        .ok_or_else(|| DemoError::Usage(format!("--url '{raw}' has no host")))?;
    Ok(match u.port() {
        Some(p) => format!("http://{host}:{p}"),
        None => format!("http://{host}"),
    })
}

/// The rooms of the demo: the built-in names, then `room-17`, `room-18`, … for more.
fn room_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| match ROOMS.get(i) {
            Some(r) => (*r).to_string(),
            None => format!("room-{}", i + 1),
        })
        .collect()
}

// ---- HTTP: login and the account -------------------------------------------------------------

struct Api {
    client: awc::Client,
    base: String,
    token: Option<String>,
    throttled: Rc<Cell<u64>>,
    verbose: bool,
}

/// An account the simulated users (or `presenced-load`'s sessions) belong to, and a secret to
/// mint their tokens with.
pub struct DemoAccount {
    pub id: String,
    pub secret: String,
    /// Created by this call (else found, and its signing secret rotated).
    pub created: bool,
}

/// Logs in as the admin of `opts` and finds `opts.account`, or creates it on `plan`: the first
/// steps of the demo, shared with `presenced-load`.
pub async fn account_access(opts: &DemoOptions, plan: &str) -> Result<DemoAccount, DemoError> {
    let base = base_url(&opts.url)?;
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let mut api = Api {
        client,
        base,
        token: None,
        throttled: Rc::new(Cell::new(0)),
        verbose: opts.verbose,
    };
    setup(&mut api, opts, plan).await
}

impl Api {
    /// One API call; waits out 429 answers (`Retry-After`, at most 5 times).
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), DemoError> {
        let mut attempts = 0;
        loop {
            let mut req = self
                .client
                .request(method.clone(), format!("{}{path}", self.base));
            if let Some(t) = &self.token {
                req = req.bearer_auth(t);
            }
            let sent = match body {
                Some(b) => req.send_json(b).await,
                None => req.send().await,
            };
            let mut res = sent.map_err(|e| DemoError::Unreachable {
                url: self.base.clone(),
                cause: e.to_string(),
            })?;
            let status = res.status().as_u16();
            if status == 429 && attempts < 5 {
                attempts += 1;
                self.throttled.set(self.throttled.get() + 1);
                let wait = res
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(1)
                    .clamp(1, 120);
                if self.verbose {
                    eprintln!("demo: {path} rate limited by the node; retrying in {wait} s");
                }
                sleep(Duration::from_secs(wait)).await;
                continue;
            }
            let bytes = res.body().limit(16 << 20).await.unwrap_or_default();
            return Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ));
        }
    }
}

/// The server's `{"error","message"}`, or the status line.
fn message_of(status: u16, v: &Value) -> String {
    v.get("message")
        .or_else(|| v.get("error"))
        .and_then(Value::as_str)
        .map(String::from)
        .unwrap_or_else(|| {
            awc::http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("unexpected answer")
                .to_string()
        })
}

async fn setup(api: &mut Api, o: &DemoOptions, plan: &str) -> Result<DemoAccount, DemoError> {
    let (status, v) = api
        .call(
            Method::POST,
            "/api/v1/auth/login",
            Some(&json!({"email": o.email, "password": o.password})),
        )
        .await?;
    let login_failed = |why: String| DemoError::Login {
        email: o.email.clone(),
        why,
    };
    if status == 401 {
        return Err(login_failed("wrong email or password".into()));
    }
    if !(200..300).contains(&status) {
        return Err(login_failed(format!(
            "HTTP {status}: {}",
            message_of(status, &v)
        )));
    }
    let token = v["access_token"]
        .as_str()
        .ok_or_else(|| login_failed("the answer has no access_token".into()))?;
    api.token = Some(token.to_string());

    let api_err = |what: &str, status: u16, v: &Value| {
        let mut message = message_of(status, v);
        if status == 403 {
            message.push_str(" (the demo needs an admin login)");
        }
        DemoError::Api {
            what: what.into(),
            status,
            message,
        }
    };
    let (status, v) = api.call(Method::GET, "/api/v1/accounts", None).await?;
    if status != 200 {
        return Err(api_err("listing accounts", status, &v));
    }
    let existing = v["accounts"].as_array().and_then(|list| {
        list.iter()
            .find(|a| a["name"].as_str().map(str::trim) == Some(o.account.trim()))
            .and_then(|a| a["id"].as_str().map(String::from))
    });
    let secret_of = |v: &Value, what: &str| {
        v["signing_secret"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| DemoError::Api {
                what: what.into(),
                status: 200,
                message: "the answer has no signing_secret".into(),
            })
    };
    match existing {
        Some(id) => {
            let (status, v) = api
                .call(
                    Method::POST,
                    &format!("/api/v1/accounts/{id}/secret/rotate"),
                    None,
                )
                .await?;
            if status != 200 {
                return Err(api_err("rotating the account's signing secret", status, &v));
            }
            Ok(DemoAccount {
                secret: secret_of(&v, "rotating the account's signing secret")?,
                id,
                created: false,
            })
        }
        None => {
            let (status, v) = api
                .call(
                    Method::POST,
                    "/api/v1/accounts",
                    Some(&json!({"name": o.account, "plan": plan})),
                )
                .await?;
            if !(200..300).contains(&status) {
                return Err(api_err("creating the demo account", status, &v));
            }
            let id = v["id"]
                .as_str()
                .map(String::from)
                .ok_or_else(|| DemoError::Api {
                    what: "creating the demo account".into(),
                    status,
                    message: "the answer has no id".into(),
                })?;
            Ok(DemoAccount {
                secret: secret_of(&v, "creating the demo account")?,
                id,
                created: true,
            })
        }
    }
}

// ---- Phoenix V2 framing: every frame the demo writes or reads is made or read here ------------

mod phx {
    use bytestring::ByteString;
    use presence_actors::protocol;
    use serde::de::IgnoredAny;
    use serde_json::{json, Value};

    pub fn topic(room: &str) -> String {
        format!("room:{room}")
    }

    fn frame(
        join_ref: Option<&str>,
        msg_ref: u64,
        topic: &str,
        event: &str,
        p: &Value,
    ) -> ByteString {
        let jr = join_ref.map_or(Value::Null, Value::from);
        protocol::encode(&jr, &Value::from(msg_ref.to_string()), topic, event, p)
    }

    pub fn heartbeat(r: u64) -> ByteString {
        frame(None, r, "phoenix", "heartbeat", &json!({}))
    }

    /// A join whose `join_ref` is its own `ref`, as phoenix.js does.
    pub fn join(r: u64, room: &str, status: &str) -> ByteString {
        let jr = r.to_string();
        frame(
            Some(&jr),
            r,
            &topic(room),
            "phx_join",
            &json!({ "status": status }),
        )
    }

    pub fn leave(join_ref: &str, r: u64, room: &str) -> ByteString {
        frame(Some(join_ref), r, &topic(room), "phx_leave", &json!({}))
    }

    pub fn status(join_ref: &str, r: u64, room: &str, status: &str) -> ByteString {
        frame(
            Some(join_ref),
            r,
            &topic(room),
            "status",
            &json!({ "status": status }),
        )
    }

    pub fn broadcast(
        join_ref: &str,
        r: u64,
        room: &str,
        event: &str,
        payload: &Value,
    ) -> ByteString {
        let p = json!({ "event": event, "payload": payload });
        frame(Some(join_ref), r, &topic(room), "broadcast", &p)
    }

    /// A server frame, as far as the demo cares.
    #[derive(Debug, PartialEq)]
    pub enum Incoming {
        /// `phx_reply` to one of our refs.
        Reply {
            msg_ref: u64,
            ok: bool,
        },
        /// The server closed (or errored) a channel of ours.
        Closed {
            room: String,
            join_ref: String,
        },
        Other,
    }

    #[derive(serde::Deserialize)]
    struct Head(Value, Value, String, String, IgnoredAny);

    #[derive(serde::Deserialize)]
    struct Full(IgnoredAny, IgnoredAny, IgnoredAny, IgnoredAny, Value);

    pub fn read(text: &[u8]) -> Incoming {
        // Pushes to every subscriber (presence diffs, broadcasts) carry no refs: skipped
        // without parsing, they are most of the traffic.
        if text.starts_with(b"[null,null,") {
            return Incoming::Other;
        }
        let Ok(Head(join_ref, msg_ref, topic, event, _)) = serde_json::from_slice(text) else {
            return Incoming::Other;
        };
        match event.as_str() {
            "phx_reply" => {
                let Some(msg_ref) = msg_ref.as_str().and_then(|r| r.parse().ok()) else {
                    return Incoming::Other;
                };
                let ok = serde_json::from_slice::<Full>(text)
                    .map(|f| f.4["status"] == "ok")
                    .unwrap_or(false);
                Incoming::Reply { msg_ref, ok }
            }
            "phx_close" | "phx_error" => match topic.strip_prefix("room:") {
                Some(room) => Incoming::Closed {
                    room: room.to_string(),
                    join_ref: join_ref.as_str().unwrap_or_default().to_string(),
                },
                None => Incoming::Other,
            },
            _ => Incoming::Other,
        }
    }
}

// ---- sessions: one task per simulated connection ------------------------------------------------

/// A client WebSocket as awc gives it (`Framed<BoxedSocket, Codec>`), named by what it does.
trait WsIo:
    futures_util::Stream<Item = Result<ws::Frame, WsProtocolError>>
    + futures_util::Sink<ws::Message, Error = WsProtocolError>
    + Unpin
{
}

impl<T> WsIo for T where
    T: futures_util::Stream<Item = Result<ws::Frame, WsProtocolError>>
        + futures_util::Sink<ws::Message, Error = WsProtocolError>
        + Unpin
{
}

/// What the director asks a session to do.
enum Cmd {
    Join(String, &'static str),
    Leave(String),
    Status(String, &'static str),
    Broadcast(String, &'static str, Value),
    /// Drop the TCP connection without a goodbye: the server keeps the user for its grace.
    Drop,
}

/// What a request was, for counting its reply.
#[derive(Debug, Clone)]
enum Ack {
    Join(String),
    Leave,
    Status,
    Broadcast,
}

/// What sessions tell the director. `gen` tells one connection of a user from the next.
enum Report {
    /// Connected, and every initial join answered.
    Ready { idx: usize, gen: u64 },
    /// Could not connect (not a 429: those are retried).
    Refused { idx: usize, gen: u64, why: String },
    Reply {
        idx: usize,
        gen: u64,
        ack: Ack,
        ok: bool,
    },
    /// The server closed a channel (room) of ours.
    ChannelClosed { idx: usize, gen: u64, room: String },
    /// The connection ended without being asked to.
    Down { idx: usize, gen: u64, why: String },
    /// The task is over (always the last report of a session).
    Exited,
}

/// New connections per second: additive increase, multiplicative decrease on 429.
pub(crate) struct Limiter {
    max: f64,
    rate: f64,
    next: Instant,
    last_cut: Option<Instant>,
}

impl Limiter {
    pub(crate) fn new(per_s: u32) -> Limiter {
        let max = f64::from(per_s.max(1));
        Limiter {
            max,
            rate: max,
            next: Instant::now(),
            last_cut: None,
        }
    }

    /// The moment the next connection may start.
    pub(crate) fn slot(&mut self) -> Instant {
        let at = self.next.max(Instant::now());
        self.next = at + Duration::from_secs_f64(1.0 / self.rate);
        at
    }

    pub(crate) fn succeeded(&mut self) {
        self.rate = (self.rate + 1.0).min(self.max);
    }

    /// The server said 429: half the rate and a pause, once for a burst of refusals.
    pub(crate) fn throttled(&mut self) {
        let now = Instant::now();
        if self
            .last_cut
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last_cut = Some(now);
        self.rate = (self.rate / 2.0).max(1.0);
        self.next = self.next.max(now + Duration::from_secs(1));
    }
}

struct Shared {
    client: awc::Client,
    limiter: RefCell<Limiter>,
    heartbeat: Duration,
    reports: mpsc::UnboundedSender<Report>,
    throttled: Rc<Cell<u64>>,
}

impl Shared {
    fn report(&self, r: Report) {
        // The director outlives every session; a send can only fail once it has returned.
        let _ = self.reports.send(r);
    }
}

struct Spec {
    idx: usize,
    gen: u64,
    url: String,
    rooms: Vec<(String, &'static str)>,
}

async fn session(sh: Rc<Shared>, spec: Spec, mut cmds: mpsc::UnboundedReceiver<Cmd>) {
    let (idx, gen) = (spec.idx, spec.gen);
    match connect(&sh, &spec.url, &mut cmds).await {
        Ok(Some(framed)) => {
            let mut conn = Conn {
                framed,
                next_ref: 0,
                joined: Vec::new(),
                pending: Vec::new(),
            };
            if let Err(why) = conn.drive(&sh, idx, gen, spec.rooms, &mut cmds).await {
                sh.report(Report::Down { idx, gen, why });
            }
        }
        Ok(None) => {}
        Err(why) => sh.report(Report::Refused { idx, gen, why }),
    }
    sh.report(Report::Exited);
}

/// Connects within the rate limit; `None` when told to stop first.
async fn connect(
    sh: &Shared,
    url: &str,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
) -> Result<Option<impl WsIo>, String> {
    loop {
        let slot = sh.limiter.borrow_mut().slot();
        // Before a session is up the director sends it nothing but "stop" (or drops it).
        tokio::select! {
            _ = sleep_until(slot) => {}
            _ = cmds.recv() => return Ok(None),
        }
        let attempt = sh.client.ws(url).max_frame_size(MAX_FRAME).connect();
        let res = tokio::select! {
            r = attempt => r,
            _ = cmds.recv() => return Ok(None),
        };
        match res {
            Ok((_, framed)) => {
                sh.limiter.borrow_mut().succeeded();
                return Ok(Some(framed));
            }
            Err(WsClientError::InvalidResponseStatus(s)) if s.as_u16() == 429 => {
                sh.throttled.set(sh.throttled.get() + 1);
                sh.limiter.borrow_mut().throttled();
            }
            Err(WsClientError::InvalidResponseStatus(s)) => {
                return Err(match s.as_u16() {
                    401 => "HTTP 401: the user token was refused".to_string(),
                    403 => "HTTP 403: refused (the account's plan limit?)".to_string(),
                    _ => format!("HTTP {s}"),
                })
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

struct Conn<F> {
    framed: F,
    next_ref: u64,
    /// Rooms joined (or joining), with their join_ref.
    joined: Vec<(String, String)>,
    /// Requests waiting for their reply.
    pending: Vec<(u64, Ack)>,
}

impl<F: WsIo> Conn<F> {
    fn take_ref(&mut self) -> u64 {
        self.next_ref += 1;
        self.next_ref
    }

    fn join_ref(&self, room: &str) -> Option<String> {
        self.joined
            .iter()
            .find(|(r, _)| r == room)
            .map(|(_, j)| j.clone())
    }

    async fn send(&mut self, text: bytestring::ByteString) -> Result<(), String> {
        self.framed
            .send(ws::Message::Text(text))
            .await
            .map_err(|e| format!("send failed: {e}"))
    }

    async fn join(&mut self, room: &str, status: &str) -> Result<u64, String> {
        let r = self.take_ref();
        self.joined.retain(|(x, _)| x != room);
        self.joined.push((room.to_string(), r.to_string()));
        self.pending.push((r, Ack::Join(room.to_string())));
        self.send(phx::join(r, room, status)).await?;
        Ok(r)
    }

    /// Runs the connection until told to stop (`Ok`) or it fails (`Err`, with why).
    async fn drive(
        &mut self,
        sh: &Shared,
        idx: usize,
        gen: u64,
        rooms: Vec<(String, &'static str)>,
        cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    ) -> Result<(), String> {
        let mut initial = Vec::new();
        for (room, status) in &rooms {
            initial.push(self.join(room, status).await?);
        }
        if initial.is_empty() {
            sh.report(Report::Ready { idx, gen });
        }
        let mut hb = interval_at(Instant::now() + sh.heartbeat, sh.heartbeat);
        loop {
            tokio::select! {
                frame = self.framed.next() => match frame {
                    Some(Ok(ws::Frame::Text(b))) => match phx::read(&b) {
                        phx::Incoming::Reply { msg_ref, ok } => {
                            let Some(i) = self.pending.iter().position(|(r, _)| *r == msg_ref) else {
                                continue;
                            };
                            let (_, ack) = self.pending.swap_remove(i);
                            if let (Ack::Join(room), false) = (&ack, ok) {
                                let jr = msg_ref.to_string();
                                self.joined.retain(|(x, j)| !(x == room && *j == jr));
                            }
                            sh.report(Report::Reply { idx, gen, ack, ok });
                            if let Some(i) = initial.iter().position(|r| *r == msg_ref) {
                                initial.swap_remove(i);
                                if initial.is_empty() {
                                    sh.report(Report::Ready { idx, gen });
                                }
                            }
                        }
                        phx::Incoming::Closed { room, join_ref } => {
                            let before = self.joined.len();
                            self.joined.retain(|(x, j)| !(*x == room && *j == join_ref));
                            if self.joined.len() != before {
                                sh.report(Report::ChannelClosed { idx, gen, room });
                            }
                        }
                        phx::Incoming::Other => {}
                    },
                    Some(Ok(ws::Frame::Ping(p))) => {
                        self.framed
                            .send(ws::Message::Pong(p))
                            .await
                            .map_err(|e| format!("send failed: {e}"))?;
                    }
                    Some(Ok(ws::Frame::Close(reason))) => {
                        return Err(match reason.and_then(|r| r.description) {
                            Some(d) => format!("closed by the server: {d}"),
                            None => "closed by the server".to_string(),
                        });
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("protocol error: {e}")),
                    None => return Err("connection lost".to_string()),
                },
                cmd = cmds.recv() => match cmd {
                    // The director is done with this session: a clean goodbye.
                    None => {
                        self.close().await;
                        return Ok(());
                    }
                    Some(Cmd::Drop) => return Ok(()),
                    Some(Cmd::Join(room, status)) => {
                        self.join(&room, status).await?;
                    }
                    Some(Cmd::Leave(room)) => {
                        if let Some(jr) = self.join_ref(&room) {
                            self.joined.retain(|(x, _)| *x != room);
                            let r = self.take_ref();
                            self.pending.push((r, Ack::Leave));
                            self.send(phx::leave(&jr, r, &room)).await?;
                        }
                    }
                    Some(Cmd::Status(room, status)) => {
                        if let Some(jr) = self.join_ref(&room) {
                            let r = self.take_ref();
                            self.pending.push((r, Ack::Status));
                            self.send(phx::status(&jr, r, &room, status)).await?;
                        }
                    }
                    Some(Cmd::Broadcast(room, event, payload)) => {
                        if let Some(jr) = self.join_ref(&room) {
                            let r = self.take_ref();
                            self.pending.push((r, Ack::Broadcast));
                            self.send(phx::broadcast(&jr, r, &room, event, &payload)).await?;
                        }
                    }
                },
                _ = hb.tick() => {
                    let r = self.take_ref();
                    self.send(phx::heartbeat(r)).await?;
                }
            }
        }
    }

    /// A close frame, then up to a second for the server's answer.
    async fn close(&mut self) {
        let normal = ws::CloseReason::from(ws::CloseCode::Normal);
        if self
            .framed
            .send(ws::Message::Close(Some(normal)))
            .await
            .is_err()
        {
            return;
        }
        let _ = timeout(Duration::from_secs(1), async {
            while let Some(Ok(f)) = self.framed.next().await {
                if matches!(f, ws::Frame::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

// ---- the director: who does what next ------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Offline,
    Connecting,
    Online,
    /// A visitor's slot with nobody in it.
    Free,
}

struct SimUser {
    id: String,
    name: String,
    device: &'static str,
    status: &'static str,
    /// Indexes into `room_names`: the rooms this user is in (or will rejoin on reconnect).
    rooms: Vec<usize>,
    visitor: bool,
    link: Link,
    gen: u64,
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    /// Failed connections in a row (for the reconnect backoff).
    failures: u32,
    /// The first connection is not a reconnect.
    connected_once: bool,
}

enum Due {
    /// Reconnect user `idx` if it is still `id` and offline.
    Reconnect(usize, String),
    VisitorLeaves(usize, String),
}

struct Director {
    opts: DemoOptions,
    account: DemoAccount,
    ws_base: String,
    shared: Rc<Shared>,
    rng: StdRng,
    room_names: Vec<String>,
    users: Vec<SimUser>,
    names: HashSet<String>,
    visitor_cap: usize,
    visitor_serial: u64,
    tick_no: u64,
    schedule: Vec<(u64, Due)>,
    stats: DemoReport,
    /// Session tasks not yet exited.
    tasks: usize,
    /// Initial users whose first connection has not settled (ready or refused).
    initial_left: usize,
    last_refusal: Option<String>,
    ready: Option<oneshot::Sender<Ready>>,
    is_ready: bool,
}

impl Director {
    async fn run(
        mut self,
        mut reports: mpsc::UnboundedReceiver<Report>,
        mut stop: std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<DemoReport, DemoError> {
        for _ in 0..self.opts.users {
            let idx = self.new_user(false);
            self.connect(idx);
        }
        self.initial_left = self.opts.users;
        let mut summary = interval_at(
            Instant::now() + self.opts.summary_every,
            self.opts.summary_every,
        );
        let mut last = DemoReport::default();
        let tick = sleep(self.next_tick());
        tokio::pin!(tick);
        let outcome = loop {
            tokio::select! {
                _ = &mut stop => break Ok(()),
                Some(r) = reports.recv() => {
                    if let Err(e) = self.on_report(r) {
                        break Err(e);
                    }
                }
                _ = &mut tick => {
                    tick.as_mut().reset(Instant::now() + self.next_tick());
                    if !self.is_ready {
                        continue;
                    }
                    self.tick_no += 1;
                    self.run_due();
                    self.act();
                    self.stats.events += 1;
                    if self.opts.max_events.is_some_and(|m| self.stats.events >= m) {
                        break Ok(());
                    }
                }
                _ = summary.tick() => {
                    if self.opts.verbose {
                        println!("{}", self.summary(&last));
                    }
                    last = self.report();
                }
            }
        };
        self.shutdown(&mut reports).await;
        outcome.map(|()| self.report())
    }

    fn report(&self) -> DemoReport {
        let mut r = self.stats.clone();
        r.throttled = self.shared.throttled.get();
        r
    }

    /// Closes every session (dropping its command channel makes it say goodbye) and waits, up
    /// to a few seconds, for them to finish.
    async fn shutdown(&mut self, reports: &mut mpsc::UnboundedReceiver<Report>) {
        for u in &mut self.users {
            u.tx = None;
        }
        let online = self.online().count();
        let wait = async {
            while self.tasks > 0 {
                match reports.recv().await {
                    Some(Report::Exited) => self.tasks -= 1,
                    Some(_) => {}
                    None => break,
                }
            }
        };
        let _ = timeout(Duration::from_secs(5), wait).await;
        if self.opts.verbose {
            println!("demo: stopped; {online} sessions closed");
        }
    }

    fn next_tick(&mut self) -> Duration {
        self.opts.tick.mul_f64(self.rng.random_range(0.5..1.5))
    }

    fn online(&self) -> impl Iterator<Item = usize> + '_ {
        self.users
            .iter()
            .enumerate()
            .filter(|(_, u)| u.link == Link::Online)
            .map(|(i, _)| i)
    }

    fn occupied_rooms(&self) -> usize {
        let mut rooms = vec![false; self.room_names.len()];
        for i in self.online() {
            for &r in &self.users[i].rooms {
                rooms[r] = true;
            }
        }
        rooms.into_iter().filter(|&b| b).count()
    }

    fn summary(&self, last: &DemoReport) -> String {
        let s = self.report();
        let visitors = self.online().filter(|&i| self.users[i].visitor).count();
        let mut line = format!(
            "demo: {} sessions ({visitors} visitors) in {} rooms · joins {} (+{}) · leaves {} · status changes {} (+{}) · broadcasts {} · reconnects {}",
            self.online().count(),
            self.occupied_rooms(),
            s.joins,
            s.joins - last.joins,
            s.leaves,
            s.status_changes,
            s.status_changes - last.status_changes,
            s.broadcasts,
            s.reconnects,
        );
        if s.errors + s.refused + s.disconnects + s.throttled > 0 {
            line.push_str(&format!(
                " · errors {} · refused {} · lost {} · throttled {}",
                s.errors, s.refused, s.disconnects, s.throttled
            ));
        }
        if s.refused > last.refused {
            if let Some(why) = &self.last_refusal {
                line.push_str(&format!(" (last refusal: {why})"));
            }
        }
        line
    }

    /// A new simulated person: a unique human name, a device, one to three rooms.
    fn new_user(&mut self, visitor: bool) -> usize {
        let name = loop {
            let first = FIRST.choose(&mut self.rng).copied().unwrap_or("Alex");
            let last = LAST.choose(&mut self.rng).copied().unwrap_or("Smith");
            let n = format!("{first} {last}");
            // Past the number of combinations, a middle initial keeps names apart.
            let n = if self.names.len() >= FIRST.len() * LAST.len() / 2 {
                let initial = (b'A' + self.rng.random_range(0..26u8)) as char;
                format!("{first} {initial}. {last}")
            } else {
                n
            };
            if !self.names.contains(&n) || self.names.len() > 100_000 {
                break n;
            }
        };
        self.names.insert(name.clone());
        let slug: String = name
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('.'),
                c if c.is_ascii_alphanumeric() => Some(c),
                'ü' => Some('u'),
                _ => None,
            })
            .collect();
        let id = if visitor {
            self.visitor_serial += 1;
            format!("visitor-{}.{slug}", self.visitor_serial)
        } else {
            format!("{slug}.{}", self.users.len() + 1)
        };
        let wanted = if visitor {
            1
        } else {
            self.rng.random_range(1..=3usize)
        };
        let mut rooms: Vec<usize> = Vec::new();
        while rooms.len() < wanted.min(self.room_names.len()) {
            let r = self.pick_room();
            if !rooms.contains(&r) {
                rooms.push(r);
            }
        }
        let status = if visitor || self.rng.random_bool(0.7) {
            "online"
        } else {
            STATUSES.choose(&mut self.rng).copied().unwrap_or("online")
        };
        let user = SimUser {
            id,
            name,
            device: DEVICES.choose(&mut self.rng).copied().unwrap_or("web"),
            status,
            rooms,
            visitor,
            link: Link::Offline,
            gen: 0,
            tx: None,
            failures: 0,
            connected_once: false,
        };
        if visitor {
            if let Some(i) = self.users.iter().position(|u| u.link == Link::Free) {
                self.users[i] = user;
                return i;
            }
        }
        self.users.push(user);
        self.users.len() - 1
    }

    /// Busy rooms first: the first few rooms draw more people, like a real lobby.
    fn pick_room(&mut self) -> usize {
        let n = self.room_names.len();
        if self.rng.random_bool(0.4) {
            self.rng.random_range(0..n.min(3))
        } else {
            self.rng.random_range(0..n)
        }
    }

    fn connect(&mut self, idx: usize) {
        let u = &mut self.users[idx];
        u.gen += 1;
        u.link = Link::Connecting;
        let token = crate::auth::mint_user_token(
            &self.account.secret,
            &self.account.id,
            &u.id,
            TOKEN_TTL_S,
            Some(&u.name),
            Some(json!({ "device": u.device })),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        u.tx = Some(tx);
        let spec = Spec {
            idx,
            gen: u.gen,
            url: format!("{}{token}", self.ws_base),
            rooms: u
                .rooms
                .iter()
                .map(|&r| (self.room_names[r].clone(), u.status))
                .collect(),
        };
        self.tasks += 1;
        actix_web::rt::spawn(session(self.shared.clone(), spec, rx));
    }

    fn later(&mut self, ticks: std::ops::RangeInclusive<u64>, due: Due) {
        let at = self.tick_no + self.rng.random_range(ticks);
        self.schedule.push((at, due));
    }

    fn send(&mut self, idx: usize, cmd: Cmd) {
        if let Some(tx) = &self.users[idx].tx {
            let _ = tx.send(cmd);
        }
    }

    fn current(&self, idx: usize, gen: u64) -> bool {
        self.users.get(idx).is_some_and(|u| u.gen == gen)
    }

    fn on_report(&mut self, r: Report) -> Result<(), DemoError> {
        match r {
            Report::Exited => self.tasks = self.tasks.saturating_sub(1),
            Report::Ready { idx, gen } if self.current(idx, gen) => {
                let u = &mut self.users[idx];
                if u.link == Link::Connecting {
                    u.link = Link::Online;
                    u.failures = 0;
                    self.stats.connects += 1;
                    if u.connected_once {
                        self.stats.reconnects += 1;
                    } else {
                        u.connected_once = true;
                        self.settle_initial(idx);
                    }
                }
            }
            // A visitor who left while still connecting: nothing to retry.
            Report::Refused { idx, gen, .. } | Report::Down { idx, gen, .. }
                if self.current(idx, gen) && self.users[idx].link == Link::Free => {}
            Report::Refused { idx, gen, why } if self.current(idx, gen) => {
                self.stats.refused += 1;
                self.last_refusal = Some(why);
                self.went_offline(idx);
                if !self.users[idx].connected_once {
                    self.settle_initial(idx);
                }
            }
            Report::Down { idx, gen, why } if self.current(idx, gen) => {
                self.stats.disconnects += 1;
                self.last_refusal = Some(why);
                self.went_offline(idx);
            }
            Report::Reply { idx, gen, ack, ok } => {
                if !ok {
                    self.stats.errors += 1;
                }
                match ack {
                    Ack::Join(_) if ok => self.stats.joins += 1,
                    Ack::Join(room) => self.lost_room(idx, gen, &room),
                    Ack::Leave if ok => self.stats.leaves += 1,
                    Ack::Status if ok => self.stats.status_changes += 1,
                    Ack::Broadcast if ok => self.stats.broadcasts += 1,
                    _ => {}
                }
            }
            Report::ChannelClosed { idx, gen, room } => self.lost_room(idx, gen, &room),
            _ => {}
        }
        if !self.is_ready && self.initial_left == 0 {
            let sessions = self.online().count();
            if sessions == 0 {
                return Err(DemoError::NoSession(
                    self.last_refusal.clone().unwrap_or_else(|| "none".into()),
                ));
            }
            self.is_ready = true;
            let rooms = self.occupied_rooms();
            if self.opts.verbose {
                println!(
                    "demo: {sessions} users online in {rooms} rooms; open {}/ and watch them move (Ctrl-C stops)",
                    self.opts.url.trim_end_matches('/')
                );
            }
            if let Some(tx) = self.ready.take() {
                let _ = tx.send(Ready {
                    account_id: self.account.id.clone(),
                    sessions,
                    rooms,
                });
            }
        }
        Ok(())
    }

    fn settle_initial(&mut self, idx: usize) {
        if !self.users[idx].visitor {
            self.initial_left = self.initial_left.saturating_sub(1);
        }
    }

    /// The server refused a join or closed a channel: the user is no longer in that room.
    fn lost_room(&mut self, idx: usize, gen: u64, room: &str) {
        if !self.current(idx, gen) {
            return;
        }
        if let Some(r) = self.room_names.iter().position(|n| n == room) {
            self.users[idx].rooms.retain(|&x| x != r);
        }
    }

    /// A connection failed or was lost: try again later, backing off while it keeps failing.
    fn went_offline(&mut self, idx: usize) {
        let u = &mut self.users[idx];
        u.link = Link::Offline;
        u.tx = None;
        u.failures += 1;
        let base = 20u64 << u.failures.min(6);
        let id = u.id.clone();
        self.later(base..=base * 2, Due::Reconnect(idx, id));
    }

    fn run_due(&mut self) {
        let now = self.tick_no;
        let (due, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.schedule)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.schedule = rest;
        for (_, d) in due {
            match d {
                Due::Reconnect(idx, id) => {
                    let u = &self.users[idx];
                    if u.id == id && u.link == Link::Offline {
                        self.connect(idx);
                    }
                }
                Due::VisitorLeaves(idx, id) => {
                    let u = &mut self.users[idx];
                    if u.id == id && u.link != Link::Free {
                        // Dropping the channel makes the session close cleanly: a real leave.
                        u.tx = None;
                        u.link = Link::Free;
                        self.names.remove(&u.name.clone());
                    }
                }
            }
        }
    }

    /// One simulated action.
    fn act(&mut self) {
        let online: Vec<usize> = self.online().collect();
        let Some(&idx) = online.choose(&mut self.rng) else {
            return;
        };
        let roll = self.rng.random_range(0..100u32);
        match roll {
            0..45 => self.change_status(idx),
            45..62 => self.move_room(idx),
            62..70 if !self.users[idx].visitor => {
                self.send(idx, Cmd::Drop);
                self.stats.drops += 1;
                let u = &mut self.users[idx];
                u.link = Link::Offline;
                u.tx = None;
                let id = u.id.clone();
                // Sometimes back within the server's grace (one swap), sometimes after it.
                self.later(4..=40, Due::Reconnect(idx, id));
            }
            70..80 => self.visitor_arrives(),
            80..88 => self.broadcast(idx),
            _ => self.join_or_leave(idx),
        }
    }

    fn change_status(&mut self, idx: usize) {
        let u = &self.users[idx];
        let Some(&room) = u.rooms.choose(&mut self.rng) else {
            return self.join_or_leave(idx);
        };
        let current = u.status;
        let choices: Vec<&'static str> =
            STATUSES.iter().copied().filter(|s| *s != current).collect();
        let status = choices.choose(&mut self.rng).copied().unwrap_or("online");
        self.users[idx].status = status;
        let room = self.room_names[room].clone();
        self.send(idx, Cmd::Status(room, status));
    }

    /// Leaves one room for another.
    fn move_room(&mut self, idx: usize) {
        if let Some(&from) = self.users[idx].rooms.choose(&mut self.rng) {
            self.leave_room(idx, from);
        }
        self.join_room(idx);
    }

    fn join_or_leave(&mut self, idx: usize) {
        let n = self.users[idx].rooms.len();
        if n >= 3 || (n > 1 && self.rng.random_bool(0.5)) {
            if let Some(&r) = self.users[idx].rooms.choose(&mut self.rng) {
                self.leave_room(idx, r);
            }
        } else {
            self.join_room(idx);
        }
    }

    fn leave_room(&mut self, idx: usize, room: usize) {
        self.users[idx].rooms.retain(|&r| r != room);
        let name = self.room_names[room].clone();
        self.send(idx, Cmd::Leave(name));
    }

    fn join_room(&mut self, idx: usize) {
        let free: Vec<usize> = (0..self.room_names.len())
            .filter(|r| !self.users[idx].rooms.contains(r))
            .collect();
        let Some(&room) = free.choose(&mut self.rng) else {
            return;
        };
        self.users[idx].rooms.push(room);
        let status = self.users[idx].status;
        let name = self.room_names[room].clone();
        self.send(idx, Cmd::Join(name, status));
    }

    fn visitor_arrives(&mut self) {
        let here = self
            .users
            .iter()
            .filter(|u| u.visitor && u.link != Link::Free)
            .count();
        if here >= self.visitor_cap {
            return;
        }
        let idx = self.new_user(true);
        self.stats.visitors += 1;
        self.connect(idx);
        let id = self.users[idx].id.clone();
        self.later(20..=120, Due::VisitorLeaves(idx, id));
    }

    fn broadcast(&mut self, idx: usize) {
        let Some(&room) = self.users[idx].rooms.choose(&mut self.rng) else {
            return;
        };
        let room = self.room_names[room].clone();
        let (event, payload) = match self.rng.random_range(0..3u8) {
            0 => ("typing", json!({ "on": true })),
            1 => {
                let emoji = ["👋", "🎉", "👍", "☕"].choose(&mut self.rng).copied();
                ("reaction", json!({ "emoji": emoji }))
            }
            _ => (
                "message",
                json!({ "text": "Has anyone seen the latest build?" }),
            ),
        };
        self.send(idx, Cmd::Broadcast(room, event, payload));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        assert_eq!(
            base_url("http://127.0.0.1:4000/").unwrap(),
            "http://127.0.0.1:4000"
        );
        assert_eq!(base_url("http://localhost").unwrap(), "http://localhost");
        assert!(base_url("https://x.example").is_err());
        assert!(base_url("not a url").is_err());
    }

    #[test]
    fn too_many_users_is_refused_clearly() {
        let o = DemoOptions {
            users: MAX_USERS + 1,
            password: "x".into(),
            ..DemoOptions::default()
        };
        let e = validate(&o).unwrap_err().to_string();
        assert!(e.contains("at most 15000"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn a_429_halves_the_connect_rate_and_successes_restore_it() {
        let mut l = Limiter::new(100);
        l.throttled();
        assert_eq!(l.rate, 50.0);
        for _ in 0..80 {
            l.succeeded();
        }
        assert_eq!(l.rate, 100.0);
        let mut slow = Limiter::new(1);
        slow.throttled();
        assert_eq!(slow.rate, 1.0, "never below one a second");
    }

    #[test]
    fn rooms_beyond_the_built_in_names_are_numbered() {
        let r = room_names(18);
        assert_eq!(r[0], "lobby");
        assert_eq!(r[17], "room-18");
        assert_eq!(r.iter().collect::<HashSet<_>>().len(), 18);
    }

    #[test]
    fn frames_are_phoenix_v2() {
        let j: Value = serde_json::from_str(&phx::join(7, "lobby", "away")).unwrap();
        assert_eq!(
            j,
            json!(["7", "7", "room:lobby", "phx_join", {"status": "away"}])
        );
        let h: Value = serde_json::from_str(&phx::heartbeat(8)).unwrap();
        assert_eq!(h, json!([null, "8", "phoenix", "heartbeat", {}]));
        assert_eq!(
            phx::read(br#"["7","7","room:lobby","phx_reply",{"status":"ok","response":{}}]"#),
            phx::Incoming::Reply {
                msg_ref: 7,
                ok: true
            }
        );
        assert_eq!(
            phx::read(br#"[null,"9","room:x","phx_reply",{"status":"error","response":{}}]"#),
            phx::Incoming::Reply {
                msg_ref: 9,
                ok: false
            }
        );
        assert_eq!(
            phx::read(br#"[null,null,"room:lobby","presence_diff",{"joins":{},"leaves":{}}]"#),
            phx::Incoming::Other
        );
        assert_eq!(
            phx::read(br#"["3",null,"room:ops","phx_close",{}]"#),
            phx::Incoming::Closed {
                room: "ops".into(),
                join_ref: "3".into()
            }
        );
    }
}
