"""Points claimed from a receipt's QR, for customers who did not show their card at the till:
the claim API hexiao-hostd serves on `[tap] claim_listen`.

How a merchant's WeChat page calls it: the receipt's QR carries the tap's signed token
(`[tap] content`, e.g. "https://shop.example/points?t={token}"). The merchant's page (the
member card's custom URL, which WeChat opens with the card's card_id and encrypt_code) posts

    POST /points/claim   {"token": "<t>", "card_id": "<card_id>", "encrypt_code": "<...>"}
                      or {"token": "<t>", "card_id": "<card_id>", "code": "<member code>"}

and shows the answer: 200 {"ok": true, "points": 32, "bonus": 152}; 202 {"ok": true,
"pending": true} (accepted, credited as soon as the card API answers); otherwise
{"ok": false, "error": E, "message": "..."} with 400 bad_request | bad_token (forged, altered,
not one of this store's), 403 not_member (not a member card of this merchant), 409
already_claimed (also: credited at the till), 410 expired (older than `claim_max_age_s`),
no_points (no total, a refund) or voided (the POS voided the sale), 422 not_credited, 502
backend. GET /points/claim?t=TOKEN is a
minimal claim page (a form for the member code) for the demo.

Rules this module keeps:
- The token is verified first (hostd/tap/inject.verify_token: MAC in constant time, canonical
  encoding only) with the tap's key; nothing else is looked at for a token that fails.
- A receipt is credited once whichever way: the claim and the till write the same ledger row
  (the lane and the receipt digest's first 12 bytes, ledger.py), unique in the journal's file:
  a second claim, or a claim of a receipt credited at the till, is refused durably (409).
- The member card is checked with the card API (card/code/get, card/get): a code of another
  merchant, or not a member card, credits nothing.
- Crediting is credit.py's: write-ahead, never repeated blindly; a claim whose credit is left
  pending (backend down) is finished by the points service's reconcile, never by a retry here.
- Bodies are small JSON (at most MAX_BODY bytes); member codes and tokens are never logged
  whole (codes by their last 4 characters).
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from hexiao.hostd.backends.base import WeChatError
from hexiao.hostd.journal import Journal
from hexiao.hostd.members.credit import Crediter
from hexiao.hostd.members.ledger import Duplicate, Ledger
from hexiao.hostd.members.service import to_fen
from hexiao.hostd.redeem import tail
from hexiao.hostd.tap.inject import TokenError, verify_token

log = logging.getLogger("hexiao.points.claim")
MAX_BODY = 4096
_STATUS = {"bad_request": 400, "bad_token": 400, "not_member": 403, "already_claimed": 409,
           "expired": 410, "no_points": 410, "voided": 410, "not_credited": 422,
           "backend": 502}


class ClaimError(Exception):
    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


def token_key(lane: str, digest_hex: str) -> str:
    """The ledger's receipt key of a token (the same as the till's, service.receipt_key)."""
    return f"{lane}|{digest_hex}"


class Claims:
    """The claim logic (no HTTP): claim() answers one request's JSON body."""

    def __init__(self, journal_path: str | Path, client_factory: Callable[[], Any],
                 keys: Iterable[bytes], *, max_age_s: float = 7 * 86_400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.journal_path, self._client_factory = Path(journal_path), client_factory
        self._keys, self.max_age_s, self._clock = tuple(keys), max_age_s, clock

    def claim(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            return 200, self._claim(body)
        except ClaimError as e:
            return _STATUS[e.error], {"ok": False, "error": e.error, "message": str(e)}

    def _claim(self, body: dict[str, Any]) -> dict[str, Any]:
        token, card_id = body.get("token"), body.get("card_id")
        code, encrypted = body.get("code"), body.get("encrypt_code")
        if not isinstance(token, str) or not isinstance(card_id, str) or not card_id or (
                not isinstance(code, str) or not code) == (
                not isinstance(encrypted, str) or not encrypted):
            raise ClaimError("bad_request", "send token, card_id and one of code or "
                                            "encrypt_code (strings)")
        try:
            info = verify_token(self._keys, token)
        except TokenError as e:
            log.warning("claim refused: token does not verify (%s)", e)
            raise ClaimError("bad_token", "this receipt code is not valid") from None
        now = self._clock()
        if now - info.time > self.max_age_s:
            raise ClaimError("expired", f"receipts can be claimed for "
                                        f"{self.max_age_s / 86_400:g} days")
        fen = to_fen(info.total)
        if fen is None or fen <= 0:
            raise ClaimError("no_points", "this receipt earns no points")
        client = self._client_factory()
        try:
            return self._credit(client, info.lane, info.digest, card_id, code, encrypted,
                                fen, now)
        finally:
            close = getattr(client, "close", None)
            if close is not None:
                close()

    def _credit(self, client: Any, lane: str, digest: str, card_id: str, code: str | None,
                encrypted: str | None, fen: int, now: float) -> dict[str, Any]:
        try:
            if encrypted:
                code = client.decrypt(encrypted)
            assert code is not None
            got = client.get_code(code, card_id, check_consume=False)
            card = client.get_card(got.card_id)
        except WeChatError as e:
            if e.errcode in (40056, 40075, 40073):  # not this merchant's code or card
                raise ClaimError("not_member", "not a member card of this shop") from None
            raise ClaimError("backend", "the card service did not answer; try again") from None
        if card.get("card_type") != "MEMBER_CARD" or got.card_id != card_id:
            raise ClaimError("not_member", "not a member card of this shop")
        with Journal(self.journal_path) as journal:
            ledger = Ledger(journal)
            try:
                try:
                    credit = ledger.plan(token_key(lane, digest), lane, code, card_id, fen, now,
                                         {"via": "claim"})
                except Duplicate:
                    row = ledger.by_receipt(token_key(lane, digest))
                    if row is not None and row.reason == "voided":
                        log.info("claim refused: receipt %s was voided", digest[:8])
                        raise ClaimError("voided", "this sale was cancelled") from None
                    log.info("claim refused: receipt %s already credited", digest[:8])
                    raise ClaimError("already_claimed",
                                     "this receipt's points were already given") from None
                r = Crediter(ledger, client).credit(credit, now)
            finally:
                ledger.close()
        log.info("claim: receipt %s for member %s: %s %+d", digest[:8], tail(code), r.outcome,
                 r.points)
        if r.outcome == "credited":
            return {"ok": True, "points": r.points, "bonus": r.bonus}
        if r.outcome in ("pending", "unknown"):
            return {"ok": True, "pending": True}
        if r.outcome == "nothing":
            raise ClaimError("no_points", f"this receipt earns no points ({r.why})")
        raise ClaimError("not_credited", f"points not added ({r.why})")


_PAGE = """<!doctype html><meta charset="utf-8"><meta name="viewport"
content="width=device-width"><title>领取积分</title><h1>领取积分 Claim points</h1>
<form id="f"><input type="hidden" name="token" value="{token}">
<label>会员卡 card_id <input name="card_id" required></label><br>
<label>会员卡号 code <input name="code" required></label><br>
<button>领取 Claim</button></form><p id="out"></p><script>
document.getElementById("f").onsubmit = async (e) => {{
  e.preventDefault();
  const body = Object.fromEntries(new FormData(e.target));
  const r = await fetch("/points/claim", {{method: "POST", body: JSON.stringify(body),
    headers: {{"Content-Type": "application/json"}}}});
  const a = await r.json();
  document.getElementById("out").textContent = a.ok ? (a.pending ? "稍后到账 pending" :
    "积分 +" + a.points + " 共 " + a.bonus) : a.message;
}};</script>
"""


class ClaimServer:
    """The claim API over HTTP on `listen` (HOST:PORT; port 0: a free one)."""

    def __init__(self, claims: Claims, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        self.claims = claims
        handler = type("Handler", (_Handler,), {"claims": claims})
        self._httpd = ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
        self._httpd.daemon_threads = True
        self.address = self._httpd.server_address[:2]
        self.url = f"http://{self.address[0]}:{self.address[1]}"
        self._thread: threading.Thread | None = None

    def start(self) -> ClaimServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="hexiao-claim", daemon=True)
        self._thread.start()
        log.info("points claim API on %s", self.url)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    claims: Claims
    server_version = "hexiao-claim"

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        if url.path != "/points/claim":
            self._send(404, {"ok": False, "error": "not_found", "message": "no such page"})
            return
        token = parse_qs(url.query).get("t", [""])[0]
        page = _PAGE.format(token=html.escape(token, quote=True)).encode()
        self._raw(200, page, "text/html; charset=utf-8")

    def do_POST(self) -> None:
        if urlsplit(self.path).path != "/points/claim":
            self._send(404, {"ok": False, "error": "not_found", "message": "no such page"})
            return
        try:
            length = int(self.headers.get("Content-Length") or -1)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self._send(400, {"ok": False, "error": "bad_request",
                             "message": f"send a JSON body of at most {MAX_BODY} bytes"})
            return
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            self._send(400, {"ok": False, "error": "bad_request",
                             "message": "send a JSON object"})
            return
        self._send(*self.claims.claim(body))

    def _send(self, status: int, obj: dict[str, Any]) -> None:
        self._raw(status, json.dumps(obj, ensure_ascii=False).encode(),
                  "application/json; charset=utf-8")

    def _raw(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the request line holds the token: the claim's own log lines say what happened
