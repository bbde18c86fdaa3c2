-- Offsets count within an epoch: a room's offsets start over under a new epoch (Redis
-- history expiring, an instance serving alone while Redis is away), so rows are unique per
-- (namespace, room, epoch, offset). Rows stored before this migration keep the empty epoch.
ALTER TABLE messages ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
ALTER TABLE messages DROP CONSTRAINT messages_pkey;
ALTER TABLE messages ADD PRIMARY KEY (namespace, room, epoch, "offset");
