-- 028_admin_lists.sql: the audit log's filters (GET /admin/v1/audit?actor=
-- and ?action=, docs/admin-api.md) in id order without reading the table.
--
-- The list is WHERE id > after ... ORDER BY id LIMIT n.  With an actor, or
-- an action the statistics call rare, the planner walked the primary key
-- and filtered, through every policy decision before the first match: 0.2
-- to 0.35 s at 600,000 rows, a review measured.  (actor, id) and (action,
-- id) hand out one actor's or one action's records in id order from the
-- cursor on; an action prefix (rule.) is read one matching action at a
-- time and merged (gateway/policy_admin.c).
--
-- audit_log is not the hot path: a row is written for a policy decision
-- that is not a plain allow and for an administrative change, not for
-- every message, so two more index entries a row cost little.
--
-- (action, id) replaces (action, at), which no statement needs: the list
-- never filtered by time, the statistics' time window (GET
-- /admin/v1/stats) takes audit_log_at_idx, and the XMPP component's read
-- of consent changes by id range (adapters/xmpp/xmpp_cmd.c) is served
-- better by (action, id).
DROP INDEX IF EXISTS audit_log_action_at_idx;
CREATE INDEX audit_log_action_id_idx ON audit_log (action, id);
CREATE INDEX audit_log_actor_id_idx ON audit_log (actor, id);
