"""udev rules and systemd unit (udev/), and `hexiao udev|service install|show`
(tools/install/system.py).

The rules are checked by a parser (every assignment well-formed, real keys, operators valid for
the key) and by a small evaluator that runs them against modelled devices, so the promises
(stable name by serial, group/mode, ModemManager off) are checked as behaviour, not text.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from hexiao.tools.install import system as inst

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "udev" / "99-hexiao.rules"
UNIT = REPO / "udev" / "hexiao-hostd.service"

# --- udev rules: parser --------------------------------------------------------------------

MATCH_OPS, ASSIGN_OPS = {"==", "!="}, {"=", "+=", "-=", ":="}
MATCH_ONLY = {"ACTION", "DEVPATH", "KERNEL", "KERNELS", "SUBSYSTEM", "SUBSYSTEMS", "DRIVER",
              "DRIVERS", "ATTRS", "TAGS", "TEST", "PROGRAM", "RESULT", "CONST"}
ASSIGN_OPS_OF = {"OWNER": {"=", ":="}, "GROUP": {"=", ":="}, "MODE": {"=", ":="},
                 "SECLABEL": {"=", ":="}, "OPTIONS": {"=", "+="}, "IMPORT": {"="},
                 "LABEL": {"="}, "GOTO": {"="}, "RUN": ASSIGN_OPS, "SYMLINK": ASSIGN_OPS,
                 "TAG": ASSIGN_OPS, "ENV": {"=", "+=", ":="}, "NAME": {"=", ":="},
                 "ATTR": {"=", ":="}, "SYSCTL": {"=", ":="}}
WITH_ATTR = {"ATTR", "ATTRS", "SYSCTL", "ENV", "CONST", "TEST", "SECLABEL", "RUN", "IMPORT"}
ATTR_OPTIONAL = {"TEST", "RUN", "IMPORT"}
_TOKEN = re.compile(r'([A-Z_]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"'
                    r"\s*(,\s*|$)")


def parse_rules(text: str) -> list[tuple[int, list[tuple[str, str | None, str, str]]]]:
    """(line number, [(key, attr, op, value)]) per rule; AssertionError names a bad line."""
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line.endswith("\\"), f"line {n}: continuation lines are not used here"
        pos, toks = 0, []
        while pos < len(line):
            m = _TOKEN.match(line, pos)
            assert m and m.end() > pos, f"line {n}: malformed at column {pos}: {line[pos:]!r}"
            key, attr, op, value, _ = m.groups()
            toks.append((key, attr, op, value))
            pos = m.end()
        for key, attr, op, _ in toks:
            assert key in MATCH_ONLY or key in ASSIGN_OPS_OF, f"line {n}: unknown key {key}"
            if key in WITH_ATTR and key not in ATTR_OPTIONAL:
                assert attr, f"line {n}: {key} needs {{name}}"
            if key not in WITH_ATTR:
                assert attr is None, f"line {n}: {key} takes no {{name}}"
            ok = (MATCH_OPS if key in MATCH_ONLY else set()) | (
                MATCH_OPS if key in {"NAME", "SYMLINK", "ENV", "TAG", "ATTR", "SYSCTL"} else set()
            ) | ASSIGN_OPS_OF.get(key, set())
            assert op in ok, f"line {n}: operator {op} is not valid for {key}"
        assert any(op in ASSIGN_OPS for _, _, op, _ in toks), f"line {n}: a rule that does nothing"
        rules.append((n, toks))
    labels = [v for _, t in rules for k, _, _, v in t if k == "LABEL"]
    for n, t in rules:
        for k, _, _, v in t:
            assert k != "GOTO" or v in labels, f"line {n}: GOTO {v} has no LABEL"
    return rules


def test_every_line_parses_and_every_rule_says_why() -> None:
    text = RULES.read_text()
    rules = parse_rules(text)
    assert len(rules) >= 8
    lines = text.splitlines()
    for n, toks in rules:
        if toks[0][0] == "LABEL":
            continue
        block = []
        for prev in reversed(lines[: n - 1]):
            if not prev.strip():
                break
            block.append(prev)
        assert any(p.startswith("#") for p in block), f"line {n} has no comment saying why"


@pytest.mark.parametrize(("line", "error"), [
    ('SUBSYSTEM=="tty" GROUP="x"', "malformed at column 0"),  # no comma between
    ('SUBSYSTM=="tty", GROUP="x"', "unknown key SUBSYSTM"),
    ('ACTION="add", GROUP="x"', "operator = is not valid for ACTION"),
    ('GROUP=="x", MODE="0660"', "operator == is not valid for GROUP"),
    ('ENV=="x", MODE="0660"', "ENV needs {name}"),
    ('SUBSYSTEM=="tty", MODE="0660', "malformed"),
    ('SUBSYSTEM=="tty"', "a rule that does nothing"),
    ('GOTO="nowhere"', "GOTO nowhere has no LABEL"),
])
def test_the_parser_rejects_bad_rules(line: str, error: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(error)):
        parse_rules(line)


# --- udev rules: evaluator over modelled devices -------------------------------------------

def _glob(pattern: str, value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in pattern.split("|"))


def _subst(value: str, env: dict[str, str]) -> str:
    out = re.sub(r"(?:\$env|%E)\{([^}]*)\}", lambda m: env.get(m.group(1), ""), value)
    assert "$" not in out and "%" not in out, f"substitution not modelled: {value}"
    return out


def evaluate(rules, dev: dict) -> dict:
    """Apply the rules to dev (ACTION, SUBSYSTEM, env, chain = [device, parents...])."""
    env, res = dict(dev["env"]), {"GROUP": None, "MODE": None, "SYMLINK": []}
    i, goto = 0, None
    while i < len(rules):
        toks = rules[i][1]
        i += 1
        if goto is not None:
            if ("LABEL", None, "=", goto) in toks:
                goto = None
            continue
        direct = [t for t in toks if t[2] in MATCH_OPS and t[0] not in ("SUBSYSTEMS", "ATTRS")]
        walk = [t for t in toks if t[0] in ("SUBSYSTEMS", "ATTRS")]
        if not all(_glob(v, env.get(a, "") if k == "ENV" else dev[k]) == (op == "==")
                   for k, a, op, v in direct):
            continue
        if walk and not any(all(_glob(v, (d["attrs"].get(a, "") if k == "ATTRS"
                                           else d["subsystem"])) == (op == "==")
                                for k, a, op, v in walk) for d in dev["chain"]):
            continue
        for k, a, op, v in toks:
            if op not in ASSIGN_OPS or k == "LABEL":
                continue
            if k == "GOTO":
                goto = v
            elif k == "ENV":
                env[a] = _subst(v, env)
            elif k == "SYMLINK":
                assert op == "+=", "SYMLINK= would drop the by-id links"
                res["SYMLINK"].append(_subst(v, env))
            elif k in ("GROUP", "MODE"):
                res[k] = v
            else:
                raise AssertionError(f"key {k} not modelled")
    return {**res, "env": env}


def tty(vid: str, pid: str, serial: str = "E6614C311B7A8C2F", itf: str = "00",
        action: str = "add", subsystem: str = "tty") -> dict:
    env = {"ID_BUS": "usb", "ID_VENDOR_ID": vid, "ID_MODEL_ID": pid, "ID_SERIAL_SHORT": serial,
           "ID_USB_INTERFACE_NUM": itf}
    chain = [{"subsystem": subsystem, "attrs": {}},
             {"subsystem": "usb", "attrs": {"bInterfaceNumber": itf}},
             {"subsystem": "usb", "attrs": {"idVendor": vid, "idProduct": pid}}]
    return {"ACTION": action, "SUBSYSTEM": subsystem, "env": env, "chain": chain}


@pytest.fixture(scope="module")
def rules():
    return parse_rules(RULES.read_text())


@pytest.mark.parametrize(("vid", "pid", "board"), [("2e8a", "0005", "rp2-dev"),
                                                   ("303a", "4001", "esp32s3-dev")])
@pytest.mark.parametrize("action", ["add", "change", "bind"])
def test_a_hexiao_port_gets_a_stable_name_the_group_and_no_modemmanager(
        rules, vid: str, pid: str, board: str, action: str) -> None:
    out = evaluate(rules, tty(vid, pid, action=action))
    assert out["SYMLINK"] == ["hexiao/E6614C311B7A8C2F"]
    assert (out["GROUP"], out["MODE"]) == ("hexiao", "0660")
    assert out["env"]["ID_MM_DEVICE_IGNORE"] == "1"
    assert out["env"]["HEXIAO_BOARD"] == board


@pytest.mark.parametrize("dev", [
    tty("0403", "6001"),                      # an FTDI adapter (a serial printer, say)
    tty("303a", "1001"),                      # ESP32-S3 USB-Serial/JTAG and ROM bootloader
    tty("2e8a", "000a"),                      # a Pico running the Pico SDK's stdio, not ours
    tty("2e8a", "0005", action="remove"),
    tty("2e8a", "0005", subsystem="usb"),     # the USB device node itself is not the port
], ids=["ftdi", "esp-jtag", "pico-sdk", "remove", "not-tty"])
def test_other_devices_are_left_alone(rules, dev: dict) -> None:
    out = evaluate(rules, dev)
    assert out == {"GROUP": None, "MODE": None, "SYMLINK": [], "env": dev["env"]}


def test_vid_and_pid_must_match_on_the_same_usb_device(rules) -> None:
    dev = tty("2e8a", "4001")
    dev["chain"][1]["attrs"].update(idVendor="303a", idProduct="0005")  # split across levels
    assert evaluate(rules, dev)["GROUP"] is None


@pytest.mark.parametrize(("serial", "itf"), [("", "00"), ("E6614C311B7A8C2F", "02")])
def test_no_name_without_a_serial_or_on_a_second_interface(rules, serial: str, itf: str) -> None:
    out = evaluate(rules, tty("2e8a", "0005", serial=serial, itf=itf))
    assert out["SYMLINK"] == []
    assert (out["GROUP"], out["MODE"], out["env"]["ID_MM_DEVICE_IGNORE"]) == ("hexiao", "0660",
                                                                               "1")


def test_ids_are_lowercase_hex_as_sysfs_reports_them(rules) -> None:
    ids = [v for _, t in rules for k, a, _, v in t if k == "ATTRS"]
    assert ids and all(re.fullmatch(r"[0-9a-f]{4}", v) for v in ids), ids


def test_udevadm_verify_accepts_the_rules() -> None:
    udevadm = shutil.which("udevadm")
    if udevadm is None:
        pytest.skip("udevadm is not installed here; the rules were checked by the parser and "
                    "the evaluator only")
    probe = subprocess.run([udevadm, "verify", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"this udevadm has no `verify` (systemd < 254): {probe.stderr.strip()}")
    done = subprocess.run([udevadm, "verify", "--resolve-names=never", str(RULES)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- systemd unit --------------------------------------------------------------------------

def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections -> [(key, value)] in order; keys may repeat (DeviceAllow=, SystemCallFilter=)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        assert not s.endswith("\\"), f"line {n}: continuation lines are not used here"
        if s.startswith("["):
            assert re.fullmatch(r"\[[A-Za-z]+\]", s), f"line {n}: bad section {s}"
            current = sections.setdefault(s[1:-1], [])
            continue
        assert current is not None and re.fullmatch(r"[A-Za-z]+=.*", s), f"line {n}: {s!r}"
        key, value = s.split("=", 1)
        current.append((key, value))
    return sections


def one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert len(values) == 1, f"{key}: {values}"
    return values[0]


def test_the_unit_runs_hostd_as_a_watched_notify_service_as_hexiao() -> None:
    unit = parse_unit(UNIT.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    svc = unit["Service"]
    assert one(svc, "Type") == "notify"
    assert re.fullmatch(r"[1-9][0-9]*s", one(svc, "WatchdogSec"))
    assert one(svc, "Restart") == "on-failure"
    assert one(svc, "ExecStart") == "hexiao-hostd --config /etc/hexiao/hostd.toml"
    assert (one(svc, "User"), one(svc, "Group")) == ("hexiao", "hexiao")
    assert one(svc, "SupplementaryGroups") == "dialout"
    for key in ("StateDirectory", "RuntimeDirectory", "ConfigurationDirectory"):
        assert one(svc, key) == "hexiao"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert one(svc, key) == "yes"
    assert one(svc, "ProtectSystem") == "strict"
    assert one(svc, "DevicePolicy") == "closed"
    assert {v for k, v in svc if k == "DeviceAllow"} == {"char-ttyACM rw", "char-ttyUSB rw"}
    assert "PrivateDevices" not in dict(svc)  # it would hide the device ports
    assert one(unit["Install"], "WantedBy") == "multi-user.target"


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here; the unit was checked by the parser "
                    "only")
    # control: a known-good unit must verify cleanly, or this machine cannot run the check
    (tmp_path / "control.service").write_text("[Service]\nExecStart=/bin/true\n")
    control = subprocess.run([analyze, "verify", str(tmp_path / "control.service")],
                             capture_output=True, text=True)
    if control.returncode != 0 or control.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run here: {control.stderr.strip()}")
    # the bare `hexiao-hostd` is found at boot in /usr/local/bin; here, point at this venv's
    hostd = shutil.which("hexiao-hostd", path=str(Path(sys.executable).parent))
    assert hostd, "hexiao-hostd is not installed in this venv"
    (tmp_path / inst.SERVICE.name).write_text(
        inst.render_unit(UNIT.read_text(), os.path.abspath(hostd)))
    done = subprocess.run([analyze, "verify", str(tmp_path / inst.SERVICE.name)],
                          capture_output=True, text=True)
    # systemd only warns about unknown keys and bad values: any output is a failure
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


# --- hexiao udev|service install|show ------------------------------------------------------

def run(group, *args: str):
    name = "udev" if group is inst.udev_main else "service"
    return CliRunner().invoke(group, list(args), prog_name=f"hexiao {name}")


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """udevadm and systemctl stand-ins on PATH that log their arguments (real subprocesses)."""
    bindir, log = tmp_path / "bin", tmp_path / "calls.log"
    bindir.mkdir()
    for tool in ("udevadm", "systemctl"):
        script = bindir / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n'
                          'if [ -n "$FAIL" ]; then echo "$FAIL" >&2; exit 1; fi\n')
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return log


def test_install_writes_0644_atomically_whatever_the_umask(tmp_path: Path) -> None:
    dest = tmp_path / "rules.d"
    old_umask = os.umask(0o077)
    try:
        r = run(inst.udev_main, "install", "--dest", str(dest), "--no-reload")
    finally:
        os.umask(old_umask)
    assert r.exit_code == 0, r.output
    final = dest / "99-hexiao.rules"
    assert final.read_bytes() == RULES.read_bytes()
    assert final.stat().st_mode & 0o777 == 0o644
    assert os.listdir(dest) == ["99-hexiao.rules"]  # no temporary file left
    assert f"wrote {final}" in r.stdout


def test_install_replaces_by_rename_so_a_reader_never_sees_half_a_file(tmp_path: Path) -> None:
    final = tmp_path / inst.SERVICE.name
    final.write_text("old\n")
    with final.open() as reader:
        r = run(inst.service_main, "install", "--dest", str(tmp_path), "--no-reload")
        assert r.exit_code == 0, r.output
        assert reader.read() == "old\n"  # the old inode, untouched
    assert final.read_bytes() == UNIT.read_bytes()


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch) -> None:
    final = tmp_path / inst.UDEV.name
    final.write_text("old\n")

    def broken_replace(src, dst):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(inst.os, "replace", broken_replace)
    r = run(inst.udev_main, "install", "--dest", str(tmp_path), "--no-reload")
    assert r.exit_code == inst.EXIT_CANTCREAT == 73
    assert r.stderr == (f"Error: cannot write {final}: Input/output error; "
                        "nothing was written\n")
    assert final.read_text() == "old\n" and os.listdir(tmp_path) == [inst.UDEV.name]


@pytest.mark.parametrize(("group", "extra", "hint"), [
    (inst.udev_main, [], "sudo hexiao udev install"),
    (inst.service_main, ["--dest", "{dest}"], "sudo hexiao service install --dest {dest}"),
])
def test_install_into_a_system_dir_without_root_refuses(monkeypatch, group, extra, hint) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    dest = Path(f"/etc/hexiao-test-{uuid.uuid4().hex}")
    target = inst.UDEV if group is inst.udev_main else inst.SERVICE
    where = dest if extra else target.default_dest
    existed = (where / target.name).exists()
    try:
        r = run(group, "install", *[a.format(dest=dest) for a in extra])
        assert r.exit_code == inst.EXIT_NOPERM == 77
        assert r.stderr == (f"Error: writing to {where} needs root; rerun with sudo: "
                            f"{hint.format(dest=dest)}\n")
        assert not dest.exists() and (where / target.name).exists() == existed
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_install_refuses_when_the_reload_tool_is_missing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = run(inst.udev_main, "install", "--dest", str(tmp_path / "d"))
    assert r.exit_code == inst.EXIT_UNAVAILABLE == 69
    assert r.stderr == ("Error: udevadm not found, so the udev rules could not be reloaded; "
                        "nothing was written. Install with --no-reload and reload by hand, or "
                        "install udev first\n")
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(("group", "calls"), [
    (inst.udev_main, ["udevadm control --reload-rules", "udevadm trigger --subsystem-match=tty"]),
    (inst.service_main, ["systemctl daemon-reload"]),
])
def test_install_reloads_after_writing(tmp_path, fake_tools, group, calls) -> None:
    r = run(group, "install", "--dest", str(tmp_path / "d"))
    assert r.exit_code == 0, r.output
    assert fake_tools.read_text().splitlines() == calls
    assert [line for line in r.stdout.splitlines() if line.startswith("ran: ")] == [
        f"ran: {c}" for c in calls]


def test_a_failed_reload_says_the_file_is_in_place(tmp_path, fake_tools, monkeypatch) -> None:
    monkeypatch.setenv("FAIL", "Failed to connect to bus: No such file or directory")
    r = run(inst.service_main, "install", "--dest", str(tmp_path))
    assert r.exit_code == inst.EXIT_RELOAD_FAILED == 75
    assert r.stderr == (f"Error: {tmp_path / inst.SERVICE.name} is in place, but `systemctl "
                        "daemon-reload` failed (exit 1): Failed to connect to bus: No such file "
                        "or directory; run it yourself\n")
    assert (tmp_path / inst.SERVICE.name).read_bytes() == UNIT.read_bytes()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, fake_tools) -> None:
    dest = tmp_path / "d"
    r = run(inst.udev_main, "install", "--dest", str(dest), "--dry-run")
    assert r.exit_code == 0
    size = len(RULES.read_bytes())
    assert r.stdout.splitlines() == [
        f"would write {dest}/99-hexiao.rules ({size} bytes, mode 0644, via a temporary file "
        "and rename)",
        "would run: udevadm control --reload-rules",
        "would run: udevadm trigger --subsystem-match=tty"]
    assert not dest.exists() and not fake_tools.exists()


def test_next_steps_name_the_missing_user_and_group(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(inst, "_group_exists", lambda name: False)
    monkeypatch.setattr(inst, "_user_exists", lambda name: False)
    r = run(inst.service_main, "install", "--dest", str(tmp_path), "--no-reload")
    assert r.exit_code == 0
    assert r.stderr.splitlines() == [
        "next: group hexiao does not exist (udev then leaves ports to root): sudo groupadd "
        "--system hexiao",
        "next: user hexiao does not exist (the unit runs as it): sudo useradd --system --gid "
        "hexiao --home-dir /var/lib/hexiao --no-create-home --shell /usr/sbin/nologin hexiao",
        "next: start it now and at boot: sudo systemctl enable --now hexiao-hostd"]


def test_show_prints_the_shipped_files(tmp_path: Path) -> None:
    assert run(inst.udev_main, "show").stdout == RULES.read_text()
    assert run(inst.service_main, "show").stdout == UNIT.read_text()
    hostd = tmp_path / "hexiao-hostd"
    hostd.write_text("#!/bin/sh\n")
    hostd.chmod(0o755)
    shown = run(inst.service_main, "show", "--hostd", str(hostd)).stdout
    assert one(parse_unit(shown)["Service"], "ExecStart") == (
        f"{hostd} --config /etc/hexiao/hostd.toml")


def test_data_file_prefers_the_installed_package_data(tmp_path, monkeypatch) -> None:
    (tmp_path / inst.UDEV.name).write_text("# from the package\n")
    monkeypatch.setattr(inst.importlib.resources, "files",
                        lambda package: tmp_path if package == "hexiao.udev" else None)
    assert inst.data_file(inst.UDEV.name) == "# from the package\n"
