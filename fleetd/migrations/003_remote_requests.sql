-- hexiao-fleetd schema, version 3: every remote diagnostics request, with who asked
-- (docs/fleet-protocol.md, "Remote diagnostics"). Written by `hexiao fleet ...` before the
-- request is published; a request that cannot be logged is not sent.
CREATE TABLE remote_requests (
    id        bigserial PRIMARY KEY,
    asked     timestamptz NOT NULL DEFAULT clock_timestamp(),
    operator  text NOT NULL,                  -- who asked (signed into the request)
    key_id    text NOT NULL,                  -- headquarters' key (SHA256 fingerprint)
    host      text NOT NULL,                  -- the machine the operator asked from
    merchant  text NOT NULL,
    store     text NOT NULL,
    lane      text,
    cmd       text NOT NULL,
    args      jsonb NOT NULL,
    nonce     bytea NOT NULL UNIQUE,
    outcome   text NOT NULL DEFAULT 'sent',   -- sent, answered, error, timeout, bad_answer
    detail    text,                           -- the error's kind and message, if any
    ended     timestamptz
);
CREATE INDEX remote_requests_by_store ON remote_requests (store, asked);
