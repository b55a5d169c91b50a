//! Plans, usage and billing alerts.
//!
//! Every account with live sockets has an `AccountUsage`: lock-free counters that sockets bump
//! (connections, messages in/out, joins) and the account's plan limits. Sockets check the plan
//! there, without a message round trip: a connection past `max_connections` and a push past
//! `max_messages_per_day` are refused with `plan_limit`; rooms are limited by the registry
//! (`SetPlanRooms`), since it is the one that starts them.
//!
//! The `UsageMeter` actor ticks every second. It
//! - accumulates connection-seconds,
//! - pushes `usage_changed` to the account's dashboards when something moved (so at most once
//!   a second per account),
//! - sends `billing_alert` when a limit crosses 80 % and 100 %, once per period (the month for
//!   connections and rooms, the UTC day for messages); the `billing_alerts` table's unique key
//!   makes it once across restarts and nodes,
//! - and at each minute's end writes one `usage_metrics` row per active account (off the actor
//!   threads; rows wait in a bounded buffer while the database is down).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};

use presence_actors::account::{AccountActor, Notify};
use presence_actors::now_ms;
use presence_actors::registry::{Registry, ResolveAccount, RoomCounts, SetPlanRooms};

use crate::store::{NewBillingAlert, Plan, Store, StoreError, UsageRow};

const MINUTE_MS: i64 = 60_000;
const DAY_MS: i64 = 86_400_000;
/// Minute rows kept while the database is down (oldest dropped first).
const MAX_PENDING_ROWS: usize = 100_000;

/// The start (unix ms) of the minute that `at` is in.
pub fn minute_of(at: i64) -> i64 {
    at - at.rem_euclid(MINUTE_MS)
}

/// The UTC day index of `at`.
fn day_of(at: i64) -> i64 {
    at.div_euclid(DAY_MS)
}

/// `(year, month, day)` of a UTC day index (days since 1970-01-01), proleptic Gregorian.
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Days since 1970-01-01 of a civil date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The billing period (calendar month, UTC) that `at` is in: its name and `[start, end)`.
pub fn month_of(at: i64) -> (String, i64, i64) {
    let (y, m, _) = civil(day_of(at));
    let start = days_from_civil(y, m, 1) * DAY_MS;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let end = days_from_civil(ny, nm, 1) * DAY_MS;
    (format!("{y:04}-{m:02}"), start, end)
}

/// The UTC day that `at` is in, as `YYYY-MM-DD`.
pub fn day_name(at: i64) -> String {
    let (y, m, d) = civil(day_of(at));
    format!("{y:04}-{m:02}-{d:02}")
}

/// Why a plan refused something, for the error reply and the alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub kind: &'static str,
    pub limit: i64,
}

/// One account's live usage and plan.
pub struct AccountUsage {
    pub account: Arc<str>,
    plan: RwLock<Plan>,
    connections: AtomicI64,
    /// This minute.
    peak: AtomicI64,
    connection_ms: AtomicI64,
    messages_in: AtomicI64,
    messages_out: AtomicI64,
    joins: AtomicI64,
    /// Pushes counted against `max_messages_per_day` this UTC day.
    messages_today: AtomicI64,
    changed: AtomicBool,
}

/// A connection counted against the plan; dropping it gives the slot back.
pub struct ConnectionSlot(Arc<AccountUsage>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.mark_changed();
    }
}

impl ConnectionSlot {
    pub fn usage(&self) -> &Arc<AccountUsage> {
        &self.0
    }
}

impl AccountUsage {
    fn new(account: Arc<str>, plan: Plan, messages_today: i64) -> AccountUsage {
        AccountUsage {
            account,
            plan: RwLock::new(plan),
            connections: AtomicI64::new(0),
            peak: AtomicI64::new(0),
            connection_ms: AtomicI64::new(0),
            messages_in: AtomicI64::new(0),
            messages_out: AtomicI64::new(0),
            joins: AtomicI64::new(0),
            messages_today: AtomicI64::new(messages_today),
            changed: AtomicBool::new(true),
        }
    }

    /// Flags the account for the next `usage_changed`. Called per frame sent: reads first, so
    /// the shared cache line is written once per tick, not once per frame.
    fn mark_changed(&self) {
        if !self.changed.load(Ordering::Relaxed) {
            self.changed.store(true, Ordering::Relaxed);
        }
    }

    pub fn plan(&self) -> Plan {
        match self.plan.read() {
            Ok(p) => p.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set_plan(&self, plan: Plan) {
        match self.plan.write() {
            Ok(mut p) => *p = plan,
            Err(p) => *p.into_inner() = plan,
        }
        self.mark_changed();
    }

    pub fn connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn messages_today(&self) -> i64 {
        self.messages_today.load(Ordering::Relaxed)
    }

    /// Takes a connection slot, or refuses when the plan's concurrent connections are in use.
    pub fn try_connect(self: &Arc<Self>) -> Result<ConnectionSlot, OverLimit> {
        let limit = self.plan().max_connections;
        let mut current = self.connections.load(Ordering::Relaxed);
        loop {
            if current >= limit {
                return Err(OverLimit {
                    kind: "connections",
                    limit,
                });
            }
            match self.connections.compare_exchange_weak(
                current,
                current + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(now) => current = now,
            }
        }
        self.peak.fetch_max(current + 1, Ordering::Relaxed);
        self.mark_changed();
        Ok(ConnectionSlot(self.clone()))
    }

    /// A push from a client (status, broadcast): counted, or refused past the daily limit.
    pub fn message_in(&self) -> Result<(), OverLimit> {
        let limit = self.plan().max_messages_per_day;
        let today = self.messages_today.fetch_add(1, Ordering::Relaxed);
        if today >= limit {
            self.messages_today.fetch_sub(1, Ordering::Relaxed);
            return Err(OverLimit {
                kind: "messages",
                limit,
            });
        }
        self.messages_in.fetch_add(1, Ordering::Relaxed);
        self.mark_changed();
        Ok(())
    }

    /// Frames pushed to a client.
    pub fn messages_out(&self, n: i64) {
        self.messages_out.fetch_add(n, Ordering::Relaxed);
        self.mark_changed();
    }

    pub fn joined(&self) {
        self.joins.fetch_add(1, Ordering::Relaxed);
        self.mark_changed();
    }

    /// This minute so far, as a row.
    pub fn current_row(&self, now: i64) -> UsageRow {
        UsageRow {
            account_id: self.account.to_string(),
            minute: minute_of(now),
            peak_connections: self.peak.load(Ordering::Relaxed),
            connection_seconds: self.connection_ms.load(Ordering::Relaxed) / 1000,
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            joins: self.joins.load(Ordering::Relaxed),
        }
    }

    /// Ends the minute: its row (None if nothing happened) and fresh counters.
    fn take_row(&self, minute: i64) -> Option<UsageRow> {
        let connections = self.connections();
        let row = UsageRow {
            account_id: self.account.to_string(),
            minute,
            peak_connections: self.peak.swap(connections, Ordering::Relaxed),
            // Whole seconds go into this minute's row; the rest carries over.
            connection_seconds: {
                let ms = self.connection_ms.load(Ordering::Relaxed);
                self.connection_ms
                    .fetch_sub(ms - ms % 1000, Ordering::Relaxed);
                ms / 1000
            },
            messages_in: self.messages_in.swap(0, Ordering::Relaxed),
            messages_out: self.messages_out.swap(0, Ordering::Relaxed),
            joins: self.joins.swap(0, Ordering::Relaxed),
        };
        let idle = row.peak_connections == 0
            && row.connection_seconds == 0
            && row.messages_in == 0
            && row.messages_out == 0
            && row.joins == 0;
        (!idle).then_some(row)
    }

    /// What `usage_changed` and the dashboard show.
    pub fn json(&self, rooms: i64, now: i64) -> Value {
        let plan = self.plan();
        let row = self.current_row(now);
        json!({
            "account": &*self.account,
            "plan": plan.id,
            "connections": { "used": self.connections(), "limit": plan.max_connections },
            "rooms": { "used": rooms, "limit": plan.max_rooms },
            "messages_today": { "used": self.messages_today(), "limit": plan.max_messages_per_day },
            "minute": {
                "at": row.minute,
                "peak_connections": row.peak_connections,
                "connection_seconds": row.connection_seconds,
                "messages_in": row.messages_in,
                "messages_out": row.messages_out,
                "joins": row.joins,
            },
        })
    }
}

/// The usage of every account this node serves.
#[derive(Clone)]
pub struct UsageBook {
    inner: Arc<RwLock<HashMap<Arc<str>, Arc<AccountUsage>>>>,
    store: Store,
    registry: Addr<Registry>,
}

impl UsageBook {
    pub fn new(store: Store, registry: Addr<Registry>) -> UsageBook {
        UsageBook {
            inner: Arc::default(),
            store,
            registry,
        }
    }

    pub fn get(&self, account: &str) -> Option<Arc<AccountUsage>> {
        self.inner.read().ok()?.get(account).cloned()
    }

    fn all(&self) -> Vec<Arc<AccountUsage>> {
        self.inner
            .read()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The account's usage, loading its plan (and today's message count) on first use.
    /// `Ok(None)`: no such account.
    pub async fn load(&self, account: &str) -> Result<Option<Arc<AccountUsage>>, StoreError> {
        if let Some(u) = self.get(account) {
            return Ok(Some(u));
        }
        let (store, id) = (self.store.clone(), account.to_string());
        let loaded = actix_web::rt::task::spawn_blocking(move || {
            let plan = store.account_plan(&id)?;
            let now = now_ms();
            let day_start = day_of(now) * DAY_MS;
            let sent: i64 = store
                .usage_rows(&id, day_start, now + MINUTE_MS, 24 * 60 + 1)?
                .iter()
                .map(|r| r.messages_in)
                .sum();
            Ok::<_, StoreError>((plan, sent))
        })
        .await
        .map_err(|e| StoreError::Other(e.to_string()))?;
        let (plan, sent) = match loaded {
            Ok(x) => x,
            Err(StoreError::NotFound) => return Ok(None),
            Err(e) => return Err(e),
        };
        let key: Arc<str> = account.into();
        let mut map = self
            .inner
            .write()
            .map_err(|_| StoreError::Other("usage book poisoned".into()))?;
        let usage = map
            .entry(key.clone())
            .or_insert_with(|| {
                self.send_room_limit(&key, &plan);
                Arc::new(AccountUsage::new(key.clone(), plan, sent))
            })
            .clone();
        Ok(Some(usage))
    }

    fn send_room_limit(&self, account: &Arc<str>, plan: &Plan) {
        let max = usize::try_from(plan.max_rooms.max(0)).unwrap_or(usize::MAX);
        self.registry.do_send(SetPlanRooms {
            account: account.clone(),
            max_rooms: max,
        });
    }

    /// The account's plan changed: new limits apply at once (live connections and rooms over a
    /// lower limit stay; new ones are refused).
    pub fn plan_changed(&self, account: &str, plan: Plan) {
        let key: Arc<str> = account.into();
        self.send_room_limit(&key, &plan);
        if let Some(u) = self.get(account) {
            u.set_plan(plan);
        }
    }
}

/// One threshold crossing to alert about.
struct Crossing {
    account: Arc<str>,
    kind: &'static str,
    threshold: i32,
    value: i64,
    limit: i64,
    period: String,
}

/// Ticks usage; see the module docs.
pub struct UsageMeter {
    book: UsageBook,
    registry: Addr<Registry>,
    store: Store,
    last_tick: i64,
    minute: i64,
    day: i64,
    pending: VecDeque<UsageRow>,
    writing: bool,
    /// Alerts already sent (or found recorded): `(account, kind, threshold, period)`.
    alerted: HashSet<(Arc<str>, &'static str, i32, String)>,
    accounts: HashMap<Arc<str>, Addr<AccountActor>>,
    /// Ticks so far: `usage_changed` goes out at most once per tick and account.
    ticks: u64,
}

/// How many ticks the meter has run (tests relate `usage_changed` pushes to it).
#[derive(Message)]
#[rtype(result = "u64")]
pub struct Ticks;

impl Handler<Ticks> for UsageMeter {
    type Result = u64;

    fn handle(&mut self, _: Ticks, _: &mut Context<Self>) -> u64 {
        self.ticks
    }
}

impl UsageMeter {
    pub fn new(book: UsageBook, registry: Addr<Registry>, store: Store) -> UsageMeter {
        let now = now_ms();
        UsageMeter {
            book,
            registry,
            store,
            last_tick: now,
            minute: minute_of(now),
            day: day_of(now),
            pending: VecDeque::new(),
            writing: false,
            alerted: HashSet::new(),
            accounts: HashMap::new(),
            ticks: 0,
        }
    }

    fn notify(
        &mut self,
        ctx: &mut Context<Self>,
        account: Arc<str>,
        event: &'static str,
        payload: Value,
    ) {
        if let Some(addr) = self.accounts.get(&account).filter(|a| a.connected()) {
            addr.do_send(Notify {
                event: event.into(),
                payload,
            });
            return;
        }
        let ask = self.registry.send(ResolveAccount {
            account: account.clone(),
        });
        ctx.spawn(ask.into_actor(self).map(move |res, act, _| {
            if let Ok(Ok(addr)) = res {
                addr.do_send(Notify {
                    event: event.into(),
                    payload,
                });
                act.accounts.insert(account, addr);
            }
        }));
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        self.ticks += 1;
        let now = now_ms();
        let elapsed = (now - self.last_tick).clamp(0, 10_000);
        self.last_tick = now;
        let all = self.book.all();
        for u in &all {
            let c = u.connections();
            if c > 0 {
                u.connection_ms.fetch_add(c * elapsed, Ordering::Relaxed);
            }
        }
        let day = day_of(now);
        if day != self.day {
            self.day = day;
            for u in &all {
                u.messages_today.store(0, Ordering::Relaxed);
            }
        }
        if minute_of(now) != self.minute {
            let ended = self.minute;
            self.minute = minute_of(now);
            for u in &all {
                if let Some(row) = u.take_row(ended) {
                    if self.pending.len() >= MAX_PENDING_ROWS {
                        self.pending.pop_front();
                    }
                    self.pending.push_back(row);
                }
            }
            self.flush(ctx);
        }
        // usage_changed, and alerts, need the live room counts.
        let changed: Vec<Arc<AccountUsage>> = all
            .iter()
            .filter(|u| u.changed.swap(false, Ordering::Relaxed))
            .cloned()
            .collect();
        let ask = self.registry.send(RoomCounts);
        ctx.spawn(ask.into_actor(self).map(move |res, act, ctx| {
            let rooms = res.unwrap_or_default();
            let now = now_ms();
            for u in &changed {
                let r = rooms.get(&u.account).copied().unwrap_or(0) as i64;
                act.notify(ctx, u.account.clone(), "usage_changed", u.json(r, now));
            }
            act.check_alerts(ctx, &all, &rooms, now);
        }));
    }

    fn check_alerts(
        &mut self,
        ctx: &mut Context<Self>,
        all: &[Arc<AccountUsage>],
        rooms: &HashMap<Arc<str>, usize>,
        now: i64,
    ) {
        let (month, _, _) = month_of(now);
        let today = day_name(now);
        let mut crossings = Vec::new();
        for u in all {
            let plan = u.plan();
            let r = rooms.get(&u.account).copied().unwrap_or(0) as i64;
            for (kind, value, limit, period) in [
                ("connections", u.connections(), plan.max_connections, &month),
                ("rooms", r, plan.max_rooms, &month),
                (
                    "messages",
                    u.messages_today(),
                    plan.max_messages_per_day,
                    &today,
                ),
            ] {
                for threshold in [80, 100] {
                    if limit <= 0 || value * 100 < limit * i64::from(threshold) {
                        continue;
                    }
                    let key = (u.account.clone(), kind, threshold, period.clone());
                    if self.alerted.insert(key) {
                        crossings.push(Crossing {
                            account: u.account.clone(),
                            kind,
                            threshold,
                            value,
                            limit,
                            period: period.clone(),
                        });
                    }
                }
            }
        }
        if crossings.is_empty() {
            return;
        }
        let store = self.store.clone();
        let write = actix_web::rt::task::spawn_blocking(move || {
            crossings
                .into_iter()
                .map(|c| {
                    let res = store.record_alert(&NewBillingAlert {
                        account_id: &c.account,
                        period: &c.period,
                        kind: c.kind,
                        threshold: c.threshold,
                        value: c.value,
                        limit_value: c.limit,
                        at: now,
                    });
                    (c, res)
                })
                .collect::<Vec<_>>()
        });
        ctx.spawn(write.into_actor(self).map(move |res, act, ctx| {
            for (c, recorded) in res.unwrap_or_default() {
                match recorded {
                    Ok(true) => {
                        log::info!(
                            "account {} reached {}% of its {} limit ({} of {})",
                            c.account,
                            c.threshold,
                            c.kind,
                            c.value,
                            c.limit
                        );
                        let payload = json!({
                            "kind": c.kind,
                            "threshold": c.threshold,
                            "value": c.value,
                            "limit": c.limit,
                            "period": c.period,
                            "at": now,
                        });
                        act.notify(ctx, c.account.clone(), "billing_alert", payload);
                    }
                    // Another node or an earlier run sent it this period.
                    Ok(false) => {}
                    Err(e) => {
                        log::warn!("could not record a billing alert: {e}");
                        act.alerted.remove(&(
                            c.account.clone(),
                            c.kind,
                            c.threshold,
                            c.period.clone(),
                        ));
                    }
                }
            }
        }));
    }

    /// Writes the buffered minute rows (one write at a time).
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.writing || self.pending.is_empty() {
            return;
        }
        self.writing = true;
        let rows: Vec<UsageRow> = self.pending.drain(..).collect();
        let store = self.store.clone();
        let write = actix_web::rt::task::spawn_blocking(move || {
            let res = store.add_usage(&rows);
            (rows, res)
        });
        ctx.spawn(write.into_actor(self).map(|res, act, _| {
            act.writing = false;
            match res {
                Ok((_, Ok(()))) => {}
                Ok((rows, Err(e))) => {
                    log::warn!("usage not written yet ({} rows kept): {e}", rows.len());
                    for r in rows.into_iter().rev() {
                        if act.pending.len() < MAX_PENDING_ROWS {
                            act.pending.push_front(r);
                        }
                    }
                }
                Err(e) => log::warn!("usage write task failed: {e}"),
            }
        }));
    }
}

/// Write the current minute's usage now (shutdown, tests); waits for the write.
#[derive(Message)]
#[rtype(result = "Result<(), String>")]
pub struct FlushUsage;

impl Actor for UsageMeter {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(Duration::from_secs(1), |act, ctx| act.tick(ctx));
    }
}

impl Handler<FlushUsage> for UsageMeter {
    type Result = ResponseActFuture<Self, Result<(), String>>;

    fn handle(&mut self, _: FlushUsage, _: &mut Context<Self>) -> Self::Result {
        let minute = minute_of(now_ms());
        let mut rows: Vec<UsageRow> = self.pending.drain(..).collect();
        rows.extend(self.book.all().iter().filter_map(|u| u.take_row(minute)));
        let store = self.store.clone();
        let write = actix_web::rt::task::spawn_blocking(move || {
            store.add_usage(&rows).map_err(|e| e.to_string())
        });
        Box::pin(write.into_actor(self).map(|res, _, _| match res {
            Ok(r) => r,
            Err(e) => Err(e.to_string()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_periods_are_utc_months_and_days() {
        // 2024-02-29T12:00:00Z
        let t = 1_709_208_000_000;
        let (name, start, end) = month_of(t);
        assert_eq!(name, "2024-02");
        assert_eq!(start, 1_706_745_600_000); // 2024-02-01
        assert_eq!(end, 1_709_251_200_000); // 2024-03-01
        assert_eq!(day_name(t), "2024-02-29");
        let (name, _, end) = month_of(1_735_603_200_000); // 2024-12-31
        assert_eq!(name, "2024-12");
        assert_eq!(end, 1_735_689_600_000); // 2025-01-01
        assert_eq!(minute_of(60_001), 60_000);
    }

    fn plan(max_connections: i64, max_messages_per_day: i64) -> Plan {
        Plan {
            id: "test".into(),
            max_connections,
            max_rooms: 10,
            max_messages_per_day,
        }
    }

    #[test]
    fn connection_slots_stop_at_the_plan_and_come_back_when_dropped() {
        let u = Arc::new(AccountUsage::new("a".into(), plan(2, 10), 0));
        let one = u.try_connect().unwrap();
        let _two = u.try_connect().unwrap();
        assert_eq!(u.try_connect().err().map(|e| e.kind), Some("connections"));
        drop(one);
        assert_eq!(u.connections(), 1);
        assert!(u.try_connect().is_ok());
        assert_eq!(u.current_row(0).peak_connections, 2);
    }

    #[test]
    fn pushes_stop_at_the_daily_limit_and_a_minute_row_resets_its_counters() {
        let u = AccountUsage::new("a".into(), plan(2, 3), 1);
        assert!(u.message_in().is_ok());
        assert!(u.message_in().is_ok());
        assert_eq!(u.message_in().unwrap_err().kind, "messages");
        assert_eq!(u.messages_today(), 3);
        u.joined();
        u.messages_out(5);
        let row = u.take_row(0).unwrap();
        assert_eq!((row.messages_in, row.messages_out, row.joins), (2, 5, 1));
        assert!(
            u.take_row(60_000).is_none(),
            "an idle minute writes nothing"
        );
        assert_eq!(u.messages_today(), 3, "the daily count is not per minute");
    }
}
