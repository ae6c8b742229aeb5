-- 027_media_by_signer.sql: a file re-hosted on the homeserver is reused
-- only for the peer it was fetched for.
--
-- A peer's file is fetched signed as Causeway when its host is under the
-- sending peer's domain (gateway/media.c media_fetch_peer): the store
-- gives it to Causeway on that peer's behalf.  media_rehosted was looked
-- up by network, source URL and checksum alone, so another peer naming
-- the very URL got the same mxc:// URI without any fetch, and its users
-- the first peer's private file (a confused deputy; a review's finding,
-- fixed in the twentieth session).  A row now says whom it was fetched
-- for: the sending peer's domain, the one that may have the fetch signed,
-- or '' for a sender of no peer (never signed); a lookup finds only rows
-- fetched for the same (adapters/matrix/mx_media.c).
--
-- A row from before says nothing of that: until the nineteenth session
-- every fetch was signed, whatever its host, and for whom is not known.
-- Such rows keep NULL, which no lookup matches: their file is fetched
-- again (and uploaded once more) when it is next sent, never handed to a
-- peer it may not belong to.  NULL cannot be in a primary key, so the key
-- becomes a unique constraint (NULLs distinct: old rows never collide
-- with new ones, which always say whom they were fetched for).
ALTER TABLE media_rehosted ADD COLUMN fetched_for text;
ALTER TABLE media_rehosted DROP CONSTRAINT media_rehosted_pkey;
ALTER TABLE media_rehosted ADD CONSTRAINT media_rehosted_key UNIQUE (network, source, fetched_for, sha256);
COMMENT ON TABLE media_rehosted IS 'Files fetched from a peer and uploaded to a local network (Matrix: their mxc:// URI), by source URL, whom they were fetched for and content hash.';
COMMENT ON COLUMN media_rehosted.fetched_for IS 'The domain of the peer the file was fetched for (whose hosts get the fetch signed), '''' for a sender of no peer; NULL: re-hosted before migration 027, for whom unknown, never reused.';
