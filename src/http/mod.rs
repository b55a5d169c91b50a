//! HTTP: the admin API under `/api/v1`, ops endpoints, and the WebSocket upgrade, all routed into
//! the actor tree through the shared `AppState`.

pub mod admin;
pub mod api;
pub mod error;
pub mod serve;
pub mod socket;

use std::sync::Arc;

use actix::Addr;
use actix_web::dev::Payload;
use actix_web::{web, FromRequest, HttpRequest};
use futures_util::future::LocalBoxFuture;

use presence_actors::presence::IdGen;
use presence_actors::registry::Registry;
use presence_actors::{EngineConfig, Metrics};

use crate::auth::{AccessClaims, AccountKeys, KeyRing, ServerKeys};
use crate::config::Settings;
use crate::store::Store;
use error::ApiError;

/// Largest JSON body the API accepts.
const MAX_JSON_BODY: usize = 64 * 1024;

/// What every handler may reach. Cheap to clone: everything is shared.
pub struct AppState {
    pub registry: Addr<Registry>,
    /// Live rooms' members, read in place by here-now.
    pub rooms: presence_actors::view::RoomDirectory,
    pub store: Store,
    pub keys: ServerKeys,
    pub keyring: KeyRing,
    pub ids: Arc<IdGen>,
    pub engine: Arc<EngineConfig>,
    pub settings: Arc<Settings>,
    pub metrics: Metrics,
    pub prometheus: prometheus::Registry,
    pub node: String,
    pub persistence: crate::persist::Persistence,
    pub usage: crate::usage::UsageBook,
    pub meter: Addr<crate::usage::UsageMeter>,
    pub rate: Arc<crate::limits::RateLimits>,
    /// Dashboard users as access tokens are checked against (deleted, disabled, role).
    pub users: admin::UserCache,
    /// Present when the node is part of a Redis cluster.
    pub cluster: Option<crate::cluster::Cluster>,
}

impl AppState {
    /// Reads an account's signing keys from the database (off the worker thread) and caches them.
    pub async fn load_account_keys(&self, account: &str) -> Result<Option<AccountKeys>, ApiError> {
        let store = self.store.clone();
        let id = account.to_string();
        let found = web::block(move || store.get_account(&id)).await?;
        match found {
            Ok(a) => {
                let keys = crate::app::account_keys(&a);
                self.keyring.put(account, keys.clone());
                Ok(Some(keys))
            }
            Err(crate::store::StoreError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The authenticated caller of the admin API (a server access token in `Authorization`).
#[derive(Debug, Clone)]
pub struct Caller(pub AccessClaims);

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.0.role == "admin"
    }

    /// May read `account`? Another account's resources are 404, never 403, so their existence
    /// does not leak.
    pub fn read(&self, account: &str) -> Result<(), ApiError> {
        if self.is_admin() || self.0.acc.as_deref() == Some(account) {
            Ok(())
        } else {
            Err(ApiError::not_found("account"))
        }
    }

    /// May manage `account` (owner or admin)?
    pub fn manage(&self, account: &str) -> Result<(), ApiError> {
        self.read(account)?;
        if self.is_admin() || self.0.role == "owner" {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "forbidden",
                "this needs the owner role",
            ))
        }
    }

    pub fn admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "forbidden",
                "this needs the admin role",
            ))
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Caller, ApiError>>;

    /// Verifies the bearer access token, then checks that its user still exists, is enabled
    /// and still has the token's role and account (`token_revoked` otherwise).
    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        use actix_web::HttpMessage;
        let state = req.app_data::<web::Data<AppState>>().cloned();
        // The rate-limit middleware has usually verified the token already.
        let verified = req.extensions().get::<Verified>().map(|v| v.0.clone());
        let token = bearer(req).map(str::to_string);
        Box::pin(async move {
            let state = state.ok_or_else(ApiError::internal)?;
            let claims = match (verified, token) {
                (Some(v), _) => v,
                (None, Some(t)) => state.keys.verify_access(&t),
                (None, None) => {
                    return Err(ApiError::unauthorized(
                        "missing_token",
                        "send Authorization: Bearer <access token>",
                    ))
                }
            }
            .map_err(ApiError::from_token)?;
            admin::ensure_live(&state, &claims).await?;
            Ok(Caller(claims))
        })
    }
}

/// The bearer token of a request, if any.
fn bearer(req: &HttpRequest) -> Option<&str> {
    req.headers()
        .get("authorization")
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
}

/// The outcome of verifying a request's bearer token, kept in its extensions so the token is
/// verified once per request (by the rate limiter), not again by `Caller`.
#[derive(Clone)]
struct Verified(Result<AccessClaims, crate::auth::TokenError>);

/// Per-IP and per-account request limits of the API (429 with `Retry-After`). The socket
/// upgrade has its own connect limits and is not counted here.
async fn api_rate_limit(
    req: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<actix_web::body::BoxBody>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    if let Some(state) = req.app_data::<web::Data<AppState>>() {
        if !req.path().ends_with("/websocket") {
            if let Some(ip) = state.rate.client_ip(req.request()) {
                state.rate.api_ip(ip).map_err(ApiError::throttled)?;
            }
            // Only a verified token names whose budget a request spends: a forged one cannot
            // exhaust another account's.
            if let Some(t) = bearer(req.request()) {
                let verified = state.keys.verify_access(t);
                if let Ok(c) = &verified {
                    let key = match &c.acc {
                        Some(a) => format!("acc:{a}"),
                        None => format!("user:{}", c.sub),
                    };
                    state.rate.api_account(&key).map_err(ApiError::throttled)?;
                }
                actix_web::HttpMessage::extensions_mut(&req).insert(Verified(verified));
            }
        }
    }
    next.call(req).await
}

/// Every route of the server.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(MAX_JSON_BODY)
            .error_handler(error::json_error),
    )
    .app_data(web::QueryConfig::default().error_handler(error::query_error))
    .app_data(web::PathConfig::default().error_handler(error::path_error))
    .configure(crate::dashboard::routes)
    .route("/healthz", web::get().to(api::healthz))
    .route("/readyz", web::get().to(api::readyz))
    .route("/metrics", web::get().to(api::metrics))
    .route("/socket/websocket", web::get().to(socket::upgrade))
    .service(
        web::scope("/api/v1")
            .wrap(actix_web::middleware::from_fn(api_rate_limit))
            .route("", web::get().to(api::index))
            .route("/", web::get().to(api::index))
            .route("/realtime/websocket", web::get().to(socket::upgrade))
            .route("/dashboard/{id}", web::get().to(api::dashboard))
            .route("/usage/{id}", web::get().to(api::usage))
            .route("/billing/{id}", web::get().to(api::billing))
            .route("/auth/login", web::post().to(api::login))
            .route("/auth/refresh", web::post().to(api::refresh))
            .route("/auth/logout", web::post().to(api::logout))
            .route("/accounts", web::get().to(api::list_accounts))
            .route("/accounts", web::post().to(api::create_account))
            .route("/accounts/{id}", web::get().to(api::get_account))
            .route("/accounts/{id}/users", web::get().to(admin::list_users))
            .route(
                "/accounts/{id}/secret/rotate",
                web::post().to(admin::rotate_secret),
            )
            .route("/account/{id}", web::put().to(admin::update_account))
            .route("/users", web::post().to(admin::create_user))
            .route("/users/{user}", web::put().to(admin::update_user))
            .route("/users/{user}", web::delete().to(admin::delete_user))
            .route("/audit", web::get().to(admin::list_audit))
            .route(
                "/accounts/{id}/presence",
                web::get().to(api::account_presence),
            )
            .route(
                "/accounts/{id}/presence/history",
                web::get().to(api::presence_history),
            )
            .route("/accounts/{id}/rooms", web::get().to(api::list_rooms))
            .route(
                "/accounts/{id}/rooms/{room}/presence",
                web::get().to(api::room_presence),
            )
            .route(
                "/accounts/{id}/users/{user}/presence",
                web::get().to(api::user_presence),
            )
            .route(
                "/accounts/{id}/sessions/{session}",
                web::delete().to(api::kick_session),
            )
            .default_service(web::to(api::not_found)),
    )
    .default_service(web::to(api::not_found));
}
