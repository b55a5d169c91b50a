DROP INDEX presence_intervals_left_at_idx;
CREATE INDEX presence_intervals_left_at_idx ON presence_intervals (left_at);
