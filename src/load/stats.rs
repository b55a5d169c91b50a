//! Figures: HDR histograms (microseconds), their wire form between processes, and the events a
//! worker reports to the parent (one JSON object a line on its stdout).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest latency a histogram holds: 10 minutes, in µs (larger values are clamped).
const MAX_US: u64 = 600_000_000;

/// A latency histogram in microseconds, 3 significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds")
}

/// A per-second histogram: 2 significant figures are enough for a p99 line and keep it small.
pub fn small_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 2).expect("valid histogram bounds")
}

pub fn record(h: &mut Histogram<u64>, us: u64) {
    h.saturating_record(us.clamp(1, MAX_US));
}

/// V2 serialisation, base64: one printable token.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = V2Serializer::new().serialize(h, &mut buf);
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode(s: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("histogram: bad base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("histogram: {e:?}"))
}

/// Adds `from` into `into`, clamping what does not fit.
pub fn merge(into: &mut Histogram<u64>, from: &Histogram<u64>) {
    if into.add(from).is_err() {
        for v in from.iter_recorded() {
            let _ = into.record_n(v.value_iterated_to().clamp(1, MAX_US), v.count_at_value());
        }
    }
}

/// Now, as unix microseconds: the clock every process on the machine shares.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The stamp (`_lt`) of a change this process sends: its send time in µs, made unique across
/// the generator's worker processes and within this one. Receivers key "last delivery per
/// change" by stamp, and two workers ticking on the same schedule could stamp two changes with
/// the same microsecond (seen: 296 changes counted with 10 068 receivers each in a room of
/// 10 000). Worker `i` of `P` only uses stamps congruent to `i` modulo `P`, each above the last;
/// a stamp is at most a few µs earlier than the true send time.
pub fn stamp_us() -> u64 {
    let (i, of) = STAMP_SHARE.get().copied().unwrap_or((0, 1));
    let now = now_us();
    let mut out = 0;
    let _ = LAST_STAMP.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
        out = next_stamp(now, last, i, of);
        Some(out)
    });
    out
}

/// The stamp after `last` for worker `i` of `of` at `now`: the latest time not after `now` in
/// the worker's residue class, or the class's next one after `last` if that is not later.
fn next_stamp(now: u64, last: u64, i: u64, of: u64) -> u64 {
    let now = now.max(i);
    let here = now - (now - i) % of;
    if here > last {
        here
    } else {
        last + of
    }
}

/// Which residue class of stamps this process owns: worker `index` of `of`. Set once, before
/// any change is sent; a lone process owns them all.
pub fn set_stamp_share(index: usize, of: usize) {
    let of = of.max(1) as u64;
    let _ = STAMP_SHARE.set((index as u64 % of, of));
}

static STAMP_SHARE: OnceLock<(u64, u64)> = OnceLock::new();
static LAST_STAMP: AtomicU64 = AtomicU64::new(0);

/// What a worker (in this process or a child) tells the coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Event {
    /// One wall-clock second (`sec`, unix seconds) of one worker.
    Tick {
        worker: usize,
        sec: u64,
        /// Sessions connected at the end of the second.
        sessions: u64,
        changes: u64,
        deliveries: u64,
        /// Delivery delays recorded in that second (`encode`d).
        hist: String,
    },
    /// Every session of the worker has connected and joined, or failed.
    Ready {
        worker: usize,
        connected: u64,
        failed: u64,
        /// From the first connection attempt to the last join answered.
        ramp_ms: u64,
    },
    /// The worker is done: its totals.
    Final(Box<Totals>),
    /// The worker could not run.
    Fatal { worker: usize, why: String },
}

/// A worker's figures at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub worker: usize,
    pub connected: u64,
    pub failed: u64,
    pub ramp_ms: u64,
    pub changes: u64,
    /// Timestamped changes seen by members during the ramp and during the measured phase.
    pub ramp_deliveries: u64,
    pub deliveries: u64,
    /// Frames received in all.
    pub frames: u64,
    pub reconnects: u64,
    /// 429 answers to upgrades (retried after a pause, not errors).
    pub throttled: u64,
    pub errors: BTreeMap<String, u64>,
    /// Delivery delays during the ramp (joins of others) and during the measured phase.
    pub ramp_hist: String,
    pub hist: String,
    /// Cluster runs: the measured phase's deliveries on the change's own node, and on others.
    #[serde(default)]
    pub same_node_hist: String,
    #[serde(default)]
    pub cross_node_hist: String,
    /// Measured phase: delays to the moment the frame reached the worker's socket.
    #[serde(default)]
    pub arrival_hist: String,
    /// Connect + join latency of each session's first connection.
    pub connect_hist: String,
    /// fanout/broadcast, measured phase: per change (its stamp), the longest delay seen here
    /// and how many members saw it.
    #[serde(default)]
    pub last: Vec<(u64, u64, u64)>,
    /// CPU seconds (user + system) this worker's process used.
    #[serde(default)]
    pub cpu_s: f64,
    /// Seconds its threads waited for a CPU (`cpu_wait_seconds`), if the kernel says.
    #[serde(default)]
    pub cpu_wait_s: Option<f64>,
}

/// `/proc/<pid>`, or this process's (`None`).
fn proc_dir(pid: Option<u32>) -> String {
    match pid {
        Some(p) => format!("/proc/{p}"),
        None => "/proc/self".to_string(),
    }
}

/// CPU seconds (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let s = std::fs::read_to_string(format!("{}/stat", proc_dir(pid))).ok()?;
    // Fields after the command (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on Linux.
    Some(ticks / 100.0)
}

/// Seconds a process's threads have spent runnable but waiting for a CPU (the kernel's
/// `run_delay`, `/proc/<pid>/task/*/schedstat`), summed over the threads alive now. On a
/// machine whose cores the node shares with the generator, this is where a latency tail
/// comes from: a delivery waits for its thread to get a core. A thread that exits takes its
/// share with it, so a difference of two readings undercounts by what exited threads waited
/// (the node's threads live as long as it does). `None` where the kernel does not say (not
/// Linux, or no schedstat).
pub fn cpu_wait_seconds(pid: Option<u32>) -> Option<f64> {
    let mut ns = 0u64;
    let mut seen = false;
    for task in std::fs::read_dir(format!("{}/task", proc_dir(pid)))
        .ok()?
        .flatten()
    {
        // A thread may exit between the listing and the read: it is skipped.
        let Ok(s) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some(wait) = s
            .split_whitespace()
            .nth(1)
            .and_then(|f| f.parse::<u64>().ok())
        {
            ns += wait;
            seen = true;
        }
    }
    seen.then(|| ns as f64 / 1e9)
}

/// How much a counter read twice (`cpu_wait_seconds`) grew in between: unknown if either
/// reading is, and never below zero (threads that exited took their share with them).
pub fn grown(before: Option<f64>, now: Option<f64>) -> Option<f64> {
    before.zip(now).map(|(b, n)| (n - b).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_grows_by_the_difference_never_below_zero_and_unknown_if_a_reading_is() {
        assert_eq!(grown(Some(1.5), Some(4.0)), Some(2.5));
        assert_eq!(grown(Some(4.0), Some(1.5)), Some(0.0));
        assert_eq!(grown(None, Some(1.0)), None);
        assert_eq!(grown(Some(1.0), None), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_wait_for_a_cpu_is_read_for_this_process_or_a_pid_and_none_for_no_process() {
        let mine = cpu_wait_seconds(None).expect("linux has schedstat");
        assert!(mine >= 0.0);
        let by_pid = cpu_wait_seconds(Some(std::process::id())).expect("by pid as well");
        assert!(by_pid >= 0.0);
        assert_eq!(cpu_wait_seconds(Some(u32::MAX)), None, "no such process");
    }

    #[test]
    fn workers_stamp_in_their_own_class_never_later_than_now_and_always_forward() {
        for of in [1u64, 2, 3, 8] {
            for i in 0..of {
                let mut last = 0;
                // Several stamps in the same microsecond, then time moving on.
                for now in [
                    1_000_000u64,
                    1_000_000,
                    1_000_000,
                    1_000_001,
                    1_000_009,
                    1_000_009,
                ] {
                    let s = next_stamp(now, last, i, of);
                    assert_eq!(s % of, i, "worker {i} of {of} owns its class");
                    assert!(s > last, "stamps go forward");
                    assert!(s <= now.max(last + of), "never ahead of now unless bumped");
                    assert!(s + of > now, "at most of-1 µs behind now");
                    last = s;
                }
            }
        }
        // Two workers at the same instant never share a stamp.
        assert_ne!(next_stamp(5_000, 0, 0, 2), next_stamp(5_000, 0, 1, 2));
    }

    #[test]
    fn this_process_never_stamps_twice_the_same() {
        let stamps: Vec<u64> = (0..10_000).map(|_| stamp_us()).collect();
        assert!(stamps.windows(2).all(|w| w[1] > w[0]));
    }
}
