//! One worker: its share of the sessions, each a task on this thread holding one lean
//! tokio-tungstenite client (bound to one of the worker's source addresses), and a director
//! that paces connections, makes the changes and counts what comes back.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use actix_web::rt::time::{interval, sleep_until, timeout, Instant};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::net::TcpSocket;
// A session's commands stay on its worker's thread: a single-threaded channel, whose empty
// check (made at every wake of the session, for each frame it reads) is a look at its queue
// rather than at a shared channel block through atomics.
use local_channel::mpsc as local;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::arrival::Stamped;
use super::stats::{self, Event, Totals};
use super::{LoadOptions, Scenario};
use crate::demo::Limiter;

/// Lifetime of the minted user tokens.
const TOKEN_TTL_S: u64 = 24 * 3600;
/// The key of the send timestamp (unix µs) in a meta or a broadcast payload.
pub const STAMP: &str = "_lt";
/// Against a cluster: the index (in `--url`) of the node the change was made on, just before the
/// stamp (keys are sorted), so receivers can tell same-node from cross-node deliveries.
pub const NODE: &str = "_ln";
const NODE_PAT: &[u8] = b"\"_ln\":";
const STAMP_PAT: &[u8] = b"\"_lt\":";
const STATUSES: [&str; 3] = ["online", "away", "busy"];

/// Which sessions a worker runs, and its part of the rates.
#[derive(Debug, Clone)]
pub struct Share {
    pub index: usize,
    pub of: usize,
    pub account_id: String,
    pub secret: String,
    /// Source addresses to bind the client sockets to (none: the kernel chooses).
    pub sources: Vec<IpAddr>,
}

impl Share {
    /// Global session numbers of this worker: `index`, `index + of`, …
    fn sessions(&self, total: usize) -> Vec<usize> {
        (self.index..total).step_by(self.of.max(1)).collect()
    }

    fn part(&self, total: u32) -> f64 {
        f64::from(total) / self.of.max(1) as f64
    }
}

pub fn room_name(scenario: Scenario, room: usize) -> String {
    match scenario {
        Scenario::Fanout | Scenario::Broadcast => "load-fanout".to_string(),
        _ => format!("load-{room}"),
    }
}

fn room_of(o: &LoadOptions, g: usize) -> usize {
    match o.scenario {
        Scenario::Fanout | Scenario::Broadcast => 0,
        _ => g % o.rooms.max(1),
    }
}

/// Counters every session of the worker writes into.
struct Counters {
    /// Start of the measured phase (unix µs).
    steady_since: Option<u64>,
    ramp_hist: Histogram<u64>,
    hist: Histogram<u64>,
    /// Measured phase, cluster runs only: deliveries made on the node the change was made on,
    /// and on another node.
    same_node_hist: Histogram<u64>,
    cross_node_hist: Histogram<u64>,
    /// Measured phase: delays to the arrival in the socket (kernel stamp).
    arrival_hist: Histogram<u64>,
    second: Histogram<u64>,
    connect_hist: Histogram<u64>,
    ramp_deliveries: u64,
    deliveries: u64,
    second_deliveries: u64,
    frames: u64,
    changes: u64,
    second_changes: u64,
    reconnects: u64,
    throttled: u64,
    errors: BTreeMap<String, u64>,
    /// Per change stamp: the longest delay and the receivers (fanout and broadcast only).
    last: Option<HashMap<u64, (u64, u64)>>,
}

impl Counters {
    fn error(&mut self, why: impl Into<String>) {
        *self.errors.entry(why.into()).or_default() += 1;
    }

    /// One timestamped delivery: `us` its delay to now, `arrived_us` to the moment its bytes
    /// reached the socket (kernel stamp), `cross` whether it came from another node.
    fn delivered(&mut self, stamp: u64, us: u64, arrived_us: Option<u64>, cross: Option<bool>) {
        self.second_deliveries += 1;
        // Stamped before the measured phase: a delivery of a ramp join (late, if the measured
        // phase has begun: kept out of the per-second figure too).
        if self.steady_since.is_none_or(|t| stamp < t) {
            if self.steady_since.is_none() {
                stats::record(&mut self.second, us);
            }
            stats::record(&mut self.ramp_hist, us);
            self.ramp_deliveries += 1;
            return;
        }
        stats::record(&mut self.second, us);
        stats::record(&mut self.hist, us);
        match cross {
            Some(true) => stats::record(&mut self.cross_node_hist, us),
            Some(false) => stats::record(&mut self.same_node_hist, us),
            None => {}
        }
        if let Some(a) = arrived_us {
            stats::record(&mut self.arrival_hist, a);
        }
        self.deliveries += 1;
        if let Some(last) = &mut self.last {
            let e = last.entry(stamp).or_default();
            e.0 = e.0.max(us);
            e.1 += 1;
        }
    }
}

struct Shared {
    /// Each node's address and `Host`; session `g` goes to `targets[g % len]`.
    targets: Vec<(SocketAddr, String)>,
    path: String,
    account_id: String,
    secret: String,
    sources: Vec<IpAddr>,
    limiter: RefCell<Limiter>,
    counters: RefCell<Counters>,
    reports: mpsc::UnboundedSender<Report>,
    /// Sessions connected right now.
    online: Cell<u64>,
}

enum Cmd {
    Status,
    /// Leave the room, join another.
    Move(String),
    /// Drop the TCP connection without a goodbye and come back at once (same device).
    Reconnect,
    Broadcast,
    Heartbeat,
}

enum Report {
    /// First connection joined (or failed: `Err(reason)`).
    Settled(usize, Result<(), String>),
    Exited,
}

type Ws = WebSocketStream<Stamped>;

/// Each client socket's receive buffer (the kernel doubles it for its bookkeeping). Left to
/// itself the kernel grows a busy socket's buffer up to `tcp_rmem`'s maximum (32 MiB here):
/// in a fanout ramp, 10 000 sockets each holding megabytes of `presence_state` and join diffs
/// pushed the machine into TCP memory pressure, where loopback drops packets and senders back
/// off for seconds (`TcpExtTCPRcvQDrop`, `TCPTimeouts` in `nstat`), and measured changes then
/// reached a few members seconds late. A bounded window makes the node wait for the reader
/// instead, which is the backpressure its slow-consumer rule is made for.
const RECV_BUFFER: u32 = 64 << 10;

fn ws_config() -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    // Small buffers: a session holds little while idle; a large presence_state grows the read
    // buffer only while it is read.
    c.read_buffer_size = 4096;
    c.write_buffer_size = 0;
    c.max_write_buffer_size = 256 << 10;
    c.max_message_size = Some(256 << 20);
    c.max_frame_size = Some(256 << 20);
    c
}

fn frame(join_ref: Option<&str>, r: u64, topic: &str, event: &str, p: &Value) -> String {
    let jr = join_ref.map_or(Value::Null, Value::from);
    presence_actors::protocol::encode(&jr, &Value::from(r.to_string()), topic, event, p).to_string()
}

/// Why a connection attempt ended.
enum ConnectErr {
    /// 429: try again after the limiter's pause.
    Throttled,
    Failed(String),
}

async fn connect_once(sh: &Shared, g: usize, src: Option<IpAddr>) -> Result<Ws, ConnectErr> {
    let failed = |e: std::io::Error| ConnectErr::Failed(format!("connect: {}", e.kind()));
    let sock = TcpSocket::new_v4().map_err(failed)?;
    // Fixed before the handshake (the window scale is agreed in it), so the kernel does not
    // grow it on its own.
    let _ = sock.set_recv_buffer_size(RECV_BUFFER);
    if let Some(ip) = src {
        sock.bind(SocketAddr::new(ip, 0))
            .map_err(|e| ConnectErr::Failed(format!("bind {ip}: {}", e.kind())))?;
    }
    let (target, host) = &sh.targets[g % sh.targets.len()];
    let tcp = sock.connect(*target).await.map_err(failed)?;
    let _ = tcp.set_nodelay(true);
    let token = crate::auth::mint_user_token(
        &sh.secret,
        &sh.account_id,
        &format!("load-{g}"),
        TOKEN_TTL_S,
        Some(&format!("Load {g}")),
        Some(json!({ "device": "load" })),
    );
    let url = format!("ws://{host}{}?vsn=2.0.0&token={token}", sh.path);
    let tcp = Stamped::new(tcp);
    match tokio_tungstenite::client_async_with_config(url, tcp, Some(ws_config())).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(res)) if res.status().as_u16() == 429 => {
            Err(ConnectErr::Throttled)
        }
        Err(tungstenite::Error::Http(res)) => Err(ConnectErr::Failed(format!(
            "upgrade: HTTP {}",
            res.status().as_u16()
        ))),
        Err(e) => Err(ConnectErr::Failed(format!("handshake: {e}"))),
    }
}

/// Connects within the worker's rate, retrying 429s; `Err` with the reason otherwise. With the
/// socket, the moment its (last) attempt started.
async fn connect(sh: &Shared, g: usize) -> Result<(Ws, Instant), String> {
    let src = (!sh.sources.is_empty()).then(|| sh.sources[g % sh.sources.len()]);
    loop {
        let slot = sh.limiter.borrow_mut().slot();
        sleep_until(slot).await;
        let attempt = Instant::now();
        match timeout(Duration::from_secs(60), connect_once(sh, g, src)).await {
            Ok(Ok(ws)) => {
                sh.limiter.borrow_mut().succeeded();
                return Ok((ws, attempt));
            }
            Ok(Err(ConnectErr::Throttled)) => {
                sh.counters.borrow_mut().throttled += 1;
                sh.limiter.borrow_mut().throttled();
            }
            Ok(Err(ConnectErr::Failed(why))) => return Err(why),
            Err(_) => return Err("connect: timed out".into()),
        }
    }
}

/// The server's reason in an error reply, else "error".
fn reason_of(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v[4]["response"]["reason"].as_str().map(String::from))
        .unwrap_or_else(|| "error".into())
}

/// Records every timestamp in the `joins` of a presence diff, or in a broadcast payload: its
/// delay to now, and to `arrived` (when the frame's bytes reached the socket, unix µs).
/// `here`: against a cluster, the node this receiver is on.
fn scan(text: &[u8], c: &mut Counters, here: Option<usize>, arrived: Option<u64>) {
    c.frames += 1;
    // Pushes to every member carry no refs: `[null,null,"room:…","<event>",…`.
    let Some(rest) = text.strip_prefix(b"[null,null,\"") else {
        return;
    };
    let Some(end_topic) = rest.iter().position(|&b| b == b'"') else {
        return;
    };
    let rest = &rest[end_topic..];
    let body = if let Some(diff) = rest.strip_prefix(b"\",\"presence_diff\",") {
        // Only the joins: the leaves of an update carry the old meta and its old stamp.
        match LEAVES.find(diff) {
            Some(i) => &diff[..i],
            None => diff,
        }
    } else if rest.starts_with(b"\",\"presence_state\",") {
        return;
    } else {
        rest
    };
    let now = stats::now_us();
    let mut at = 0;
    while let Some(i) = STAMPS.find(&body[at..]) {
        let start = at + i + STAMP_PAT.len();
        let digits = body[start..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        if let Some(t) = std::str::from_utf8(&body[start..start + digits])
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            // `"_ln":<node>,` right before the stamp names the node the change came from.
            let head = &body[..at + i];
            let from = head
                .strip_suffix(b",")
                .and_then(|h| {
                    let digits = h.iter().rev().take_while(|b| b.is_ascii_digit()).count();
                    let (h, d) = h.split_at(h.len() - digits);
                    h.ends_with(NODE_PAT).then_some(d)
                })
                .and_then(|d| std::str::from_utf8(d).ok()?.parse::<usize>().ok());
            let cross = match (here, from) {
                (Some(h), Some(f)) => Some(h != f),
                _ => None,
            };
            let to_socket = arrived.map(|a| a.saturating_sub(t));
            c.delivered(t, now.saturating_sub(t), to_socket, cross);
        }
        at = start + digits;
    }
}

/// Where the stamps and the leaves are in a frame: the generator scans every byte it receives,
/// so the search is memchr's (SIMD), built once.
static STAMPS: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(STAMP_PAT));
static LEAVES: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"leaves\":"));

struct Session {
    g: usize,
    /// Against a cluster: the index of the node this session is on.
    node: Option<usize>,
    room: String,
    next_ref: u64,
    join_ref: String,
    status: usize,
    /// Refs waiting for a reply, and what they were.
    pending: Vec<(u64, &'static str)>,
    /// The first join's ref and when the connection attempt started.
    first: Option<(u64, Instant)>,
    /// Counted in `Shared::online`.
    counted: bool,
    /// The first connection's outcome was reported.
    settled: bool,
    /// Changes that arrived while a join was in flight.
    deferred: Vec<Cmd>,
}

impl Session {
    fn take_ref(&mut self) -> u64 {
        self.next_ref += 1;
        self.next_ref
    }

    fn joining(&self) -> bool {
        self.pending.iter().any(|(_, what)| *what == "join")
    }

    fn meta(&self) -> Value {
        match self.node {
            Some(n) => json!({ NODE: n, STAMP: stats::stamp_us(), "device": "load" }),
            None => json!({ STAMP: stats::stamp_us(), "device": "load" }),
        }
    }

    async fn join(&mut self, ws: &mut Ws) -> Result<u64, String> {
        let r = self.take_ref();
        self.join_ref = r.to_string();
        self.pending.push((r, "join"));
        let topic = format!("room:{}", self.room);
        let p = json!({ "status": STATUSES[self.status], "meta": self.meta() });
        send(ws, frame(Some(&self.join_ref), r, &topic, "phx_join", &p)).await?;
        Ok(r)
    }

    async fn command(&mut self, ws: &mut Ws, cmd: Cmd) -> Result<(), String> {
        let topic = format!("room:{}", self.room);
        match cmd {
            Cmd::Status => {
                self.status = (self.status + 1) % STATUSES.len();
                let r = self.take_ref();
                self.pending.push((r, "status"));
                let p = json!({ "status": STATUSES[self.status], "meta": self.meta() });
                send(ws, frame(Some(&self.join_ref), r, &topic, "status", &p)).await
            }
            Cmd::Move(to) => {
                let r = self.take_ref();
                self.pending.push((r, "leave"));
                send(
                    ws,
                    frame(Some(&self.join_ref), r, &topic, "phx_leave", &json!({})),
                )
                .await?;
                self.room = to;
                self.join(ws).await.map(|_| ())
            }
            Cmd::Broadcast => {
                let r = self.take_ref();
                self.pending.push((r, "broadcast"));
                let payload = match self.node {
                    Some(n) => json!({ NODE: n, STAMP: stats::stamp_us() }),
                    None => json!({ STAMP: stats::stamp_us() }),
                };
                let p = json!({ "event": "load", "payload": payload });
                send(ws, frame(Some(&self.join_ref), r, &topic, "broadcast", &p)).await
            }
            Cmd::Heartbeat => {
                let r = self.take_ref();
                send(ws, frame(None, r, "phoenix", "heartbeat", &json!({}))).await
            }
            Cmd::Reconnect => Ok(()),
        }
    }

    /// A frame with refs: a reply to one of ours (or a phx_close/phx_error of our channel).
    fn answer(&mut self, sh: &Shared, text: &str) {
        #[derive(serde::Deserialize)]
        struct Head(
            serde::de::IgnoredAny,
            Value,
            serde::de::IgnoredAny,
            String,
            serde::de::IgnoredAny,
        );
        let Ok(Head(_, msg_ref, _, event, _)) = serde_json::from_str::<Head>(text) else {
            return;
        };
        if event == "phx_close" || event == "phx_error" {
            sh.counters.borrow_mut().error(format!("channel: {event}"));
            return;
        }
        let Some(r) = msg_ref.as_str().and_then(|r| r.parse::<u64>().ok()) else {
            return;
        };
        let Some(i) = self.pending.iter().position(|(p, _)| *p == r) else {
            return;
        };
        let (_, what) = self.pending.swap_remove(i);
        let ok = text.contains("\"status\":\"ok\"");
        if !ok {
            sh.counters
                .borrow_mut()
                .error(format!("{what}: {}", reason_of(text)));
        }
        if let Some((first, started)) = self.first {
            if first == r {
                self.first = None;
                self.settled = true;
                let us = started.elapsed().as_micros() as u64;
                if ok {
                    stats::record(&mut sh.counters.borrow_mut().connect_hist, us);
                    sh.online.set(sh.online.get() + 1);
                    self.counted = true;
                    let _ = sh.reports.send(Report::Settled(self.g, Ok(())));
                } else {
                    let _ = sh
                        .reports
                        .send(Report::Settled(self.g, Err("join refused".into())));
                }
            }
        }
    }
}

async fn send(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("send: {e}"))
}

/// How one connection of a session ended.
enum End {
    Stop,
    Reconnect,
}

async fn session(sh: Rc<Shared>, g: usize, room: String, mut cmds: local::Receiver<Cmd>) {
    let nodes = sh.targets.len();
    let mut s = Session {
        g,
        node: (nodes > 1).then_some(g % nodes),
        room,
        next_ref: 0,
        join_ref: String::new(),
        status: 0,
        pending: Vec::new(),
        first: None,
        counted: false,
        settled: false,
        deferred: Vec::new(),
    };
    let mut first = true;
    loop {
        let ws = tokio::select! {
            r = connect(&sh, g) => r,
            // Told to stop before being connected.
            _ = closed(&mut cmds) => break,
        };
        let (mut ws, started) = match ws {
            Ok(ws) => ws,
            Err(why) => {
                sh.counters.borrow_mut().error(why.clone());
                if !s.settled {
                    s.settled = true;
                    let _ = sh.reports.send(Report::Settled(g, Err(why)));
                }
                break;
            }
        };
        s.pending.clear();
        let joined = s.join(&mut ws).await;
        if first {
            if let Ok(r) = joined {
                s.first = Some((r, started));
            }
        } else if joined.is_ok() {
            sh.online.set(sh.online.get() + 1);
            s.counted = true;
        }
        let ended = match joined {
            Ok(_) => drive(&sh, &mut s, &mut ws, &mut cmds).await,
            Err(why) => Err(why),
        };
        if s.counted {
            s.counted = false;
            sh.online.set(sh.online.get().saturating_sub(1));
        }
        match ended {
            Ok(End::Stop) => {
                let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                break;
            }
            Ok(End::Reconnect) => {
                drop(ws);
                sh.counters.borrow_mut().reconnects += 1;
                first = false;
            }
            Err(why) => {
                sh.counters.borrow_mut().error(why.clone());
                if !s.settled {
                    s.settled = true;
                    let _ = sh.reports.send(Report::Settled(g, Err(why)));
                }
                break;
            }
        }
    }
    let _ = sh.reports.send(Report::Exited);
}

/// Completes when the command channel is closed (the director is done with the session).
async fn closed(cmds: &mut local::Receiver<Cmd>) {
    while cmds.recv().await.is_some() {}
}

async fn drive(
    sh: &Shared,
    s: &mut Session,
    ws: &mut Ws,
    cmds: &mut local::Receiver<Cmd>,
) -> Result<End, String> {
    loop {
        tokio::select! {
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(t))) => {
                    if t.as_str().starts_with("[null,null,") {
                        let arrived = ws.get_ref().arrived_us();
                        scan(t.as_bytes(), &mut sh.counters.borrow_mut(), s.node, arrived);
                    } else {
                        sh.counters.borrow_mut().frames += 1;
                        s.answer(sh, t.as_str());
                        while !s.joining() && !s.deferred.is_empty() {
                            match s.deferred.remove(0) {
                                Cmd::Reconnect => return Ok(End::Reconnect),
                                c => s.command(ws, c).await?,
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    return Err(match c {
                        Some(c) if !c.reason.is_empty() => format!("closed by the server: {}", c.reason),
                        _ => "closed by the server".into(),
                    });
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(format!("connection: {e}")),
                None => return Err("connection lost".into()),
            },
            cmd = cmds.recv() => match cmd {
                None => return Ok(End::Stop),
                Some(Cmd::Heartbeat) => s.command(ws, Cmd::Heartbeat).await?,
                // A join in flight: changes wait for its reply (a status pushed before the join
                // is done would be refused as not_joined).
                Some(c) if s.joining() => s.deferred.push(c),
                Some(Cmd::Reconnect) => return Ok(End::Reconnect),
                Some(c) => s.command(ws, c).await?,
            },
        }
    }
}

struct Handle {
    g: usize,
    room: usize,
    tx: Option<local::Sender<Cmd>>,
    up: bool,
}

/// Runs one worker: connects its sessions, says `Ready`, waits for `go`, makes its share of the
/// changes for `duration`, closes everything and says `Final`. Events go to `out`.
pub async fn run(
    o: LoadOptions,
    share: Share,
    go: impl Future<Output = ()>,
    out: mpsc::UnboundedSender<Event>,
) {
    let worker = share.index;
    stats::set_stamp_share(share.index, share.of);
    let fatal = |why: String| {
        let _ = out.send(Event::Fatal { worker, why });
    };
    let mut targets = Vec::new();
    let mut path = String::new();
    for url in o.urls() {
        match endpoint(url).await {
            Ok((t, h, p)) => {
                targets.push((t, h));
                path = p;
            }
            Err(e) => return fatal(e),
        }
    }
    if targets.is_empty() {
        return fatal("--url names no node".into());
    }
    let (reports_tx, mut reports) = mpsc::unbounded_channel();
    let rate = share.part(o.rate).max(1.0).ceil() as u32;
    let sh = Rc::new(Shared {
        targets,
        path,
        account_id: share.account_id.clone(),
        secret: share.secret.clone(),
        sources: share.sources.clone(),
        limiter: RefCell::new(Limiter::new(rate)),
        counters: RefCell::new(Counters {
            steady_since: None,
            ramp_hist: stats::histogram(),
            hist: stats::histogram(),
            same_node_hist: stats::histogram(),
            cross_node_hist: stats::histogram(),
            arrival_hist: stats::histogram(),
            second: stats::small_histogram(),
            connect_hist: stats::histogram(),
            ramp_deliveries: 0,
            deliveries: 0,
            second_deliveries: 0,
            frames: 0,
            changes: 0,
            second_changes: 0,
            reconnects: 0,
            throttled: 0,
            errors: BTreeMap::new(),
            last: matches!(o.scenario, Scenario::Fanout | Scenario::Broadcast).then(HashMap::new),
        }),
        reports: reports_tx,
        online: Cell::new(0),
    });
    let mut handles: Vec<Handle> = share
        .sessions(o.sessions)
        .into_iter()
        .map(|g| Handle {
            g,
            room: room_of(&o, g),
            tx: None,
            up: false,
        })
        .collect();
    let started = Instant::now();
    let cpu_at_start = stats::cpu_seconds(None).unwrap_or(0.0);
    let wait_at_start = stats::cpu_wait_seconds(None);
    // The ramp ends with the last first join answered ok (failures may take a timeout longer).
    let mut last_ok = started;
    let mut tasks = 0usize;
    for h in &mut handles {
        let (tx, rx) = local::channel();
        h.tx = Some(tx);
        tasks += 1;
        actix_web::rt::spawn(session(sh.clone(), h.g, room_name(o.scenario, h.room), rx));
    }
    let index_of = |handles: &[Handle], g: usize| handles.iter().position(|h| h.g == g);
    let mut rng = StdRng::from_os_rng();
    let mut ticker = interval(Duration::from_millis(10));
    let hb_slots = (o.heartbeat.as_millis() / 10).max(1) as usize;
    let mut tick_no = 0usize;
    let mut sec = stats::now_us() / 1_000_000;
    let (mut settled, mut connected, mut failed) = (0usize, 0u64, 0u64);
    let mut ramp_ms = 0;
    let mut ready = handles.is_empty();
    // In one big room every join is a diff to every member already in: N²/2 deliveries.
    let storm = match o.scenario {
        Scenario::Fanout | Scenario::Broadcast => (o.sessions as f64).powi(2) / 2.0 / 50_000.0,
        _ => 0.0,
    };
    let ramp_limit = started
        + Duration::from_secs_f64(handles.len() as f64 / f64::from(rate) * 4.0 + 60.0 + storm);
    if ready {
        let _ = out.send(Event::Ready {
            worker,
            connected: 0,
            failed: 0,
            ramp_ms: 0,
        });
    }
    let mut go = std::pin::pin!(go);
    let mut going = false;
    let mut steady_since: Option<Instant> = None;
    let mut sent = 0u64;
    let broadcaster = matches!(o.scenario, Scenario::Broadcast) && share.index == 0;
    // One member broadcasts: worker 0 makes them all.
    let per_s = if broadcaster {
        f64::from(o.changes)
    } else {
        share.part(o.changes)
    };
    let changes_here = match o.scenario {
        Scenario::Connect | Scenario::Demo => false,
        Scenario::Broadcast => broadcaster,
        _ => true,
    };
    loop {
        tokio::select! {
            Some(r) = reports.recv() => match r {
                Report::Settled(g, res) => {
                    settled += 1;
                    match res {
                        Ok(()) => {
                            connected += 1;
                            last_ok = Instant::now();
                            if let Some(i) = index_of(&handles, g) {
                                handles[i].up = true;
                            }
                        }
                        Err(_) => failed += 1,
                    }
                }
                Report::Exited => tasks = tasks.saturating_sub(1),
            },
            _ = &mut go, if ready && !going => {
                going = true;
                steady_since = Some(Instant::now());
                sh.counters.borrow_mut().steady_since = Some(stats::now_us());
            }
            _ = ticker.tick() => {
                tick_no += 1;
                // Heartbeats: every session once per `heartbeat`, spread over the ticks.
                let slot = tick_no % hb_slots;
                for h in handles.iter().skip(slot).step_by(hb_slots) {
                    if let Some(tx) = &h.tx {
                        let _ = tx.send(Cmd::Heartbeat);
                    }
                }
                if let (Some(since), true) = (steady_since, changes_here) {
                    let due = (since.elapsed().as_secs_f64() * per_s) as u64;
                    while sent < due {
                        sent += 1;
                        change(&o, &handles, &mut rng, broadcaster);
                        let mut c = sh.counters.borrow_mut();
                        c.changes += 1;
                        c.second_changes += 1;
                    }
                }
                let now_sec = stats::now_us() / 1_000_000;
                if now_sec != sec {
                    let mut c = sh.counters.borrow_mut();
                    let hist = stats::encode(&c.second);
                    c.second.reset();
                    let _ = out.send(Event::Tick {
                        worker,
                        sec,
                        sessions: sh.online.get(),
                        changes: std::mem::take(&mut c.second_changes),
                        deliveries: std::mem::take(&mut c.second_deliveries),
                        hist,
                    });
                    sec = now_sec;
                }
                if let Some(since) = steady_since {
                    if since.elapsed() >= o.duration {
                        break;
                    }
                }
            }
        }
        if !ready && (settled >= handles.len() || Instant::now() >= ramp_limit) {
            ready = true;
            ramp_ms = last_ok.duration_since(started).as_millis() as u64;
            let _ = out.send(Event::Ready {
                worker,
                connected,
                failed,
                ramp_ms,
            });
        }
    }
    // Goodbye: closing the command channels makes every session close its socket.
    for h in &mut handles {
        h.tx = None;
    }
    let _ = timeout(Duration::from_secs(5), async {
        while tasks > 0 {
            match reports.recv().await {
                Some(Report::Exited) => tasks -= 1,
                Some(_) => {}
                None => break,
            }
        }
    })
    .await;
    let c = sh.counters.borrow();
    let _ = out.send(Event::Final(Box::new(Totals {
        worker,
        connected,
        failed,
        ramp_ms,
        changes: c.changes,
        ramp_deliveries: c.ramp_deliveries,
        deliveries: c.deliveries,
        frames: c.frames,
        reconnects: c.reconnects,
        throttled: c.throttled,
        errors: c.errors.clone(),
        ramp_hist: stats::encode(&c.ramp_hist),
        hist: stats::encode(&c.hist),
        same_node_hist: stats::encode(&c.same_node_hist),
        cross_node_hist: stats::encode(&c.cross_node_hist),
        arrival_hist: stats::encode(&c.arrival_hist),
        connect_hist: stats::encode(&c.connect_hist),
        last: c
            .last
            .iter()
            .flatten()
            .map(|(&stamp, &(us, n))| (stamp, us, n))
            .collect(),
        cpu_s: stats::cpu_seconds(None).unwrap_or(0.0) - cpu_at_start,
        cpu_wait_s: stats::grown(wait_at_start, stats::cpu_wait_seconds(None)),
    })));
}

/// One change, by a random connected session of this worker.
fn change(o: &LoadOptions, handles: &[Handle], rng: &mut StdRng, broadcaster: bool) {
    if broadcaster {
        if let Some(tx) = handles.iter().find(|h| h.up).and_then(|h| h.tx.as_ref()) {
            let _ = tx.send(Cmd::Broadcast);
        }
        return;
    }
    if handles.is_empty() {
        return;
    }
    // A few tries to find a session that is up.
    for _ in 0..8 {
        let h = &handles[rng.random_range(0..handles.len())];
        let (true, Some(tx)) = (h.up, h.tx.as_ref()) else {
            continue;
        };
        let roll = rng.random_range(0..100u32);
        let cmd = match o.scenario {
            Scenario::Fanout => Cmd::Status,
            Scenario::Mixed if roll < 20 => Cmd::Broadcast,
            _ if roll < 60 => Cmd::Status,
            _ if roll < 80 && o.rooms > 1 => {
                Cmd::Move(room_name(o.scenario, rng.random_range(0..o.rooms)))
            }
            _ if roll < 80 => Cmd::Status,
            _ => Cmd::Reconnect,
        };
        let _ = tx.send(cmd);
        return;
    }
}

/// The node's address, `Host` and socket path from `--url`.
async fn endpoint(url: &str) -> Result<(SocketAddr, String, String), String> {
    let base = crate::demo::base_url(url).map_err(|e| e.to_string())?;
    let u = url::Url::parse(&base).map_err(|e| e.to_string())?;
    let host = u.host_str().unwrap_or("127.0.0.1").to_string();
    let port = u.port().unwrap_or(80);
    let target = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| format!("{host} has no IPv4 address"))?;
    Ok((target, format!("{host}:{port}"), "/socket/websocket".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters() -> Counters {
        Counters {
            steady_since: None,
            ramp_hist: stats::histogram(),
            hist: stats::histogram(),
            same_node_hist: stats::histogram(),
            cross_node_hist: stats::histogram(),
            arrival_hist: stats::histogram(),
            second: stats::small_histogram(),
            connect_hist: stats::histogram(),
            ramp_deliveries: 0,
            deliveries: 0,
            second_deliveries: 0,
            frames: 0,
            changes: 0,
            second_changes: 0,
            reconnects: 0,
            throttled: 0,
            errors: BTreeMap::new(),
            last: Some(HashMap::new()),
        }
    }

    #[test]
    fn only_the_joins_of_a_diff_and_broadcasts_are_stamped_deliveries() {
        let mut c = counters();
        let t = stats::now_us();
        c.steady_since = Some(t - 10);
        // An update: the new meta in joins, the old one (older stamp) in leaves.
        let diff = format!(
            r#"[null,null,"room:a","presence_diff",{{"joins":{{"u1":{{"metas":[{{"_lt":{t},"status":"away"}}]}}}},"leaves":{{"u1":{{"metas":[{{"_lt":5,"status":"online"}}]}}}}}}]"#
        );
        scan(diff.as_bytes(), &mut c, None, None);
        assert_eq!((c.deliveries, c.ramp_deliveries), (1, 0));
        let state = format!(
            r#"[null,null,"room:a","presence_state",{{"u1":{{"metas":[{{"_lt":{t}}}]}}}}]"#
        );
        scan(state.as_bytes(), &mut c, None, None);
        assert_eq!(c.deliveries, 1, "presence_state is not a delivery");
        let b = format!(r#"[null,null,"room:a","load",{{"_lt":{t}}}]"#);
        scan(b.as_bytes(), &mut c, None, None);
        assert_eq!(c.deliveries, 2);
        assert_eq!(
            c.last.as_ref().unwrap()[&t].1,
            2,
            "two receipts of one change"
        );
        // A stamp from before the measured phase is a late ramp delivery.
        let old = r#"[null,null,"room:a","presence_diff",{"joins":{"u2":{"metas":[{"_lt":7}]}},"leaves":{}}]"#;
        scan(old.as_bytes(), &mut c, None, None);
        assert_eq!((c.deliveries, c.ramp_deliveries), (2, 1));
        assert_eq!(c.frames, 4);
    }

    #[test]
    fn against_a_cluster_each_delivery_is_same_node_or_cross_node() {
        let mut c = counters();
        let t = stats::now_us();
        c.steady_since = Some(t - 10);
        let from = |n: usize| {
            format!(
                r#"[null,null,"room:a","presence_diff",{{"joins":{{"u1":{{"metas":[{{"_ln":{n},"_lt":{t},"device":"load"}}]}}}},"leaves":{{}}}}]"#
            )
        };
        scan(from(0).as_bytes(), &mut c, Some(0), None);
        scan(from(2).as_bytes(), &mut c, Some(0), None);
        scan(from(12).as_bytes(), &mut c, Some(0), None);
        assert_eq!(c.same_node_hist.len(), 1);
        assert_eq!(c.cross_node_hist.len(), 2);
        // A single node: no split.
        scan(from(0).as_bytes(), &mut c, None, None);
        assert_eq!(c.same_node_hist.len() + c.cross_node_hist.len(), 3);
        assert_eq!(c.deliveries, 4);
    }

    #[test]
    fn the_delay_to_the_socket_is_recorded_apart_and_only_in_the_measured_phase() {
        let mut c = counters();
        let t = stats::now_us();
        c.steady_since = Some(t - 10);
        let diff = format!(
            r#"[null,null,"room:a","presence_diff",{{"joins":{{"u1":{{"metas":[{{"_lt":{t}}}]}}}},"leaves":{{}}}}]"#
        );
        scan(diff.as_bytes(), &mut c, None, Some(t + 300));
        assert_eq!(c.arrival_hist.len(), 1);
        assert_eq!(c.arrival_hist.max(), c.arrival_hist.highest_equivalent(300));
        assert_eq!(c.hist.len(), 1, "the delay to now is recorded as before");
        // No kernel stamp: nothing recorded apart.
        scan(diff.as_bytes(), &mut c, None, None);
        assert_eq!((c.arrival_hist.len(), c.hist.len()), (1, 2));
        // A ramp delivery is not in the measured phase's figure.
        let old = r#"[null,null,"room:a","presence_diff",{"joins":{"u2":{"metas":[{"_lt":7}]}},"leaves":{}}]"#;
        scan(old.as_bytes(), &mut c, None, Some(t));
        assert_eq!(c.arrival_hist.len(), 1);
    }
}
