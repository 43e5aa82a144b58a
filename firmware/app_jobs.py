# The host's jobs for the application (firmware/app.py): keystroke macros, print jobs and a
# verdict's slip. An overlay, as app_rules: loaded by App.serve for one message and dropped
# after; the till's own work (products typed, coupons sent, verdicts shown) never waits on it.
#
# Rules kept here:
# - a macro is typed once: a macro_id seen among the last 8 is not typed again (a host that
#   sends it again as a new message); one character off the US layout refuses the whole macro;
# - a print job's chunks go to the printer as they arrive, in seq order from 0; a chunk out of
#   order drops the rest of its job; with no printer, a job or slip is logged and dropped.

from hexiao.firmware.app import US, delay_code


def serve(app, msg, firmware, suffixes):
    """Do a keys or print message, or print a verdict's slip; no answer (None)."""
    del firmware, suffixes  # the same signature as app_status.serve
    if msg["type"] == "keys":
        keys(app, msg)
    else:
        paper(app, msg)


def keys(app, msg):
    mid = msg["macro_id"]
    if mid in app.macros:
        return app.log(6, "macro %d again: not typed" % mid)
    q = bytearray()
    q.append(0)
    q.append(delay_code(msg.get("delay_ms", app.cfg["inter_key_ms"])))
    for item in msg["items"]:
        if type(item) is str:
            for c in item.encode():
                if c < 0x20 or c > 0x7E:
                    return app.count("rejected", 4, "macro %d not ASCII: not typed" % mid)
                q.append(US[c - 32] & 0x7F)
                q.append(2 if US[c - 32] & 0x80 else 0)
        elif item[0]:
            q.append(item[0])
            q.append(item[1])
    app.macros.append(mid)
    if len(app.macros) > 8:
        app.macros.pop(0)
    app.n["macros"] += 1
    app.q.extend(q)


def paper(app, msg):
    # a verdict's slip, or one chunk of a print job
    chunk = msg["type"] == "print"
    if chunk:
        job, seq = msg["job_id"], msg["seq"]
        if seq != (app.job[1] if app.job and app.job[0] == job else 0):
            app.job = None
            return app.log(4, "print %d: chunk %d out of order, job dropped" % (job, seq))
        app.job = None if msg["last"] else [job, seq + 1]
    if app.b.printer is None:
        return app.log(4, "no printer on this board")
    app.b.printer.write(msg["data"] if chunk else msg["slip"])
    app.n["printed"] += 1
