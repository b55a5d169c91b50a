//! `Fanout::send` of one presence_diff frame to N = 100 / 1 000 / 10 000 real actix recipients.
//!
//! The recipients are cheap actors (they count frames) on their own arbiter thread, as sessions
//! live on other threads than the room. Two figures per N:
//! - `send/N`: the room's side only, the `try_send` loop (what blocks the room actor), timed
//!   with the recipients' mailboxes empty (untimed wait for them to drain between sends);
//! - `delivered/N`: until every recipient has handled the frame (the room's loop plus the
//!   receivers' work on the other core).
//!
//! `send_lanes/N` and `delivered_lanes/N` are the same with the recipients' thread running a
//! lane (`fanout::Lane`), as a socket thread does: the room's side is one message to the lane,
//! and the lane hands the frame to each recipient on their thread, through their mailboxes.
//! `delivered_outboxes/N`: the same again with each recipient draining an outbox
//! (`presence_actors::outbox`), as a session on a socket thread does.
//!
//! Run: `cargo bench --bench fanout`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use presence_actors::fanout::{Cutoff, Fanout, Lane, Scatter, Subscriber};
use presence_actors::messages::{SessionAddr, ToSession};
use presence_actors::outbox::{self, Outgoing};
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

impl StreamHandler<Outgoing> for Counter {
    fn handle(&mut self, item: Outgoing, _: &mut Context<Self>) {
        std::hint::black_box(item.frame.len());
        self.frames.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reports of recipients a lane could not reach: none are expected here.
struct NoCutoffs;

impl Actor for NoCutoffs {
    type Context = Context<Self>;
}

impl Handler<Cutoff> for NoCutoffs {
    type Result = ();
    fn handle(&mut self, msg: Cutoff, _: &mut Context<Self>) {
        panic!("{} recipients cut off", msg.sessions.len());
    }
}

/// `n` counters started on a new thread with its own actix System, and that thread's lane:
/// their recipients, the lane, and where the lane reports cut-offs. With `outboxes`, counter
/// `i` drains the outbox of `SessionId(i)`.
struct Recipients {
    to: Vec<SessionAddr>,
    lane: Lane,
    cutoff: Recipient<Cutoff>,
}

fn recipients(n: usize, frames: &Arc<AtomicU64>, metrics: &Metrics, outboxes: bool) -> Recipients {
    let (tx, rx) = mpsc::channel();
    let (frames, metrics) = (frames.clone(), metrics.clone());
    std::thread::spawn(move || {
        let sys = System::new();
        sys.block_on(async move {
            let to: Vec<SessionAddr> = (0..n)
                .map(|i| {
                    let frames = frames.clone();
                    Counter::create(move |ctx| {
                        // The server's mailbox bound is `limits.max_outbound` (256): plenty here,
                        // as each frame is drained before the next.
                        ctx.set_mailbox_capacity(256);
                        if outboxes {
                            ctx.add_stream(outbox::open(SessionId(i as u64), 256));
                        }
                        Counter { frames }
                    })
                    .recipient()
                })
                .collect();
            let lane = Lane {
                id: 0,
                to: Scatter::new(metrics).start(),
            };
            let cutoff = NoCutoffs.start().recipient();
            tx.send(Recipients { to, lane, cutoff })
                .unwrap_or_else(|_| panic!("bench alive"));
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
        let r = recipients(n, &frames, &metrics, false);
        let o = recipients(n, &frames, &metrics, true);
        let (mut direct, mut laned) = (Fanout::default(), Fanout::default());
        let mut outboxed = Fanout::default();
        laned.use_lanes(r.cutoff.clone());
        outboxed.use_lanes(o.cutoff.clone());
        for (i, (to, to_o)) in r.to.into_iter().zip(o.to).enumerate() {
            let user: presence_actors::presence::Key = format!("user-{i:06}").into();
            let sub = |to, lane| Subscriber {
                user: user.clone(),
                to,
                lane,
            };
            direct.insert(SessionId(i as u64), sub(to.clone(), None));
            laned.insert(SessionId(i as u64), sub(to, Some(r.lane.clone())));
            outboxed.insert(SessionId(i as u64), sub(to_o, Some(o.lane.clone())));
        }
        g.throughput(Throughput::Elements(n as u64));
        let fans = [
            ("", &mut direct),
            ("_lanes", &mut laned),
            ("_outboxes", &mut outboxed),
        ];
        for (name, fan) in fans {
            g.bench_function(BenchmarkId::new(format!("send{name}"), n), |b| {
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
            g.bench_function(BenchmarkId::new(format!("delivered{name}"), n), |b| {
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
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
