-- Every policy set ever put in force; the highest version is in force.
CREATE TABLE policies (
    version BIGINT PRIMARY KEY,
    source TEXT NOT NULL,
    set_by TEXT NOT NULL,
    set_unix_ms BIGINT NOT NULL
);
