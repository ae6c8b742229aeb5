-- 041_matrix_notices_waiting_room.sql: the notices still waiting in a
-- Matrix room, found by the room.
--
-- Since the thirty-eighth session the notices of one room go out in the
-- order they were queued (docs/matrix.md): the bot's turn takes a due
-- notice only when no older one of its room waits, a word said at once
-- is queued behind those waiting in its room, and a consent request is
-- shown only when none waits there.  Each asks for the waiting rows of
-- one room; sent ones are kept seven days (036, 038), so without this
-- index each ask would read them all.
CREATE INDEX IF NOT EXISTS matrix_notices_waiting_room_idx ON matrix_notices (room_id, id) WHERE done_at IS NULL;
COMMENT ON INDEX matrix_notices_waiting_room_idx IS 'Notices not yet sent or given up, by room: those of one room go out in the order they were queued.';
