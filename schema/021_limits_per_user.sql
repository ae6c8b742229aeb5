-- 021_limits_per_user.sql: a domain or network rule's conversation and
-- consent limits keep meaning what they meant.
--
-- Until the seventeenth session new_conversations_per_hour and
-- consent_requests_per_day had a bucket per remote user under any rule; now
-- they bound the rule's whole subject (every user of a domain, all of a
-- network), as messages_per_minute does, and the per-user limit is
-- new_conversations_per_hour_per_user and consent_requests_per_day_per_user.
-- A gatekeeper's domain rule of 3 consent requests a day meant 3 per user:
-- read the new way it would allow 3 for the whole gatekeeper, so the limits
-- of rules that are not about one user move to their per-user names.  A
-- user rule's stay as they are and are copied to the per-user names too
-- (per user and the whole subject are the same there): each limit comes
-- from the most specific rule that sets it, and a user rule that lifted
-- its domain's limit for one user (10 new rooms an hour where the domain
-- allows 1) must lift the domain's per-user limit as well.
UPDATE rules
   SET limits = limits ||
                jsonb_strip_nulls(jsonb_build_object(
                    'new_conversations_per_hour_per_user', limits -> 'new_conversations_per_hour',
                    'consent_requests_per_day_per_user', limits -> 'consent_requests_per_day'))
 WHERE scope = 'user'
   AND (limits ? 'new_conversations_per_hour' OR limits ? 'consent_requests_per_day');
UPDATE rules
   SET limits = (limits - 'new_conversations_per_hour' - 'consent_requests_per_day') ||
                jsonb_strip_nulls(jsonb_build_object(
                    'new_conversations_per_hour_per_user', limits -> 'new_conversations_per_hour',
                    'consent_requests_per_day_per_user', limits -> 'consent_requests_per_day'))
 WHERE scope <> 'user'
   AND (limits ? 'new_conversations_per_hour' OR limits ? 'consent_requests_per_day');
COMMENT ON COLUMN rules.limits IS 'messages_per_minute, messages_per_minute_per_user, new_conversations_per_hour, new_conversations_per_hour_per_user, consent_requests_per_day, consent_requests_per_day_per_user, max_body_bytes, max_attachment_bytes, content_kinds (array).';
