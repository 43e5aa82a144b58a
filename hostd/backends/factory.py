"""make_backend(): the backend a config names, as a source of per-thread clients.

Rules this module keeps:
- client() makes a new client each call: every thread (lane worker, reconcile) has its own
  (httpx clients and requests sessions are not shared between threads). The WeChat card API's
  access token is the exception: one TokenCache (`tokens`) per configured backend, shared by
  all its clients, so one hostd holds one token and never replaces its own.
- on_token_refused(errcode) is called for every API answer refusing that token (40001/42001):
  the daemon counts them in its metrics.
- kind = "sim" with no base_url (and no backend_url): an embedded WeChat simulator on loopback,
  started here and stopped by close(); its example seed's credentials are used.
- wechatpay_busifavor builds one client at once: a wrong key, or a platform that cannot be
  reached, says so at start rather than at the first scan.
- A backend that cannot be set up raises SetupError with the message hostd shows (one line,
  what to fix); secrets are read here, from their 0600 files, never logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hexiao.hostd.backends.base import CardBackend, WeChatError
from hexiao.hostd.backends.tokens import TokenCache
from hexiao.hostd.config.types import BASE_URLS, ConfigError

if TYPE_CHECKING:
    from hexiao.hostd.backends.sim.server import WeChatSim
    from hexiao.hostd.config.types import Config

log = logging.getLogger("hexiao.hostd")


class SetupError(Exception):
    """The configured backend cannot be used; the message says what to fix."""


class ConfiguredBackend:
    """A configured backend: client() for each thread, close() at the end."""

    def __init__(self, kind: str, url: str, make: Callable[[], CardBackend],
                 sim: WeChatSim | None = None, tokens: TokenCache | None = None) -> None:
        self.kind, self.url, self.sim = kind, url, sim
        self.tokens = tokens  # the WeChat card API's shared token cache (None: busifavor)
        self._make = make

    def client(self) -> CardBackend:
        return self._make()

    def close(self) -> None:
        if self.sim is not None:
            self.sim.stop()
            self.sim = None


def make_backend(config: Config, backend_url: str | None = None, *,
                 on_token_refused: Callable[[int], None] | None = None,
                 clock: Callable[[], float] | None = None) -> ConfiguredBackend:
    """The backend of `config` ([backend]); backend_url overrides its base_url. clock: one
    clock for the tokens and the card cache (a test's simulated time; default the real ones)."""
    b = config.backend
    if b.kind == "wechatpay_busifavor":
        return _busifavor(config, backend_url)
    from hexiao.hostd.backends.wechat_card import WeChatCardClient

    try:
        args = b.card_client_args()
    except ConfigError as e:
        raise SetupError(f"backend: {e}") from e
    sim = None
    if backend_url:
        args["base_url"] = backend_url
    elif b.kind == "sim" and not b.base_url:
        from hexiao.hostd.backends.sim.seed import EXAMPLE, read
        from hexiao.hostd.backends.sim.server import WeChatSim

        sim = WeChatSim(read(EXAMPLE)).start()
        app = next(iter(sim.state.seed.apps.values()))
        args.update(base_url=sim.url, appid=app.appid, secret=app.secret)
        log.warning("backend: embedded WeChat simulator at %s (kind = \"sim\")", sim.url)
    if not args["base_url"]:
        raise SetupError("backend.base_url: no backend to talk to")
    tokens = TokenCache("central" if args["token_url"] else args["token_mode"],
                        margin_s=args["refresh_margin_s"], clock=clock or time.monotonic,
                        wall=clock or time.time, on_refused=on_token_refused)
    args["tokens"] = tokens
    if clock is not None:
        args["clock"] = clock
    return ConfiguredBackend(b.kind, args["base_url"], lambda: WeChatCardClient(**args), sim,
                             tokens)


def _busifavor(config: Config, backend_url: str | None) -> ConfiguredBackend:
    from hexiao.hostd.backends.busifavor import BusifavorBackend, BusifavorClient

    b = config.backend
    try:
        args: dict[str, Any] = b.busifavor_args()
    except (ConfigError, OSError) as e:
        raise SetupError(f"backend: {e}") from e
    args["base_url"] = backend_url or args["base_url"] or BASE_URLS["wechatpay_busifavor"]
    try:  # once now: a wrong key or an unreachable platform says so at start
        BusifavorClient(**args)
    except WeChatError as e:
        raise SetupError(f"backend: {e} (check backend.mchid, merchant_serial_no, "
                         "private_key_file and apiv3_key_file)") from e
    stock = b.stock_id or None
    return ConfiguredBackend(b.kind, args["base_url"],
                             lambda: BusifavorBackend(BusifavorClient(**args), stock_id=stock))
