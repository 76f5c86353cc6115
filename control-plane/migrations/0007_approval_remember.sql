-- An egress approval may be remembered: `scope` names what it covers beyond
-- its one connection (the sandbox's action on a host and port), `remember`
-- says the approver chose so. Remembered approvals let later connections
-- of the same sandbox in the same scope go ahead for the sandbox's life.
ALTER TABLE approvals ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE approvals ADD COLUMN remember BIGINT NOT NULL DEFAULT 0;
CREATE INDEX approvals_remembered ON approvals (resource, scope) WHERE remember = 1;
