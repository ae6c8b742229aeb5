-- 011_profiles.sql: what a peer says of its users (POST /v1/profiles).
--
-- The issue of the Matrix adapter: a ghost's display name and avatar come
-- from the peer's profile, with the network named.  display_name was in
-- 001 but nothing wrote it.  avatar is the attachment object the peer gave
-- (an image, fetched and re-hosted by the local network's adapter);
-- profile_changed_at moves only when the profile changed, and a binding's
-- profile_synced_at says up to which change the local network's copy (the
-- Matrix ghost's profile) was brought.
ALTER TABLE identities ADD COLUMN avatar jsonb;
ALTER TABLE identities ADD COLUMN profile_changed_at timestamptz;
ALTER TABLE identities ADD CONSTRAINT identities_avatar_check
    CHECK (avatar IS NULL OR (jsonb_typeof(avatar) = 'object' AND octet_length(avatar::text) <= 4096));
ALTER TABLE identity_bindings ADD COLUMN profile_synced_at timestamptz;
COMMENT ON COLUMN identities.avatar IS 'A remote user''s avatar as its peer gave it: {content_type, url, size, sha256?}.';
COMMENT ON COLUMN identity_bindings.profile_synced_at IS 'The profile_changed_at of the identity last brought to this network (a ghost''s name and avatar).';
