-- 007_held_order.sql: the held rows indexed by user and room.
--
-- The dispatcher never claims a row while an earlier row of its room to the
-- same user is still held (per-room order against a consent sweep that
-- releases a backlog).  That probe runs per claimed row; with the index on
-- (target_identity_id, id) it read every held row of the user, so a
-- stranger who filled a user's held queue would have slowed every delivery
-- to that user.  With the room in the key it is one index descent.  The
-- sweep that releases or drops a user's held rows reads the same index
-- (a user's held rows, then sorted by id).
DROP INDEX outbox_held_idx;
CREATE INDEX outbox_held_idx ON outbox (target_identity_id, room_id, id) WHERE state = 'held';
