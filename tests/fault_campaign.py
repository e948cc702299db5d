"""The fault campaign of issue 16: steady HTTP load on the serving app while a fault is injected, every answer checked.

Shared by tests/test_faults.py (short runs inside `make test`) and benchmarks/faults.py (longer runs, the soak).

- `Expected`: what the offline engine answers for each (tenant, version) on `TEXTS`, computed from the artifact files
  the caller published (never read back from a registry that may be down).
- `Load`: `clients` keep-alive HTTP/1.1 clients on 127.0.0.1 in a thread of their own (the caller injects faults
  synchronously meanwhile), each sending one request at a time to a random tenant with a random text, `pause_s`
  apart; bounded by `max_seconds` and by each request's `timeout_s`, and it stops by itself. Every request ends as
  one `Outcome`: `ok` (200 equal to the offline engine's answer for the version that answered), `failed_5xx` (a 5xx
  with a JSON `{"error": ...}` body), `wrong` (a 200 with another answer, an unknown version, or a non-5xx error for
  a tenant that exists) or `lost` (no response, a reset connection, a timeout, or a 5xx that is not JSON).
- `row(...)`: the faults.json row of a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from adistill.backbone import Backbone
from adistill.inference.engine import Engine
from adistill.store.artifact import artifact_from_files

TEXTS = [
    "how do i pay my credit card bill",
    "what is my balance",
    "book a table for two tonight",
    "reset my password please",
    "is it going to rain tomorrow",
    "play some music",
    "wake me up at seven",
    "find a hotel room in paris",
    "i lost my card",
    "when does my flight leave",
    "cancel my order",
    "how do i cook rice",
]
KINDS = ("ok", "failed_5xx", "wrong", "lost")
CUT = "cut mid-response"  # the detail of a lost request whose response began and was cut


def same(got: dict[str, Any], expected: dict[str, Any]) -> bool:
    """One prediction equals the offline engine's: same labels in order, scores within 1e-4 (tests/test_serve.py)."""
    labels, want = got.get("labels"), expected["labels"]
    if not isinstance(labels, list) or len(labels) != len(want):
        return False
    close = all(
        g.get("label") == e["label"] and abs(g.get("score", -9.0) - e["score"]) <= 1e-4 for g, e in zip(labels, want)
    )
    return close and got.get("out_of_scope") == expected["out_of_scope"]


class Expected:
    """Offline answers on TEXTS per (tenant, version), from the files that were published."""

    def __init__(self, backbone: Backbone, top_k: int = 3) -> None:
        self.backbone, self.top_k = backbone, top_k
        self.answers: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def add(self, tenant_id: str, versions: int | Iterable[int], files: dict[str, bytes]) -> None:
        """The answers of `files`, under each of `versions` (the numbers a publish may get: registered before it
        runs, since a replica may answer with the new version before the publish call returns)."""
        model = artifact_from_files(files, self.backbone, f"{tenant_id} to publish").model
        engine = Engine(self.backbone)  # a fresh engine: its bank never holds another version of this tenant
        answers = [p.to_dict() for p in engine.predict(TEXTS, [model] * len(TEXTS), top_k=self.top_k)]
        with self._lock:
            for version in [versions] if isinstance(versions, int) else versions:
                self.answers[(tenant_id, version)] = answers

    def judge(self, tenant_id: str, index: int, status: int, body: bytes) -> tuple[str, int | None, str]:
        """(kind, adapter_version or None, detail) of one response to TEXTS[index] for `tenant_id`."""
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if status >= 500:
            if isinstance(payload, dict) and isinstance(payload.get("error"), str):
                return "failed_5xx", None, f"{status}: {payload['error']}"
            return "lost", None, f"{status} not JSON: {body[:80]!r}"
        if status != 200 or not isinstance(payload, dict):
            return "wrong", None, f"{status}: {body[:120]!r}"
        version = payload.get("adapter_version")
        with self._lock:
            expected = self.answers.get((tenant_id, version)) if isinstance(version, int) else None
        predictions = payload.get("predictions")
        if payload.get("tenant_id") != tenant_id or expected is None or not isinstance(predictions, list):
            return "wrong", None, f"200 for {payload.get('tenant_id')!r} version {version!r}"
        if len(predictions) != 1 or not same(predictions[0], expected[index]):
            return "wrong", version, f"200 version {version}: another answer"
        return "ok", version, ""


@dataclass(frozen=True)
class Outcome:
    start: float  # time.monotonic() when sent
    end: float  # when answered, failed or given up
    tenant: str
    kind: str  # one of KINDS
    status: int | None
    version: int | None
    detail: str = ""


class ResponseCut(Exception):
    """The response's head arrived, its body did not: the server died while writing it (after the head was sent, no
    proxy can send the request again)."""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, connection kept alive, body) of one HTTP/1.1 response; `ResponseCut` when it ends after the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    try:
        return await _read_body(reader, head, status)
    except asyncio.IncompleteReadError as exc:
        raise ResponseCut(f"status {status}, the body cut after {len(exc.partial)} bytes") from None


async def _read_body(reader: asyncio.StreamReader, head: bytes, status: int) -> tuple[int, bool, bytes]:
    close = re.search(rb"(?i)\r\nconnection:\s*close", head) is not None
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if length is not None:
        return status, not close, await reader.readexactly(int(length.group(1)))
    if re.search(rb"(?i)\r\ntransfer-encoding:\s*chunked", head):
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return status, not close, b"".join(chunks)
            chunks.append(data[:-2])
    return status, False, await reader.read()  # delimited by the connection's end


@dataclass
class Load:
    """Steady load: `clients` clients over `tenants` (see the module docstring). `start()`, inject, `stop()`."""

    url: str
    tenants: list[str]
    expected: Expected
    clients: int = 16
    pause_s: float = 0.25
    timeout_s: float = 30.0
    max_seconds: float = 300.0
    headers: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    in_flight: int = 0

    def __post_init__(self) -> None:
        match = re.fullmatch(r"http://127\.0\.0\.1:(\d+)(/[\w.-]+)*/?", self.url)
        if match is None:
            raise ValueError(f"the fault campaign only sends to http://127.0.0.1:<port>[/prefix], not {self.url!r}")
        self.host, self.port = "127.0.0.1", int(match.group(1))
        self.prefix = self.url[len(f"http://127.0.0.1:{self.port}") :].rstrip("/")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._tasks: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()
        self._ready = threading.Event()

    # -- control, from the caller's thread ----------------------------------------------------------------------

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-load")
        self._thread.start()
        self._ready.wait(10)
        for i in range(self.clients):
            self.add_client(self.tenants, self.pause_s, seed=self.seed * 1000 + i)
        return self

    def add_client(self, tenants: list[str], pause_s: float, seed: int | None = None) -> None:
        """One more client (e.g. a probe of an uncached tenant), while the load runs."""
        assert self._loop is not None
        rng = random.Random(seed if seed is not None else random.random())

        def begin() -> None:
            self._tasks.append(asyncio.ensure_future(self._client(list(tenants), pause_s, rng)))

        self._loop.call_soon_threadsafe(begin)

    def stop_sending(self) -> None:
        """No new requests from now on (returns at once; `stop()` waits for the ones in flight)."""
        self._stopping.set()

    def stop(self) -> list[Outcome]:
        """Stop sending; every request in flight ends (answered or timed out) before this returns."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 30)
            assert not self._thread.is_alive(), "the load generator did not stop"
        return self.snapshot()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def wait_until(self, check: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll `check` (every 0.1 s) until it holds; returns the time.monotonic() when it did. AssertionError after
        `timeout_s`: a hang is a failure, never a wait without end."""
        deadline = time.monotonic() + timeout_s
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {timeout_s:.0f} s: {what}")
            time.sleep(0.1)
        return time.monotonic()

    def wait_in_flight(self, n: int, within_s: float) -> bool:
        """Until at least `n` requests are unanswered (polled every millisecond), at most `within_s` seconds;
        whether it happened."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            with self._lock:
                if self.in_flight >= n:
                    return True
            time.sleep(0.001)
        return False

    # -- the clients, in the load's own thread -----------------------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._ready.set()
        deadline = time.monotonic() + self.max_seconds

        async def main() -> None:
            while not self._stopping.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._stopping.set()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        try:
            loop.run_until_complete(main())
        finally:
            loop.close()

    def _request(self, tenant: str, index: int) -> bytes:
        body = json.dumps({"texts": [TEXTS[index]], "top_k": self.expected.top_k}).encode()
        lines = [f"POST {self.prefix}/v1/tenants/{tenant}/predict HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def _client(self, tenants: list[str], pause_s: float, rng: random.Random) -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while not self._stopping.is_set():
                tenant, index = rng.choice(tenants), rng.randrange(len(TEXTS))
                start = time.monotonic()
                status: int | None = None
                with self._lock:
                    self.in_flight += 1
                try:
                    if conn is None:
                        opened = asyncio.open_connection(self.host, self.port)
                        conn = await asyncio.wait_for(opened, self.timeout_s)
                    conn[1].write(self._request(tenant, index))
                    status, keep, body = await asyncio.wait_for(_read_response(conn[0]), self.timeout_s)
                    kind, version, detail = self.expected.judge(tenant, index, status, body)
                    if not keep:
                        conn = _close(conn)
                except asyncio.TimeoutError:
                    kind, version, detail = "lost", None, f"no answer within {self.timeout_s:.0f} s"
                    conn = _close(conn)
                except ResponseCut as exc:
                    kind, version, detail = "lost", None, f"{CUT}: {exc}"
                    conn = _close(conn)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                    kind, version, detail = "lost", None, f"no response: {type(exc).__name__}: {exc}"[:160]
                    conn = _close(conn)
                outcome = Outcome(start, time.monotonic(), tenant, kind, status, version, detail)
                with self._lock:
                    self.in_flight -= 1
                    self.outcomes.append(outcome)
                if kind == "lost":
                    await asyncio.sleep(min(pause_s, 0.2) + 0.05)  # no hot loop against a closed port
                await asyncio.sleep(pause_s)
        finally:
            _close(conn)


def _close(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None) -> None:
    """Close a connection (if any); returns None, the value a closed connection is kept as."""
    if conn is not None:
        with contextlib.suppress(Exception):
            conn[1].close()
    return None


# ------------------------------------------------------------------------------------------------ the results


def count(outcomes: Iterable[Outcome]) -> dict[str, int]:
    counts = Counter(o.kind for o in outcomes)
    total = sum(counts.values())
    return {"sent": total, **{k: counts.get(k, 0) for k in KINDS}}


def row(fault: str, outcomes: list[Outcome], recovery_s: float | None, /, **extra: Any) -> dict[str, Any]:
    """The faults.json row: {"fault", "sent", "ok", "failed_5xx", "wrong", "lost", "recovery_s"} and `extra`
    (statuses, sample errors: the Markdown report's detail)."""
    counts = count(outcomes)
    statuses = Counter(str(o.status) if o.status is not None else "none" for o in outcomes)
    samples: dict[str, list[str]] = {}
    for o in outcomes:
        if o.kind != "ok" and o.detail not in samples.setdefault(o.kind, []) and len(samples[o.kind]) < 3:
            samples[o.kind].append(o.detail)
    return {
        "fault": fault,
        "sent": counts["sent"],
        "ok": counts["ok"],
        "failed_5xx": counts["failed_5xx"],
        "wrong": counts["wrong"],
        "lost": counts["lost"],
        "recovery_s": None if recovery_s is None else round(recovery_s, 2),
        "statuses": dict(sorted(statuses.items())),
        "samples": samples,
        **extra,
    }


def failures(outcomes: Iterable[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.kind != "ok"]


def last_failure_end(outcomes: Iterable[Outcome], after: float = 0.0) -> float | None:
    ends = [o.end for o in outcomes if o.kind != "ok" and o.end >= after]
    return max(ends) if ends else None
