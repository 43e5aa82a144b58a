"""One device per lane: the port, the link session on its own thread, the redemption worker,
discovery, verdict texts and link captures.
"""
