-- keygate keystore, version 3: key lifecycle (PostgreSQL; the same schema
-- as SQLite's). See the SQLite migration for what each part is for.

ALTER TABLE master_keys ADD COLUMN config TEXT;
ALTER TABLE master_keys ADD COLUMN active BOOLEAN NOT NULL DEFAULT false;
CREATE UNIQUE INDEX master_keys_one_active ON master_keys (active) WHERE active;

ALTER TABLE tenants ADD COLUMN rotate_every_secs BIGINT CHECK (rotate_every_secs > 0);

CREATE TABLE kek_usage (
    tenant          TEXT    COLLATE "C" NOT NULL,
    version         BIGINT  NOT NULL,
    hour            BIGINT  NOT NULL,
    issued          BIGINT  NOT NULL DEFAULT 0,
    unwraps         BIGINT  NOT NULL DEFAULT 0,
    last_unwrap_at  BIGINT,
    PRIMARY KEY (tenant, version, hour)
);

CREATE TABLE approvals (
    id             TEXT    COLLATE "C" PRIMARY KEY,
    action         TEXT    NOT NULL CHECK (action IN ('shred')),
    tenant         TEXT    COLLATE "C" NOT NULL REFERENCES tenants (id),
    version        BIGINT  CHECK (version >= 1),
    reason         TEXT    NOT NULL,
    requested_by   TEXT    NOT NULL,
    requested_at   BIGINT  NOT NULL,
    state          TEXT    NOT NULL CHECK (state IN ('pending', 'approved', 'rejected', 'executed')),
    decided_by     TEXT,
    decided_at     BIGINT,
    comment        TEXT,
    execute_after  BIGINT,
    executed_at    BIGINT,
    CHECK (decided_by IS NULL OR decided_by <> requested_by)
);

CREATE INDEX approvals_by_state ON approvals (state, requested_at);
