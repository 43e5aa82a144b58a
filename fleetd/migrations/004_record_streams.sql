-- hexiao-fleetd schema, version 4: how far each installation's records are contiguous, so that
-- a record the broker dropped is noticed (fleetd/gaps.py; docs/fleet-protocol.md, "Records that
-- never arrived").

-- one row per (store, installation): every seq 1..contiguous_upto is stored (or its loss was
-- accepted); max_seq is the highest stored; a hole lies between them while they differ
CREATE TABLE record_streams (
    store           text NOT NULL,
    inst            text NOT NULL,
    contiguous_upto bigint NOT NULL DEFAULT 0,
    max_seq         bigint NOT NULL DEFAULT 0,
    gap_since       timestamptz,              -- headquarters' clock: the lowest hole seen since
    PRIMARY KEY (store, inst),
    CHECK ((gap_since IS NULL) = (contiguous_upto >= max_seq))
);
CREATE INDEX record_streams_with_gap ON record_streams (gap_since) WHERE gap_since IS NOT NULL;

-- holes an operator accepted as lost (`hexiao-fleetd gaps --accept`): kept for the reports
CREATE TABLE record_losses (
    id          bigserial PRIMARY KEY,
    store       text NOT NULL,
    inst        text NOT NULL,
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL,
    accepted    timestamptz NOT NULL DEFAULT clock_timestamp(),
    accepted_by text NOT NULL,
    note        text,
    CHECK (first_seq BETWEEN 1 AND last_seq)
);
CREATE INDEX record_losses_by_store ON record_losses (store, inst);

-- the records already stored: seq = its rank within its installation exactly while 1..seq are
-- all there (seqs are distinct and >= 1); a hole found here is dated from this migration
INSERT INTO record_streams (store, inst, contiguous_upto, max_seq, gap_since)
SELECT store, inst, coalesce(max(seq) FILTER (WHERE seq = rank), 0), max(seq),
       CASE WHEN coalesce(max(seq) FILTER (WHERE seq = rank), 0) < max(seq) THEN now() END
FROM (SELECT store, inst, seq, row_number() OVER (PARTITION BY store, inst ORDER BY seq) AS rank
      FROM records WHERE seq > 0) ranked
GROUP BY store, inst;
