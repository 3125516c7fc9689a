"""Every Prometheus collector, defined once, in a registry the app owns (no global state).

Names and semantics follow vLLM's (frontier_ prefix, seconds, *_total counters). Engine gauges
(running, waiting, KV usage...) are read from each engine's stats() at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_SEARCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("frontier_requests", "HTTP requests by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.ttft = Histogram("frontier_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("frontier_inter_token_latency_seconds", "Time between streamed deltas",
                             ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("frontier_e2e_request_latency_seconds", "End-to-end generation latency",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("frontier_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("frontier_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.finished = Counter("frontier_request_success", "Finished generations by finish reason",
                                ["model", "finish_reason"], registry=r)
        self.embedding_inputs = Counter("frontier_embedding_inputs", "Texts embedded", ["model"], registry=r)
        self.rag_ingest_latency = Histogram("frontier_rag_ingest_latency_seconds",
                                            "RAG ingest request latency (chunk, embed, durable write)",
                                            ["collection"], buckets=_LATENCY_BUCKETS, registry=r)
        self.rag_search_latency = Histogram("frontier_rag_search_latency_seconds", "RAG search latency",
                                            ["collection", "mode"], buckets=_SEARCH_BUCKETS, registry=r)
        self.reasoning_tokens = Counter("frontier_reasoning_tokens", "Thinking tokens generated", ["model"],
                                        registry=r)
        self.reasoning_budget_forced = Counter("frontier_reasoning_budget_forced",
                                               "Thoughts ended by the maximum budget", ["model"], registry=r)
        self.reasoning_extensions = Counter("frontier_reasoning_extensions",
                                            "Continuation cues inserted below the minimum budget", ["model"],
                                            registry=r)
        self.reasoning_votes = Counter("frontier_reasoning_votes", "Self-consistency paths voted", ["model"],
                                       registry=r)
        self.images = Counter("frontier_images_processed", "Images in chat requests", ["model"], registry=r)
        self.image_cache_hits = Counter("frontier_image_encoder_cache_hits",
                                        "Images whose encoder rows came from the cache", ["model"], registry=r)
        self.vision_encode = Histogram("frontier_vision_encode_seconds", "Vision encoder time per request "
                                       "(images not in the cache)", ["model"], registry=r)

    def watch_pool(self, pool) -> None:
        self.registry.register(_EngineStatsCollector(pool))

    def watch_rag(self, store) -> None:
        self.registry.register(_RagStatsCollector(store))


class _RagStatsCollector:
    """frontier_rag_{documents,chunks,vectors}{collection} from the store's counts at scrape time."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        fams = {k: GaugeMetricFamily(f"frontier_rag_{k}", f"RAG {k} per collection", labels=["collection"])
                for k in ("documents", "chunks", "vectors")}
        try:
            for name, s in self.store.stats().items():
                for k in fams:
                    fams[k].add_metric([name], float(s[f"num_{k}"]))
        except Exception:  # metrics never break anything
            pass
        yield from fams.values()


class _EngineStatsCollector:
    """Exposes every numeric engine stat: keys ending in _total as counters, the rest as gauges. A key
    `name_total:<value>` is one labelled sample of the counter frontier_name_total{position="<value>"}
    (e.g. spec_decode_num_accepted_tokens_per_pos_total:0, as vLLM's per-position acceptance counts)."""

    def __init__(self, pool):
        self.pool = pool

    def collect(self):
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}
        positional: dict[str, bool] = {}  # family -> whether its samples carry a position (one label set each)
        for model_id, lm in list(self.pool.loaded.items()):
            if lm.engine is None:
                continue
            try:
                stats = lm.engine.stats()
            except Exception:  # metrics never break anything
                continue
            for key, value in stats.items():
                name, sep, position = key.partition(":")
                if sep and not name.endswith("_total"):  # only counters take a position
                    continue
                if positional.setdefault(name, bool(sep)) != bool(sep):
                    continue
                labels = ["model", "position"] if sep else ["model"]
                if name.endswith("_total"):
                    fam = families.setdefault(name, CounterMetricFamily(
                        f"frontier_{name[:-6]}", f"engine statistic {name}", labels=labels))
                else:
                    fam = families.setdefault(name, GaugeMetricFamily(
                        f"frontier_{name}", f"engine statistic {name}", labels=labels))
                fam.add_metric([model_id, position] if sep else [model_id], float(value))
        yield from families.values()
