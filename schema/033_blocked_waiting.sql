-- 033_blocked_waiting.sql: a block finds the dead letters and failures
-- of the user who blocks.
--
-- A local user's block drops what its sender sent them and is not
-- delivered yet (docs/policy.md, "Consent and the sweep"), dead letters
-- and failures too: the operator could send them again after the block.
-- The sweep of every consent change, and the periodic sweep for blocks of
-- the last ten minutes, asks for such rows of the users who block: this
-- index holds only dead and failed rows with a user (a row enters it when
-- it dies, so writing and delivering rows pays nothing for it).  Pending
-- rows are found through the users' rooms (outbox_room_order_idx).
CREATE INDEX IF NOT EXISTS outbox_dead_target_idx ON outbox (target_identity_id)
    WHERE state IN ('dead', 'failed') AND target_identity_id IS NOT NULL;
