//! The WebSocket transport: the upgrade (authentication before anything is joined) and the
//! `SessionActor`, one per connection, which speaks the Phoenix Channels V2 protocol and drives
//! the actor tree. This is the only file that knows actix-web-actors, so a move to actix-ws
//! touches nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use bytestring::ByteString;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use presence_actors::account::{
    AccountActor, Connect, ConnectionStatus, RoomsChanged, Subscribe, Unsubscribe,
};
use presence_actors::messages::{
    AccountMembership, Broadcast, Join, Leave, Report, ReportMembership, RoomMembership, SetStatus,
    ToSession,
};
use presence_actors::outbox::{self, Outgoing};
use presence_actors::presence::{Arrival, Departure, Key, Meta, SessionId};
use presence_actors::protocol::{self, InFrame, Reason};
use presence_actors::registry::{RegisterSession, Registry, ResolveRoom, UnregisterSession};
use presence_actors::room::RoomActor;
use presence_actors::view::RoomDirectory;
use presence_actors::{now_ms, EngineConfig, Metrics};

use crate::auth::{self, KeyNeed, Principal, TokenError};
use crate::config::MAX_FRAME_HARD_CAP;
use crate::http::error::ApiError;
use crate::http::AppState;

/// How often a session checks its heartbeat deadline, as a fraction of the timeout.
const HEARTBEAT_CHECKS_PER_TIMEOUT: u32 = 4;
/// Window over which error replies are counted for abuse.
const ERROR_WINDOW: Duration = Duration::from_secs(60);
/// Reserved event names a client may not broadcast.
/// Least time between two reloads of an account's signing keys on a bad signature.
const KEY_RELOAD_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

const RESERVED_EVENT_PREFIXES: [&str; 2] = ["phx_", "presence_"];

#[derive(Deserialize)]
pub struct SocketQuery {
    token: Option<String>,
    vsn: Option<String>,
    device: Option<String>,
}

/// `GET /socket/websocket?vsn=2.0.0`: authenticate, then upgrade. A bad token is refused here,
/// with a JSON error, and nothing is joined.
pub async fn upgrade(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
    query: web::Query<SocketQuery>,
) -> Result<HttpResponse, ApiError> {
    if let Some(v) = &query.vsn {
        if !v.starts_with("2.") {
            return Err(ApiError::bad_request(
                "unsupported_version",
                "this server speaks the Phoenix Channels V2 protocol (vsn=2.0.0)",
            ));
        }
    }
    let token = match &query.token {
        Some(t) => Some(t.clone()),
        None => req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|h| h.to_str().ok())
            .and_then(auth::token_from_subprotocols),
    };
    let token = token.ok_or_else(|| ApiError::from_token(TokenError::Missing))?;
    if let Some(ip) = state.rate.client_ip(&req) {
        state.rate.connect_ip(ip).map_err(ApiError::throttled)?;
    }
    let principal = authenticate(&state, &token).await?;
    let limits = &state.engine.limits;
    // The claims are taken apart here: a session keeps only what it uses (what a dashboard user
    // may follow), not the token.
    let (account, user, name, token_meta, staff) = match principal {
        Principal::User(c) => {
            if !protocol::valid_user_id(&c.sub, limits.max_user_id_len) {
                return Err(ApiError::forbidden(
                    "invalid_user_id",
                    "the token's sub is not a valid user id",
                ));
            }
            (c.acc, c.sub, c.name, c.meta, None)
        }
        Principal::Staff(c) => {
            let scope = if c.role == "admin" {
                StaffScope::Every
            } else {
                StaffScope::Account(c.acc.as_deref().map(Arc::from))
            };
            (c.acc.unwrap_or_default(), c.sub, None, None, Some(scope))
        }
    };
    // End users count against their account's rate and plan; dashboards do not.
    let slot = match &staff {
        None => {
            state
                .rate
                .connect_account(&account)
                .map_err(ApiError::throttled)?;
            let usage = state
                .usage
                .load(&account)
                .await?
                .ok_or_else(|| ApiError::from_token(TokenError::UnknownAccount))?;
            Some(usage.try_connect().map_err(|over| {
                ApiError::forbidden(
                    "plan_limit",
                    &format!(
                        "the account's plan allows {} concurrent connections",
                        over.limit
                    ),
                )
            })?)
        }
        Some(_) => None,
    };
    let mut fields = token_meta.unwrap_or_default();
    if serde_json::to_string(&fields).map(|s| s.len()).unwrap_or(0) > limits.max_meta_bytes {
        return Err(ApiError::forbidden(
            "meta_too_large",
            "the token's meta is too large",
        ));
    }
    if let Some(n) = name {
        fields.insert("name".into(), Value::from(n));
    }
    let device = query
        .device
        .clone()
        .filter(|d| !d.is_empty() && d.len() <= 64)
        .or_else(|| {
            fields
                .get("device")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .map(Arc::<str>::from);
    let session = SessionActor {
        id: state.ids.next_session(),
        staff,
        account: account.into(),
        user: user.into(),
        base_fields: Arc::new(fields),
        device,
        online_at: now_ms(),
        registry: state.registry.clone(),
        directory: state.rooms.clone(),
        account_addr: None,
        registered: false,
        connection_meta: None,
        channels: Channels::default(),
        hb: Instant::now(),
        cfg: state.engine.clone(),
        metrics: state.metrics.clone(),
        errors: (Instant::now(), 0),
        inflight: 0,
        departure_now: false,
        rate: state.rate.clone(),
        ip: state.rate.client_ip(&req),
        slot,
    };
    ws::WsResponseBuilder::new(session, &req, stream)
        .frame_size(MAX_FRAME_HARD_CAP)
        .protocols(&["phoenix"])
        .start()
        .map_err(|e| ApiError::bad_request("websocket_handshake", &e.to_string()))
}

async fn authenticate(state: &web::Data<AppState>, token: &str) -> Result<Principal, ApiError> {
    match auth::key_need(token).map_err(ApiError::from_token)? {
        KeyNeed::Server => {
            let claims = state
                .keys
                .verify_access(token)
                .map_err(ApiError::from_token)?;
            // A dashboard user deleted, disabled or given another role since is refused here too.
            crate::http::admin::ensure_live(state, &claims).await?;
            Ok(Principal::Staff(claims))
        }
        KeyNeed::Account(acc) => {
            let keys = match state.keyring.get(&acc) {
                Some(k) => k,
                None => state
                    .load_account_keys(&acc)
                    .await?
                    .ok_or_else(|| ApiError::from_token(TokenError::UnknownAccount))?,
            };
            let claims = match auth::verify_user(token, &keys) {
                // Another node may have rotated the secret: reload the keys, at most once a
                // second per account so bad tokens cannot turn into a query each.
                Err(TokenError::Signature)
                    if state
                        .keyring
                        .age(&acc)
                        .is_some_and(|a| a >= KEY_RELOAD_EVERY) =>
                {
                    let fresh = state
                        .load_account_keys(&acc)
                        .await?
                        .ok_or_else(|| ApiError::from_token(TokenError::UnknownAccount))?;
                    auth::verify_user(token, &fresh).map_err(ApiError::from_token)?
                }
                other => other.map_err(ApiError::from_token)?,
            };
            if claims.acc != acc {
                return Err(ApiError::from_token(TokenError::Claims));
            }
            Ok(Principal::User(claims))
        }
    }
}

/// A join's or status push's `{status?, meta?}`, validated.
type PresencePayload = (Option<Arc<str>>, Option<Map<String, Value>>);

/// One joined (or joining) topic of a socket.
struct Channel {
    join_ref: Value,
    kind: ChannelKind,
    /// Frames that arrived for this topic before its join reply was written.
    pending: Option<Vec<ByteString>>,
}

/// The topics one socket has joined. Most sockets hold one to three, so a small vector beats a
/// hash map: one allocation the size of its entries instead of a four-bucket table (about half a
/// kilobyte per idle session), and a scan of three entries is as fast as hashing.
///
/// A topic is kept as the sender's own `Arc` once a frame has come for it (`for_frame`): later
/// frames are then matched by pointer, without reading the session's copy of the name (a cache
/// miss per delivery), and that copy is freed.
#[derive(Default)]
struct Channels(Vec<(Arc<str>, Channel)>);

impl Channels {
    /// The channel a frame for `topic` goes to. Matched by pointer first, else by name, and
    /// then the sender's `topic` is kept as the key for the next frame.
    fn for_frame(&mut self, topic: &Arc<str>) -> Option<&mut Channel> {
        let i = match self.0.iter().position(|(t, _)| Arc::ptr_eq(t, topic)) {
            Some(i) => i,
            None => {
                let i = self.position(topic)?;
                self.0[i].0 = topic.clone();
                i
            }
        };
        Some(&mut self.0[i].1)
    }

    fn position(&self, topic: &str) -> Option<usize> {
        self.0.iter().position(|(t, _)| **t == *topic)
    }

    fn get(&self, topic: &str) -> Option<&Channel> {
        self.0.iter().find(|(t, _)| **t == *topic).map(|(_, c)| c)
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut Channel> {
        self.0
            .iter_mut()
            .find(|(t, _)| **t == *topic)
            .map(|(_, c)| c)
    }

    fn contains_key(&self, topic: &str) -> bool {
        self.position(topic).is_some()
    }

    fn insert(&mut self, topic: String, channel: Channel) -> Option<Channel> {
        match self.position(&topic) {
            Some(i) => Some(std::mem::replace(&mut self.0[i].1, channel)),
            None => {
                // Room for one at first (most sockets join one topic); then the usual growth.
                if self.0.capacity() == 0 {
                    self.0.reserve_exact(1);
                }
                self.0.push((topic.into(), channel));
                None
            }
        }
    }

    fn remove(&mut self, topic: &str) -> Option<Channel> {
        let i = self.position(topic)?;
        Some(self.0.swap_remove(i).1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn values(&self) -> impl Iterator<Item = &Channel> {
        self.0.iter().map(|(_, c)| c)
    }

    fn values_mut(&mut self) -> impl Iterator<Item = &mut Channel> {
        self.0.iter_mut().map(|(_, c)| c)
    }
}

impl<'a> IntoIterator for &'a Channels {
    type Item = &'a (Arc<str>, Channel);
    type IntoIter = std::slice::Iter<'a, (Arc<str>, Channel)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

enum ChannelKind {
    Room {
        name: Arc<str>,
        addr: Option<Addr<RoomActor>>,
        /// This session's meta in the room, exactly as the room holds it.
        meta: Option<Meta>,
    },
    Account {
        id: Arc<str>,
        addr: Option<Addr<AccountActor>>,
    },
}

/// Which accounts a dashboard user's socket may follow.
enum StaffScope {
    /// An admin: every account.
    Every,
    /// A member of one account (`None`: a token naming none, which may follow nothing).
    Account(Option<Arc<str>>),
}

pub struct SessionActor {
    id: SessionId,
    /// Dashboard users and admins follow accounts; they are not presences themselves. `None`
    /// for an end user's socket.
    staff: Option<StaffScope>,
    account: Arc<str>,
    user: Key,
    /// Token `meta` plus `name`: the base of every meta this session shows.
    base_fields: Arc<Map<String, Value>>,
    device: Option<Arc<str>>,
    online_at: i64,
    registry: Addr<Registry>,
    /// Live rooms, to join one without asking the registry (see `RoomDirectory`).
    directory: RoomDirectory,
    account_addr: Option<Addr<AccountActor>>,
    /// The registry accepted this session (it refuses new ones while shutting down).
    registered: bool,
    /// The connection's meta in the account's presence (end users only).
    connection_meta: Option<Meta>,
    channels: Channels,
    /// Last frame from the client.
    hb: Instant,
    cfg: Arc<EngineConfig>,
    metrics: Metrics,
    /// Start of the current error window and the errors in it.
    errors: (Instant, u32),
    /// Pushes awaiting an actor's answer.
    inflight: usize,
    /// Kicked sessions leave at once; dropped ones leave after the grace window.
    departure_now: bool,
    rate: Arc<crate::limits::RateLimits>,
    /// The client's address, for per-IP join limits.
    ip: Option<std::net::IpAddr>,
    /// This connection's place in its account's plan and usage (end users only); dropped with
    /// the actor, which gives the slot back.
    slot: Option<crate::usage::ConnectionSlot>,
}

type Ctx = ws::WebsocketContext<SessionActor>;

impl SessionActor {
    /// Counts a client push against the plan's daily messages; false when over the limit.
    /// Dashboards (no slot) are not metered.
    fn count_message_in(&self) -> bool {
        self.slot
            .as_ref()
            .is_none_or(|slot| slot.usage().message_in().is_ok())
    }

    fn addr_recipient(ctx: &Ctx) -> Recipient<ToSession> {
        ctx.address().recipient()
    }

    /// Sends an error reply and counts it; persistent abuse closes the socket.
    fn error(
        &mut self,
        ctx: &mut Ctx,
        join_ref: &Value,
        msg_ref: &Value,
        topic: &str,
        reason: Reason,
    ) {
        self.metrics
            .ws_errors
            .with_label_values(&[reason.as_str()])
            .inc();
        ctx.text(protocol::reply_error(join_ref, msg_ref, topic, reason));
        let now = Instant::now();
        if now.duration_since(self.errors.0) > ERROR_WINDOW {
            self.errors = (now, 0);
        }
        self.errors.1 += 1;
        if self.errors.1 > self.cfg.limits.max_errors_per_minute {
            self.close(ctx, Reason::TooManyErrors);
        }
    }

    fn close(&mut self, ctx: &mut Ctx, reason: Reason) {
        let code = match reason {
            Reason::ServerShutdown => ws::CloseCode::Away,
            Reason::Kicked | Reason::TooManyErrors => ws::CloseCode::Policy,
            Reason::SlowConsumer => ws::CloseCode::Again,
            Reason::FrameTooLarge => ws::CloseCode::Size,
            Reason::MalformedFrame => ws::CloseCode::Invalid,
            _ => ws::CloseCode::Normal,
        };
        if reason == Reason::Kicked {
            self.departure_now = true;
            // phoenix.js closes a channel for good on phx_close, so a kicked client does not
            // silently rejoin.
            let reasons = json!({ "reason": reason.as_str() });
            for (topic, ch) in &self.channels {
                ctx.text(protocol::encode(
                    &ch.join_ref,
                    &Value::Null,
                    topic,
                    "phx_close",
                    &reasons,
                ));
            }
        }
        ctx.close(Some(ws::CloseReason {
            code,
            description: Some(reason.as_str().into()),
        }));
        ctx.stop();
    }

    fn rooms(&self) -> Vec<Arc<str>> {
        let mut rooms: Vec<Arc<str>> = self
            .channels
            .values()
            .filter_map(|c| match &c.kind {
                ChannelKind::Room {
                    name,
                    meta: Some(_),
                    ..
                } => Some(name.clone()),
                _ => None,
            })
            .collect();
        rooms.sort();
        rooms
    }

    fn rooms_changed(&self) {
        if let (Some(acc), false) = (&self.account_addr, self.staff.is_some()) {
            acc.do_send(RoomsChanged {
                session: self.id,
                rooms: self.rooms(),
            });
        }
    }

    fn handle_frame(&mut self, f: InFrame, ctx: &mut Ctx) {
        match (f.topic.as_str(), f.event.as_str()) {
            ("phoenix", "heartbeat") => {
                ctx.text(protocol::reply_ok(
                    &f.join_ref,
                    &f.msg_ref,
                    "phoenix",
                    &json!({}),
                ));
            }
            (_, "phx_join") => self.join(f, ctx),
            (_, "phx_leave") => self.leave(f, ctx),
            _ if !self.channels.contains_key(&f.topic) => {
                self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::NotJoined)
            }
            (_, "status") => self.set_status(f, ctx),
            (_, "broadcast") => self.broadcast(f, ctx),
            _ => self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::UnknownEvent),
        }
    }

    fn join(&mut self, f: InFrame, ctx: &mut Ctx) {
        let topic = f.topic.clone();
        let reply_err = |act: &mut Self, ctx: &mut Ctx, r: Reason| {
            act.error(ctx, &f.join_ref, &f.msg_ref, &topic, r)
        };
        let rejoin = self.channels.contains_key(&topic);
        if !rejoin && self.channels.len() >= self.cfg.limits.max_joins_per_socket {
            return reply_err(self, ctx, Reason::TooManyJoins);
        }
        if let Some(id) = topic.strip_prefix("account:") {
            if !self.may_follow(id) {
                return reply_err(self, ctx, Reason::Unauthorized);
            }
            return self.follow_account(f, ctx);
        }
        let Some(name) = topic.strip_prefix("room:") else {
            return reply_err(self, ctx, Reason::UnknownTopic);
        };
        if self.staff.is_some() {
            return reply_err(self, ctx, Reason::Unauthorized);
        }
        if !protocol::valid_room_name(name, self.cfg.limits.max_room_name_len) {
            return reply_err(self, ctx, Reason::InvalidRoomName);
        }
        if !rejoin && self.rate.join(self.ip, &self.account).is_err() {
            return reply_err(self, ctx, Reason::RateLimited);
        }
        if let Some(slot) = &self.slot {
            slot.usage().joined();
        }
        let (status, join_fields) = match self.parse_presence_payload(&f.payload, true) {
            Ok(v) => v,
            Err(r) => return reply_err(self, ctx, r),
        };
        let device = join_fields
            .as_ref()
            .and_then(|m| m.get("device"))
            .and_then(Value::as_str)
            .map(Arc::<str>::from)
            .or_else(|| self.device.clone());
        let fields = self.merged_fields(join_fields.as_ref());
        let name: Arc<str> = name.into();
        // A status given at join is the connection's status too (as a `status` push is).
        let explicit_status = status.clone();
        let arrival = Arrival {
            session: self.id,
            status: status.unwrap_or_else(|| "online".into()),
            online_at: self.online_at,
            device,
            fields,
        };
        if let Some(old) = self.channels.get(&topic) {
            if old.join_ref != f.join_ref {
                // A duplicate join replaces the old channel, as Phoenix does.
                ctx.text(protocol::encode(
                    &old.join_ref,
                    &Value::Null,
                    &topic,
                    "phx_close",
                    &json!({}),
                ));
            }
        }
        self.channels.insert(
            topic.clone(),
            Channel {
                join_ref: f.join_ref.clone(),
                kind: ChannelKind::Room {
                    name: name.clone(),
                    addr: None,
                    meta: None,
                },
                pending: Some(Vec::new()),
            },
        );
        let join = Join {
            user: self.user.clone(),
            arrival: arrival.clone(),
            to: Self::addr_recipient(ctx),
            // This actor runs on its socket thread (if it is on one): the room's frames reach
            // it through that thread's lane.
            lane: presence_actors::fanout::this_threads_lane(),
        };
        let registry = self.registry.clone();
        let account = self.account.clone();
        // A live room is joined directly; the registry starts one that is not (see
        // `RoomDirectory`).
        let mut listed = self.directory.live_room(&account, &name);
        let fut = async move {
            // A room may stop (idle) or die between resolve and join: resolve again, through
            // the registry.
            for _ in 0..3 {
                let resolved = match listed.take() {
                    Some(a) => Ok(Ok(a)),
                    None => {
                        registry
                            .send(ResolveRoom {
                                account: account.clone(),
                                room: name.clone(),
                            })
                            .await
                    }
                };
                let addr = match resolved {
                    Ok(Ok(a)) => a,
                    Ok(Err(r)) => return Err(r),
                    Err(_) => return Err(Reason::Unavailable),
                };
                let j = Join {
                    user: join.user.clone(),
                    arrival: join.arrival.clone(),
                    to: join.to.clone(),
                    lane: join.lane.clone(),
                };
                match addr.send(j).await {
                    Ok(res) => return res.map(|joined| (addr, joined)),
                    Err(_) => continue,
                }
            }
            Err(Reason::Unavailable)
        };
        let join_ref = f.join_ref;
        let msg_ref = f.msg_ref;
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let current = act.channels.get(&topic).map(|c| c.join_ref == join_ref);
            match (res, current) {
                (Ok((addr, joined)), Some(true)) => {
                    ctx.text(protocol::reply_ok(&join_ref, &msg_ref, &topic, &json!({})));
                    ctx.text(joined.state);
                    if let Some(slot) = &act.slot {
                        // The join's presence_state; later pushes count as they arrive.
                        slot.usage().messages_out(1);
                    }
                    if let Some(ch) = act.channels.get_mut(&topic) {
                        for frame in ch.pending.take().unwrap_or_default() {
                            ctx.text(frame);
                        }
                        if let ChannelKind::Room { addr: a, meta, .. } = &mut ch.kind {
                            *a = Some(addr);
                            *meta = Some(arrival.into_meta(joined.phx_ref));
                        }
                    }
                    act.rooms_changed();
                    if let (Some(s), Some(acc)) = (explicit_status, &act.account_addr) {
                        if act.staff.is_none() {
                            acc.do_send(ConnectionStatus {
                                user: act.user.clone(),
                                session: act.id,
                                status: s,
                            });
                        }
                    }
                }
                (Ok((addr, _)), _) => {
                    // Left (or re-joined) while the join was in flight: undo it in the room.
                    addr.do_send(Leave {
                        user: act.user.clone(),
                        session: act.id,
                        how: Departure::Now,
                    });
                }
                (Err(r), Some(true)) => {
                    act.channels.remove(&topic);
                    act.error(ctx, &join_ref, &msg_ref, &topic, r);
                }
                (Err(_), _) => {}
            }
        }));
    }

    fn may_follow(&self, account: &str) -> bool {
        match &self.staff {
            Some(StaffScope::Every) => true,
            Some(StaffScope::Account(Some(a))) => &**a == account,
            Some(StaffScope::Account(None)) | None => false,
        }
    }

    fn follow_account(&mut self, f: InFrame, ctx: &mut Ctx) {
        let topic = f.topic.clone();
        let id: Arc<str> = topic.trim_start_matches("account:").into();
        self.channels.insert(
            topic.clone(),
            Channel {
                join_ref: f.join_ref.clone(),
                kind: ChannelKind::Account {
                    id: id.clone(),
                    addr: None,
                },
                pending: Some(Vec::new()),
            },
        );
        let registry = self.registry.clone();
        let sub = Subscribe {
            session: self.id,
            user: self.user.clone(),
            to: Self::addr_recipient(ctx),
        };
        let fut = async move {
            let addr = registry
                .send(presence_actors::registry::ResolveAccount { account: id })
                .await
                .map_err(|_| Reason::Unavailable)??;
            let state = addr.send(sub).await.map_err(|_| Reason::Unavailable)??;
            Ok::<_, Reason>((addr, state))
        };
        let (join_ref, msg_ref) = (f.join_ref, f.msg_ref);
        ctx.spawn(fut.into_actor(self).map(move |res, act, ctx| {
            let current = act.channels.get(&topic).map(|c| c.join_ref == join_ref);
            match (res, current) {
                (Ok((addr, state)), Some(true)) => {
                    ctx.text(protocol::reply_ok(&join_ref, &msg_ref, &topic, &json!({})));
                    ctx.text(state);
                    if let Some(ch) = act.channels.get_mut(&topic) {
                        for frame in ch.pending.take().unwrap_or_default() {
                            ctx.text(frame);
                        }
                        if let ChannelKind::Account { addr: a, .. } = &mut ch.kind {
                            *a = Some(addr);
                        }
                    }
                }
                (Ok((addr, _)), _) => addr.do_send(Unsubscribe { session: act.id }),
                (Err(r), Some(true)) => {
                    act.channels.remove(&topic);
                    act.error(ctx, &join_ref, &msg_ref, &topic, r);
                }
                (Err(_), _) => {}
            }
        }));
    }

    /// `{status?, meta?}` → a valid status and meta, or the reason they are refused.
    fn parse_presence_payload(
        &self,
        payload: &Value,
        optional: bool,
    ) -> Result<PresencePayload, Reason> {
        let obj = match payload {
            Value::Object(o) => o.clone(),
            Value::Null if optional => Map::new(),
            _ => return Err(Reason::InvalidPayload),
        };
        let status = match obj.get("status") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if protocol::valid_status(s) => {
                Some(Arc::<str>::from(s.as_str()))
            }
            Some(_) => return Err(Reason::InvalidStatus),
        };
        let meta = match obj.get("meta") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let size = serde_json::to_string(m)
                    .map(|s| s.len())
                    .unwrap_or(usize::MAX);
                if size > self.cfg.limits.max_meta_bytes {
                    return Err(Reason::MetaTooLarge);
                }
                Some(m.clone())
            }
            Some(_) => return Err(Reason::InvalidPayload),
        };
        if !optional && status.is_none() && meta.is_none() {
            return Err(Reason::InvalidPayload);
        }
        Ok((status, meta))
    }

    fn merged_fields(&self, extra: Option<&Map<String, Value>>) -> Arc<Map<String, Value>> {
        match extra {
            None => self.base_fields.clone(),
            Some(m) => {
                let mut f = (*self.base_fields).clone();
                for (k, v) in m {
                    f.insert(k.clone(), v.clone());
                }
                Arc::new(f)
            }
        }
    }

    fn room_of(&self, topic: &str) -> Option<(Addr<RoomActor>, Meta)> {
        match &self.channels.get(topic)?.kind {
            ChannelKind::Room {
                addr: Some(a),
                meta: Some(m),
                ..
            } => Some((a.clone(), m.clone())),
            _ => None,
        }
    }

    fn set_status(&mut self, f: InFrame, ctx: &mut Ctx) {
        let Some((room, meta)) = self.room_of(&f.topic) else {
            return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::NotJoined);
        };
        if self.inflight >= self.cfg.limits.max_inflight {
            return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::RateLimited);
        }
        let (status, extra) = match self.parse_presence_payload(&f.payload, false) {
            Ok(v) => v,
            Err(r) => return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, r),
        };
        if !self.count_message_in() {
            return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::PlanLimit);
        }
        let fields = extra.map(|m| {
            let mut merged = (*meta.fields).clone();
            for (k, v) in m {
                merged.insert(k, v);
            }
            Arc::new(merged)
        });
        self.inflight += 1;
        let msg = SetStatus {
            user: self.user.clone(),
            session: self.id,
            status: status.clone(),
            fields: fields.clone(),
        };
        let topic = f.topic;
        let (join_ref, msg_ref) = (f.join_ref, f.msg_ref);
        ctx.spawn(room.send(msg).into_actor(self).map(move |res, act, ctx| {
            act.inflight -= 1;
            match res {
                Ok(Ok(new_ref)) => {
                    if let Some(Channel {
                        kind: ChannelKind::Room { meta: Some(m), .. },
                        ..
                    }) = act.channels.get_mut(&topic)
                    {
                        m.phx_ref = new_ref;
                        if let Some(s) = &status {
                            m.status = s.clone();
                        }
                        if let Some(fl) = &fields {
                            m.fields = fl.clone();
                        }
                    }
                    if let (Some(s), Some(acc)) = (status, &act.account_addr) {
                        if act.staff.is_none() {
                            acc.do_send(ConnectionStatus {
                                user: act.user.clone(),
                                session: act.id,
                                status: s,
                            });
                        }
                    }
                    ctx.text(protocol::reply_ok(&join_ref, &msg_ref, &topic, &json!({})));
                }
                Ok(Err(r)) => act.error(ctx, &join_ref, &msg_ref, &topic, r),
                Err(_) => act.error(ctx, &join_ref, &msg_ref, &topic, Reason::Unavailable),
            }
        }));
    }

    fn broadcast(&mut self, f: InFrame, ctx: &mut Ctx) {
        let Some((room, _)) = self.room_of(&f.topic) else {
            return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::NotJoined);
        };
        if self.inflight >= self.cfg.limits.max_inflight {
            return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::RateLimited);
        }
        let event = f.payload.get("event").and_then(Value::as_str).unwrap_or("");
        let valid = !event.is_empty()
            && event.len() <= 64
            && !RESERVED_EVENT_PREFIXES.iter().any(|p| event.starts_with(p));
        if !valid {
            return self.error(
                ctx,
                &f.join_ref,
                &f.msg_ref,
                &f.topic,
                Reason::InvalidPayload,
            );
        }
        if !self.count_message_in() {
            return self.error(ctx, &f.join_ref, &f.msg_ref, &f.topic, Reason::PlanLimit);
        }
        let msg = Broadcast {
            from: self.id,
            event: event.to_string(),
            payload: f.payload.get("payload").cloned().unwrap_or(Value::Null),
            include_self: f
                .payload
                .get("self")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        };
        self.inflight += 1;
        let topic = f.topic;
        let (join_ref, msg_ref) = (f.join_ref, f.msg_ref);
        ctx.spawn(room.send(msg).into_actor(self).map(move |res, act, ctx| {
            act.inflight -= 1;
            match res {
                Ok(Ok(())) => ctx.text(protocol::reply_ok(&join_ref, &msg_ref, &topic, &json!({}))),
                Ok(Err(r)) => act.error(ctx, &join_ref, &msg_ref, &topic, r),
                Err(_) => act.error(ctx, &join_ref, &msg_ref, &topic, Reason::Unavailable),
            }
        }));
    }

    fn leave(&mut self, f: InFrame, ctx: &mut Ctx) {
        if let Some(ch) = self.channels.remove(&f.topic) {
            match ch.kind {
                ChannelKind::Room { addr: Some(a), .. } => a.do_send(Leave {
                    user: self.user.clone(),
                    session: self.id,
                    how: Departure::Now,
                }),
                ChannelKind::Room { addr: None, .. } => {}
                ChannelKind::Account { addr, .. } => {
                    if let Some(acc) = addr {
                        acc.do_send(Unsubscribe { session: self.id });
                    }
                }
            }
            self.rooms_changed();
        }
        ctx.text(protocol::reply_ok(
            &f.join_ref,
            &f.msg_ref,
            &f.topic,
            &json!({}),
        ));
    }
}

impl Actor for SessionActor {
    type Context = Ctx;

    fn started(&mut self, ctx: &mut Ctx) {
        ctx.set_mailbox_capacity(self.cfg.limits.max_outbound);
        // On a socket thread, its lane delivers room frames into the session's outbox.
        if presence_actors::fanout::this_threads_lane().is_some() {
            ctx.add_stream(outbox::open(self.id, self.cfg.limits.max_outbound));
        }
        self.metrics.connections.inc();
        log::debug!(
            "session {} opened: account {}, user {}",
            self.id,
            self.account,
            self.user
        );
        let every = Duration::from_millis(
            (self.cfg.timeout_ms / HEARTBEAT_CHECKS_PER_TIMEOUT as u64).max(10),
        );
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        ctx.run_interval(every, move |act, ctx| {
            if act.hb.elapsed() > timeout {
                act.metrics
                    .ws_errors
                    .with_label_values(&["heartbeat_timeout"])
                    .inc();
                act.close(ctx, Reason::HeartbeatTimeout);
            }
        });
        let me: Recipient<ToSession> = ctx.address().recipient();
        let register = RegisterSession {
            session: self.id,
            account: self.account.clone(),
            connection: self.staff.is_none(),
            user: self.user.clone(),
            to: ctx.address().recipient(),
            report: ctx.address().recipient(),
        };
        // Nothing is read from the socket until the session is known to the tree.
        ctx.wait(
            self.registry
                .send(register)
                .into_actor(self)
                .then(move |res, act, _| {
                    let (registered, addr) = match res {
                        Ok(Ok(a)) => (true, a),
                        _ => (false, None),
                    };
                    act.registered = registered;
                    act.account_addr = addr.clone();
                    let connect = match (&addr, act.staff.is_some()) {
                        (Some(a), false) => Some(a.send(Connect {
                            user: act.user.clone(),
                            arrival: act.connection_arrival(),
                            to: me,
                        })),
                        _ => None,
                    };
                    actix::fut::wrap_future::<_, Self>(async move {
                        match connect {
                            Some(c) => c.await.ok(),
                            None => None,
                        }
                    })
                })
                .map(|phx_ref, act, ctx| {
                    if !act.registered {
                        return act.close(ctx, Reason::ServerShutdown);
                    }
                    if let Some(r) = phx_ref {
                        act.connection_meta = Some(act.connection_arrival().into_meta(r));
                    }
                }),
        );
    }

    fn stopped(&mut self, _: &mut Ctx) {
        self.metrics.connections.dec();
        log::debug!(
            "session {} closed after {} s",
            self.id,
            (now_ms() - self.online_at).max(0) / 1000
        );
        let how = if self.departure_now {
            Departure::Now
        } else {
            Departure::Grace {
                until: now_ms() + self.cfg.grace_ms as i64,
            }
        };
        for ch in self.channels.values() {
            match &ch.kind {
                ChannelKind::Room { addr: Some(a), .. } => a.do_send(Leave {
                    user: self.user.clone(),
                    session: self.id,
                    how,
                }),
                ChannelKind::Account { addr: Some(a), .. } => {
                    a.do_send(Unsubscribe { session: self.id })
                }
                _ => {}
            }
        }
        if let (Some(acc), false) = (&self.account_addr, self.staff.is_some()) {
            acc.do_send(Leave {
                user: self.user.clone(),
                session: self.id,
                how,
            });
        }
        self.registry
            .do_send(UnregisterSession { session: self.id });
    }
}

impl SessionActor {
    fn connection_arrival(&self) -> Arrival {
        Arrival {
            session: self.id,
            status: "online".into(),
            online_at: self.online_at,
            device: self.device.clone(),
            fields: self.base_fields.clone(),
        }
    }
}

impl Handler<ToSession> for SessionActor {
    type Result = ();

    fn handle(&mut self, msg: ToSession, ctx: &mut Ctx) {
        match msg {
            ToSession::Frame { topic, frame } => self.deliver(ctx, &topic, frame),
            ToSession::Evicted { topic, reason } => {
                log::info!("session {} cut off from {topic}: {reason}", self.id);
                self.close(ctx, reason);
            }
            ToSession::Close { reason } => self.close(ctx, reason),
        }
    }
}

impl SessionActor {
    /// Writes a frame for `topic` to the socket, or holds it until that topic's join reply is
    /// written; a frame for a topic the socket has left is dropped.
    fn deliver(&mut self, ctx: &mut Ctx, topic: &Arc<str>, frame: ByteString) {
        let Some(ch) = self.channels.for_frame(topic) else {
            return;
        };
        if let Some(slot) = &self.slot {
            slot.usage().messages_out(1);
        }
        match &mut ch.pending {
            Some(buf) => {
                // Held until the join reply is written; bounded like the mailbox itself.
                if buf.len() >= self.cfg.limits.max_outbound {
                    self.metrics
                        .outbound_drops
                        .with_label_values(&["slow_consumer"])
                        .inc();
                    return self.close(ctx, Reason::SlowConsumer);
                }
                buf.push(frame)
            }
            None => ctx.text(frame),
        }
    }
}

/// Frames from this thread's lane, through the session's outbox (`presence_actors::outbox`).
impl StreamHandler<Outgoing> for SessionActor {
    fn handle(&mut self, item: Outgoing, ctx: &mut Ctx) {
        self.deliver(ctx, &item.topic, item.frame);
    }

    /// An outbox never ends; nothing to do if it did.
    fn finished(&mut self, _: &mut Ctx) {}
}

impl Handler<ReportMembership> for SessionActor {
    type Result = Report;

    fn handle(&mut self, msg: ReportMembership, ctx: &mut Ctx) -> Report {
        match msg {
            ReportMembership::Room { room, addr } => {
                let topic = format!("room:{room}");
                let Some(ch) = self.channels.get_mut(&topic) else {
                    return Report::None;
                };
                let ChannelKind::Room { addr: a, meta, .. } = &mut ch.kind else {
                    return Report::None;
                };
                match meta {
                    Some(m) => {
                        *a = Some(addr);
                        Report::Room(RoomMembership {
                            user: self.user.clone(),
                            meta: m.clone(),
                            to: ctx.address().recipient(),
                            // Answered on this session's thread: its lane, as at the join.
                            lane: presence_actors::fanout::this_threads_lane(),
                        })
                    }
                    // Still joining: the in-flight join fails over to the new room by itself.
                    None => Report::None,
                }
            }
            ReportMembership::Account { account, addr } => {
                let mut follower = None;
                for ch in self.channels.values_mut() {
                    if let ChannelKind::Account { id, addr: a } = &mut ch.kind {
                        if *id == account && a.is_some() {
                            *a = Some(addr.clone());
                            follower = Some(self.user.clone());
                        }
                    }
                }
                let own = self.staff.is_none() && self.account == account;
                if own {
                    self.account_addr = Some(addr);
                }
                if !own && follower.is_none() {
                    return Report::None;
                }
                Report::Account(AccountMembership {
                    session: self.id,
                    connection: if own {
                        self.connection_meta.clone().map(|m| (self.user.clone(), m))
                    } else {
                        None
                    },
                    rooms: if own { self.rooms() } else { Vec::new() },
                    follower,
                    to: ctx.address().recipient(),
                })
            }
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for SessionActor {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Ctx) {
        let msg = match item {
            Ok(m) => m,
            Err(e) => {
                log::debug!("session {}: protocol error {e}", self.id);
                let reason = match &e {
                    ws::ProtocolError::Overflow => Reason::FrameTooLarge,
                    // actix-web-actors reports both a text frame that is not UTF-8 and a dropped
                    // connection as `Io(Other)`; only the message tells them apart.
                    ws::ProtocolError::Io(io) if !io.to_string().contains("utf-8") => {
                        self.metrics
                            .ws_errors
                            .with_label_values(&["connection_lost"])
                            .inc();
                        return ctx.stop();
                    }
                    _ => Reason::MalformedFrame,
                };
                self.metrics
                    .ws_errors
                    .with_label_values(&[reason.as_str()])
                    .inc();
                return self.close(ctx, reason);
            }
        };
        self.hb = Instant::now();
        match msg {
            ws::Message::Text(text) => {
                match protocol::decode(&text, self.cfg.limits.max_frame_bytes) {
                    Ok(frame) => self.handle_frame(frame, ctx),
                    Err(e) => self.error(ctx, &e.join_ref, &e.msg_ref, &e.topic, e.reason),
                }
            }
            ws::Message::Binary(_) | ws::Message::Continuation(_) => self.error(
                ctx,
                &Value::Null,
                &Value::Null,
                "phoenix",
                Reason::BinaryNotSupported,
            ),
            ws::Message::Ping(b) => ctx.pong(&b),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}
