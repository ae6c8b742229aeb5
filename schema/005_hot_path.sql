-- 005_hot_path.sql: what every accepted message pays in PostgreSQL, cut.
--
-- Measured on the batch submit path (tests/bench/accept; 100 events per
-- statement): the writer's statement took 6.0 ms per 100 events; a quarter
-- of it was CHECK constraints of regular expressions, another quarter
-- foreign-key checks.  Both are below.
--
-- 1. The same CHECK constraints, written so PostgreSQL evaluates them an
-- order of magnitude faster.
--
-- PostgreSQL's regular expression engine expands a bounded repetition such
-- as [a-z0-9_-]{0,31} into a large automaton: one such check cost 8-10 us a
-- row, and the hot tables (events, outbox, idempotency_keys) evaluate one on
-- every insert and every update (a CHECK is evaluated on every new row
-- version, whatever column changed), which was a quarter of the writer's
-- time on the submit path.  Each constraint below accepts exactly the values
-- the one it replaces accepted: the repetition is unbounded in the pattern
-- and its bound is an octet_length() (the patterns allow ASCII only, so
-- octets are characters).  Same names, so errors read as before.  Tables an
-- operator or a user writes now and then (peers, rules, consents, reports,
-- admin_tokens) keep their original form.

ALTER TABLE identities DROP CONSTRAINT identities_domain_check,
    ADD CONSTRAINT identities_domain_check CHECK (domain = lower(domain) AND domain ~ '^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$' AND octet_length(domain) <= 253);

ALTER TABLE identities DROP CONSTRAINT identities_network_check,
    ADD CONSTRAINT identities_network_check CHECK (network ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(network, ':', 1)) <= 32 AND octet_length(network) <= octet_length(split_part(network, ':', 1)) + 254);

ALTER TABLE identity_bindings DROP CONSTRAINT identity_bindings_network_check,
    ADD CONSTRAINT identity_bindings_network_check CHECK (network ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(network, ':', 1)) <= 32 AND octet_length(network) <= octet_length(split_part(network, ':', 1)) + 254);

ALTER TABLE rooms DROP CONSTRAINT rooms_public_id_check,
    ADD CONSTRAINT rooms_public_id_check CHECK (public_id ~ '^[A-Za-z0-9._~-]+$' AND octet_length(public_id) <= 128);

ALTER TABLE rooms DROP CONSTRAINT rooms_hub_domain_check,
    ADD CONSTRAINT rooms_hub_domain_check CHECK (hub_domain = lower(hub_domain) AND hub_domain ~ '^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$' AND octet_length(hub_domain) <= 253);

ALTER TABLE room_members DROP CONSTRAINT room_members_role_check,
    ADD CONSTRAINT room_members_role_check CHECK (role ~ '^[a-z][a-z0-9_-]*$' AND octet_length(role) <= 32);

ALTER TABLE room_bindings DROP CONSTRAINT room_bindings_network_check,
    ADD CONSTRAINT room_bindings_network_check CHECK (network ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(network, ':', 1)) <= 32 AND octet_length(network) <= octet_length(split_part(network, ':', 1)) + 254);

ALTER TABLE events DROP CONSTRAINT events_public_id_check,
    ADD CONSTRAINT events_public_id_check CHECK (public_id ~ '^msg_[A-Za-z0-9_-]+$' AND octet_length(public_id) <= 68);

ALTER TABLE events DROP CONSTRAINT events_origin_network_check,
    ADD CONSTRAINT events_origin_network_check CHECK (origin_network ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(origin_network, ':', 1)) <= 32 AND octet_length(origin_network) <= octet_length(split_part(origin_network, ':', 1)) + 254);

ALTER TABLE event_native_ids DROP CONSTRAINT event_native_ids_network_check,
    ADD CONSTRAINT event_native_ids_network_check CHECK (network ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(network, ':', 1)) <= 32 AND octet_length(network) <= octet_length(split_part(network, ':', 1)) + 254);

ALTER TABLE event_native_ids DROP CONSTRAINT event_native_ids_kind_check,
    ADD CONSTRAINT event_native_ids_kind_check CHECK (kind ~ '^[a-z][a-z0-9_-]*$' AND octet_length(kind) <= 32);

ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_scope_check,
    ADD CONSTRAINT idempotency_keys_scope_check CHECK (scope ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(scope, ':', 1)) <= 32 AND octet_length(scope) <= octet_length(split_part(scope, ':', 1)) + 254);

ALTER TABLE outbox DROP CONSTRAINT outbox_destination_check,
    ADD CONSTRAINT outbox_destination_check CHECK (destination ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(destination, ':', 1)) <= 32 AND octet_length(destination) <= octet_length(split_part(destination, ':', 1)) + 254);

ALTER TABLE room_leases DROP CONSTRAINT room_leases_destination_check,
    ADD CONSTRAINT room_leases_destination_check CHECK (destination ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(destination, ':', 1)) <= 32 AND octet_length(destination) <= octet_length(split_part(destination, ':', 1)) + 254);

ALTER TABLE user_optin DROP CONSTRAINT user_optin_network_check,
    ADD CONSTRAINT user_optin_network_check CHECK (network ~ '^[a-z][a-z0-9_-]*(:[A-Za-z0-9._-]+)?$' AND octet_length(split_part(network, ':', 1)) <= 32 AND octet_length(network) <= octet_length(split_part(network, ':', 1)) + 254);

ALTER TABLE audit_log DROP CONSTRAINT audit_log_reason_code_check,
    ADD CONSTRAINT audit_log_reason_code_check CHECK (reason_code IS NULL OR (reason_code ~ '^[a-z][a-z0-9_]*$' AND octet_length(reason_code) <= 64));

-- 2. No foreign keys on the rows written for every message.  A foreign key
-- costs one trigger and one index probe with a row lock per inserted row:
-- seven per event here (events -> rooms, identities; outbox -> events,
-- rooms, identities; idempotency_keys -> events, rooms), and even a NULL
-- reference (events.replaces_id, in_reply_to_id) queues a trigger call.
-- These rows are written by one statement from ids it has just read or
-- inserted (a reference is looked up in the same room first), and Causeway
-- never deletes rooms, identities or events, so the checks only ever
-- confirmed what the statement knew.  A retention job must delete children
-- first (outbox, delivery_attempts, idempotency_keys, then events) and
-- clear references to what it deletes; docs/schema.md says so.  The
-- columns keep their indexes.  Foreign keys stay everywhere else (tables
-- written by operators, users and adapters now and then).
ALTER TABLE events DROP CONSTRAINT events_room_id_fkey,
    DROP CONSTRAINT events_sender_id_fkey,
    DROP CONSTRAINT events_replaces_id_fkey,
    DROP CONSTRAINT events_in_reply_to_id_fkey;

ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_fkey,
    DROP CONSTRAINT outbox_target_identity_id_fkey,
    DROP CONSTRAINT outbox_room_id_fkey;

ALTER TABLE idempotency_keys DROP CONSTRAINT idempotency_keys_event_id_fkey,
    DROP CONSTRAINT idempotency_keys_room_id_fkey;
