//! Account administration: dashboard users and their roles, account settings and plan, signing
//! secret rotation, the audit log, and the liveness check that makes an access token die with
//! its user (deleted, disabled, or given another role).
//!
//! Permissions follow one rule: another account's resources are 404, never 403, so their
//! existence does not leak; inside the caller's own account a role that may not act is 403.
//! Each change is written to the audit log in the same blocking call as the change, so a
//! change that succeeded is also on record when the response goes out.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};

use presence_actors::account::Notify;
use presence_actors::now_ms;
use presence_actors::registry::ResolveAccount;

use crate::auth::{self, AccessClaims};
use crate::http::api::{account_json, client_ip};
use crate::http::error::ApiError;
use crate::http::{AppState, Caller};
use crate::store::admin::{AuditQuery, UserChanges};
use crate::store::{self, Account, AuditLog, NewAuditLog, NewUser, Store, StoreError, User};

type Data = web::Data<AppState>;

/// How long a cached user stands for the database before the next request reloads it. Changes
/// made through this node update the cache at once; this bounds how long another node's change
/// takes to reach this one.
const USER_CACHE_TTL: Duration = Duration::from_secs(5);
/// Past this many cached users, entries older than the TTL are dropped.
const USER_CACHE_PRUNE_AT: usize = 100_000;

const ROLES: [&str; 4] = ["admin", "owner", "member", "viewer"];
const EMAIL_CHARS: std::ops::RangeInclusive<usize> = 3..=320;
/// Login refuses longer emails and passwords (in bytes), so nothing longer may be created.
const MAX_EMAIL_BYTES: usize = 320;
const MIN_PASSWORD_CHARS: usize = 8;
const MAX_PASSWORD_BYTES: usize = 1024;
/// Largest `settings` object of an account, serialized.
const MAX_SETTINGS_BYTES: usize = 16 * 1024;

/// Default and largest page of the audit log.
const DEFAULT_AUDIT_PAGE: i64 = 100;
const MAX_AUDIT_PAGE: i64 = 1000;

// ---- the liveness cache ----

/// What an access token asserts about its user and must still be true.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UserFacts {
    role: String,
    account_id: Option<String>,
    disabled: bool,
}

impl From<&User> for UserFacts {
    fn from(u: &User) -> UserFacts {
        UserFacts {
            role: u.role.clone(),
            account_id: u.account_id.clone(),
            disabled: u.disabled,
        }
    }
}

#[derive(Debug, Clone)]
struct CachedUser {
    /// `None`: the user does not exist (deleted), remembered so its tokens cost no query.
    facts: Option<UserFacts>,
    loaded_at: Instant,
    /// A reload ahead of expiry is under way (so one request starts it, not every one).
    refreshing: bool,
}

/// Dashboard users as the `Caller` extractor checks them, so that an access token stops
/// working when its user is deleted, disabled or given another role, without a database round
/// trip on every request. Cheap to clone: the map is shared.
#[derive(Clone, Default)]
pub struct UserCache {
    inner: Arc<RwLock<HashMap<String, CachedUser>>>,
}

impl UserCache {
    fn lookup(&self, id: &str) -> Option<CachedUser> {
        self.inner.read().ok()?.get(id).cloned()
    }

    fn store(&self, id: &str, facts: Option<UserFacts>) {
        if let Ok(mut m) = self.inner.write() {
            if m.len() >= USER_CACHE_PRUNE_AT {
                m.retain(|_, e| e.loaded_at.elapsed() < USER_CACHE_TTL);
            }
            m.insert(
                id.to_string(),
                CachedUser {
                    facts,
                    loaded_at: Instant::now(),
                    refreshing: false,
                },
            );
        }
    }

    /// Records a user as it is now (after a create or an update).
    pub fn remember(&self, user: &User) {
        self.store(&user.id, Some(UserFacts::from(user)));
    }

    /// Records that a user no longer exists.
    pub fn forget(&self, id: &str) {
        self.store(id, None);
    }

    /// True for the one caller that should reload `id` ahead of its expiry.
    fn claim_refresh(&self, id: &str) -> bool {
        let Ok(mut m) = self.inner.write() else {
            return false;
        };
        match m.get_mut(id) {
            Some(e) if !e.refreshing => {
                e.refreshing = true;
                true
            }
            _ => false,
        }
    }

    /// The outcome of a reload ahead of expiry, unless a change through this node (which
    /// replaced the entry) came in meanwhile: what the reload read may predate it.
    fn refreshed(&self, id: &str, facts: Option<UserFacts>) {
        if let Ok(mut m) = self.inner.write() {
            if let Some(e) = m.get_mut(id).filter(|e| e.refreshing) {
                *e = CachedUser {
                    facts,
                    loaded_at: Instant::now(),
                    refreshing: false,
                };
            }
        }
    }

    /// Lets the next request try again after a reload ahead of expiry failed.
    fn refresh_failed(&self, id: &str) {
        if let Ok(mut m) = self.inner.write() {
            if let Some(e) = m.get_mut(id) {
                e.refreshing = false;
            }
        }
    }

    /// Reloads `id` in the background, the request that noticed it going on at once. Under
    /// steady traffic an entry is then never stale, and no request waits for the database (on
    /// a worker busy with WebSocket sessions, resuming after `web::block` can take as long as
    /// that worker's queue).
    fn refresh_ahead(&self, store: &crate::store::Store, id: &str) {
        if !self.claim_refresh(id) {
            return;
        }
        let (cache, store, id) = (self.clone(), store.clone(), id.to_string());
        actix_web::rt::spawn(async move {
            let lookup = {
                let (store, id) = (store.clone(), id.clone());
                web::block(move || store.get_user(&id)).await
            };
            match lookup {
                Ok(Ok(u)) => cache.refreshed(&id, Some(UserFacts::from(&u))),
                Ok(Err(StoreError::NotFound)) => cache.refreshed(&id, None),
                Ok(Err(e)) => {
                    log::warn!("user check ahead of expiry failed: {e}");
                    cache.refresh_failed(&id);
                }
                Err(_) => cache.refresh_failed(&id),
            }
        });
    }
}

fn revoked() -> ApiError {
    ApiError::unauthorized(
        "token_revoked",
        "this token's user was deleted, disabled or given another role; log in again",
    )
}

/// Refuses (401 `token_revoked`) an access token whose user has since been deleted, disabled or
/// given another role or account. Reads the cache, reloading an entry older than
/// `USER_CACHE_TTL` off the worker thread. While the database is unreachable a stale entry is
/// used rather than failing every request: it was right within the TTL of the outage.
pub async fn ensure_live(state: &AppState, claims: &AccessClaims) -> Result<(), ApiError> {
    let cached = state.users.lookup(&claims.sub);
    let facts = match cached {
        Some(c) if c.loaded_at.elapsed() < USER_CACHE_TTL => {
            if c.loaded_at.elapsed() >= USER_CACHE_TTL / 2 {
                state.users.refresh_ahead(&state.store, &claims.sub);
            }
            c.facts
        }
        stale => {
            let store = state.store.clone();
            let id = claims.sub.clone();
            match web::block(move || store.get_user(&id)).await? {
                Ok(u) => {
                    state.users.remember(&u);
                    Some(UserFacts::from(&u))
                }
                Err(StoreError::NotFound) => {
                    state.users.forget(&claims.sub);
                    None
                }
                Err(StoreError::Unavailable(m)) if stale.is_some() => {
                    log::warn!("user check from cache, database unavailable: {m}");
                    stale.and_then(|c| c.facts)
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    match facts {
        Some(f) if !f.disabled && f.role == claims.role && f.account_id == claims.acc => Ok(()),
        _ => Err(revoked()),
    }
}

// ---- shared bits ----

/// One audit entry to write beside a change, inside the same blocking call.
struct Audit<'a> {
    account: Option<&'a str>,
    actor: &'a str,
    action: &'static str,
    target: Option<&'a str>,
    ip: Option<&'a str>,
    /// A JSON object; never a secret or a password hash.
    detail: Value,
}

impl Audit<'_> {
    /// Appends the entry; a failure is logged, never fatal to the change already made.
    fn write(&self, store: &Store) {
        let detail = self.detail.to_string();
        let res = store.append_audit(&NewAuditLog {
            at: now_ms(),
            account_id: self.account,
            actor: Some(self.actor),
            action: self.action,
            target: self.target,
            ip: self.ip,
            detail: &detail,
        });
        if let Err(e) = res {
            log::warn!("could not write audit entry '{}': {e}", self.action);
        }
    }
}

fn user_json(u: &User) -> Value {
    json!({
        "id": u.id,
        "email": u.email,
        "role": u.role,
        "account_id": u.account_id,
        "created_at": u.created_at,
        "disabled": u.disabled,
    })
}

/// An account as owners see it: everything but its secrets.
fn validate_email(email: &str) -> Result<(), ApiError> {
    let ok = EMAIL_CHARS.contains(&email.chars().count())
        && email.len() <= MAX_EMAIL_BYTES
        && email.contains('@')
        && !email.chars().any(|c| c.is_control() || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_email",
            "email must be 3 to 320 characters with an '@' and no spaces or control characters",
        ))
    }
}

fn validate_password(password: &str) -> Result<(), ApiError> {
    if password.chars().count() >= MIN_PASSWORD_CHARS && password.len() <= MAX_PASSWORD_BYTES {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_password",
            "password must be 8 to 1024 characters",
        ))
    }
}

fn validate_role(role: &str) -> Result<(), ApiError> {
    if ROLES.contains(&role) {
        Ok(())
    } else {
        Err(ApiError::unprocessable(
            "invalid_role",
            "role must be admin, owner, member or viewer",
        ))
    }
}

fn hash(password: &str) -> Result<String, ApiError> {
    auth::hash_password(password).map_err(|e| {
        log::error!("password hashing failed: {e}");
        ApiError::internal()
    })
}

/// Pushes `account_update` (the account without its secrets) to the account's dashboard
/// followers. The one place to hang further reactions to an account change.
pub async fn account_changed(state: &AppState, account: &Account) {
    // New plan limits apply at once to new connections, rooms and pushes.
    let store = state.store.clone();
    let plan_id = account.plan_id.clone();
    match web::block(move || store.get_plan(&plan_id)).await {
        Ok(Ok(plan)) => state.usage.plan_changed(&account.id, plan),
        _ => log::warn!(
            "plan limits of {} not refreshed; they apply after the next restart",
            account.id
        ),
    }
    let resolved = state
        .registry
        .send(ResolveAccount {
            account: account.id.as_str().into(),
        })
        .await;
    match resolved {
        Ok(Ok(addr)) => addr.do_send(Notify {
            event: "account_update".into(),
            payload: account_json(account, false),
        }),
        _ => log::warn!(
            "account_update for {} not pushed: no account actor",
            account.id
        ),
    }
}

/// The user `id` if `caller` may manage it. 404 when there is no such user or it lies outside
/// the caller's reach (another account's user, or an admin, for anyone but an admin); 403 when
/// the user is in the caller's account but the caller is not its owner.
async fn managed_user(state: &Data, caller: &Caller, id: &str) -> Result<User, ApiError> {
    let store = state.store.clone();
    let uid = id.to_string();
    let user = match web::block(move || store.get_user(&uid)).await? {
        Ok(u) => u,
        Err(StoreError::NotFound) => return Err(ApiError::not_found("user")),
        Err(e) => return Err(e.into()),
    };
    if !caller.is_admin() {
        if user.role == "admin" || user.account_id.is_none() || user.account_id != caller.0.acc {
            return Err(ApiError::not_found("user"));
        }
        if caller.0.role != "owner" {
            return Err(ApiError::forbidden(
                "forbidden",
                "managing users needs the owner role",
            ));
        }
    }
    Ok(user)
}

/// The account a non-admin acts on: the one named, else their own; 404 for another account,
/// 403 for a role below owner.
fn own_account(caller: &Caller, named: Option<String>) -> Result<String, ApiError> {
    let account = named
        .or_else(|| caller.0.acc.clone())
        .ok_or_else(|| ApiError::not_found("account"))?;
    caller.manage(&account)?;
    Ok(account)
}

// ---- users ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    email: String,
    password: String,
    role: String,
    #[serde(default)]
    account_id: Option<String>,
}

/// `POST /users`: an admin creates any user; an owner creates owners, members and viewers of
/// their own account.
pub async fn create_user(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    body: web::Json<CreateUser>,
) -> Result<HttpResponse, ApiError> {
    let CreateUser {
        email,
        password,
        role,
        account_id,
    } = body.into_inner();
    let account = if caller.is_admin() {
        account_id
    } else {
        Some(own_account(&caller, account_id)?)
    };
    validate_email(&email)?;
    validate_password(&password)?;
    validate_role(&role)?;
    if role == "admin" {
        caller.admin()?;
        if account.is_some() {
            return Err(ApiError::unprocessable(
                "invalid_role",
                "an admin belongs to no account; omit account_id",
            ));
        }
    } else if account.is_none() {
        return Err(ApiError::unprocessable(
            "unknown_account",
            format!("role {role} needs an account_id"),
        ));
    }
    let st = state.clone();
    let actor = caller.0.sub.clone();
    let ip = client_ip(&state, &req);
    let user = web::block(move || -> Result<User, ApiError> {
        let password_hash = hash(&password)?;
        let id = store::new_id("usr_");
        let created = st.store.create_user(&NewUser {
            id: &id,
            email: &email,
            password_hash: &password_hash,
            role: &role,
            account_id: account.as_deref(),
            created_at: now_ms(),
        });
        let user = match created {
            Ok(u) => u,
            Err(StoreError::Conflict(_)) => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "email_taken",
                    "a user with this email exists",
                ))
            }
            Err(StoreError::NotFound) => {
                return Err(ApiError::unprocessable(
                    "unknown_account",
                    "no account with this account_id",
                ))
            }
            Err(e) => return Err(e.into()),
        };
        Audit {
            account: user.account_id.as_deref(),
            actor: &actor,
            action: "user_created",
            target: Some(&user.id),
            ip: ip.as_deref(),
            detail: json!({ "role": user.role }),
        }
        .write(&st.store);
        Ok(user)
    })
    .await??;
    state.users.remember(&user);
    Ok(HttpResponse::Created().json(user_json(&user)))
}

/// `GET /accounts/{id}/users`: the account's dashboard users, by email.
pub async fn list_users(
    state: Data,
    caller: Caller,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    caller.manage(&id)?;
    let store = state.store.clone();
    let found = web::block(move || {
        store.get_account(&id)?;
        store.list_users_by_email(&id)
    })
    .await?;
    match found {
        Ok(users) => {
            let list: Vec<Value> = users.iter().map(user_json).collect();
            Ok(HttpResponse::Ok().json(json!({ "users": list })))
        }
        Err(StoreError::NotFound) => Err(ApiError::not_found("account")),
        Err(e) => Err(e.into()),
    }
}

/// `DELETE /users/{userId}`: the user and (by cascade) its refresh tokens; its access tokens
/// are refused from now on.
pub async fn delete_user(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let target = managed_user(&state, &caller, &id).await?;
    if target.id == caller.0.sub {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cannot_delete_self",
            "you cannot delete your own user",
        ));
    }
    let st = state.clone();
    let actor = caller.0.sub.clone();
    let ip = client_ip(&state, &req);
    web::block(move || -> Result<(), ApiError> {
        match st.store.delete_user(&target.id) {
            Ok(()) => {}
            Err(StoreError::NotFound) => return Err(ApiError::not_found("user")),
            Err(e) => return Err(e.into()),
        }
        Audit {
            account: target.account_id.as_deref(),
            actor: &actor,
            action: "user_deleted",
            target: Some(&target.id),
            ip: ip.as_deref(),
            detail: json!({ "role": target.role }),
        }
        .write(&st.store);
        Ok(())
    })
    .await??;
    state.users.forget(&id);
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateUser {
    role: Option<String>,
    password: Option<String>,
    disabled: Option<bool>,
}

/// `PUT /users/{userId}`: role, password, disabled. A new password or disabling ends the
/// user's refresh-token families; a new role or disabling ends its access tokens.
pub async fn update_user(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<UpdateUser>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let UpdateUser {
        role,
        password,
        disabled,
    } = body.into_inner();
    let target = managed_user(&state, &caller, &id).await?;
    let is_self = target.id == caller.0.sub;
    if let Some(role) = &role {
        validate_role(role)?;
        if role == "admin" && !caller.is_admin() {
            return Err(ApiError::forbidden(
                "forbidden",
                "only an admin can grant the admin role",
            ));
        }
        if is_self && *role != target.role {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "cannot_change_own_role",
                "you cannot change your own role",
            ));
        }
        if (role == "admin") != (target.role == "admin") {
            return Err(ApiError::unprocessable(
                "invalid_role",
                "admins belong to no account and account users to one: a role cannot cross",
            ));
        }
    }
    if let Some(p) = &password {
        validate_password(p)?;
    }
    if disabled == Some(true) && is_self {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "cannot_disable_self",
            "you cannot disable your own user",
        ));
    }
    let st = state.clone();
    let actor = caller.0.sub.clone();
    let ip = client_ip(&state, &req);
    let changed = web::block(move || -> Result<_, ApiError> {
        let password_hash = password.as_deref().map(hash).transpose()?;
        let changes = UserChanges {
            role: role.as_deref(),
            password_hash: password_hash.as_deref(),
            disabled,
        };
        let changed = match st.store.update_user(&target.id, &changes, now_ms()) {
            Ok(c) => c,
            Err(StoreError::NotFound) => return Err(ApiError::not_found("user")),
            Err(e) => return Err(e.into()),
        };
        let (before, after) = (&changed.before, &changed.after);
        let audit = |action, detail| Audit {
            account: after.account_id.as_deref(),
            actor: &actor,
            action,
            target: Some(&after.id),
            ip: ip.as_deref(),
            detail,
        };
        if before.role != after.role {
            audit(
                "role_changed",
                json!({ "from": before.role, "to": after.role }),
            )
            .write(&st.store);
        }
        if password_hash.is_some() {
            audit("password_changed", json!({})).write(&st.store);
        }
        if before.disabled != after.disabled {
            let action = if after.disabled {
                "user_disabled"
            } else {
                "user_enabled"
            };
            audit(action, json!({})).write(&st.store);
        }
        Ok(changed.after)
    })
    .await??;
    state.users.remember(&changed);
    Ok(HttpResponse::Ok().json(user_json(&changed)))
}

// ---- accounts ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAccount {
    name: Option<String>,
    plan: Option<String>,
    settings: Option<Value>,
}

/// `PUT /account/{accountId}`: name, plan, settings; pushes `account_update` to followers.
pub async fn update_account(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Json<UpdateAccount>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    caller.manage(&id)?;
    let UpdateAccount {
        name,
        plan,
        settings,
    } = body.into_inner();
    if name
        .as_deref()
        .is_some_and(|n| !crate::http::api::valid_name(n))
    {
        return Err(ApiError::unprocessable(
            "invalid_name",
            "name must be 1 to 100 characters without control characters",
        ));
    }
    let settings = match settings {
        None => None,
        Some(v) if v.is_object() => {
            let text = v.to_string();
            if text.len() > MAX_SETTINGS_BYTES {
                return Err(ApiError::unprocessable(
                    "invalid_settings",
                    "settings must be at most 16 KiB of JSON",
                ));
            }
            Some(text)
        }
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_settings",
                "settings must be a JSON object",
            ))
        }
    };
    let st = state.clone();
    let actor = caller.0.sub.clone();
    let ip = client_ip(&state, &req);
    let account = web::block(move || -> Result<Account, ApiError> {
        if let Some(p) = &plan {
            match st.store.get_plan(p) {
                Ok(_) => {}
                Err(StoreError::NotFound) => {
                    return Err(ApiError::unprocessable(
                        "unknown_plan",
                        format!("no plan named '{p}'"),
                    ))
                }
                Err(e) => return Err(e.into()),
            }
        }
        let name = name.as_deref().map(str::trim);
        let changed = match st.store.update_account_tracked(
            &id,
            name,
            plan.as_deref(),
            settings.as_deref(),
            now_ms(),
        ) {
            Ok(c) => c,
            Err(StoreError::NotFound) => return Err(ApiError::not_found("account")),
            Err(e) => return Err(e.into()),
        };
        let (before, after) = (&changed.before, &changed.after);
        let fields: Vec<&str> = [
            ("name", name.is_some()),
            ("plan", plan.is_some()),
            ("settings", settings.is_some()),
        ]
        .iter()
        .filter(|(_, given)| *given)
        .map(|(f, _)| *f)
        .collect();
        let audit = |action, detail| Audit {
            account: Some(&after.id),
            actor: &actor,
            action,
            target: Some(&after.id),
            ip: ip.as_deref(),
            detail,
        };
        audit("account_updated", json!({ "fields": fields })).write(&st.store);
        if before.plan_id != after.plan_id {
            audit(
                "plan_changed",
                json!({ "from": before.plan_id, "to": after.plan_id }),
            )
            .write(&st.store);
        }
        Ok(changed.after)
    })
    .await??;
    account_changed(&state, &account).await;
    Ok(HttpResponse::Ok().json(account_json(&account, false)))
}

/// `POST /accounts/{id}/secret/rotate`: a new signing secret. The current one becomes the
/// previous secret, accepted for `auth.rotation_grace_s` more. Rotating again inside that grace
/// makes the then-current secret the previous one, and the one before it stops working at once:
/// there is one previous secret, not a chain.
pub async fn rotate_secret(
    state: Data,
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    caller.manage(&id)?;
    let st = state.clone();
    let actor = caller.0.sub.clone();
    let ip = client_ip(&state, &req);
    let grace_ms = (state.settings.auth.rotation_grace_s as i64).saturating_mul(1000);
    let account = web::block(move || -> Result<Account, ApiError> {
        let now = now_ms();
        let secret = auth::random_secret();
        let account = match st
            .store
            .rotate_secret(&id, &secret, now.saturating_add(grace_ms), now)
        {
            Ok(a) => a,
            Err(StoreError::NotFound) => return Err(ApiError::not_found("account")),
            Err(e) => return Err(e.into()),
        };
        Audit {
            account: Some(&account.id),
            actor: &actor,
            action: "secret_rotated",
            target: Some(&account.id),
            ip: ip.as_deref(),
            detail: json!({ "previous_expires_at": account.previous_secret_expires_at }),
        }
        .write(&st.store);
        Ok(account)
    })
    .await??;
    state
        .keyring
        .put(&account.id, crate::app::account_keys(&account));
    Ok(HttpResponse::Ok().json(json!({
        "signing_secret": account.signing_secret,
        "previous_expires_at": account.previous_secret_expires_at,
    })))
}

// ---- audit ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditParams {
    /// An account id; admins may omit it for every account, owners for their own.
    account: Option<String>,
    /// Unix ms, inclusive.
    from: Option<i64>,
    /// Unix ms, exclusive.
    to: Option<i64>,
    action: Option<String>,
    limit: Option<i64>,
    /// The last id of the previous page.
    cursor: Option<i64>,
}

fn audit_json(e: &AuditLog) -> Value {
    let detail = serde_json::from_str::<Value>(&e.detail)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    json!({
        "id": e.id,
        "at": e.at,
        "account_id": e.account_id,
        "actor": e.actor,
        "action": e.action,
        "target": e.target,
        "ip": e.ip,
        "detail": detail,
    })
}

/// `GET /audit`: newest first, a page at a time; `next_cursor` is null on the last page.
pub async fn list_audit(
    state: Data,
    caller: Caller,
    q: web::Query<AuditParams>,
) -> Result<HttpResponse, ApiError> {
    let q = q.into_inner();
    let account = if caller.is_admin() {
        q.account
    } else {
        Some(own_account(&caller, q.account)?)
    };
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_PAGE);
    if !(1..=MAX_AUDIT_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_limit",
            "limit must be 1 to 1000",
        ));
    }
    if let (Some(from), Some(to)) = (q.from, q.to) {
        if from >= to {
            return Err(ApiError::bad_request(
                "invalid_range",
                "from must be before to (unix milliseconds)",
            ));
        }
    }
    let query = AuditQuery {
        account_id: account,
        action: q.action,
        from_ms: q.from,
        to_ms: q.to,
        before_id: q.cursor,
        // One more than the page, to know whether another page follows.
        limit: limit + 1,
    };
    let store = state.store.clone();
    let mut rows = web::block(move || store.query_audit(&query)).await??;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().map(|e| e.id)
    } else {
        None
    };
    let entries: Vec<Value> = rows.iter().map(audit_json).collect();
    Ok(HttpResponse::Ok().json(json!({ "entries": entries, "next_cursor": next_cursor })))
}
