"""A hostd stand-in for crash tests: one redemption in a subprocess, SIGKILLed at a named step.

    python tests/redeem_runner.py JOURNAL URL APPID SECRET CODE NOW --kill-at STEP

The engine calls its hook right after each journal write; at STEP this process kills itself with
SIGKILL (no cleanup, no flush: as a crash or `kill -9`). Without --kill-at (or if the step never
comes) it prints the verdict as JSON and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal

from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.redeem import Engine, LaneConfig


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("journal", "url", "appid", "secret", "code"):
        p.add_argument(name)
    p.add_argument("now", type=float)
    p.add_argument("--kill-at", default=None)
    p.add_argument("--no-verify", action="store_true")
    a = p.parse_args()

    def hook(step: str) -> None:
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    config = LaneConfig(lane=f"pid-{os.getpid()}", verify_unknown=not a.no_verify)
    with Journal(a.journal) as journal, \
            WeChatCardClient(a.url, a.appid, a.secret, sleep=lambda s: None) as client:
        verdict = Engine(journal, client, config, hook).redeem(a.code, a.now)
    print(json.dumps(dataclasses.asdict(verdict), ensure_ascii=False))


if __name__ == "__main__":
    main()
