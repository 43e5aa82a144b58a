"""hostd's config against the embedded WeChat simulator, for the daemon tests: one way to write
the sim app's secret (0600, as hostd's private-files rule wants) and name its backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.config import from_dict


def sim_config(tmp_path: Path, sim: WeChatSim, backend: dict[str, Any] | None = None,
               **sections: Any) -> Any:
    """A Config whose backend is `sim`'s first app (timeouts overridable in `backend`), with
    state and control socket under tmp_path, and the other sections (device, lane, macros...)
    as given."""
    app = next(iter(sim.state.seed.apps.values()))
    secret = tmp_path / "wechat.secret"
    secret.write_text(app.secret)
    secret.chmod(0o600)
    return from_dict({
        "hostd": {"state_dir": str(tmp_path / "state"),
                  "control_socket": str(tmp_path / "run" / "hostd.sock")},
        "backend": {"kind": "wechat_card", "base_url": sim.url, "appid": app.appid,
                    "secret_file": str(secret), "timeout_s": 5.0, "settle_after_s": 10.0,
                    **(backend or {})},
        **sections,
    })
