"""Coupon verification backends: one neutral vocabulary, one module per backend (the WeChat card
API, WeChat Pay merchant coupons, the simulator).
"""
