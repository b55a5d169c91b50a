//! Account administration. For now: the liveness check that makes an access token die with its
//! user (deleted, disabled, or given another role).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix_web::web;

use crate::auth::AccessClaims;
use crate::http::error::ApiError;
use crate::http::AppState;
use crate::store::{StoreError, User};

/// How long a cached user stands for the database before the next request reloads it. Changes
/// made through this node update the cache at once; this bounds how long another node's change
/// takes to reach this one.
const USER_CACHE_TTL: Duration = Duration::from_secs(5);
/// Past this many cached users, entries older than the TTL are dropped.
const USER_CACHE_PRUNE_AT: usize = 100_000;

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
        Some(c) if c.loaded_at.elapsed() < USER_CACHE_TTL => c.facts,
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
