-- 010_peer_event_types.sql: the event types a peer takes.
--
-- spec/policy.md: a local block is delivered to the peer as a block event
-- "where the peer supports it"; a peer on an older profile, or one without
-- typing or receipts, may refuse a batch holding a type it does not know,
-- and a refused batch holds back the messages in it.  NULL: every type of
-- the profile (what peers had before).  Rows of other types are not sent to
-- that peer (docs/interop-api.md, "Delivery to a peer").
ALTER TABLE peers ADD COLUMN event_types text[];
ALTER TABLE peers ADD CONSTRAINT peers_event_types_check CHECK (
    event_types IS NULL OR (
        'message' = ANY (event_types)
        AND event_types <@ ARRAY['message', 'edit', 'delete', 'reaction', 'receipt', 'typing', 'membership',
                                 'block']::text[]
        AND cardinality(event_types) <= 8));
COMMENT ON COLUMN peers.event_types IS 'The neutral event types this peer takes (NULL: all); others are not sent to it.';
