-- 008_xmpp_roster.sql: how far each XMPP component has followed the
-- operator's consent changes into its users' rosters.
--
-- When the operator blocks or revokes a contact for a local user (admin
-- API), the component's remote JID sends the user `unsubscribe` and
-- `unsubscribed` so that the roster follows (docs/xmpp.md).  The changes are
-- read from audit_log; the last entry handled used to be kept in memory
-- only, so a change made while no process held the component's stream was
-- never sent.  Kept here, the process that next takes the stream starts
-- where the last one stopped.
CREATE TABLE xmpp_roster_sync (
    component   text        PRIMARY KEY,
    audit_id    bigint      NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT xmpp_roster_sync_audit_id_check CHECK (audit_id >= 0)
);
COMMENT ON TABLE xmpp_roster_sync IS 'Per XMPP component: the audit_log id up to which the operator''s consent changes reached the rosters.';
