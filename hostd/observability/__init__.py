"""What hostd tells the outside: structured logs (with redaction), Prometheus metrics, systemd
notify and watchdog.
"""
