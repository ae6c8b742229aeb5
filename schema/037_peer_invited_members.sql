-- 037_peer_invited_members.sql: a local user a peer puts into a group is
-- invited, not joined, until she takes part herself (docs/policy.md,
-- "Local users a peer adds to a group").
--
-- Until the thirty-first session a peer's POST /v1/rooms or
-- POST /v1/rooms/{room}/members made any user of this provider a joined
-- member at once: the group's local members' messages reached her with no
-- decision of the policy (between two users of this provider), so a peer
-- could put a user who never opted in into a group and have the others
-- write to her (a portal, an XMPP invitation, named by the peer), and it
-- learned whether she existed and what she chose (her leaving was listed
-- `left`, a user who does not exist stayed `joined`).  Now she is
-- 'invited' with peer_invited set: the peer's users' messages are decided
-- for her as any inbound message (held, denied by her opt-in), the local
-- members' are not relayed to her, and she is joined once she joins the
-- portal or the chat room a message let through brought her.  Her leaving
-- while only invited is kept ('left', peer_invited still set) and shown to
-- the peers as 'invited', with no event.  A constant default: no rewrite
-- of the table.
ALTER TABLE room_members ADD COLUMN peer_invited boolean NOT NULL DEFAULT false;
COMMENT ON COLUMN room_members.peer_invited IS
    'A local member a peer added who has not taken part yet: invited (or declined, shown to peers as invited).';
