-- presenced initial schema, SQLite flavour. Keep the columns identical to
-- migrations/postgres/2026-11-21-000001_init/up.sql: one src/store/schema.rs serves both.
-- Timestamps are unix milliseconds (BIGINT); ids are TEXT made by the application.
-- Text primary keys say NOT NULL because SQLite would otherwise accept NULL in them.

CREATE TABLE plans (
    id TEXT PRIMARY KEY NOT NULL,
    max_connections BIGINT NOT NULL,
    max_rooms BIGINT NOT NULL,
    max_messages_per_day BIGINT NOT NULL
);

INSERT INTO plans (id, max_connections, max_rooms, max_messages_per_day) VALUES
    ('free', 100, 50, 100000),
    ('pro', 10000, 5000, 10000000),
    ('enterprise', 1000000, 1000000, 1000000000);

CREATE TABLE accounts (
    id TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    plan_id TEXT NOT NULL REFERENCES plans (id),
    signing_secret TEXT NOT NULL,
    previous_signing_secret TEXT,
    previous_secret_expires_at BIGINT,
    settings TEXT NOT NULL DEFAULT '{}',
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE users (
    id TEXT PRIMARY KEY NOT NULL,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('admin', 'owner', 'member', 'viewer')),
    account_id TEXT REFERENCES accounts (id) ON DELETE CASCADE,
    created_at BIGINT NOT NULL,
    disabled BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX users_account_id_idx ON users (account_id);

CREATE TABLE refresh_tokens (
    id TEXT PRIMARY KEY NOT NULL,
    user_id TEXT NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    spent_at BIGINT,
    revoked_at BIGINT
);

CREATE INDEX refresh_tokens_family_id_idx ON refresh_tokens (family_id);
-- Serves the ON DELETE CASCADE from users, which would otherwise scan the table.
CREATE INDEX refresh_tokens_user_id_idx ON refresh_tokens (user_id);

CREATE TABLE server_keys (
    id TEXT PRIMARY KEY NOT NULL,
    secret TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- INTEGER PRIMARY KEY is the rowid alias (64-bit); AUTOINCREMENT keeps ids of deleted rows
-- from being reused, as BIGSERIAL does not reuse them either.
CREATE TABLE audit_logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    at BIGINT NOT NULL,
    account_id TEXT,
    actor TEXT,
    action TEXT NOT NULL,
    target TEXT,
    ip TEXT,
    detail TEXT NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_logs_account_id_at_idx ON audit_logs (account_id, at);
CREATE INDEX audit_logs_at_idx ON audit_logs (at);

CREATE TABLE user_presence (
    account_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    last_seen BIGINT NOT NULL,
    PRIMARY KEY (account_id, user_id)
);
