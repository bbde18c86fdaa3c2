-- Messages, one row each: unique per room offset, and per message id.
CREATE TABLE IF NOT EXISTS messages (
    id          TEXT        NOT NULL,
    namespace   TEXT        NOT NULL,
    room        TEXT        NOT NULL,
    "offset"    BIGINT      NOT NULL,
    sender      TEXT        NOT NULL,
    event       TEXT        NOT NULL DEFAULT 'message',
    payload     JSONB       NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    instance    TEXT,
    PRIMARY KEY (namespace, room, "offset")
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON messages (id);
CREATE INDEX IF NOT EXISTS messages_created_at ON messages (created_at);

CREATE OR REPLACE VIEW room_stats AS
SELECT namespace, room, count(*) AS messages, max("offset") AS last_offset, max(created_at) AS last_activity
FROM messages
GROUP BY namespace, room;
