-- hexiao-fleetd schema, version 1 (docs/fleet-protocol.md). Applied once, in one transaction.

-- the stores headquarters knows, with the key each signs its records with (kid = store)
CREATE TABLE stores (
    store      text PRIMARY KEY,
    merchant   text NOT NULL,
    key        bytea NOT NULL CHECK (length(key) = 32),
    franchisee text,
    added      timestamptz NOT NULL DEFAULT now()
);

-- every accepted record, once: its identity is (store, inst, seq)
CREATE TABLE records (
    store      text NOT NULL,
    inst       text NOT NULL,
    seq        bigint NOT NULL,
    merchant   text NOT NULL,
    lane       text NOT NULL,
    kind       text NOT NULL,
    at         timestamptz NOT NULL,          -- the store's clock: information only
    payload    jsonb NOT NULL,
    ingest_id  bigserial NOT NULL,            -- arrival order at headquarters
    ingested   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (store, inst, seq)
);
CREATE INDEX records_by_kind ON records (kind, store);

-- each journal entry's latest reported state (a `corrected` record replaces its `done`)
CREATE TABLE redemptions (
    store       text NOT NULL,
    inst        text NOT NULL,
    entry       bigint NOT NULL,
    seq         bigint NOT NULL,              -- the record this row comes from
    merchant    text NOT NULL,
    lane        text NOT NULL,
    device      text,
    outcome     text NOT NULL,
    reason      text,
    card_type   text,
    card_id     text,
    title       text,
    value       jsonb NOT NULL,
    face_value_fen bigint,                    -- CASH: reduce_cost; others: NULL
    code_tail   text NOT NULL,
    code_hash   bytea NOT NULL,
    received    timestamptz NOT NULL,
    ended       timestamptz NOT NULL,
    PRIMARY KEY (store, inst, entry)
);
CREATE INDEX redemptions_by_day ON redemptions (ended);
CREATE INDEX redemptions_by_code ON redemptions (code_hash);

-- the latest online state of each store (retained online record and Last Will)
CREATE TABLE store_online (
    store    text PRIMARY KEY,
    inst     text NOT NULL,
    session  bigint NOT NULL,
    state    text NOT NULL,
    at       timestamptz NOT NULL,
    updated  timestamptz NOT NULL DEFAULT now()
);

-- what was refused, counted per reason and the store the topic claimed
CREATE TABLE rejections (
    reason   text NOT NULL,
    store    text NOT NULL,
    count    bigint NOT NULL,
    last_at  timestamptz NOT NULL DEFAULT now(),
    last_why text NOT NULL,
    PRIMARY KEY (reason, store)
);
