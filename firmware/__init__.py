# Peripheral firmware (MicroPython). Host-side Python only imports this package to locate the files.
