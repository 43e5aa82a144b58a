"""The redemption journal: a real SQLite file in tmp_path, opened by several connections."""

from __future__ import annotations

import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from hexiao.hostd.journal import (
    SCHEMA_VERSION,
    InFlight,
    Journal,
    JournalCorrupt,
    StaleState,
)

T = 1_750_000_000.0


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


def test_new_file_is_wal_full_sync_private_and_versioned(path: Path) -> None:
    with Journal(path) as j:
        assert j._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert j._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = sqlite3.connect(path)
    assert db.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    db.close()


def test_states_and_steps_survive_reopen(path: Path) -> None:
    with Journal(path) as j:
        e = j.begin("287463512093", "lane-1", T, code="287463512093")
        j.note(e.id, "get_sent", T + 1)
        j.advance(e.id, "received", "checked", T + 2, detail={"title": "满100减20"})
        j.advance(e.id, "checked", "consume_sent", T + 3)
        j.advance(e.id, "consume_sent", "done", T + 4, outcome="accepted")
    with Journal(path) as j:
        (e,) = j.entries()
        assert (e.state, e.outcome, e.code, e.detail) == (
            "done", "accepted", "287463512093", {"title": "满100减20"})
        assert [(s.step, s.at) for s in j.steps(e.id)] == [
            ("received", T), ("get_sent", T + 1), ("checked", T + 2), ("consume_sent", T + 3),
            ("done", T + 4)]


def test_one_active_redemption_per_code_and_per_scan(path: Path) -> None:
    with Journal(path) as a, Journal(path) as b:
        e = a.begin("111122223333", "lane-1", T, code="111122223333")
        with pytest.raises(InFlight):
            b.begin("111122223333", "lane-2", T, code="111122223333")
        # an encrypted scan that decrypts to the same code is caught at set_code
        enc = b.begin("ENCRYPTED+scan==", "lane-2", T)
        with pytest.raises(InFlight):
            b.set_code(enc.id, "111122223333", T)
        # `unknown` still holds the code: its consume may have happened
        a.advance(e.id, "received", "checked", T)
        a.advance(e.id, "checked", "consume_sent", T)
        a.advance(e.id, "consume_sent", "unknown", T)
        with pytest.raises(InFlight):
            b.begin("111122223333", "lane-2", T, code="111122223333")
        a.advance(e.id, "unknown", "done", T, outcome="accepted")
        again = b.begin("111122223333", "lane-2", T, code="111122223333")
        assert again.state == "received"
        assert len(a.entries()) == 3  # the failed begins left nothing behind


def test_transitions_are_checked_and_compare_and_set(path: Path) -> None:
    with Journal(path) as a, Journal(path) as b:
        e = a.begin("c1", "lane-1", T, code="c1")
        with pytest.raises(ValueError, match="received -> consume_sent"):
            a.advance(e.id, "received", "consume_sent", T)
        a.advance(e.id, "received", "checked", T)
        with pytest.raises(StaleState):  # b still thinks it is `received`
            b.advance(e.id, "received", "done", T, outcome="refused")
        a.advance(e.id, "checked", "done", T, outcome="refused")
        with pytest.raises(ValueError):
            a.advance(e.id, "done", "done", T)
        assert a.get(e.id).outcome == "refused"


def test_steps_are_append_only(path: Path) -> None:
    with Journal(path) as j:
        e = j.begin("c1", "lane-1", T, code="c1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            j._db.execute("UPDATE steps SET step = 'x'")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            j._db.execute("DELETE FROM steps")
        assert [s.step for s in j.steps(e.id)] == ["received"]


def test_concurrent_begins_from_many_connections_admit_one(path: Path) -> None:
    Journal(path).close()  # create the schema once, as hostd's start-up does
    admitted: list[int] = []
    refused: list[str] = []
    barrier = threading.Barrier(8)

    def lane(n: int) -> None:
        with Journal(path) as j:
            barrier.wait()
            try:
                admitted.append(j.begin("999900001111", f"lane-{n}", T, code="999900001111").id)
            except InFlight:
                refused.append(f"lane-{n}")

    threads = [threading.Thread(target=lane, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(admitted) == 1 and len(refused) == 7


@pytest.mark.parametrize("content", [
    b"this is not a database at all, just text" * 100,
    b"SQLite format 3\x00" + b"\xff" * 4080,  # right magic, garbage header and pages
])
def test_corrupt_file_gives_a_clear_error_and_is_left_untouched(path: Path,
                                                               content: bytes) -> None:
    path.write_bytes(content)
    with pytest.raises(JournalCorrupt, match="not a readable hexiao journal") as err:
        Journal(path)
    assert str(path) in str(err.value) and "left untouched" in str(err.value)
    assert path.read_bytes() == content
    assert not Path(f"{path}-wal").exists()


def test_damaged_page_in_a_real_journal_is_refused(path: Path) -> None:
    with Journal(path) as j:
        for n in range(200):
            j.begin(f"code{n:08d}", "lane-1", T, code=f"code{n:08d}")
        j._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 3 * page
    data[2 * page:3 * page] = b"\x00\xff" * (page // 2)  # wreck one b-tree page
    path.write_bytes(bytes(data))
    before = path.read_bytes()
    with pytest.raises(JournalCorrupt):
        Journal(path)
    assert path.read_bytes() == before


def test_other_sqlite_file_or_other_version_is_refused(path: Path, tmp_path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE something_else (x)")
    db.commit()
    db.close()
    with pytest.raises(JournalCorrupt, match="not a journal"):
        Journal(path)
    newer = tmp_path / "newer.db"
    Journal(newer).close()
    db = sqlite3.connect(newer)
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(JournalCorrupt, match="schema version 99"):
        Journal(newer)
    assert newer.exists()



def test_correct_only_changes_a_done_entry_and_says_why(path: Path) -> None:
    with Journal(path) as j:
        e = j.begin("c1", "lane-1", T, code="c1")
        with pytest.raises(StaleState):
            j.correct(e.id, "accepted", T, why="test")
        j.advance(e.id, "received", "done", T, outcome="abandoned", reason="interrupted")
        fixed = j.correct(e.id, "accepted", T + 1, why="late reply")
        assert (fixed.outcome, fixed.reason) == ("accepted", None)
        assert j.steps(e.id)[-1].detail == {"outcome": "accepted", "why": "late reply"}
