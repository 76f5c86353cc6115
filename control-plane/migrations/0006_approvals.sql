-- Human approvals: one row per `require_approval` decision. The action it
-- is good for is pinned by action_sha256; `used_by` makes it single use.
CREATE TABLE approvals (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    requested_by_token TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    owner TEXT NOT NULL,
    action TEXT NOT NULL,
    resource TEXT NOT NULL,
    summary TEXT NOT NULL,
    run_id TEXT NOT NULL,
    step BIGINT NOT NULL,
    action_sha256 TEXT NOT NULL,
    policy TEXT NOT NULL,
    policy_reason TEXT NOT NULL,
    policy_version BIGINT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    expires_unix_ms BIGINT NOT NULL,
    decided_by TEXT NOT NULL DEFAULT '',
    decision_reason TEXT NOT NULL DEFAULT '',
    decided_unix_ms BIGINT NOT NULL DEFAULT 0,
    used_by TEXT NOT NULL DEFAULT ''
);
CREATE INDEX approvals_state ON approvals (state, expires_unix_ms);
CREATE INDEX approvals_run ON approvals (run_id);
