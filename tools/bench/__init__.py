"""Benchmarks (never part of the test suite's pass/fail): the codec, hostd, the firmware, the tap
proxy.
"""
