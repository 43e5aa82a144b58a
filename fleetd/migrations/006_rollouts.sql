-- hexiao-fleetd schema, version 6: staged firmware rollouts (fleetd/rollout.py).
-- The columns below are read by headquarters' status page (fleetd/web): extend, never rename.

CREATE TABLE rollouts (
    id         bigserial PRIMARY KEY,
    version    text NOT NULL,                 -- the bundle's firmware version
    sha256     text NOT NULL,                 -- the bundle's digest (hex)
    stages     integer[] NOT NULL,            -- percentages of the lanes, e.g. {2,20,100}
    stage      integer NOT NULL DEFAULT 0,    -- index into stages of the stage running
    state      text NOT NULL,                 -- running | paused | halted | aborted | done
    reason     text,                          -- why halted or aborted
    author     text NOT NULL DEFAULT '',
    created    timestamptz NOT NULL DEFAULT now(),
    updated    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rollout_lanes (
    rollout_id bigint NOT NULL REFERENCES rollouts (id),
    store      text NOT NULL,
    lane       text NOT NULL,
    stage      integer NOT NULL,              -- the stage that picked this lane
    state      text NOT NULL,                 -- pending | sent | updating | done | failed | rolled_back
    detail     text,
    updated    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, store, lane)
);

-- What the controller needs beside the columns above (fleetd/rollout.py).
ALTER TABLE rollouts
    ADD COLUMN board        text NOT NULL DEFAULT '',     -- the bundle's board: lanes of it only
    ADD COLUMN parallel     integer NOT NULL DEFAULT 1,   -- lanes updating at once in a store
    ADD COLUMN observe_s    double precision NOT NULL DEFAULT 600, -- after a stage, before the next
    ADD COLUMN bundle       bytea NOT NULL DEFAULT '',    -- the signed bundle as it travels (CBOR)
    ADD COLUMN stage_started timestamptz,                 -- the running stage's orders written
    ADD COLUMN stage_done   timestamptz;                  -- its last lane finished: observing

ALTER TABLE rollout_lanes
    ADD COLUMN device   text,                 -- the device the store updated on that lane
    ADD COLUMN done_seq bigint,               -- the store's record seq of its fw_done event
    ADD COLUMN done_inst text;                -- (incidents after it count against the build)

CREATE INDEX rollout_lanes_by_state ON rollout_lanes (rollout_id, stage, state);

-- The bundle published (retained) under a merchant's tree, once per rollout and merchant.
CREATE TABLE rollout_bundles (
    rollout_id bigint NOT NULL REFERENCES rollouts (id),
    merchant   text NOT NULL,
    published  timestamptz,
    PRIMARY KEY (rollout_id, merchant)
);

-- Each store's latest signed firmware order (retained at hexiao/ctl/v1/<merchant>/<store>/firmware);
-- doc only grows, across rollouts, so a store refuses an older order replayed.
CREATE TABLE rollout_docs (
    store      text PRIMARY KEY,
    merchant   text NOT NULL,
    doc        bigint NOT NULL,
    data       bytea NOT NULL,                -- as published: CBOR [payload, signature]
    published  timestamptz                    -- NULL: written, not yet taken by the broker
);

-- what the stores' orders last said ("run:2", "pause:2", "stop:0"): the controller writes them
-- again when the rollout's state or stage no longer matches
ALTER TABLE rollouts ADD COLUMN docs_for text NOT NULL DEFAULT '';
