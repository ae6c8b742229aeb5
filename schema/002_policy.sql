-- 002_policy.sql: what the policy engine needs beyond 001 (see docs/policy.md).

-- The sweep looks for local users whose consents changed in the last minutes
-- (held messages decided with the snapshot of just before the change).
CREATE INDEX consents_updated_idx ON consents (updated_at);

-- Automatic limits after abuse reports, and their defaults.
INSERT INTO settings (key, value, updated_by) VALUES
    ('policy.report_limit_threshold',           '3',      'migration:002'),
    ('policy.report_window_seconds',            '86400',  'migration:002'),
    ('policy.report_limit_messages_per_minute', '1',      'migration:002'),
    ('policy.report_limit_seconds',             '86400',  'migration:002');

-- Rules made by the system (report limits) are found by their creator.
COMMENT ON COLUMN rules.created_by IS 'admin:<token name>, or system:reports for an automatic limit after abuse reports.';
