//! Snapshot tick cost on both backends: the writer turning an engine snapshot of N sessions
//! (each in one of N/100 rooms) into rows and committing them.
//!
//! - `full/N`: every row changed (as in the first tick after a restart, when every session's
//!   ghost deadline moves), against a baseline loaded from the database.
//! - `steady/N`: a warm writer where 1 % of the sessions changed status since the last tick.
//! - `churn/N`: a warm writer after one 5 s tick of `presenced-load churn` at 2 000 changes/s
//!   over N sessions in N/20 rooms: 10 000 changes, 60 % status changes, 20 % room moves and
//!   20 % reconnects (a new session id: a removed row, closed intervals, a new row, new ones).
//!
//! Run: `cargo bench --bench snapshot` (PostgreSQL from `PRESENCED_TEST_PG`, default
//! postgres://postgres@127.0.0.1:5432/test; a fresh database is created and dropped).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use presence_actors::presence::{Key, Meta, Ref, SessionId};
use presence_actors::snapshot::{AccountSnapshot, EngineSnapshot, RoomSnapshot};
use presenced::persist::writer::{Writer, WriterConfig};
use presenced::persist::PersistMetrics;
use presenced::store::testdb::TempDatabase;
use presenced::store::{RetentionPolicy, Store};

fn meta(i: u64, status: &str) -> Meta {
    let mut fields = serde_json::Map::new();
    fields.insert("name".into(), serde_json::Value::from(format!("User {i}")));
    Meta {
        phx_ref: Ref(i * 2 + 1),
        phx_ref_prev: None,
        session: SessionId(i + 1),
        status: status.into(),
        online_at: 1_800_000_000_000,
        device: Some("web".into()),
        fields: Arc::new(fields),
    }
}

/// N sessions of one account, in N/100 rooms; sessions `i % 100 < changed` get `status`.
fn snapshot(n: u64, changed: u64, status: &str, at: i64) -> EngineSnapshot {
    let account: Arc<str> = "acc_bench".into();
    let rooms = (n / 100).max(1);
    let st = |i: u64| if i % 100 < changed { status } else { "online" };
    let connections = (0..n)
        .map(|i| (Key::from(format!("u{i}")), meta(i, st(i)), None))
        .collect();
    let rooms = (0..rooms)
        .map(|r| RoomSnapshot {
            account: account.clone(),
            room: format!("room{r}").into(),
            members: (0..n)
                .filter(|i| i % rooms == r)
                .map(|i| (Key::from(format!("u{i}")), meta(i, st(i)), None))
                .collect(),
        })
        .collect();
    EngineSnapshot {
        taken_at: at,
        accounts: vec![AccountSnapshot {
            account,
            connections,
            departed: Vec::new(),
            followers: 0,
        }],
        rooms,
        ..EngineSnapshot::default()
    }
}

/// The churn scenario's sessions: one room each, evolving tick by tick.
struct Churn {
    /// (session id, room, status ref) by user.
    users: Vec<(u64, u64, u64)>,
    rooms: u64,
    next: u64,
    rng: u64,
}

impl Churn {
    fn new(n: u64) -> Churn {
        let rooms = (n / 20).max(1);
        Churn {
            users: (0..n).map(|i| (i + 1, i % rooms, i * 2 + 1)).collect(),
            rooms,
            next: n + 1,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn roll(&mut self) -> u64 {
        // xorshift64: reproducible without a dependency.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// Applies `changes` changes: 60 % status, 20 % room moves, 20 % reconnects.
    fn tick(&mut self, changes: usize) {
        for _ in 0..changes {
            let u = (self.roll() % self.users.len() as u64) as usize;
            self.next += 1;
            let next = self.next;
            match self.roll() % 100 {
                0..60 => self.users[u].2 = next * 2 + 1,
                60..80 => self.users[u].1 = self.roll() % self.rooms,
                _ => {
                    self.users[u].0 = next;
                    self.users[u].2 = next * 2 + 1;
                }
            }
        }
    }

    fn snapshot(&self, at: i64) -> EngineSnapshot {
        let account: Arc<str> = "acc_churn".into();
        let meta = |i: usize| {
            let (session, _, phx_ref) = self.users[i];
            let mut fields = serde_json::Map::new();
            fields.insert("name".into(), serde_json::Value::from(format!("User {i}")));
            fields.insert("t".into(), serde_json::Value::from(phx_ref));
            Meta {
                phx_ref: Ref(phx_ref),
                phx_ref_prev: None,
                session: SessionId(session),
                status: if phx_ref % 3 == 0 { "away" } else { "online" }.into(),
                online_at: 1_800_000_000_000,
                device: Some(format!("dev{i}").into()),
                fields: Arc::new(fields),
            }
        };
        let mut members: Vec<Vec<usize>> = vec![Vec::new(); self.rooms as usize];
        for (i, u) in self.users.iter().enumerate() {
            members[u.1 as usize].push(i);
        }
        EngineSnapshot {
            taken_at: at,
            accounts: vec![AccountSnapshot {
                account: account.clone(),
                connections: (0..self.users.len())
                    .map(|i| (Key::from(format!("u{i}")), meta(i), None))
                    .collect(),
                departed: Vec::new(),
                followers: 0,
            }],
            rooms: members
                .into_iter()
                .enumerate()
                .map(|(r, m)| RoomSnapshot {
                    account: account.clone(),
                    room: format!("room{r}").into(),
                    members: m
                        .into_iter()
                        .map(|i| (Key::from(format!("u{i}")), meta(i), None))
                        .collect(),
                })
                .collect(),
            ..EngineSnapshot::default()
        }
    }
}

fn writer(store: &Store) -> Writer {
    let cfg = WriterConfig {
        node_id: "bench-node".into(),
        interval_ms: 5_000,
        sample_interval_ms: 60_000,
        max_buffered_samples: 100_000,
        retention: RetentionPolicy {
            raw_ms: 86_400_000,
            rollup_bucket_ms: 300_000,
            rollup_ms: 30 * 86_400_000,
            batch: 5_000,
        },
    };
    Writer::new(
        store.clone(),
        Arc::new(cfg),
        PersistMetrics::new(&prometheus::Registry::new()),
    )
}

fn bench_backend(c: &mut Criterion, name: &str, url: &str) {
    let store = Store::open(url, 4).expect("store");
    let mut g = c.benchmark_group(format!("snapshot_{name}"));
    g.sample_size(10);
    for n in [1_000u64, 10_000, 20_000] {
        let mut at = 1_800_000_000_000i64;
        g.bench_function(BenchmarkId::new("full", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    at += 1;
                    let snap = snapshot(n, 100, if at % 2 == 0 { "away" } else { "busy" }, at);
                    let mut w = writer(&store);
                    w.set_baseline(store.load_snapshot("bench-node").expect("baseline"));
                    let t = Instant::now();
                    w.write(snap).expect("write");
                    total += t.elapsed();
                }
                total
            })
        });
        let mut w = writer(&store);
        w.write(snapshot(n, 0, "online", at)).expect("warm");
        g.bench_function(BenchmarkId::new("steady_1pct", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    at += 1;
                    let snap = snapshot(n, 1, if at % 2 == 0 { "away" } else { "busy" }, at);
                    let t = Instant::now();
                    w.write(snap).expect("write");
                    total += t.elapsed();
                }
                total
            })
        });
    }
    let n = 20_000u64;
    let mut churn = Churn::new(n);
    let mut w = writer(&store);
    let mut at = 1_900_000_000_000i64;
    w.write(churn.snapshot(at)).expect("warm");
    g.bench_function(BenchmarkId::new("churn", n), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                at += 5_000;
                churn.tick(10_000);
                let snap = churn.snapshot(at);
                let t = Instant::now();
                w.write(snap).expect("write");
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let sqlite = TempDatabase::sqlite();
    bench_backend(c, "sqlite", sqlite.url());
    if let Some(pg) = TempDatabase::postgres() {
        bench_backend(c, "postgres", pg.url());
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
