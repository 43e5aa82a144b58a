"""The firmware (hexiao.firmware.main) under real MicroPython on the sim board: scans go into its
scanner FIFO, a fake POS reads its HID output file, a host (SerialLink) talks over a relay.Cable.
Every wait is bounded; nothing asserts a duration. Heap: micropython.HEAP, the device's 64 KB."""

from __future__ import annotations

import time
from pathlib import Path

from hexiao.protocol import cbor
from hexiao.protocol.errors import counter_name
from hexiao.protocol.link import EV_OPEN
from test_firmware_sim import Host, sim, typed, verdict_for


def opened(host: Host) -> None:
    host.wait(lambda: host.of(EV_OPEN), 30, "the session")


def test_products_typed_without_a_host_and_bad_input_never_typed(mpy_stage: Path,
                                                                  tmp_path: Path) -> None:
    with sim(mpy_stage, tmp_path) as s:
        s.wait_ev("boot")
        s.scan(b"]E04006381333931")  # EAN-13
        s.scan(b"]A0Ab-1+%?", end=b"\r\n")  # Code 39, default rule: product; CR LF ends it
        s.scan(b"\x00\xff garbage")  # noise on the UART: no AIM identifier
        s.scan(b"]E0" + "条码".encode("gb18030"))  # non-ASCII product: refused whole
        s.scan(b"]E0" + b"9" * 600)  # over-long read: dropped whole
        s.scan(b"]Q1coupon-0001")  # a coupon, no session: the local offline verdict at once
        s.scan(b"]E0123", end=b"")  # cut short: the inter-character timeout drops it
        s.wait_ev("log", text="partial scan dropped")
        s.scan(b"]E0", end=b"\r")  # the terminator alone after the partial: nothing
        s.scan(b"]E096385074")
        want = typed("4006381333931") + typed("Ab-1+%?") + typed("96385074")
        lines = s.wait_hid(len(want))
        v = s.wait_ev("verdict")[0]
        assert s.shutdown() == 0
        assert s.hid_lines() == want == lines
        assert v == {"ev": "verdict", "scan_id": 1, "outcome": "offline", "beep": "warning",
                     "led": "amber", "text": "host offline"}
        app = s.events("heap")[0]["app"]
        assert {k: v for k, v in app.items() if v} == {
            "scans": 5, "products": 3, "coupons": 1, "offline": 1, "rejected": 1,
            "garbage": 2, "overlong": 1, "partial": 1}
        logs = s.logs()
        for text in ("scan without AIM id", "product not ASCII: not typed",
                     "scan over 512 bytes dropped", "partial scan dropped"):
            assert text in logs


def test_coupon_reaches_the_host_once_and_its_verdict_drives_buzzer_and_led(
        mpy_stage: Path, tmp_path: Path) -> None:
    answers = {b"GOOD-0001": (0, 1, 1, "¥10 代金券 已核销"), b"USED-0002": (1, 2, 2, "已使用"),
               b"ODD-00003": (9, 9, 9, "?")}  # reserved values: info / none / off

    def answer(scan: dict) -> dict:
        o, b, led, text = answers[scan["data"]]
        return {"type": "verdict", "scan_id": scan["scan_id"], "outcome": o, "beep": b,
                "led": led, "text": text}

    host = Host(answer)
    t0 = time.monotonic()
    with sim(mpy_stage, tmp_path, host=host) as s:
        opened(host)
        s.scan(b"]Q1GOOD-0001")
        s.wait_ev("verdict")
        s.scan(b"]C0USED-0002")
        s.wait_ev("verdict", 2)
        s.scan(b"]Q1ODD-00003")
        vs = s.wait_ev("verdict", 3)
        assert [(v["scan_id"], v["outcome"], v["beep"], v["led"], v["text"]) for v in vs] == [
            (1, "accepted", "ok", "green", "¥10 代金券 已核销"),
            (2, "refused", "error", "red", "已使用"),
            (3, "info", "none", "off", "?")]
        assert [(m["scan_id"], m["symbology"], m["data"]) for m in host.scans] == [
            (1, "]Q1", b"GOOD-0001"), (2, "]C0", b"USED-0002"), (3, "]Q1", b"ODD-00003")]
        assert s.hid_lines() == []  # a coupon is never typed

        health = host.ask({"type": "health_get"}, "health")
        assert health["firmware"] == "hexiao-fw 0.1.0" and health["reset_cause"] == "power_on"
        assert 0 < health["uptime_ms"] <= (time.monotonic() - t0) * 1000
        assert health["app"] == {"scans": 3, "coupons": 3, "verdicts": 3}
        link = {counter_name(k): v for k, v in health["link"].items()}
        assert link["sessions"] == 1 and link["tx_frames"] >= 4 and link["rx_frames"] >= 4
        assert health["heap_free"] > 0 and health["heap_peak"] > 0

        pong = host.ask({"type": "ping", "data": b"\x01\x02"}, "pong")
        assert pong["data"] == b"\x01\x02"
        logs = host.ask({"type": "logs_get"}, "logs")
        assert [e[3] for e in logs["entries"]] == ["session open"]
        assert logs["next"] == logs["entries"][-1][0] + 1
        again = host.ask({"type": "logs_get", "since": logs["next"]}, "logs")
        assert again == {"type": "logs", "entries": [], "next": logs["next"]}
        assert s.shutdown() == 0
        assert len(host.scans) == 3  # exactly once each


def test_host_gone_gives_the_offline_verdict_and_products_still_pass(mpy_stage: Path,
                                                                     tmp_path: Path) -> None:
    host = Host(lambda scan: None)  # a host that never answers: its backend hangs
    with sim(mpy_stage, tmp_path, host=host) as s:
        opened(host)
        cfg = host.ask({"type": "config_set", "values": {
            "offline_ms": 500, "inter_key_ms": 2000, "suffix": "tab"}}, "config")
        assert cfg["values"] == {"offline_ms": 500, "suffix": "tab"}  # 2000 refused
        s.wait_ev("log", text="config inter_key_ms refused")
        s.scan(b"]Q1SLOW-0001")
        v = s.wait_ev("verdict")[0]
        assert (v["scan_id"], v["outcome"], v["beep"], v["led"]) == (1, "offline", "warning",
                                                                     "amber")
        assert [m["scan_id"] for m in host.scans] == [1]  # it was sent, just never answered
        s.stop_host()  # the host is gone altogether now
        s.scan(b"]E012345670")
        assert s.wait_hid(len(typed("12345670", 0x2B))) == typed("12345670", 0x2B)
        s.scan(b"]Q1LATE-0002")
        s.wait_ev("verdict", 2)
        assert s.shutdown() == 0
        assert s.events("verdict")[1]["outcome"] == "offline"
        assert s.events("heap")[0]["app"]["offline"] == 2


def test_rules_survive_a_restart_and_bad_rules_or_files_are_refused(mpy_stage: Path,
                                                                    tmp_path: Path) -> None:
    state = tmp_path / "flash"
    state.mkdir()
    rules = {"type": "rules", "version": 7, "default": 2, "rules": [
        {"action": 0, "symbologies": ["]E0"], "check": 1},  # valid GS1 check digit: product
        {"action": 1, "symbologies": ["]Q1"], "prefix": b"WX", "min_len": 4, "max_len": 20}]}
    host = Host(verdict_for)
    with sim(mpy_stage, tmp_path, host=host, state=state) as s:
        opened(host)
        host.send(rules)
        s.wait_ev("log", text="rules v7")
        host.send({"type": "rules", "version": 8, "default": 0, "rules": [
            {"action": 0, "min_len": 9, "max_len": 3}]})
        s.wait_ev("log", text="rules v8 refused: min_len > max_len")
        assert s.shutdown() == 0
    assert (state / "rules").exists() and not (state / "rules.new").exists()
    (state / "config").write_bytes(b"\xa1\x65junk")  # a damaged file on the device's flash

    with sim(mpy_stage, tmp_path, state=state) as s:  # no host: the rules are from flash
        s.scan(b"]E04006381333931")  # check digit right: product
        s.scan(b"]E04006381333932")  # wrong: no rule, default ignore
        s.scan(b"]Q1WX12345")  # coupon by prefix: offline (no host)
        s.scan(b"]Q1XX12345")  # no prefix: ignored
        s.wait_ev("verdict")
        s.scan(b"]E096385074")
        lines = s.wait_hid(len(typed("4006381333931") + typed("96385074")))
        assert s.shutdown() == 0
        assert lines == typed("4006381333931") + typed("96385074")
        assert s.events("log")[0]["text"] == "corrupt config file: defaults"
        app = s.events("heap")[0]["app"]
        assert (app["products"], app["ignored"], app["coupons"]) == (2, 2, 1)
    assert cbor.loads((state / "rules").read_bytes())[0] == 7


def test_keys_macro_typed_exactly_once(mpy_stage: Path, tmp_path: Path) -> None:
    host = Host(verdict_for)
    macro = {"type": "keys", "macro_id": 41, "items": ["Hi!", [0x28, 0]], "delay_ms": 0}
    with sim(mpy_stage, tmp_path, host=host) as s:
        opened(host)
        host.send(macro)
        want = [*typed("Hi!", None), "HID 00 28", "HID 00 00"]
        assert s.wait_hid(len(want)) == want
        s.cable.replay("h2d", -1)  # the keys frame again, on the wire: the link drops it
        host.send(dict(macro))  # the host sends it again as a new message: the app drops it
        s.wait_ev("log", text="macro 41 again: not typed")
        host.send({"type": "keys", "macro_id": 42, "items": ["¥"]})  # not on a US keyboard
        s.wait_ev("log", text="macro 42 not ASCII: not typed")
        host.send({"type": "keys", "macro_id": 43, "items": [[0x04, 0x01]]})  # Ctrl-A
        lines = s.wait_hid(len(want) + 2)
        assert s.shutdown() == 0
        assert lines == [*want, "HID 01 04", "HID 00 00"]
        assert s.hid_lines() == lines
        assert s.events("heap")[0]["app"]["macros"] == 2


SLIP = "\x1b@\x1ba\x01核销成功 ¥10\n\x1dV\x00".encode("gb18030")  # ESC/POS: centred, then cut


def test_slips_and_print_jobs_reach_the_printer_and_the_button_repeats_the_verdict(
        mpy_stage: Path, tmp_path: Path) -> None:
    def answer(scan: dict) -> dict:
        return {**verdict_for(scan), "slip": SLIP}

    host = Host(answer)
    paper, button = tmp_path / "printer.bin", tmp_path / "button"
    button.write_bytes(b"x")  # there before boot: not a press
    with sim(mpy_stage, tmp_path, host=host, printer=paper, button=button) as s:
        opened(host)
        s.scan(b"]Q1COUPON-0001")
        v = s.wait_ev("verdict")[0]
        assert v["text"] == "ok COUPON-0001" and (v["beep"], v["led"]) == ("ok", "green")
        host.send({"type": "print", "job_id": 5, "seq": 0, "last": False, "data": b"AB"})
        host.send({"type": "print", "job_id": 5, "seq": 1, "last": True, "data": b"C\n"})
        host.send({"type": "print", "job_id": 6, "seq": 1, "last": True, "data": b"lost"})
        s.wait_ev("log", text="print 6: chunk 1 out of order, job dropped")
        host.send({"type": "print", "job_id": 7, "seq": 0, "last": True, "data": b"D"})
        with button.open("ab") as f:
            f.write(b"xx")  # two presses: the last verdict twice more, as it was
        again = s.wait_ev("verdict", 3)
        assert all({k: e[k] for k in v if k != "seq"} == v for e in again)
        deadline = time.monotonic() + 30
        while paper.read_bytes() != SLIP + b"ABC\nD" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.shutdown() == 0, s.device.other
    assert paper.read_bytes() == SLIP + b"ABC\nD"
    assert s.events("heap")[0]["app"]["printed"] == 4


def test_no_printer_no_paper_and_late_verdicts_print_nothing(mpy_stage: Path,
                                                            tmp_path: Path) -> None:
    host = Host(lambda scan: None)  # silent: the device gives the offline verdict
    with sim(mpy_stage, tmp_path, host=host) as s:
        opened(host)
        s.scan(b"]Q1COUPON-0002")
        s.wait_ev("verdict", outcome="offline")
        sid = host.scans[0]["scan_id"]
        host.send({**verdict_for(host.scans[0]), "slip": SLIP})  # late: own signal, no slip
        s.wait_ev("verdict", 2)
        host.send({"type": "print", "job_id": 1, "seq": 0, "last": True, "data": b"x"})
        s.wait_ev("log", text="no printer on this board")
        assert s.shutdown() == 0
    late = s.events("verdict")[1]
    # a late verdict is never silent: the warning beep with its own LED (green: accepted)
    assert (late["scan_id"], late["beep"], late["led"]) == (sid, "warning", "green")
    assert s.logs().count("no printer on this board") == 1  # the print job, not the late slip
