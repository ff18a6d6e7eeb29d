-- keygate keystore, version 3: key lifecycle.
-- * master_keys: how to reconnect to a master (provider settings as JSON,
--   never a secret: PINs and credentials stay in files/env named there) and
--   which one is active (new keys are wrapped under it; a master rotation
--   moves every stored key to it).
-- * tenants.rotate_every_secs: the auto-rotation period, if any.
-- * kek_usage: issue and unwrap counters per KEK version per hour, so an
--   operator can see when a version is safe to retire.
-- * approvals: destructive requests under two-person control.

ALTER TABLE master_keys ADD COLUMN config TEXT;
ALTER TABLE master_keys ADD COLUMN active INTEGER NOT NULL DEFAULT 0 CHECK (active IN (0, 1));
CREATE UNIQUE INDEX master_keys_one_active ON master_keys (active) WHERE active = 1;

ALTER TABLE tenants ADD COLUMN rotate_every_secs INTEGER CHECK (rotate_every_secs > 0);

CREATE TABLE kek_usage (
    tenant          TEXT    NOT NULL,
    version         INTEGER NOT NULL,
    hour            INTEGER NOT NULL,
    issued          INTEGER NOT NULL DEFAULT 0,
    unwraps         INTEGER NOT NULL DEFAULT 0,
    last_unwrap_at  INTEGER,
    PRIMARY KEY (tenant, version, hour)
) STRICT;

CREATE TABLE approvals (
    id             TEXT    PRIMARY KEY,
    action         TEXT    NOT NULL CHECK (action IN ('shred')),
    tenant         TEXT    NOT NULL REFERENCES tenants (id),
    version        INTEGER CHECK (version >= 1),
    reason         TEXT    NOT NULL,
    requested_by   TEXT    NOT NULL,
    requested_at   INTEGER NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'rejected', 'executed')),
    decided_by     TEXT,
    decided_at     INTEGER,
    comment        TEXT,
    execute_after  INTEGER,
    executed_at    INTEGER,
    -- Two-person control is a database rule too.
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
) STRICT;

CREATE INDEX approvals_by_state ON approvals (state, requested_at);
