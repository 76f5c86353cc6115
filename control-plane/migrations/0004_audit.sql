-- The audit log: a hash chain (see control-plane/src/audit.rs) and signed
-- checkpoints of its tail.

CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    unix_ms BIGINT NOT NULL,
    -- The entry's canonical encoding, the text that is hashed.
    body TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);

CREATE TABLE audit_checkpoints (
    seq BIGINT PRIMARY KEY,
    hash TEXT NOT NULL,
    unix_ms BIGINT NOT NULL,
    signature TEXT NOT NULL
);
