-- 023_matrix_bot_handled.sql: an event the bot handled is not handled
-- again when the homeserver sends its transaction a second time.
--
-- A homeserver that did not get the answer to a transaction (a connection
-- dropped, the daemon crashed after its commit) sends the same txnId
-- again, as the Application Service API says it must; the daemon's memory
-- of answered transactions is lost with a restart, and the body differs
-- anyway (each event's unsigned.age).  The bot's inbox row was deleted
-- once handled, so the event went back into the inbox and a command ran
-- twice (a second report, a second answer).  A handled row now stays,
-- marked (its content emptied), and its event_id keeps the insert's ON
-- CONFLICT a no-op; the bot forgets such rows after seven days (mx_bot.c).
ALTER TABLE matrix_bot_inbox ADD COLUMN handled_at timestamptz;
-- the bot's work: the rows not handled
CREATE INDEX matrix_bot_inbox_due_idx ON matrix_bot_inbox (id) WHERE handled_at IS NULL;
-- forgetting the old handled ones
CREATE INDEX matrix_bot_inbox_handled_idx ON matrix_bot_inbox (handled_at) WHERE handled_at IS NOT NULL;
COMMENT ON TABLE matrix_bot_inbox IS 'Matrix events addressed to the gateway bot: waiting for it, or handled (kept a while so that a resent transaction does not run them again).';
COMMENT ON COLUMN matrix_bot_inbox.handled_at IS 'When the bot handled the event (NULL: not yet); the content is emptied then.';
