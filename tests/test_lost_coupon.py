"""The lost-coupon sequence (issue 16), through the real daemon and the real device: hexiao-hostd
(config, keystore, SQLite journal, lanes) and the firmware on the sim board under MicroPython
(64 KB heap) on a pty cable, with the WeChat simulator over loopback HTTP.

hostd goes down mid-consume; the device says "host offline"; hostd comes back and answers the
device's resent scan with a late accepted verdict: its own sound and light, and the discount
macro not typed unprompted. The cashier rescans (her one action): green "本机已核销" with the
value, and the macro typed once. Every wait is bounded; nothing asserts a duration.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from hexiao.hostd import journal as jr
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.keystore import Keystore
from sim_config import sim_config
from test_firmware_sim import KID, sim, typed

CASH = "287463512093"
LONG = 60.0  # a guard against hangs, never a performance claim


def config(tmp_path: Path, backend: WeChatSim, port: str) -> Any:
    return sim_config(tmp_path, backend,
                      device=[{"id": KID.decode(), "port": port, "lane": "lane-1",
                               "settings": {"offline_ms": 1000}}],
                      macros={"CASH": {"items": [[0x42, 0], "{reduce_cost_yuan}", [0x28, 0]]}})


def until(pred: Any, what: str, timeout: float = LONG) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_hostd_down_offline_late_verdict_then_rescan_is_green_redeemed_here(
        mpy_stage: Path, tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / "state").mkdir(mode=0o700)
    Keystore(tmp_path / "state" / "keystore.jsonl", create=True).add(KID, key)
    journal_path = tmp_path / "state" / "journal.sqlite3"
    with WeChatSim(read(EXAMPLE)) as backend, \
            sim(mpy_stage, tmp_path, key=key, button=tmp_path / "button") as s:
        cfg = config(tmp_path, backend, s.cable.host_port)
        first = Daemon(cfg).start()
        try:
            until(lambda: first.device_info(KID.decode())["state"] == "open", "a session")
            s.wait_ev("log", text="session open")
            # the consume commits, then its reply is held back 2 s and the connection closed
            r = httpx.post(f"{backend.url}/_sim/faults", json={"drop_after_commit": {
                "mode": "close", "count": 1, "delay_ms": 2000}})
            assert r.status_code == 200, r.text
            s.scan(b"]Q1" + CASH.encode())

            def sent() -> bool:
                with jr.Journal(journal_path) as j:
                    return any(e.state == "consume_sent" for e in j.entries())
            until(sent, "the consume to go out")
        finally:
            first.stop()  # hostd down mid-consume (its worker ends the consume, unheard)
        offline = s.wait_ev("verdict", outcome="offline")[0]
        assert (offline["beep"], offline["led"], offline["text"]) == (
            "warning", "amber", "host offline")
        with jr.Journal(journal_path) as j:
            (entry,) = j.entries()
        assert (entry.state, entry.outcome) == ("done", "accepted")
        s.wait_ev("log", text="expired scan")  # its resend met no host: kept for the next one

        second = Daemon(cfg).start()  # hostd is back
        try:
            late = s.wait_ev("verdict", 2)[1]
            # the late accept is noticeable (warning beep, green light), never silent
            assert (late["scan_id"], late["outcome"], late["beep"], late["led"]) == (
                offline["scan_id"], "accepted", "warning", "green")
            assert late["text"] == "核销成功 减¥20.00 满¥100.00 …2093"
            s.wait_ev("log", text="late macro: rescan")
            assert s.hid_lines() == []  # nothing typed into the POS unprompted

            s.scan(b"]Q1" + CASH.encode())  # the cashier, having heard it, scans again
            green = s.wait_ev("verdict", 3)[2]
            assert (green["outcome"], green["beep"], green["led"]) == ("accepted", "ok", "green")
            assert green["text"].startswith("本机已核销 ") and green["text"].endswith(
                "减¥20.00 …2093")
            macro = ["HID 00 42", "HID 00 00", *typed("20.00")]  # F9, the value, Enter
            assert s.wait_hid(len(macro)) == macro

            with (tmp_path / "button").open("ab") as f:
                f.write(b"x")  # a press now only repeats the verdict: the macro went once
            s.wait_ev("verdict", 4)
            assert s.hid_lines() == macro
        finally:
            second.stop()
        assert backend.state.consumes[CASH] == 1
        with jr.Journal(journal_path) as j:
            (entry,) = j.entries()  # the rescan began no redemption of its own
            steps = [st.step for st in j.steps(entry.id)]
        assert (entry.outcome, steps.count("rescanned")) == ("accepted", 1)

