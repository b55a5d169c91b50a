//! Snapshot tick cost on both backends: the writer turning an engine snapshot of N sessions
//! (each in one of N/100 rooms) into rows and committing them.
//!
//! - `full/N`: every row changed (as in the first tick after a restart, when every session's
//!   ghost deadline moves), against a baseline loaded from the database.
//! - `steady/N`: a warm writer where 1 % of the sessions changed status since the last tick.
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
