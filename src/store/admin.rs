//! What the account-administration API needs beyond plain CRUD: user changes that report the
//! row before and after (for the audit trail's `from`/`to`) and revoke refresh tokens in the
//! same transaction, account updates likewise, and the audit query with filters and a cursor.
//!
//! Every function here is written once against [`DbConn`] and runs on both backends.

use diesel::prelude::*;

use super::schema::{accounts, audit_logs, refresh_tokens, users};
use super::{find_account, write_transaction, Account, AuditLog, DbConn, Store, StoreError, User};

/// The fields `update_user` may change; `None` leaves a column as it is.
#[derive(Default, AsChangeset)]
#[diesel(table_name = users, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct UserChanges<'a> {
    pub role: Option<&'a str>,
    /// An argon2 PHC string, never a password.
    pub password_hash: Option<&'a str>,
    pub disabled: Option<bool>,
}

impl UserChanges<'_> {
    fn is_empty(&self) -> bool {
        self.role.is_none() && self.password_hash.is_none() && self.disabled.is_none()
    }

    /// A new password or a disabled account must end every session the user could renew.
    fn revokes_sessions(&self) -> bool {
        self.password_hash.is_some() || self.disabled == Some(true)
    }
}

/// The fields `update_account_tracked` may change; `None` leaves a column as it is.
#[derive(AsChangeset)]
#[diesel(table_name = accounts, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
struct AccountEdit<'a> {
    name: Option<&'a str>,
    plan_id: Option<&'a str>,
    settings: Option<&'a str>,
    /// Always set, which also keeps the changeset from ever being empty.
    updated_at: i64,
}

/// A row as it was before a change and as it is after.
#[derive(Debug, Clone)]
pub struct Changed<T> {
    pub before: T,
    pub after: T,
}

/// Which audit entries to read; `None` filters nothing.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    pub account_id: Option<String>,
    pub action: Option<String>,
    /// Unix ms, inclusive.
    pub from_ms: Option<i64>,
    /// Unix ms, exclusive.
    pub to_ms: Option<i64>,
    /// Only entries with an id below this one: the last id of the previous page.
    pub before_id: Option<i64>,
    pub limit: i64,
}

fn find_user(conn: &mut DbConn, id: &str) -> Result<User, StoreError> {
    Ok(users::table
        .find(id)
        .select(User::as_select())
        .first(conn)?)
}

impl Store {
    /// The dashboard users of one account ordered by email (emails are stored lowercased, so
    /// this is the same order on both backends).
    pub fn list_users_by_email(&self, account_id: &str) -> Result<Vec<User>, StoreError> {
        self.with_conn(|conn| {
            Ok(users::table
                .filter(users::account_id.eq(account_id))
                .select(User::as_select())
                .order((users::email.asc(), users::id.asc()))
                .load(conn)?)
        })
    }

    /// Changes a user and returns it before and after, in one transaction. A new password or
    /// disabling revokes every live refresh token of the user in that same transaction, so no
    /// refresh can slip in between. `NotFound` if there is no such user.
    pub fn update_user(
        &self,
        id: &str,
        changes: &UserChanges<'_>,
        now_ms: i64,
    ) -> Result<Changed<User>, StoreError> {
        self.with_conn(|conn| {
            write_transaction(conn, |conn| {
                let before = find_user(conn, id)?;
                if changes.is_empty() {
                    return Ok(Changed {
                        after: before.clone(),
                        before,
                    });
                }
                diesel::update(users::table.find(id))
                    .set(changes)
                    .execute(conn)?;
                if changes.revokes_sessions() {
                    diesel::update(
                        refresh_tokens::table
                            .filter(refresh_tokens::user_id.eq(id))
                            .filter(refresh_tokens::revoked_at.is_null()),
                    )
                    .set(refresh_tokens::revoked_at.eq(Some(now_ms)))
                    .execute(conn)?;
                }
                let after = find_user(conn, id)?;
                Ok(Changed { before, after })
            })
        })
    }

    /// Changes the given fields of an account (`None` leaves one alone), stamps `updated_at`, and
    /// returns the account before and after, in one transaction. `NotFound` if the account does
    /// not exist or (by its foreign key) the plan does not; callers that must tell these apart
    /// check the plan first (plans are seeded and never deleted).
    pub fn update_account_tracked(
        &self,
        id: &str,
        name: Option<&str>,
        plan_id: Option<&str>,
        settings: Option<&str>,
        now_ms: i64,
    ) -> Result<Changed<Account>, StoreError> {
        let edit = AccountEdit {
            name,
            plan_id,
            settings,
            updated_at: now_ms,
        };
        self.with_conn(|conn| {
            write_transaction(conn, |conn| {
                let before = find_account(conn, id)?;
                diesel::update(accounts::table.find(id))
                    .set(&edit)
                    .execute(conn)?;
                let after = find_account(conn, id)?;
                Ok(Changed { before, after })
            })
        })
    }

    /// Audit entries matching `q`, newest (highest id) first, at most `q.limit`. Ids grow with
    /// every append, so "below the last id seen" pages through the log without gaps or repeats
    /// even while entries are being added.
    pub fn query_audit(&self, q: &AuditQuery) -> Result<Vec<AuditLog>, StoreError> {
        self.with_conn(|conn| {
            let mut query = audit_logs::table
                .select(AuditLog::as_select())
                .order(audit_logs::id.desc())
                .limit(q.limit.max(0))
                .into_boxed();
            if let Some(account) = &q.account_id {
                query = query.filter(audit_logs::account_id.eq(account));
            }
            if let Some(action) = &q.action {
                query = query.filter(audit_logs::action.eq(action));
            }
            if let Some(from) = q.from_ms {
                query = query.filter(audit_logs::at.ge(from));
            }
            if let Some(to) = q.to_ms {
                query = query.filter(audit_logs::at.lt(to));
            }
            if let Some(before) = q.before_id {
                query = query.filter(audit_logs::id.lt(before));
            }
            Ok(query.load(conn)?)
        })
    }
}
