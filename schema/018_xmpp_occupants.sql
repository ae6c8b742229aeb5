-- 018_xmpp_occupants.sql: who is in the XMPP component's group rooms, kept
-- where the next holder of the component's stream finds it.
--
-- The stream's holder keeps the occupants in memory and writes them here
-- within a second of a change (the whole set of its component, rewritten:
-- at most 10,000 rows, and joins are rare).  A process that takes the
-- stream over (the holder crashed, or lost its database connection) reads
-- them back, so the clients in rooms keep getting the rooms' messages
-- without joining again.  A daemon that stops tells each occupant that
-- the service is going (XEP-0045 status 332) and empties the set.
CREATE TABLE xmpp_muc_occupants (
    component text NOT NULL,
    room text NOT NULL,
    full_jid text NOT NULL,
    nick text NOT NULL,
    user_jid text NOT NULL,
    PRIMARY KEY (component, room, full_jid),
    CONSTRAINT xmpp_muc_occupants_sizes CHECK (octet_length(room) <= 3071 AND octet_length(full_jid) <= 3071
        AND octet_length(nick) <= 1023 AND octet_length(user_jid) <= 3071)
);
COMMENT ON TABLE xmpp_muc_occupants IS 'The XMPP group rooms'' occupants of a component (full JID, nick, its user''s bare JID), as its stream''s holder last wrote them; read by the next holder.';
