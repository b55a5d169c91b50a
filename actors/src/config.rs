//! The engine's knobs, from the `presence` and `limits` sections of the server configuration.
//! Defaults are production values; tests shrink the timings to milliseconds.

use serde::{Deserialize, Serialize};

/// Per-socket and per-account limits; every one has a clear error reason when crossed.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest text frame a client may send; larger ones get `frame_too_large`.
    pub max_frame_bytes: usize,
    /// Topics one socket may have joined at once; more get `too_many_joins`.
    pub max_joins_per_socket: usize,
    /// Serialised size of a join's or status push's `meta`; larger gets `meta_too_large`.
    pub max_meta_bytes: usize,
    /// Distinct live rooms per account; a join that would create one more gets `room_limit`.
    pub max_rooms_per_account: usize,
    /// Sessions in one room; more get `room_full`.
    pub max_room_members: usize,
    pub max_user_id_len: usize,
    pub max_room_name_len: usize,
    /// Messages queued towards one subscriber before it is cut off as a slow consumer.
    pub max_outbound: usize,
    /// Error replies a socket may earn per minute before it is closed for abuse.
    pub max_errors_per_minute: u32,
    /// Pushes (status, broadcast) in flight per socket; more get `rate_limited`.
    pub max_inflight: usize,
    /// Login attempts per client IP per minute (then 429 with `Retry-After`).
    pub login_per_ip_per_minute: u32,
    /// Login attempts per email per hour, counted only for attempts the IP limit let through.
    pub login_per_email_per_hour: u32,
    /// API requests per client IP per second (bursts of twice that).
    pub api_per_ip_per_s: u32,
    /// API requests per account (or per admin) per second (bursts of twice that).
    pub api_per_account_per_s: u32,
    /// Socket upgrades per client IP per second (bursts of twice that).
    pub connects_per_ip_per_s: u32,
    /// Socket upgrades per account per second (bursts of twice that).
    pub connects_per_account_per_s: u32,
    /// Room joins per account per second (bursts of twice that); more get `rate_limited`.
    pub joins_per_account_per_s: u32,
    /// Room joins per client IP per second (bursts of twice that); more get `rate_limited`.
    pub joins_per_ip_per_s: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 64 * 1024,
            max_joins_per_socket: 100,
            max_meta_bytes: 4096,
            max_rooms_per_account: 10_000,
            max_room_members: 100_000,
            max_user_id_len: 128,
            max_room_name_len: 128,
            max_outbound: 256,
            max_errors_per_minute: 120,
            max_inflight: 64,
            login_per_ip_per_minute: 10,
            login_per_email_per_hour: 100,
            api_per_ip_per_s: 100,
            api_per_account_per_s: 200,
            connects_per_ip_per_s: 500,
            connects_per_account_per_s: 1000,
            joins_per_account_per_s: 2000,
            joins_per_ip_per_s: 2000,
        }
    }
}

/// Timings and shape of the actor tree.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long a dropped session stays present, waiting for its reconnect.
    pub grace_ms: u64,
    /// A socket silent for this long is closed.
    pub timeout_ms: u64,
    /// An empty room lingers this long before it stops, so churn does not restart it each time.
    pub room_idle_ms: u64,
    /// How long a restarted actor waits for live sessions to report before it serves.
    pub recovery_timeout_ms: u64,
    /// Worker threads (arbiters) that rooms and accounts are spread over.
    pub arbiters: usize,
    /// Pacing of a room's `presence_diff` frames (see `DiffPace`).
    pub diff_pace: DiffPace,
    /// Members past which a room placed with its sessions hands its frames to a scatter on an
    /// arbiter (`fanout::Scatter`).
    pub scatter_past: usize,
    pub limits: Limits,
    /// This node's name and, in a cluster, where local changes go.
    pub cluster: crate::cluster::Link,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            grace_ms: 5_000,
            timeout_ms: 60_000,
            room_idle_ms: 30_000,
            recovery_timeout_ms: 2_000,
            arbiters: 2,
            diff_pace: DiffPace::default(),
            scatter_past: 256,
            limits: Limits::default(),
            cluster: crate::cluster::Link::default(),
        }
    }
}

/// How often a room in a storm of joins and leaves sends their `presence_diff`s. A room sends
/// `burst` frames back to back as its changes come; past that, joins and leaves go at most once
/// per `interval_ms`, each frame carrying all of them since the last (a join storm into a room
/// of a hundred then costs each member a few frames a second instead of one per join). A status
/// change is never held: it goes at once, with whatever is pending. A room changing less often
/// than once per interval never waits. `interval_ms = 0` sends every batch at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffPace {
    pub interval_ms: u64,
    pub burst: u32,
}

impl Default for DiffPace {
    fn default() -> Self {
        DiffPace {
            interval_ms: 250,
            burst: 10,
        }
    }
}
