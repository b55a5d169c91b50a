//! `presenced-load`: the load generator. Logs in like `presenced demo`, creates (or reuses) an
//! account on plan `enterprise`, then drives real Phoenix V2 sessions against a node and measures
//! what it sees: connect+join rate, join-to-visible latency (every change carries its send time,
//! unix µs, as `_lt` in the meta or broadcast payload; every member that receives it records
//! `now - _lt` in an HDR histogram), deliveries per second, errors by reason and the node's RSS
//! per session.
//!
//! One process holds at most ~19 900 sockets here, so `--procs P` re-executes the binary as P
//! `worker`s, each with its share of the sessions and rates and its own source addresses; they
//! report one JSON line a second (counts and that second's histogram, V2 base64) on stdout and
//! start their changes when the parent writes `go` on their stdin (all sessions connected).

mod arrival;
mod engine;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use actix_web::rt::time::{interval, sleep, Instant};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, oneshot};

use crate::demo::{self, DemoOptions};
pub use engine::{room_name, Share, STAMP};
pub use report::{Latency, Point, Rss, Summary};
use stats::{Event, Totals};

/// How the generator's threads are scheduled (Linux).
///
/// On a machine shared by node and generator, every frame the node sends wakes a generator
/// thread, and a freshly woken thread preempts the one running. With the default policy the
/// node's sending thread is preempted thousands of times a second for a frame each (~4 100
/// involuntary switches a second per socket thread under churn). `SCHED_BATCH` keeps the same
/// share of the CPU (same niceness) but does not preempt on wake-up: the generator reads at the
/// next scheduling point instead, as it would from another machine. The delays it reports
/// then include its wait for a core, never less; the kernel's receive stamp shows that wait apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sched {
    Batch,
    Normal,
}

impl Sched {
    pub fn name(self) -> &'static str {
        match self {
            Sched::Batch => "batch",
            Sched::Normal => "normal",
        }
    }

    pub fn parse(s: &str) -> Option<Sched> {
        match s {
            "batch" => Some(Sched::Batch),
            "normal" => Some(Sched::Normal),
            _ => None,
        }
    }
}

/// What the sessions do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Ramp the sessions at `rate`, each joins a room, hold idle for `duration`.
    Connect,
    /// Sessions in `rooms` rooms; `changes`/s: status changes, room moves, reconnects.
    Churn,
    /// One room of every session; `changes`/s status changes in it.
    Fanout,
    /// One room of every session; one member broadcasts `changes`/s into it.
    Broadcast,
    /// Churn with broadcasts (a fifth of the changes).
    Mixed,
    /// `presenced demo`'s gentle realistic mix, for `duration`.
    Demo,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Connect => "connect",
            Scenario::Churn => "churn",
            Scenario::Fanout => "fanout",
            Scenario::Broadcast => "broadcast",
            Scenario::Mixed => "mixed",
            Scenario::Demo => "demo",
        }
    }

    pub fn parse(s: &str) -> Option<Scenario> {
        Some(match s {
            "connect" => Scenario::Connect,
            "churn" => Scenario::Churn,
            "fanout" => Scenario::Fanout,
            "broadcast" => Scenario::Broadcast,
            "mixed" => Scenario::Mixed,
            "demo" => Scenario::Demo,
            _ => return None,
        })
    }
}

/// The command line, parsed.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub scenario: Scenario,
    pub url: String,
    pub email: String,
    pub password: String,
    /// The account the sessions belong to (created on plan `enterprise` when missing).
    pub account: String,
    pub sessions: usize,
    pub rooms: usize,
    /// New connections per second (all workers together).
    pub rate: u32,
    /// Changes (or broadcasts) per second during the measured phase.
    pub changes: u32,
    /// The measured phase, after every session is in.
    pub duration: Duration,
    pub procs: usize,
    pub sources: Vec<IpAddr>,
    pub server_pid: Option<u32>,
    pub json: Option<PathBuf>,
    pub report: Option<PathBuf>,
    pub heartbeat: Duration,
    /// The in-place progress line on stderr.
    pub progress: bool,
    /// The scheduling policy of the generator's processes (`--sched`).
    pub sched: Sched,
    /// The binary to run as workers (`--procs` > 1); this executable when `None`.
    pub exe: Option<PathBuf>,
}

impl LoadOptions {
    /// The node used for setup (login, account) and `/metrics`: the first of `--url`.
    pub fn first_url(&self) -> &str {
        self.url.split(',').next().unwrap_or("").trim()
    }

    /// Every node of `--url`.
    pub fn urls(&self) -> Vec<&str> {
        self.url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect()
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            scenario: Scenario::Connect,
            url: "http://127.0.0.1:4000".into(),
            email: "admin@localhost".into(),
            password: String::new(),
            account: "Load".into(),
            sessions: 1000,
            rooms: 100,
            rate: 1000,
            changes: 100,
            duration: Duration::from_secs(30),
            procs: 1,
            sources: Vec::new(),
            server_pid: None,
            json: None,
            report: None,
            heartbeat: Duration::from_secs(25),
            progress: true,
            sched: Sched::Batch,
            exe: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Setup(#[from] demo::DemoError),
    #[error("worker {0}: {1}")]
    Worker(usize, String),
    #[error("{0}")]
    Io(String),
}

/// Sessions one process may hold: a process may have 20 000 open files here.
pub const MAX_PER_PROC: usize = 19_800;

pub fn help() -> String {
    format!(
        "presenced-load — load generator for a presenced node (Phoenix Channels V2 over WebSocket)\n\n\
USAGE: presenced-load <SCENARIO> --password PW [OPTIONS]\n\n\
SCENARIOS:\n\
\x20 connect    ramp --sessions at --rate, each joins a room, hold idle for --duration\n\
\x20 churn      --sessions in --rooms; --changes/s: status changes (60%), room moves (20%),\n\
\x20            reconnects on the same device (20%)\n\
\x20 fanout     one room of --sessions members; --changes/s status changes into it\n\
\x20 broadcast  one room of --sessions members; one member broadcasts --changes/s into it\n\
\x20 mixed      churn with broadcasts (20% of the changes)\n\
\x20 demo       presenced demo's gentle realistic mix for --duration\n\n\
Every change carries its send time (unix µs) as `{STAMP}` in the meta or broadcast payload; every\n\
member that sees it records the delay in an HDR histogram (join-to-visible latency).\n\n\
OPTIONS (default):\n\
\x20 --url URL[,URL…]   the node (http://127.0.0.1:4000); several nodes of a cluster, comma-\n\
\x20                     separated, spread the sessions round-robin (setup uses the first)\n\
\x20 --password PW       the admin's password (or PRESENCED_LOAD_PASSWORD)\n\
\x20 --email EMAIL       the admin (admin@localhost)\n\
\x20 --account NAME      the sessions' account, created on plan enterprise (Load)\n\
\x20 --sessions N        sessions (1000; at most {MAX_PER_PROC} per process, use --procs)\n\
\x20 --rooms M           rooms for connect/churn/mixed (100)\n\
\x20 --rate R/s          new connections per second, all processes together (1000/s)\n\
\x20 --changes K/s       changes (broadcasts) per second in the measured phase (100/s)\n\
\x20 --duration D        the measured phase once every session is in: 30s, 500ms, 2m (30s)\n\
\x20 --procs P           worker processes sharing the sessions and rates (1)\n\
\x20 --sources A-B       local addresses for the client sockets, e.g. 127.0.0.2-127.0.0.40 or\n\
\x20                     127.0.0.2,127.0.0.3 (none: the kernel's choice; ~28 000 ports each)\n\
\x20 --server-pid PID    read the node's RSS from /proc/PID/status (else its /metrics\n\
\x20                     process_resident_memory_bytes, else no RSS figure), its CPU time\n\
\x20                     and its threads' wait for a CPU (/proc/PID/task/*/schedstat)\n\
\x20 --json FILE         every figure as JSON\n\
\x20 --report FILE       a self-contained HTML report (latency percentiles, timeline)\n\
\x20 --heartbeat D       heartbeat period of each session (25s)\n\
\x20 --sched POLICY      batch or normal (batch): under SCHED_BATCH (Linux) a woken generator\n\
\x20                     thread does not preempt the node's sending thread, as if it ran on\n\
\x20                     another machine; its share of the CPU is the same\n\
\x20 --quiet             no progress line\n\n\
The node limits connects and joins per IP and per account; for load tests start it with\n\
\x20 PRESENCED__LIMITS__CONNECTS_PER_IP_PER_S=100000 PRESENCED__LIMITS__JOINS_PER_IP_PER_S=100000 \\\n\
\x20 PRESENCED__LIMITS__JOINS_PER_ACCOUNT_PER_S=100000 PRESENCED__LIMITS__CONNECTS_PER_ACCOUNT_PER_S=100000\n\
(a 429 halves the connect rate and pauses a second; throttled upgrades are counted, not errors).\n"
    )
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    Help,
    Run(LoadOptions),
    /// A child process: `worker <scenario> … --worker-index I --worker-of P --account-id ID`,
    /// the secret in `PRESENCED_LOAD_SECRET`.
    Worker(LoadOptions, Share),
}

fn duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Some(ms) = v.strip_suffix("ms") {
        return ms.parse().ok().map(Duration::from_millis);
    }
    if let Some(s) = v.strip_suffix('s') {
        return s.parse::<f64>().ok().map(Duration::from_secs_f64);
    }
    if let Some(m) = v.strip_suffix('m') {
        return m
            .parse::<f64>()
            .ok()
            .map(|m| Duration::from_secs_f64(m * 60.0));
    }
    v.parse::<f64>().ok().map(Duration::from_secs_f64)
}

/// `127.0.0.2-127.0.0.40` (a range of the last octet), or addresses separated by commas.
pub fn sources(v: &str) -> Option<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (Ipv4Addr, Ipv4Addr) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a > 65_536 {
                    return None;
                }
                out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
            }
            None => out.push(part.parse().ok()?),
        }
    }
    (!out.is_empty()).then_some(out)
}

/// Parses the arguments after the program name.
pub fn parse(args: Vec<String>) -> Result<Invocation, String> {
    let mut o = LoadOptions::default();
    if let Ok(pw) = std::env::var("PRESENCED_LOAD_PASSWORD") {
        o.password = pw;
    }
    let mut it = args.into_iter().peekable();
    let worker = it.peek().map(String::as_str) == Some("worker");
    if worker {
        it.next();
    }
    let mut scenario = None;
    let (mut index, mut of, mut account_id) = (0usize, 1usize, String::new());
    while let Some(a) = it.next() {
        if a == "-h" || a == "--help" {
            return Ok(Invocation::Help);
        }
        if a == "--quiet" {
            o.progress = false;
            continue;
        }
        if !a.starts_with("--") {
            if scenario.is_some() {
                return Err(format!("unexpected argument '{a}' (try --help)"));
            }
            scenario = Some(Scenario::parse(&a).ok_or_else(|| {
                format!("unknown scenario '{a}': connect, churn, fanout, broadcast, mixed or demo")
            })?);
            continue;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let value = inline
            .or_else(|| it.next())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = || format!("{flag}: cannot read '{value}' (try --help)");
        let num = |v: &str| v.trim_end_matches("/s").parse::<u64>().map_err(|_| bad());
        match flag.as_str() {
            "--url" => o.url = value.clone(),
            "--password" => o.password = value.clone(),
            "--email" => o.email = value.clone(),
            "--account" => o.account = value.clone(),
            "--sessions" => o.sessions = num(&value)? as usize,
            "--rooms" => o.rooms = num(&value)? as usize,
            "--rate" => o.rate = u32::try_from(num(&value)?).map_err(|_| bad())?,
            "--changes" => o.changes = u32::try_from(num(&value)?).map_err(|_| bad())?,
            "--duration" => o.duration = duration(&value).ok_or_else(bad)?,
            "--heartbeat" => o.heartbeat = duration(&value).ok_or_else(bad)?,
            "--procs" => o.procs = num(&value)? as usize,
            "--sched" => o.sched = Sched::parse(&value).ok_or_else(bad)?,
            "--sources" => o.sources = sources(&value).ok_or_else(bad)?,
            "--server-pid" => o.server_pid = Some(u32::try_from(num(&value)?).map_err(|_| bad())?),
            "--json" => o.json = Some(PathBuf::from(&value)),
            "--report" => o.report = Some(PathBuf::from(&value)),
            "--worker-index" if worker => index = num(&value)? as usize,
            "--worker-of" if worker => of = num(&value)? as usize,
            "--account-id" if worker => account_id = value.clone(),
            _ => return Err(format!("unknown option '{flag}' (try --help)")),
        }
    }
    o.scenario = scenario
        .ok_or("which scenario? connect, churn, fanout, broadcast, mixed or demo (try --help)")?;
    if worker {
        let secret = std::env::var("PRESENCED_LOAD_SECRET")
            .map_err(|_| "worker: PRESENCED_LOAD_SECRET is not set".to_string())?;
        let share = Share {
            index,
            of: of.max(1),
            account_id,
            secret,
            sources: o.sources.clone(),
        };
        return Ok(Invocation::Worker(o, share));
    }
    Ok(Invocation::Run(o))
}

fn validate(o: &LoadOptions) -> Result<(), LoadError> {
    let bad = |m: String| Err(LoadError::Usage(m));
    if o.password.is_empty() {
        return bad("the admin's password is needed: --password or PRESENCED_LOAD_PASSWORD".into());
    }
    if o.sessions == 0 {
        return bad("--sessions must be at least 1".into());
    }
    if o.procs == 0 || o.procs > 64 {
        return bad("--procs must be between 1 and 64".into());
    }
    if o.sessions.div_ceil(o.procs) > MAX_PER_PROC {
        return bad(format!(
            "--sessions {} in {} process(es) is more than {MAX_PER_PROC} sockets a process (20 000 open files here): raise --procs",
            o.sessions, o.procs
        ));
    }
    if o.rooms == 0 {
        return bad("--rooms must be at least 1".into());
    }
    if o.rate == 0 {
        return bad("--rate must be at least 1/s".into());
    }
    if o.duration.is_zero() || o.heartbeat.is_zero() {
        return bad("--duration and --heartbeat must be positive".into());
    }
    if o.scenario == Scenario::Demo && o.sessions > demo::MAX_USERS {
        return bad(format!("demo: at most {} sessions", demo::MAX_USERS));
    }
    Ok(())
}

/// The worker's arguments: the run's options (no password), its share and the account.
fn worker_args(o: &LoadOptions, index: usize, account_id: &str) -> Vec<String> {
    let mut a = vec![
        "worker".to_string(),
        o.scenario.name().into(),
        "--url".into(),
        o.url.clone(),
        "--sessions".into(),
        o.sessions.to_string(),
        "--rooms".into(),
        o.rooms.to_string(),
        "--rate".into(),
        o.rate.to_string(),
        "--changes".into(),
        o.changes.to_string(),
        "--duration".into(),
        format!("{}ms", o.duration.as_millis()),
        "--heartbeat".into(),
        format!("{}ms", o.heartbeat.as_millis()),
        "--worker-index".into(),
        index.to_string(),
        "--worker-of".into(),
        o.procs.to_string(),
        "--account-id".into(),
        account_id.into(),
        "--sched".into(),
        o.sched.name().into(),
        "--quiet".into(),
    ];
    // Each worker its own addresses (all of them when there are fewer than workers).
    let mine: Vec<String> = if o.sources.len() >= o.procs {
        o.sources
            .iter()
            .skip(index)
            .step_by(o.procs)
            .map(ToString::to_string)
            .collect()
    } else {
        o.sources.iter().map(ToString::to_string).collect()
    };
    if !mine.is_empty() {
        a.push("--sources".into());
        a.push(mine.join(","));
    }
    a
}

/// `presenced-load worker …`: runs one share and reports on stdout; `go` on stdin starts the
/// measured phase (end of stdin too).
pub async fn worker_main(o: LoadOptions, share: Share) {
    let (go_tx, go_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = go_tx.send(());
    });
    let (tx, mut rx) = mpsc::unbounded_channel();
    actix_web::rt::spawn(engine::run(
        o,
        share,
        async {
            let _ = go_rx.await;
        },
        tx,
    ));
    let mut out = std::io::stdout().lock();
    while let Some(ev) = rx.recv().await {
        if let Ok(line) = serde_json::to_string(&ev) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if matches!(ev, Event::Final(_) | Event::Fatal { .. }) {
            break;
        }
    }
}

/// The node's resident memory now, and where it was read.
async fn rss(o: &LoadOptions) -> Option<(u64, String)> {
    if let Some(pid) = o.server_pid {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kb: u64 = s
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        return Some((kb * 1024, format!("/proc/{pid}/status VmRSS")));
    }
    let base = demo::base_url(o.first_url()).ok()?;
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    let mut res = client.get(format!("{base}/metrics")).send().await.ok()?;
    if res.status().as_u16() != 200 {
        return None;
    }
    let body = res.body().limit(64 << 20).await.ok()?;
    let text = String::from_utf8_lossy(&body);
    let v = text.lines().find_map(|l| {
        l.strip_prefix("process_resident_memory_bytes ")
            .and_then(|v| v.trim().parse::<f64>().ok())
    })?;
    Some((v as u64, "/metrics process_resident_memory_bytes".into()))
}

/// Longest wait between the end of the ramp and the measured phase. The measured phase starts
/// at the first whole second in which no worker received a delivery: a node can send the
/// ramp's join diffs faster than the clients read them, and changes made while some clients
/// are still seconds behind would measure that backlog, not the node. Past this, it starts
/// anyway (and `settle_s` says so).
const SETTLE_MAX: Duration = Duration::from_secs(60);

/// Tells every worker to start its measured phase.
fn go(gos: &mut Vec<Go>) {
    for g in gos.drain(..) {
        match g {
            Go::Local(tx) => {
                let _ = tx.send(());
            }
            Go::Child(mut stdin) => {
                let _ = writeln!(stdin, "go");
            }
        }
    }
}

enum Go {
    Local(oneshot::Sender<()>),
    Child(ChildStdin),
}

/// One second of the run, all workers together.
#[derive(Default)]
struct Second {
    reports: usize,
    sessions: u64,
    changes: u64,
    deliveries: u64,
    hist: Option<Histogram<u64>>,
}

/// Runs a scenario to the end and returns its figures (also written to `--json`/`--report`).
pub async fn run(o: LoadOptions) -> Result<Summary, LoadError> {
    validate(&o)?;
    if o.scenario == Scenario::Demo {
        return run_demo(o).await;
    }
    let demo_opts = DemoOptions {
        url: o.first_url().to_string(),
        email: o.email.clone(),
        password: o.password.clone(),
        account: o.account.clone(),
        verbose: false,
        ..DemoOptions::default()
    };
    let access = demo::account_access(&demo_opts, "enterprise").await?;
    if o.progress {
        eprintln!(
            "presenced-load: {} · {} sessions at {}/s in {} process(es) · account \"{}\" ({})",
            o.scenario.name(),
            o.sessions,
            o.rate,
            o.procs,
            o.account,
            access.id
        );
    }
    let rss_before = rss(&o).await;
    let server_cpu_before = o.server_pid.and_then(|p| stats::cpu_seconds(Some(p)));
    let server_wait_before = o.server_pid.and_then(|p| stats::cpu_wait_seconds(Some(p)));
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut gos = Vec::new();
    let mut children: Vec<Child> = Vec::new();
    if o.procs <= 1 {
        let (go_tx, go_rx) = oneshot::channel::<()>();
        gos.push(Go::Local(go_tx));
        let share = Share {
            index: 0,
            of: 1,
            account_id: access.id.clone(),
            secret: access.secret.clone(),
            sources: o.sources.clone(),
        };
        actix_web::rt::spawn(engine::run(
            o.clone(),
            share,
            async {
                let _ = go_rx.await;
            },
            tx.clone(),
        ));
    } else {
        let exe = match &o.exe {
            Some(e) => e.clone(),
            None => std::env::current_exe().map_err(|e| LoadError::Io(e.to_string()))?,
        };
        for i in 0..o.procs {
            let mut child = Command::new(&exe)
                .args(worker_args(&o, i, &access.id))
                .env("PRESENCED_LOAD_SECRET", &access.secret)
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| LoadError::Io(format!("cannot start worker {i}: {e}")))?;
            let stdout = child.stdout.take().expect("piped stdout");
            if let Some(stdin) = child.stdin.take() {
                gos.push(Go::Child(stdin));
            }
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    match serde_json::from_str::<Event>(&line) {
                        Ok(ev) => {
                            let _ = tx.send(ev);
                        }
                        Err(_) => eprintln!("worker {i}: {line}"),
                    }
                }
                let _ = tx.send(Event::Fatal {
                    worker: i,
                    why: "exited".into(),
                });
            });
            children.push(child);
        }
    }
    drop(tx);
    let workers = o.procs.max(1);
    let mut seconds: BTreeMap<u64, Second> = BTreeMap::new();
    let mut so_far = stats::histogram();
    let mut ready = 0usize;
    let (mut connected, mut failed, mut ramp_ms) = (0u64, 0u64, 0u64);
    let mut rss_after = None;
    let mut finals: Vec<Totals> = Vec::new();
    let mut done = vec![false; workers];
    let mut fatal: Vec<String> = Vec::new();
    let mut progress = interval(Duration::from_secs(1));
    let mut steady_at: Option<Instant> = None;
    let mut go_sec: Option<u64> = None;
    // Everyone is in: the second it happened and when, until the ramp's deliveries drain.
    let mut settling: Option<(u64, Instant)> = None;
    let (mut settle_s, mut ramp_drained) = (0.0, false);
    let mut rss_end = None;
    // The last RSS reading: a second before the workers close their sessions.
    let end_reading = o.duration.saturating_sub(Duration::from_secs(1));
    while done.iter().any(|d| !d) {
        if rss_end.is_none()
            && rss_after.is_some()
            && steady_at.is_some_and(|t| t.elapsed() >= end_reading)
        {
            rss_end = rss(&o).await;
        }
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                match ev {
                    Event::Tick { sec, sessions, changes, deliveries, hist, .. } => {
                        let s = seconds.entry(sec).or_default();
                        s.reports += 1;
                        s.sessions += sessions;
                        s.changes += changes;
                        s.deliveries += deliveries;
                        if let Ok(h) = stats::decode(&hist) {
                            // "p99 so far": the ramp's, then the measured phase's only.
                            if go_sec.is_none_or(|g| sec > g) {
                                stats::merge(&mut so_far, &h);
                            }
                            match &mut s.hist {
                                Some(into) => stats::merge(into, &h),
                                None => s.hist = Some(h),
                            }
                        }
                        if let Some((from, at)) = settling {
                            // A whole second after everyone was in, with no delivery anywhere.
                            let drained = sec > from && s.reports >= workers && s.deliveries == 0;
                            if drained || at.elapsed() >= SETTLE_MAX {
                                settling = None;
                                settle_s = at.elapsed().as_secs_f64();
                                ramp_drained = drained;
                                so_far.reset();
                                go_sec = Some(stats::now_us() / 1_000_000);
                                steady_at = Some(Instant::now());
                                go(&mut gos);
                            }
                        }
                    }
                    Event::Ready { connected: c, failed: f, ramp_ms: r, .. } => {
                        ready += 1;
                        connected += c;
                        failed += f;
                        ramp_ms = ramp_ms.max(r);
                        if ready == workers {
                            rss_after = rss(&o).await;
                            // The measured phase starts once what the ramp set in motion has
                            // arrived (see `SETTLE_MAX`).
                            settling = Some((stats::now_us() / 1_000_000, Instant::now()));
                        }
                    }
                    Event::Final(t) => {
                        if let Some(d) = done.get_mut(t.worker) { *d = true; }
                        finals.push(*t);
                    }
                    Event::Fatal { worker, why } => {
                        if done.get(worker) == Some(&false) {
                            done[worker] = true;
                            fatal.push(format!("worker {worker}: {why}"));
                        }
                    }
                }
            }
            _ = progress.tick(), if o.progress => {
                let line = progress_line(started, steady_at, &seconds, workers, &so_far);
                eprint!("\r{line}\x1b[K");
            }
        }
    }
    if o.progress {
        eprintln!();
    }
    for mut c in children {
        let _ = c.wait();
    }
    if finals.is_empty() {
        return Err(LoadError::Worker(
            0,
            fatal
                .first()
                .cloned()
                .unwrap_or_else(|| "no figures".into()),
        ));
    }
    let mut s = report::summarize(
        &o,
        &finals,
        &seconds,
        report::Ramp {
            connected,
            failed,
            ramp_ms,
        },
    );
    s.wall_s = started.elapsed().as_secs_f64();
    s.settle_s = settle_s;
    s.ramp_drained = ramp_drained;
    s.server_cpu_s = server_cpu_before
        .zip(o.server_pid.and_then(|p| stats::cpu_seconds(Some(p))))
        .map(|(a, b)| b - a);
    s.server_cpu_wait_s = stats::grown(
        server_wait_before,
        o.server_pid.and_then(|p| stats::cpu_wait_seconds(Some(p))),
    );
    for f in fatal {
        *s.errors.entry(f).or_default() += 1;
        s.errors_total += 1;
    }
    let per = |after: u64, before: u64| {
        (after as f64 - before as f64) / s.sessions_connected.max(1) as f64
    };
    s.rss = match (rss_before, rss_after) {
        (Some((before, source)), Some((after, _))) => Some(Rss {
            before_bytes: before,
            after_bytes: after,
            per_session_bytes: per(after, before),
            end_bytes: rss_end.as_ref().map(|e| e.0),
            per_session_end_bytes: rss_end.as_ref().map(|e| per(e.0, before)),
            source,
        }),
        _ => None,
    };
    write_outputs(&o, &s)?;
    Ok(s)
}

fn write_outputs(o: &LoadOptions, s: &Summary) -> Result<(), LoadError> {
    if let Some(p) = &o.json {
        let text = serde_json::to_string_pretty(s).map_err(|e| LoadError::Io(e.to_string()))?;
        std::fs::write(p, text)
            .map_err(|e| LoadError::Io(format!("cannot write {}: {e}", p.display())))?;
    }
    if let Some(p) = &o.report {
        std::fs::write(p, report::html(s))
            .map_err(|e| LoadError::Io(format!("cannot write {}: {e}", p.display())))?;
    }
    Ok(())
}

fn progress_line(
    started: Instant,
    steady_at: Option<Instant>,
    seconds: &BTreeMap<u64, Second>,
    workers: usize,
    so_far: &Histogram<u64>,
) -> String {
    let last = seconds
        .iter()
        .rev()
        .find(|(_, s)| s.reports >= workers)
        .or_else(|| seconds.iter().next_back())
        .map(|(_, s)| s);
    let (sessions, changes, deliveries) =
        last.map_or((0, 0, 0), |s| (s.sessions, s.changes, s.deliveries));
    let phase = match steady_at {
        Some(t) => format!("measuring {:>3.0}s", t.elapsed().as_secs_f64()),
        None => "ramp".to_string(),
    };
    let p99 = if so_far.is_empty() {
        "–".to_string()
    } else {
        format!("{:.1} ms", so_far.value_at_quantile(0.99) as f64 / 1000.0)
    };
    format!(
        "[{:>4.0}s {phase}] sessions {sessions} · changes {changes}/s · deliveries {deliveries}/s · p99 {p99}",
        started.elapsed().as_secs_f64()
    )
}

/// `demo`: presenced demo's simulation for `duration` (no latency figures: its changes carry no
/// timestamps).
async fn run_demo(o: LoadOptions) -> Result<Summary, LoadError> {
    let opts = DemoOptions {
        url: o.first_url().to_string(),
        email: o.email.clone(),
        password: o.password.clone(),
        account: o.account.clone(),
        users: o.sessions,
        rooms: o.rooms.min(1000),
        connect_rate: o.rate.min(10_000),
        heartbeat: o.heartbeat,
        verbose: o.progress,
        ..DemoOptions::default()
    };
    let (ready_tx, ready_rx) = oneshot::channel::<demo::Ready>();
    let started = Instant::now();
    let cpu_before = stats::cpu_seconds(None).unwrap_or(0.0);
    let wait_before = stats::cpu_wait_seconds(None);
    let ramp = std::rc::Rc::new(std::cell::Cell::new(None));
    let ramp2 = ramp.clone();
    let duration = o.duration;
    let stop = async move {
        if let Ok(r) = ready_rx.await {
            ramp2.set(Some((r.sessions, started.elapsed())));
        }
        sleep(duration).await;
    };
    let r = demo::run_with(opts, stop, Some(ready_tx)).await?;
    let (sessions, ramp_t) = ramp.get().unwrap_or((0, started.elapsed()));
    let mut s = report::summarize(
        &o,
        &[],
        &BTreeMap::new(),
        report::Ramp {
            connected: sessions as u64,
            failed: 0,
            ramp_ms: ramp_t.as_millis() as u64,
        },
    );
    s.wall_s = started.elapsed().as_secs_f64();
    s.client_cpu_s = (stats::cpu_seconds(None).unwrap_or(0.0) - cpu_before).max(0.0);
    s.client_cpu_wait_s = stats::grown(wait_before, stats::cpu_wait_seconds(None));
    s.changes = r.events;
    s.changes_per_s = r.events as f64 / o.duration.as_secs_f64();
    s.reconnects = r.reconnects;
    s.throttled = r.throttled;
    for (k, v) in [
        ("demo: error replies", r.errors),
        ("demo: refused", r.refused),
        ("demo: disconnects", r.disconnects),
    ] {
        if v > 0 {
            s.errors.insert(k.into(), v);
            s.errors_total += v;
        }
    }
    write_outputs(&o, &s)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_command_line_reads_rates_durations_and_sources() {
        let Invocation::Run(o) = parse(args(
            "churn --password pw --sessions 20000 --rooms 1000 --rate 5000/s --changes 2000/s --duration 1m --procs 2 --sources 127.0.0.2-127.0.0.4,127.0.0.9",
        ))
        .unwrap() else {
            panic!("a run")
        };
        assert_eq!(o.scenario, Scenario::Churn);
        assert_eq!(
            (o.sessions, o.rooms, o.rate, o.changes),
            (20_000, 1000, 5000, 2000)
        );
        assert_eq!(o.duration, Duration::from_secs(60));
        assert_eq!(o.sources.len(), 4);
        assert_eq!(o.sources[3].to_string(), "127.0.0.9");
        assert!(validate(&o).is_ok());
        assert!(parse(args("nope --password x"))
            .unwrap_err()
            .contains("scenario"));
        assert!(parse(args("connect --bogus 1")).is_err());
        assert!(matches!(parse(args("--help")), Ok(Invocation::Help)));
    }

    #[test]
    fn too_many_sessions_for_one_process_ask_for_more_procs() {
        let o = LoadOptions {
            sessions: 19_500 * 2,
            password: "x".into(),
            ..LoadOptions::default()
        };
        assert!(validate(&o).unwrap_err().to_string().contains("--procs"));
        assert!(validate(&LoadOptions { procs: 2, ..o }).is_ok());
    }

    #[test]
    fn workers_get_their_share_of_the_sources() {
        let o = LoadOptions {
            procs: 2,
            sources: sources("127.0.0.2-127.0.0.5").unwrap(),
            ..LoadOptions::default()
        };
        let a = worker_args(&o, 1, "acc");
        let i = a.iter().position(|x| x == "--sources").unwrap();
        assert_eq!(a[i + 1], "127.0.0.3,127.0.0.5");
        assert!(!a.iter().any(|x| x.contains("password")));
    }

    #[test]
    fn the_scheduling_policy_defaults_to_batch_and_reaches_the_workers() {
        let Invocation::Run(o) = parse(args("churn --password pw")).unwrap() else {
            panic!("a run")
        };
        assert_eq!(o.sched, Sched::Batch);
        let Invocation::Run(o) = parse(args("churn --password pw --sched normal")).unwrap() else {
            panic!("a run")
        };
        assert_eq!(o.sched, Sched::Normal);
        let a = worker_args(&o, 0, "acc");
        let i = a.iter().position(|x| x == "--sched").unwrap();
        assert_eq!(a[i + 1], "normal");
        assert!(parse(args("churn --password pw --sched fifo"))
            .unwrap_err()
            .contains("--sched"));
    }

    #[test]
    fn histograms_survive_the_trip_between_processes() {
        let mut h = stats::histogram();
        for v in [5u64, 1_000, 250_000] {
            stats::record(&mut h, v);
        }
        let back = stats::decode(&stats::encode(&h)).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back.max(), h.max());
    }
}
