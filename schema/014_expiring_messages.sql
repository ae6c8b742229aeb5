-- 014_expiring_messages.sql: messages that expire (content.expires, MIMI's
-- expiring messages) are taken back when their time comes.
--
-- A peer's user may send a message that should disappear (a gatekeeper's
-- disappearing messages): the neutral event carries content.expires, in
-- milliseconds since the epoch.  Until now the gateway stored and delivered
-- it like any other, and it stayed in the local user's Matrix room or XMPP
-- client for good.  The policy thread's sweep now finds expired messages
-- through this index: rows not yet delivered are expired, those delivered
-- to a local network get a delete event from the same sender (the adapters
-- redact or retract it), and the stored content is deleted.
--
-- event_expires() reads the time from a stored event; it is NULL for
-- anything but a plain integer, so that no stored value can make the index
-- (and with it an insert) fail.
CREATE FUNCTION event_expires(content jsonb) RETURNS bigint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN content->'content'->>'expires' ~ '^[0-9]{1,15}$'
                THEN (content->'content'->>'expires')::bigint END
$$;
CREATE INDEX events_expires_idx ON events (event_expires(content)) WHERE event_expires(content) IS NOT NULL;
COMMENT ON FUNCTION event_expires(jsonb) IS 'A stored event''s content.expires (ms since the epoch), or NULL.';
