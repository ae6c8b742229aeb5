-- 020_signature_nonces.sql: a signature's nonce is used once across every
-- daemon process, for the requests that change something without an
-- idempotency key.
--
-- Each process keeps the nonces it has seen in memory (the fast check of
-- every signed request).  Behind a load balancer a request captured on
-- its way to one process could be replayed to another within the clock
-- skew window: a consent grant after its revocation, a second room, a
-- second report.  A state-changing request that no idempotency key makes
-- repeatable (everything but messages, batches, receipts and typing)
-- claims its nonce here in the transaction of its write; a nonce already
-- claimed is a replay (401 bad_signature).  Rows older than the skew
-- window can never be claimed again: each claim deletes its peer's stale
-- ones, so the table holds about one window's worth of such requests.
CREATE TABLE signature_nonces (
    peer_id  bigint NOT NULL REFERENCES peers (id) ON DELETE CASCADE,
    nonce    text   NOT NULL,
    created  bigint NOT NULL,
    PRIMARY KEY (peer_id, nonce)
);
CREATE INDEX signature_nonces_stale ON signature_nonces (peer_id, created);
COMMENT ON TABLE signature_nonces IS 'Nonces of signed state-changing peer requests, to refuse replays across processes.';
COMMENT ON COLUMN signature_nonces.created IS 'The signature''s created parameter (Unix seconds).';
