//! The figures of a run: the summary (also the `--json`), its table, and the HTML report
//! (inline SVG: the latency percentile plot and the per-second timeline).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::stats::{self, Totals};
use super::{LoadOptions, Second};

/// A latency distribution, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// Seconds since the first report.
    pub t: u64,
    pub sessions: u64,
    pub changes: u64,
    pub deliveries: u64,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rss {
    /// Before the ramp, and once every session is in.
    pub before_bytes: u64,
    pub after_bytes: u64,
    pub per_session_bytes: f64,
    /// Near the end of the measured phase (the sessions still held), when read.
    pub end_bytes: Option<u64>,
    pub per_session_end_bytes: Option<f64>,
    pub source: String,
}

/// Everything a run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: String,
    pub url: String,
    pub sessions_target: usize,
    pub rooms: usize,
    pub rate_target: u32,
    pub changes_target: u32,
    pub duration_s: f64,
    pub procs: usize,
    /// The generator's scheduling policy (`--sched`).
    #[serde(default)]
    pub sched: String,
    pub sources: usize,
    /// Sessions connected and joined at the end of the ramp.
    pub sessions_connected: u64,
    pub sessions_failed: u64,
    /// From the first connection attempt to the last join answered (slowest worker).
    pub ramp_s: f64,
    /// From the end of the ramp until its deliveries had all arrived, when the measured phase
    /// began.
    pub settle_s: f64,
    /// Whether they had (a second with no delivery came); if not, the measured phase began
    /// after the longest wait anyway.
    pub ramp_drained: bool,
    pub connect_join_per_s: f64,
    /// Connect + upgrade + join-reply time of each session's first connection.
    pub connect_latency: Latency,
    pub changes: u64,
    pub changes_per_s: f64,
    /// Timestamped deliveries seen by members: during the ramp (others' joins) and the measured
    /// phase.
    pub ramp_deliveries: u64,
    pub steady_deliveries: u64,
    pub deliveries: u64,
    /// Measured-phase deliveries per second (ramp deliveries per ramp second when the scenario
    /// makes no changes).
    pub deliveries_per_s: f64,
    /// The headline delivery delay: the measured phase's, or the ramp's when it saw none.
    pub latency_phase: String,
    pub latency: Latency,
    pub ramp_latency: Latency,
    pub steady_latency: Latency,
    /// fanout/broadcast: per change, the delay of its last delivery (over every member of
    /// every worker); `count` is the number of changes.
    pub last_delivery: Option<Latency>,
    /// Cluster runs (several `--url`s): measured-phase latency of deliveries on the node the
    /// change was made on, and on the other nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_node_latency: Option<Latency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_node_latency: Option<Latency>,
    /// Measured phase: the delay to the moment each frame reached the generator's socket
    /// (the kernel's receive stamp), without the generator's own wait for a core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arrival_latency: Option<Latency>,
    /// fanout/broadcast: members that saw a change, on average.
    pub receivers_per_change: Option<f64>,
    pub frames: u64,
    /// CPU seconds used by the load generator's workers, and by the node (with
    /// `--server-pid`) from before the ramp to the end.
    pub client_cpu_s: f64,
    pub server_cpu_s: Option<f64>,
    /// Seconds the generator's and the node's threads were runnable but waited for a CPU,
    /// over the same spans (Linux; `stats::cpu_wait_seconds`). On a machine they share, the
    /// figure behind a latency tail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cpu_wait_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_cpu_wait_s: Option<f64>,
    pub wall_s: f64,
    pub reconnects: u64,
    pub throttled: u64,
    pub errors: BTreeMap<String, u64>,
    pub errors_total: u64,
    pub rss: Option<Rss>,
    /// (percentile, ms) of the headline distribution, for a percentile plot.
    pub percentiles: Vec<(f64, f64)>,
    pub timeline: Vec<Point>,
}

pub(super) struct Ramp {
    pub connected: u64,
    pub failed: u64,
    pub ramp_ms: u64,
}

fn merged(finals: &[Totals], pick: impl Fn(&Totals) -> &str) -> Histogram<u64> {
    let mut h = stats::histogram();
    for t in finals {
        if let Ok(x) = stats::decode(pick(t)) {
            stats::merge(&mut h, &x);
        }
    }
    h
}

fn percentiles(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for v in h.iter_quantiles(2) {
        let p = v.quantile_iterated_to() * 100.0;
        let ms = v.value_iterated_to() as f64 / 1000.0;
        if out.last().is_none_or(|&(lp, _): &(f64, f64)| p > lp) {
            out.push((p, ms));
        }
        if p >= 99.9999 {
            break;
        }
    }
    out
}

pub(super) fn summarize(
    o: &LoadOptions,
    finals: &[Totals],
    seconds: &BTreeMap<u64, Second>,
    ramp: Ramp,
) -> Summary {
    let mut ramp_h = merged(finals, |t| &t.ramp_hist);
    let steady_h = merged(finals, |t| &t.hist);
    let connect_h = merged(finals, |t| &t.connect_hist);
    let same_h = merged(finals, |t| &t.same_node_hist);
    let cross_h = merged(finals, |t| &t.cross_node_hist);
    let arrival_h = merged(finals, |t| &t.arrival_hist);
    let some = |h: &Histogram<u64>| (!h.is_empty()).then(|| Latency::of(h));
    let sum = |f: fn(&Totals) -> u64| finals.iter().map(f).sum::<u64>();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for t in finals {
        for (k, v) in &t.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let (ramp_d, steady_d) = (sum(|t| t.ramp_deliveries), sum(|t| t.deliveries));
    let ramp_s = ramp.ramp_ms as f64 / 1000.0;
    let dur = o.duration.as_secs_f64();
    let mut last: HashMap<u64, (u64, u64)> = HashMap::new();
    for t in finals {
        for &(stamp, us, n) in &t.last {
            let e = last.entry(stamp).or_default();
            e.0 = e.0.max(us);
            e.1 += n;
        }
    }
    let (last_delivery, receivers_per_change) = if last.is_empty() {
        (None, None)
    } else {
        let mut h = stats::histogram();
        for &(us, _) in last.values() {
            stats::record(&mut h, us);
        }
        let n: u64 = last.values().map(|v| v.1).sum();
        (Some(Latency::of(&h)), Some(n as f64 / last.len() as f64))
    };
    let changes = sum(|t| t.changes);
    // Without changes, what members saw after the ramp are its last joins.
    let steady_phase = changes > 0;
    let (ramp_d, steady_d) = if steady_phase {
        (ramp_d, steady_d)
    } else {
        stats::merge(&mut ramp_h, &steady_h);
        (ramp_d + steady_d, 0)
    };
    let first = seconds.keys().next().copied().unwrap_or(0);
    let empty = stats::histogram();
    let timeline = seconds
        .iter()
        .map(|(sec, s)| Point {
            t: sec - first,
            sessions: s.sessions,
            changes: s.changes,
            deliveries: s.deliveries,
            p99_ms: s
                .hist
                .as_ref()
                .filter(|h| !h.is_empty())
                .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0),
        })
        .collect();
    Summary {
        scenario: o.scenario.name().into(),
        url: o.url.clone(),
        sessions_target: o.sessions,
        rooms: match o.scenario {
            super::Scenario::Fanout | super::Scenario::Broadcast => 1,
            _ => o.rooms,
        },
        rate_target: o.rate,
        changes_target: o.changes,
        duration_s: dur,
        procs: o.procs,
        sched: o.sched.name().into(),
        sources: o.sources.len(),
        sessions_connected: ramp.connected,
        sessions_failed: ramp.failed,
        ramp_s,
        settle_s: 0.0,
        ramp_drained: false,
        connect_join_per_s: if ramp_s > 0.0 {
            ramp.connected as f64 / ramp_s
        } else {
            0.0
        },
        connect_latency: Latency::of(&connect_h),
        changes,
        changes_per_s: changes as f64 / dur,
        ramp_deliveries: ramp_d,
        steady_deliveries: steady_d,
        deliveries: ramp_d + steady_d,
        deliveries_per_s: if steady_phase {
            steady_d as f64 / dur
        } else if ramp_s > 0.0 {
            ramp_d as f64 / ramp_s
        } else {
            0.0
        },
        latency_phase: if steady_phase { "measured" } else { "ramp" }.into(),
        latency: Latency::of(if steady_phase { &steady_h } else { &ramp_h }),
        ramp_latency: Latency::of(&ramp_h),
        steady_latency: Latency::of(if steady_phase { &steady_h } else { &empty }),
        last_delivery,
        same_node_latency: some(&same_h),
        cross_node_latency: some(&cross_h),
        arrival_latency: some(&arrival_h),
        receivers_per_change,
        frames: sum(|t| t.frames),
        client_cpu_s: finals.iter().map(|t| t.cpu_s).sum(),
        server_cpu_s: None,
        // Unknown if any worker could not say (or none reported).
        client_cpu_wait_s: match finals.is_empty() {
            true => None,
            false => finals.iter().map(|t| t.cpu_wait_s).sum::<Option<f64>>(),
        },
        server_cpu_wait_s: None,
        wall_s: 0.0,
        reconnects: sum(|t| t.reconnects),
        throttled: sum(|t| t.throttled),
        errors_total: errors.values().sum(),
        errors,
        rss: None,
        percentiles: percentiles(if steady_phase { &steady_h } else { &ramp_h }),
        timeline,
    }
}

impl Summary {
    /// The end-of-run table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        row(
            "scenario",
            format!(
                "{} · {} sessions · {} rooms · {} process(es), sched {}",
                self.scenario, self.sessions_target, self.rooms, self.procs, self.sched
            ),
        );
        row(
            "sessions connected",
            format!(
                "{} of {} ({} failed)",
                self.sessions_connected, self.sessions_target, self.sessions_failed
            ),
        );
        row(
            "connect+join",
            format!(
                "{:.0}/s over {:.1} s (target {}/s); each p50 {:.1} ms, p99 {:.1} ms",
                self.connect_join_per_s,
                self.ramp_s,
                self.rate_target,
                self.connect_latency.p50_ms,
                self.connect_latency.p99_ms
            ),
        );
        if self.settle_s > 0.0 {
            row(
                "ramp's deliveries drained",
                if self.ramp_drained {
                    format!(
                        "{:.1} s after the ramp, then the measured phase",
                        self.settle_s
                    )
                } else {
                    format!(
                        "not after {:.1} s: measured phase started anyway",
                        self.settle_s
                    )
                },
            );
        }
        row(
            "changes",
            format!("{} ({:.0}/s)", self.changes, self.changes_per_s),
        );
        row(
            "deliveries",
            format!(
                "{} ({:.0}/s; ramp {}, measured {})",
                self.deliveries,
                self.deliveries_per_s,
                self.ramp_deliveries,
                self.steady_deliveries
            ),
        );
        let l = &self.latency;
        row(
            &format!("delivery delay ({})", self.latency_phase),
            format!(
                "p50 {:.2} · p90 {:.2} · p99 {:.2} · p99.9 {:.2} · max {:.2} ms (n = {})",
                l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, l.count
            ),
        );
        for (name, l) in [
            ("  on the change's node", &self.same_node_latency),
            ("  on another node", &self.cross_node_latency),
            ("  to the socket (kernel)", &self.arrival_latency),
        ] {
            if let Some(l) = l {
                row(
                    name,
                    format!(
                        "p50 {:.2} · p90 {:.2} · p99 {:.2} · max {:.2} ms (n = {})",
                        l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms, l.count
                    ),
                );
            }
        }
        if let (Some(l), Some(n)) = (&self.last_delivery, self.receivers_per_change) {
            row(
                "last delivery per change",
                format!(
                    "p50 {:.2} · p99 {:.2} · max {:.2} ms ({} changes, {n:.0} receivers each)",
                    l.p50_ms, l.p99_ms, l.max_ms, l.count
                ),
            );
        }
        row(
            "CPU (wall)",
            format!(
                "load generator {:.1} s, node {} in {:.1} s",
                self.client_cpu_s,
                self.server_cpu_s
                    .map_or("not measured".to_string(), |c| format!("{c:.1} s")),
                self.wall_s
            ),
        );
        if self.client_cpu_wait_s.is_some() || self.server_cpu_wait_s.is_some() {
            let s = |w: Option<f64>| w.map_or("not measured".to_string(), |w| format!("{w:.1} s"));
            row(
                "waiting for a CPU",
                format!(
                    "load generator {}, node {} (runnable, not running; summed over threads)",
                    s(self.client_cpu_wait_s),
                    s(self.server_cpu_wait_s)
                ),
            );
        }
        row(
            "reconnects / throttled",
            format!("{} / {}", self.reconnects, self.throttled),
        );
        match &self.rss {
            Some(r) => {
                row(
                    "server RSS",
                    format!(
                        "{:.1} MB → {:.1} MB once all are in: {:.1} KB per session ({})",
                        r.before_bytes as f64 / 1e6,
                        r.after_bytes as f64 / 1e6,
                        r.per_session_bytes / 1024.0,
                        r.source
                    ),
                );
                if let (Some(end), Some(per)) = (r.end_bytes, r.per_session_end_bytes) {
                    row(
                        "server RSS, end of hold",
                        format!(
                            "{:.1} MB: {:.1} KB per session",
                            end as f64 / 1e6,
                            per / 1024.0
                        ),
                    );
                }
            }
            None => row("server RSS", "not measured".into()),
        }
        row("errors", self.errors_total.to_string());
        for (k, v) in &self.errors {
            let _ = writeln!(t, "    {v:>8}  {k}");
        }
        t
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A line chart: `points` (x, y), axes from zero (x) and zero (y) to the maxima.
fn chart(title: &str, unit: &str, points: &[(f64, f64)], log_x: bool) -> String {
    let (w, h, l, b) = (720.0, 220.0, 60.0, 30.0);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11"><text x="{l}" y="14" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let (pw, ph) = (w - l - 10.0, h - b - 24.0);
    let _ = write!(
        s,
        r##"<rect x="{l}" y="24" width="{pw}" height="{ph}" fill="none" stroke="#ccc"/>"##
    );
    if points.is_empty() {
        let _ = write!(
            s,
            r#"<text x="{}" y="{}">no data</text></svg>"#,
            l + 10.0,
            60
        );
        return s;
    }
    let fx = |x: f64| {
        if log_x {
            (1.0 / (1.0 - (x / 100.0).min(0.999_999))).log10()
        } else {
            x
        }
    };
    let xmax = points.iter().map(|p| fx(p.0)).fold(0.0, f64::max).max(1e-9);
    let ymax = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9);
    let px = |x: f64| l + fx(x) / xmax * pw;
    let py = |y: f64| 24.0 + ph - y / ymax * ph;
    for i in 0..=4 {
        let y = ymax * f64::from(i) / 4.0;
        let _ = write!(
            s,
            r##"<line x1="{l}" x2="{x2}" y1="{yy:.1}" y2="{yy:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" text-anchor="end">{v} {unit}</text>"##,
            x2 = l + pw,
            yy = py(y),
            tx = l - 4.0,
            ty = py(y) + 4.0,
            v = fmt_num(y)
        );
    }
    if log_x {
        for p in [0.0, 90.0, 99.0, 99.9, 99.99, 99.999] {
            if fx(p) <= xmax {
                let _ = write!(
                    s,
                    r##"<line x1="{0:.1}" x2="{0:.1}" y1="24" y2="{1}" stroke="#eee"/><text x="{0:.1}" y="{2}" text-anchor="middle">{p}%</text>"##,
                    px(p),
                    24.0 + ph,
                    h - 12.0
                );
            }
        }
    } else {
        let xm = points.iter().map(|p| p.0).fold(0.0, f64::max);
        for i in 0..=4 {
            let x = xm * f64::from(i) / 4.0;
            let _ = write!(
                s,
                r#"<text x="{:.1}" y="{}" text-anchor="middle">{:.0} s</text>"#,
                px(x),
                h - 12.0,
                x
            );
        }
    }
    let pts: Vec<String> = points
        .iter()
        .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
        .collect();
    let _ = write!(
        s,
        r##"<polyline fill="none" stroke="#2a6fdb" stroke-width="1.5" points="{}"/></svg>"##,
        pts.join(" ")
    );
    s
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A self-contained HTML page: the summary table, the latency percentile plot and the timeline.
pub fn html(s: &Summary) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>presenced-load: {}</title>\
<style>body{{font-family:sans-serif;margin:24px;color:#222}}pre{{background:#f6f6f6;padding:12px;white-space:pre-wrap}}</style></head><body>\
<h1>presenced-load: {}</h1><pre>{}</pre>",
        esc(&s.scenario),
        esc(&s.scenario),
        esc(&s.table())
    );
    h.push_str(&chart(
        &format!(
            "Delivery delay by percentile ({}, n = {})",
            s.latency_phase, s.latency.count
        ),
        "ms",
        &s.percentiles,
        true,
    ));
    let series = |f: fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        s.timeline
            .iter()
            .filter_map(|p| f(p).map(|v| (p.t as f64, v)))
            .collect()
    };
    h.push_str("<h2>Timeline</h2>");
    h.push_str(&chart(
        "Sessions connected",
        "",
        &series(|p| Some(p.sessions as f64)),
        false,
    ));
    h.push_str(&chart(
        "Changes per second",
        "/s",
        &series(|p| Some(p.changes as f64)),
        false,
    ));
    h.push_str(&chart(
        "Deliveries per second",
        "/s",
        &series(|p| Some(p.deliveries as f64)),
        false,
    ));
    h.push_str(&chart(
        "p99 delivery delay per second",
        "ms",
        &series(|p| p.p99_ms),
        false,
    ));
    h.push_str("</body></html>\n");
    h
}
