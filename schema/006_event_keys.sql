-- 006_event_keys.sql: an accepted event carries its own idempotency key.
--
-- Every submitted event had a row in idempotency_keys besides its row in
-- events: one more heap tuple, three more index entries and a jsonb answer
-- per event, 13 us of the writer's statement per event (a third of it).  Yet
-- the key is the event's identifier on its origin: (origin_network,
-- origin_native_id) already holds the Matrix event id and the XMPP stanza id
-- under a unique index, and for a peer the key is the only id it gives.  So
-- the key goes there for peers too, with the hash of the request beside it
-- (the same key with another body is refused), and the answer to replay is
-- made from the event itself (its public id and acceptance time).
-- idempotency_keys keeps what is not an event: room creation.
ALTER TABLE events ADD COLUMN request_hash bytea,
    ADD CONSTRAINT events_request_hash_len CHECK (request_hash IS NULL OR octet_length(request_hash) = 32);

COMMENT ON COLUMN events.request_hash IS 'SHA-256 of the submitting request (room and event), for the idempotency check.';
COMMENT ON COLUMN events.origin_native_id IS 'The event''s id on its origin: a Matrix event id, an XMPP stanza id, a peer''s Idempotency-Key; unique per origin_network.';

-- The keys of events accepted before: onto their events, then gone.
UPDATE events e SET origin_native_id = k.key, request_hash = k.request_hash
    FROM idempotency_keys k
    WHERE k.event_id = e.id AND k.scope = e.origin_network
      AND (e.origin_native_id IS NULL OR e.origin_native_id = k.key);

DELETE FROM idempotency_keys k USING events e
    WHERE k.event_id = e.id AND k.scope = e.origin_network AND e.origin_native_id = k.key;
