-- Reverses up.sql.
DROP TABLE usage_metrics;
DROP TABLE presence_intervals;
DROP TABLE presence_samples;
DROP TABLE presence_snapshots;
