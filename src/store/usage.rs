//! Usage per account per minute (`usage_metrics`) and plan alerts (`billing_alerts`).

use diesel::dsl::case_when;
use diesel::prelude::*;
use diesel::upsert::excluded;

use super::schema::{accounts, billing_alerts, plans, usage_metrics};
use super::{on_backend, rows_per_statement, write_transaction, Plan, Store, StoreError};

/// One account's usage in one minute (`minute` = unix ms of the minute's start).
#[derive(Debug, Clone, Default, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = usage_metrics, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct UsageRow {
    pub account_id: String,
    pub minute: i64,
    pub peak_connections: i64,
    pub connection_seconds: i64,
    pub messages_in: i64,
    pub messages_out: i64,
    pub joins: i64,
}

/// Sums over a range (peak is the maximum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UsageTotals {
    pub peak_connections: i64,
    pub connection_seconds: i64,
    pub messages_in: i64,
    pub messages_out: i64,
    pub joins: i64,
}

impl UsageTotals {
    pub fn add(&mut self, r: &UsageRow) {
        self.peak_connections = self.peak_connections.max(r.peak_connections);
        self.connection_seconds += r.connection_seconds;
        self.messages_in += r.messages_in;
        self.messages_out += r.messages_out;
        self.joins += r.joins;
    }
}

/// A plan alert that was sent.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, serde::Serialize)]
#[diesel(table_name = billing_alerts, check_for_backend(diesel::pg::Pg, diesel::sqlite::Sqlite))]
pub struct BillingAlert {
    #[serde(skip)]
    pub id: i64,
    #[serde(skip)]
    pub account_id: String,
    pub period: String,
    pub kind: String,
    pub threshold: i32,
    pub value: i64,
    pub limit_value: i64,
    pub at: i64,
}

#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = billing_alerts)]
pub struct NewBillingAlert<'a> {
    pub account_id: &'a str,
    pub period: &'a str,
    pub kind: &'a str,
    pub threshold: i32,
    pub value: i64,
    pub limit_value: i64,
    pub at: i64,
}

const USAGE_COLUMNS: usize = 7;

impl Store {
    /// Adds minute rows to what the table holds: sums add up (several nodes, or a minute written
    /// in two parts), the peak keeps the larger value. One transaction.
    pub fn add_usage(&self, rows: &[UsageRow]) -> Result<(), StoreError> {
        use usage_metrics::dsl as u;
        if rows.is_empty() {
            return Ok(());
        }
        self.with_conn(|conn| {
            let values: Vec<_> = rows
                .iter()
                .map(|r| {
                    (
                        u::account_id.eq(r.account_id.as_str()),
                        u::minute.eq(r.minute),
                        u::peak_connections.eq(r.peak_connections),
                        u::connection_seconds.eq(r.connection_seconds),
                        u::messages_in.eq(r.messages_in),
                        u::messages_out.eq(r.messages_out),
                        u::joins.eq(r.joins),
                    )
                })
                .collect();
            write_transaction(conn, |conn| {
                for chunk in values.chunks(rows_per_statement(conn, USAGE_COLUMNS)) {
                    on_backend!(&mut *conn, |c| diesel::insert_into(usage_metrics::table)
                        .values(chunk)
                        .on_conflict((u::account_id, u::minute))
                        .do_update()
                        .set((
                            u::peak_connections.eq(case_when(
                                excluded(u::peak_connections).gt(u::peak_connections),
                                excluded(u::peak_connections),
                            )
                            .otherwise(u::peak_connections)),
                            u::connection_seconds
                                .eq(u::connection_seconds + excluded(u::connection_seconds)),
                            u::messages_in.eq(u::messages_in + excluded(u::messages_in)),
                            u::messages_out.eq(u::messages_out + excluded(u::messages_out)),
                            u::joins.eq(u::joins + excluded(u::joins)),
                        ))
                        .execute(c))?;
                }
                Ok(())
            })
        })
    }

    /// Minute rows of one account with `from <= minute < to`, oldest first.
    pub fn usage_rows(
        &self,
        account_id: &str,
        from_ms: i64,
        to_ms: i64,
        limit: i64,
    ) -> Result<Vec<UsageRow>, StoreError> {
        use usage_metrics::dsl as u;
        self.with_conn(|conn| {
            Ok(usage_metrics::table
                .filter(u::account_id.eq(account_id))
                .filter(u::minute.ge(from_ms))
                .filter(u::minute.lt(to_ms))
                .order(u::minute.asc())
                .limit(limit)
                .select(UsageRow::as_select())
                .load(conn)?)
        })
    }

    /// Records an alert unless one for the same account, period, kind and threshold exists.
    /// Returns whether this call recorded it (so exactly one caller sends it).
    pub fn record_alert(&self, a: &NewBillingAlert) -> Result<bool, StoreError> {
        self.with_conn(|conn| {
            let n = on_backend!(conn, |c| diesel::insert_into(billing_alerts::table)
                .values(a)
                .on_conflict_do_nothing()
                .execute(c))?;
            Ok(n == 1)
        })
    }

    /// Alerts of one account at or after `since_ms`, newest first.
    pub fn list_alerts(
        &self,
        account_id: &str,
        since_ms: i64,
    ) -> Result<Vec<BillingAlert>, StoreError> {
        use billing_alerts::dsl as b;
        self.with_conn(|conn| {
            Ok(billing_alerts::table
                .filter(b::account_id.eq(account_id))
                .filter(b::at.ge(since_ms))
                .order(b::at.desc())
                .limit(1000)
                .select(BillingAlert::as_select())
                .load(conn)?)
        })
    }

    /// The plan an account is on, with its limits.
    pub fn account_plan(&self, account_id: &str) -> Result<Plan, StoreError> {
        self.with_conn(|conn| {
            Ok(accounts::table
                .inner_join(plans::table)
                .filter(accounts::id.eq(account_id))
                .select(Plan::as_select())
                .first(conn)?)
        })
    }

    /// Sets a plan's limits (the configurable `enterprise` plan, at start-up).
    pub fn set_plan_limits(&self, plan: &Plan) -> Result<(), StoreError> {
        use plans::dsl as p;
        self.with_conn(|conn| {
            let n = diesel::update(plans::table.find(&plan.id))
                .set((
                    p::max_connections.eq(plan.max_connections),
                    p::max_rooms.eq(plan.max_rooms),
                    p::max_messages_per_day.eq(plan.max_messages_per_day),
                ))
                .execute(conn)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            Ok(())
        })
    }
}
