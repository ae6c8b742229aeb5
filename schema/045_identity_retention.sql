-- 045_identity_retention.sql: the indexes of the retention sweep's
-- forgetting of local identities nothing refers to (gateway/retention.c,
-- IDENTITY_UNUSED; docs/operations.md, "Retention").
--
-- A peer makes a local identity for any name of this provider it names
-- in a consent update, a block or a consent request held for it; until
-- the forty-sixth session nothing removed one, and a peer could grow the
-- table at policy.peer_updates_per_minute for months.  The sweep now
-- looks at the local identities a batch at a time, round the table, and
-- deletes those nothing refers to.
--
-- identities: the local ones in id order (the sweep's cursor), without
-- reading the remote users, who are most of the table.  Its cost: one
-- entry per local identity (a user of this provider), none for a
-- remote one.
CREATE INDEX IF NOT EXISTS identities_local_idx ON identities (id) WHERE is_local;

-- The references to an identity that had no index of their own: each
-- is read to find whether a row is used, and by the foreign key's
-- action (cascade, set null) of each row deleted, which without an
-- index reads the whole table once per identity deleted.  Written
-- rarely (a room binding per conversation, a report, a consent request
-- per first contact), so their cost is small.
CREATE INDEX IF NOT EXISTS room_bindings_local_identity_idx ON room_bindings (local_identity_id)
    WHERE local_identity_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS room_bindings_remote_identity_idx ON room_bindings (remote_identity_id)
    WHERE remote_identity_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS consent_requests_remote_idx ON consent_requests (remote_identity_id);
CREATE INDEX IF NOT EXISTS reports_subject_identity_idx ON reports (subject_identity_id)
    WHERE subject_identity_id IS NOT NULL;
