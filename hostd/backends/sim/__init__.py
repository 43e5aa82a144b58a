"""The WeChat card API simulator: a real HTTP server on loopback, the default backend of a single
store (kind = "sim") and of the demo and tests.
"""
