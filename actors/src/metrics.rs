//! Counters and gauges the actors keep, registered in a caller-owned prometheus registry so that
//! several nodes can live in one process (tests) without sharing globals.

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Clone, Debug)]
pub struct Metrics {
    pub connections: IntGauge,
    pub sessions_by_account: IntGaugeVec,
    pub rooms: IntGauge,
    pub accounts: IntGauge,
    pub joins: IntCounter,
    pub leaves: IntCounter,
    pub updates: IntCounter,
    pub diffs: IntCounter,
    /// Times a busy room held its diffs back to keep its pace (`EngineConfig::diff_pace`).
    pub diffs_paced: IntCounter,
    pub deliveries: IntCounter,
    pub broadcasts: IntCounter,
    /// Subscribers cut off because their outbound queue was full, by reason.
    pub outbound_drops: IntCounterVec,
    /// Frames refused or sockets closed for protocol errors, by reason.
    pub ws_errors: IntCounterVec,
    /// Actors restarted by the registry after they died, by kind.
    pub restarts: IntCounterVec,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    // A duplicate registration only happens if one registry is reused for two engines; the
    // metric then still counts, it is just not exported twice.
    let _ = r.register(Box::new(c.clone()));
    c
}

impl Metrics {
    pub fn new(r: &Registry) -> Metrics {
        let g = |n: &str, h: &str| reg(r, IntGauge::new(n, h).expect("valid metric"));
        let c = |n: &str, h: &str| reg(r, IntCounter::new(n, h).expect("valid metric"));
        let cv = |n: &str, h: &str, l: &str| {
            reg(
                r,
                IntCounterVec::new(Opts::new(n, h), &[l]).expect("valid metric"),
            )
        };
        Metrics {
            connections: g("presenced_connections", "Open WebSocket connections"),
            sessions_by_account: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("presenced_sessions", "Live sessions by account"),
                    &["account"],
                )
                .expect("valid metric"),
            ),
            rooms: g("presenced_rooms", "Live room actors"),
            accounts: g("presenced_accounts_live", "Live account actors"),
            joins: c("presenced_joins_total", "Presence joins"),
            leaves: c("presenced_leaves_total", "Presence leaves"),
            updates: c("presenced_updates_total", "Presence meta updates"),
            diffs: c(
                "presenced_diffs_total",
                "presence_diff messages emitted by rooms and accounts",
            ),
            diffs_paced: c(
                "presenced_diffs_paced_total",
                "Times a busy room held its presence diffs back to keep its pace",
            ),
            deliveries: c("presenced_deliveries_total", "Frames handed to subscribers"),
            broadcasts: c("presenced_broadcasts_total", "Client broadcasts relayed"),
            outbound_drops: cv(
                "presenced_outbound_drops_total",
                "Subscribers cut off with a full outbound queue",
                "reason",
            ),
            ws_errors: cv(
                "presenced_ws_errors_total",
                "WebSocket protocol errors",
                "reason",
            ),
            restarts: cv(
                "presenced_actor_restarts_total",
                "Actors restarted after dying",
                "kind",
            ),
        }
    }
}
