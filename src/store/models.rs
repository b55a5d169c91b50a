//! Rows of the store's tables as Rust structs: what queries return (`Plan`, `Account`, …) and
//! what inserts take (`NewAccount`, …).
//!
//! Structs holding a secret, a password hash or a token hash implement `Debug` by hand and print
//! `"[redacted]"` instead, so that a `{:?}` in a log line cannot leak them, and they do not derive
//! `Serialize`: the HTTP layer chooses what of them to show.

use std::fmt;

use diesel::prelude::*;

use super::schema::{accounts, audit_logs, plans, refresh_tokens, users};

/// What `Debug` prints in place of a secret.
const REDACTED: &str = "[redacted]";

fn redact_opt<T>(value: &Option<T>) -> Option<&'static str> {
    value.as_ref().map(|_| REDACTED)
}

/// A billing plan and its limits; the rows are seeded by the first migration.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable, serde::Serialize)]
#[diesel(table_name = plans, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Plan {
    /// `"free"`, `"pro"` or `"enterprise"`.
    pub id: String,
    /// Concurrent WebSocket connections across the account.
    pub max_connections: i64,
    pub max_rooms: i64,
    pub max_messages_per_day: i64,
}

/// A tenant: the customer whose backend mints end-user tokens with `signing_secret`.
#[derive(Clone, PartialEq, Eq, Queryable, Selectable, Identifiable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct Account {
    pub id: String,
    pub name: String,
    pub plan_id: String,
    /// HS256 key the customer signs end-user JWTs with.
    pub signing_secret: String,
    /// The key before the last rotation; still accepted until `previous_secret_expires_at`, so
    /// that tokens minted just before a rotation keep working.
    pub previous_signing_secret: Option<String>,
    /// Unix ms after which `previous_signing_secret` is no longer accepted.
    pub previous_secret_expires_at: Option<i64>,
    /// A JSON object, kept as text so both backends store it alike; `"{}"` when unset.
    pub settings: String,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Account {
    /// The previous signing secret if it is still inside its grace period at `now_ms`.
    pub fn previous_secret_at(&self, now_ms: i64) -> Option<&str> {
        match (
            &self.previous_signing_secret,
            self.previous_secret_expires_at,
        ) {
            (Some(secret), Some(expires_at)) if now_ms < expires_at => Some(secret),
            _ => None,
        }
    }
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("plan_id", &self.plan_id)
            .field("signing_secret", &REDACTED)
            .field(
                "previous_signing_secret",
                &redact_opt(&self.previous_signing_secret),
            )
            .field(
                "previous_secret_expires_at",
                &self.previous_secret_expires_at,
            )
            .field("settings", &self.settings)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// An account to create; ids come from [`super::new_id`], times are unix ms.
#[derive(Clone, Insertable)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct NewAccount<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// Must name an existing plan, or the insert fails with `StoreError::NotFound`.
    pub plan_id: &'a str,
    pub signing_secret: &'a str,
    /// A JSON object as text; pass `"{}"` for none.
    pub settings: &'a str,
    pub created_at: i64,
    pub updated_at: i64,
}

impl fmt::Debug for NewAccount<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewAccount")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("plan_id", &self.plan_id)
            .field("signing_secret", &REDACTED)
            .field("settings", &self.settings)
            .field("created_at", &self.created_at)
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// The fields `update_account` may change; `None` leaves a column as it is.
#[derive(AsChangeset)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub(crate) struct AccountChanges<'a> {
    pub name: Option<&'a str>,
    pub plan_id: Option<&'a str>,
    pub settings: Option<&'a str>,
    /// Always set, which also keeps the changeset from ever being empty.
    pub updated_at: i64,
}

/// A dashboard user: an admin (no account) or an owner, member or viewer of one account.
#[derive(Clone, PartialEq, Eq, Queryable, Selectable, Identifiable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct User {
    pub id: String,
    /// Stored lowercased, so that lookups are case-insensitive on both backends.
    pub email: String,
    /// A PHC string (argon2) made by the auth layer; the store never sees the password.
    pub password_hash: String,
    /// `"admin"`, `"owner"`, `"member"` or `"viewer"` (a CHECK constraint refuses others).
    pub role: String,
    /// `None` for admins, who see every account.
    pub account_id: Option<String>,
    pub created_at: i64,
    pub disabled: bool,
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("password_hash", &REDACTED)
            .field("role", &self.role)
            .field("account_id", &self.account_id)
            .field("created_at", &self.created_at)
            .field("disabled", &self.disabled)
            .finish()
    }
}

/// A user to create; `create_user` lowercases `email` before storing it. New users are enabled.
#[derive(Clone, Insertable)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct NewUser<'a> {
    pub id: &'a str,
    pub email: &'a str,
    pub password_hash: &'a str,
    pub role: &'a str,
    /// `None` for admins; otherwise an existing account, or the insert fails with `NotFound`.
    pub account_id: Option<&'a str>,
    pub created_at: i64,
}

impl fmt::Debug for NewUser<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewUser")
            .field("id", &self.id)
            .field("email", &self.email)
            .field("password_hash", &REDACTED)
            .field("role", &self.role)
            .field("account_id", &self.account_id)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// One refresh token of a rotation family. Only its hash is stored: a database leak must not
/// hand out live tokens.
#[derive(Clone, PartialEq, Eq, Queryable, Selectable, Identifiable)]
#[diesel(table_name = refresh_tokens, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct RefreshToken {
    pub id: String,
    pub user_id: String,
    /// Shared by every token descended from one login; reusing a spent token revokes the family.
    pub family_id: String,
    /// Lowercase hex SHA-256 of the token, computed by the caller.
    pub token_hash: String,
    pub issued_at: i64,
    pub expires_at: i64,
    /// Set when the token was exchanged for a new pair; a second use is theft.
    pub spent_at: Option<i64>,
    /// Set when its family was revoked (logout, reuse detected).
    pub revoked_at: Option<i64>,
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshToken")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("family_id", &self.family_id)
            .field("token_hash", &REDACTED)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("spent_at", &self.spent_at)
            .field("revoked_at", &self.revoked_at)
            .finish()
    }
}

/// A refresh token to store; it starts neither spent nor revoked.
#[derive(Clone, Insertable)]
#[diesel(table_name = refresh_tokens, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct NewRefreshToken<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub family_id: &'a str,
    /// Lowercase hex SHA-256 of the token.
    pub token_hash: &'a str,
    pub issued_at: i64,
    pub expires_at: i64,
}

impl fmt::Debug for NewRefreshToken<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewRefreshToken")
            .field("id", &self.id)
            .field("user_id", &self.user_id)
            .field("family_id", &self.family_id)
            .field("token_hash", &REDACTED)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Identifiable, serde::Serialize)]
#[diesel(table_name = audit_logs, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct AuditLog {
    /// Assigned by the database, increasing; breaks ties between entries of the same ms.
    pub id: i64,
    /// Unix ms.
    pub at: i64,
    /// The account acted upon; `None` for server-wide acts.
    pub account_id: Option<String>,
    /// Who acted: a user id, or `None` for the system or an unknown caller (a failed login).
    pub actor: Option<String>,
    /// snake_case verb: `login`, `login_failed`, `token_reuse`, `secret_rotated`, …
    pub action: String,
    pub target: Option<String>,
    pub ip: Option<String>,
    /// A JSON object as text.
    pub detail: String,
}

/// An audit entry to append; the database assigns its id.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = audit_logs, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct NewAuditLog<'a> {
    pub at: i64,
    pub account_id: Option<&'a str>,
    pub actor: Option<&'a str>,
    pub action: &'a str,
    pub target: Option<&'a str>,
    pub ip: Option<&'a str>,
    /// A JSON object as text; pass `"{}"` for none. Never put secrets here.
    pub detail: &'a str,
}
