//! Core costs of the presence model, as plain data (no actors): `PresenceSet` join, leave and
//! update in sets of 10 / 1 000 / 10 000 keys, `Diff::merge` of batches, and serialising
//! `presence_state` (the payload a joiner receives). Run: `cargo bench --bench presence`.
//!
//! Arrivals are built before the timed part (in the server they come in the `Join` message, built
//! by the session), so the figures are the set's own work plus the clones it makes for the diff.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use presence_actors::presence::{
    Arrival, Departure, Diff, Key, PresenceSet, Ref, SessionId, StateLen,
};
use presence_actors::protocol;
use serde_json::{Map, Value};

const SIZES: [u64; 3] = [10, 1_000, 10_000];

fn fields(i: u64) -> Arc<Map<String, Value>> {
    let mut f = Map::new();
    f.insert("name".into(), Value::from(format!("User {i}")));
    Arc::new(f)
}

fn arrival(i: u64, fields: &Arc<Map<String, Value>>) -> Arrival {
    Arrival {
        session: SessionId(i),
        status: "online".into(),
        online_at: 1_700_000_000_000,
        device: Some("web".into()),
        fields: fields.clone(),
    }
}

fn key(i: u64) -> Key {
    Key::from(format!("user-{i:06}"))
}

fn room_of(n: u64) -> PresenceSet {
    let mut set = PresenceSet::new();
    for i in 0..n {
        set.join(&key(i), arrival(i, &fields(i)), Ref(i + 1));
    }
    set
}

/// Ops are timed in chunks of this many, the inverse op (restoring the set's size) untimed, so a
/// set of 10 stays a set of 10..18 and the timer's own cost is spread over the chunk.
const CHUNK: u64 = 8;

fn bench_set(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence_set");
    for n in SIZES {
        // Newcomers: keys that sort among the members (`user-` prefix), fresh sessions.
        let newcomers: Vec<(Key, Arrival)> = (0..CHUNK)
            .map(|j| {
                let i = n + 1_000_000 + j;
                (
                    Key::from(format!("user-{:06}x", (j * 7919) % n.max(1))),
                    arrival(i, &fields(i)),
                )
            })
            .collect();

        g.bench_function(BenchmarkId::new("join", n), |b| {
            let mut set = room_of(n);
            let mut r = 10 * n + 1;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let k = CHUNK.min(iters - done);
                    let t = Instant::now();
                    for (key, a) in &newcomers[..k as usize] {
                        r += 1;
                        black_box(set.join(key, a.clone(), Ref(r)));
                    }
                    total += t.elapsed();
                    for (key, a) in &newcomers[..k as usize] {
                        set.leave(key, a.session, Departure::Now);
                    }
                    done += k;
                }
                total
            })
        });

        g.bench_function(BenchmarkId::new("leave", n), |b| {
            let mut set = room_of(n);
            let mut r = 10 * n + 1;
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let k = CHUNK.min(iters - done);
                    for (key, a) in &newcomers[..k as usize] {
                        r += 1;
                        set.join(key, a.clone(), Ref(r));
                    }
                    let t = Instant::now();
                    for (key, a) in &newcomers[..k as usize] {
                        black_box(set.leave(key, a.session, Departure::Now));
                    }
                    total += t.elapsed();
                    done += k;
                }
                total
            })
        });

        g.bench_function(BenchmarkId::new("update", n), |b| {
            let mut set = room_of(n);
            let keys: Vec<Key> = (0..n).map(key).collect();
            let statuses: [Arc<str>; 2] = ["away".into(), "online".into()];
            let mut r = 10 * n + 1;
            b.iter(|| {
                r += 1;
                let i = (r * 7919) % n;
                black_box(set.update(
                    &keys[i as usize],
                    SessionId(i),
                    Some(statuses[(r & 1) as usize].clone()),
                    None,
                    Ref(r),
                ))
            })
        });

        // What a status update costs the room before the fan-out: the update and its frame.
        g.bench_function(BenchmarkId::new("update_diff_frame", n), |b| {
            let mut set = room_of(n);
            let keys: Vec<Key> = (0..n).map(key).collect();
            let statuses: [Arc<str>; 2] = ["away".into(), "online".into()];
            let mut r = 10 * n + 1;
            b.iter(|| {
                r += 1;
                let i = (r * 7919) % n;
                let (d, _) = set
                    .update(
                        &keys[i as usize],
                        SessionId(i),
                        Some(statuses[(r & 1) as usize].clone()),
                        None,
                        Ref(r),
                    )
                    .expect("member");
                black_box(protocol::broadcast("room:bench", "presence_diff", &d))
            })
        });
    }
    g.finish();
}

/// `Diff::merge` as rooms use it when several changes go out in one diff: appending `m` later
/// diffs to a batch.
fn bench_merge(c: &mut Criterion) {
    let mut g = c.benchmark_group("diff_merge");
    let f = fields(0);
    for m in [10u64, 100, 1_000] {
        g.throughput(Throughput::Elements(m));
        // m distinct sessions join, one diff each: the usual batch.
        let joins: Vec<Diff> = {
            let mut set = PresenceSet::new();
            (0..m)
                .map(|i| set.join(&key(i), arrival(i, &f), Ref(i + 1)).diff)
                .collect()
        };
        g.bench_function(BenchmarkId::new("joins", m), |b| {
            b.iter_batched(
                || joins.clone(),
                |later| {
                    let mut batch = Diff::default();
                    for d in later {
                        batch.merge(d);
                    }
                    black_box(batch)
                },
                BatchSize::SmallInput,
            )
        });
        // m sessions join then m other sessions leave: every leave searches the batch's joins.
        let mixed: Vec<Diff> = {
            let mut set = room_of(m);
            let mut v: Vec<Diff> = (0..m)
                .map(|i| {
                    let j = m + i;
                    set.join(&key(j), arrival(j, &f), Ref(j + 1)).diff
                })
                .collect();
            v.extend((0..m).map(|i| set.leave(&key(i), SessionId(i), Departure::Now)));
            v
        };
        g.bench_function(BenchmarkId::new("joins_then_other_leaves", m), |b| {
            b.iter_batched(
                || mixed.clone(),
                |later| {
                    let mut batch = Diff::default();
                    for d in later {
                        batch.merge(d);
                    }
                    black_box(batch)
                },
                BatchSize::SmallInput,
            )
        });
        // m updates of one key in a row: each cancels the previous join and rewires phx_ref_prev.
        let chain: Vec<Diff> = {
            let mut set = room_of(1);
            (0..m)
                .map(|i| {
                    let s: Arc<str> = if i % 2 == 0 { "away" } else { "online" }.into();
                    set.update("user-000000", SessionId(0), Some(s), None, Ref(100 + i))
                        .expect("member")
                        .0
                })
                .collect()
        };
        g.bench_function(BenchmarkId::new("update_chain", m), |b| {
            b.iter_batched(
                || chain.clone(),
                |later| {
                    let mut batch = Diff::default();
                    for d in later {
                        batch.merge(d);
                    }
                    black_box(batch)
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// `presence_state`: what every joiner receives, serialised from the set.
fn bench_state(c: &mut Criterion) {
    let mut g = c.benchmark_group("presence_state");
    for n in SIZES {
        let set = room_of(n);
        g.throughput(Throughput::Elements(n));
        g.bench_function(BenchmarkId::new("serialize", n), |b| {
            b.iter(|| black_box(serde_json::to_vec(&set.state()).expect("json")))
        });
        g.bench_function(BenchmarkId::new("frame via serde", n), |b| {
            b.iter(|| {
                black_box(protocol::broadcast(
                    "room:bench",
                    "presence_state",
                    &set.state(),
                ))
            })
        });
        // What rooms send: the same bytes, written by hand into a buffer sized up front.
        // Each meta's JSON is kept once written, so a room writes a meta once, then copies it
        // into every later joiner's frame: this is the usual frame...
        // A room keeps the last frame's length to size the next (`StateLen`).
        let len = StateLen::default();
        g.bench_function(BenchmarkId::new("frame", n), |b| {
            b.iter(|| black_box(set.state_frame("room:bench", &len)))
        });
        // ...and this the first one, every meta written (a fresh room each time).
        if n <= 1_000 {
            g.bench_function(BenchmarkId::new("frame, metas not yet written", n), |b| {
                b.iter_batched(
                    || room_of(n),
                    // The set is returned so that dropping it is not timed.
                    |set| {
                        let frame = black_box(set.state_frame("room:bench", &StateLen::default()));
                        (set, frame)
                    },
                    BatchSize::LargeInput,
                )
            });
        }
    }
    let bytes = protocol::broadcast("room:bench", "presence_state", &room_of(10_000).state()).len();
    eprintln!("presence_state frame of 10 000 members: {bytes} bytes");
    g.finish();
}

criterion_group!(benches, bench_set, bench_merge, bench_state);
criterion_main!(benches);
