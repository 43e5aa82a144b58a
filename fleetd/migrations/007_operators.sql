-- hexiao-fleetd schema, version 7: headquarters' status page (fleetd/web): operators who may log
-- in, their sessions, and failed logins (the backoff). `hexiao-fleetd user add|list|remove`.

-- a password is kept only as its salted scrypt hash (params: "scrypt$N$r$p")
CREATE TABLE operators (
    name       text PRIMARY KEY,
    salt       bytea NOT NULL,
    hash       bytea NOT NULL,
    params     text NOT NULL,
    created    timestamptz NOT NULL DEFAULT now(),
    last_login timestamptz
);

-- a session is the SHA-256 of the cookie's random token (the token itself is never stored)
CREATE TABLE operator_sessions (
    token_hash bytea PRIMARY KEY,
    operator   text NOT NULL REFERENCES operators (name) ON DELETE CASCADE,
    csrf       text NOT NULL,                 -- the token every POST form of this session carries
    address    text NOT NULL,                 -- where the login came from (information only)
    created    timestamptz NOT NULL,
    expires    timestamptz NOT NULL
);
CREATE INDEX operator_sessions_by_expiry ON operator_sessions (expires);

-- consecutive failed logins per "user:NAME" and per "ip:ADDRESS"; cleared by a good login
CREATE TABLE login_failures (
    who           text PRIMARY KEY,
    failures      integer NOT NULL,
    blocked_until timestamptz NOT NULL
);
