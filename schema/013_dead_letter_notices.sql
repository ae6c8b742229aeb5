-- 013_dead_letter_notices.sql: a local user hears of a message of theirs
-- that became a dead letter.
--
-- A row to a peer that stays unreachable for the whole retry budget ends
-- 'dead' (replayable by the operator).  Its sender, a user of this provider,
-- was never told: as far as their client showed, it was sent.  The adapter of
-- their network now tells them (a notice from the ghost in Matrix, an error
-- of the original message in XMPP) and records when here, so that it is
-- told once, by one process; a replay clears it, so a second death is told
-- again.  The partial index keeps the adapters' look for untold ones cheap.
ALTER TABLE outbox ADD COLUMN sender_told_at timestamptz;
CREATE INDEX outbox_dead_untold_idx ON outbox (id) WHERE state = 'dead' AND sender_told_at IS NULL;
COMMENT ON COLUMN outbox.sender_told_at IS 'When the local sender of a dead letter was told it was not delivered.';
