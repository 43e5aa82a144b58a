"""One rule for the files that hold secrets or coupon codes, checked the same way by
`hexiao-hostd --check-config`, hostd's start-up and `hexiao doctor`.

Rules this module keeps:
- Secret files (backend secret, merchant private key, APIv3 key, device keystore, tap key, fleet
  keys) and the journal (full coupon codes) must be owned by hostd's user and readable by nobody
  else (no group or other bits: chmod 600); the state folder that holds them must not be open to
  group or others (chmod 700). keystore.check_private is the file check; this module only lists
  which files a configuration names and adds the folder rule.
- A file that does not exist yet is not a problem here (hostd creates the journal and keystore
  0600; a missing secret file is reported where it is read).
- Nothing is chmod-ed on anyone's behalf: a file that others could read may already have been
  read, so the fix (and replacing the secret) is the owner's; the message says what to run.
- Every configured device needs its key in the keystore (missing_keys): `--check-config` fails
  on one without, naming the `hexiao provision` command that adds it; hostd starts all the
  same and shows that device as "no key" until the key is there (hostd/lanes/lane.py).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from hexiao.hostd.config.types import Config, Device
from hexiao.hostd.keystore import Keystore, KeystoreError, check_private


def private_paths(cfg: Config) -> list[tuple[str, Path]]:
    """(setting, path) for every file of `cfg` that must be private, in config order."""
    b, h = cfg.backend, cfg.hostd
    named: list[tuple[str, Path | None]] = [
        ("backend.secret_file", b.secret_file),
        ("backend.private_key_file", b.private_key_file),
        ("backend.apiv3_key_file", b.apiv3_key_file),
        ("keystore.path", cfg.keystore.path or h.state_dir / "keystore.jsonl"),
        ("hostd.journal", h.journal or h.state_dir / "journal.sqlite3"),
    ]
    if cfg.tap.enabled:
        named.append(("tap.key_file", cfg.tap.key_file))
    return [(what, Path(p)) for what, p in named if p is not None]


def problems(cfg: Config) -> list[str]:
    """Every file or folder of `cfg` that breaks the rule, one line each with its fix."""
    out = []
    state = Path(cfg.hostd.state_dir)
    try:
        st = state.stat()
    except FileNotFoundError:
        st = None
    except OSError as e:
        out.append(f"hostd.state_dir {state}: cannot read: {e.strerror}")
        st = None
    if st is not None and stat.S_IMODE(st.st_mode) & (stat.S_IRWXG | stat.S_IRWXO):
        out.append(f"hostd.state_dir {state}: mode {stat.S_IMODE(st.st_mode):04o} lets other "
                   f"users in (it holds the journal and the device keys): chmod 700 {state}")
    for what, path in private_paths(cfg):
        try:
            check_private(path, os.stat(path),
                          "full coupon codes" if what == "hostd.journal" else "keys")
        except FileNotFoundError:
            continue
        except KeystoreError as e:
            out.append(f"{what}: {e}")
        except OSError as e:
            out.append(f"{what}: {path}: cannot read: {e.strerror}")
    return out


def keystore_path(cfg: Config) -> Path:
    return Path(cfg.keystore.path or cfg.hostd.state_dir / "keystore.jsonl")


def provision_hint(cfg: Config, dev: Device) -> str:
    """The command that gives `dev` its key (on the device and in hostd's keystore)."""
    where = f"--port {dev.port}" if dev.port and "://" not in dev.port else "--port PORT"
    config = f" --config {cfg.source}" if cfg.source else f" --keystore {keystore_path(cfg)}"
    return f"hexiao provision {where} --id {dev.id} --lane {dev.lane}{config}"


def missing_keys(cfg: Config) -> list[str]:
    """One line per configured device without a key in the keystore, with the command that adds
    it. An unsafe or unreadable keystore is problems()'s to report: nothing here then."""
    path = keystore_path(cfg)
    try:
        ids = set(Keystore(path).ids())
    except KeystoreError:
        if path.exists():
            return []
        ids = set()  # hostd creates it empty at start
    return [f"device {dev.id}: no key in the keystore {path}: {provision_hint(cfg, dev)}"
            for dev in cfg.devices if dev.kid not in ids]
