# The application's status (firmware/app.py): health and the log ring, as a host asks for them.
# An overlay, as app_rules and app_config: loaded by App.serve for one request, dropped after.

import gc

from hexiao.protocol.errors import counter_number


def serve(app, msg, firmware, suffixes):
    """The health or logs message answering a health_get or logs_get."""
    del suffixes  # the same signature as app_rules.serve
    if msg["type"] == "health_get":
        return health(app, firmware)
    since, most = msg.get("since", 0), msg.get("max", len(app.ring))
    out = []
    for e in app.ring:
        if e[0] >= since and len(out) < most:
            out.append(e)
    return {"type": "logs", "entries": out, "next": out[-1][0] + 1 if out else since}


def health(app, firmware):
    app.sample()
    link = {}
    for k, v in app.cdc.link.counters.items():
        link[counter_number(k)] = v
    counts = {}
    for k, v in app.n.items():
        if v:
            counts[k] = v
    return {"type": "health", "uptime_ms": app.cdc.now(), "reset_cause": app.b.reset,
            "firmware": firmware, "heap_free": gc.mem_free(), "heap_peak": app.peak,
            "link": link, "app": counts}
