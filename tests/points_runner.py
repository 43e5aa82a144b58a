"""A hostd stand-in for points crash tests: one credit in a subprocess, SIGKILLed at a step.

    python tests/points_runner.py JOURNAL URL APPID SECRET CODE CARD_ID TOTAL_FEN RECEIPT NOW
        [--kill-at STEP] [--void-of ID]

The ledger row is planned (hook "planned"), then credited; the crediter calls its hook right
after each ledger write ("sent", "done") and after add_bonus replied ("replied"). At STEP this
process kills itself with SIGKILL (as a crash or `kill -9`). Otherwise it prints the result.
--void-of ID: the row is a void taking back credit row ID (members/service.py's void row).
"""

from __future__ import annotations

import argparse
import json
import os
import signal

from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.journal import Journal
from hexiao.hostd.members.credit import Crediter
from hexiao.hostd.members.ledger import Ledger


def main() -> None:
    p = argparse.ArgumentParser()
    for name in ("journal", "url", "appid", "secret", "code", "card_id"):
        p.add_argument(name)
    p.add_argument("total_fen", type=int)
    p.add_argument("receipt")
    p.add_argument("now", type=float)
    p.add_argument("--kill-at", default=None)
    p.add_argument("--void-of", type=int, default=None)
    a = p.parse_args()

    def hook(step: str) -> None:
        if step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    with Journal(a.journal) as journal, \
            WeChatCardClient(a.url, a.appid, a.secret, sleep=lambda s: None) as client:
        ledger = Ledger(journal)
        detail = {} if a.void_of is None else {"void_of": a.void_of}
        credit = ledger.plan(a.receipt, "lane-1", a.code, a.card_id, a.total_fen, a.now, detail)
        hook("planned")
        r = Crediter(ledger, client, hook=hook).credit(credit, a.now)
    print(json.dumps({"outcome": r.outcome, "points": r.points, "bonus": r.bonus}))


if __name__ == "__main__":
    main()
