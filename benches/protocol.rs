//! The Phoenix V2 wire format (`presence_actors::protocol`): decoding the text frames clients
//! send (`[join_ref, ref, topic, event, payload]`) and encoding what the server sends back
//! (replies, diffs, broadcasts). Run: `cargo bench --bench protocol`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use presence_actors::presence::{Arrival, Key, PresenceSet, Ref, SessionId};
use presence_actors::protocol::{self, Reason};
use serde_json::{json, Value};

const MAX: usize = 64 * 1024;

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol_decode");
    let frames = [
        ("heartbeat", r#"[null,"12","phoenix","heartbeat",{}]"#.to_string()),
        (
            "phx_join",
            r#"["3","3","room:lobby","phx_join",{"status":"online","meta":{"device":"web","name":"Ann"}}]"#
                .to_string(),
        ),
        (
            "status",
            r#"["3","7","room:lobby","status",{"status":"away","meta":{"device":"phone"}}]"#.to_string(),
        ),
        (
            "broadcast",
            r#"["3","8","room:lobby","broadcast",{"event":"cursor","payload":{"x":120,"y":48}}]"#
                .to_string(),
        ),
        (
            "status_1KiB_meta",
            format!(
                r#"["3","9","room:lobby","status",{{"status":"busy","meta":{{"note":"{}"}}}}]"#,
                "n".repeat(1024)
            ),
        ),
        ("malformed", r#"["3","7","room:lobby","status"]"#.to_string()),
    ];
    for (name, f) in &frames {
        g.throughput(Throughput::Bytes(f.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| black_box(protocol::decode(black_box(f), MAX)))
        });
    }
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("protocol_encode");
    let (jr, r) = (json!("3"), json!("7"));
    g.bench_function("reply_ok_empty", |b| {
        b.iter(|| black_box(protocol::reply_ok(&jr, &r, "room:lobby", &json!({}))))
    });
    g.bench_function("reply_error", |b| {
        b.iter(|| {
            black_box(protocol::reply_error(
                &jr,
                &r,
                "room:lobby",
                Reason::NotJoined,
            ))
        })
    });
    let hb = json!("12");
    g.bench_function("heartbeat_reply", |b| {
        b.iter(|| black_box(protocol::reply_ok(&Value::Null, &hb, "phoenix", &json!({}))))
    });

    // A status update's diff (one join with phx_ref_prev + one leave), as rooms emit it.
    let mut set = PresenceSet::new();
    let mut f = serde_json::Map::new();
    f.insert("name".into(), Value::from("Ann Example"));
    f.insert("device".into(), Value::from("web"));
    let key = Key::from("user-000042");
    let join = set
        .join(
            &key,
            Arrival {
                session: SessionId(42),
                status: "online".into(),
                online_at: 1_700_000_000_000,
                device: Some("web".into()),
                fields: Arc::new(f),
            },
            Ref(0x1234_5678),
        )
        .diff;
    let (update, _) = set
        .update(
            "user-000042",
            SessionId(42),
            Some("away".into()),
            None,
            Ref(0x1234_5679),
        )
        .expect("member");
    g.bench_function("presence_diff_join", |b| {
        b.iter(|| black_box(protocol::broadcast("room:lobby", "presence_diff", &join)))
    });
    g.bench_function("presence_diff_update", |b| {
        b.iter(|| black_box(protocol::broadcast("room:lobby", "presence_diff", &update)))
    });
    let payload = json!({"x": 120, "y": 48});
    g.bench_function("broadcast_event", |b| {
        b.iter(|| black_box(protocol::broadcast("room:lobby", "cursor", &payload)))
    });
    eprintln!(
        "sizes: diff_update {} B, diff_join {} B",
        protocol::broadcast("room:lobby", "presence_diff", &update).len(),
        protocol::broadcast("room:lobby", "presence_diff", &join).len()
    );
    g.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
