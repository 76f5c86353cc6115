-- Labels of runs, one row each, so List can filter on them in SQL (before
-- paging); and run secrets, sealed (see control-plane/src/runs/sealed.rs),
-- deleted when the run finishes.

CREATE TABLE run_labels (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX run_labels_key_value ON run_labels (key, value);

CREATE TABLE run_secrets (
    run_id TEXT PRIMARY KEY,
    sealed BYTEA NOT NULL
);
