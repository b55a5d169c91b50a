//! Typed settings, layered with the `config` crate: built-in defaults < `presenced.toml` (or the
//! file named by `PRESENCED_CONFIG`) < environment (`PRESENCED__SECTION__KEY`, plus the
//! conventional `DATABASE_URL` and `REDIS_URL`). Unknown keys and bad values stop start-up with
//! one line that names the setting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use presence_actors::{EngineConfig, Limits};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub presence: PresenceSettings,
    pub snapshot: SnapshotSettings,
    pub history: HistorySettings,
    pub cluster: ClusterSettings,
    pub bootstrap: BootstrapSettings,
    pub auth: AuthSettings,
    pub limits: Limits,
    pub plans: PlansSettings,
}

/// What the `enterprise` plan allows (the other plans' limits are fixed by the contract).
#[derive(Clone, Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PlansSettings {
    pub enterprise: PlanQuota,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlanQuota {
    pub max_connections: i64,
    pub max_rooms: i64,
    pub max_messages_per_day: i64,
}

impl Default for PlanQuota {
    fn default() -> Self {
        PlanQuota {
            max_connections: 1_000_000,
            max_rooms: 1_000_000,
            max_messages_per_day: 1_000_000_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free one (tests).
    pub bind: String,
    /// HTTP worker threads; 0 means one per core.
    pub workers: usize,
    /// Threads that run the WebSocket sessions, apart from the HTTP workers; 0 means one per
    /// core.
    pub socket_threads: usize,
    /// The kernel scheduling policy of the node's threads (Linux).
    pub scheduling: Scheduling,
    /// Seconds to wait for connections to finish at shutdown before dropping them.
    pub shutdown_timeout_s: u64,
    /// Reverse proxies whose `X-Forwarded-For` is believed (IP addresses).
    pub trusted_proxies: Vec<String>,
    /// Origins allowed to call the API from a browser (CORS); empty means same origin only.
    /// `"*"` allows any origin (never with credentials).
    pub cors_origins: Vec<String>,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            bind: "127.0.0.1:4000".into(),
            workers: 0,
            socket_threads: 0,
            scheduling: Scheduling::default(),
            shutdown_timeout_s: 5,
            trusted_proxies: Vec::new(),
            cors_origins: Vec::new(),
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    /// `sqlite://data/presenced.db` (default, embedded) or a file path.
    pub url: String,
    pub pool_size: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            url: "sqlite://data/presenced.db".into(),
            pool_size: 8,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// `redis://host:port/db`; unset runs a single node.
    pub url: Option<String>,
    /// Every key and channel of the cluster starts with it, so several clusters (or test runs)
    /// can share one Redis.
    pub prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: None,
            prefix: "presenced".into(),
        }
    }
}

/// How the kernel schedules the node's threads (`server.scheduling`, Linux only).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Scheduling {
    /// Every thread but the HTTP workers (socket threads, arbiters, registry, snapshots,
    /// database pool) under `SCHED_BATCH`: the same share of the CPU, but a thread woken by a
    /// message or a socket does not preempt the one running; it runs when that one blocks or
    /// its slice ends (an idle core still takes it at once). The node's threads hand each
    /// other work all the time (a session's change wakes its room, the room's diff wakes the
    /// socket threads), and under the default policy each such wake preempted the sender in
    /// the middle of its writes on a busy machine (BENCHMARKS.md, "The node under
    /// SCHED_BATCH"). The HTTP workers keep the default policy, so the API answers at once.
    #[default]
    Batch,
    /// The policy the node was started with, for every thread: the kernel's default
    /// (`SCHED_OTHER`, a woken thread may preempt at once) unless started under `chrt`.
    Normal,
}

/// Which threads run the room actors (`presence.room_threads`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RoomThreads {
    /// The engine's arbiters (`presence.arbiters`): a room's messages never wait behind the
    /// sessions' writes, which a room of thousands under full load needs.
    #[default]
    Arbiters,
    /// The socket threads, round-robin: a room's fan-out to the members on its own thread is
    /// a local hand-off, and no thread is woken for rooms alone (less CPU, a shorter tail for
    /// many small rooms). Past `EngineConfig::scatter_past` members a room's frames are pushed
    /// from an arbiter.
    Sockets,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSettings {
    pub grace_ms: u64,
    pub timeout_ms: u64,
    pub room_idle_ms: u64,
    pub recovery_timeout_ms: u64,
    /// Threads that accounts and (by default) rooms run on; 0 means one per core.
    pub arbiters: usize,
    /// Where rooms run: `"arbiters"`, on threads of their own, or `"sockets"`, on the socket
    /// threads next to their members.
    pub room_threads: RoomThreads,
    /// A room in a storm of joins and leaves sends them at most once per this many ms once its
    /// burst is spent, each diff carrying all of them since the last (status changes are never
    /// held); 0 sends each change as soon as it is made.
    pub diff_interval_ms: u64,
    /// Diffs a room sends back to back before the interval applies.
    pub diff_burst: u32,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        let e = EngineConfig::default();
        PresenceSettings {
            grace_ms: e.grace_ms,
            timeout_ms: e.timeout_ms,
            room_idle_ms: e.room_idle_ms,
            recovery_timeout_ms: e.recovery_timeout_ms,
            arbiters: 0,
            room_threads: RoomThreads::default(),
            diff_interval_ms: e.diff_pace.interval_ms,
            diff_burst: e.diff_pace.burst,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotSettings {
    /// How often the node writes the presence it holds (and a history sample) to the database.
    pub interval_ms: u64,
    /// Longest wait between attempts while the database is down (the backoff doubles up to it).
    pub retry_max_ms: u64,
    /// History samples kept in memory while the database is down; the oldest go first.
    pub max_buffered_samples: usize,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        SnapshotSettings {
            interval_ms: 5_000,
            retry_max_ms: 60_000,
            max_buffered_samples: 100_000,
        }
    }
}

/// The presence history (samples and who-was-there intervals) and its retention.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistorySettings {
    /// A room's or account's counts are sampled at each snapshot when they changed, and at
    /// least this often when they did not.
    pub sample_interval_ms: u64,
    /// Raw samples are kept this long, then folded into buckets.
    pub raw_retention_s: u64,
    /// The bucket raw samples are folded into (the maximum of each bucket is kept).
    pub rollup_bucket_s: u64,
    /// Everything (buckets, closed intervals) older than this is deleted.
    pub retention_s: u64,
    /// How often the pruning runs.
    pub prune_interval_s: u64,
}

impl Default for HistorySettings {
    fn default() -> Self {
        HistorySettings {
            sample_interval_ms: 60_000,
            raw_retention_s: 2 * 24 * 3600,
            rollup_bucket_s: 300,
            retention_s: 30 * 24 * 3600,
            prune_interval_s: 600,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// A node whose lease is not renewed for this long is down: its users leave everywhere.
    pub node_ttl_ms: u64,
    /// Local changes are coalesced and published once per tick.
    pub tick_ms: u64,
    /// This node's name: its snapshot rows are keyed by it, so it must stay the same across
    /// restarts. Unset: `<hostname>:<port of server.bind>`.
    pub node_id: Option<String>,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            node_ttl_ms: 15_000,
            tick_ms: 25,
            node_id: None,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapSettings {
    pub admin_email: String,
    /// When unset and no admin exists, a password is generated and printed once.
    pub admin_password: Option<String>,
}

impl Default for BootstrapSettings {
    fn default() -> Self {
        BootstrapSettings {
            admin_email: "admin@localhost".into(),
            admin_password: None,
        }
    }
}

#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// Key for the server's own access tokens; generated once and kept in the database if unset.
    pub jwt_secret: Option<String>,
    pub access_ttl_s: u64,
    pub refresh_ttl_s: u64,
    /// How long an account's previous signing secret keeps working after a rotation.
    pub rotation_grace_s: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            jwt_secret: None,
            access_ttl_s: 900,
            refresh_ttl_s: 30 * 24 * 3600,
            rotation_grace_s: 24 * 3600,
        }
    }
}

/// A configuration problem, named by its setting.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ConfigError {
    pub setting: String,
    pub message: String,
}

/// The most threads of one kind (HTTP workers, socket threads, arbiters) a node will start.
const MAX_THREADS: usize = 1024;

fn bad(setting: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting: setting.into(),
        message: message.into(),
    }
}

/// Every key with its default, for `--help` and the README.
pub const KEYS: &[(&str, &str)] = &[
    ("server.bind", "127.0.0.1:4000"),
    ("server.workers", "0 (one per core)"),
    ("server.socket_threads", "0 (one per core)"),
    ("server.scheduling", "batch (or normal)"),
    ("server.shutdown_timeout_s", "5"),
    (
        "database.url (or DATABASE_URL)",
        "sqlite://data/presenced.db",
    ),
    ("database.pool_size", "8"),
    ("redis.url (or REDIS_URL)", "unset: single node"),
    ("redis.prefix", "presenced"),
    ("presence.grace_ms", "5000"),
    ("presence.timeout_ms", "60000"),
    ("presence.room_idle_ms", "30000"),
    ("presence.recovery_timeout_ms", "2000"),
    ("presence.arbiters", "0 (one per core)"),
    ("presence.room_threads", "arbiters (or sockets)"),
    ("presence.diff_interval_ms", "250 (0: no pacing)"),
    ("presence.diff_burst", "10"),
    ("snapshot.interval_ms", "5000"),
    ("snapshot.retry_max_ms", "60000"),
    ("snapshot.max_buffered_samples", "100000"),
    ("history.sample_interval_ms", "60000"),
    ("history.raw_retention_s", "172800"),
    ("history.rollup_bucket_s", "300"),
    ("history.retention_s", "2592000"),
    ("history.prune_interval_s", "600"),
    ("cluster.node_ttl_ms", "15000"),
    ("cluster.tick_ms", "25"),
    ("cluster.node_id", "<hostname>:<port>"),
    ("bootstrap.admin_email", "admin@localhost"),
    ("bootstrap.admin_password", "generated and printed once"),
    ("auth.jwt_secret", "generated once, kept in the database"),
    ("auth.access_ttl_s", "900"),
    ("auth.refresh_ttl_s", "2592000"),
    ("auth.rotation_grace_s", "86400"),
    ("limits.max_frame_bytes", "65536"),
    ("limits.max_joins_per_socket", "100"),
    ("limits.max_meta_bytes", "4096"),
    ("limits.max_rooms_per_account", "10000"),
    ("limits.max_room_members", "100000"),
    ("limits.max_user_id_len", "128"),
    ("limits.max_room_name_len", "128"),
    ("limits.max_outbound", "256"),
    ("limits.max_errors_per_minute", "120"),
    ("limits.max_inflight", "64"),
    ("limits.login_per_ip_per_minute", "10"),
    ("limits.login_per_email_per_hour", "100"),
    ("limits.api_per_ip_per_s", "100 (bursts of 2x)"),
    ("limits.api_per_account_per_s", "200 (bursts of 2x)"),
    ("limits.connects_per_ip_per_s", "500 (bursts of 2x)"),
    ("limits.connects_per_account_per_s", "1000 (bursts of 2x)"),
    ("limits.joins_per_account_per_s", "2000 (bursts of 2x)"),
    ("limits.joins_per_ip_per_s", "2000 (bursts of 2x)"),
    ("server.trusted_proxies", "[] (X-Forwarded-For ignored)"),
    ("server.cors_origins", "[] (same origin only)"),
    ("plans.enterprise.max_connections", "1000000"),
    ("plans.enterprise.max_rooms", "1000000"),
    ("plans.enterprise.max_messages_per_day", "1000000000"),
];

impl Settings {
    /// Loads the layers. `file`: an explicit path (must exist); otherwise `PRESENCED_CONFIG`,
    /// otherwise `presenced.toml` in the working directory if present.
    pub fn load(file: Option<&Path>) -> Result<Settings, ConfigError> {
        let explicit: Option<PathBuf> = file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("PRESENCED_CONFIG").map(PathBuf::from));
        let mut b = config::Config::builder();
        match &explicit {
            Some(p) => {
                if !p.exists() {
                    return Err(bad(
                        "PRESENCED_CONFIG",
                        format!("{} does not exist", p.display()),
                    ));
                }
                b = b.add_source(config::File::from(p.as_path()).format(config::FileFormat::Toml));
            }
            None => {
                b = b.add_source(
                    config::File::with_name("presenced.toml")
                        .format(config::FileFormat::Toml)
                        .required(false),
                );
            }
        }
        b = b.add_source(
            config::Environment::with_prefix("PRESENCED")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            b = b
                .set_override("database.url", url)
                .map_err(|e| bad("DATABASE_URL", e.to_string()))?;
        }
        if let Ok(url) = std::env::var("REDIS_URL") {
            b = b
                .set_override("redis.url", url)
                .map_err(|e| bad("REDIS_URL", e.to_string()))?;
        }
        let cfg = b.build().map_err(config_error)?;
        let s: Settings = cfg.try_deserialize().map_err(config_error)?;
        s.validate()?;
        Ok(s)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.bind_addr()?;
        validate_database_url(&self.database.url).map_err(|m| bad("database.url", m))?;
        if self.database.pool_size == 0 {
            return Err(bad("database.pool_size", "must be at least 1"));
        }
        if let Some(u) = &self.redis.url {
            let parsed = url::Url::parse(u).map_err(|e| bad("redis.url", format!("{e}")))?;
            if !matches!(parsed.scheme(), "redis" | "rediss" | "redis+unix") {
                return Err(bad("redis.url", "must start with redis://"));
            }
        }
        for (name, v) in [
            ("server.workers", self.server.workers),
            ("server.socket_threads", self.server.socket_threads),
            ("presence.arbiters", self.presence.arbiters),
        ] {
            if v > MAX_THREADS {
                return Err(bad(
                    name,
                    format!("at most {MAX_THREADS} (0: one per core)"),
                ));
            }
        }
        let p = &self.presence;
        for (name, v) in [
            ("presence.timeout_ms", p.timeout_ms),
            ("snapshot.interval_ms", self.snapshot.interval_ms),
            ("snapshot.retry_max_ms", self.snapshot.retry_max_ms),
            (
                "history.sample_interval_ms",
                self.history.sample_interval_ms,
            ),
            ("history.raw_retention_s", self.history.raw_retention_s),
            ("history.rollup_bucket_s", self.history.rollup_bucket_s),
            ("history.retention_s", self.history.retention_s),
            ("history.prune_interval_s", self.history.prune_interval_s),
            ("cluster.node_ttl_ms", self.cluster.node_ttl_ms),
            ("auth.access_ttl_s", self.auth.access_ttl_s),
            ("auth.refresh_ttl_s", self.auth.refresh_ttl_s),
        ] {
            if v == 0 {
                return Err(bad(name, "must be greater than 0"));
            }
        }
        if self.history.retention_s < self.history.raw_retention_s {
            return Err(bad(
                "history.retention_s",
                "must be at least history.raw_retention_s",
            ));
        }
        if p.diff_interval_ms > 10_000 {
            return Err(bad(
                "presence.diff_interval_ms",
                "at most 10000 (0: no pacing)",
            ));
        }
        if !(1..=10_000).contains(&p.diff_burst) {
            return Err(bad("presence.diff_burst", "must be between 1 and 10000"));
        }
        if self.cluster.node_ttl_ms < 500 {
            return Err(bad("cluster.node_ttl_ms", "must be at least 500"));
        }
        if !(1..=1000).contains(&self.cluster.tick_ms) {
            return Err(bad("cluster.tick_ms", "must be between 1 and 1000"));
        }
        let prefix = &self.redis.prefix;
        if prefix.is_empty()
            || prefix.len() > 64
            || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad(
                "redis.prefix",
                "must be 1 to 64 printable characters without spaces",
            ));
        }
        if let Some(id) = &self.cluster.node_id {
            if id.trim().is_empty() || id.len() > 128 || id.chars().any(char::is_control) {
                return Err(bad(
                    "cluster.node_id",
                    "must be 1 to 128 printable characters",
                ));
            }
        }
        let l = &self.limits;
        for (name, v) in [
            ("limits.max_frame_bytes", l.max_frame_bytes),
            ("limits.max_joins_per_socket", l.max_joins_per_socket),
            ("limits.max_meta_bytes", l.max_meta_bytes),
            ("limits.max_rooms_per_account", l.max_rooms_per_account),
            ("limits.max_room_members", l.max_room_members),
            ("limits.max_user_id_len", l.max_user_id_len),
            ("limits.max_room_name_len", l.max_room_name_len),
            ("limits.max_outbound", l.max_outbound),
            ("limits.max_inflight", l.max_inflight),
        ] {
            if v == 0 {
                return Err(bad(name, "must be greater than 0"));
            }
        }
        for (name, v) in [
            ("limits.login_per_ip_per_minute", l.login_per_ip_per_minute),
            (
                "limits.login_per_email_per_hour",
                l.login_per_email_per_hour,
            ),
            ("limits.api_per_ip_per_s", l.api_per_ip_per_s),
            ("limits.api_per_account_per_s", l.api_per_account_per_s),
            ("limits.connects_per_ip_per_s", l.connects_per_ip_per_s),
            (
                "limits.connects_per_account_per_s",
                l.connects_per_account_per_s,
            ),
            ("limits.joins_per_account_per_s", l.joins_per_account_per_s),
            ("limits.joins_per_ip_per_s", l.joins_per_ip_per_s),
        ] {
            if v == 0 {
                return Err(bad(name, "must be greater than 0"));
            }
        }
        crate::limits::parse_proxies(&self.server.trusted_proxies)
            .map_err(|m| bad("server.trusted_proxies", m))?;
        for o in &self.server.cors_origins {
            if o != "*" {
                let u = url::Url::parse(o)
                    .map_err(|_| bad("server.cors_origins", format!("'{o}' is not an origin")))?;
                if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
                    return Err(bad(
                        "server.cors_origins",
                        format!("'{o}' is not an http(s) origin"),
                    ));
                }
            }
        }
        let e = &self.plans.enterprise;
        for (name, v) in [
            ("plans.enterprise.max_connections", e.max_connections),
            ("plans.enterprise.max_rooms", e.max_rooms),
            (
                "plans.enterprise.max_messages_per_day",
                e.max_messages_per_day,
            ),
        ] {
            if v <= 0 {
                return Err(bad(name, "must be greater than 0"));
            }
        }
        if l.max_frame_bytes > MAX_FRAME_HARD_CAP {
            return Err(bad(
                "limits.max_frame_bytes",
                format!("at most {MAX_FRAME_HARD_CAP}"),
            ));
        }
        if self.bootstrap.admin_email.trim().is_empty() || !self.bootstrap.admin_email.contains('@')
        {
            return Err(bad("bootstrap.admin_email", "must be an email address"));
        }
        if let Some(pw) = &self.bootstrap.admin_password {
            if pw.len() < 8 {
                return Err(bad(
                    "bootstrap.admin_password",
                    "must be at least 8 characters",
                ));
            }
        }
        if let Some(k) = &self.auth.jwt_secret {
            if k.len() < 32 {
                return Err(bad("auth.jwt_secret", "must be at least 32 characters"));
            }
        }
        Ok(())
    }

    pub fn bind_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.bind.parse().map_err(|_| {
            bad(
                "server.bind",
                format!(
                    "'{}' is not an address like 127.0.0.1:4000",
                    self.server.bind
                ),
            )
        })
    }

    /// This node's stable name (see `cluster.node_id`).
    pub fn node_id(&self) -> String {
        if let Some(id) = &self.cluster.node_id {
            return id.trim().to_string();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let port = self.bind_addr().map(|a| a.port()).unwrap_or(0);
        format!("{host}:{port}")
    }

    pub fn engine(&self) -> EngineConfig {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        EngineConfig {
            grace_ms: self.presence.grace_ms,
            timeout_ms: self.presence.timeout_ms,
            room_idle_ms: self.presence.room_idle_ms,
            recovery_timeout_ms: self.presence.recovery_timeout_ms,
            arbiters: if self.presence.arbiters == 0 {
                cores
            } else {
                self.presence.arbiters
            },
            diff_pace: presence_actors::DiffPace {
                interval_ms: self.presence.diff_interval_ms,
                burst: self.presence.diff_burst,
            },
            scatter_past: EngineConfig::default().scatter_past,
            limits: self.limits.clone(),
            cluster: presence_actors::cluster::Link::single(&self.node_id()),
        }
    }
}

/// Which databases this build can open: PostgreSQL (`postgres://user:password@host:5432/db`, which
/// must parse and name a host) or the embedded SQLite (`sqlite://<path>`, `sqlite::memory:` or a
/// bare path). The message names the problem on one line and never repeats a password.
fn validate_database_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    if url.is_empty() {
        return Err("must not be empty".into());
    }
    crate::store::database_backend(url).map(|_| ())
}

/// The transport's own cap: frames over `limits.max_frame_bytes` but under this get an error
/// reply; frames over this close the socket (1009).
pub const MAX_FRAME_HARD_CAP: usize = 1024 * 1024;

fn config_error(e: config::ConfigError) -> ConfigError {
    // The config crate's messages already name the key ("unknown field `x`", "invalid type …
    // for key `presence.grace_ms`"); keep them on one line.
    let msg = e.to_string().replace('\n', " ");
    let setting = msg
        .split("for key `")
        .nth(1)
        .and_then(|r| r.split('`').next())
        .map(String::from)
        .unwrap_or_else(|| "configuration".into());
    bad(&setting, msg)
}

/// What `{:?}` shows of a secret: whether it is set, never its value.
fn secret(v: &Option<String>) -> &'static str {
    match v {
        Some(_) => "Some([redacted])",
        None => "None",
    }
}

// Settings may be logged whole; secrets and credentials in URLs must not be.
impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &crate::store::redact_database_url(&self.url))
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field(
                "url",
                &self.url.as_deref().map(crate::store::redact_database_url),
            )
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl std::fmt::Debug for BootstrapSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapSettings")
            .field("admin_email", &self.admin_email)
            .field("admin_password", &secret(&self.admin_password))
            .finish()
    }
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthSettings")
            .field("jwt_secret", &secret(&self.jwt_secret))
            .field("access_ttl_s", &self.access_ttl_s)
            .field("refresh_ttl_s", &self.refresh_ttl_s)
            .field("rotation_grace_s", &self.rotation_grace_s)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_the_settings_hides_every_secret() {
        let mut s = Settings::default();
        s.database.url = "postgres://app:db-pass-123@db.internal/presenced".into();
        s.redis.url = Some("redis://:redis-pass-456@cache:6379/0".into());
        s.bootstrap.admin_password = Some("admin-pass-789".into());
        s.auth.jwt_secret = Some("jwt-secret-jwt-secret-jwt-secret-0".into());
        let text = format!("{s:?}");
        for secret in [
            "db-pass-123",
            "redis-pass-456",
            "admin-pass-789",
            "jwt-secret",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains("db.internal"), "{text}");
        assert!(text.contains("[redacted]"), "{text}");
    }

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }

    #[test]
    fn a_bad_bind_address_names_the_setting() {
        let mut s = Settings::default();
        s.server.bind = "nonsense".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.setting, "server.bind");
    }

    #[test]
    fn postgres_and_sqlite_database_urls_are_accepted() {
        for url in [
            "postgres://app:secret@db.internal:5432/presenced",
            "postgresql://postgres@127.0.0.1/test",
            "postgres://app@[::1]:6432/presenced?sslmode=disable",
            "postgres:///presenced?host=/var/run/postgresql",
            "sqlite://data/presenced.db",
            "sqlite::memory:",
            "data/presenced.db",
        ] {
            validate_database_url(url).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn a_bad_database_url_names_the_setting_on_one_line_without_the_password() {
        for (url, expect) in [
            (
                "mysql://root:hunter2@db/presenced",
                "unsupported database URL scheme `mysql`",
            ),
            (
                "postgres://app:hunter2@db:notaport/presenced",
                "invalid PostgreSQL URL",
            ),
            ("postgres://app:hunter2@/presenced", "empty host"),
            ("   ", "must not be empty"),
        ] {
            let mut s = Settings::default();
            s.database.url = url.into();
            let e = s.validate().unwrap_err();
            assert_eq!(e.setting, "database.url", "{url}");
            let line = e.to_string();
            assert!(line.contains(expect), "{url}: {line}");
            assert!(
                !line.contains("hunter2") && !line.contains('\n'),
                "{url}: {line}"
            );
        }
    }

    #[test]
    fn thread_counts_past_the_cap_are_refused() {
        for (name, set) in [
            (
                "server.workers",
                (|s| s.server.workers = 5000) as fn(&mut Settings),
            ),
            ("server.socket_threads", |s| s.server.socket_threads = 1025),
            ("presence.arbiters", |s| s.presence.arbiters = 100_000),
        ] {
            let mut s = Settings::default();
            set(&mut s);
            assert_eq!(s.validate().unwrap_err().setting, name);
        }
        let mut s = Settings::default();
        s.server.socket_threads = 3;
        s.validate().unwrap();
    }

    #[test]
    fn diff_pacing_out_of_range_is_refused_and_zero_turns_it_off() {
        for (name, set) in [
            (
                "presence.diff_burst",
                (|s| s.presence.diff_burst = 0) as fn(&mut Settings),
            ),
            ("presence.diff_burst", |s| s.presence.diff_burst = 10_001),
            ("presence.diff_interval_ms", |s| {
                s.presence.diff_interval_ms = 60_000
            }),
        ] {
            let mut s = Settings::default();
            set(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.setting, name, "{e}");
        }
        let mut s = Settings::default();
        s.presence.diff_interval_ms = 0;
        s.validate().unwrap();
        assert_eq!(s.engine().diff_pace.interval_ms, 0);
        let d = Settings::default().engine().diff_pace;
        assert_eq!(d, presence_actors::DiffPace::default());
    }

    #[test]
    fn a_zero_limit_is_refused() {
        let mut s = Settings::default();
        s.limits.max_outbound = 0;
        assert_eq!(s.validate().unwrap_err().setting, "limits.max_outbound");
    }

    #[test]
    fn a_bad_redis_url_is_refused() {
        let mut s = Settings::default();
        s.redis.url = Some("http://x".into());
        assert_eq!(s.validate().unwrap_err().setting, "redis.url");
    }
}
