"""A scripted OpenAI-compatible streaming server, for testing clients such as `baton bench serve`.

A plain ASGI app on uvicorn, run as a process of its own (`python -m tests.support.fake_openai`),
so the client under test shares no interpreter lock with it and its timings are the script's.
The prompt text (the last message's content, or the completion prompt) scripts each request with
words of the form key=value, the rest being free text:

  ttft=MS     delay before the first token (default --ttft-ms)
  itl=MS      delay between tokens (default --itl-ms)
  status=N    answer HTTP N with an OpenAI-shaped error instead of a stream
  broken=K    send an error event after K tokens
  nousage     report no usage even when stream_options.include_usage asks for it

A request generates max_tokens tokens; token k goes out at start + ttft + k * itl, timed from the
request's arrival, so jitter does not accumulate. Chat streams open with a role-only chunk, as
real servers do. GET /fake/stats returns every request body received and the most requests that
were in flight at once. FakeOpenAIServer starts one on a free loopback port and stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from typing import Self

MODEL = "fake-model"
REPO = Path(__file__).resolve().parents[2]


class FakeOpenAIServer:
    """Context manager: `with FakeOpenAIServer(ttft_ms=200, itl_ms=40) as server:` server.url."""

    def __init__(self, ttft_ms: float = 200.0, itl_ms: float = 40.0) -> None:
        self.ttft_ms, self.itl_ms = ttft_ms, itl_ms
        self.url = ""
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Self:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.fake_openai", "--ttft-ms", str(self.ttft_ms),
             "--itl-ms", str(self.itl_ms)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()  # the READY line, or "" if it died
        if not line.startswith("READY "):
            self.__exit__()
            raise RuntimeError(f"the fake OpenAI server did not start: {line!r}")
        self.url = line.split()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc.stdout.close()

    def stats(self) -> dict:
        """{"bodies": [every request body], "max_in_flight": int}."""
        return httpx.get(f"{self.url}/fake/stats", timeout=10).json()


class App:
    def __init__(self, ttft_ms: float, itl_ms: float) -> None:
        self.ttft_ms, self.itl_ms = ttft_ms, itl_ms
        self.bodies: list[dict] = []
        self.in_flight = self.max_in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        route = (scope["method"], scope["path"])
        if route == ("GET", "/v1/models"):
            await _send_json(send, 200, {"object": "list", "data": [{"id": MODEL}]})
        elif route == ("GET", "/fake/stats"):
            await _send_json(send, 200, {"bodies": self.bodies, "max_in_flight": self.max_in_flight})
        elif route in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            start = asyncio.get_running_loop().time()
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body"):
                    break
            body = json.loads(raw)
            self.bodies.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await self.complete(send, body, start, chat=scope["path"].endswith("chat/completions"))
            finally:
                self.in_flight -= 1
        else:
            await _send_json(send, 404, {"error": {"message": f"no route {scope['path']}"}})

    async def complete(self, send: Callable, body: dict, start: float, chat: bool) -> None:
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        words = prompt.split()
        knobs = dict(w.split("=", 1) for w in words if "=" in w)
        if "status" in knobs:
            await _send_json(send, int(knobs["status"]), {"error": {
                "message": f"scripted failure {knobs['status']}", "type": "server_error",
                "param": None, "code": int(knobs["status"])}})
            return
        ttft_s = float(knobs.get("ttft", self.ttft_ms)) / 1e3
        itl_s = float(knobs.get("itl", self.itl_ms)) / 1e3
        broken = int(knobs["broken"]) if "broken" in knobs else None
        include_usage = ("nousage" not in words
                         and (body.get("stream_options") or {}).get("include_usage"))
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})

        async def event(choices: list[dict], usage: dict | None = None) -> None:
            payload = {"id": "cmpl-1", "model": MODEL, "choices": choices}
            if include_usage:
                payload["usage"] = usage  # null on every chunk but the last, as Baton sends it
            await _send_sse(send, payload)

        def choice(text: str | None, finish: str | None = None) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish}
            return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}

        if chat:
            await event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None}])
        loop = asyncio.get_running_loop()
        num_tokens = body["max_tokens"]
        for k in range(num_tokens):
            if broken == k:
                await _send_sse(send, {"error": {"message": "scripted error in the stream",
                                                 "type": "server_error"}})
                break
            await asyncio.sleep(max(0.0, start + ttft_s + k * itl_s - loop.time()))
            await event([choice(f" tok{k}")])
        else:
            await event([choice(None, finish="length")])
            if include_usage:
                await event([], {"prompt_tokens": len(words), "completion_tokens": num_tokens,
                                 "total_tokens": len(words) + num_tokens})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _send_sse(send: Callable, payload: dict) -> None:
    await send({"type": "http.response.body", "more_body": True,
                "body": f"data: {json.dumps(payload)}\n\n".encode()})


async def _send_json(send: Callable, status: int, payload: dict) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})


def main() -> None:
    import socket

    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ttft-ms", type=float, default=200.0)
    parser.add_argument("--itl-ms", type=float, default=40.0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(App(args.ttft_ms, args.itl_ms), interface="asgi3",
                                           lifespan="off", log_level="warning", access_log=False))

    async def serve() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        print(f"READY http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
