"""pretrain --address on a Ray cluster started with ``ray start``: two nodes on loopback.

A head and a second node run on this machine, each started by ``ray start --block`` in a
session of its own, with token authentication on and every node pinned to 127.0.0.1.
``ray start`` turns ``--node-ip-address 127.0.0.1`` into the machine's outward address
(Ray issue #59110), so the nodes are started by Ray's own ``ray start`` command with that
one rewrite turned off: then every Ray process binds and connects on 127.0.0.1 only, which
the tests check. The cluster is stopped by session id (SIGKILL), whatever the outcome.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("ray")

from factories import (  # noqa: E402
    free_port,
    kill_9_session,
    make_tables,
    pythonpath_with_tests,
)

pytestmark = pytest.mark.slow

LOOPBACK = "127.0.0.1"
# Ray's own `ray start`, with the loopback rewrite off (see the module docstring).
_RAY_START = (
    "import sys\n"
    "from ray._private import services\n"
    "services.resolve_ip_for_localhost = lambda host: host\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv[0] = 'ray'\n"
    "main()\n"
)
# The longest socket path Ray makes under a node's temp dir, beyond the dir itself:
# /session_<date>_<time>_<usec>_<pid>/sockets/plasma_store; unix sockets allow 107 bytes.
_SOCKET_SUFFIX_CHARS = 64
_UNIX_SOCKET_MAX_CHARS = 107
_START_TIMEOUT_S = 90.0


@dataclass
class Node:
    name: str
    proc: subprocess.Popen
    temp_dir: Path
    log: Path

    def pids(self) -> list[int]:
        """Every process of this node (its ``ray start`` session)."""
        return _session_pids(self.proc.pid)

    def raylet_pid(self) -> int:
        [pid] = [p for p in self.pids() if _comm(p) == "raylet"]
        return pid

    def actors(self) -> set[str]:
        """Names of the actor classes that ran on this node (from its worker logs)."""
        return {name for _, name in self._actor_markers()}

    def actor_logs(self, name: str) -> list[Path]:
        """Worker logs of this node's ``name`` actors: one per actor started."""
        return [f for f, n in self._actor_markers() if n == name]

    def _actor_markers(self) -> list[tuple[Path, str]]:
        return [
            (f, name)
            for f in self.temp_dir.glob("session_*/logs/worker-*.out")
            for name in re.findall(r"^:actor_name:(\w+)$", f.read_text(errors="replace"), re.M)
        ]


@dataclass
class Cluster:
    root: Path
    address: str
    token_file: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    remove_root: bool = False  # a temporary root of its own, removed by stop()

    def start_node(self, name: str, *args: str) -> Node:
        temp_dir = self.root / name
        log = self.root / f"{name}.log"
        low = _free_port_block(100)
        cmd = [
            sys.executable,
            "-c",
            _RAY_START,
            "start",
            "--block",
            "--disable-usage-stats",
            f"--node-ip-address={LOOPBACK}",
            f"--temp-dir={temp_dir}",
            "--num-cpus=1",
            f"--object-store-memory={80 << 20}",
            f"--min-worker-port={low}",
            f"--max-worker-port={low + 99}",
            *(
                f"--{flag}={free_port()}"
                for flag in (
                    "dashboard-agent-listen-port",
                    "dashboard-agent-grpc-port",
                    "runtime-env-agent-port",
                    "metrics-export-port",
                )
            ),
            *args,
        ]
        with open(log, "w") as out:
            proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        node = Node(name, proc, temp_dir, log)
        self.nodes.append(node)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"{name} did not start:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{name} not up in {_START_TIMEOUT_S:g} s"
            time.sleep(0.2)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            kill_9_session(node.proc)
        if self.remove_root:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(root: Path) -> Cluster:
    """A head and a second node under ``root``, one CPU each, token authentication on;
    the caller stops it (:meth:`Cluster.stop`). Stopped already when this raises."""
    remove_root = len(str(root)) + len("/node2") + _SOCKET_SUFFIX_CHARS > _UNIX_SOCKET_MAX_CHARS
    if remove_root:  # a deep tmp path: the nodes' sockets would not fit
        root = Path(tempfile.mkdtemp(prefix="nsr"))
    token_file = root / "token"
    token_file.write_text(secrets.token_hex(32))
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath_with_tests(),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        "RAY_USAGE_STATS_ENABLED": "0",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("RAY_ADDRESS", None)
    c = Cluster(root, f"{LOOPBACK}:{port}", token_file, env, remove_root=remove_root)
    try:
        c.start_node(
            "head",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        )
        c.start_node("node2", f"--address={c.address}")
    except BaseException:
        c.stop()
        raise
    return c


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """:func:`start_cluster`, stopped by session id after the module's tests."""
    c = start_cluster(tmp_path_factory.mktemp("rc"))
    try:
        yield c
    finally:
        c.stop()


def run_pretrain(address: str, out: str, storage: str) -> None:
    """The pretrain the test runs in a subprocess: sim backend, collection and training
    on 2 Ray workers (one CPU per node, so one per node)."""
    import logging

    from neuroshard.pretrain.pipeline import PretrainConfig, pretrain

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tables = make_tables(30, seed=4)
    pretrain(
        PretrainConfig(
            Path(out),
            backend="sim",
            backend_kwargs={"noise": 0.03},
            tables=tables[:20],
            holdout_tables=tables[20:],
            compute_samples=300,
            comm_samples=100,
            holdout_samples=60,
            retest_samples=20,
            max_tables=8,
            chunk_size=20,
            workers=2,
            address=address,
            storage=storage,
            progress=False,
            model_kwargs={"max_epochs": 3, "patience": 3, "train_batch_size": 64},
        )
    )


def test_pretrain_collects_and_trains_on_both_nodes(cluster, tmp_path):
    out, storage = tmp_path / "run", tmp_path / "storage"
    code = (
        "from test_ray_cluster import run_pretrain\n"
        f"run_pretrain({cluster.address!r}, {str(out)!r}, {str(storage)!r})\n"
    )
    # The driver has the token file but not RAY_AUTH_MODE: neuroshard turns token mode on.
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    started = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400
    )
    print(f"\npretrain on 2 nodes: {time.monotonic() - started:.0f} s")
    assert res.returncode == 0, res.stderr[-4000:]
    assert "connected to the Ray cluster at " + cluster.address in res.stderr

    meta = json.loads((out / "model" / "meta.json").read_text())
    assert meta["training"]["compute"]["epochs_run"] == 3
    runs = sorted(p.name.split("-")[0] for p in storage.iterdir() if p.is_dir())
    assert runs == ["bwd", "compute", "fwd"], runs  # one Ray Train run per net, in --storage
    assert not (out / "train").exists()
    for node in cluster.nodes[:2]:
        actors = node.actors()
        assert "_Worker" in actors, (node.name, actors)  # collection
        assert "RayTrainWorker" in actors, (node.name, actors)  # training
    _assert_loopback_only(*cluster.nodes[:2])


def collect_slowly(address: str, out: str, samples: int) -> None:
    """The collection the lost-node test runs in a subprocess, as ``neuroshard collect``
    would with ``--workers 2 --address``, on a sim slowed to 20 ms per sample so that it
    lasts long enough to lose a node in it."""
    import logging

    from test_ray_jobs import SlowSim

    from neuroshard.pretrain.collect import BackendSpec
    from neuroshard.pretrain.pipeline import PretrainConfig, collect_samples

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    res = collect_samples(
        PretrainConfig(
            Path(out),
            backend=BackendSpec("slow-sim", {"delay_s": 0.02}, factory=SlowSim),
            compute_samples=samples,
            workers=2,
            address=address,
            chunk_size=64,
            progress=False,
        ),
        "compute",
    )
    print(f"{res.measured} measured, {res.skipped} already on disk, {res.failed} failed")


def test_collection_survives_a_lost_node_and_reruns_exactly(cluster, tmp_path):
    """SIGKILL the second node's raylet mid-collection: its chunks are measured again on
    the head, and a rerun finds every sample on disk once."""
    import pyarrow.parquet as pq

    from neuroshard.pretrain.collect import part_files

    head, node2 = cluster.nodes[0], cluster.nodes[1]
    assert node2.proc.poll() is None, "the second node is not running"
    out, samples = tmp_path / "data", 640  # 10 chunks of 64
    cmd = [
        sys.executable,
        "-c",
        "from test_ray_cluster import collect_slowly\n"
        f"collect_slowly({cluster.address!r}, {str(out)!r}, {samples})\n",
    ]
    env = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    workers_before = len(node2.actor_logs("_Worker"))
    log = tmp_path / "collect.log"
    with open(log, "w") as f:
        job = subprocess.Popen(
            cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while len(part_files(out)) < 2 or len(node2.actor_logs("_Worker")) == workers_before:
            assert job.poll() is None, f"the job ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no 2 parts with a worker on node2 in 120 s"
            time.sleep(0.05)
        os.kill(node2.raylet_pid(), signal.SIGKILL)
        parts_at_kill = len(part_files(out))
        rc = job.wait(timeout=240)
    finally:
        kill_9_session(job)
    text = log.read_text()
    assert rc == 0, text[-4000:]
    assert parts_at_kill < samples // 64, "the node was lost after the collection"
    assert "Ray worker died" in text or "lost while starting" in text, text[-3000:]

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"0 measured, {samples} already on disk, 0 failed" in rerun.stdout, rerun.stdout
    keys = [
        k
        for p in part_files(out)
        for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()
    ]
    assert len(keys) == len(set(keys)) == samples, (len(keys), len(set(keys)))
    assert len(head.actor_logs("_Worker")) > 0


def test_unreachable_or_unauthenticated_cluster_fails_fast(cluster, tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    base = {
        k: v
        for k, v in cluster.env.items()
        if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")
    }
    base["HOME"] = str(home)
    closed = f"{LOOPBACK}:{free_port()}"
    cases = [
        (closed, {}, ["no Ray cluster answers at " + closed, "--node-ip-address"]),
        (cluster.address, {}, ["requires an authentication token", "RAY_AUTH_TOKEN"]),
        (
            cluster.address,
            {"RAY_AUTH_TOKEN": "not-the-token"},
            ["rejected this client's token (from RAY_AUTH_TOKEN)"],
        ),
    ]
    for address, extra, needles in cases:
        started = time.monotonic()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "neuroshard.cli",
                "collect",
                "--samples",
                "10",
                "--address",
                address,
                "--out",
                str(tmp_path / "c"),
            ],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        took = time.monotonic() - started
        assert res.returncode == 6, (address, extra, res.stderr[-2000:])
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr[-2000:]
        for needle in needles:
            assert needle in lines[0], lines[0]
        assert address in lines[0]
        assert took < 20, f"{took:.1f} s to fail"  # mostly Python start-up and imports


def test_connect_refuses_a_machine_without_a_node_of_the_cluster(cluster, monkeypatch):
    from ray._private import services

    from neuroshard.pretrain.ray_jobs import connect_ray
    from neuroshard.types import RayClusterError

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_file))
    monkeypatch.setattr(services, "find_node_ids", lambda: set())
    with pytest.raises(RayClusterError, match="no node of the Ray cluster at 127.0.0.1"):
        connect_ray(cluster.address)


# --------------------------------------------------------------------------- helpers


def _assert_loopback_only(*nodes: Node) -> None:
    """Every socket of every process of ``nodes`` is on 127.0.0.1 (or a unix socket)."""
    import psutil

    seen = 0
    for node in nodes:
        for pid in node.pids():
            try:
                conns = psutil.Process(pid).net_connections(kind="inet")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            for c in conns:
                for addr in (c.laddr, c.raddr):
                    if addr:
                        seen += 1
                        assert addr.ip in (LOOPBACK, f"::ffff:{LOOPBACK}"), (node.name, pid, c)
    assert seen, "no sockets seen"


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(d.name))
    return pids


def _comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def _free_port_block(n: int) -> int:
    """The first of ``n`` consecutive ports that are all free now (worker ports of a node:
    two nodes on one machine must not share a range)."""
    import random

    rng = random.Random()
    for _ in range(200):
        low = rng.randrange(20_000, 32_768 - n)  # below the ephemeral ports
        try:
            socks = []
            for p in range(low, low + n):
                s = socket.socket()
                socks.append(s)
                s.bind((LOOPBACK, p))
            return low
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports")
