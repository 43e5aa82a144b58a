"""A clock the tests move by hand (the simulator and the engine take time as a callable)."""

T0 = 1_750_000_000.0  # the tests' "now"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now
