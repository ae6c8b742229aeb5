-- 039_dead_target_order.sql: a user's dead letters and failures in order,
-- for the recheck after her opt-out.
--
-- An opt-out decides the user's waiting rows again (docs/policy.md,
-- "Consent and the sweep"), 500 a batch.  Until the thirty-second session
-- each batch read all of her waiting rows again and kept the 500 after
-- the last one's id (70 ms a batch at 100,000 of them: a pass was
-- quadratic in her backlog); now each batch goes on from where the last
-- one ended in an index's order: held rows in outbox_held_idx (user,
-- room, id), pending ones through her rooms in outbox_room_order_idx, and
-- dead and failed ones here, whose key was the user alone
-- (outbox_dead_target_idx, 033: a user's entries in no useful order).
-- The same rows as before (a row enters it when it dies or fails, so
-- writing and delivering rows pays nothing for it), under another name so
-- that it can be built first without a lock (docs/operations.md); the
-- block's sweep, which asked the old one for a user's rows, finds them
-- here as well.
CREATE INDEX IF NOT EXISTS outbox_dead_target_order_idx ON outbox (target_identity_id, room_id, id)
    WHERE state IN ('dead', 'failed') AND target_identity_id IS NOT NULL;
DROP INDEX IF EXISTS outbox_dead_target_idx;
