-- 043_dead_columns.sql: two columns that nothing ever wrote or read.
--
-- rules.priority (001) was never set by any code, nor read: every row
-- held 0, and the most specific rule wins (docs/policy.md), not a number.
-- peers.hmac_secret_enc (001) was reserved for an HMAC shared secret that
-- was never implemented: peers sign with Ed25519 (RFC 9421) and nothing
-- wrote or read the column, NULL in every row.  Both only misled whoever
-- read the schema; dropping a column rewrites no table.
ALTER TABLE rules DROP COLUMN IF EXISTS priority;
ALTER TABLE peers DROP CONSTRAINT IF EXISTS peers_hmac_len;
ALTER TABLE peers DROP COLUMN IF EXISTS hmac_secret_enc;

-- rules.pattern's comment, which 001 set, still named matrix and xmpp
-- among a network rule's patterns; the admin API takes only peer:* and
-- peer:<name> since the thirtieth session (docs/schema.md, "rules").
COMMENT ON COLUMN rules.pattern IS 'domain: exact or *.example; network: peer:<name> or peer:* (the admin API takes no other since the thirtieth session); user: a mimi:// user URI.';
