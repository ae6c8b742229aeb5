-- 044_matrix_notice_erasure.sql: a Matrix notice told is kept against
-- the homeserver's resends, its text only as long as content is.
--
-- A notice that answers something (a command's answer the homeserver did
-- not take at once, a refused event's "Not delivered", a withdrawn
-- consent request) is kept seven days once sent or given up (036, 038),
-- so that its transaction id or event id keeps a resent transaction from
-- telling it twice.  Its body went with it: who wrote to the user, whom
-- she accepted or blocked, her list of requests, kept seven days whatever
-- retention.content_days said (a review's finding in the forty-fifth
-- session).  The ids are what the row is kept for: its body may now be
-- NULL once it is done, and the Matrix bot erases it at content_days
-- (mx_bot.c, forget_handled; docs/operations.md, "Retention").  A notice
-- not done yet still has its text: it is still to be said.
ALTER TABLE matrix_notices ALTER COLUMN body DROP NOT NULL,
    ADD CONSTRAINT matrix_notices_body_kept_check CHECK (body IS NOT NULL OR done_at IS NOT NULL);
COMMENT ON COLUMN matrix_notices.body IS 'What is said (NULL: erased, retention.content_days after it was queued, once done).';
