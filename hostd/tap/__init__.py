"""The receipt tap: ESC/POS parser and command table, receipt assembly, QR injection with signed
tokens, the proxy and its printer targets.
"""
