"""Serving metrics: request counts by route and status, time to first token, translate time, store use.

:class:`ServeMetrics` keeps its own values (rendered as Prometheus text by the ingress's
``GET /metrics``) and, inside a Serve replica (``mirror=True``), mirrors each update into
``ray.serve.metrics`` Counter/Histogram/Gauge objects, which Ray exports with every other
application metric on its Prometheus endpoint (``ray_kvlingua_*`` on each node's metrics
export port). Metric names::

    kvlingua_requests_total{route, status}           counter
    kvlingua_time_to_first_token_seconds{route}      histogram
    kvlingua_translate_seconds{route}                histogram (Σ encode + decode of a request)
    kvlingua_store_hits_total / _misses_total        counter
    kvlingua_store_bytes / kvlingua_store_entries    gauge
    kvlingua_pending_requests                        gauge
"""
from __future__ import annotations

import math
from collections import defaultdict

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Hist:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0
        self.n = 0

    def observe(self, v: float) -> None:
        i = next((k for k, b in enumerate(BUCKETS) if v <= b), len(BUCKETS))
        self.counts[i] += 1
        self.sum += v
        self.n += 1


def _labels(d: dict[str, str]) -> str:
    if not d:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(d.items()))
    return "{" + inner + "}"


class ServeMetrics:
    """The ingress's metrics (one per ingress replica)."""

    def __init__(self, mirror: bool = False):
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.hists: dict[str, dict[str, _Hist]] = {"time_to_first_token_seconds": defaultdict(_Hist),
                                                   "translate_seconds": defaultdict(_Hist)}
        self.counters = {"store_hits_total": 0, "store_misses_total": 0}
        self.gauges = {"store_bytes": 0.0, "store_entries": 0.0, "pending_requests": 0.0}
        self._ray = None
        if mirror:
            from ray.serve import metrics as m

            self._ray = {
                "requests_total": m.Counter("kvlingua_requests_total", "requests by route and status",
                                            tag_keys=("route", "status")),
                "time_to_first_token_seconds": m.Histogram("kvlingua_time_to_first_token_seconds",
                                                           "time to first token", list(BUCKETS), tag_keys=("route",)),
                "translate_seconds": m.Histogram("kvlingua_translate_seconds", "latent translate time per request (IN + OUT)",
                                                 list(BUCKETS), tag_keys=("route",)),
                **{k: m.Counter(f"kvlingua_{k}", k.replace("_", " ")) for k in self.counters},
                **{k: m.Gauge(f"kvlingua_{k}", k.replace("_", " ")) for k in self.gauges},
            }

    def request(self, route: str, status: int) -> None:
        self.requests[(route, status)] += 1
        if self._ray:
            self._ray["requests_total"].inc(1, tags={"route": route, "status": str(status)})

    def observe(self, name: str, route: str, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds < 0:
            return
        self.hists[name][route].observe(seconds)
        if self._ray:
            self._ray[name].observe(seconds, tags={"route": route})

    def store(self, hits: int, misses: int, nbytes: int, entries: int) -> None:
        """Set the store's totals (monotonic hit/miss counts, current bytes and entries)."""
        for name, total in (("store_hits_total", hits), ("store_misses_total", misses)):
            delta = total - self.counters[name]
            if delta > 0:
                self.counters[name] = total
                if self._ray:
                    self._ray[name].inc(delta)
        self.gauge("store_bytes", nbytes)
        self.gauge("store_entries", entries)

    def gauge(self, name: str, value: float) -> None:
        self.gauges[name] = float(value)
        if self._ray:
            self._ray[name].set(float(value))

    def prometheus(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        out = ["# TYPE kvlingua_requests_total counter"]
        out += [f"kvlingua_requests_total{_labels({'route': r, 'status': str(s)})} {n}"
                for (r, s), n in sorted(self.requests.items())]
        for name, by_route in self.hists.items():
            out.append(f"# TYPE kvlingua_{name} histogram")
            for route, h in sorted(by_route.items()):
                acc = 0
                for b, c in zip(list(BUCKETS) + [math.inf], h.counts):
                    acc += c
                    le = "+Inf" if b == math.inf else repr(b)
                    out.append(f"kvlingua_{name}_bucket{_labels({'route': route, 'le': le})} {acc}")
                out.append(f"kvlingua_{name}_sum{_labels({'route': route})} {h.sum!r}")
                out.append(f"kvlingua_{name}_count{_labels({'route': route})} {h.n}")
        for name, v in self.counters.items():
            out += [f"# TYPE kvlingua_{name} counter", f"kvlingua_{name} {v}"]
        for name, v in self.gauges.items():
            out += [f"# TYPE kvlingua_{name} gauge", f"kvlingua_{name} {v!r}"]
        return "\n".join(out) + "\n"
