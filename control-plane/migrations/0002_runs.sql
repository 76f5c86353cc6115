-- Runs as an event log. SQL that SQLite and PostgreSQL both accept
-- (BYTEA has no special meaning to SQLite and stores blobs as they are).

CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    -- A projection of the log, kept with each append; the log is the truth.
    state TEXT NOT NULL,
    last_seq BIGINT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    UNIQUE (owner, idempotency_key)
);
CREATE INDEX runs_owner ON runs (owner, created_unix_ms);
CREATE INDEX runs_state ON runs (state);

CREATE TABLE run_events (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    unix_ms BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- Large payloads (output, input files), stored once by content.
CREATE TABLE blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    data BYTEA NOT NULL
);
