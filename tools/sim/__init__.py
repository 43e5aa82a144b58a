"""Simulated hardware and fake servers for the demo and tests: the sim board, the pty cable between
a device and hostd, a WeChat Pay fake.
"""
