-- hexiao-fleetd schema, version 5: headquarters' desired state (docs/fleet-protocol.md,
-- "Desired state"; fleetd/desired.py). Documents per scope, what each store was sent, and
-- what each store reported back.

ALTER TABLE stores ADD COLUMN IF NOT EXISTS region text;

-- every document applied at a scope (all, region:R, franchisee:F, store:S); the newest per
-- scope is in force, older ones are history
CREATE TABLE desired_docs (
    id       bigserial PRIMARY KEY,
    scope    text NOT NULL,
    doc      jsonb NOT NULL,                  -- {rules, macros, settings}, as the TOML file
    author   text NOT NULL,
    created  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX desired_docs_by_scope ON desired_docs (scope, id);

-- each store's effective document and its version (only ever increases), and whether the
-- signed document of that version has been published (retained) yet
CREATE TABLE desired_store (
    store     text PRIMARY KEY,
    version   bigint NOT NULL,
    doc       jsonb NOT NULL,
    updated   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published timestamptz                      -- NULL: not taken by the broker yet
);

-- what each store reported (event records desired_applied / desired_refused)
CREATE TABLE desired_reports (
    store           text PRIMARY KEY,
    applied         bigint NOT NULL DEFAULT 0,  -- the version the store runs (0: none)
    applied_at      timestamptz,                -- the store's clock
    refused_version bigint,                     -- the latest refusal (0: an unverified one)
    refused_reason  text,
    refused_message text,
    refused_at      timestamptz
);
