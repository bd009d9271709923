"""The soak's processes and what they hold: the fake upstream, shim (gunicorn), the clients file.

``run_upstream`` is the fake upstream's process (soak.py re-invokes itself with ``--upstream``
to run it); ``Shim`` starts gunicorn as deployed and reads its workers and metrics;
``ClientsFile`` writes the named-clients file and its edits; ``Sampler`` reads each worker's
RSS, descriptors and greenlets. What is done to them over time (edits, SIGHUP, restarts) is
soak.py's ``Control``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import brotli
from run import free_port, wait_port  # one copy of the loopback helpers for bench/
from soak_plan import CLIENTS, HTTP_TIMEOUT_S, Plan, secret_of
from soak_wire import Decoder, usage_in

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.fake_upstream import (  # noqa: E402 - bench/ is a folder of scripts
    FAKE_GEMINI_KEYS,
    FAKE_OAUTH_TOKEN,
    FakeUpstream,
)

try:
    from compression import zstd
except ImportError:
    from backports import zstd


# --- the fake upstream, in a process of its own ------------------------------------------------


def run_upstream(port: int, out: str) -> None:
    """Serve as the fake upstream until SIGTERM, then write the usage it sent, per call id."""
    fake = FakeUpstream(port=port)
    # Keep no request records: 30 minutes of them is hundreds of MB. `sent` stays.
    fake.record = lambda request: None  # type: ignore[method-assign]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    fake.server.socket.listen(1024)  # socketserver's backlog of 5 drops SYNs under bursts
    fake.start()
    while not stop.wait(0.5):
        pass
    with fake.lock:
        sent = dict(fake.sent)
        ends = Counter(how for how, _ in fake.stream_ends.values())
    usage, undecodable = {}, []
    for marker, data in sent.items():
        try:
            usage[marker] = usage_in(Decoder(marker.rsplit("-", 1)[1]).whole(bytes(data)))
        except (zlib.error, brotli.error, zstd.ZstdError, ValueError, IndexError):
            undecodable.append(marker)
    Path(out).write_text(
        json.dumps({"usage": usage, "undecodable": undecodable, "stream_ends": ends})
    )


# --- shim and its clients file ----------------------------------------------------------------


class ClientsFile:
    """The named-clients file, rewritten now and then: atomically, or in place."""

    def __init__(self, path: Path):
        self.path = path
        self.edits = 0
        self.write(atomic=True)

    def text(self) -> str:
        lines = [
            f"{name} {hashlib.sha256(secret_of(name).encode()).hexdigest()} {limits}".strip()
            for name, limits in CLIENTS.items()
        ]
        # What changes: a client that comes and goes, and sdk's limits (added, removed).
        if self.edits % 2:
            lines.append(f"churn-{self.edits} {hashlib.sha256(b'churn').hexdigest()}")
        if self.edits % 3 == 1:
            lines[2] += " concurrency=500"
        return "\n".join(lines) + "\n"

    def write(self, atomic: bool) -> None:
        text = self.text()
        if atomic:
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(text)
            os.replace(temporary, self.path)
        else:  # over the old bytes, then cut: never an empty file in between
            with open(self.path, "r+") as handle:
                handle.write(text)
                handle.truncate()

    def edit(self) -> None:
        self.edits += 1
        self.write(atomic=self.edits % 2 == 0)


class Shim:
    def __init__(self, plan: Plan, upstream: int, work: Path):
        self.grace_s = plan.grace_s
        self.ports = {"anthropic": free_port(), "gemini": free_port()}
        self.metrics_port = free_port()
        self.log_path = work / "shim.log"
        self.clients = ClientsFile(work / "clients.txt")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SHIM_", "PROMETHEUS_"))}
        env.update(
            SHIM_CLIENTS_FILE=str(self.clients.path),
            SHIM_ANTHROPIC_TOKEN=FAKE_OAUTH_TOKEN,
            SHIM_GEMINI_KEYS=",".join(FAKE_GEMINI_KEYS),
            SHIM_ANTHROPIC_UPSTREAM=f"http://127.0.0.1:{upstream}",
            SHIM_GEMINI_UPSTREAM=f"http://127.0.0.1:{upstream}",
            SHIM_BIND_HOST="127.0.0.1",
            SHIM_ANTHROPIC_PORT=str(self.ports["anthropic"]),
            SHIM_GEMINI_PORT=str(self.ports["gemini"]),
            SHIM_METRICS_PORT=str(self.metrics_port),
            SHIM_WORKERS="2",
            SHIM_HTTP_TIMEOUT_S=str(HTTP_TIMEOUT_S),
            SHIM_GRACEFUL_TIMEOUT_S=str(plan.grace_s),
            SHIM_SELF_STATS_S=str(plan.sample_s),
            SHIM_GEMINI_KEYS_FILE="",
            PROMETHEUS_MULTIPROC_DIR=str(work / "metrics"),
        )
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for port in (*self.ports.values(), self.metrics_port):
            wait_port(port, timeout=20)
        deadline = time.monotonic() + 20
        while len(self.workers()) < 2 or len(self.scrape_by_pid("shim_worker_requests")) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not come up")
            time.sleep(0.1)

    def workers(self) -> list[int]:
        pids = []
        try:
            for task in Path(f"/proc/{self.process.pid}/task").iterdir():
                pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
        return sorted(pids)

    def scrape(self) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=30)
        try:
            conn.request("GET", "/metrics", headers={"Connection": "close"})
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def scrape_by_pid(self, name: str, text: str | None = None) -> dict[int, float]:
        text = self.scrape() if text is None else text
        return {
            int(pid): float(v)
            for pid, v in re.findall(rf'^{name}{{pid="(\d+)"}} (\S+)$', text, re.M)
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.grace_s + 10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def descriptors(pid: int, ports: dict[str, int]) -> dict[str, int]:
    """A worker's open descriptors by what they are: client and upstream sockets, the rest."""
    inodes = {}
    for table in ("tcp", "tcp6"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, state, inode = cols[1], cols[2], cols[3], cols[9]
            inodes[inode] = (
                int(local.rsplit(":", 1)[1], 16),
                int(remote.rsplit(":", 1)[1], 16),
                state,
            )
    counts = Counter()
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return {}
    for link in links:
        if link.startswith("socket:["):
            local, remote, state = inodes.get(link[8:-1], (0, 0, ""))
            if state == "0A":
                counts["listening"] += 1
            elif local in ports["shim"]:
                counts["client"] += 1
            elif remote == ports["upstream"]:
                counts["upstream"] += 1
            else:
                counts["other_socket"] += 1
        else:
            counts["other"] += 1
    counts["total"] = len(links)
    return dict(counts)


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class Sampler:
    """Every plan.sample_s: each worker's RSS and descriptors from /proc, greenlets from metrics."""

    def __init__(self, shim: Shim, ports: dict, t0: float):
        self.shim, self.ports, self.t0 = shim, ports, t0
        self.samples: list[dict] = []

    def take(self, label: str = "load") -> list[dict]:
        taken = []
        pids = self.shim.workers()
        fds = {pid: descriptors(pid, self.ports) for pid in pids}
        rss = {pid: rss_bytes(pid) for pid in pids}
        try:
            text = self.shim.scrape()
        except OSError:
            text = ""
        greenlets = self.shim.scrape_by_pid("shim_worker_greenlets", text)
        handled = self.shim.scrape_by_pid("shim_worker_requests", text)
        for pid in pids:
            if rss[pid] is None or not fds[pid]:
                continue
            taken.append(
                {
                    "t": round(time.time() - self.t0, 2),
                    "label": label,
                    "pid": pid,
                    "rss": rss[pid],
                    "fds": fds[pid],
                    "greenlets": greenlets.get(pid),
                    "handled": handled.get(pid),
                }
            )
        self.samples += taken
        return taken
