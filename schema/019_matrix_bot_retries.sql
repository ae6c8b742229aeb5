-- 019_matrix_bot_retries.sql: the bot's work that the homeserver could not
-- take is tried again.
--
-- An invitation of a ghost or of the bot is followed by a join; when the
-- homeserver did not answer it (down, restarting, 429, 5xx) the
-- invitation was dropped with the inbox row and the user's room waited
-- for a ghost that never came.  Such a row now stays: attempts counts the
-- tries, and not_before says when the next one is due (the bot's backoff,
-- mx_bot.c); the bot gives up after its last try.
ALTER TABLE matrix_bot_inbox
    ADD COLUMN attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN not_before timestamptz;
COMMENT ON COLUMN matrix_bot_inbox.attempts IS 'Tries that failed for want of an answer from the homeserver.';
COMMENT ON COLUMN matrix_bot_inbox.not_before IS 'When the next try is due (NULL: at once).';
