//! Core costs of the presence model: a join into a room of N, a status update, and serialising
//! the diff and the full state that the fan-out sends. Run: `cargo bench --bench presence`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use presence_actors::presence::{Arrival, Key, PresenceSet, Ref, SessionId};
use presence_actors::protocol;

fn arrival(i: u64) -> Arrival {
    let mut fields = serde_json::Map::new();
    fields.insert("name".into(), serde_json::Value::from(format!("User {i}")));
    Arrival {
        session: SessionId(i),
        status: "online".into(),
        online_at: 1_700_000_000_000,
        device: None,
        fields: Arc::new(fields),
    }
}

fn room_of(n: u64) -> PresenceSet {
    let mut set = PresenceSet::new();
    for i in 0..n {
        set.join(&Key::from(format!("u{i}")), arrival(i), Ref(i));
    }
    set
}

fn bench(c: &mut Criterion) {
    for n in [100u64, 10_000] {
        let mut g = c.benchmark_group(format!("room_of_{n}"));
        g.bench_function(BenchmarkId::new("join_leave", n), |b| {
            let mut set = room_of(n);
            let key = Key::from("newcomer");
            let mut r = n;
            b.iter(|| {
                r += 1;
                let d = set.join(&key, arrival(r), Ref(r)).diff;
                let l = set.leave(
                    "newcomer",
                    SessionId(r),
                    presence_actors::presence::Departure::Now,
                );
                black_box((d, l))
            })
        });
        g.bench_function(BenchmarkId::new("status_update_diff_frame", n), |b| {
            let mut set = room_of(n);
            let mut r = n;
            b.iter(|| {
                r += 1;
                let (d, _) = set
                    .update("u7", SessionId(7), Some("away".into()), None, Ref(r))
                    .expect("member");
                black_box(protocol::broadcast("room:bench", "presence_diff", &d))
            })
        });
        g.bench_function(BenchmarkId::new("presence_state_frame", n), |b| {
            let set = room_of(n);
            b.iter(|| {
                black_box(protocol::broadcast(
                    "room:bench",
                    "presence_state",
                    &set.state(),
                ))
            })
        });
        g.finish();
    }
    c.bench_function("decode_phoenix_frame", |b| {
        let f = r#"["3","7","room:lobby","status",{"status":"away","meta":{"device":"phone"}}]"#;
        b.iter(|| black_box(protocol::decode(black_box(f), 65536)))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
