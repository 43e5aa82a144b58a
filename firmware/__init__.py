# Peripheral firmware (MicroPython). Host-side Python only imports this package to locate the files.
#
# drop() is how the device forgets a module it loaded for a while (its boot, an overlay): both
# sys.modules and this package hold it; its code leaves the heap at the collection that follows.

import gc
import sys


def drop(name):
    del sys.modules["hexiao.firmware." + name]
    delattr(sys.modules["hexiao.firmware"], name)
    gc.collect()
