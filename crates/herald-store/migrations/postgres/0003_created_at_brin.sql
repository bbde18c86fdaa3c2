-- `created_at` serves time-range scans: retention (`DELETE … WHERE created_at < …`) and the
-- last activity in `room_stats`. Rows arrive in time order, so a BRIN index answers those
-- scans while costing a small fraction of a btree on every insert (the worker's COPY of a
-- batch updated three btrees per row; now two).
DROP INDEX IF EXISTS messages_created_at;
CREATE INDEX IF NOT EXISTS messages_created_at ON messages USING brin (created_at);
