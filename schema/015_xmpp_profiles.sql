-- 015_xmpp_profiles.sql: a remote user's new avatar reaches the XMPP users
-- who have them as a contact.
--
-- XMPP clients learn that a contact's avatar changed from the SHA-1 in the
-- contact's presence (XEP-0153) and only then fetch the vCard again.  The
-- component sent that presence when asked (a probe, a subscription) with the
-- hash it had, so a peer's new profile (POST /v1/profiles) stayed unseen.
-- The process that holds a component's stream now follows the changes of
-- its peer's users' profiles (identities.profile_changed_at) and sends each
-- local contact a presence with the new hash.  Where it got to is kept per
-- component beside the roster's cursor, so that the next holder of the
-- stream goes on from there; the index finds the changes after the cursor.
ALTER TABLE xmpp_roster_sync ADD COLUMN profiles_at timestamptz;
ALTER TABLE xmpp_roster_sync ADD COLUMN profiles_id bigint;
COMMENT ON COLUMN xmpp_roster_sync.profiles_at IS 'With profiles_id: the (profile_changed_at, id) of the last remote user whose profile change the component has sent to its contacts.';
CREATE INDEX identities_profile_changed_idx ON identities (profile_changed_at, id)
    WHERE profile_changed_at IS NOT NULL;
