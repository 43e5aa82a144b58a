# The application's config (firmware/app.py): the settings a host reads and sets (SPEC 6.4),
# and boot's restore of them from flash. An overlay, as app_rules: loaded by App.serve for one
# request and dropped after.
#
# Rules kept here:
# - a host's values are checked one by one: a refused one is logged and left out of the answer,
#   the value in force stays;
# - the config file is read back strictly: any damage means it is corrupt, logged, defaults kept.

from hexiao.protocol import cbor

# config name: (lowest, highest) of an int; suffix is one of app.SUFFIX's names
LIMITS = {"inter_key_ms": (0, 1000), "offline_ms": (200, 30000), "char_ms": (5, 1000),
          "term": (10, 13)}


def config_ok(name, v, suffixes):
    if name == "suffix":
        return v in suffixes
    lim = LIMITS.get(name)
    return lim is not None and type(v) is int and lim[0] <= v <= lim[1] and (
        name != "term" or v in (10, 13))


def restore(app, suffixes):
    """The config from the board's flash, if it is whole and valid."""
    raw = app.b.load("config")
    if raw is None:
        return
    try:
        v = cbor.loads(raw)
        ok = type(v) is dict
        for k in v:
            ok = ok and config_ok(k, v[k], suffixes)
    except Exception:  # any damage at all means the file is corrupt
        ok = False
    if ok:
        app.cfg.update(v)
    else:
        app.log(3, "corrupt config file: defaults")


def serve(app, msg, firmware, suffixes):
    """The config message answering a config_get or config_set."""
    del firmware  # the same signature as app_status.serve
    # SPEC 6.4: the answer has the values in force for the names asked or set; a name
    # unknown or refused is absent
    vals = msg.get("values")
    names = msg.get("keys") or list(app.cfg)
    if vals is not None:
        names = []
        for k, v in vals.items():
            if config_ok(k, v, suffixes):
                app.cfg[k] = v
                names.append(k)
            else:
                app.log(4, "config %s refused" % k[:16])
        app.b.save("config", cbor.dumps(app.cfg))
    out = {}
    for k in names:
        if k in app.cfg:
            out[k] = app.cfg[k]
    return {"type": "config", "values": out}
