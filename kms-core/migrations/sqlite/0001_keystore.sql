-- keygate keystore, version 1.
-- Key material is stored only wrapped; a destroyed version keeps its row
-- (for audit and usage history) but loses its material.

CREATE TABLE master_keys (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    key_ref     TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (kind, key_ref)
) STRICT;

CREATE TABLE tenants (
    id                  TEXT    PRIMARY KEY,
    created_at          INTEGER NOT NULL,
    index_root_wrapped  BLOB,
    index_root_master   INTEGER NOT NULL REFERENCES master_keys (id)
) STRICT;

CREATE TABLE kek_versions (
    tenant            TEXT    NOT NULL REFERENCES tenants (id),
    version           INTEGER NOT NULL CHECK (version >= 1),
    state             TEXT    NOT NULL CHECK (state IN ('active', 'decrypt_only', 'disabled', 'destroyed')),
    wrapped           BLOB,
    master_key        INTEGER NOT NULL REFERENCES master_keys (id),
    created_at        INTEGER NOT NULL,
    state_changed_at  INTEGER NOT NULL,
    PRIMARY KEY (tenant, version),
    CHECK ((state = 'destroyed') = (wrapped IS NULL))
) STRICT;

-- Exactly one active version per tenant is a database constraint, not luck.
CREATE UNIQUE INDEX kek_versions_one_active ON kek_versions (tenant) WHERE state = 'active';

CREATE TABLE audit_events (
    instance        TEXT    NOT NULL,
    seq             INTEGER NOT NULL CHECK (seq >= 1),
    ts_ms           INTEGER NOT NULL,
    actor           TEXT    NOT NULL,
    action          TEXT    NOT NULL,
    tenant          TEXT,
    kek_version     INTEGER,
    record_key_ids  TEXT    NOT NULL,
    outcome         TEXT    NOT NULL,
    detail          TEXT    NOT NULL,
    prev_hash       BLOB    NOT NULL,
    hash            BLOB    NOT NULL,
    PRIMARY KEY (instance, seq)
) STRICT;

CREATE TABLE audit_checkpoints (
    instance   TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    hash       BLOB    NOT NULL,
    signature  BLOB    NOT NULL,
    ts_ms      INTEGER NOT NULL,
    PRIMARY KEY (instance, seq)
) STRICT;
