-- Messages, one row each: unique per room offset, and per message id. Times are unix ms.
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT    NOT NULL,
    namespace   TEXT    NOT NULL,
    room        TEXT    NOT NULL,
    "offset"    INTEGER NOT NULL,
    sender      TEXT    NOT NULL,
    event       TEXT    NOT NULL DEFAULT 'message',
    payload     TEXT    NOT NULL CHECK (json_valid(payload)),
    created_at  INTEGER NOT NULL,
    instance    TEXT,
    PRIMARY KEY (namespace, room, "offset")
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON messages (id);
CREATE INDEX IF NOT EXISTS messages_created_at ON messages (created_at);

CREATE VIEW IF NOT EXISTS room_stats AS
SELECT namespace, room, count(*) AS messages, max("offset") AS last_offset,
       datetime(max(created_at) / 1000, 'unixepoch') AS last_activity
FROM messages
GROUP BY namespace, room;
