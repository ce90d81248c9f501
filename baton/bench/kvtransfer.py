"""The KV transfer benchmark: moving KV from a prefill worker to a decode worker, and what it costs
the time to first token.

One run, one machine, float32 on CPU, greedy. In order (KVTransferBenchConfig.parts picks them):

wire     loopback.measure_wire: one push of wire_bytes of KV (SmolLM2 geometry) into a real
         KVReceiver, through a shared-memory ring and in the gRPC stream over loopback, against
         an in-process copy of the same bytes, and each stage of the stream's push timed alone
ttft     inprocess.running_cluster: a random prompt of each length through the router's gRPC API
         (baton.Client, max_tokens=1), timed at the client from the call to the first token;
         disaggregated (1 prefill + 1 decode worker) against local (a router that knows only the
         decode worker, which then prefills itself); the KV bytes the decode worker received
hidden   per length: the push of that length's KV alone (a LoopbackKV of the model's geometry,
         through a ring as the prefill worker pushes to a decode worker on its host),
         against how much disaggregated TTFT exceeds local TTFT (the ttft loop's figures);
         kvtransfer_report.hidden_share
quality  baton.bench.kv_quality.measure_int8_quality

ttft and hidden share one loop: per repeat, per length, each measurement in turn (in reverse order
every other repeat) on a fresh random prompt (nothing is ever cached), so others' work on a shared
machine hits every side alike; each figure is the best of num_repeats. The workers and routers
live in this process (and share its GIL); the router and the client talk gRPC over loopback as in a deployment.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from baton.bench import kvtransfer_report, roofline
from baton.bench.engine import random_prompt
from baton.bench.inprocess import MODEL_NAME, InProcessCluster, running_cluster
from baton.bench.kvtransfer_config import KVTransferBenchConfig
from baton.bench.loopback import LoopbackKV, measure_wire
from baton.client import Client
from engine.config import EngineConfig, ModelConfig
from engine.weights import resolve_model
from kvtransfer import shm
from kvtransfer.codec import KVGeometry

logger = logging.getLogger(__name__)

# Their per-request INFO lines would bury the benchmark's progress.
_CHATTY_LOGGERS = ("router", "prefill_worker", "decode_worker", "engine", "kvtransfer",
                   "baton.worker")


def make_engine_config(model_dir: Path, config: KVTransferBenchConfig) -> EngineConfig:
    """Every engine of the run: both workers' and the prefill-alone one."""
    return EngineConfig(model=str(model_dir), device="cpu", dtype="float32",
                        kv_cache_memory_bytes=config.kv_cache_memory_bytes, max_num_seqs=8,
                        num_threads=config.num_threads, enable_prefix_caching=True)


@contextlib.contextmanager
def _quiet_workers() -> Iterator[None]:
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def client_ttft(client: Client, prompt: list[int]) -> tuple[float, int]:
    """(seconds from the call to the first token, prompt tokens the server found cached)."""
    start = time.perf_counter()
    first_s = None
    num_cached = 0
    for chunk in client.stream(token_ids=prompt, max_tokens=1, temperature=0.0, ignore_eos=True):
        if first_s is None and chunk.token_ids:
            first_s = time.perf_counter() - start
        if chunk.usage is not None:
            num_cached = chunk.usage.cached_tokens
    if first_s is None:
        raise RuntimeError(f"a {len(prompt)}-token prompt finished without a token")
    return first_s, num_cached


class _TTFTRun:
    """What the ttft and hidden parts time, side by side: measure(side, prompt) -> seconds.

    Sides: disaggregated and local (client-side TTFT through either router), and for the hidden
    part transfer_alone (a loopback push of the prompt's KV)."""

    def __init__(self, cluster: InProcessCluster, geometry: KVGeometry, max_tokens: int,
                 config: KVTransferBenchConfig, model_dir: Path) -> None:
        self.cluster = cluster
        self.parts = config.parts
        self.clients = {"disaggregated": Client(cluster.disaggregated.grpc_address,
                                                model=MODEL_NAME, max_retries=0),
                        "local": Client(cluster.local.grpc_address, model=MODEL_NAME,
                                        max_retries=0)}
        self.wire: LoopbackKV | None = None
        if "hidden" in config.parts:
            self.wire = LoopbackKV(geometry, max_tokens, seed=config.seed)
        self.num_cached_tokens = 0
        self.kv_bytes: dict[int, float | None] = {}

    def sides(self) -> list[str]:
        return ["disaggregated", "local"] + (["transfer_alone"] if self.wire is not None else [])

    def measure(self, side: str, prompt: list[int]) -> float:
        if side == "transfer_alone":
            return self.wire.push(len(prompt), through_ring=shm.supported())
        before = self.cluster.kv_bytes_received()
        seconds, num_cached = client_ttft(self.clients[side], prompt)
        self.num_cached_tokens += num_cached
        if side == "disaggregated":
            after = self.cluster.kv_bytes_received()
            self.kv_bytes[len(prompt)] = None if after is None else after - (before or 0.0)
        return seconds

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        if self.wire is not None:
            self.wire.close()


def measure_ttft(model_dir: Path, config: KVTransferBenchConfig) -> tuple[list, list]:
    """(ttft rows, hidden rows); a part not in config.parts gets []."""
    mc = ModelConfig.from_dir(model_dir)
    engine_config = make_engine_config(model_dir, config)
    max_len = min(mc.max_position_embeddings, engine_config.max_model_len or 1 << 62)
    lengths = sorted(n for n in config.prompt_lens if n < max_len)
    for n in sorted(set(config.prompt_lens) - set(lengths)):
        logger.warning("ttft: %d tokens do not fit the context of %d tokens; skipped", n, max_len)
    if not lengths:
        return [], []
    rng = random.Random(config.seed)
    logger.info("ttft: starting a prefill worker, a decode worker and two routers")
    with _quiet_workers(), running_cluster(model_dir, engine_config) as cluster:
        d = cluster.decode.engine
        geometry = KVGeometry(mc.num_layers, mc.num_kv_heads, mc.head_dim, d.kv_dtype)
        run = _TTFTRun(cluster, geometry, max(lengths), config, model_dir)
        try:
            sides = run.sides()
            for side in sides:  # warm-up: connections, threads, allocator
                run.measure(side, random_prompt(rng, mc.vocab_size, lengths[0]))
            best = {(side, n): float("inf") for side in sides for n in lengths}
            for repeat in range(config.num_repeats):
                for n in lengths:
                    logger.info("ttft: %d-token prompt, %s, repeat %d/%d", n, ", ".join(sides),
                                repeat + 1, config.num_repeats)
                    # every other repeat in reverse, so no side always follows the same one
                    for side in sides if repeat % 2 == 0 else sides[::-1]:
                        seconds = run.measure(side, random_prompt(rng, mc.vocab_size, n))
                        best[side, n] = min(best[side, n], seconds)
        finally:
            run.close()
    if run.num_cached_tokens:
        logger.warning("ttft: the server found %d prompt tokens cached in random prompts; the "
                       "TTFTs are too low", run.num_cached_tokens)
    ttft_rows, hidden_rows = [], []
    for n in lengths:
        kv_bytes = n * geometry.bytes_per_token
        received = run.kv_bytes.get(n)
        if received is not None and received != kv_bytes:
            logger.warning("ttft: the decode worker received %d KV bytes for %d tokens, the "
                           "geometry says %d", received, n, kv_bytes)
        disaggregated = best["disaggregated", n]
        if "ttft" in config.parts:
            local = best["local", n]
            ttft_rows.append({"prompt_tokens": n, "kv_bytes": kv_bytes, "kv_bytes_received": received,
                              "disaggregated_s": disaggregated, "local_s": local,
                              "ratio_disaggregated_over_local": disaggregated / local})
            logger.info("ttft: %d tokens: disaggregated %.3f s, local %.3f s (%.2fx), %.1f MB of "
                        "KV", n, disaggregated, local, disaggregated / local, kv_bytes / 1e6)
        if "hidden" in config.parts:
            row = kvtransfer_report.hidden_row(n, kv_bytes, disaggregated, best["local", n],
                                               best["transfer_alone", n])
            hidden_rows.append(row)
            logger.info("hidden: %d tokens: transfer %.3f s, exposed %.3f s, hidden share %.2f",
                        n, row["transfer_s"], row["exposed_s"], row["hidden_share"])
    return ttft_rows, hidden_rows


def measure_quality(model_dir: Path, config: KVTransferBenchConfig) -> dict:
    from baton.bench.kv_quality import measure_int8_quality

    logger.info("quality: int8 against float32 KV, %d prompts of %d tokens",
                config.quality_num_prompts, config.quality_num_tokens)
    figures = measure_int8_quality(model_dir, num_prompts=config.quality_num_prompts,
                                   num_tokens=config.quality_num_tokens)
    return {"num_prompts": config.quality_num_prompts, "num_tokens": config.quality_num_tokens,
            "figures": figures}


def run(config: KVTransferBenchConfig) -> dict:
    """Measure what config asks, write the results where it says, print the report; return them."""
    start = time.perf_counter()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    load_before = roofline.load_average_1m()
    model_dir = resolve_model(config.model, config.cache_dir)
    result: dict = {
        "benchmark": "kvtransfer",
        "model": config.model,
        "dtype": "float32",
        "device": "cpu",
        "parts": list(config.parts),
        "num_repeats": config.num_repeats,
        "machine": {},  # filled in at the end, with the load average after the run
        "command": config.command,
    }
    if "wire" in config.parts:
        result["wire"] = measure_wire(config)
    if "ttft" in config.parts or "hidden" in config.parts:
        ttft_rows, hidden_rows = measure_ttft(model_dir, config)
        if "ttft" in config.parts:
            result["ttft"] = ttft_rows
        if "hidden" in config.parts:
            result["hidden"] = hidden_rows
    if "quality" in config.parts:
        result["quality"] = measure_quality(model_dir, config)
    result["machine"] = {**roofline.machine_info(),
                         "load_average_1m": [load_before, roofline.load_average_1m()]}
    result["ratios"] = kvtransfer_report.ratios(result)
    result["wall_s"] = time.perf_counter() - start
    kvtransfer_report.emit(result, config.out_dir)
    return result
