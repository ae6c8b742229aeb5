-- 054_blocked_drop_notices.sql: a local user hears of a message of hers
-- that waited for its peer and was dropped by her recipient's block.
--
-- Since the fifty-fifth session a remote user's block of a local one drops
-- her messages to his peer still waiting (the policy's recheck,
-- recipient_blocked_sender, details.by 'sweep'), and the content of one no
-- one else is to get is erased in the same statement.  Unlike a message she
-- writes after the block (refused at once, "Not delivered: this person
-- blocked you."), these went without a word: she believed them delivered or
-- on their way.  The adapters' look for dead letters to tell (013) now tells
-- these too, in the same way; the drop keeps here what the notice needs of
-- the content it erases, the first 60 characters of the text ('' when it
-- has none), and the look clears it as it marks the row told
-- (sender_told_at).  NULL for every other row: a drop at the decision,
-- whose writer was told then, a peer's user's row, an event that is not a
-- message or an edit.  The partial index holds only the rows owed a
-- notice, a handful between a drop and the next look (twice a second).
-- Nothing of it is shown outward: the peer and the admin API still see the
-- row dropped.
-- IF NOT EXISTS: on a large outbox the operator adds the column (no
-- rewrite) and builds the index CONCURRENTLY first (docs/operations.md).
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS sender_quote text;
CREATE INDEX IF NOT EXISTS outbox_dropped_untold_idx ON outbox (id) WHERE sender_quote IS NOT NULL;
COMMENT ON COLUMN outbox.sender_quote IS 'A local sender''s row dropped while it waited, by her recipient''s block: the start of its text (empty: none) for the notice that tells her, cleared when told.';
