-- Plan alerts: one row per account, period, limit and threshold, so an alert is sent once per
-- period even across restarts and nodes (the insert that wins the unique key sends it).
CREATE TABLE billing_alerts (
    id BIGSERIAL PRIMARY KEY,
    account_id TEXT NOT NULL,
    period TEXT NOT NULL,
    kind TEXT NOT NULL,
    threshold INTEGER NOT NULL,
    value BIGINT NOT NULL,
    limit_value BIGINT NOT NULL,
    at BIGINT NOT NULL,
    UNIQUE (account_id, period, kind, threshold)
);

-- Usage series are read per account over a time range.
CREATE INDEX usage_metrics_minute_idx ON usage_metrics (minute);
