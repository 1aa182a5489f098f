"""A Ray cluster of several nodes on this one machine, which stops only what it started.

    python cluster/local_cluster.py start --workdir /tmp/rc --cpus 3 2   # head (3 CPUs) + 1 worker node
    export RAY_ADDRESS=$(python cluster/local_cluster.py address --workdir /tmp/rc) RAY_AUTH_MODE=token
    ray job submit --working-dir . -- python jobs/distill.py --data ... --output ...
    python cluster/local_cluster.py stop --workdir /tmp/rc

Each node is one `ray start --block` process (the head with the dashboard, which serves
`ray job submit` and the state API) with its own --temp-dir, bounded --num-cpus, every port
chosen free on 127.0.0.1, and its own session (setsid). `ray stop` is never used: it kills
every Ray process of the machine, other users' included. Stopping instead snapshots the
process tree under each node's `ray start` PID (GCS, raylet, dashboard, workers, job
drivers, which Ray starts in sessions of their own), sends SIGTERM to the `ray start`
process (its handler shuts its node down), and SIGKILLs whatever of that snapshot is still
alive afterwards, each PID checked against its start time so a reused PID is never hit.
The PIDs are recorded in WORKDIR/cluster.json, so another process can stop the cluster.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "cluster.json"
START_ATTEMPTS = 3
# Everything stays on loopback. The head is 127.0.0.1 with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
# (processes that detect their IP then pick loopback). `ray start --address` refuses to join
# under that variable, and rewrites "127.0.0.1" (in --address and --node-ip-address) to the
# network card's IP; so worker node i is 127.0.0.(i+1), another loopback address, and
# reaches the head's GCS (which listens on 127.0.0.1 only) as [::ffff:127.0.0.1], the same
# address spelled as IPv4-mapped IPv6.
HEAD_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
WORKER_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# The head turns token authentication on by default (token in ~/.ray/auth_token), but a
# joining node and the state/job API clients only present the token when told to. This
# process and what it starts (nodes, `ray job submit`) are told here.
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Ports each node needs besides the GCS/dashboard/client ports of the head.
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                   "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port")


@dataclass
class NodeProcess:
    """One `ray start --block` process: its PID, start time (for PID-reuse checks), temp dir."""

    pid: int
    start_time: int
    temp_dir: str
    log: str
    cpus: int


@dataclass
class LocalCluster:
    workdir: str
    gcs_address: str
    dashboard_url: str
    nodes: list[NodeProcess] = field(default_factory=list)

    def save(self) -> None:
        path = Path(self.workdir) / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, workdir: str | Path) -> "LocalCluster":
        data = json.loads((Path(workdir) / STATE_FILE).read_text())
        return cls(workdir=data["workdir"], gcs_address=data["gcs_address"], dashboard_url=data["dashboard_url"],
                   nodes=[NodeProcess(**n) for n in data["nodes"]])

    def stop(self, timeout_s: float = 30.0) -> list[int]:
        """Stop the nodes this cluster started (workers first); returns the PIDs that had
        to be SIGKILLed after the graceful shutdown."""
        killed: list[int] = []
        for node in reversed(self.nodes):
            tree = process_tree(node.pid, node.start_time)
            if is_alive(node.pid, node.start_time):
                os.kill(node.pid, signal.SIGTERM)
                _wait_gone([(node.pid, node.start_time)], timeout_s)
            killed += _kill(tree)
        return killed


def _kill(procs) -> list[int]:
    """SIGKILL those of `procs` (pid, start time) still alive; returns their PIDs."""
    leftovers = [p for p in procs if is_alive(*p)]
    for pid, _ in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_gone(leftovers, 10.0)
    return [pid for pid, _ in leftovers]


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 right now (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return [str(pid), raw[raw.index("(") + 1:raw.rindex(")")]] + raw[raw.rindex(")") + 2:].split()


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[21]) if fields else None


def is_alive(pid: int, start_time: int) -> bool:
    fields = _stat(pid)
    return fields is not None and int(fields[21]) == start_time and fields[2] != "Z"


def process_tree(root: int, root_start: int) -> list[tuple[int, int]]:
    """(pid, start time) of `root` and every process below it, from /proc."""
    if not is_alive(root, root_start):
        return []
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[3]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is not None:
            out.append((pid, start))
        todo.extend(children.get(pid, []))
    return out


def _wait_gone(procs: list[tuple[int, int]], timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline and any(is_alive(*p) for p in procs):
        time.sleep(0.2)


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def _wait_for(predicate, timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s\n{tail}")


def _spawn_node(args: list[str], temp_dir: Path, log: Path, cpus: int, head: bool) -> NodeProcess:
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(HEAD_ENV if head else WORKER_NODE_ENV)}
    # Job drivers inherit the node's PATH: `python` in an entrypoint is this interpreter's.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    with open(log, "w") as out:
        proc = subprocess.Popen([_ray_cli(), "start", "--block", "--disable-usage-stats",
                                 "--num-cpus", str(cpus),
                                 "--temp-dir", str(temp_dir), *args],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    start = None
    while start is None and proc.poll() is None:
        start = _start_time(proc.pid)
    if start is None:
        raise RuntimeError(f"ray start exited at once:\n{log.read_text()[-3000:]}")
    return NodeProcess(pid=proc.pid, start_time=start, temp_dir=str(temp_dir), log=str(log), cpus=cpus)


def _started(node: NodeProcess, log: Path, seen: set[tuple[int, int]]) -> bool:
    """Whether `ray start` says it is up; raises if it exited. Collects the processes it
    started into `seen`, so they can be killed if it dies without taking them along."""
    seen.update(process_tree(node.pid, node.start_time))
    if not is_alive(node.pid, node.start_time):
        raise RuntimeError(f"ray start (PID {node.pid}) exited:\n{log.read_text()[-3000:]}")
    return "Ray runtime started" in log.read_text()


def _node_ports() -> list[str]:
    ports = free_ports(len(NODE_PORT_FLAGS))
    return [x for flag, port in zip(NODE_PORT_FLAGS, ports) for x in (flag, str(port))]


def alive_nodes(dashboard_url: str) -> list[str]:
    """IPs of the alive nodes, from the state API (which carries the auth token)."""
    from ray.util.state import list_nodes

    try:
        return [n.node_ip for n in list_nodes(address=dashboard_url, timeout=10) if n.state == "ALIVE"]
    except Exception:  # not up yet: the API answers connection errors of several types
        return []


def start(workdir: str | Path, cpus: list[int], resources: list[dict] | None = None,
          timeout_s: float = 180.0) -> LocalCluster:
    """Start a head (cpus[0] CPUs, with the dashboard) and one worker node per further
    entry of `cpus`; returns when all nodes are alive. Stops what it started on failure."""
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    resources = resources or [{} for _ in cpus]
    gcs, dashboard, client = free_ports(3)
    cluster = LocalCluster(workdir=str(workdir), gcs_address=f"127.0.0.1:{gcs}",
                           dashboard_url=f"http://127.0.0.1:{dashboard}")
    try:
        for i, (n, res) in enumerate(zip(cpus, resources)):
            role = ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard", "true",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--ray-client-server-port", str(client)] if i == 0 \
                else ["--node-ip-address", f"127.0.0.{i + 1}", "--address", f"[::ffff:127.0.0.1]:{gcs}"]
            extra = ["--resources", json.dumps(res)] if res else []
            for attempt in range(1, START_ATTEMPTS + 1):
                log = workdir / f"node{i}-{attempt}.log"
                # Unix socket paths must stay under ~107 bytes: keep temp dirs short.
                node = _spawn_node(role + _node_ports() + extra, workdir / f"n{i}", log, n, head=i == 0)
                cluster.nodes.append(node)
                cluster.save()
                seen: set[tuple[int, int]] = set()
                try:
                    _wait_for(lambda: _started(node, log, seen), timeout_s, f"node {i}", log)
                    break
                except RuntimeError:
                    _kill(seen)
                    # `ray start` gives its raylet 30 s (not configurable) to register; on
                    # a busy machine that fails now and then, and a new try usually works.
                    if attempt == START_ATTEMPTS or "timed out during startup" not in log.read_text():
                        raise
                    cluster.nodes.pop()
                    cluster.save()
        _wait_for(lambda: len(alive_nodes(cluster.dashboard_url)) == len(cpus), timeout_s,
                  f"{len(cpus)} alive nodes", Path(cluster.nodes[0].log))
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["start", "stop", "address"])
    parser.add_argument("--workdir", required=True, help="holds cluster.json, node logs and temp dirs (short path)")
    parser.add_argument("--cpus", type=int, nargs="+", default=[2],
                        help="CPUs of the head, then of each worker node (start)")
    args = parser.parse_args(argv)
    if args.command == "start":
        cluster = start(args.workdir, args.cpus)
        print(f"started {len(cluster.nodes)} node(s); dashboard {cluster.dashboard_url}; "
              f"PIDs {[n.pid for n in cluster.nodes]}")
    elif args.command == "address":
        print(LocalCluster.load(args.workdir).dashboard_url)
    else:
        killed = LocalCluster.load(args.workdir).stop()
        print(f"stopped; {len(killed)} process(es) needed SIGKILL after SIGTERM")


if __name__ == "__main__":
    main()
