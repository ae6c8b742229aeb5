-- 017_group_portals.sql: a group room reaches a Matrix user as a Matrix
-- room of its own (a "portal"), no longer as labelled messages in the
-- direct rooms of its senders.
--
-- One portal per (group, local user): the policy decides for each local
-- recipient (a sender one user accepted may still be waiting for another's
-- consent), so each user's room holds exactly what was let through for
-- them.  The bot makes the portal and invites the user; each remote member
-- that speaks there is invited by the bot and joins as its ghost.  A portal
-- is a room binding with the local user and no remote one.
--
-- A group may have a name (POST /v1/rooms "name"): the portals' name, the
-- XMPP room's subject.
ALTER TABLE rooms ADD COLUMN name text;
ALTER TABLE rooms ADD CONSTRAINT rooms_name_check CHECK (name IS NULL OR octet_length(name) BETWEEN 1 AND 255);
COMMENT ON COLUMN rooms.name IS 'A group''s name as its creator gave it (NULL: none).';
ALTER TABLE room_bindings DROP CONSTRAINT room_bindings_dm_pair;
ALTER TABLE room_bindings ADD CONSTRAINT room_bindings_pair_or_portal
    CHECK (remote_identity_id IS NULL OR local_identity_id IS NOT NULL);
-- delivery: (group, local user) -> their portal, one each
CREATE UNIQUE INDEX room_bindings_portal_key ON room_bindings (network, room_id, local_identity_id)
    WHERE local_identity_id IS NOT NULL AND remote_identity_id IS NULL;
-- the group's name as its portal was last given it (a rename reaches the
-- portal with the group's next message)
ALTER TABLE room_bindings ADD COLUMN name_synced text;
COMMENT ON TABLE room_bindings IS 'Native room id of a room per network (Matrix room id, XMPP 1:1 pair): a direct room per (local user, remote user), a group portal per (group, local user) with no remote user.';

-- The ghosts that joined a portal (invited by the bot, then joined), so
-- that a sender's next message there goes straight out.  The binding's
-- deletion (the user left) takes them along.
CREATE TABLE matrix_portal_members (
    binding_id   bigint      NOT NULL REFERENCES room_bindings (id) ON DELETE CASCADE,
    identity_id  bigint      NOT NULL REFERENCES identities (id) ON DELETE CASCADE,
    joined_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT matrix_portal_members_pkey PRIMARY KEY (binding_id, identity_id)
);
-- identity deletion cascade
CREATE INDEX matrix_portal_members_identity_idx ON matrix_portal_members (identity_id);
COMMENT ON TABLE matrix_portal_members IS 'Remote users whose Matrix ghost has joined a group portal (room_bindings with no remote user).';
