# Anti-replay window for frame counters (SPEC.md, "Counters and replay").
#
# Rules kept here:
# - a counter above the highest seen is new; the window then slides;
# - a counter within WINDOW below the highest is new only if its bit is clear (a late
#   retransmission);
# - anything else was seen already (`duplicate`) or is too old to tell (`replay`).
# WINDOW is 16 so the bitmap stays a small int on 32-bit MicroPython ports.

WINDOW = 16
NEW, DUPLICATE, TOO_OLD = 0, 1, 2


class Window:
    # the state of a new window; mark() gives each instance its own (no __init__: heap)
    highest = 0  # counter 0 is the handshake epoch; session counters start at 1
    bits = 1  # bit i set: counter highest - i has been seen

    def check(self, counter):
        if counter > self.highest:
            return NEW
        off = self.highest - counter
        if off >= WINDOW:
            return TOO_OLD
        return DUPLICATE if (self.bits >> off) & 1 else NEW

    def mark(self, counter):
        if counter > self.highest:
            shift = counter - self.highest
            if shift < WINDOW:  # mask before shifting: no intermediate big ints
                self.bits = ((self.bits & ((1 << (WINDOW - shift)) - 1)) << shift) | 1
            else:
                self.bits = 1
            self.highest = counter
        elif self.highest - counter < WINDOW:  # older ones are remembered by no bit
            self.bits |= 1 << (self.highest - counter)
