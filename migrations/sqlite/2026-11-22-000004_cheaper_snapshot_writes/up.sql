-- Cheaper snapshot ticks (each tick rewrites thousands of these rows under churn).
--
-- presence_snapshots becomes a WITHOUT ROWID table: a row is stored in its primary key's
-- b-tree instead of a rowid table plus a separate key index, so an upsert touches one b-tree,
-- and the snapshot writer's slices (sessions in key order) touch neighbouring pages.
CREATE TABLE presence_snapshots_new (
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
) WITHOUT ROWID;
INSERT INTO presence_snapshots_new
    SELECT node_id, account_id, session_id, user_id, phx_ref, status, device, online_at, meta,
           rooms, ghost_until, updated_at
    FROM presence_snapshots;
DROP TABLE presence_snapshots;
ALTER TABLE presence_snapshots_new RENAME TO presence_snapshots;

-- Pruning only looks for closed intervals: open ones (left_at NULL, most of the writes) need
-- no entry here.
DROP INDEX presence_intervals_left_at_idx;
CREATE INDEX presence_intervals_left_at_idx ON presence_intervals (left_at)
    WHERE left_at IS NOT NULL;
