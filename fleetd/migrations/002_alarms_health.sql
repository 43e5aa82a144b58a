-- hexiao-fleetd schema, version 2: lane health, alarms, arrival time at commit resolution.

-- ingested: the row's own insert time, not its batch transaction's start (latency figures)
ALTER TABLE records ALTER COLUMN ingested SET DEFAULT clock_timestamp();
CREATE INDEX records_by_store_ingested ON records (store, ingested);

-- each lane's (and `@store`'s) latest health record; down_since is headquarters' clock
CREATE TABLE lane_health (
    store      text NOT NULL,
    lane       text NOT NULL,
    inst       text NOT NULL,
    seq        bigint NOT NULL,               -- the record this row comes from
    state      jsonb NOT NULL,
    at         timestamptz NOT NULL,          -- the store's clock: information only
    seen       timestamptz NOT NULL DEFAULT clock_timestamp(),
    down_since timestamptz,                   -- when headquarters first saw the link not open
    PRIMARY KEY (store, lane)
);

-- alarms: open until the condition clears; one open alarm per (kind, store, lane)
CREATE TABLE alarms (
    id       bigserial PRIMARY KEY,
    kind     text NOT NULL,
    store    text NOT NULL,
    lane     text NOT NULL DEFAULT '',
    opened   timestamptz NOT NULL DEFAULT now(),
    cleared  timestamptz,
    detail   jsonb NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX alarms_one_open ON alarms (kind, store, lane) WHERE cleared IS NULL;
