"""`hexiao demo`: the whole lane on this machine, told step by step."""
