-- 016_matrix_notices.sql: the notices that tell a Matrix user their message
-- was not delivered are kept until the homeserver has them.
--
-- When a local user's message goes nowhere (refused by the policy for every
-- recipient, too large, rate limited) or becomes a dead letter, the
-- gateway tells them in the room, as the remote user's ghost.  Those
-- notices waited in the memory of the process that made them: a restart,
-- or a homeserver that failed the send once, and the user never heard.
-- Now each is a row until the send succeeds (the bot of the process that
-- holds its advisory lock sends them, with a transaction id of the row's,
-- so a send repeated after a lost answer is one message); a failed send is
-- tried again later, and a notice still unsent after a day is given up.
CREATE TABLE matrix_notices (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room_id     text        NOT NULL,
    body        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    tries       integer     NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT matrix_notices_room_check CHECK (octet_length(room_id) BETWEEN 1 AND 255),
    CONSTRAINT matrix_notices_body_check CHECK (octet_length(body) BETWEEN 1 AND 4096),
    CONSTRAINT matrix_notices_tries_check CHECK (tries >= 0)
);
CREATE INDEX matrix_notices_due_idx ON matrix_notices (next_at);
COMMENT ON TABLE matrix_notices IS 'Notices for Matrix users (a message of theirs not delivered) until the homeserver took them.';
