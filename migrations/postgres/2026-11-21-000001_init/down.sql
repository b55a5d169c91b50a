-- Reverses up.sql, children before parents.
DROP TABLE user_presence;
DROP TABLE audit_logs;
DROP TABLE server_keys;
DROP TABLE refresh_tokens;
DROP TABLE users;
DROP TABLE accounts;
DROP TABLE plans;
