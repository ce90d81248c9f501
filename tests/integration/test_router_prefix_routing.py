"""KV-aware routing end to end: real decode workers (tiny model) run as in-process worker actors
that publish their KV events to a real Redis, and a router that reads them. Requests sharing a
prefix go to the worker that caches it (round robin spreads them); with Redis stopped in the middle
of a stream of requests none fails, and once Redis is back the choices are prefix-aware again."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from baton.v1 import generation_pb2, generation_pb2_grpc
from cluster.actors import DecodeWorkerActor
from cluster.redis_server import RedisServer
from engine.config import EngineConfig
from router.config import RouterConfig
from router.kv_events import RedisPrefixIndexFeed
from router.registry import RedisWorkerDirectory
from router.routing import RoutingPolicy
from router.server import Router
from tests.support.models import tiny_model

pytestmark = pytest.mark.integration

PREFIX = [(7 * j) % 300 + 3 for j in range(160)]  # 10 blocks of 16


def prompt(i: int) -> list[int]:
    return PREFIX + [(13 * i + j) % 300 + 3 for j in range(8)]


def hits(actor) -> int:
    return actor.worker.engine.stats.prefix_cache_hits


class Cluster:
    def __init__(self, redis_url: str, policy: str) -> None:
        model_dir = tiny_model("llama-gqa")
        engine = EngineConfig(model=str(model_dir), kv_cache_memory_bytes=1 << 24, num_threads=1)
        self.decode = [DecodeWorkerActor(worker_id=f"decode-{i}", engine_config=engine,
                                         model_name="tiny", redis_url=redis_url,
                                         heartbeat_interval_s=0.2, lease_ttl_s=2.0)
                       for i in range(2)]
        for actor in self.decode:
            actor.start()
        self.directory = RedisWorkerDirectory(redis_url, poll_interval_s=0.2)
        self.feed = RedisPrefixIndexFeed(redis_url, self.directory.workers, block_ms=50,
                                         retry_interval_s=0.1)
        config = RouterConfig(model_name="tiny", model_dir=str(model_dir), http_port=0,
                              grpc_port=0, routing=RoutingPolicy(policy=policy))
        self.router = Router(config, self.directory, self.feed)
        self.router.start()
        self.channel = grpc.insecure_channel(self.router.grpc_address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def generate(self, token_ids: list[int]) -> list[int]:
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=token_ids), temperature=0.0, max_tokens=4,
            ignore_eos=True)
        return [t for msg in self.stub.Generate(request, timeout=60) for t in msg.token_ids]

    def holders(self, prefix: list[int] = PREFIX, feed=None) -> list[str] | None:
        """The workers the index (of `feed`, else the router's) says hold `prefix` whole; None
        while it answers nothing."""
        answer = (feed or self.feed).lookup(prefix, [a.worker_id for a in self.decode])
        if answer is None:
            return None
        return sorted(w for w, n in answer.cached_tokens.items() if n >= len(prefix))

    def index_hit_tokens(self) -> float:
        return self.router.metrics.prefix_index_cached_tokens._value.get()

    def close(self) -> None:
        self.channel.close()
        self.router.stop()
        for actor in self.decode:
            actor.drain(0.5)


def wait_until(predicate, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize("policy", ["kv_aware", "round_robin"])
def test_requests_sharing_a_prefix_follow_the_cache(policy) -> None:
    with RedisServer() as redis_server:
        cluster = Cluster(redis_server.url, policy)
        try:
            cluster.generate(prompt(0))
            assert wait_until(lambda: bool(cluster.holders()))
            before = [hits(a) for a in cluster.decode]
            for i in range(1, 7):
                cluster.generate(prompt(i))
            gained = [hits(a) - b for a, b in zip(cluster.decode, before)]
        finally:
            cluster.close()
    if policy == "kv_aware":  # all six on the holder, each hitting the whole prefix
        assert sorted(gained) == [0, 6 * len(PREFIX)]
    else:  # three each; the one that did not hold it first prefills it once
        assert sorted(gained) == [2 * len(PREFIX), 3 * len(PREFIX)]


def test_two_routers_route_a_shared_prefix_to_the_same_worker() -> None:
    """Two router replicas (as behind one load-balanced address) read the same registry and
    event streams, so they agree on where a prefix lives."""
    with RedisServer() as redis_server:
        cluster = Cluster(redis_server.url, "kv_aware")
        directory = RedisWorkerDirectory(redis_server.url, poll_interval_s=0.2)
        feed = RedisPrefixIndexFeed(redis_server.url, directory.workers, block_ms=50)
        second = Router(cluster.router.config, directory, feed)
        second.start()
        try:
            with grpc.insecure_channel(second.grpc_address) as channel:
                stubs = [cluster.stub, generation_pb2_grpc.GenerationStub(channel)]
                cluster.generate(prompt(0))  # through the first router
                assert wait_until(lambda: bool(cluster.holders(feed=feed)))
                before = [hits(a) for a in cluster.decode]
                for i in range(1, 7):  # alternately through each router
                    request = generation_pb2.GenerateRequest(
                        token_ids=generation_pb2.TokenIds(ids=prompt(i)), temperature=0.0,
                        max_tokens=4, ignore_eos=True)
                    list(stubs[i % 2].Generate(request, timeout=60))
                gained = [hits(a) - b for a, b in zip(cluster.decode, before)]
        finally:
            second.stop()
            cluster.close()
    assert sorted(gained) == [0, 6 * len(PREFIX)]


def test_redis_outage_fails_no_request_and_routing_recovers() -> None:
    server = RedisServer()
    server.start()
    port = server.port
    cluster = Cluster(server.url, "kv_aware")
    failures: list[BaseException] = []
    done = threading.Event()
    completed = [0]

    def load() -> None:
        i = 100
        while not done.is_set():
            try:
                cluster.generate(prompt(i) if i % 2 else [i % 300 + 3] * 20)
                completed[0] += 1
            except BaseException as exc:  # noqa: BLE001 - every failure is reported
                failures.append(exc)
            i += 1

    try:
        cluster.generate(prompt(0))
        assert wait_until(lambda: bool(cluster.holders()))
        thread = threading.Thread(target=load, daemon=True)
        thread.start()
        time.sleep(0.5)
        server.stop()
        assert wait_until(lambda: cluster.holders() is None)  # the index is down: load-only
        during = completed[0]
        time.sleep(1.5)
        assert completed[0] > during  # requests kept completing without Redis
        server = RedisServer(port=port)  # back, empty
        server.start()
        # the workers snapshot their caches into the new Redis and the router replays them
        assert wait_until(lambda: bool(cluster.holders()), timeout_s=15)
        done.set()
        thread.join(30)
        assert not failures, failures[:3]
        # Prefix-aware again: a new prefix, once cached somewhere, draws every later request
        # there, each choice made on the index's word (its hit-token counter grows by the prefix).
        other = [(5 * j) % 300 + 3 for j in range(320)]  # saves more than stale load costs
        cluster.generate(other + [1])
        assert wait_until(lambda: len(cluster.holders(other) or []) == 1)
        (holder,) = cluster.holders(other)
        before = {a.worker_id: hits(a) for a in cluster.decode}
        index_before = cluster.index_hit_tokens()
        for i in range(4):
            cluster.generate(other + [i + 2, i + 3])
        gained = {a.worker_id: hits(a) - before[a.worker_id] for a in cluster.decode}
        assert gained[holder] == 4 * len(other)
        assert sum(gained.values()) == gained[holder]
        assert cluster.index_hit_tokens() - index_before == 4 * len(other)
    finally:
        done.set()
        cluster.close()
        server.stop()
