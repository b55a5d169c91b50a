DROP INDEX presence_intervals_left_at_idx;
CREATE INDEX presence_intervals_left_at_idx ON presence_intervals (left_at);

CREATE TABLE presence_snapshots_old (
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
INSERT INTO presence_snapshots_old
    SELECT node_id, account_id, session_id, user_id, phx_ref, status, device, online_at, meta,
           rooms, ghost_until, updated_at
    FROM presence_snapshots;
DROP TABLE presence_snapshots;
ALTER TABLE presence_snapshots_old RENAME TO presence_snapshots;
