"""What `adistill demo` prints (issue 14): curl lines that paste into bash and run, progress while onboarding, and
the `adistill serve` line that serves the demo's registry again. The demo itself runs in `make demo`."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from adistill.demo import QUERIES, DemoProgress, curl_command, serve_command
from adistill.onboard_plan import OnboardEvent


class _Echo(BaseHTTPRequestHandler):
    """Answers like the predict endpoint's strictest reading: JSON only with a JSON content type."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        ok = self.headers.get("content-type") == "application/json"
        payload = {"path": self.path, "body": json.loads(body)} if ok else {"error": "no JSON content type"}
        data = json.dumps(payload).encode()
        self.send_response(200 if ok else 422)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_curl_lines_split_back_into_the_request() -> None:
    for tenant, texts in QUERIES.items():
        url = f"http://127.0.0.1:8000/v1/tenants/{tenant}/predict"
        body = {"texts": texts, "top_k": 2}
        words = shlex.split(curl_command(url, body))
        assert words[:5] == ["curl", "-s", "-X", "POST", url]
        assert words[5:7] == ["-H", "content-type: application/json"]
        assert words[7] == "-d" and json.loads(words[8]) == body
    assert any("'" in text for texts in QUERIES.values() for text in texts)  # "what's ...": the case that broke


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs curl and bash")
def test_curl_lines_paste_into_bash_and_run(echo_server: str) -> None:
    for tenant, texts in QUERIES.items():
        body = {"texts": texts, "top_k": 2}
        line = curl_command(f"{echo_server}/v1/tenants/{tenant}/predict", body)
        done = subprocess.run(["bash", "-c", line], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"path": f"/v1/tenants/{tenant}/predict", "body": body}


def test_the_serve_line_pastes_into_a_shell() -> None:
    line = serve_command("/tmp/demo out/registry")
    assert shlex.split(line)[-3:] == ["serve", "--registry", "/tmp/demo out/registry"]
    assert shlex.split(line)[0].endswith("adistill")


def test_demo_prints_progress_while_onboarding() -> None:
    lines: list[str] = []
    now = [0.0]
    progress = DemoProgress(lines.append, every_s=30.0, clock=lambda: now[0])

    def epoch(tenant: str, n: int, of: int = 10, t: float = 0.0) -> None:
        now[0] = t
        progress(OnboardEvent(tenant, "stage1", {"epoch": n, "epochs": of, "loss": 0.5, "val_accuracy": 0.75}))

    progress(OnboardEvent("bank", "queued", {"teachers": 0}))
    progress(OnboardEvent("bank", "reading", {"device": "cpu", "pid": 1}))
    epoch("bank", 1, t=1.0)
    epoch("bank", 2, t=5.0)  # within 30 s of the last line: quiet
    epoch("bank", 3, t=40.0)  # 30 s later: a line
    epoch("bank", 10, t=41.0)  # the stage's last epoch
    done = {"version": 1, "accuracy": 0.95625, "error": None, "done": 1, "total": 2, "eta_s": 10}
    progress(OnboardEvent("bank", "published", done))
    progress(OnboardEvent("bad", "failed", {"error": "DataError: x.csv: no rows"}))
    assert lines == [
        "  bank: training started",
        "  bank: stage1 epoch 1/10 val 0.750",
        "  bank: stage1 epoch 3/10 val 0.750",
        "  bank: stage1 epoch 10/10 val 0.750",
        "  bank: published (version 1, accuracy 0.956)  [1/2 tenants]",
        "  bad: failed (error DataError: x.csv: no rows)",
    ]


def test_the_demo_ends_with_the_serve_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run_demo` with its Ray parts and measurements stubbed: its last line is the `adistill serve` command."""
    import adistill.demo as demo
    import adistill.distributed.common as common
    import adistill.distributed.onboard as onboard

    monkeypatch.setattr(demo, "load_backbone", lambda: tiny)
    monkeypatch.setattr(common, "ensure_ray", lambda **kwargs: False)
    monkeypatch.setattr(common, "shutdown_ray", lambda: None)
    monkeypatch.setattr(onboard, "onboard_manifest", lambda *args, **kwargs: [])
    monkeypatch.setattr(demo, "_comparison", lambda *args: [])
    monkeypatch.setattr(demo, "_serve_and_ask", lambda *args: [])
    lines: list[str] = []
    demo.run_demo(tmp_path / "demo out", quick=True, echo=lines.append)
    registry = str((tmp_path / "demo out" / "registry").resolve())
    assert lines[-1] == serve_command(registry) and shlex.split(lines[-1])[-1] == registry
    assert any(line.lstrip().startswith("$ adistill onboard") for line in lines)
