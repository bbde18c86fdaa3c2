-- Offsets count within an epoch: a room's offsets start over under a new epoch (a new
-- process in embedded mode, Redis history expiring, an instance serving alone while Redis is
-- away), so rows are unique per (namespace, room, epoch, offset). Rows stored before this
-- migration keep the empty epoch.
DROP VIEW IF EXISTS room_stats;

CREATE TABLE messages_by_epoch (
    id          TEXT    NOT NULL,
    namespace   TEXT    NOT NULL,
    room        TEXT    NOT NULL,
    epoch       TEXT    NOT NULL DEFAULT '',
    "offset"    INTEGER NOT NULL,
    sender      TEXT    NOT NULL,
    event       TEXT    NOT NULL DEFAULT 'message',
    payload     TEXT    NOT NULL CHECK (json_valid(payload)),
    created_at  INTEGER NOT NULL,
    instance    TEXT,
    PRIMARY KEY (namespace, room, epoch, "offset")
);
INSERT INTO messages_by_epoch (id, namespace, room, epoch, "offset", sender, event, payload, created_at, instance)
SELECT id, namespace, room, '', "offset", sender, event, payload, created_at, instance FROM messages;
DROP TABLE messages;
ALTER TABLE messages_by_epoch RENAME TO messages;
CREATE UNIQUE INDEX messages_id ON messages (id);
CREATE INDEX messages_created_at ON messages (created_at);

CREATE VIEW room_stats AS
SELECT namespace, room, count(*) AS messages, max("offset") AS last_offset,
       datetime(max(created_at) / 1000, 'unixepoch') AS last_activity
FROM messages
GROUP BY namespace, room;
