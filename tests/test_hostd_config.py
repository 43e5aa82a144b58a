"""hostd config (TOML -> dataclasses, every error named), keystore (0600, atomic), log redaction."""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import traceback
from pathlib import Path

import pytest
import structlog
from hexiao.hostd import config
from hexiao.hostd.keystore import Keystore, KeystoreError
from hexiao.hostd.observability import logs
from hexiao.hostd.redeem import LaneConfig

EXAMPLE = Path(config.__file__).with_name("hostd.example.toml")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "hostd.toml"
    p.write_text(text, encoding="utf-8")
    return p


def errors_of(tmp_path: Path, text: str) -> list[str]:
    p = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as ei:
        config.load(p)
    assert str(ei.value) == "\n".join(ei.value.errors)
    return [e.removeprefix(f"config {p}: ") for e in ei.value.errors]


# ---- config: what loads ------------------------------------------------------------------------

def test_example_loads_with_every_section() -> None:
    c = config.load(EXAMPLE)
    assert c.backend.kind == "sim" and c.hostd.log_level == "info"
    assert c.devices[0].kid == b"hx-0001" and c.devices[0].match == config.UsbMatch(
        "E6614103E7452D2F", "2e8a", "000a")
    assert c.macros["CASH"].items == ((0x42, 0), "{reduce_cost_yuan}", (0x28, 0))
    assert c.lane("lane-1") == config.Lane() and c.tap == config.Tap()
    assert c.source == EXAMPLE


def test_example_documents_every_key() -> None:
    text = EXAMPLE.read_text(encoding="utf-8")
    for cls, keys in config._SCHEMA.items():
        for key in keys:
            assert f"{key} =" in text, f"{cls.__name__}.{key} missing from the example"


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, ""))
    assert c.hostd.state_dir == Path("/var/lib/hexiao")
    assert c.hostd.journal == Path("/var/lib/hexiao/journal.sqlite3")
    assert c.keystore.path == Path("/var/lib/hexiao/keystore.jsonl")
    assert c.backend == config.Backend() and c.backend.timeout_s == 5.0
    assert c.lanes == (config.Lane(),) and c.devices == () and c.macros == {}
    assert not c.tap.enabled


def test_values_convert_and_relative_paths_follow_the_file(tmp_path: Path) -> None:
    c = config.load(write(tmp_path, """
[hostd]
state_dir = "state"
[backend]
kind = "wechat_card"
appid = "wx0123456789abcdef"
secret_file = "wechat.secret"
timeout_s = 3
settle_after_s = 30
[[lane]]
name = "front"
allowed_card_ids = ["pXyz"]
location_id = 42
[[device]]
id = "hex:0a0b"
port = "loop://"
lane = "front"
"""))
    assert c.hostd.journal == tmp_path / "state" / "journal.sqlite3"
    assert c.backend.secret_file == tmp_path / "wechat.secret"
    assert c.backend.base_url == "https://api.weixin.qq.com"
    assert c.backend.timeout_s == 3.0 and isinstance(c.backend.timeout_s, float)
    assert c.devices[0].kid == b"\x0a\x0b"
    assert c.lanes[0].engine_config() == LaneConfig(
        "front", "auto", frozenset({"pXyz"}), 42, None, True, ())


def test_card_client_args_read_a_private_secret(tmp_path: Path) -> None:
    secret = tmp_path / "wechat.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"s3cr3t-value\n")
    os.close(fd)
    c = config.load(write(tmp_path, '[backend]\nkind = "wechat_card"\nappid = "wx1"\n'
                                    'secret_file = "wechat.secret"\n'))
    args = c.backend.card_client_args()
    assert args["secret"] == "s3cr3t-value" and args["token_url"] is None
    os.chmod(secret, 0o640)
    with pytest.raises(config.ConfigError) as ei:
        c.backend.card_client_args()
    assert ei.value.errors == [f"{secret}: mode 0640 lets other users read it; a key file must "
                               f"be private: chmod 600 {secret} (and replace the keys if others "
                               f"may have read them)"]


# ---- config: each error class ----------------------------------------------------------------

def test_bad_type_names_key_expectation_and_value(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[backend]\ntimeout_s = "fast"\n') == [
        'backend.timeout_s: expected a number of seconds > 0, got "fast"']


def test_message_starts_with_the_file(tmp_path: Path) -> None:
    p = write(tmp_path, "[hostd]\nlog_level = 3\n")
    with pytest.raises(config.ConfigError) as ei:
        config.load(p)
    assert ei.value.errors == [f'config {p}: hostd.log_level: expected one of "debug", "info", '
                               f'"warning", "error", got 3']


@pytest.mark.parametrize(("text", "error"), [
    ("[backend]\ntimeout_s = 0\n", "backend.timeout_s: expected a number of seconds > 0, got 0"),
    ("[backend]\ntimeout_s = true\n",
     "backend.timeout_s: expected a number of seconds > 0, got true"),
    ("[backend]\nretries = 11\n", "backend.retries: expected an integer 0..10, got 11"),
    ("[tap]\nmodule = 17\n", "tap.module: expected an integer 1..16, got 17"),
    ("[macros.CASH]\nitems = [\"x\"]\ndelay_ms = -1\n",
     "macros.CASH.delay_ms: expected an integer 0..1000, got -1"),
    ('[hostd]\nmetrics_listen = "9464"\n',
     'hostd.metrics_listen: expected HOST:PORT, e.g. "127.0.0.1:9100", got "9464"'),
    ('[[device]]\nid = "an-id-longer-than-16"\nport = "loop://"\n',
     'device[0].id: expected a device id of 1..16 bytes: text, or "hex:" and hex digits, '
     'got "an-id-longer-than-16"'),
])
def test_out_of_range(tmp_path: Path, text: str, error: str) -> None:
    assert errors_of(tmp_path, text) == [error]


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    assert errors_of(tmp_path, "[backend]\ntimout_s = 3\n") == [
        'backend.timout_s: unknown key; did you mean "timeout_s"?']
    assert errors_of(tmp_path, "[hostd]\nzzz = 1\n") == [
        "hostd.zzz: unknown key; known keys: state_dir, control_socket, journal, log_level, "
        "metrics_listen, web_listen, capture_max_bytes"]
    assert errors_of(tmp_path, "[backnd]\n") == [
        'backnd: unknown section; did you mean "backend"?']
    assert errors_of(tmp_path, "[macros.CAHS]\nitems = [\"x\"]\n") == [
        'macros.CAHS: unknown card type; did you mean "CASH"?']


def test_inline_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, '[backend]\nsecret = "hunter2-appsecret"\n'
                               '[tap]\nkey = "00112233445566778899aabbccddeeff"\n')
    assert errs == [
        "backend.secret: secrets do not belong in the config file: put it in a file only "
        "hostd's user can read (chmod 600) and set backend.secret_file",
        "tap.key: secrets do not belong in the config file: put it in a file only "
        "hostd's user can read (chmod 600) and set tap.key_file"]


def test_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "nope.toml"
    with pytest.raises(config.ConfigError) as ei:
        config.load(p)
    assert ei.value.errors == [f"config {p}: no such file (copy hostd.example.toml there and "
                               f"edit it, or give another path)"]


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    assert errors_of(tmp_path, '[hostd]\nlog_level = "info"\nstate_dir "x"\n') == [
        "line 3, column 11: TOML syntax error: Expected '=' after a key in a key/value pair"]


def test_every_error_is_reported_at_once(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, """
[backend]
kind = "wechat_card"
timeout_s = "fast"
settle_after_s = 2
[[lane]]
name = "front"
[[lane]]
name = "front"
[[device]]
port = "loop://"
lane = "back"
match = { serial = "X", vendr = "2e8a" }
[tap]
enabled = true
content = "{token} {nope}"
""")
    assert errs == [
        'backend.timeout_s: expected a number of seconds > 0, got "fast"',
        'device[0].match.vendr: unknown key; did you mean "vendor"?',
        "device[0].id: required key missing: expected a device id of 1..16 bytes: text, or "
        '"hex:" and hex digits',
        "backend.settle_after_s: expected more than backend.timeout_s (5): a younger consume "
        "may still land, got 2",
        'backend.appid: required for kind "wechat_card": expected an appid, '
        'e.g. "wx1234567890abcdef"',
        "backend.secret_file: required for kind \"wechat_card\": expected a file or folder path",
        'lane[1].name: "front" is already used by lane[0]',
        "device[0]: expected exactly one of port or match, got both",
        'device[0].lane: expected a [[lane]] name (front, front), got "back"',
        "tap.content: expected a template over digest, epoch, index, lane, time, token, total, "
        'got "{token} {nope}"',
        "tap.printer: required when tap.enabled = true: expected tcp:HOST:PORT, file:PATH or "
        "serial:DEVICE[@BAUD]",
        "tap.key_file: required when tap.content uses {token}: expected the path of the tap "
        "key file",
        'tap.lane: expected a [[lane]] name (front, front), got "lane-1"',
    ]


def test_shape_errors(tmp_path: Path) -> None:
    assert errors_of(tmp_path, 'hostd = 3\n[device]\nid = "a"\n') == [
        "hostd: expected a table, got 3",
        "device: expected an array of tables ([[device]]), got a table"]
    assert errors_of(tmp_path, "[macros.DISCOUNT]\nitems = [[300, 0]]\n") == [
        "macros.DISCOUNT.items: expected 1..16 items, each a text of 1..48 characters or a "
        "[keycode, modifiers] pair of integers 0..255, got [[300, 0]]"]
    assert errors_of(tmp_path, '[macros.CASH]\nitems = ["{amount}"]\n') == [
        "macros.CASH.items: expected templates over card_id, code_tail, discount, gift, "
        "least_cost, least_cost_yuan, reduce_cost, reduce_cost_yuan, title, got [\"{amount}\"]"]


# ---- keystore -----------------------------------------------------------------------------------

KEY = bytes(range(32))


def test_keystore_created_0600_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "state" / "keys.jsonl"
    ks = Keystore(path, create=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and ks.ids() == []
    ks.add(b"hx-0001", KEY)
    ks.add(b"\x00\xff", bytes(32))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(path.parent)) == ["keys.jsonl"]  # no temp file left behind
    again = Keystore(path)
    assert again.get(b"hx-0001") == KEY and again(bytearray(b"\x00\xff")) == bytes(32)
    assert again.get(b"other") is None and again.ids() == [b"hx-0001", b"\x00\xff"]
    assert json.loads(path.read_text().splitlines()[0]) == {"id": b"hx-0001".hex(),
                                                            "key": KEY.hex()}
    assert again.remove(b"hx-0001") and not again.remove(b"hx-0001")
    assert Keystore(path).ids() == [b"\x00\xff"]


def test_keystore_add_refuses_duplicates_and_bad_sizes(tmp_path: Path) -> None:
    ks = Keystore(tmp_path / "k", create=True)
    ks.add(b"d1", KEY)
    with pytest.raises(ValueError, match=r"^device 6431 already has a key \(replace=True"):
        ks.add(b"d1", bytes(32))
    ks.add(b"d1", bytes(32), replace=True)
    assert ks.get(b"d1") == bytes(32)
    with pytest.raises(ValueError, match=r"^a device key is 32 bytes, got 31$"):
        ks.add(b"d2", KEY[:31])
    with pytest.raises(ValueError, match=r"^a device id is 1\.\.16 bytes, got 17$"):
        ks.add(bytes(17), KEY)


def test_keystore_keeps_other_writers_changes(tmp_path: Path) -> None:
    a = Keystore(tmp_path / "k", create=True)
    b = Keystore(tmp_path / "k")
    a.add(b"one", KEY)
    b.add(b"two", KEY)  # b re-reads before writing: "one" survives
    assert Keystore(tmp_path / "k").ids() == [b"one", b"two"]


def test_group_readable_keystore_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    Keystore(path, create=True).add(b"d1", KEY)
    os.chmod(path, 0o644)
    with pytest.raises(KeystoreError) as ei:
        Keystore(path)
    assert str(ei.value) == (f"{path}: mode 0644 lets other users read it; a key file must be "
                             f"private: chmod 600 {path} (and replace the keys if others may "
                             f"have read them)")
    assert KEY.hex() not in str(ei.value)


def test_keystore_owned_by_another_user_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "keys.jsonl"
    Keystore(path, create=True)
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)  # as if hostd ran as another user
    with pytest.raises(KeystoreError) as ei:
        Keystore(path)
    assert str(ei.value) == (f"{path}: owned by uid {me}, not by this user (uid {me + 1}); run "
                             f"as the owner, or chown it to this user and chmod 600 {path}")


def test_missing_and_malformed_keystores_never_show_key_bytes(tmp_path: Path) -> None:
    with pytest.raises(KeystoreError, match=r"no such keystore \(provision a device first"):
        Keystore(tmp_path / "absent")
    path = tmp_path / "k"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    secret_hex = KEY.hex()
    os.write(fd, f'{{"id": "6431", "key": "{secret_hex}"}}\n{{"id": "6432", "key": '
                 f'"{secret_hex[:-2]}"}}\n'.encode())
    os.close(fd)
    with pytest.raises(KeystoreError) as ei:
        Keystore(path)
    assert str(ei.value) == (f"{path} line 2: id must be 1..16 bytes and key 32 bytes "
                             f"(key has 31)")
    assert ei.value.__context__ is None
    os.truncate(path, 0)
    os.write(fd := os.open(path, os.O_WRONLY), f'{{"id": "64", "key": "{secret_hex}zz"}}\n'
             .encode())
    os.close(fd)
    with pytest.raises(KeystoreError) as ei:
        Keystore(path)
    assert str(ei.value) == f'{path} line 1: expected {{"id": HEX, "key": HEX}}'
    assert ei.value.__suppress_context__  # the cause holds the line: never shown
    assert secret_hex[:20] not in "".join(traceback.format_exception(ei.value))


def test_keystore_repr_has_no_key_bytes(tmp_path: Path) -> None:
    ks = Keystore(tmp_path / "k", create=True)
    ks.add(b"d1", KEY)
    for text in (repr(ks), str(ks), f"{ks}"):
        assert text == f"Keystore({str(tmp_path / 'k')!r}, 1 keys)"
        assert KEY.hex() not in text


def handshake(host_keys: Keystore, device_key: bytes) -> bool:
    from hexiao.protocol.link import DEVICE, HOST, Link
    host = Link(HOST, os.urandom, keystore=host_keys.get)
    dev = Link(DEVICE, os.urandom, device_id=b"d1", device_key=device_key,
               hello={"firmware": "1.0.0", "board": "sim"})
    dev.connect(0)
    for _ in range(4):
        host.receive(dev.data_to_send(), 0)
        dev.receive(host.data_to_send(), 0)
    return host.is_open() and dev.is_open()


def test_a_link_opens_with_the_keystores_key_only(tmp_path: Path) -> None:
    ks = Keystore(tmp_path / "k", create=True)
    ks.add(b"d1", KEY)
    assert handshake(Keystore(tmp_path / "k"), KEY)
    assert not handshake(Keystore(tmp_path / "k"), bytes(32))  # a device with another key


# ---- log redaction, through real structlog output ----------------------------------------------

@pytest.fixture
def captured():
    stream = io.StringIO()
    logs.configure("debug", stream)
    yield stream
    structlog.reset_defaults()
    logs.clear_secrets()
    root = logging.getLogger()
    for h in [h for h in root.handlers if h.get_name() == "hexiao-json"]:
        root.removeHandler(h)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_tokens_and_keys_never_reach_the_output(captured: io.StringIO) -> None:
    token = "ACCESS_TOKEN_9f8e7d6c5b4a39281706"
    device_key = bytes(range(100, 132))
    log = structlog.get_logger("hexiao.test")
    log.info("token refreshed", access_token=token, device_key=device_key.hex(),
             nested={"deeper": [{"secret": "appsecret-xyz"}], "key": device_key})
    out = captured.getvalue()
    assert token not in out and device_key.hex() not in out and "appsecret-xyz" not in out
    assert lines(captured) == [{"event": "token refreshed", "access_token": "[redacted]",
                                "device_key": "[redacted]", "level": "info",
                                "nested": {"deeper": [{"secret": "[redacted]"}],
                                           "key": "[redacted]"},
                                "timestamp": lines(captured)[0]["timestamp"]}]


def test_coupon_codes_keep_their_last_four(captured: io.StringIO) -> None:
    log = structlog.get_logger()
    log.info("scan", code="123456789012", scan={"data": b"987654321098", "symbology": "]Q1"},
             scanned=123456789012, lane="lane-1")
    [rec] = lines(captured)
    assert rec["code"] == "********9012" and rec["scanned"] == "********9012"
    assert rec["scan"] == {"data": "********1098", "symbology": "]Q1"}
    assert "123456789012" not in captured.getvalue() and rec["lane"] == "lane-1"
    assert logs.mask_code("1234") == "****"


def test_registered_secrets_are_masked_in_any_string(captured: io.StringIO) -> None:
    token = "TOKEN-registered-0123456789"
    logs.register_secret(token)
    logs.register_secret(KEY)
    log = structlog.get_logger()
    log.warning(f"GET /cgi-bin/card/code/get?access_token={token}", note=f"was {token}",
                why=f"device key {KEY.hex()} rejected")
    try:
        raise RuntimeError(f"failed with {token}")
    except RuntimeError:
        log.exception("boom")
    out = captured.getvalue()
    assert token not in out and KEY.hex() not in out
    first, second = lines(captured)
    assert first["event"] == "GET /cgi-bin/card/code/get?access_token=[redacted]"
    assert first["note"] == "was [redacted]" and first["why"] == "device key [redacted] rejected"
    assert "RuntimeError: failed with [redacted]" in second["exception"]


def test_stdlib_loggers_go_through_the_same_chain(captured: io.StringIO) -> None:
    logging.getLogger("httpx").warning("GET https://x/cgi-bin/token?appid=wx1&secret=abcdef123"
                                       "&grant_type=client_credential")
    [rec] = lines(captured)
    assert rec["event"] == ("GET https://x/cgi-bin/token?appid=wx1&secret=[redacted]"
                            "&grant_type=client_credential")
    assert rec["logger"] == "httpx" and rec["level"] == "warning"
    assert "abcdef123" not in captured.getvalue()


def test_level_filters_and_bad_level(captured: io.StringIO) -> None:
    logs.configure("warning", captured)
    structlog.get_logger().info("hidden")
    structlog.get_logger().error("shown")
    assert [r["event"] for r in lines(captured)] == ["shown"]
    with pytest.raises(ValueError, match=r"^log level must be one of debug, info, warning, "
                                         r"error, got 'loud'$"):
        logs.configure("loud", captured)
