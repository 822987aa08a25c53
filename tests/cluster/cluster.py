"""A throwaway three-node RabbitMQ cluster beside the machine's own broker, for failover tests.

Every writable path, port, node name and the Erlang cookie are the cluster's
own, so the broker on 5672 (and its epmd, which the nodes share) is never
touched. The machine's ``/etc/rabbitmq`` files are kept out: each node has its
own config, plugins and env file. See PITFALLS.md, "Several RabbitMQ nodes on
one machine".
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import socket
import string
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CTL", "SERVER", "Cluster", "ClusterError"]

#: The scripts themselves: ``/usr/sbin``'s wrappers change directory and, as
#: root, re-run as user rabbitmq with another HOME, so another cookie.
SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = Path("/usr/lib/rabbitmq/bin/rabbitmqctl")

#: AMQP ports tried first; distribution ports are these plus 20000, as RabbitMQ's own default.
PREFERRED_PORTS = (5701, 5702, 5703)
#: rabbitmqctl's own distribution ports, away from the default 35672-35682 of the machine's CLI
#: calls. Erlang takes the first free one in the range, so several calls at once are fine.
CTL_DIST_PORTS = (35700, 35739)
#: Seconds a node may take to boot (or rejoin) before the cluster gives up.
BOOT_TIMEOUT = 60
#: Seconds a rabbitmqctl call may take.
CTL_TIMEOUT = 90


class ClusterError(RuntimeError):
    """A node did not start, join or answer; the message says which and why."""


def epmd_names(port: int = 4369) -> dict[str, int]:
    """Node names registered with the local epmd and their distribution ports (epmd's NAMES_REQ)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"\x00\x01n")
            chunks = []
            while chunk := sock.recv(4096):
                chunks.append(chunk)
    except OSError:
        return {}  # no epmd yet: the first node starts one
    names = {}
    for line in b"".join(chunks)[4:].decode(errors="replace").splitlines():
        parts = line.split()  # "name rabbit at port 25672"
        if len(parts) == 5 and parts[0] == "name":
            names[parts[1]] = int(parts[4])
    return names


def port_free(port: int) -> bool:
    """Whether nothing listens on (or holds) `port` on any IPv4 address."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_ports(preferred: Iterable[int], count: int, taken: set[int]) -> list[int]:
    """`count` free ports: the preferred ones if all are free, else the next free ones above them."""
    preferred = list(preferred)
    if len(preferred) == count and all(p not in taken and port_free(p) for p in preferred):
        return preferred
    found: list[int] = []
    candidate = min(preferred)
    while len(found) < count:
        if candidate > 65535:
            raise ClusterError(f"no {count} free ports above {min(preferred)}")
        if candidate not in taken and port_free(candidate):
            found.append(candidate)
        candidate += 1
    return found


@dataclass
class Node:
    """One node's name, ports, files and, while it runs, its rabbitmq-server process."""

    index: int
    name: str
    port: int
    dist_port: int
    root: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.root / "rabbit.pid"

    @property
    def output(self) -> Path:
        return self.root / "server.out"

    def beam_pid(self) -> int | None:
        """The Erlang VM's own pid, as the server wrote it; None before it did."""
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def tail(self, lines: int = 15) -> str:
        """The end of the server's own output, and of its log: why a boot failed."""
        texts = []
        for path in (self.output, self.root / "log" / f"{self.name}.log"):
            try:
                texts.append(f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
            except OSError:
                continue
        return "\n".join(texts)


class Cluster:
    """Three RabbitMQ nodes clustered on this machine, each with its own AMQP port on 127.0.0.1.

    Nodes are numbered from 1, as their names are (``kq1@localhost`` ...):
    ``ports[1]`` is node 1's AMQP port, ``kill(2)`` crashes node 2. Construct
    it with an empty folder, then `boot()`; `stop()` ends every node it
    started. The guest user works, from 127.0.0.1 only.
    """

    def __init__(self, root: Path, size: int = 3) -> None:
        self.root = root
        self.size = size
        self.down: set[int] = set(range(1, size + 1))
        self.boot_seconds: float | None = None
        self._nodes: list[Node] = []

    # -- addresses ----------------------------------------------------------------

    @property
    def indexes(self) -> range:
        return range(1, self.size + 1)

    @property
    def ports(self) -> dict[int, int]:
        """Each node's AMQP port, by node index."""
        return {i: self.node(i).port for i in self.indexes}

    @property
    def names(self) -> dict[int, str]:
        """Each node's Erlang node name (``kq1@localhost``), by node index."""
        return {i: self.node(i).name for i in self.indexes}

    def node(self, i: int) -> Node:
        if i not in self.indexes:
            raise IndexError(f"no node {i}: nodes are numbered 1 to {self.size}")
        if not self._nodes:
            raise ClusterError("the cluster has not been booted")
        return self._nodes[i - 1]

    def node_url(self, i: int) -> str:
        """Node i alone, as a Kombu URL."""
        return f"amqp://guest:guest@127.0.0.1:{self.node(i).port}//"

    @property
    def url(self) -> str:
        """Every node as one Kombu failover URL, each entry in full: alternates inherit nothing safely."""
        return ";".join(self.node_url(i) for i in self.indexes)

    def index_of(self, name: str) -> int:
        """The index of the node called `name` (``kq2@localhost`` -> 2)."""
        for i in self.indexes:
            if self.node(i).name == name:
                return i
        raise LookupError(f"{name!r} is not a node of this cluster ({', '.join(self.names.values())})")

    # -- the whole cluster ----------------------------------------------------------

    def boot(self) -> float:
        """Start every node at once, join nodes 2.. to node 1, and wait for all of them; return the seconds taken.

        Raises:
            ClusterError: a node did not start or join; the message carries its output.
        """
        started = time.monotonic()
        # Names and ports are free when chosen, but taken only once a node has booted:
        # another session booting a cluster meanwhile must not choose the same ones.
        with _boot_lock():
            self._nodes = self._plan()
            for i in self.indexes:
                self._spawn(i)
            self._parallel(self._wait_booted, self.indexes)
        # One at a time: two nodes joining at once make node 1 run two schema changes together,
        # and Mnesia may abort one (join_cluster exits 69, "schema_prepare" aborted).
        for i in self.indexes[1:]:
            self._join(i)
        self.ctl(1, "await_online_nodes", str(self.size), "--timeout", str(BOOT_TIMEOUT))
        self.boot_seconds = time.monotonic() - started
        return self.boot_seconds

    def stop(self, grace: float = 20.0) -> None:
        """Stop every node this cluster started: SIGTERM (a clean shutdown), then SIGKILL after `grace` s.

        Only the nodes' own process groups are signalled; the machine's broker and epmd are not.
        """
        running = [n for n in self._nodes if n.process is not None]
        for node in running:
            assert node.process is not None
            if node.process.poll() is None:
                node.process.terminate()  # the script's trap passes it on to the VM, which shuts down cleanly
        deadline = time.monotonic() + grace
        for node in running:
            assert node.process is not None
            try:
                node.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(node, signal.SIGKILL)
                node.process.wait(10)
            _reap_beam(node)
            node.process = None
            self.down.add(node.index)

    def __enter__(self) -> Cluster:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- one node ---------------------------------------------------------------------

    def kill(self, i: int) -> None:
        """Crash node i: SIGKILL its Erlang VM, as a power cut would, and wait until it is gone."""
        node = self.node(i)
        pid = node.beam_pid()
        if node.process is None or pid is None:
            raise ClusterError(f"node {i} ({node.name}) is not running")
        os.kill(pid, signal.SIGKILL)
        node.process.wait(30)  # the server script exits once its VM has
        node.process = None
        self.down.add(i)

    def start(self, i: int) -> None:
        """Start node i again and wait until it has rejoined the cluster and every node runs."""
        node = self.node(i)
        if node.process is not None:
            raise ClusterError(f"node {i} ({node.name}) is already running")
        node.pid_file.unlink(missing_ok=True)  # a crash leaves it behind, naming a dead VM
        self._spawn(i)
        self._wait_booted(i)
        self.ctl(i, "await_online_nodes", str(self.size), "--timeout", str(BOOT_TIMEOUT))

    def running(self) -> list[int]:
        """Nodes that node 1 (or the first one up) sees running in the cluster."""
        status = json.loads(self.ctl(self._live(), "cluster_status", "--formatter", "json"))
        return sorted(self.index_of(name) for name in status["running_nodes"])

    # -- questions --------------------------------------------------------------------

    def ctl(self, i: int, *args: str, timeout: float = CTL_TIMEOUT) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` against node i; return its standard output.

        Raises:
            ClusterError: it exited non-zero or took longer than `timeout` seconds; the message has its stderr.
        """
        node = self.node(i)
        command = [str(CTL), "-q", "-n", node.name, *args]
        try:
            done = subprocess.run(command, env=node.env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ClusterError(f"rabbitmqctl -n {node.name} {' '.join(args)}: no answer in {timeout}s") from None
        if done.returncode != 0:
            raise ClusterError(
                f"rabbitmqctl -n {node.name} {' '.join(args)} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()}"
            )
        return done.stdout

    def leader(self, queue_name: str, vhost: str = "/") -> int:
        """The index of the node leading quorum queue `queue_name`, as a running node sees it.

        Raises:
            LookupError: no such queue, or it has no leader right now (an election is under way).
        """
        for row in self.queues("name", "leader", vhost=vhost):
            if row.get("name") == queue_name:
                leader = row.get("leader") or ""
                if not leader or leader not in self.names.values():
                    raise LookupError(f"quorum queue {queue_name!r} has no leader now ({leader!r})")
                return self.index_of(leader)
        raise LookupError(f"no queue {queue_name!r} in vhost {vhost!r}")

    def queues(self, *columns: str, vhost: str = "/") -> list[dict[str, Any]]:
        """``rabbitmqctl list_queues COLUMNS`` as a running node answers it: one dict per queue."""
        return self._list(self._live(), "list_queues", "-p", vhost, *columns)

    def connections(self, i: int) -> int:
        """How many client connections node i holds (0 while it is down)."""
        if i in self.down:
            return 0
        # The listing spans the cluster; a connection's server port tells its node.
        port = self.node(i).port
        return sum(1 for row in self._list(i, "list_connections", "port", "peer_port") if row.get("port") == port)

    # -- inside -----------------------------------------------------------------------

    def _plan(self) -> list[Node]:
        """Choose names and ports, and write every node's files; start nothing."""
        taken_names = epmd_names()
        prefix = "kq"
        while any(f"{prefix}{i}" in taken_names for i in self.indexes):
            prefix = f"kq{secrets.token_hex(2)}-"
        preferred = list(PREFERRED_PORTS[: self.size]) or [5701]
        if len(preferred) < self.size:
            preferred = [preferred[0] + k for k in range(self.size)]
        ports = free_ports(preferred, self.size, set())
        taken_dist = set(taken_names.values()) | set(ports)
        dist_ports = free_ports([p + 20000 for p in ports], self.size, taken_dist)

        self.root.mkdir(parents=True, exist_ok=True)
        cookie = self.root / ".erlang.cookie"
        cookie.write_text("".join(secrets.choice(string.ascii_uppercase) for _ in range(20)))
        cookie.chmod(0o400)
        env_file = self.root / "rabbitmq-env.conf"
        env_file.write_text("")  # instead of /etc/rabbitmq/rabbitmq-env.conf, which names the machine's node

        base_env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_") and k != "CONF_ENV_FILE"}
        nodes = []
        for i, port, dist_port in zip(self.indexes, ports, dist_ports, strict=True):
            name = f"{prefix}{i}@localhost"
            root = self.root / f"{prefix}{i}"
            (root / "mnesia").mkdir(parents=True, exist_ok=True)
            (root / "log").mkdir(exist_ok=True)
            (root / "rabbitmq.conf").write_text(
                f"listeners.tcp.local = 127.0.0.1:{port}\n"
                # The default WAL holds up to 512 MiB in memory per node.
                "raft.wal_max_size_bytes = 32000000\n"
            )
            (root / "enabled_plugins").write_text("[].\n")  # no management: it would want port 15672
            env = dict(
                base_env,
                HOME=str(self.root),  # the cookie, for the server and rabbitmqctl alike
                RABBITMQ_NODENAME=name,
                RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
                RABBITMQ_NODE_PORT=str(port),
                RABBITMQ_DIST_PORT=str(dist_port),
                RABBITMQ_MNESIA_BASE=str(root / "mnesia"),
                RABBITMQ_LOG_BASE=str(root / "log"),
                RABBITMQ_PID_FILE=str(root / "rabbit.pid"),
                RABBITMQ_CONFIG_FILE=str(root / "rabbitmq.conf"),
                RABBITMQ_ADVANCED_CONFIG_FILE=str(root / "advanced.config"),
                RABBITMQ_ENABLED_PLUGINS_FILE=str(root / "enabled_plugins"),
                RABBITMQ_CONF_ENV_FILE=str(env_file),
                # Distribution on loopback only, like the machine's node.
                RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
                RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
                RABBITMQ_CTL_DIST_PORT_MIN=str(CTL_DIST_PORTS[0]),
                RABBITMQ_CTL_DIST_PORT_MAX=str(CTL_DIST_PORTS[1]),
            )
            nodes.append(Node(i, name, port, dist_port, root, env))
        return nodes

    def _spawn(self, i: int) -> None:
        """Start node i's server in a session of its own, so a stop can signal its whole group."""
        node = self.node(i)
        with node.output.open("ab") as out:
            node.process = subprocess.Popen(
                [str(SERVER)],
                env=node.env,
                cwd=node.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_booted(self, i: int) -> None:
        """Wait until node i's pid file, VM and apps are up; fail at once if its server exits."""
        node = self.node(i)
        command = [str(CTL), "-q", "-n", node.name, "wait", str(node.pid_file), "--timeout", str(BOOT_TIMEOUT)]
        waiter = subprocess.Popen(command, env=node.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + BOOT_TIMEOUT + 15
        try:
            while waiter.poll() is None:
                if node.process is None or node.process.poll() is not None:
                    raise ClusterError(f"node {i} ({node.name}) exited while booting:\n{node.tail()}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"node {i} ({node.name}) did not boot in {BOOT_TIMEOUT}s:\n{node.tail()}")
                time.sleep(0.1)
        finally:
            if waiter.poll() is None:
                waiter.kill()
            output = waiter.communicate()[0]
        if waiter.returncode != 0:
            raise ClusterError(f"node {i} ({node.name}) did not boot: {output.strip()}\n{node.tail()}")
        self.down.discard(i)

    def _join(self, i: int) -> None:
        """Make node i a member of node 1's cluster (a fresh node: nothing of its own is lost)."""
        self.ctl(i, "stop_app")
        self.ctl(i, "reset")
        self.ctl(i, "join_cluster", self.node(1).name)
        self.ctl(i, "start_app")

    def _parallel(self, fn: Callable[[int], Any], indexes: Iterable[int]) -> None:
        """Run fn(i) for every node index at once; raise the first failure after all have finished."""
        indexes = list(indexes)
        with ThreadPoolExecutor(max_workers=max(1, len(indexes))) as pool:
            futures = [pool.submit(fn, i) for i in indexes]
        for future in futures:
            future.result()

    def _live(self) -> int:
        """A node that is up, to ask questions of."""
        for i in self.indexes:
            if i not in self.down:
                return i
        raise ClusterError("no node of the cluster is running")

    def _list(self, i: int, *args: str) -> list[dict[str, Any]]:
        rows = json.loads(self.ctl(i, *args, "--formatter", "json") or "[]")
        assert isinstance(rows, list)
        return rows


@contextmanager
def _boot_lock(timeout: float = 3 * BOOT_TIMEOUT) -> Iterator[None]:
    """Hold the machine-wide lock under which clusters choose their names and ports and boot."""
    path = Path(tempfile.gettempdir()) / "kqueue-rabbitmq-cluster.lock"
    with path.open("a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ClusterError(f"another cluster held {path} for over {timeout}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _signal_group(node: Node, signum: int) -> None:
    """Signal the process group of node's server (its script, VM and their helpers), if still there."""
    if node.process is None or node.process.poll() is not None:
        return
    try:
        os.killpg(node.process.pid, signum)
    except ProcessLookupError:
        pass


def _reap_beam(node: Node) -> None:
    """SIGKILL node's VM if it outlived its script (it should not); it is no longer our child to wait for."""
    pid = node.beam_pid()
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if node.name.encode() not in cmdline.read():
                return  # the pid is gone or reused: not ours
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass
