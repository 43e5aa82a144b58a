# The application's settings (firmware/app.py): the rules and config a host sets a few times a
# session, and what boot reads back from flash. An overlay, as app_reports: App.serve imports it
# for one request and drops it after, so code a till runs rarely does not hold the 64 KB heap
# while the till sells (one overlay per kind of request: each costs heap while it is loaded).
#
# Rules kept here:
# - a host's rules or config are checked whole before any of it is used or stored; a refused one
#   is logged and the values in force stay;
# - state files are read back strictly: any damage means the file is corrupt, logged, defaults
#   kept (the board's save() writes a new file, then renames it over the old).

from hexiao.protocol import cbor

# config name: (lowest, highest) of an int; suffix is one of app.SUFFIX's names
LIMITS = {"inter_key_ms": (0, 1000), "offline_ms": (200, 30000), "char_ms": (5, 1000),
          "term": (10, 13)}


def compile_rules(msg):
    """A rules message -> the stored form, or a reason to refuse it (str)."""
    out = []
    for r in msg["rules"]:
        syms = r.get("symbologies")
        if syms is not None:
            for s in syms:
                if len(s) != 3 or s[0] != "]":
                    return "bad symbology"
            syms = tuple(syms)
        lo, hi = r.get("min_len"), r.get("max_len")
        if lo is not None and hi is not None and lo > hi:
            return "min_len > max_len"
        out.append([r["action"], syms, lo, hi, r.get("prefix"), r.get("check", 0)])
    return [msg["version"], msg["default"], out]


def config_ok(name, v, suffixes):
    if name == "suffix":
        return v in suffixes
    lim = LIMITS.get(name)
    return lim is not None and type(v) is int and lim[0] <= v <= lim[1] and (
        name != "term" or v in (10, 13))


def _int_or_none(v):
    return v is None or (type(v) is int and 0 <= v <= 0xFFFF)


def stored_rule_ok(x):
    # [action, symbologies|None, min_len|None, max_len|None, prefix|None, check]: the form
    # compile_rules stores, each field of the type app.classify compares it with
    ok = type(x) is list and len(x) == 6 and x[0] in (0, 1, 2) and x[5] in (0, 1)
    ok = ok and _int_or_none(x[2]) and _int_or_none(x[3]) and (
        x[4] is None or type(x[4]) is bytes) and (x[1] is None or type(x[1]) is list)
    if ok and x[1] is not None:
        for s in x[1]:
            ok = ok and type(s) is str and len(s) == 3
    return ok


def restore(app, suffixes):
    """Rules and config from the board's flash, each only if it is whole and valid."""
    for name in ("rules", "config"):
        raw = app.b.load(name)
        if raw is None:
            continue
        try:
            v = cbor.loads(raw)
            if name == "rules":  # shape and every field's type, else it is corrupt
                ok = type(v) is list and len(v) == 3 and v[1] in (0, 1, 2) and type(v[2]) is list
                for x in v[2]:
                    ok = ok and stored_rule_ok(x)
                    if ok and x[1] is not None:
                        x[1] = tuple(x[1])
            else:
                ok = type(v) is dict
                for k in v:
                    ok = ok and config_ok(k, v[k], suffixes)
        except Exception:  # any damage at all means the file is corrupt
            ok = False
        if not ok:
            app.log(3, "corrupt %s file: defaults" % name)
        elif name == "rules":
            app.rules = v
        else:
            app.cfg.update(v)


def serve(app, msg, firmware, suffixes):
    """The answer to a rules or config request (a message to send), or None."""
    del firmware  # the same signature as app_reports.serve
    if msg["type"] != "rules":
        return {"type": "config", "values": config(app, msg, suffixes)}
    r = compile_rules(msg)
    if type(r) is str:
        app.log(3, "rules v%d refused: %s" % (msg["version"], r))
        return None
    app.b.save("rules", cbor.dumps(r))
    app.rules = r
    app.log(6, "rules v%d" % r[0])
    return None


def config(app, msg, suffixes):
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
    return out
