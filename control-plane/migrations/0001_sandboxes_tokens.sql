-- Written in SQL that SQLite and PostgreSQL both accept.

CREATE TABLE instance (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    instance_id TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL
);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    owner TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    expires_unix_ms BIGINT NOT NULL DEFAULT 0,
    revoked_unix_ms BIGINT NOT NULL DEFAULT 0,
    created_by TEXT NOT NULL
);

-- owner is NULL while a sandbox waits in a warm pool.
CREATE TABLE sandboxes (
    id TEXT PRIMARY KEY,
    owner TEXT,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    container_id TEXT NOT NULL DEFAULT '',
    created_unix_ms BIGINT NOT NULL,
    expires_unix_ms BIGINT NOT NULL DEFAULT 0,
    idle_timeout_secs BIGINT NOT NULL DEFAULT 0,
    last_active_unix_ms BIGINT NOT NULL,
    from_snapshot TEXT NOT NULL DEFAULT '',
    pool_profile TEXT NOT NULL DEFAULT '',
    failure TEXT NOT NULL DEFAULT ''
);
CREATE INDEX sandboxes_owner ON sandboxes (owner);
CREATE INDEX sandboxes_pool ON sandboxes (pool_profile, state);

CREATE TABLE snapshots (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    sandbox_id TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    compression TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL
);
CREATE INDEX snapshots_sha256 ON snapshots (sha256);
