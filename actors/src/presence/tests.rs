//! Unit and property tests of the presence model against the phoenix.js client rules.

use super::*;
use crate::client_presence::{apply_diff_payload, sync_state, ClientState};
use proptest::prelude::*;

fn arrival(session: u64, status: &str, device: Option<&str>) -> Arrival {
    Arrival {
        session: SessionId(session),
        status: status.into(),
        online_at: 1000,
        device: device.map(Into::into),
        fields: Arc::new(Map::new()),
    }
}

fn key(s: &str) -> Key {
    Key::from(s)
}

fn json<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap()
}

/// The hand-written `presence_state` frame is, byte for byte, what serde writes.
fn assert_state_written_as_serialised(set: &PresenceSet) {
    let len = StateLen::default();
    let frame = set.state_frame("room:t", &len);
    let serialised = crate::protocol::broadcast("room:t", "presence_state", &set.state());
    assert_eq!(&*frame, &*serialised);
    // The next frame is reserved from this one's length; the bytes do not depend on it.
    assert_eq!(len.0.get(), frame.len());
    assert_eq!(&*set.state_frame("room:t", &len), &*serialised);
    let v: Value = serde_json::from_str(&frame).expect("the frame is JSON");
    assert_eq!(v[4], json(&set.state()));
}

#[test]
fn the_written_state_frame_is_the_serialised_one_whatever_the_strings() {
    let mut set = PresenceSet::new();
    assert_state_written_as_serialised(&set);
    let mut fields = Map::new();
    fields.insert(
        "name".into(),
        Value::from("Zoë \"quoted\" \\ back\nslash\u{1}"),
    );
    fields.insert(
        "tags".into(),
        serde_json::json!(["a", {"nested": [1, 2.5, null, true]}]),
    );
    fields.insert("emoji🙂".into(), Value::from("🙂"));
    let tricky = Arrival {
        fields: Arc::new(fields),
        ..arrival(1, "busy \"now\"\t", Some("web"))
    };
    set.join(&key("ann \"the\" first"), tricky, Ref(0x1f));
    set.join(&key("bob"), arrival(2, "online", None), Ref(u64::MAX));
    set.join(&key("bob"), arrival(3, "away", Some("phone")), Ref(0));
    // Written once, each meta's JSON is kept; the changes below must not leave it stale.
    assert_state_written_as_serialised(&set);
    // An update: the meta carries phx_ref_prev.
    set.update("bob", SessionId(2), Some("away".into()), None, Ref(0xabc))
        .expect("bob is there");
    // A ghost is in the state like any meta.
    set.leave("bob", SessionId(3), Departure::Grace { until: 5_000 });
    assert_state_written_as_serialised(&set);
    // A remote owner's new ref, and a restart's restore over a kept meta.
    let mut remote = set
        .meta_of("bob", SessionId(3))
        .expect("bob's ghost")
        .clone();
    remote.phx_ref = Ref(0xdef);
    remote.status = "back".into();
    set.put_remote(&key("bob"), remote.clone());
    assert_state_written_as_serialised(&set);
    remote.status = "restored".into();
    set.restore(&key("bob"), remote);
    assert_state_written_as_serialised(&set);
    set.assert_consistent();
}

fn client_from(set: &PresenceSet) -> ClientState {
    let mut c = ClientState::new();
    let state = json(&set.state());
    sync_state(&mut c, state.as_object().unwrap());
    c
}

fn refs_of(c: &ClientState, k: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .get(k)
        .map(|p| {
            p["metas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["phx_ref"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_join_produces_a_join_diff_with_the_meta() {
    let mut set = PresenceSet::new();
    let d = set
        .join(&key("u1"), arrival(1, "online", None), Ref(10))
        .diff;
    let v = json(&d);
    assert_eq!(v["joins"]["u1"]["metas"][0]["phx_ref"], "a");
    assert_eq!(v["joins"]["u1"]["metas"][0]["status"], "online");
    assert_eq!(v["leaves"], serde_json::json!({}));
    assert_eq!(set.keys(), 1);
    assert_eq!(set.metas(), 1);
}

#[test]
fn two_devices_of_one_user_are_one_key_with_two_metas_until_the_last_leaves() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", Some("phone")), Ref(1));
    set.join(&key("u1"), arrival(2, "online", Some("laptop")), Ref(2));
    assert_eq!(set.keys(), 1);
    assert_eq!(set.metas(), 2);
    let d = set.leave("u1", SessionId(1), Departure::Now);
    assert_eq!(d.leaves.len(), 1);
    assert_eq!(set.keys(), 1);
    set.leave("u1", SessionId(2), Departure::Now);
    assert!(set.is_empty());
    assert_eq!(set.metas(), 0);
}

#[test]
fn a_status_change_is_one_diff_with_a_fresh_ref_and_phx_ref_prev() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", None), Ref(1));
    let mut client = client_from(&set);
    let (d, current) = set
        .update("u1", SessionId(1), Some("away".into()), None, Ref(2))
        .unwrap();
    assert_eq!(current.phx_ref, Ref(2));
    let v = json(&d);
    assert_eq!(v["joins"]["u1"]["metas"][0]["phx_ref_prev"], "1");
    assert_eq!(v["joins"]["u1"]["metas"][0]["status"], "away");
    assert_eq!(v["leaves"]["u1"]["metas"][0]["phx_ref"], "1");
    apply_diff_payload(&mut client, &v);
    assert_eq!(refs_of(&client, "u1"), vec!["2"]);
}

#[test]
fn a_dropped_session_stays_as_a_ghost_until_its_grace_ends() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", None), Ref(1));
    let d = set.leave("u1", SessionId(1), Departure::Grace { until: 5000 });
    assert!(d.is_empty());
    assert_eq!(set.ghosts(), 1);
    assert_eq!(set.next_expiry(), Some(5000));
    assert!(set.expire(4999).is_empty());
    let d = set.expire(5000);
    assert_eq!(d.leaves.len(), 1);
    assert!(set.is_empty());
    assert_eq!(set.ghosts(), 0);
}

#[test]
fn a_reconnect_of_the_same_device_within_grace_takes_the_ghosts_place_silently() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", Some("phone")), Ref(1));
    set.join(&key("u1"), arrival(2, "online", Some("laptop")), Ref(2));
    set.leave("u1", SessionId(1), Departure::Grace { until: 5000 });
    let out = set.join(&key("u1"), arrival(3, "online", Some("phone")), Ref(3));
    assert!(
        out.diff.is_empty(),
        "nobody hears of an unchanged reconnect"
    );
    assert_eq!(out.phx_ref, Ref(1), "the session keeps the ghost's ref");
    assert_eq!(out.replaced, Some(SessionId(1)));
    assert_eq!(set.meta_of("u1", SessionId(3)).unwrap().phx_ref, Ref(1));
    assert!(set.meta_of("u1", SessionId(1)).is_none());
    assert_eq!(set.ghosts(), 0);
    assert_eq!(set.metas(), 2);
    assert!(set.expire(10_000).is_empty());
}

#[test]
fn a_reconnect_that_changed_its_status_swaps_the_ghost_in_one_diff() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", Some("phone")), Ref(1));
    set.leave("u1", SessionId(1), Departure::Grace { until: 5000 });
    let out = set.join(&key("u1"), arrival(3, "away", Some("phone")), Ref(3));
    let d = out.diff;
    assert_eq!(out.phx_ref, Ref(3));
    assert_eq!(out.replaced, Some(SessionId(1)));
    assert_eq!(d.joins.len(), 1);
    assert_eq!(d.leaves.len(), 1);
    assert_eq!(d.leaves[0].1.phx_ref, Ref(1));
    assert_eq!(d.joins[0].1.phx_ref_prev, Some(Ref(1)));
    assert_eq!(&*d.joins[0].1.status, "away");
    assert_eq!(set.ghosts(), 0);
    assert_eq!(set.metas(), 1);
    assert!(set.expire(10_000).is_empty());
}

#[test]
fn a_restored_ghost_is_present_until_its_deadline_and_reclaimed_silently() {
    let mut set = PresenceSet::new();
    let meta = arrival(7, "busy", Some("tab")).into_meta(Ref(70));
    set.restore_ghost(&key("u1"), meta.clone(), 5000);
    set.restore_ghost(
        &key("u2"),
        arrival(8, "online", None).into_meta(Ref(80)),
        5000,
    );
    assert_eq!((set.keys(), set.metas(), set.ghosts()), (2, 2, 2));
    assert_eq!(set.next_expiry(), Some(5000));
    let ghosts: Vec<_> = set
        .entries()
        .map(|(k, m, g)| (k.to_string(), m.phx_ref, g))
        .collect();
    assert_eq!(
        ghosts,
        vec![
            ("u1".into(), Ref(70), Some(5000)),
            ("u2".into(), Ref(80), Some(5000))
        ]
    );
    let out = set.join(&key("u1"), arrival(9, "busy", Some("tab")), Ref(90));
    assert!(out.diff.is_empty());
    assert_eq!(out.phx_ref, Ref(70));
    let d = set.expire(5000);
    assert_eq!(
        d.leaves.len(),
        1,
        "only the ghost that did not come back leaves"
    );
    assert_eq!(&*d.leaves[0].0, "u2");
    assert_eq!((set.keys(), set.metas(), set.ghosts()), (1, 1, 0));
}

#[test]
fn a_reconnect_of_another_device_does_not_take_the_ghosts_place() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", Some("phone")), Ref(1));
    set.leave("u1", SessionId(1), Departure::Grace { until: 5000 });
    let d = set
        .join(&key("u1"), arrival(2, "online", Some("laptop")), Ref(2))
        .diff;
    assert!(d.leaves.is_empty());
    assert_eq!(set.metas(), 2);
    assert_eq!(set.expire(5000).leaves.len(), 1);
}

#[test]
fn a_duplicate_join_of_the_same_session_is_an_update_not_a_second_meta() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", None), Ref(1));
    let d = set.join(&key("u1"), arrival(1, "busy", None), Ref(2)).diff;
    assert_eq!(d.joins.len(), 1);
    assert_eq!(d.leaves.len(), 1);
    assert_eq!(set.metas(), 1);
}

#[test]
fn leaving_an_unknown_session_or_key_changes_nothing() {
    let mut set = PresenceSet::new();
    assert!(set.leave("nobody", SessionId(1), Departure::Now).is_empty());
    set.join(&key("u1"), arrival(1, "online", None), Ref(1));
    assert!(set.leave("u1", SessionId(9), Departure::Now).is_empty());
    assert!(set.update("u1", SessionId(9), None, None, Ref(5)).is_none());
    assert_eq!(set.metas(), 1);
}

#[test]
fn reserved_keys_in_fields_never_override_server_owned_ones() {
    let mut fields = Map::new();
    fields.insert("status".into(), Value::from("hacked"));
    fields.insert("phx_ref".into(), Value::from("x"));
    fields.insert("name".into(), Value::from("Ann"));
    let mut set = PresenceSet::new();
    let mut a = arrival(1, "online", None);
    a.fields = Arc::new(fields);
    let d = set.join(&key("u1"), a, Ref(1)).diff;
    let v = json(&d);
    let m = &v["joins"]["u1"]["metas"][0];
    assert_eq!(m["status"], "online");
    assert_eq!(m["phx_ref"], "1");
    assert_eq!(m["name"], "Ann");
}

#[test]
fn pages_walk_keys_in_order_after_the_cursor() {
    let mut set = PresenceSet::new();
    for (i, u) in ["c", "a", "b", "d"].iter().enumerate() {
        set.join(&key(u), arrival(i as u64, "online", None), Ref(i as u64));
    }
    let p1: Vec<&str> = set.after(None).take(2).map(|(k, _)| &**k).collect();
    assert_eq!(p1, vec!["a", "b"]);
    let p2: Vec<&str> = set.after(Some("b")).take(5).map(|(k, _)| &**k).collect();
    assert_eq!(p2, vec!["c", "d"]);
}

#[test]
fn merging_a_join_and_its_leave_cancels_both() {
    let mut set = PresenceSet::new();
    let mut d = set
        .join(&key("u1"), arrival(1, "online", None), Ref(1))
        .diff;
    d.merge(set.leave("u1", SessionId(1), Departure::Now));
    assert!(d.is_empty());
}

#[test]
fn merging_an_update_chain_points_the_last_join_at_the_meta_clients_saw() {
    let mut set = PresenceSet::new();
    set.join(&key("u1"), arrival(1, "online", None), Ref(1));
    let mut d = set
        .update("u1", SessionId(1), Some("away".into()), None, Ref(2))
        .unwrap()
        .0;
    d.merge(
        set.update("u1", SessionId(1), Some("busy".into()), None, Ref(3))
            .unwrap()
            .0,
    );
    assert_eq!(d.joins.len(), 1);
    assert_eq!(d.joins[0].1.phx_ref, Ref(3));
    assert_eq!(d.joins[0].1.phx_ref_prev, Some(Ref(1)));
    assert_eq!(d.leaves.len(), 1);
    assert_eq!(d.leaves[0].1.phx_ref, Ref(1));
}

/// One step a random client population can take.
#[derive(Clone, Debug)]
enum Op {
    Join {
        user: u8,
        session: u8,
        device: u8,
    },
    Leave {
        session: u8,
    },
    Drop {
        session: u8,
    },
    Status {
        session: u8,
        status: u8,
    },
    Tick {
        ms: u16,
    },
    /// A client (the observer) reconnects: it resyncs from a fresh `presence_state`.
    Resync,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..8, 0u8..3).prop_map(|(user, session, device)| Op::Join { user, session, device }),
        2 => (0u8..8).prop_map(|session| Op::Leave { session }),
        2 => (0u8..8).prop_map(|session| Op::Drop { session }),
        3 => (0u8..8, 0u8..3).prop_map(|(session, status)| Op::Status { session, status }),
        2 => (0u16..3000).prop_map(|ms| Op::Tick { ms }),
        1 => Just(Op::Resync),
    ]
}

/// The server's state as a client would hold it, ordered for comparison.
fn normal(c: &ClientState) -> Vec<(String, Vec<Value>)> {
    let mut v: Vec<(String, Vec<Value>)> = c
        .iter()
        .map(|(k, p)| {
            let mut ms: Vec<Value> = p["metas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| {
                    let mut m = m.clone();
                    m.as_object_mut().unwrap().remove("phx_ref_prev");
                    m
                })
                .collect();
            ms.sort_by_key(|m| m["phx_ref"].as_str().unwrap().to_string());
            (k.clone(), ms)
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    /// Random joins, leaves, drops, reconnects and status changes, applied diff by diff (and in
    /// coalesced batches) to a phoenix.js-style client, always leave the client holding exactly
    /// the server's presence.
    #[test]
    fn client_state_built_from_diffs_always_converges_to_the_server(
        ops in proptest::collection::vec(op(), 1..80),
        batch in 1usize..5,
    ) {
        const GRACE: i64 = 1000;
        let mut set = PresenceSet::new();
        let mut client = ClientState::new();
        let mut now: i64 = 0;
        let mut next_ref = 1u64;
        // session -> (user, live)
        let mut sessions: std::collections::HashMap<u8, (u8, bool)> = Default::default();
        let mut pending = Diff::default();
        let mut pending_n = 0usize;
        let devices = ["phone", "laptop", "tablet"];
        let statuses = ["online", "away", "busy"];
        for op in ops {
            let d = match op {
                Op::Join { user, session, device } => {
                    let user = match sessions.get(&session) {
                        Some((u, true)) => *u,
                        _ => user,
                    };
                    sessions.insert(session, (user, true));
                    next_ref += 1;
                    // a fresh connection is a fresh session id unless it is a duplicate join
                    set.join(
                        &key(&format!("u{user}")),
                        arrival(session as u64, "online", Some(devices[device as usize])),
                        Ref(next_ref),
                    )
                    .diff
                }
                Op::Leave { session } => match sessions.get(&session) {
                    Some((u, true)) => {
                        let u = *u;
                        sessions.insert(session, (u, false));
                        set.leave(&format!("u{u}"), SessionId(session as u64), Departure::Now)
                    }
                    _ => Diff::default(),
                },
                Op::Drop { session } => match sessions.get(&session) {
                    Some((u, true)) => {
                        let u = *u;
                        sessions.insert(session, (u, false));
                        set.leave(&format!("u{u}"), SessionId(session as u64), Departure::Grace { until: now + GRACE })
                    }
                    _ => Diff::default(),
                },
                Op::Status { session, status } => match sessions.get(&session) {
                    Some((u, true)) => {
                        next_ref += 1;
                        set.update(&format!("u{u}"), SessionId(session as u64), Some(statuses[status as usize].into()), None, Ref(next_ref))
                            .map(|(d, _)| d)
                            .unwrap_or_default()
                    }
                    _ => Diff::default(),
                },
                Op::Tick { ms } => {
                    now += ms as i64;
                    let d = set.expire(now);
                    prop_assert!(set.next_expiry().is_none_or(|t| t > now), "a due ghost stayed");
                    d
                }
                Op::Resync => {
                    // flush what was pending, then the client reconnects and gets the full state
                    let payload = json(&std::mem::take(&mut pending));
                    apply_diff_payload(&mut client, &payload);
                    pending_n = 0;
                    let state = json(&set.state());
                    sync_state(&mut client, state.as_object().unwrap());
                    assert_state_written_as_serialised(&set);
                    Diff::default()
                }
            };
            set.assert_consistent();
            pending.merge(d);
            pending_n += 1;
            if pending_n >= batch {
                let payload = json(&std::mem::take(&mut pending));
                apply_diff_payload(&mut client, &payload);
                pending_n = 0;
            }
        }
        let payload = json(&pending);
        apply_diff_payload(&mut client, &payload);
        let server = client_from(&set);
        prop_assert_eq!(normal(&client), normal(&server));
        // counters agree with the entries
        let metas: usize = set.iter().map(|(_, m)| m.count()).sum();
        prop_assert_eq!(metas, set.metas());
    }
}

#[test]
fn the_ghost_a_reconnect_would_reclaim_tells_its_status() {
    let mut set = PresenceSet::new();
    set.join(&key("ann"), arrival(1, "busy", Some("phone")), Ref(1));
    set.join(&key("ann"), arrival(2, "away", Some("laptop")), Ref(2));
    assert_eq!(
        set.ghost_status("ann", Some("phone")),
        None,
        "nobody is a ghost yet"
    );
    set.leave("ann", SessionId(1), Departure::Grace { until: 5_000 });
    assert_eq!(
        set.ghost_status("ann", Some("phone")).map(|s| &**s),
        Some("busy")
    );
    assert_eq!(
        set.ghost_status("ann", Some("laptop")),
        None,
        "that one is live"
    );
    assert_eq!(set.ghost_status("bob", Some("phone")), None);
    // Coming back with that status takes the ghost's place silently.
    let out = set.join(&key("ann"), arrival(3, "busy", Some("phone")), Ref(3));
    assert!(out.diff.is_empty(), "{:?}", out.diff);
    assert_eq!(out.phx_ref, Ref(1));
}

#[test]
fn a_ref_serialises_as_its_display_form() {
    for v in [
        0,
        1,
        0xf,
        0x10,
        0xabc,
        u64::from(u32::MAX),
        0x99f2b50000000006,
        u64::MAX,
    ] {
        let json = serde_json::to_string(&Ref(v)).unwrap();
        assert_eq!(json, format!("\"{}\"", Ref(v)), "{v:#x}");
    }
}

#[test]
fn a_state_frame_reserved_from_a_larger_or_smaller_last_one_is_the_same() {
    let mut set = PresenceSet::new();
    for i in 0..200 {
        let device = (i % 3 == 0).then_some("phone");
        set.join(
            &key(&format!("user-{i}")),
            arrival(i, "online", device),
            Ref(i),
        );
    }
    let serialised = crate::protocol::broadcast("room:t", "presence_state", &set.state());
    for last in [0, 1, 17, serialised.len() - 1, serialised.len() * 10] {
        let len = StateLen(std::cell::Cell::new(last));
        assert_eq!(
            &*set.state_frame("room:t", &len),
            &*serialised,
            "last {last}"
        );
        assert_eq!(len.0.get(), serialised.len());
    }
}
