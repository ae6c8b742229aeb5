-- 012_direct_rooms.sql: a local user's native direct room with a remote user
-- is bound to a direct neutral room of the two, never to a group.
--
-- Group rooms are not bridged as groups (docs/matrix.md, docs/xmpp.md): a
-- group's message reaches a local user in the native direct room with its
-- sender (one per pair, whichever room the message came from).  The binding
-- of that native room used to be made with the room of the first message
-- delivered, so when that was a group, what the user then wrote there -- to
-- one person, as far as their client showed -- went to the whole group.
--
-- direct_room_of(room, local, remote, hub) is room itself when it is a
-- direct room (the room of the message being delivered), else the pair's
-- direct room: the oldest room of kind direct with both as members, or a
-- new one hosted here (hub: this provider's domain) with both joined.  Two callers for the same pair
-- take turns (a transaction-level advisory lock; the two-key form, whose
-- key space no single-key lock of the daemon shares).  The bindings made
-- with a group before this migration are moved onto it.
CREATE FUNCTION direct_room_of(room bigint, l bigint, r bigint, hub text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    rid bigint;
    pub text;
BEGIN
    IF EXISTS (SELECT 1 FROM rooms WHERE id = room AND kind = 'direct') THEN
        RETURN room;
    END IF;
    PERFORM pg_advisory_xact_lock(1667, hashtext(l::text || '/' || r::text));
    SELECT m1.room_id INTO rid FROM room_members m1
      JOIN room_members m2 ON m2.room_id = m1.room_id AND m2.identity_id = r
      JOIN rooms x ON x.id = m1.room_id AND x.kind = 'direct'
     WHERE m1.identity_id = l ORDER BY m1.room_id LIMIT 1;
    IF rid IS NOT NULL THEN
        RETURN rid;
    END IF;
    pub := 'r_' || rtrim(translate(encode(uuid_send(gen_random_uuid()), 'base64'), '+/', '-_'), '=');
    INSERT INTO rooms (public_id, uri, hub_domain, kind)
    VALUES (pub, 'mimi://' || hub || '/r/' || pub, hub, 'direct') RETURNING id INTO rid;
    INSERT INTO room_members (room_id, identity_id, membership) VALUES (rid, l, 'joined'), (rid, r, 'joined');
    RETURN rid;
END
$$;
COMMENT ON FUNCTION direct_room_of(bigint, bigint, bigint, text) IS
    'room when direct, else the direct room of a local and a remote user: the oldest one, or a new one hosted at hub.';

UPDATE room_bindings b
   SET room_id = direct_room_of(NULL, b.local_identity_id, b.remote_identity_id, i.domain)
  FROM rooms x, identities i
 WHERE x.id = b.room_id AND x.kind <> 'direct' AND b.local_identity_id IS NOT NULL
   AND i.id = b.local_identity_id;
