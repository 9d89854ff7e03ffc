"""Prometheus metrics of one server: request counters and latency histograms observed by the handlers,
and engine gauges read from the engine thread's latest `stats()` snapshot at scrape time.

Each server has its own `CollectorRegistry`, so several can live in one process (tests).
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jpaged import compilations
from jpaged.engine.expert_load import imbalance

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                    1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
    """Turns an engine `stats()` dict into gauges and counters when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict], pending: Callable[[], int]):
        self._stats, self._pending = stats, pending
        compilations.install()

    def collect(self):
        s = self._stats()
        if not s:
            return
        gauges = [("num_requests_running", "Sequences running in the engine", s["num_running"]),
                  ("num_requests_waiting", "Sequences waiting or preempted", s["num_waiting"]),
                  ("num_requests_pending", "Requests accepted by the server and not finished", self._pending()),
                  ("kv_pages_used", "KV cache pages in use", s["num_used_pages"]),
                  ("kv_pages_free", "KV cache pages free", s["num_free_pages"]),
                  ("kv_pages_total", "KV cache pages in the pool", s["num_total_pages"]),
                  ("kv_cache_usage_ratio", "Fraction of KV pages in use",
                   s["num_used_pages"] / max(s["num_total_pages"], 1)),
                  ("prefix_cache_hit_rate", "Prefix-cache hits / queries since start",
                   s["prefix_cache_hits"] / max(s["prefix_cache_queries"], 1))]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"jpaged_{name}", doc, value=value)
        counters = [("prompt_tokens", "Prompt tokens prefilled", s["prompt_tokens"]),
                    ("generation_tokens", "Tokens generated", s["generation_tokens"]),
                    ("prefix_cache_queries", "Prefix-cache lookups", s["prefix_cache_queries"]),
                    ("prefix_cache_hits", "Prefix-cache hits", s["prefix_cache_hits"]),
                    ("num_preemptions", "Sequences preempted", s["num_preemptions"]),
                    ("compilations", "XLA compilations in this process since the server started",
                     compilations.count())]
        if "spec_verify_steps" in s:  # speculative decoding is on
            counters += [("spec_decode_proposed_tokens", "Speculative tokens proposed", s["spec_proposed_tokens"]),
                         ("spec_decode_accepted_tokens", "Speculative tokens accepted", s["spec_accepted_tokens"]),
                         ("spec_decode_verify_steps", "Sequence verifications of proposals", s["spec_verify_steps"])]
            yield GaugeMetricFamily("jpaged_spec_decode_mean_accepted_length",
                                    "Tokens per verification: accepted proposals + 1, since start",
                                    value=1 + s["spec_accepted_tokens"] / max(s["spec_verify_steps"], 1))
        for name, doc, value in counters:
            yield CounterMetricFamily(f"jpaged_{name}", doc, value=value)
        if "expert_tokens" in s:  # a mixture-of-experts model: load balance (jpaged/engine/expert_load.py)
            yield from expert_metrics(s)
        yield from _tier_metrics(s)


def expert_metrics(s: dict):
    """Per-expert routed tokens (all MoE layers summed): a counter since start, the last step's, and the
    last step's max / mean over experts."""
    total = CounterMetricFamily("jpaged_moe_expert_tokens", "Tokens routed to each expert (all MoE layers)",
                                labels=["expert"])
    last = GaugeMetricFamily("jpaged_moe_expert_tokens_last_step", "Tokens routed to each expert in the last step",
                             labels=["expert"])
    for e, (t, n) in enumerate(zip(s["expert_tokens"], s["expert_tokens_last_step"])):
        total.add_metric([str(e)], float(t))
        last.add_metric([str(e)], float(n))
    yield total
    yield last
    yield GaugeMetricFamily("jpaged_moe_expert_load_imbalance", "Max / mean tokens per expert in the last step",
                            value=imbalance(s["expert_tokens_last_step"]))


def _tier_metrics(s: dict):
    """The KV tiers (jpaged/engine/kv_tiers.py tier_stats): sizes, hit rates, pages and bytes moved."""
    if "kv_host_pages_total" not in s:
        return
    queries = max(s["prefix_cache_queries"], 1)
    page_tokens = s["kv_page_tokens"]
    for name, doc, value in (
            ("kv_host_pages_total", "Host KV pages (swap and host tier)", s["kv_host_pages_total"]),
            ("kv_host_pages_cached", "Host-tier pages holding cached prefixes", s["kv_host_pages_cached"]),
            ("kv_disk_pages", "Disk-tier pages", s["kv_disk_pages"]),
            ("kv_disk_bytes", "Disk-tier bytes", s["kv_disk_bytes"]),
            ("kv_host_hit_rate", "Prompt tokens found on the host tier / prefix-cache queries",
             s["kv_host_hit_pages"] * page_tokens / queries),
            ("kv_disk_hit_rate", "Prompt tokens found on the disk tier / prefix-cache queries",
             s["kv_disk_hit_pages"] * page_tokens / queries)):
        yield GaugeMetricFamily(f"jpaged_{name}", doc, value=value)
    moves = CounterMetricFamily("jpaged_kv_tier_bytes", "Bytes of KV pages moved between tiers", labels=["move"])
    hits = CounterMetricFamily("jpaged_kv_tier_hit_pages", "Prefix pages found per tier", labels=["tier"])
    for move in ("offloaded", "fetched", "spilled", "loaded", "swapped_out", "swapped_in"):
        moves.add_metric([move], s[f"kv_pages_{move}"] * s["kv_page_bytes"])
    hits.add_metric(["host"], s["kv_host_hit_pages"])
    hits.add_metric(["disk"], s["kv_disk_hit_pages"])
    yield moves
    yield hits


class ServerMetrics:
    def __init__(self, stats: Callable[[], dict], pending: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("jpaged_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.finished = Counter("jpaged_request_finish", "Finished completions by finish reason",
                                ["reason"], registry=self.registry)
        self.ttft = Histogram("jpaged_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("jpaged_inter_token_latency_seconds", "Time between successive outputs of a request",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("jpaged_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats, pending))

    def render(self) -> bytes:
        return generate_latest(self.registry)
