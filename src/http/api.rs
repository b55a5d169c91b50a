//! Handlers of the admin API and the ops endpoints. Database work runs in `web::block`; presence
//! questions go to the live actors.

use std::sync::Arc;

use actix_web::http::header::ContentType;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use presence_actors::account::{AccountHereNow, Counts, SessionNode, WhereNow};
use presence_actors::messages::HereNow;
use presence_actors::presence::SessionId;
use presence_actors::registry::{KickSession, LookupAccount, LookupRoom, ResolveAccount};
use presence_actors::room::Members;
use presence_actors::room::Occupancy;
use presence_actors::{now_ms, protocol};

use crate::auth;
use crate::http::error::ApiError;
use crate::http::{AppState, Caller};
use crate::store::{self, Account, NewAccount, NewAuditLog, NewRefreshToken};

type Data = web::Data<AppState>;

/// Default and largest page of a room's here-now.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// How long `/readyz` waits for a database connection before calling it down.
const READYZ_DB_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Points a history series has at most (the step grows to fit the range).
const MAX_POINTS: i64 = 2_000;
/// Members listed for one instant at most.
const MAX_MEMBERS: i64 = 10_000;

pub async fn index() -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "service": "presenced",
        "version": env!("CARGO_PKG_VERSION"),
        "socket": "/socket/websocket?vsn=2.0.0",
        "api": "/api/v1",
        "health": ["/healthz", "/readyz", "/metrics"],
    }))
}

pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("route"))
}

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// Ready when the database answers (and, in a cluster, Redis). Presence keeps working from
/// memory while the database is down; this says so, with the snapshot writer's view.
pub async fn readyz(state: Data) -> HttpResponse {
    let store = state.store.clone();
    let ping = web::block(move || store.ping_within(READYZ_DB_TIMEOUT)).await;
    let mut db = match ping {
        Ok(Ok(())) => json!({ "status": "up", "backend": state.store.backend() }),
        Ok(Err(e)) => {
            json!({ "status": "down", "backend": state.store.backend(), "error": e.to_string() })
        }
        Err(_) => json!({ "status": "down", "error": "blocking pool unavailable" }),
    };
    db["snapshots"] = state.persistence.health.json();
    let redis = state.cluster.as_ref().map(|c| c.status.json());
    let up = db["status"] == "up" && state.cluster.as_ref().is_none_or(|c| c.status.is_up());
    let mut body = json!({ "status": if up { "ready" } else { "not_ready" }, "node": state.node, "database": db });
    if let Some(r) = redis {
        body["redis"] = r;
    }
    if up {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}

pub async fn metrics(state: Data) -> HttpResponse {
    use prometheus::Encoder;
    let enc = prometheus::TextEncoder::new();
    let mut buf = Vec::new();
    if enc.encode(&state.prometheus.gather(), &mut buf).is_err() {
        return HttpResponse::InternalServerError().finish();
    }
    HttpResponse::Ok().content_type(enc.format_type()).body(buf)
}

/// The client's address as the audit log records it (X-Forwarded-For from trusted proxies).
pub(crate) fn client_ip(state: &AppState, req: &HttpRequest) -> Option<String> {
    state.rate.client_ip(req).map(|ip| ip.to_string())
}

/// Writes an audit entry off the worker thread; a failure is logged, never fatal to the request.
fn audit(
    state: &AppState,
    account: Option<&str>,
    actor: Option<&str>,
    action: &'static str,
    target: Option<&str>,
    ip: Option<String>,
) {
    let store = state.store.clone();
    let (account, actor, target) = (
        account.map(String::from),
        actor.map(String::from),
        target.map(String::from),
    );
    actix_web::rt::spawn(async move {
        let res = web::block(move || {
            store.append_audit(&NewAuditLog {
                at: now_ms(),
                account_id: account.as_deref(),
                actor: actor.as_deref(),
                action,
                target: target.as_deref(),
                ip: ip.as_deref(),
                detail: "{}",
            })
        })
        .await;
        if !matches!(res, Ok(Ok(()))) {
            log::warn!("could not write audit entry '{action}'");
        }
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    email: String,
    password: String,
}

/// Issues an access token and a new refresh token (of `family`, or a new family).
fn issue_pair(
    state: &AppState,
    user: &store::User,
    family: Option<String>,
) -> Result<Value, ApiError> {
    let access = state
        .keys
        .issue_access(&user.id, &user.role, user.account_id.as_deref());
    let refresh = auth::random_secret();
    let now = now_ms();
    let family = family.unwrap_or_else(|| store::new_id("fam_"));
    state.store.insert_refresh_token(&NewRefreshToken {
        id: &store::new_id("rt_"),
        user_id: &user.id,
        family_id: &family,
        token_hash: &auth::sha256_hex(&refresh),
        issued_at: now,
        expires_at: now + state.settings.auth.refresh_ttl_s as i64 * 1000,
    })?;
    Ok(json!({
        "access_token": access,
        "refresh_token": refresh,
        "token_type": "Bearer",
        "expires_in": state.keys.access_ttl_s(),
        "user": { "id": user.id, "email": user.email, "role": user.role, "account_id": user.account_id },
    }))
}

pub async fn login(
    state: Data,
    req: HttpRequest,
    body: web::Json<Login>,
) -> Result<HttpResponse, ApiError> {
    let Login { email, password } = body.into_inner();
    if email.len() > 320 || password.len() > 1024 {
        return Err(ApiError::unprocessable(
            "invalid_fields",
            "email or password too long",
        ));
    }
    // Throttled before any password work: a flood costs no argon2 time, and is audited once a
    // minute per address, not once per attempt.
    if let Some(ip) = state.rate.client_ip(&req) {
        if let Err(t) = state.rate.login(ip, &email) {
            if state.rate.audit_throttle(ip) {
                log::warn!("login attempts from {ip} throttled ({})", t.scope);
                audit(
                    &state,
                    None,
                    None,
                    "login_throttled",
                    Some(&email.trim().to_lowercase()),
                    Some(ip.to_string()),
                );
            }
            return Err(ApiError::throttled(t));
        }
    }
    let st = state.clone();
    let result = web::block(move || -> Result<Result<Value, store::User>, ApiError> {
        let invalid = || ApiError::unauthorized("invalid_credentials", "wrong email or password");
        match st.store.find_user_by_email(&email)? {
            Some(u) if auth::verify_password(&password, &u.password_hash) => {
                if u.disabled {
                    return Err(invalid());
                }
                Ok(Ok(issue_pair(&st, &u, None)?))
            }
            Some(u) => Ok(Err(u)),
            None => {
                // Same cost as a real check, so timing does not reveal which emails exist.
                let _ = auth::verify_password(&password, dummy_hash());
                Err(invalid())
            }
        }
    })
    .await??;
    match result {
        Ok(pair) => {
            let uid = pair["user"]["id"].as_str().unwrap_or_default().to_string();
            let acc = pair["user"]["account_id"].as_str().map(String::from);
            audit(
                &state,
                acc.as_deref(),
                Some(&uid),
                "login",
                None,
                client_ip(&state, &req),
            );
            Ok(HttpResponse::Ok().json(pair))
        }
        Err(u) => {
            audit(
                &state,
                u.account_id.as_deref(),
                Some(&u.id),
                "login_failed",
                None,
                client_ip(&state, &req),
            );
            Err(ApiError::unauthorized(
                "invalid_credentials",
                "wrong email or password",
            ))
        }
    }
}

/// A real argon2 hash of a random string, to spend the same time on unknown emails.
fn dummy_hash() -> &'static str {
    static HASH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HASH.get_or_init(|| auth::hash_password(&auth::random_secret()).unwrap_or_default())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshBody {
    refresh_token: String,
}

pub async fn refresh(
    state: Data,
    req: HttpRequest,
    body: web::Json<RefreshBody>,
) -> Result<HttpResponse, ApiError> {
    let token = body.into_inner().refresh_token;
    let st = state.clone();
    let ip = client_ip(&state, &req);
    let out = web::block(move || -> Result<Value, ApiError> {
        let invalid = || {
            ApiError::unauthorized(
                "invalid_refresh_token",
                "refresh token is invalid or expired",
            )
        };
        let rt = st
            .store
            .find_refresh_token(&auth::sha256_hex(&token))?
            .ok_or_else(invalid)?;
        let now = now_ms();
        if rt.revoked_at.is_some() || rt.expires_at <= now {
            return Err(invalid());
        }
        if rt.spent_at.is_some() || !st.store.spend_refresh_token(&rt.id, now)? {
            // A spent token used again: someone holds a copy. Revoke the whole family.
            st.store.revoke_family(&rt.family_id, now)?;
            let account = st
                .store
                .get_user(&rt.user_id)
                .ok()
                .and_then(|u| u.account_id);
            let _ = st.store.append_audit(&NewAuditLog {
                at: now,
                account_id: account.as_deref(),
                actor: Some(&rt.user_id),
                action: "refresh_token_reuse",
                target: Some(&rt.family_id),
                ip: ip.as_deref(),
                detail: "{}",
            });
            return Err(invalid());
        }
        let user = st.store.get_user(&rt.user_id)?;
        if user.disabled {
            return Err(invalid());
        }
        issue_pair(&st, &user, Some(rt.family_id))
    })
    .await??;
    Ok(HttpResponse::Ok().json(out))
}

pub async fn logout(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<RefreshBody>,
) -> Result<HttpResponse, ApiError> {
    let token = body.into_inner().refresh_token;
    let st = state.clone();
    let uid = caller.0.sub.clone();
    web::block(move || -> Result<(), ApiError> {
        if let Some(rt) = st.store.find_refresh_token(&auth::sha256_hex(&token))? {
            if rt.user_id == uid {
                st.store.revoke_family(&rt.family_id, now_ms())?;
            }
        }
        Ok(())
    })
    .await??;
    audit(
        &state,
        caller.0.acc.as_deref(),
        Some(&caller.0.sub),
        "logout",
        None,
        client_ip(&state, &req),
    );
    Ok(HttpResponse::NoContent().finish())
}

pub(crate) fn account_json(a: &Account, with_secret: bool) -> Value {
    let mut v = json!({
        "id": a.id,
        "name": a.name,
        "plan": a.plan_id,
        "settings": serde_json::from_str::<Value>(&a.settings).unwrap_or_else(|_| json!({})),
        "created_at": a.created_at,
        "updated_at": a.updated_at,
    });
    if with_secret {
        v["signing_secret"] = Value::from(a.signing_secret.clone());
    }
    v
}

pub async fn list_accounts(state: Data, caller: Caller) -> Result<HttpResponse, ApiError> {
    caller.admin()?;
    let store = state.store.clone();
    let accounts = web::block(move || store.list_accounts()).await??;
    let list: Vec<Value> = accounts.iter().map(|a| account_json(a, false)).collect();
    Ok(HttpResponse::Ok().json(json!({ "accounts": list })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAccount {
    name: String,
    #[serde(default = "default_plan")]
    plan: String,
}

fn default_plan() -> String {
    "free".into()
}

/// Account names: 1..=100 characters, no control characters.
pub(crate) fn valid_name(name: &str) -> bool {
    let n = name.trim();
    !n.is_empty() && n.chars().count() <= 100 && !n.chars().any(char::is_control)
}

pub async fn create_account(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<CreateAccount>,
) -> Result<HttpResponse, ApiError> {
    caller.admin()?;
    let CreateAccount { name, plan } = body.into_inner();
    if !valid_name(&name) {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 100 characters without control characters",
        ));
    }
    let store = state.store.clone();
    let secret = auth::random_secret();
    let id = store::new_id("acc_");
    let now = now_ms();
    let created = {
        let (id, secret, plan, name) = (
            id.clone(),
            secret.clone(),
            plan.clone(),
            name.trim().to_string(),
        );
        web::block(move || {
            store.get_plan(&plan)?;
            store.create_account(&NewAccount {
                id: &id,
                name: &name,
                plan_id: &plan,
                signing_secret: &secret,
                settings: "{}",
                created_at: now,
                updated_at: now,
            })
        })
        .await?
    };
    let account = match created {
        Ok(a) => a,
        Err(store::StoreError::NotFound) => {
            return Err(ApiError::unprocessable(
                "unknown_plan",
                format!("no plan named '{plan}'"),
            ))
        }
        Err(e) => return Err(e.into()),
    };
    state
        .keyring
        .put(&account.id, crate::app::account_keys(&account));
    audit(
        &state,
        Some(&account.id),
        Some(&caller.0.sub),
        "account_created",
        Some(&account.id),
        client_ip(&state, &req),
    );
    Ok(HttpResponse::Created().json(account_json(&account, true)))
}

pub async fn get_account(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    caller.read(&id)?;
    let store = state.store.clone();
    let found = web::block(move || store.get_account(&id)).await?;
    match found {
        Ok(a) => Ok(HttpResponse::Ok().json(account_json(&a, false))),
        Err(store::StoreError::NotFound) => Err(ApiError::not_found("account")),
        Err(e) => Err(e.into()),
    }
}

/// The live actor of an account (started if needed).
async fn account_actor(
    state: &Data,
    id: &str,
) -> Result<actix::Addr<presence_actors::account::AccountActor>, ApiError> {
    state
        .registry
        .send(ResolveAccount { account: id.into() })
        .await
        .map_err(|_| ApiError::unavailable("registry unavailable"))?
        .map_err(|_| ApiError::unavailable("shutting down"))
}

/// The live room's actor, if the room is live.
async fn room_actor(
    state: &Data,
    id: &str,
    room: &str,
) -> Result<Option<actix::Addr<presence_actors::room::RoomActor>>, ApiError> {
    state
        .registry
        .send(LookupRoom {
            account: id.into(),
            room: room.into(),
        })
        .await
        .map_err(|_| ApiError::unavailable("registry unavailable"))
}

/// The account must exist (else 404) and the caller may read it: admins and the account's
/// owners and members. Viewers see the dashboard only (`GET /dashboard/:id` and the account
/// socket): 403 here.
async fn readable_account(state: &Data, caller: &Caller, id: &str) -> Result<(), ApiError> {
    caller.read(id)?;
    if caller.0.role == "viewer" {
        return Err(ApiError::forbidden(
            "forbidden",
            "viewers see the dashboard only",
        ));
    }
    existing_account(state, id).await
}

/// 404 unless the account exists.
async fn existing_account(state: &Data, id: &str) -> Result<(), ApiError> {
    if state.keyring.get(id).is_some() || state.load_account_keys(id).await?.is_some() {
        Ok(())
    } else {
        Err(ApiError::not_found("account"))
    }
}

pub async fn account_presence(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    readable_account(&state, &caller, &id).await?;
    let addr = account_actor(&state, &id).await?;
    let v = addr
        .send(AccountHereNow)
        .await
        .map_err(|_| ApiError::unavailable("account actor restarting"))?;
    Ok(HttpResponse::Ok().json(v))
}

pub async fn list_rooms(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    readable_account(&state, &caller, &id).await?;
    let out = room_occupancy(&state, &id).await?;
    let counts = match account_actor(&state, &id).await {
        Ok(a) => a.send(Counts).await.ok(),
        Err(_) => None,
    };
    Ok(HttpResponse::Ok().json(json!({ "account": id, "rooms": out, "totals": counts })))
}

/// Every live room of an account with its users and sessions, in name order. Read in place
/// (see `room_presence`); a room still being rebuilt after a crash is asked, and answers once
/// it is.
async fn room_occupancy(state: &Data, id: &str) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    for (name, view) in state.rooms.of_account(id) {
        let in_place = {
            let members = view.read();
            members.is_ready().then(|| members.counts())
        };
        let counts = match in_place {
            Some(c) => Some(c),
            None => match room_actor(state, id, &name).await? {
                Some(a) => a.send(Occupancy).await.ok(),
                None => None,
            },
        };
        if let Some((users, sessions)) = counts {
            out.push(json!({ "room": &*name, "users": users, "sessions": sessions }));
        }
    }
    Ok(out)
}

#[derive(Deserialize)]
pub struct PageQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

pub async fn room_presence(
    state: Data,
    caller: Caller,
    path: web::Path<(String, String)>,
    q: web::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let (id, room) = path.into_inner();
    readable_account(&state, &caller, &id).await?;
    if !protocol::valid_room_name(&room, state.engine.limits.max_room_name_len) {
        return Err(ApiError::bad_request(
            "invalid_room_name",
            "room names are [A-Za-z0-9_.:@~-]",
        ));
    }
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be 1 to 1000",
        ));
    }
    let node = &state.engine.cluster.node;
    // Read in place: no trip through the room's mailbox, and no wake of this worker by
    // another thread, behind whatever the worker's WebSocket sessions are doing.
    let view = state.rooms.get(&id, &room);
    let in_place = view.as_ref().and_then(|v| {
        let members = v.read();
        members
            .is_ready()
            .then(|| members.here_now(&room, node, q.cursor.as_deref(), limit))
    });
    let body = match (in_place, view) {
        (Some(body), _) => body,
        // Restarted and still rebuilding from its sessions: the room answers once it has.
        (None, Some(_)) => match room_actor(&state, &id, &room).await? {
            Some(a) => a
                .send(HereNow {
                    after: q.cursor.clone(),
                    limit,
                })
                .await
                .map_err(|_| ApiError::unavailable("room restarting"))?,
            None => Members::new(true).here_now(&room, node, None, limit),
        },
        (None, None) => Members::new(true).here_now(&room, node, None, limit),
    };
    Ok(HttpResponse::Ok()
        .content_type(ContentType::json())
        .body(body))
}

pub async fn user_presence(
    state: Data,
    caller: Caller,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, user) = path.into_inner();
    readable_account(&state, &caller, &id).await?;
    if !protocol::valid_user_id(&user, state.engine.limits.max_user_id_len) {
        return Err(ApiError::bad_request(
            "invalid_user_id",
            "user ids are [A-Za-z0-9_.:@+-]",
        ));
    }
    let addr = account_actor(&state, &id).await?;
    let mut v = addr
        .send(WhereNow { user: user.clone() })
        .await
        .map_err(|_| ApiError::unavailable("account actor restarting"))?;
    let store = state.store.clone();
    let last_seen = web::block(move || store.last_seen(&id, &user))
        .await?
        .ok()
        .flatten();
    let online = v["online"].as_bool().unwrap_or(false);
    // A departure not yet written by the next snapshot is only known to the actor.
    let recent = v.get("last_seen").and_then(Value::as_i64);
    v["last_seen"] = if online {
        Value::from(now_ms())
    } else {
        json!(match (last_seen, recent) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        })
    };
    Ok(HttpResponse::Ok().json(v))
}

pub async fn kick_session(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (id, session) = path.into_inner();
    caller.manage(&id)?;
    let sid = SessionId::parse(&session).ok_or_else(|| ApiError::not_found("session"))?;
    let kicked = state
        .registry
        .send(KickSession {
            account: id.clone().into(),
            session: sid,
        })
        .await
        .map_err(|_| ApiError::unavailable("registry unavailable"))?;
    if !kicked {
        // In a cluster the session may live on another node: its owner closes it.
        let remote = match &state.cluster {
            Some(cluster) => {
                let owner = match state
                    .registry
                    .send(LookupAccount {
                        account: id.clone().into(),
                    })
                    .await
                {
                    Ok(Some(addr)) => addr.send(SessionNode { session: sid }).await.ok().flatten(),
                    _ => None,
                };
                match owner {
                    Some(node) if *node != *cluster.status.node => {
                        cluster.kick(node, &id, sid);
                        true
                    }
                    _ => false,
                }
            }
            None => false,
        };
        if !remote {
            return Err(ApiError::not_found("session"));
        }
    }
    audit(
        &state,
        Some(&id),
        Some(&caller.0.sub),
        "session_kicked",
        Some(&session),
        client_ip(&state, &req),
    );
    Ok(HttpResponse::build(StatusCode::ACCEPTED).json(json!({ "kicked": session })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    /// Unix ms; default `to` minus one hour.
    from: Option<i64>,
    /// Unix ms; default now.
    to: Option<i64>,
    /// A room; absent means the whole account.
    room: Option<String>,
    /// Bucket width in ms; default fits the range in about 300 points.
    step: Option<i64>,
    /// An instant (unix ms): answer with the members present then instead of a series.
    at: Option<i64>,
}

/// `GET /accounts/:id/presence/history`: "who was online, how many, when". With `from`/`to` a
/// time series of users and connections online (summed over nodes); with `at`, the members
/// present at that instant. Served from the snapshot history, so its resolution is the snapshot
/// interval.
pub async fn presence_history(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    readable_account(&state, &caller, &id).await?;
    let q = q.into_inner();
    let room = q.room.unwrap_or_default();
    if !room.is_empty() && !protocol::valid_room_name(&room, state.engine.limits.max_room_name_len)
    {
        return Err(ApiError::bad_request(
            "invalid_room_name",
            "room names are [A-Za-z0-9_.:@~-]",
        ));
    }
    let store = state.store.clone();
    let room_json = if room.is_empty() {
        Value::Null
    } else {
        Value::from(room.clone())
    };
    if let Some(at) = q.at {
        if q.from.is_some() || q.to.is_some() || q.step.is_some() {
            return Err(ApiError::bad_request(
                "invalid_range",
                "give either at, or from/to/step",
            ));
        }
        let (acc, r) = (id.clone(), room.clone());
        let rows = web::block(move || store.intervals_at(&acc, &r, at, MAX_MEMBERS + 1)).await??;
        let truncated = rows.len() as i64 > MAX_MEMBERS;
        let rows = &rows[..rows.len().min(MAX_MEMBERS as usize)];
        let members = crate::persist::history::members(rows);
        return Ok(HttpResponse::Ok().json(json!({
            "account": id,
            "room": room_json,
            "at": at,
            "users": members.len(),
            "connections": rows.len(),
            "members": members,
            "truncated": truncated,
        })));
    }
    let to = q.to.unwrap_or_else(now_ms);
    let from = q.from.unwrap_or(to - 3_600_000);
    if from >= to || from < 0 {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from must be before to (unix milliseconds)",
        ));
    }
    let span = to - from;
    let min_step = ((span + MAX_POINTS - 1) / MAX_POINTS).max(1000);
    let step = match q.step {
        Some(s) if s < 1000 => {
            return Err(ApiError::bad_request(
                "invalid_step",
                "step is at least 1000 ms",
            ))
        }
        Some(s) => s.max(min_step),
        None => ((span + 299) / 300).max(min_step),
    };
    let fresh = 2 * state.settings.history.sample_interval_ms as i64;
    let lookback = fresh + (state.settings.history.rollup_bucket_s as i64) * 1000;
    let (acc, r) = (id.clone(), room.clone());
    let samples = web::block(move || {
        store.history_samples(&acc, &r, from.saturating_sub(lookback), to, 200_000)
    })
    .await??;
    let points = crate::persist::history::series(&samples, from, to, step, fresh);
    Ok(HttpResponse::Ok().json(json!({
        "account": id,
        "room": room_json,
        "from": from,
        "to": to,
        "step": step,
        "series": points,
    })))
}

/// Users listed by the dashboard endpoint at most (the account socket streams the rest).
const DASHBOARD_USERS: usize = 100;
/// Rooms listed by the dashboard endpoint at most, busiest first.
const DASHBOARD_ROOMS: usize = 100;

async fn usage_of(state: &Data, id: &str) -> Result<Arc<crate::usage::AccountUsage>, ApiError> {
    state
        .usage
        .load(id)
        .await?
        .ok_or_else(|| ApiError::not_found("account"))
}

/// `GET /dashboard/:id`: what a dashboard shows first, in one call: the account, who is online
/// (the first users; the account socket streams the rest), rooms with occupancy, usage against
/// the plan and this period's alerts. Any role of the account, viewers included.
pub async fn dashboard(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    caller.read(&id)?;
    let store = state.store.clone();
    let (acc, month_start) = (id.clone(), crate::usage::month_of(now_ms()).1);
    let found = web::block(move || {
        let account = store.get_account(&acc)?;
        let alerts = store.list_alerts(&acc, month_start)?;
        Ok::<_, store::StoreError>((account, alerts))
    })
    .await?;
    let (account, alerts) = match found {
        Ok(x) => x,
        Err(store::StoreError::NotFound) => return Err(ApiError::not_found("account")),
        Err(e) => return Err(e.into()),
    };
    let usage = usage_of(&state, &id).await?;
    let addr = account_actor(&state, &id).await?;
    let mut here = addr
        .send(AccountHereNow)
        .await
        .map_err(|_| ApiError::unavailable("account actor restarting"))?;
    let mut truncated = false;
    if let Some(p) = here["presences"].as_object_mut() {
        if p.len() > DASHBOARD_USERS {
            truncated = true;
            let keep: serde_json::Map<String, Value> = std::mem::take(p)
                .into_iter()
                .take(DASHBOARD_USERS)
                .collect();
            *p = keep;
        }
    }
    let mut rooms = room_occupancy(&state, &id).await?;
    let room_count = rooms.len();
    rooms.sort_by(|a, b| {
        b["users"]
            .as_u64()
            .cmp(&a["users"].as_u64())
            .then_with(|| a["room"].as_str().cmp(&b["room"].as_str()))
    });
    rooms.truncate(DASHBOARD_ROOMS);
    Ok(HttpResponse::Ok().json(json!({
        "account": account_json(&account, false),
        "online": {
            "users": here["users"],
            "connections": here["connections"],
            "presences": here["presences"],
            "truncated": truncated,
        },
        "rooms": { "total": room_count, "busiest": rooms },
        "usage": usage.json(room_count as i64, now_ms()),
        "alerts": alerts,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageQuery {
    /// Unix ms; default `to` minus 24 hours.
    from: Option<i64>,
    /// Unix ms; default now.
    to: Option<i64>,
    /// Bucket width in ms, a multiple of 60 000; default fits the range in about 300 points.
    step: Option<i64>,
}

const MINUTE: i64 = 60_000;

/// `GET /usage/:id?from=&to=&step=`: per-bucket peak connections, connection-seconds, messages
/// in/out and joins, from the per-minute rows plus the minute in progress. Owners, members and
/// admins.
pub async fn usage(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
    q: web::Query<UsageQuery>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    readable_account(&state, &caller, &id).await?;
    let now = now_ms();
    let to = q.to.unwrap_or(now);
    let from = q.from.unwrap_or(to - 24 * 3_600_000);
    if from >= to || from < 0 {
        return Err(ApiError::bad_request(
            "invalid_range",
            "from must be before to (unix milliseconds)",
        ));
    }
    let span = to - from;
    let min_step = ((span + MAX_POINTS - 1) / MAX_POINTS).max(MINUTE);
    let step = match q.step {
        Some(s) if s < MINUTE || s % MINUTE != 0 => {
            return Err(ApiError::bad_request(
                "invalid_step",
                "step is a multiple of 60000 ms",
            ))
        }
        Some(s) => s.max(min_step),
        None => ((span + 299) / 300).max(min_step),
    };
    // Whole minutes per bucket.
    let step = (step + MINUTE - 1) / MINUTE * MINUTE;
    let from = crate::usage::minute_of(from);
    let store = state.store.clone();
    let acc = id.clone();
    let mut rows = web::block(move || store.usage_rows(&acc, from, to, 600_000)).await??;
    if let Some(u) = state.usage.get(&id) {
        let current = u.current_row(now);
        if current.minute >= from && current.minute < to {
            rows.push(current);
        }
    }
    let buckets = ((to - from + step - 1) / step) as usize;
    let mut series: Vec<store::UsageTotals> = vec![store::UsageTotals::default(); buckets];
    let mut totals = store::UsageTotals::default();
    for r in &rows {
        let i = ((r.minute - from) / step) as usize;
        if let Some(b) = series.get_mut(i) {
            b.add(r);
            totals.add(r);
        }
    }
    let points: Vec<Value> = series
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            v["at"] = Value::from(from + i as i64 * step);
            v
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "account": id,
        "from": from,
        "to": to,
        "step": step,
        "series": points,
        "totals": totals,
    })))
}

/// `GET /billing/:id`: the plan and its limits, usage this period (the calendar month, UTC),
/// usage now against the limits, and this period's alerts. Owners and admins.
pub async fn billing(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    caller.manage(&id)?;
    existing_account(&state, &id).await?;
    let now = now_ms();
    let (period, start, end) = crate::usage::month_of(now);
    let store = state.store.clone();
    let acc = id.clone();
    let (plan, rows, alerts) = web::block(move || {
        Ok::<_, store::StoreError>((
            store.account_plan(&acc)?,
            store.usage_rows(&acc, start, end, 50_000)?,
            store.list_alerts(&acc, start)?,
        ))
    })
    .await??;
    let usage = usage_of(&state, &id).await?;
    let mut totals = store::UsageTotals::default();
    for r in &rows {
        totals.add(r);
    }
    totals.add(&usage.current_row(now));
    let rooms = room_occupancy(&state, &id).await?.len() as i64;
    Ok(HttpResponse::Ok().json(json!({
        "account": id,
        "plan": plan,
        "period": { "name": period, "start": start, "end": end },
        "usage": totals,
        "now": usage.json(rooms, now),
        "alerts": alerts,
    })))
}
