-- Presence history, SQLite flavour. Keep the columns identical to the other backend's copy of
-- this migration: one src/store/schema.rs serves both. Timestamps are unix ms (BIGINT), ids
-- TEXT, JSON kept as TEXT. No foreign keys: these tables are written in bulk every snapshot
-- interval and pruned by age, and presence may name accounts the node has not loaded.

-- The presence this node holds, one row per session; replaced every snapshot interval and
-- restored at start-up. The primary key's leading node_id serves the load by node.
CREATE TABLE presence_snapshots (
    node_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    phx_ref TEXT NOT NULL,
    status TEXT NOT NULL,
    device TEXT,
    online_at BIGINT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}',
    rooms TEXT NOT NULL DEFAULT '[]',
    ghost_until BIGINT,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (node_id, session_id)
);

-- Occupancy over time per node, account and room ('' = the whole account). Raw rows have the
-- snapshot interval as resolution; pruning folds old ones into rollup buckets.
CREATE TABLE presence_samples (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    node_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    room TEXT NOT NULL DEFAULT '',
    at BIGINT NOT NULL,
    resolution_ms BIGINT NOT NULL,
    users BIGINT NOT NULL,
    connections BIGINT NOT NULL
);

-- history_samples: one account and room over a time range.
CREATE INDEX presence_samples_account_room_at_idx ON presence_samples (account_id, room, at);
-- Pruning: samples older than the rollup horizon.
CREATE INDEX presence_samples_at_idx ON presence_samples (at);
-- Downsampling: raw rows (resolution below the bucket) older than the raw horizon, found without
-- walking the rollup rows that share their time range.
CREATE INDEX presence_samples_resolution_at_idx ON presence_samples (resolution_ms, at);

-- Who was in which room (or, with room '', in the account) when: one row per session and room,
-- open (left_at NULL) while the session is there.
CREATE TABLE presence_intervals (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    node_id TEXT NOT NULL,
    account_id TEXT NOT NULL,
    room TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    joined_at BIGINT NOT NULL,
    left_at BIGINT
);

-- intervals_at: one account and room, joined before a time.
CREATE INDEX presence_intervals_account_room_joined_idx
    ON presence_intervals (account_id, room, joined_at);
-- Closing a session's (or a session's room's) open intervals on this node.
CREATE INDEX presence_intervals_open_idx
    ON presence_intervals (node_id, session_id) WHERE left_at IS NULL;
-- Pruning closed intervals by age.
CREATE INDEX presence_intervals_left_at_idx ON presence_intervals (left_at);

-- Usage per account per minute (minute = unix ms at the minute's start), for billing.
CREATE TABLE usage_metrics (
    account_id TEXT NOT NULL,
    minute BIGINT NOT NULL,
    peak_connections BIGINT NOT NULL DEFAULT 0,
    connection_seconds BIGINT NOT NULL DEFAULT 0,
    messages_in BIGINT NOT NULL DEFAULT 0,
    messages_out BIGINT NOT NULL DEFAULT 0,
    joins BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account_id, minute)
);
