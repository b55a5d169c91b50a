//! The presence model as plain data: who is present under which key, with which metas, and the
//! diffs that changes produce. No actors, no I/O, no clocks: callers pass the time and the fresh
//! refs in, so every rule here is unit- and property-tested.
//!
//! The shape follows Phoenix.Tracker: a set of entries `(key, meta)`, each meta carrying a unique
//! `phx_ref` and an owner (the session that holds it). Each session owns its entries, so a later
//! cluster layer can tag entries with their node and drop a node's entries wholesale.
//!
//! Wire semantics are those of the phoenix.js `Presence` client: a diff's joins are applied before
//! its leaves, so an *update* is a join of the new meta (fresh `phx_ref`, `phx_ref_prev` = the old
//! one) plus a leave of the old meta in the same diff; the key never disappears on the client.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

/// A presence key: the user id.
pub type Key = Arc<str>;

/// A session's identity on this node; also the owner of the metas it tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{:x}", self.0)
    }
}

impl SessionId {
    /// Parses the `Display` form back (`s` + hex), as used in the HTTP API.
    pub fn parse(s: &str) -> Option<SessionId> {
        let hex = s.strip_prefix('s')?;
        u64::from_str_radix(hex, 16).ok().map(SessionId)
    }
}

/// A meta's unique reference, sent to clients as `phx_ref`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref(pub u64);

impl fmt::Display for Ref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

impl Ref {
    /// Lowercase hex without leading zeros, as `Display`, without the formatting machinery:
    /// every `presence_state` writes one per meta. Returns the buffer and where the digits start.
    fn hex(self) -> ([u8; 16], usize) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 16];
        let mut i = buf.len();
        let mut v = self.0;
        loop {
            i -= 1;
            buf[i] = HEX[(v & 0xf) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        (buf, i)
    }

    /// `"<hex>"` (hex digits need no escaping).
    fn write_json(self, out: &mut Vec<u8>) {
        let (buf, i) = self.hex();
        out.push(b'"');
        out.extend_from_slice(&buf[i..]);
        out.push(b'"');
    }
}

impl Serialize for Ref {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (buf, i) = self.hex();
        s.serialize_str(std::str::from_utf8(&buf[i..]).expect("hex digits are ASCII"))
    }
}

/// Hands out refs and session ids that are unique on this node and, with high probability, in a
/// cluster: the top 24 bits are random per process start, the low 40 bits count.
#[derive(Debug)]
pub struct IdGen {
    next: AtomicU64,
}

impl IdGen {
    pub fn new() -> IdGen {
        let epoch: u64 = rand::random::<u64>() & 0xff_ffff;
        IdGen {
            next: AtomicU64::new((epoch << 40) | 1),
        }
    }

    pub fn next_ref(&self) -> Ref {
        Ref(self.next.fetch_add(1, Ordering::Relaxed))
    }

    pub fn next_session(&self) -> SessionId {
        SessionId(self.next.fetch_add(1, Ordering::Relaxed))
    }
}

impl Default for IdGen {
    fn default() -> Self {
        IdGen::new()
    }
}

/// One presence of a key: a session's view of itself, as clients see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub phx_ref: Ref,
    /// Set only on the join half of an update, so clients can tell an update from a new session.
    pub phx_ref_prev: Option<Ref>,
    /// The session that owns this meta.
    pub session: SessionId,
    pub status: Arc<str>,
    /// Unix milliseconds when this session first joined (kept across updates and reconnects).
    pub online_at: i64,
    /// Identifies a device across reconnects, so a returning device replaces its own ghost.
    pub device: Option<Arc<str>>,
    /// Everything else the client sees (`name`, custom meta), shared, never containing the
    /// reserved keys.
    pub fields: Arc<Map<String, Value>>,
}

/// Keys a client cannot set through meta because the server owns them.
pub const RESERVED_META_KEYS: [&str; 4] = ["phx_ref", "phx_ref_prev", "status", "online_at"];

impl Meta {
    /// The meta's entries into an open map; `skip` is a key the caller writes itself.
    fn write_entries<M: SerializeMap>(
        &self,
        m: &mut M,
        skip: Option<&str>,
    ) -> Result<(), M::Error> {
        m.serialize_entry("phx_ref", &self.phx_ref)?;
        if let Some(prev) = self.phx_ref_prev {
            m.serialize_entry("phx_ref_prev", &prev)?;
        }
        m.serialize_entry("status", &*self.status)?;
        m.serialize_entry("online_at", &self.online_at)?;
        for (k, v) in self.fields.iter() {
            if !RESERVED_META_KEYS.contains(&k.as_str()) && Some(k.as_str()) != skip {
                m.serialize_entry(k, v)?;
            }
        }
        Ok(())
    }

    /// The meta as JSON, the same as its `Serialize` gives, written by hand: the server's own
    /// keys go out as they are, only strings that came from clients are escaped. This is the
    /// inner loop of every `presence_state` (BENCHMARKS.md, connect profile).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"phx_ref\":");
        self.phx_ref.write_json(out);
        if let Some(prev) = self.phx_ref_prev {
            out.extend_from_slice(b",\"phx_ref_prev\":");
            prev.write_json(out);
        }
        out.extend_from_slice(b",\"status\":");
        write_json_str(out, &self.status);
        out.extend_from_slice(b",\"online_at\":");
        write_json_value(out, &self.online_at);
        for (k, v) in self.fields.iter() {
            if !RESERVED_META_KEYS.contains(&k.as_str()) {
                out.push(b',');
                write_json_str(out, k);
                out.push(b':');
                match v {
                    Value::String(v) => write_json_str(out, v),
                    v => write_json_value(out, v),
                }
            }
        }
        out.push(b'}');
    }
}

/// One JSON value into `out`. Writing strings, integers and `Value`s into a `Vec` cannot fail.
fn write_json_value<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    let _ = serde_json::to_writer(&mut *out, v);
}

/// A JSON string into `out`: copied as it is when nothing in it needs escaping (names, ids,
/// statuses nearly always), escaped by serde_json otherwise. The check is one pass the
/// compiler vectorises; serde_json's escaper goes byte by byte.
fn write_json_str(out: &mut Vec<u8>, s: &str) {
    let clean = s
        .bytes()
        .fold(true, |ok, b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if clean {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        write_json_value(out, s);
    }
}

impl Serialize for Meta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        self.write_entries(&mut m, None)?;
        m.end()
    }
}

/// A meta as here-now shows it: with `"node"`, the cluster node its session is on (which
/// wins over a client field of that name).
pub struct MetaOnNode<'a> {
    pub meta: &'a Meta,
    pub node: &'a str,
}

impl Serialize for MetaOnNode<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        self.meta.write_entries(&mut m, Some("node"))?;
        m.serialize_entry("node", self.node)?;
        m.end()
    }
}

/// A tracked meta plus whether it is a ghost: a session that dropped without leaving and is
/// kept present until `ghost_until` in case it comes back.
#[derive(Clone, Debug)]
struct Entry {
    meta: Meta,
    ghost_until: Option<i64>,
    /// The meta as JSON (`Meta::write_json`), written the first time a `presence_state` needs
    /// it and kept until the meta changes. Every join sends the whole room to the joiner, so a
    /// meta is written once per later joiner: in a connect ramp that was the node's top cost
    /// (BENCHMARKS.md). Only `set_meta` and `meta_mut` change a meta, and both drop it.
    json: OnceLock<Box<[u8]>>,
}

impl Entry {
    fn new(meta: Meta, ghost_until: Option<i64>) -> Self {
        Entry {
            meta,
            ghost_until,
            json: OnceLock::new(),
        }
    }

    fn set_meta(&mut self, meta: Meta) {
        self.meta = meta;
        self.json.take();
    }

    fn meta_mut(&mut self) -> &mut Meta {
        self.json.take();
        &mut self.meta
    }

    /// The meta's JSON onto `out`: the kept copy, or written there and kept (one exact-size
    /// allocation).
    fn write_json(&self, out: &mut Vec<u8>) {
        match self.json.get() {
            Some(json) => out.extend_from_slice(json),
            None => {
                let start = out.len();
                self.meta.write_json(out);
                let _ = self.json.set(Box::from(&out[start..]));
            }
        }
    }
}

/// What a change did, in phoenix.js terms. Serialises to `{"joins":{..},"leaves":{..}}`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diff {
    pub joins: Vec<(Key, Meta)>,
    pub leaves: Vec<(Key, Meta)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.joins.is_empty() && self.leaves.is_empty()
    }

    /// Whether it carries an update (a status or meta change of a present session: a join
    /// pointing at the meta it replaces), not only arrivals and departures.
    pub fn carries_update(&self) -> bool {
        self.joins.iter().any(|(_, m)| m.phx_ref_prev.is_some())
    }

    /// Appends `later` to this diff. A meta that joined earlier in the batch and leaves now is
    /// dropped from both sides (nobody needs to hear of it), which keeps batches small under churn;
    /// an update chain keeps pointing its `phx_ref_prev` at the meta clients last saw.
    pub fn merge(&mut self, later: Diff) {
        let mut rewired: Vec<(Ref, Option<Ref>)> = Vec::new();
        for (key, meta) in later.leaves {
            match self
                .joins
                .iter()
                .position(|(k, m)| m.phx_ref == meta.phx_ref && *k == key)
            {
                Some(pos) => {
                    let (_, cancelled) = self.joins.remove(pos);
                    rewired.push((cancelled.phx_ref, cancelled.phx_ref_prev));
                }
                None => self.leaves.push((key, meta)),
            }
        }
        for (key, mut meta) in later.joins {
            if let Some(prev) = meta.phx_ref_prev {
                if let Some((_, orig)) = rewired.iter().find(|(r, _)| *r == prev) {
                    meta.phx_ref_prev = *orig;
                }
            }
            self.joins.push((key, meta));
        }
    }

    /// Metas grouped by key in first-seen order, as the wire wants them.
    fn grouped(items: &[(Key, Meta)]) -> Vec<(&Key, Vec<&Meta>)> {
        let mut out: Vec<(&Key, Vec<&Meta>)> = Vec::new();
        // Most diffs carry one key; a cluster resync or a node going down carries thousands,
        // so large ones are grouped through an index instead of a scan per meta.
        if items.len() <= 8 {
            for (k, m) in items {
                match out.iter_mut().find(|(kk, _)| *kk == k) {
                    Some((_, v)) => v.push(m),
                    None => out.push((k, vec![m])),
                }
            }
            return out;
        }
        let mut at: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (k, m) in items {
            match at.get(&**k) {
                Some(&i) => out[i].1.push(m),
                None => {
                    at.insert(k, out.len());
                    out.push((k, vec![m]));
                }
            }
        }
        out
    }
}

/// `{"u1": {"metas": [...]}, ...}`
struct Grouped<'a>(Vec<(&'a Key, Vec<&'a Meta>)>);

struct Metas<'a>(&'a [&'a Meta]);

impl Serialize for Metas<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("metas", &MetaList(self.0))?;
        m.end()
    }
}

struct MetaList<'a>(&'a [&'a Meta]);

impl Serialize for MetaList<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for m in self.0 {
            seq.serialize_element(m)?;
        }
        seq.end()
    }
}

/// `{"metas": [...]}` straight from a key's entries (no list of references to build).
struct EntryMetas<'a>(&'a [Entry]);

impl Serialize for EntryMetas<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct List<'a>(&'a [Entry]);
        impl Serialize for List<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut seq = s.serialize_seq(Some(self.0.len()))?;
                for e in self.0 {
                    seq.serialize_element(&e.meta)?;
                }
                seq.end()
            }
        }
        let mut m = s.serialize_map(Some(1))?;
        m.serialize_entry("metas", &List(self.0))?;
        m.end()
    }
}

impl Serialize for Grouped<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, metas) in &self.0 {
            m.serialize_entry(&***k, &Metas(metas))?;
        }
        m.end()
    }
}

impl Serialize for Diff {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("joins", &Grouped(Diff::grouped(&self.joins)))?;
        m.serialize_entry("leaves", &Grouped(Diff::grouped(&self.leaves)))?;
        m.end()
    }
}

/// What a joining session brings; the set assigns the ref.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub session: SessionId,
    pub status: Arc<str>,
    pub online_at: i64,
    pub device: Option<Arc<str>>,
    pub fields: Arc<Map<String, Value>>,
}

impl Arrival {
    /// The meta this arrival becomes under `phx_ref`.
    pub fn into_meta(self, phx_ref: Ref) -> Meta {
        Meta {
            phx_ref,
            phx_ref_prev: None,
            session: self.session,
            status: self.status,
            online_at: self.online_at,
            device: self.device,
            fields: self.fields,
        }
    }
}

/// What a join did: the diff to send, the ref the session now holds (a reclaimed ghost's, when
/// it came back unchanged), and the session whose meta it replaced, if another one.
#[derive(Clone, Debug)]
pub struct JoinOutcome {
    pub diff: Diff,
    pub phx_ref: Ref,
    pub replaced: Option<SessionId>,
}

/// The presence of one topic (a room, or an account's connections).
#[derive(Clone, Debug, Default)]
pub struct PresenceSet {
    entries: BTreeMap<Key, Vec<Entry>>,
    metas: usize,
    /// Every ghost by deadline: expiry and the next deadline cost the ghosts due, not a scan
    /// of every entry (an account of 20 000 sessions with reconnects every few ms).
    deadlines: BTreeSet<(i64, SessionId, Key)>,
}

/// How a session went away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Departure {
    /// `phx_leave`, a kick, or an eviction: gone now.
    Now,
    /// The connection dropped: keep the meta as a ghost until `until` (unix ms).
    Grace { until: i64 },
}

impl PresenceSet {
    pub fn new() -> PresenceSet {
        PresenceSet::default()
    }

    /// Number of keys (users) present, ghosts included.
    pub fn keys(&self) -> usize {
        self.entries.len()
    }

    /// Number of metas (sessions) present, ghosts included.
    pub fn metas(&self) -> usize {
        self.metas
    }

    pub fn ghosts(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The metas of one key.
    pub fn get(&self, key: &str) -> Option<impl Iterator<Item = &Meta>> {
        self.entries.get(key).map(|v| v.iter().map(|e| &e.meta))
    }

    /// The meta a session holds under `key`.
    pub fn meta_of(&self, key: &str, session: SessionId) -> Option<&Meta> {
        self.entries
            .get(key)?
            .iter()
            .find(|e| e.meta.session == session)
            .map(|e| &e.meta)
    }

    /// A session arrives. If it already holds a meta under this key (a duplicate join), the old
    /// meta is swapped for the new one in a single update diff. If a ghost of the same key and
    /// device is waiting (a reconnect within the grace window, or after a restart), the session
    /// takes the ghost's place: silently, keeping its ref, when it comes back exactly as it was
    /// (nobody needs to hear of a reconnect), or as one update diff when its status or fields
    /// changed. Otherwise it is a plain join.
    pub fn join(&mut self, key: &Key, arrival: Arrival, new_ref: Ref) -> JoinOutcome {
        let metas = self.entries.entry(key.clone()).or_default();
        let replaced = metas
            .iter()
            .position(|e| e.meta.session == arrival.session)
            .or_else(|| {
                metas
                    .iter()
                    .position(|e| e.ghost_until.is_some() && e.meta.device == arrival.device)
            });
        let mut diff = Diff::default();
        let Some(i) = replaced else {
            let meta = arrival.into_meta(new_ref);
            diff.joins.push((key.clone(), meta.clone()));
            push_live(metas, meta);
            self.metas += 1;
            return JoinOutcome {
                diff,
                phx_ref: new_ref,
                replaced: None,
            };
        };
        let old = metas.remove(i);
        let was_ghost = old.ghost_until.is_some();
        if let Some(t) = old.ghost_until {
            self.deadlines.remove(&(t, old.meta.session, key.clone()));
        }
        let unchanged = was_ghost
            && old.meta.session != arrival.session
            && old.meta.status == arrival.status
            && old.meta.fields == arrival.fields;
        let phx_ref = if unchanged { old.meta.phx_ref } else { new_ref };
        let mut meta = arrival.into_meta(phx_ref);
        meta.online_at = meta.online_at.min(old.meta.online_at);
        if !unchanged {
            meta.phx_ref_prev = Some(old.meta.phx_ref);
            diff.joins.push((key.clone(), meta.clone()));
            meta.phx_ref_prev = None;
        }
        let replaced = (old.meta.session != meta.session).then_some(old.meta.session);
        if !unchanged {
            diff.leaves.push((key.clone(), old.meta));
        }
        metas.push(Entry::new(meta, None));
        JoinOutcome {
            diff,
            phx_ref,
            replaced,
        }
    }

    /// The status of the ghost a session of `key` on `device` would take the place of, if any.
    pub fn ghost_status(&self, key: &str, device: Option<&str>) -> Option<&Arc<str>> {
        self.entries.get(key)?.iter().find_map(|e| {
            (e.ghost_until.is_some() && e.meta.device.as_deref() == device)
                .then_some(&e.meta.status)
        })
    }

    /// Puts a meta back as a ghost that leaves at `until` unless its device reconnects first:
    /// used when a node restarts from its last snapshot.
    pub fn restore_ghost(&mut self, key: &Key, meta: Meta, until: i64) {
        let metas = self.entries.entry(key.clone()).or_default();
        self.deadlines.insert((until, meta.session, key.clone()));
        if let Some(e) = metas.iter_mut().find(|e| e.meta.session == meta.session) {
            if let Some(t) = e.ghost_until.filter(|t| *t != until) {
                self.deadlines.remove(&(t, e.meta.session, key.clone()));
            }
            e.set_meta(meta);
            e.ghost_until = Some(until);
            return;
        }
        metas.push(Entry::new(meta, Some(until)));
        self.metas += 1;
    }

    /// The users after `after` (key order), each with its metas and their ghost deadlines,
    /// for snapshots taken part by part.
    pub fn after_with_ghosts(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&Key, impl Iterator<Item = (&Meta, Option<i64>)>)> {
        self.range_after(after)
            .map(|(k, v)| (k, v.iter().map(|e| (&e.meta, e.ghost_until))))
    }

    /// The entries strictly after `after` (all of them for `None`), in key order.
    fn range_after(
        &self,
        after: Option<&str>,
    ) -> std::collections::btree_map::Range<'_, Key, Vec<Entry>> {
        use std::ops::Bound;
        let lower = match after {
            Some(a) => Bound::Excluded(a),
            None => Bound::Unbounded,
        };
        self.entries.range::<str, _>((lower, Bound::Unbounded))
    }

    /// Every meta with its ghost deadline (`None` for a live session), for snapshots.
    pub fn entries(&self) -> impl Iterator<Item = (&Key, &Meta, Option<i64>)> {
        self.entries
            .iter()
            .flat_map(|(k, v)| v.iter().map(move |e| (k, &e.meta, e.ghost_until)))
    }

    /// Puts back a meta exactly as it was (same ref), without telling anyone: used when an actor
    /// restarts and rebuilds its state from the live sessions that already saw this meta.
    pub fn restore(&mut self, key: &Key, meta: Meta) {
        let metas = self.entries.entry(key.clone()).or_default();
        if let Some(e) = metas.iter_mut().find(|e| e.meta.session == meta.session) {
            e.set_meta(meta);
            return;
        }
        metas.push(Entry::new(meta, None));
        self.metas += 1;
    }

    /// A session changes its status and/or fields: new ref, one update diff.
    pub fn update(
        &mut self,
        key: &str,
        session: SessionId,
        status: Option<Arc<str>>,
        fields: Option<Arc<Map<String, Value>>>,
        new_ref: Ref,
    ) -> Option<(Diff, Meta)> {
        let (k, metas) = self.entries.get_key_value_mut_compat(key)?;
        let e = metas.iter_mut().find(|e| e.meta.session == session)?;
        let old = e.meta.clone();
        let m = e.meta_mut();
        if let Some(s) = status {
            m.status = s;
        }
        if let Some(f) = fields {
            m.fields = f;
        }
        m.phx_ref = new_ref;
        let mut joined = e.meta.clone();
        joined.phx_ref_prev = Some(old.phx_ref);
        let current = e.meta.clone();
        Some((
            Diff {
                joins: vec![(k.clone(), joined)],
                leaves: vec![(k, old)],
            },
            current,
        ))
    }

    /// Another node's entry, as its owner last published it. The owner decides everything (refs,
    /// ghosts, reclaims); this set only mirrors it with the diff a client must see:
    /// - the same session again with the same ref: nothing (a repeat, or a resync);
    /// - the same session with a new ref: one update diff (join with `phx_ref_prev`, leave);
    /// - a new session holding a ref this key already shows: the owner's reconnect took its
    ///   ghost's place silently, so the entry is re-keyed to the new session, silently;
    /// - otherwise a join.
    ///
    /// Remote entries are never ghosts here, so a local reconnect never reclaims them.
    pub fn put_remote(&mut self, key: &Key, meta: Meta) -> Diff {
        let mut diff = Diff::default();
        let metas = self.entries.entry(key.clone()).or_default();
        let found = metas
            .iter()
            .position(|e| e.meta.session == meta.session)
            .or_else(|| metas.iter().position(|e| e.meta.phx_ref == meta.phx_ref));
        let Some(i) = found else {
            diff.joins.push((key.clone(), meta.clone()));
            push_live(metas, meta);
            self.metas += 1;
            return diff;
        };
        let e = &mut metas[i];
        if let Some(t) = e.ghost_until.take() {
            self.deadlines.remove(&(t, e.meta.session, key.clone()));
        }
        if e.meta.phx_ref != meta.phx_ref {
            let mut joined = meta.clone();
            joined.phx_ref_prev = Some(e.meta.phx_ref);
            diff.joins.push((key.clone(), joined));
            diff.leaves.push((key.clone(), e.meta.clone()));
        }
        e.set_meta(meta);
        diff
    }

    /// A session goes away from this topic.
    pub fn leave(&mut self, key: &str, session: SessionId, how: Departure) -> Diff {
        let mut diff = Diff::default();
        let Some((k, metas)) = self.entries.get_key_value_mut_compat(key) else {
            return diff;
        };
        let Some(i) = metas.iter().position(|e| e.meta.session == session) else {
            return diff;
        };
        match how {
            Departure::Grace { until } => {
                if let Some(t) = metas[i].ghost_until.replace(until) {
                    self.deadlines.remove(&(t, session, k.clone()));
                }
                self.deadlines.insert((until, session, k));
            }
            Departure::Now => {
                let e = metas.remove(i);
                if let Some(t) = e.ghost_until {
                    self.deadlines.remove(&(t, session, k.clone()));
                }
                self.metas -= 1;
                if metas.is_empty() {
                    self.entries.remove(key);
                }
                diff.leaves.push((k, e.meta));
            }
        }
        diff
    }

    /// Ghosts whose grace ran out by `now` leave, in one diff.
    pub fn expire(&mut self, now: i64) -> Diff {
        let mut diff = Diff::default();
        while let Some((t, session, key)) = self.deadlines.first().cloned() {
            if t > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(metas) = self.entries.get_mut(&key) else {
                continue;
            };
            let Some(i) = metas
                .iter()
                .position(|e| e.meta.session == session && e.ghost_until == Some(t))
            else {
                continue;
            };
            let e = metas.remove(i);
            self.metas -= 1;
            if metas.is_empty() {
                self.entries.remove(&key);
            }
            diff.leaves.push((key, e.meta));
        }
        diff
    }

    /// The earliest ghost deadline, for scheduling the next expiry.
    pub fn next_expiry(&self) -> Option<i64> {
        self.deadlines.first().map(|(t, _, _)| *t)
    }

    /// The bookkeeping agrees with the entries: the deadline index holds exactly the ghosts,
    /// the meta count is right, and no key is left without metas.
    #[cfg(test)]
    pub(crate) fn assert_consistent(&self) {
        let ghosts: BTreeSet<(i64, SessionId, Key)> = self
            .entries
            .iter()
            .flat_map(|(k, v)| {
                v.iter()
                    .filter_map(move |e| e.ghost_until.map(|t| (t, e.meta.session, k.clone())))
            })
            .collect();
        assert_eq!(ghosts, self.deadlines, "the deadline index is the ghosts");
        let metas: usize = self.entries.values().map(Vec::len).sum();
        assert_eq!(metas, self.metas, "the meta count");
        assert!(self.entries.values().all(|v| !v.is_empty()), "no empty key");
        for e in self.entries.values().flatten() {
            if let Some(json) = e.json.get() {
                let mut fresh = Vec::new();
                e.meta.write_json(&mut fresh);
                assert_eq!(&**json, &*fresh, "a kept meta JSON is its meta's");
            }
        }
    }

    /// Every key and its metas, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&Key, impl Iterator<Item = &Meta>)> {
        self.entries
            .iter()
            .map(|(k, v)| (k, v.iter().map(|e| &e.meta)))
    }

    /// The keys strictly after `after` (all of them for `None`), in order, with their metas.
    pub fn after(
        &self,
        after: Option<&str>,
    ) -> impl Iterator<Item = (&Key, impl ExactSizeIterator<Item = &Meta> + Clone)> {
        self.range_after(after)
            .map(|(k, v)| (k, v.iter().map(|e| &e.meta)))
    }

    /// Serialisable `presence_state`.
    pub fn state(&self) -> State<'_> {
        State(self)
    }

    /// `presence_state` as a ready frame on `topic` (refs null: the same bytes suit any member).
    pub fn state_frame(&self, topic: &str, last: &StateLen) -> bytestring::ByteString {
        let state = self.state();
        let frame =
            crate::protocol::broadcast_written(topic, "presence_state", last.hint(&state), |out| {
                state.write_json(out)
            });
        last.0.set(frame.len());
        frame
    }
}

/// Adds a live (non-ghost) entry to a key's metas. Most users have one session in a topic: the
/// first entry takes room for one, not four (later ones grow as usual).
fn push_live(metas: &mut Vec<Entry>, meta: Meta) {
    if metas.capacity() == 0 {
        metas.reserve_exact(1);
    }
    metas.push(Entry::new(meta, None));
}

/// Small helper so `update` can return the stored `Arc` key without a second lookup.
trait KeyedMut {
    fn get_key_value_mut_compat(&mut self, key: &str) -> Option<(Key, &mut Vec<Entry>)>;
}

impl KeyedMut for BTreeMap<Key, Vec<Entry>> {
    fn get_key_value_mut_compat(&mut self, key: &str) -> Option<(Key, &mut Vec<Entry>)> {
        let k = self.get_key_value(key)?.0.clone();
        self.get_mut(key).map(|v| (k, v))
    }
}

/// The length of the last `presence_state` a room or an account wrote. The next one differs
/// by a few members, so its buffer is reserved from this: a state is then written once, not
/// copied each time its buffer doubles. With `State::size_hint`'s fixed guess alone, a room of
/// ~100 members reallocated most of its states: ~3 % of a node's CPU in a connect ramp
/// (BENCHMARKS.md).
#[derive(Debug, Default)]
pub struct StateLen(std::cell::Cell<usize>);

impl StateLen {
    /// Bytes to reserve for `state` (topic and envelope aside): the guess, or the last length
    /// plus an eighth, whichever is larger.
    fn hint(&self, state: &State<'_>) -> usize {
        let last = self.0.get();
        state.size_hint().max(last + last / 8)
    }
}

/// `presence_state` payload: `{"<key>": {"metas": [...]}}`.
pub struct State<'a>(&'a PresenceSet);

impl State<'_> {
    /// The payload as JSON into `out`, the same as `Serialize` gives, by hand (`Meta::write_json`).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.push(b'{');
        for (i, (k, v)) in self.0.entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_str(out, k);
            out.extend_from_slice(b":{\"metas\":[");
            for (j, e) in v.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                e.write_json(out);
            }
            out.extend_from_slice(b"]}");
        }
        out.push(b'}');
    }

    /// A size to reserve for `write_json`, so a big state is not copied as it grows.
    pub fn size_hint(&self) -> usize {
        2 + self.0.entries.len() * 24 + self.0.metas * 112
    }
}

impl Serialize for State<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.entries.len()))?;
        for (k, v) in &self.0.entries {
            m.serialize_entry(&**k, &EntryMetas(v))?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests;
