//! What a phoenix.js client believes: a faithful port of `Presence.syncState` / `Presence.syncDiff`
//! from the official `phoenix` package, over plain JSON. The property tests use it to prove that
//! the server's diffs converge on the client, and Rust test clients and the load generator use it
//! to follow a room exactly as a browser would.

use serde_json::{Map, Value};

/// Client-side state: `{"<key>": {"metas": [ {...}, ... ]}}`.
pub type ClientState = Map<String, Value>;

fn metas(p: &Value) -> Vec<Value> {
    p.get("metas")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn refs(ms: &[Value]) -> Vec<Value> {
    ms.iter()
        .map(|m| m.get("phx_ref").cloned().unwrap_or(Value::Null))
        .collect()
}

fn with_metas(ms: Vec<Value>) -> Value {
    let mut o = Map::new();
    o.insert("metas".into(), Value::Array(ms));
    Value::Object(o)
}

/// `Presence.syncState(currentState, newState)`: what a client does on `presence_state`.
pub fn sync_state(state: &mut ClientState, new_state: &Map<String, Value>) {
    let mut joins = Map::new();
    let mut leaves = Map::new();
    for (key, presence) in state.iter() {
        if !new_state.contains_key(key) {
            leaves.insert(key.clone(), presence.clone());
        }
    }
    for (key, new_presence) in new_state {
        match state.get(key) {
            Some(current) => {
                let new_metas = metas(new_presence);
                let cur_metas = metas(current);
                let new_refs = refs(&new_metas);
                let cur_refs = refs(&cur_metas);
                let joined: Vec<Value> = new_metas
                    .iter()
                    .filter(|m| !cur_refs.contains(m.get("phx_ref").unwrap_or(&Value::Null)))
                    .cloned()
                    .collect();
                let left: Vec<Value> = cur_metas
                    .iter()
                    .filter(|m| !new_refs.contains(m.get("phx_ref").unwrap_or(&Value::Null)))
                    .cloned()
                    .collect();
                if !joined.is_empty() {
                    joins.insert(key.clone(), with_metas(joined));
                }
                if !left.is_empty() {
                    leaves.insert(key.clone(), with_metas(left));
                }
            }
            None => {
                joins.insert(key.clone(), new_presence.clone());
            }
        }
    }
    sync_diff(state, &joins, &leaves);
}

/// `Presence.syncDiff(state, {joins, leaves})`: joins first, then leaves, deduplicated by ref.
pub fn sync_diff(state: &mut ClientState, joins: &Map<String, Value>, leaves: &Map<String, Value>) {
    for (key, new_presence) in joins {
        let mut fresh = metas(new_presence);
        if let Some(current) = state.get(key) {
            let joined_refs = refs(&fresh);
            let mut cur: Vec<Value> = metas(current)
                .into_iter()
                .filter(|m| !joined_refs.contains(m.get("phx_ref").unwrap_or(&Value::Null)))
                .collect();
            cur.append(&mut fresh);
            fresh = cur;
        }
        state.insert(key.clone(), with_metas(fresh));
    }
    for (key, left) in leaves {
        let Some(current) = state.get(key) else {
            continue;
        };
        let to_remove = refs(&metas(left));
        let kept: Vec<Value> = metas(current)
            .into_iter()
            .filter(|m| !to_remove.contains(m.get("phx_ref").unwrap_or(&Value::Null)))
            .collect();
        if kept.is_empty() {
            state.remove(key);
        } else {
            state.insert(key.clone(), with_metas(kept));
        }
    }
}

/// Applies a `presence_diff` payload `{"joins":{..},"leaves":{..}}`.
pub fn apply_diff_payload(state: &mut ClientState, payload: &Value) {
    let empty = Map::new();
    let joins = payload
        .get("joins")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let leaves = payload
        .get("leaves")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    sync_diff(state, joins, leaves);
}
