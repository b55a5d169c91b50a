//! Throughput of one real `RoomActor`: joins, leaves, status updates and broadcasts, sent as
//! actix messages the way sessions send them, with the room's diffs fanned out to N members.
//!
//! The set-up is the server's: a `Registry` (one worker arbiter) starts the room on its own
//! thread via `ResolveRoom`; the members are cheap actors on the bench's thread that count the
//! frames they receive (no socket). Each op is answered by the room; requests go out in windows
//! of `BATCH` (pipelined, as many sessions would send them), and a run ends when every member has
//! received everything the room sent for them: a window's changes reach the members as the
//! room batches them (one `presence_diff` per mailbox drain, see `RoomActor::emit`), so a run
//! ends with a barrier, a broadcast that the room sends after its pending diffs and that every
//! member counts. Criterion reports ops/s (`thrpt`). Run: `cargo bench --bench room`.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::future::join_all;
use presence_actors::messages::{Broadcast, Join, Leave, SetStatus, ToSession};
use presence_actors::presence::{Arrival, Departure, IdGen, Key, SessionId};
use presence_actors::registry::{Registry, ResolveRoom};
use presence_actors::room::RoomActor;
use presence_actors::{EngineConfig, Metrics};
use serde_json::{json, Map, Value};

const BATCH: u64 = 100;

/// A member that counts the barriers it receives. Its mailbox is large: the bench measures the
/// room, not evictions.
struct Counter {
    barriers: Rc<Cell<u64>>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<ToSession> for Counter {
    type Result = ();
    fn handle(&mut self, msg: ToSession, _: &mut Context<Self>) {
        match msg {
            ToSession::Frame { frame, .. } => {
                if frame.contains(BARRIER) {
                    self.barriers.set(self.barriers.get() + 1);
                }
            }
            other => panic!("member got {other:?}: the bench overloaded it"),
        }
    }
}

/// The event name of the barrier broadcast.
const BARRIER: &str = "\"bench_barrier\"";

fn counter(barriers: &Rc<Cell<u64>>) -> Addr<Counter> {
    let barriers = barriers.clone();
    Counter::create(move |ctx| {
        ctx.set_mailbox_capacity(1 << 24);
        Counter { barriers }
    })
}

fn arrival(i: u64, f: &Arc<Map<String, Value>>) -> Arrival {
    Arrival {
        session: SessionId(i),
        status: "online".into(),
        online_at: 1_700_000_000_000,
        device: Some("web".into()),
        fields: f.clone(),
    }
}

struct Room {
    addr: Addr<RoomActor>,
    barriers: Rc<Cell<u64>>,
    members: Vec<Key>,
    /// Joiners for the join/leave bench: not members between runs.
    guests: Vec<(Key, Addr<Counter>)>,
    fields: Arc<Map<String, Value>>,
}

async fn room_with(n: u64, registry: &Addr<Registry>) -> Room {
    let addr = registry
        .send(ResolveRoom {
            account: "acc_bench".into(),
            room: format!("bench{n}").into(),
        })
        .await
        .expect("registry")
        .expect("room");
    let barriers = Rc::new(Cell::new(0));
    let mut f = Map::new();
    f.insert("name".into(), Value::from("Bench User"));
    let fields = Arc::new(f);
    let mut members = Vec::new();
    for i in 0..n {
        let user: Key = format!("user-{i:06}").into();
        addr.send(Join {
            user: user.clone(),
            arrival: arrival(i, &fields),
            to: counter(&barriers).recipient(),
            lane: None,
        })
        .await
        .expect("room")
        .expect("join");
        members.push(user);
    }
    let guests = (0..BATCH / 2)
        .map(|j| {
            let user = Key::from(format!("guest-{j:04}"));
            (user, counter(&barriers))
        })
        .collect();
    Room {
        addr,
        barriers,
        members,
        guests,
        fields,
    }
}

impl Room {
    /// Sends the barrier (after everything the room has pending) and waits until all `n`
    /// members have it.
    async fn drained(&self, n: u64) {
        let want = self.barriers.get() + n;
        self.addr
            .send(Broadcast {
                from: SessionId(0),
                event: BARRIER.trim_matches('"').into(),
                payload: json!({}),
                include_self: true,
            })
            .await
            .expect("room")
            .expect("barrier");
        while self.barriers.get() < want {
            actix_rt::task::yield_now().await;
        }
    }
}

fn bench(c: &mut Criterion) {
    let sys = System::new();
    let registry = sys.block_on(async {
        let cfg = EngineConfig {
            arbiters: 1,
            ..EngineConfig::default()
        };
        Registry::new(
            Arc::new(cfg),
            Arc::new(IdGen::new()),
            Metrics::new(&prometheus::Registry::new()),
        )
        .start()
    });
    let mut g = c.benchmark_group("room_actor");
    g.throughput(Throughput::Elements(BATCH));
    for n in [10u64, 100, 1_000] {
        let room = sys.block_on(room_with(n, &registry));
        let statuses = ["away", "online"];

        // BATCH status updates from members in turn; each fans a presence_diff out to all n.
        g.bench_function(BenchmarkId::new("update", n), |b| {
            let mut r = 0u64;
            b.iter_custom(|iters| {
                sys.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let sends = (0..BATCH).map(|_| {
                            r += 1;
                            let i = (r * 7919) % n;
                            room.addr.send(SetStatus {
                                user: room.members[i as usize].clone(),
                                session: SessionId(i),
                                status: Some(statuses[(r & 1) as usize].into()),
                                fields: None,
                            })
                        });
                        for res in join_all(sends).await {
                            res.expect("room").expect("update");
                        }
                    }
                    room.drained(n).await;
                    start.elapsed()
                })
            })
        });

        // BATCH/2 newcomers join (each gets a presence_state of n, and n members a diff), then
        // the same leave: BATCH ops.
        g.bench_function(BenchmarkId::new("join_leave", n), |b| {
            let mut s = 1_000_000u64;
            b.iter_custom(|iters| {
                sys.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let base = s;
                        s += BATCH;
                        let joins = room.guests.iter().enumerate().map(|(j, (user, to))| {
                            room.addr.send(Join {
                                user: user.clone(),
                                arrival: arrival(base + j as u64, &room.fields),
                                to: to.clone().recipient(),
                                lane: None,
                            })
                        });
                        for res in join_all(joins).await {
                            black_box_joined(res.expect("room").expect("join"));
                        }
                        let leaves = room.guests.iter().enumerate().map(|(j, (user, _))| {
                            room.addr.send(Leave {
                                user: user.clone(),
                                session: SessionId(base + j as u64),
                                how: Departure::Now,
                            })
                        });
                        for res in join_all(leaves).await {
                            res.expect("room");
                        }
                    }
                    room.drained(n).await;
                    start.elapsed()
                })
            })
        });

        // BATCH client broadcasts (a small event), each to the n-1 other members.
        g.bench_function(BenchmarkId::new("broadcast", n), |b| {
            let mut r = 0u64;
            let payload = json!({"x": 1, "y": 2, "kind": "cursor"});
            b.iter_custom(|iters| {
                sys.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let sends = (0..BATCH).map(|_| {
                            r += 1;
                            room.addr.send(Broadcast {
                                from: SessionId((r * 7919) % n),
                                event: "cursor".into(),
                                payload: payload.clone(),
                                include_self: false,
                            })
                        });
                        for res in join_all(sends).await {
                            res.expect("room").expect("broadcast");
                        }
                    }
                    room.drained(n).await;
                    start.elapsed()
                })
            })
        });
    }
    g.finish();
}

fn black_box_joined<T>(t: T) {
    std::hint::black_box(t);
}

criterion_group!(benches, bench);
criterion_main!(benches);
