# Safe mode after repeated crashes (docs/architecture.md, "The firmware's modules": boot-only).
#
# Policy:
# - a crash is an exception escaping the application (the entry point records it, then resets
#   the board; the sim board exits with status 4), or a watchdog reset the firmware did not
#   ask for;
# - LIMIT (3) crashes in a row put the device in safe mode at the next boot. "In a row": the
#   count is cleared by a stable run (the application ran STABLE_MS, 60 s, or ended cleanly;
#   the entry points do that by removing the record, nothing else is needed then);
# - in safe mode neither the application nor the link runs: a minimal loop types product
#   barcodes that pass the safe default product rule (AIM ]E0/]E4, digits with a valid GS1
#   check digit: app.DEFAULT_RULES' product rule with gs1_ok, never a coupon, nothing else),
#   the LED stays blue, and every other scan gets an error beep;
# - safe mode is left by what an installer does to fix or retry a device: a new firmware
#   installed (the SHA-256 of hexiao/manifest.json differs: counter, version, build or any file
#   hash; a development build without a manifest is "dev"), or a power-on or reset-pin reset
#   (someone cycled power or pressed reset: the full application is tried again). Resets the
#   firmware asks for itself (after recording a crash) are told apart from those by the
#   record's pending flag, because machine.reset() shows as a watchdog (rp2040) or soft
#   (esp32s3) reset;
# - the record is one text file, `crash` in the state folder (sim: state=DIR; boards: the
#   flash root): "<count> <pending 0|1> <firmware id> <last reason>", written atomically (new
#   file, then rename). An unreadable record counts as none.
#
# Heap: boot-only, like install_check: imported for the decision at boot, for the safe loop,
# or to record a crash, and dropped otherwise.

import os

LIMIT = 3
STABLE_MS = 60000
NAME = "crash"
SAFE_SYMS = ("]E0", "]E4")  # app.DEFAULT_RULES' product rule (a CPython test holds them equal)
MAX_LINE = 32  # AIM id + the longest EAN/UPC, with room: longer reads are never products
CHAR_MS = 50  # app.CONFIG char_ms default: a read that stops this long is dropped


def fw_id():
    import hashlib
    from binascii import hexlify

    h = hashlib.sha256()
    b = bytearray(128)  # read in pieces: a crash is recorded in whatever heap is left
    try:
        with open("hexiao/manifest.json", "rb") as f:
            n = f.readinto(b)
            while n:
                h.update(memoryview(b)[:n])
                n = f.readinto(b)
    except OSError:
        return "dev"
    return hexlify(h.digest()[:8]).decode()


def read(state):
    """[count, pending, firmware id, reason] or None."""
    try:
        with open(state + NAME) as f:
            p = f.read().split(" ", 3)
        return [int(p[0]), int(p[1]), p[2], p[3]]
    except (OSError, ValueError, IndexError):
        return None


def write(state, count, pending, fw, why):
    path = state + NAME
    with open(path + ".new", "w") as f:
        f.write("%d %d %s %s" % (count, pending, fw, why))
    try:
        os.rename(path + ".new", path)
    except OSError:  # a filesystem whose rename does not replace
        os.remove(path)
        os.rename(path + ".new", path)


def boot(state, reset):
    """At boot: (crashes in a row, why safe mode, or None to run the application)."""
    fw = fw_id()
    rec = read(state)
    if rec is None and reset != "watchdog":
        return 0, None
    count, pending, old, why = rec or (0, 0, fw, "")
    if old != fw:
        count = 0  # a new firmware: it gets its own chances
    elif reset in ("power_on", "hard") and not pending:
        count = 0  # a person cycled power or pressed reset: try the application again
    if reset == "watchdog" and not pending:
        count += 1
        why = "watchdog reset"
    if not count:
        try:  # noqa: SIM105 - no contextlib on the device
            os.remove(state + NAME)
        except OSError:
            pass
        return 0, None
    write(state, count, 0, fw, why)
    if count < LIMIT:
        return count, None
    return count, "%d crashes in a row, last: %s" % (count, why)


def crashed(state, e):
    """Record an exception that escaped the application (the caller resets); returns the
    record's count and reason."""
    why = ("%s: %s" % (type(e).__name__, e))[:80].replace("\n", " ")
    fw = fw_id()
    rec = read(state)
    count = rec[0] + 1 if rec and rec[2] == fw else 1
    write(state, count, 1, fw, why)
    return count, why


def product(line):
    """The digits a scan line (AIM id first) types in safe mode, or None: never a coupon."""
    if len(line) < 5 or bytes(line[:3]) not in (b"]E0", b"]E4"):
        return None
    d = line[3:]
    n = len(d)
    s = 0
    for i in range(n):  # app.gs1_ok, inline: digits ending in their GS1 mod-10 check digit
        c = d[i] - 48
        if c < 0 or c > 9:
            return None
        if i < n - 1:
            s += c * (3 if (n - i) % 2 == 0 else 1)
    return bytes(d) if (10 - s % 10) % 10 == d[n - 1] - 48 else None


def run(board, why):
    """The safe loop: until the scanner hangs up (the sim board's end; a board never ends)."""
    import select
    from time import ticks_diff, ticks_ms

    board.note(0, 2, "safe mode: " + why)
    board.verdict(0, 5, 2, 4, "safe mode")  # info, error beep, blue LED
    p = select.poll()
    p.register(board.scan, select.POLLIN)
    buf = bytearray(16)
    line = bytearray()
    over = False  # dropping the rest of an over-long read
    last = ticks_ms()
    while True:
        p.poll(1000)
        n = board.read(buf)
        if n < 0:
            return
        now = ticks_ms()
        if (line or over) and not n and ticks_diff(now, last) >= CHAR_MS:
            line = bytearray()  # a read cut short: never typed
            over = False
        for i in range(n):
            c = buf[i]
            last = now
            if c in (10, 13):
                if line and not over:
                    scanned(board, line)
                line = bytearray()
                over = False
            elif len(line) >= MAX_LINE:
                over = True
            else:
                line.append(c)
        board.idle()


def scanned(board, line):
    d = product(line)
    if d is None:
        board.note(0, 4, "safe mode: not typed")
        board.verdict(0, 1, 2, 4, "safe mode: not typed")  # refused, error beep, still blue
        return
    for c in d:
        board.key(0, 0x27 if c == 48 else c - 19)  # HID usages: 1..9 are 0x1e..0x26, 0 0x27
        board.key(0, 0)
    board.key(0, 0x28)  # Enter, app's default suffix
    board.key(0, 0)
