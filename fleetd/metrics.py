"""fleetd's Prometheus metrics (prometheus-client), served by `hexiao-fleetd run --metrics-listen`.

Rules this module keeps:
- Read at scrape time from the parts' own counters (a custom collector): the consumer and the
  alarms keep plain ints and Counters under their own threads; nothing here writes to them.
- Labels are fixed sets (results, rejection reasons, alarm kinds), never store ids: a chain's
  thousands of stores would make a metric per store; the stores are in the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from hexiao.fleetd.alarms import KINDS, Alarms
from hexiao.fleetd.consumer import Consumer
from hexiao.hostd.fleet import record
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

RESULTS = ("written", "online", *record.REASONS)


class FleetdCollector(Collector):
    def __init__(self, consumer: Consumer, alarms: Alarms | None) -> None:
        self.consumer, self.alarms = consumer, alarms

    def collect(self) -> Iterator[Any]:
        c = self.consumer
        records = CounterMetricFamily("hexiao_fleetd_records", "records handled, by result "
                                      "(written, online, or the rejection reason)",
                                      labels=["result"])
        for r in RESULTS:
            records.add_metric([r], c.counts[r])
        yield records
        yield CounterMetricFamily("hexiao_fleetd_db_retries", "batches tried again after a "
                                  "database error (nothing acknowledged)", value=c.db_retries)
        yield GaugeMetricFamily("hexiao_fleetd_connected", "1 while subscribed at the broker",
                                value=int(c.subscribed.is_set()))
        yield GaugeMetricFamily("hexiao_fleetd_queue", "messages received, not yet committed",
                                value=c.queued())
        if self.alarms is not None:
            open_ = GaugeMetricFamily("hexiao_fleetd_alarms_open", "open alarms by kind "
                                      "(as of the last check)", labels=["kind"])
            for k in KINDS:
                open_.add_metric([k], self.alarms.open[k])
            yield open_
            yield CounterMetricFamily("hexiao_fleetd_alarms_raised", "alarms opened",
                                      value=self.alarms.raised)
            yield GaugeMetricFamily("hexiao_fleetd_gaps_open", "installations with a hole "
                                    "below their highest seq, of any age (as of the last "
                                    "check)", value=self.alarms.gaps_open)
            yield GaugeMetricFamily("hexiao_fleetd_records_missing", "records missing in those "
                                    "holes (as of the last check)",
                                    value=self.alarms.records_missing)


def serve(listen: str, consumer: Consumer, alarms: Alarms | None) -> CollectorRegistry:
    """Serve the metrics on HOST:PORT; returns the registry (for a test to read)."""
    host, _, port = listen.rpartition(":")
    reg = CollectorRegistry()
    reg.register(FleetdCollector(consumer, alarms))
    start_http_server(int(port), host.strip("[]") or "127.0.0.1", registry=reg)
    return reg
