-- 009_media.sql: files of peers' users re-hosted on the homeserver.
--
-- A file attached to a peer's message is fetched from where the peer keeps
-- it and uploaded to the homeserver, so that a Matrix user sees it in the
-- room instead of a link into the gatekeeper's store (spec/adapters.md,
-- docs/matrix.md "Media").  What was uploaded is remembered here: a retry
-- of the row, or the same file sent again, is not fetched and uploaded a
-- second time.  sha256 is of the bytes fetched.
CREATE TABLE media_rehosted (
    network     text        NOT NULL,
    source      text        NOT NULL,
    sha256      text        NOT NULL,
    native_uri  text        NOT NULL,
    size        bigint      NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (network, source, sha256),
    CONSTRAINT media_rehosted_sha256_check CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    CONSTRAINT media_rehosted_size_check CHECK (size >= 0)
);
COMMENT ON TABLE media_rehosted IS 'Files fetched from a peer and uploaded to a local network (Matrix: their mxc:// URI), by source URL and content hash.';
