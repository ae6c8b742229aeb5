-- 034_xmpp_ids_per_sender.sql: an XMPP id may name several events.
--
-- XMPP stanza ids are unique only per sender (RFC 6120 §8.1.3: per
-- stream even), and the XMPP adapter stores them as "<room id>/<id>"
-- (docs/xmpp.md, "Ids").  With one row per native id the first message
-- of a group's room with an id kept it: another member's message with
-- the same id, or the same sender's later one (a client that counts its
-- ids from 1 on every connection), had none, and until the twenty-third
-- session a reference then found the other member's message.  The key
-- now takes the event in: each message keeps its ids, and the adapter
-- picks the referring sender's own, newest first.  Matrix event ids are
-- unique by construction: one row each, as before.  The old key's
-- columns lead the new one, so the lookups by native id keep their index.
ALTER TABLE event_native_ids DROP CONSTRAINT event_native_ids_pkey,
    ADD CONSTRAINT event_native_ids_pkey PRIMARY KEY (network, kind, native_id, event_id);
