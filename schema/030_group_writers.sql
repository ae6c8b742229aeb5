-- 030_group_writers.sql: a local member's message in a group is consent to
-- that group's members there, not everywhere (docs/policy.md, "Writing is
-- consent").
--
-- Until the twenty-first session a local user's message in a group stored
-- a consent `allowed` (and an opt-in) to every remote member of the room,
-- so one "hello all" let each of them start a direct conversation unasked
-- (spec: writing is consent "for that conversation").  Now a message in a
-- direct room stores those as before; one in a group sets wrote_at of the
-- writer's membership (again only when a remote member joined since: most
-- messages write nothing), and the messages there of the members who were
-- members by then (room_members.updated_at) are let through to the writer
-- (reason user_wrote_in_group), with no consent to anyone and none to a
-- member a peer adds later.  The submit path reads both with the
-- membership rows it reads anyway.
ALTER TABLE room_members ADD COLUMN wrote_at timestamptz;
COMMENT ON COLUMN room_members.wrote_at IS
    'A local member last wrote in this group to members new to them: those members'' messages reach them there (policy).';
