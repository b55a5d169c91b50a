-- Pruning only looks for closed intervals: open ones (left_at NULL, most of the writes) need
-- no entry here. (SQLite's twin of this migration also makes presence_snapshots WITHOUT ROWID;
-- PostgreSQL's heap tables have no such choice.)
DROP INDEX presence_intervals_left_at_idx;
CREATE INDEX presence_intervals_left_at_idx ON presence_intervals (left_at)
    WHERE left_at IS NOT NULL;
