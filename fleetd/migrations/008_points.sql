-- hexiao-fleetd schema, version 8: member points (issue 15). Each `points` record (a credit or a
-- reversal that ended credited in a store's points ledger, hostd/members/) becomes one row here,
-- written by a trigger on `records` in the same transaction as its record: a record is inserted
-- once (its identity), so its points are counted once, whatever the broker redelivers.

CREATE TABLE points (
    store      text NOT NULL,
    inst       text NOT NULL,
    entry      bigint NOT NULL,               -- the store's points ledger row
    seq        bigint NOT NULL,               -- the record this row comes from
    merchant   text NOT NULL,
    lane       text NOT NULL,
    receipt    text NOT NULL,                 -- lane|digest, or void|lane|digest
    points     bigint NOT NULL,               -- signed: a refund or a void is negative
    total_fen  bigint NOT NULL,
    card_id    text NOT NULL,
    via        text NOT NULL,                 -- till | claim | refund | void
    code_tail  text NOT NULL,
    code_hash  bytea NOT NULL,
    ended      timestamptz NOT NULL,          -- the store's ledger time
    PRIMARY KEY (store, inst, entry)
);
CREATE INDEX points_by_day ON points (ended);

CREATE FUNCTION records_points() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO points (store, inst, entry, seq, merchant, lane, receipt, points, total_fen,
                        card_id, via, code_tail, code_hash, ended)
    VALUES (NEW.store, NEW.inst, (NEW.payload->>'entry')::bigint, NEW.seq, NEW.merchant,
            NEW.lane, NEW.payload->>'receipt', (NEW.payload->>'points')::bigint,
            (NEW.payload->>'total_fen')::bigint, NEW.payload->>'card_id', NEW.payload->>'via',
            NEW.payload->>'code_tail', decode(NEW.payload->>'code_hash', 'hex'),
            to_timestamp((NEW.payload->>'ended')::bigint / 1000.0))
    ON CONFLICT (store, inst, entry) DO NOTHING;  -- a ledger row ends credited once
    RETURN NULL;
END $$;

CREATE TRIGGER records_points AFTER INSERT ON records
    FOR EACH ROW WHEN (NEW.kind = 'points') EXECUTE FUNCTION records_points();
