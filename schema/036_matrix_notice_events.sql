-- 036_matrix_notice_events.sql: a Matrix user is told once of an event of
-- theirs refused before the pipeline, however often its transaction comes.
--
-- A homeserver sends a transaction again when it did not get the answer
-- (a connection dropped, a crash after the commit); the daemon's memory
-- of answered transactions is lost with a restart, and the body differs
-- anyway (each event's unsigned.age).  An event refused before the
-- pipeline (too long, malformed, holding a NUL) is not stored, so each
-- sending made its notice again: two "Not delivered" for one message.  A
-- notice of such a refusal now names the event (its Matrix event_id,
-- unique: the insert is ON CONFLICT DO NOTHING), and it is kept once sent
-- (or given up), marked done_at, for seven days (mx_bot.c forgets it
-- then); other notices (dead letters, a report's answer) name none and
-- are deleted once sent, as before.  A small table (a notice lives until
-- the homeserver has it): the unique index is built at once.
ALTER TABLE matrix_notices ADD COLUMN event_id text, ADD COLUMN done_at timestamptz;
ALTER TABLE matrix_notices ADD CONSTRAINT matrix_notices_event_check CHECK (octet_length(event_id) BETWEEN 1 AND 255);
CREATE UNIQUE INDEX matrix_notices_event_idx ON matrix_notices (event_id);
-- forgetting the old done ones
CREATE INDEX matrix_notices_done_idx ON matrix_notices (done_at) WHERE done_at IS NOT NULL;
COMMENT ON COLUMN matrix_notices.event_id IS 'The Matrix event whose refusal the notice tells (NULL: another notice): told once.';
COMMENT ON COLUMN matrix_notices.done_at IS 'When a notice naming an event was sent or given up (NULL: not yet); kept seven days then.';
