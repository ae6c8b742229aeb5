-- 038_matrix_notice_senders.sql: what the Matrix bot (or a room's ghost)
-- says is queued, when the homeserver does not take it now (a 429, a 5xx,
-- no answer), with who says it, the transaction id of its first try, and
-- whether the sender leaves the room once it is said.
--
-- Until the thirty-second session a queued word was sent by the room's
-- ghost or the bot (the room's binding said which), with a transaction id
-- of the row's own: a word of another sender was lost, and a command's
-- answer queued after a 429 went out under another id than the command's,
-- so that a command run again after a crash (before its inbox row was
-- marked) was answered twice.  A word said just before its sender leaves
-- the room could not be queued at all (the leave would come first): a 429
-- asking more than 2 s lost it.  Now the row names its sender, keeps the
-- transaction id made from what it answers (unique: queued once; kept
-- seven days once sent, done_at, as a row naming an event is), and
-- then_leave has the sender leave once the word is said (or given up).
-- A small table (a notice lives until the homeserver has it): the unique
-- index is built at once.
ALTER TABLE matrix_notices ADD COLUMN sender text, ADD COLUMN txn_id text,
    ADD COLUMN then_leave boolean NOT NULL DEFAULT false;
ALTER TABLE matrix_notices ADD CONSTRAINT matrix_notices_sender_check CHECK (octet_length(sender) BETWEEN 1 AND 255),
    ADD CONSTRAINT matrix_notices_txn_check CHECK (octet_length(txn_id) BETWEEN 1 AND 255),
    ADD CONSTRAINT matrix_notices_leave_check CHECK (NOT then_leave OR sender IS NOT NULL);
CREATE UNIQUE INDEX matrix_notices_txn_idx ON matrix_notices (txn_id);
COMMENT ON COLUMN matrix_notices.sender IS 'Who says it (the bot''s Matrix id for the bot; NULL: the room''s ghost, else the bot).';
COMMENT ON COLUMN matrix_notices.txn_id IS 'The transaction id of its sends, made from what it answers (NULL: cwnotice-<id>); queued once.';
COMMENT ON COLUMN matrix_notices.then_leave IS 'The sender leaves the room once the notice is said or given up.';
