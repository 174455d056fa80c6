"""Prometheus metrics of a server (names follow vLLM's, prefixed `lightspeed:`).

Updated from one thread (the engine thread, or the thread reading an engine process): per output (tokens, TTFT, inter-token latency), per
finished request, and per step (running / waiting, KV-cache usage, prefix cache,
speculation counters as deltas of the Engine's aggregate SpecStats).
"""
from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

disable_created_metrics()  # NOTE: process-wide; drops the `*_created` timestamp series

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                    7.5, 10.0, 20.0, 40.0, 80.0)


@dataclass
class StepStats:
    """What the per-step metrics read of an Engine (sent from an engine process as is)."""
    num_running: int
    num_waiting: int
    kv_usage: float
    prefix_query_tokens: int
    prefix_hit_tokens: int
    spec: object  # the Engine's aggregate SpecStats

    @classmethod
    def of(cls, engine) -> "StepStats":
        sched = engine.scheduler
        return cls(sched.num_running, sched.num_waiting, engine.block_manager.usage, sched.num_prefix_query_tokens,
                   sched.num_prefix_hit_tokens, engine.spec_stats)


class ServerMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r, labels, p = self.registry, ["model_name"], "lightspeed:"

        def counter(name, doc, extra=()):
            return Counter(p + name, doc, labels + list(extra), registry=r)

        def gauge(name, doc, extra=()):
            return Gauge(p + name, doc, labels + list(extra), registry=r)

        def histogram(name, doc):
            return Histogram(p + name, doc, labels, buckets=_LATENCY_BUCKETS, registry=r).labels(model_name)

        self.model_name = model_name
        self.requests = counter("request_success", "Finished requests, by finish reason", ["finished_reason"])
        self.aborted = counter("request_aborted", "Requests aborted by their client").labels(model_name)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of started requests").labels(model_name)
        self.generation_tokens = counter("generation_tokens", "Generated tokens").labels(model_name)
        self.preemptions = counter("num_preemptions", "Preemptions (KV cache full) of finished requests").labels(model_name)
        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first token")
        self.itl = histogram("inter_token_latency_seconds", "Time between outputs of a request (one per step)")
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token")
        self.running = gauge("num_requests_running", "Requests in the running batch").labels(model_name)
        self.waiting = gauge("num_requests_waiting", "Requests waiting to run").labels(model_name)
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks held by requests (0-1)").labels(model_name)
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache").labels(model_name)
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache").labels(model_name)
        self.spec_steps = counter("spec_decode_num_drafts", "Verify steps (drafts verified by one target pass)").labels(model_name)
        self.spec_draft_tokens = counter("spec_decode_num_draft_tokens", "Draft positions verified").labels(model_name)
        self.spec_accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted").labels(model_name)
        self.spec_emitted = counter("spec_decode_num_emitted_tokens", "Tokens emitted by verify steps").labels(model_name)
        self.spec_accepted_pos = counter("spec_decode_num_accepted_tokens_per_pos", "Accepted drafts per position",
                                         ["position"])
        self.spec_proposed_pos = counter("spec_decode_num_draft_tokens_per_pos", "Verified drafts per position",
                                         ["position"])
        self.acceptance_length = gauge("spec_decode_acceptance_length",
                                       "Tokens per verify step, over every finished request").labels(model_name)
        self.on_engine_restart()

    def on_engine_restart(self) -> None:
        """A new engine counts from 0: the deltas of on_step start over."""
        self._seen = {"steps": 0, "drafts": 0, "emitted": 0, "queries": 0, "hits": 0, "acc": [], "prop": []}

    # -- engine-thread hooks -------------------------------------------------------------
    def on_tokens(self, out, arrival: float, last_time: float | None, now: float) -> None:
        self.generation_tokens.inc(len(out.new_token_ids))
        if last_time is None:
            self.ttft.observe(now - arrival)
            self.prompt_tokens.inc(len(out.prompt_token_ids))
        else:
            self.itl.observe(now - last_time)

    def on_finish(self, out, e2e_s: float) -> None:
        self.requests.labels(self.model_name, out.finish_reason or "stop").inc()
        self.e2e.observe(e2e_s)
        self.preemptions.inc(out.metrics.num_preemptions)

    def on_abort(self) -> None:
        self.aborted.inc()

    def on_step(self, stats: "StepStats") -> None:
        seen = self._seen
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_usage)
        self.prefix_queries.inc(stats.prefix_query_tokens - seen["queries"])
        self.prefix_hits.inc(stats.prefix_hit_tokens - seen["hits"])
        seen["queries"], seen["hits"] = stats.prefix_query_tokens, stats.prefix_hit_tokens
        st = stats.spec
        if st.num_verify_steps == seen["steps"]:
            return
        self.spec_steps.inc(st.num_verify_steps - seen["steps"])
        self.spec_draft_tokens.inc(st.num_draft_tokens - seen["drafts"])
        self.spec_emitted.inc(st.num_emitted_tokens - seen["emitted"])
        accepted = (st.num_emitted_tokens - seen["emitted"]) - (st.num_verify_steps - seen["steps"])
        self.spec_accepted.inc(max(0, accepted))  # every verify step emits one bonus / recovered token
        for key, counter, now in (("acc", self.spec_accepted_pos, st.accepted_per_position),
                                  ("prop", self.spec_proposed_pos, st.proposed_per_position)):
            before = seen[key] + [0] * (len(now) - len(seen[key]))
            for i, (a, b) in enumerate(zip(now, before)):
                if a > b:
                    counter.labels(self.model_name, str(i)).inc(a - b)
            seen[key] = list(now)
        seen["steps"], seen["drafts"], seen["emitted"] = st.num_verify_steps, st.num_draft_tokens, st.num_emitted_tokens
        self.acceptance_length.set(st.acceptance_length or 0.0)
