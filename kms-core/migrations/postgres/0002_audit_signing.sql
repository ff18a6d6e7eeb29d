-- keygate keystore, version 2: audit signing keys (PostgreSQL).
-- One P-256 key per key-service instance signs that instance's audit
-- checkpoints. Its scalar is stored only wrapped by a master key (context:
-- purpose audit-signing, owner = instance, version 1). The public key is a
-- convenience copy: verifiers check it against the unwrapped key or a pin.
-- An event's purpose of use is kept inside `audit_events.detail` (key
-- "purpose"), so the hashed row layout of version 1 is unchanged.

CREATE TABLE audit_signing_keys (
    instance    TEXT    COLLATE "C" PRIMARY KEY,
    wrapped     BYTEA   NOT NULL,
    master_key  BIGINT  NOT NULL REFERENCES master_keys (id),
    public_key  BYTEA   NOT NULL,
    created_at  BIGINT  NOT NULL
);
