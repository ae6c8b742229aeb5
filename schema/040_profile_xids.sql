-- 040_profile_xids.sql: a remote user's profile change found by its
-- transaction, so that one committed late is not passed over.
--
-- The process that holds an XMPP component's stream sends the local
-- contacts of the peer's users whose profile changed after its cursor
-- (015).  That cursor was the change's time, profile_changed_at: the
-- start of the transaction that made it, not its commit.  A transaction
-- of another process that began first and committed after a later change
-- had been sent (its writer waiting for a lock more than the 3 seconds the
-- component waited) was behind the cursor, and its change never reached
-- the contacts.  Now each change also records the id of its transaction
-- (pg_current_xact_id(), as a bigint), and the component reads the changes
-- in (profile_xid, id) order only below the oldest transaction still open
-- (docs/xmpp.md): every change below that has committed, or never will.
-- The component's cursor is kept in profiles_xid/profiles_xid_id
-- (profiles_at/profiles_id are no longer written).  Changes made before
-- this migration have no profile_xid and are not announced again: the
-- contacts' next probe gets them.
ALTER TABLE identities ADD COLUMN IF NOT EXISTS profile_xid bigint;
COMMENT ON COLUMN identities.profile_xid IS 'The id of the transaction (pg_current_xact_id()) that last changed the profile (profile_changed_at): the order in which the XMPP component announces changes.';
ALTER TABLE xmpp_roster_sync ADD COLUMN profiles_xid bigint;
ALTER TABLE xmpp_roster_sync ADD COLUMN profiles_xid_id bigint;
COMMENT ON COLUMN xmpp_roster_sync.profiles_xid IS 'With profiles_xid_id: the (profile_xid, id) of the last remote user whose profile change the component has sent to its contacts.';
CREATE INDEX IF NOT EXISTS identities_profile_xid_idx ON identities (profile_xid, id)
    WHERE profile_xid IS NOT NULL;
DROP INDEX IF EXISTS identities_profile_changed_idx;
