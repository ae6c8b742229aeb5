-- 056_matrix_bot_command_runs.sql: the Matrix bot's note of a command's
-- first run, kept on its inbox row, so that a run again after a restart
-- takes the first run's answers.
--
-- A command whose inbox row's handled mark was lost (its statement failed,
-- or the process stopped between the command's effect and the mark) runs
-- again at the bot's next look.  Since the sixtieth session a run again
-- took the first run's answers of the user's rate limits (her commands'
-- bucket, her changes') from a note in memory (mx_bot.c, struct
-- command_runs); a restart, or the bot's lock taken by another process,
-- lost it: a change refused as too many ran after the restart, and a
-- change allowed took a second token of her changes' bucket (the next
-- one refused).  The note is now written to the row: the commands'
-- bucket's answer and a refused change before the command's effect, an
-- allowed change inside the change's own transaction (noted if and only
-- if the change is committed: a failed change is charged again at its
-- run again); NULL until its first run asked the bucket, cleared with the
-- row's handled mark (a handled row never runs again), the row itself
-- forgotten seven days after it was handled, as before (forget_handled):
-- so it is bounded by the unhandled rows.  Two nullable columns, no
-- rewrite of the table.
ALTER TABLE matrix_bot_inbox
    ADD COLUMN IF NOT EXISTS command_allowed boolean,
    ADD COLUMN IF NOT EXISTS change_allowed smallint;
COMMENT ON COLUMN matrix_bot_inbox.command_allowed IS 'A command''s first run: whether her commands'' bucket allowed it (NULL: not run yet, or handled).';
COMMENT ON COLUMN matrix_bot_inbox.change_allowed IS 'A change''s first run: 1 allowed by her changes'' bucket, -1 refused, 0 not asked or its token given back (NULL: not run yet, or handled).';
