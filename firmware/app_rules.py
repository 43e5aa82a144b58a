# The application's rules (firmware/app.py): the classifier a host sets a few times a session,
# and boot's restore of them from flash. An overlay, as app_config and app_status: App.serve
# imports it for one request and drops it after, so code a till runs rarely does not hold the
# 64 KB heap while the till sells (one overlay per kind of request: each costs heap while it is
# loaded, ~1-3 KB).
#
# Rules kept here:
# - a host's rules are checked whole before any of it is used or stored; refused ones are
#   logged and the rules in force stay;
# - the rules file is read back strictly: any damage means it is corrupt, logged, defaults kept
#   (the board's save() writes a new file, then renames it over the old);
# - a rule's symbologies are stored as one text of 3-character AIM ids (app.classify).

from hexiao.protocol import cbor


def compile_rules(msg):
    """A rules message -> the stored form, or a reason to refuse it (str)."""
    out = []
    for r in msg["rules"]:
        syms = r.get("symbologies")
        if syms is not None:  # stored as one text of 3-character ids (see app.classify)
            for s in syms:
                if len(s) != 3 or s[0] != "]" or s.count("]") != 1:  # an AIM id: ]Xm
                    return "bad symbology"
            syms = "".join(syms)
        lo, hi = r.get("min_len"), r.get("max_len")
        if lo is not None and hi is not None and lo > hi:
            return "min_len > max_len"
        out.append([r["action"], syms, lo, hi, r.get("prefix"), r.get("check", 0)])
    return [msg["version"], msg["default"], out]


def _int_or_none(v):
    return v is None or (type(v) is int and 0 <= v <= 0xFFFF)


def stored_rule_ok(x):
    # [action, symbologies|None, min_len|None, max_len|None, prefix|None, check]: the form
    # compile_rules stores, each field of the type app.classify compares it with
    ok = type(x) is list and len(x) == 6 and x[0] in (0, 1, 2) and x[5] in (0, 1)
    ok = ok and _int_or_none(x[2]) and _int_or_none(x[3]) and (
        x[4] is None or type(x[4]) is bytes) and (x[1] is None or type(x[1]) is str)
    if ok and x[1] is not None:  # 3-character ids, each "]" then two others
        ok = len(x[1]) % 3 == 0 and x[1].count("]") * 3 == len(x[1])
        for i in range(0, len(x[1]), 3):
            ok = ok and x[1][i] == "]"
    return ok


def restore(app, suffixes):
    """The rules from the board's flash, if they are whole and valid."""
    del suffixes  # the same signature as app_config.restore
    raw = app.b.load("rules")
    if raw is None:
        return
    try:  # shape and every field's type, else it is corrupt
        v = cbor.loads(raw)
        ok = type(v) is list and len(v) == 3 and v[1] in (0, 1, 2) and type(v[2]) is list
        for x in v[2]:
            ok = ok and stored_rule_ok(x)
    except Exception:  # any damage at all means the file is corrupt
        ok = False
    if ok:
        app.rules = v
    else:
        app.log(3, "corrupt rules file: defaults")


def serve(app, msg, firmware, suffixes):
    """Take a rules message; no answer (None)."""
    del firmware, suffixes  # the same signature as app_status.serve
    r = compile_rules(msg)
    if type(r) is str:
        app.log(3, "rules v%d refused: %s" % (msg["version"], r))
        return None
    app.b.save("rules", cbor.dumps(r))
    app.rules = r
    app.log(6, "rules v%d" % r[0])
    return None
