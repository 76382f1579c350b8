"""A real multi-node Ray cluster on this machine: a head and more nodes, each a `ray start --block`
in a session of its own (so one node, with its raylet and workers, can be killed alone).

Each node advertises one custom resource named after it, so a test sees where work ran.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.runs import ENV, kill_tree, wait_for

RAY = Path(sys.executable).parent / "ray"
# each node's shared-memory store; the default takes a third of RAM
OBJECT_STORE_BYTES = 100_000_000


@dataclass
class RayCluster:
    address: str
    root: Path
    # node name -> its `ray start --block`
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)  # node name -> Ray node id

    def kill(self, name: str) -> list[str]:
        """SIGKILL one node and everything it runs; returns processes that outlived it."""
        return kill_tree(self.procs[name])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive_nodes(address: str) -> dict[str, str]:
    """Custom-resource name -> node id of the cluster's live nodes, asked from a driver of its
    own."""
    code = (
        "import json, ray; "
        f"ray.init(address={address!r}, log_to_driver=False, configure_logging=False); "
        "nodes = [[n['NodeID'], list(n['Resources'])] for n in ray.nodes() if n['Alive']]; "
        "print(json.dumps(nodes))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        return {}
    nodes = json.loads(out.stdout.strip().splitlines()[-1])
    return {r: node for node, resources in nodes for r in resources if r.startswith("node_")}


@contextlib.contextmanager
def ray_cluster(
    names: tuple[str, ...] = ("node_head", "node_b"), cpus: int = 1
) -> Iterator[RayCluster]:
    """Start the head (names[0]) and join the other nodes to it; stop them all at the end."""
    # short: Ray's socket paths have a length limit
    root = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    port = _free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}", root=root)
    try:
        for i, name in enumerate(names):
            where = (
                ["--head", f"--port={port}", f"--temp-dir={root}", "--include-dashboard=false"]
                if i == 0
                else [f"--address={cluster.address}"]
            )
            log = open(root / f"{name}.log", "ab")  # noqa: SIM115 (the node writes it until it is stopped)
            cluster.procs[name] = subprocess.Popen(
                [
                    str(RAY),
                    "start",
                    *where,
                    f"--num-cpus={cpus}",
                    f"--resources={json.dumps({name: 1})}",
                    f"--object-store-memory={OBJECT_STORE_BYTES}",
                    "--disable-usage-stats",
                    "--block",
                ],
                env=ENV,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            wait_for(
                lambda n=name: n in alive_nodes(cluster.address),
                cluster.procs[name],
                f"Ray node {name} to join",
                root / f"{name}.log",
                poll_s=0.5,
            )
        cluster.ids = alive_nodes(cluster.address)
        yield cluster
    finally:
        for proc in reversed(list(cluster.procs.values())):
            kill_tree(proc)
        subprocess.run(["rm", "-rf", str(root)], check=False)
