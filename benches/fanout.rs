//! `Fanout::send` of one presence_diff frame to N = 100 / 1 000 / 10 000 real actix recipients.
//!
//! The recipients are cheap actors (they count frames) on their own arbiter thread, as sessions
//! live on other threads than the room. Two figures per N:
//! - `send/N`: the room's side only, the `try_send` loop (what blocks the room actor), timed
//!   with the recipients' mailboxes empty (untimed wait for them to drain between sends);
//! - `delivered/N`: until every recipient has handled the frame (the room's loop plus the
//!   receivers' work on the other core).
//!
//! Run: `cargo bench --bench fanout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use presence_actors::fanout::{Fanout, Subscriber};
use presence_actors::messages::{SessionAddr, ToSession};
use presence_actors::presence::{Arrival, Key, PresenceSet, Ref, SessionId};
use presence_actors::protocol;
use presence_actors::Metrics;

struct Counter {
    frames: Arc<AtomicU64>,
}

impl Actor for Counter {
    type Context = Context<Self>;
}

impl Handler<ToSession> for Counter {
    type Result = ();
    fn handle(&mut self, msg: ToSession, _: &mut Context<Self>) {
        if let ToSession::Frame { frame, .. } = msg {
            std::hint::black_box(frame.len());
            self.frames.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts `n` counters on a new thread with its own actix System; returns their recipients.
fn recipients(n: usize, frames: &Arc<AtomicU64>) -> Vec<SessionAddr> {
    let (tx, rx) = mpsc::channel();
    let frames = frames.clone();
    std::thread::spawn(move || {
        let sys = System::new();
        sys.block_on(async move {
            let addrs: Vec<SessionAddr> = (0..n)
                .map(|_| {
                    let frames = frames.clone();
                    Counter::create(move |ctx| {
                        // The server's mailbox bound is `limits.max_outbound` (256): plenty here,
                        // as each frame is drained before the next.
                        ctx.set_mailbox_capacity(256);
                        Counter { frames }
                    })
                    .recipient()
                })
                .collect();
            tx.send(addrs).expect("bench alive");
        });
        sys.run().ok();
    });
    rx.recv().expect("counters started")
}

fn diff_frame() -> ByteString {
    let mut set = PresenceSet::new();
    let mut f = serde_json::Map::new();
    f.insert("name".into(), serde_json::Value::from("Bench User"));
    let key = Key::from("user-000042");
    set.join(
        &key,
        Arrival {
            session: SessionId(42),
            status: "online".into(),
            online_at: 1_700_000_000_000,
            device: Some("web".into()),
            fields: Arc::new(f),
        },
        Ref(1),
    );
    let (d, _) = set
        .update(
            "user-000042",
            SessionId(42),
            Some("away".into()),
            None,
            Ref(2),
        )
        .expect("member");
    protocol::broadcast("room:bench", "presence_diff", &d)
}

fn wait_for(frames: &AtomicU64, total: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while frames.load(Ordering::Relaxed) < total {
        assert!(Instant::now() < deadline, "recipients stopped draining");
        std::hint::spin_loop();
    }
}

fn bench(c: &mut Criterion) {
    let frame = diff_frame();
    eprintln!("frame: {} bytes", frame.len());
    let topic: Arc<str> = "room:bench".into();
    let metrics = Metrics::new(&prometheus::Registry::new());
    let mut g = c.benchmark_group("fanout");
    for n in [100usize, 1_000, 10_000] {
        let frames = Arc::new(AtomicU64::new(0));
        let mut fan = Fanout::default();
        for (i, to) in recipients(n, &frames).into_iter().enumerate() {
            fan.insert(
                SessionId(i as u64),
                Subscriber {
                    user: format!("user-{i:06}").into(),
                    to,
                    lane: None,
                },
            );
        }
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(BenchmarkId::new("send", n), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut expect = frames.load(Ordering::Relaxed);
                for _ in 0..iters {
                    let t = Instant::now();
                    let dropped = fan.send(&frame, None, &topic, &metrics);
                    total += t.elapsed();
                    assert!(dropped.is_empty(), "{} dropped", dropped.len());
                    expect += n as u64;
                    wait_for(&frames, expect);
                }
                total
            })
        });
        g.bench_function(BenchmarkId::new("delivered", n), |b| {
            b.iter_custom(|iters| {
                let mut expect = frames.load(Ordering::Relaxed);
                let t = Instant::now();
                for _ in 0..iters {
                    let dropped = fan.send(&frame, None, &topic, &metrics);
                    assert!(dropped.is_empty(), "{} dropped", dropped.len());
                    expect += n as u64;
                    wait_for(&frames, expect);
                }
                t.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
