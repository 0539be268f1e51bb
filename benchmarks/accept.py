"""
Durable accept throughput: mailfw against Postfix, in the same run.

Usage (as root, from the repository)::

    python benchmarks/accept.py [--sessions 1,10,100] [--messages N]
        [--size 1024] [--repeat 3] [--only mailfw|postfix] [--reuse] [--reference]
        [--py-spy FILE] [--queue sqlite|postgresql] [--nodes N]

Both servers run on loopback ports of this machine, each with a durable
queue and a discarding delivery: a private Postfix instance (default
fsyncing queue, every transport C{discard:}) and C{twistd mailfw} (SQLite
queue, C{discard} delivery agent).  Postfix's C{smtp-source} sends 1 KB
messages over N concurrent sessions; the time until its last message got
its 250 gives messages per second.  After each run the benchmark waits
until the server has delivered (discarded) every message, counting the
delivery lines in its log, so a message that was acknowledged but lost
would show up as a failed run; the CPU time the server's processes used
from the start of the run to that point, divided by the messages, is the
CPU cost of one message through the whole server (receive, queue,
deliver, remove).

Runs alternate between the servers and are repeated (the machine may be
shared and noisy); the table shows the median of the repeats.

With C{--queue postgresql} mailfw keeps its queue in a throw-away
PostgreSQL cluster (C{_pgcluster.py}; durable: C{fsync} and
C{synchronous_commit} on), with a fresh database for every measured run,
and runs as C{--nodes N} separate C{twistd mailfw} processes sharing that
queue, each on its own port and driven by its own C{smtp-source}.  See
benchmarks/README.rst.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _pgcluster import BenchCluster
from _postfix import PostfixError, PostfixInstance, findProgram

DOMAIN = "bench.test"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Messages per run when --messages is not given, by session count: enough
# for a run of several seconds on a 2-core machine.
DEFAULT_MESSAGES = {1: 3000, 10: 6000, 100: 10000}
# For bodies of 32 KB and more (100 KB: about 4 to 8 seconds per run).
DEFAULT_LARGE_MESSAGES = {1: 2000, 10: 3000, 100: 4000}

SQLITE_QUEUE = """\
plugin = "sqlite"
"""

POSTGRES_QUEUE = """\
plugin = "postgresql"
dsn = "{dsn}"
node = "{node}"
pool_size = {poolSize}
"""

MAILFW_CONFIG = """\
[queue]
{queue}

[routing]
plugin = "static"
local_domains = ["{domain}"]
local_agent = "local"

[delivery.local]
plugin = "discard"

[smtp]
# smtp-source opens every session from 127.0.0.1; Postfix exempts
# $mynetworks from its per-client limits, so mailfw gets the same.
max_connections_per_client = 10000
"""


class BenchmarkError(Exception):
    """
    A server failed to start or lost or refused messages.
    """


def freePort() -> int:
    """
    A loopback TCP port that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def processTicks(pid: int) -> int:
    """
    utime + stime + cutime + cstime of one process, in clock ticks (all its
    threads, and its children that it has reaped).
    """
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    # The command name may contain spaces; fields after it are fixed.
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14.
    return sum(int(x) for x in fields[11:15])


def treeTicks(root: int) -> int:
    """
    CPU ticks of C{root} and every live descendant.  A descendant that
    exited was reaped by its parent, so its time moved into the parent's
    cutime/cstime: the sum is monotonic while the tree runs.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            total += processTicks(pid)
        except (OSError, ValueError):
            continue
        todo.extend(children.get(pid, ()))
    return total


class LogCounter:
    """
    Counts lines containing a marker in a growing log file, reading only
    what was appended since the last call.
    """

    def __init__(self, path: Path, marker: bytes) -> None:
        self.path = path
        self.marker = marker
        self.count = 0
        self._offset = 0
        self._partial = b""

    def __call__(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self._offset += len(data)
        data = self._partial + data
        complete, _, self._partial = data.rpartition(b"\n")
        self.count += complete.count(self.marker)
        return self.count


class Server:
    """
    What the benchmark needs from a server under test.
    """

    name: str
    port: int
    pid: int
    # False for a reference server that keeps nothing: its runs are not
    # checked for delivery.
    durable = True

    # True when every measured run needs a fresh start (L{reset}) and its
    # own warm-up.
    freshPerRun = False

    @property
    def ports(self) -> list[int]:
        """
        The ports the load is split over (several nodes: one each).
        """
        return [self.port]

    def cpuTicks(self) -> int:
        raise NotImplementedError

    def dbTicks(self) -> int | None:
        """
        CPU ticks of a database server used by this one, if any; counted
        apart from the server's own.
        """
        return None

    def delivered(self) -> int:
        raise NotImplementedError

    def reset(self) -> None:
        """
        Start afresh before a measured run (only if L{freshPerRun}).
        """

    def stop(self) -> None:
        raise NotImplementedError


class PostfixServer(Server):
    """
    The private Postfix instance; CPU is the master's whole process tree.
    """

    name = "postfix"

    def __init__(self, port: int) -> None:
        self.port = port
        self.instance = PostfixInstance(port, DOMAIN)
        self.instance.start()
        self.pid = self.instance.masterPID()
        # One line per discarded recipient, from the discard(8) agent.
        self._delivered = LogCounter(self.instance.logFile, b"status=sent")

    def cpuTicks(self) -> int:
        return treeTicks(self.pid)

    def delivered(self) -> int:
        return self._delivered()

    def stop(self) -> None:
        # Postfix says in its log when it throttled itself (all smtpd
        # processes busy, in_flow_delay, ...): show it, it explains numbers.
        try:
            warnings = [
                line
                for line in self.instance.logFile.read_text(errors="replace").splitlines()
                if "warning:" in line or "fatal:" in line or "panic:" in line
            ]
        except OSError:
            warnings = []
        for line in warnings[:5]:
            print(f"# postfix log: {line}", file=sys.stderr)
        if len(warnings) > 5:
            print(f"# postfix log: ... {len(warnings) - 5} more warnings", file=sys.stderr)
        self.instance.stop()


class MailfwServer(Server):
    """
    C{twistd -n mailfw} as a child process, logging to a file of ours.
    """

    name = "mailfw"

    def __init__(
        self,
        port: int,
        timeout: float = 60,
        workers: int = 1,
        queue: str = SQLITE_QUEUE,
        name: str | None = None,
        config: str | None = None,
    ) -> None:
        self.port = port
        self.workers = workers
        if name is not None:
            self.name = name
        self.root = Path(tempfile.mkdtemp(prefix="mailfw-bench-mailfw-"))
        self.logFile = self.root / "twistd.log"
        configFile = self.root / "mailfw.toml"
        configFile.write_text(
            config if config is not None else MAILFW_CONFIG.format(domain=DOMAIN, queue=queue)
        )
        self.started = time.monotonic()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self._log = open(self.logFile, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [
                twistd,
                "-n",
                "--pidfile=",
                "mailfw",
                "--config",
                str(configFile),
                "--data-dir",
                str(self.root / "data"),
                "--hostname",
                DOMAIN,
                "--smtp",
                f"tcp:{port}:interface=127.0.0.1",
                f"--workers={workers}",
            ],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.process.pid
        # One line per recipient outcome, from the scheduler.
        self._delivered = LogCounter(self.logFile, b"via local: 250 2.0.0 Discarded")
        try:
            _waitForServer(self.process, port, timeout, self.logFile, self.name)
        except BaseException:
            self.stop()
            raise
        # From the fork to the first greeting: the start-up time, and the
        # CPU the twistd process used for it (less exposed to a busy
        # machine than the wall time).
        self.startSeconds = time.monotonic() - self.started
        self.startCPU = processTicks(self.pid) / CLOCK_TICKS

    def cpuTicks(self) -> int:
        # The twistd process and its worker processes (--workers).
        return treeTicks(self.pid)

    def delivered(self) -> int:
        return self._delivered()

    def stop(self) -> None:
        stopProcess(self.process)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


class PostgresMailfwServer(Server):
    """
    C{nodes} C{twistd mailfw} processes (one worker each) sharing one
    PostgreSQL queue: a fresh database of C{cluster} for every measured
    run, each node on its own port with its own data directory and log,
    and a distinct C{node} name.  Any node may deliver what another
    accepted, so deliveries are counted across all the logs.
    """

    name = "mailfw"
    freshPerRun = True

    def __init__(self, cluster: BenchCluster, nodes: int, poolSize: int = 5) -> None:
        self.cluster = cluster
        self.count = nodes
        self.poolSize = poolSize
        self.nodes: list[MailfwServer] = []
        self.dsn: str | None = None
        # Deliveries of nodes of earlier runs, so that the count only grows.
        self._retired = 0
        self._start()

    def _start(self) -> None:
        self.dsn = self.cluster.createDatabase()
        # One at a time: the first creates the schema.
        for index in range(self.count):
            queue = POSTGRES_QUEUE.format(dsn=self.dsn, node=f"bench{index + 1}", poolSize=self.poolSize)
            self.nodes.append(MailfwServer(freePort(), workers=1, queue=queue))
        self.port = self.nodes[0].port
        self.pid = self.nodes[0].pid

    def _stopNodes(self) -> None:
        while self.nodes:
            node = self.nodes.pop()
            self._retired += node.delivered()
            node.stop()
        if self.dsn is not None:
            dsn, self.dsn = self.dsn, None
            self.cluster.dropDatabase(dsn)

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def cpuTicks(self) -> int:
        return sum(treeTicks(node.pid) for node in self.nodes)

    def dbTicks(self) -> int | None:
        return treeTicks(self.cluster.postmasterPID())

    def delivered(self) -> int:
        return self._retired + sum(node.delivered() for node in self.nodes)

    def reset(self) -> None:
        self._stopNodes()
        self._start()

    def stop(self) -> None:
        self._stopNodes()


class TwistedSinkServer(Server):
    """
    The reference: Twisted's stock ESMTP server keeping nothing
    (C{_twistedsink.py}); not durable, so its deliveries are not counted.
    """

    name = "tw-sink"
    durable = False

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.port = port
        self.process = subprocess.Popen(
            [
                sys.executable,
                os.path.join(os.path.dirname(os.path.abspath(__file__)), "_twistedsink.py"),
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.process.pid
        try:
            _waitForServer(self.process, port, timeout, None, self.name)
        except BaseException:
            self.stop()
            raise

    def cpuTicks(self) -> int:
        return processTicks(self.pid)

    def delivered(self) -> int:
        return 0

    def stop(self) -> None:
        stopProcess(self.process)


def stopProcess(process: subprocess.Popen[bytes], grace: float = 20) -> None:
    """
    Stop a server: SIGTERM, then SIGKILL if it has not exited within
    C{grace} seconds.
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _waitForServer(
    process: subprocess.Popen[bytes], port: int, timeout: float, log: Path | None, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchmarkError(
                f"server {what} exited with {process.returncode}:\n"
                + (log.read_text(errors="replace")[-2000:] if log else "")
            )
        if _greets(port):
            return
        # Often: the start-up time is measured with this.
        time.sleep(0.01)
    raise BenchmarkError(f"server {what} did not greet within {timeout}s")


def _greets(port: int) -> bool:
    """
    Whether something on 127.0.0.1:C{port} answers with a 220 greeting
    now (one attempt; L{waitForBanner} sleeps 0.2 s between attempts, too
    coarse to time a start-up).
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            if not s.recv(512).startswith(b"220"):
                return False
            s.sendall(b"QUIT\r\n")
            return True
    except OSError:
        return False


@dataclass
class Run:
    server: str
    sessions: int
    messages: int
    seconds: float
    cpuSeconds: float
    drainSeconds: float
    attempt: int = 0
    dbCpuSeconds: float | None = None
    size: int = 1024

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpuPerMessage(self) -> float:
        return 1000 * self.cpuSeconds / self.messages

    @property
    def dbCpuPerMessage(self) -> float | None:
        if self.dbCpuSeconds is None:
            return None
        return 1000 * self.dbCpuSeconds / self.messages


def waitUntil(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchmarkError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def splitLoad(ports: Sequence[int], sessions: int, messages: int) -> list[tuple[int, int, int]]:
    """
    Split C{sessions} and C{messages} as evenly as possible over C{ports}:
    (port, sessions, messages) for each port that gets a session (1
    session on 2 nodes loads only the first; the other still delivers from
    the shared queue).
    """
    share, extra = divmod(sessions, len(ports))
    counts = [share + (1 if i < extra else 0) for i in range(len(ports))]
    loads = []
    given = 0
    for port, mine in zip(ports, counts, strict=False):
        if mine == 0:
            continue
        # Messages in proportion to sessions; the last loaded port takes
        # the rounding.
        part = messages * mine // sessions
        loads.append([port, mine, part])
        given += part
    loads[-1][2] += messages - given
    return [(p, s, m) for p, s, m in loads]


def smtpSource(targets: Sequence[tuple[int, int, int]], size: int, reuse: bool, timeout: float) -> None:
    """
    Send, to each (port, sessions, messages) of C{targets} at once, that
    many messages of C{size} octets over that many parallel sessions (one
    smtp-source each); return when all are done; raise if one saw anything
    but success.
    """
    processes = []
    try:
        for port, sessions, messages in targets:
            processes.append(
                subprocess.Popen(
                    _smtpSourceCommand(port, sessions, messages, size, reuse),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                _, stderr = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchmarkError(f"smtp-source did not finish within {timeout}s") from None
            if process.returncode != 0 or stderr.strip():
                raise BenchmarkError(f"smtp-source exited with {process.returncode}: {stderr.strip()[:500]}")
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def _smtpSourceCommand(port: int, sessions: int, messages: int, size: int, reuse: bool) -> list[str]:
    command = [
        findProgram("smtp-source"),
        "-4",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        str(size),
        "-M",
        f"client.{DOMAIN}",
        "-f",
        f"sender@{DOMAIN}",
        "-t",
        f"rcpt@{DOMAIN}",
        # Retry a connection reset by a full listen queue, as a real
        # client would.
        "-C",
        "5",
    ]
    if reuse:
        command.append("-d")
    command.append(f"127.0.0.1:{port}")
    return command


def measure(
    server: Server,
    sessions: int,
    messages: int,
    size: int,
    reuse: bool,
    timeout: float,
    profile: Callable[[Server], Callable[[], None]] | None = None,
) -> Run:
    """
    One timed run against one server, then wait for it to deliver every
    message it acknowledged.
    """
    before = server.delivered()
    ticks = server.cpuTicks()
    dbTicks = server.dbTicks()
    stopProfile = profile(server) if profile is not None else None
    start = time.monotonic()
    try:
        smtpSource(splitLoad(server.ports, sessions, messages), size, reuse, timeout)
        seconds = time.monotonic() - start
        waitUntil(
            lambda: not server.durable or server.delivered() >= before + messages,
            timeout,
            f"{server.name} to deliver {messages} messages (delivered {server.delivered() - before})",
        )
    finally:
        if stopProfile is not None:
            stopProfile()
    drained = time.monotonic() - start
    cpu = (server.cpuTicks() - ticks) / CLOCK_TICKS
    dbAfter = server.dbTicks()
    dbCpu = None if dbTicks is None or dbAfter is None else (dbAfter - dbTicks) / CLOCK_TICKS
    extra = server.delivered() - before - messages
    if server.durable and extra:
        raise BenchmarkError(f"{server.name} delivered {extra} more messages than were sent")
    return Run(
        server.name, sessions, messages, seconds, cpu, drained - seconds, dbCpuSeconds=dbCpu, size=size
    )


def pySpy(output: str) -> Callable[[Server], Callable[[], None]]:
    """
    A profile hook: record mailfw with py-spy during a run, into a file
    named after C{output} (one file per run).
    """
    program = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    counter = [0]

    def start(server: Server) -> Callable[[], None]:
        if not server.name.startswith("mailfw"):
            return lambda: None
        counter[0] += 1
        base, ext = os.path.splitext(output)
        path = f"{base}-{counter[0]}{ext or '.txt'}"
        fmt = "flamegraph" if path.endswith(".svg") else ("speedscope" if path.endswith(".json") else "raw")
        spy = subprocess.Popen(
            [
                program,
                "record",
                "--pid",
                str(server.pid),
                "--rate",
                "200",
                "--format",
                fmt,
                "--output",
                path,
                "--nonblocking",
                "--subprocesses",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

        def stop() -> None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(30)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait(10)
            print(f"# py-spy profile of mailfw: {path}", file=sys.stderr)

        return stop

    return start


def messagesFor(sessions: int, given: int | None, size: int = 1024, scale: float = 1.0) -> int:
    if given is not None:
        return given
    table = DEFAULT_MESSAGES if size < 32 * 1024 else DEFAULT_LARGE_MESSAGES
    for limit in sorted(table, reverse=True):
        if sessions >= limit:
            return max(1, round(scale * table[limit]))
    return max(1, round(scale * table[1]))


def _dbColumn(runs: Sequence[Run]) -> str:
    values = [r.dbCpuPerMessage for r in runs if r.dbCpuPerMessage is not None]
    return f" {statistics.median(values):9.2f}" if values else ""


Workload = tuple[int, int]  # (body octets, sessions)


def sizeName(size: int) -> str:
    return f"{size // 1024} KB" if size % 1024 == 0 else f"{size} B"


def medianRate(runs: Sequence[Run], name: str, workload: Workload) -> float | None:
    rates = [r.rate for r in runs if r.server == name and (r.size, r.sessions) == workload]
    return statistics.median(rates) if rates else None


def medianCPU(runs: Sequence[Run], name: str, workload: Workload) -> float | None:
    values = [r.cpuPerMessage for r in runs if r.server == name and (r.size, r.sessions) == workload]
    return statistics.median(values) if values else None


def report(runs: Sequence[Run], servers: Sequence[str], workloads: Sequence[Workload]) -> str:
    """
    The plain table (one line per server and workload, medians and ranges)
    and the ratios of every other server's median rate to Postfix's.
    """
    lines = [
        f"{'server':9} {'size':>6} {'sessions':>8} {'msgs':>6} {'seconds':>8} {'msgs/s':>8} "
        f"{'(min-max)':>13} {'CPU ms/msg':>10} {'drain s':>7}"
        + (f" {'DB ms/msg':>9}" if any(r.dbCpuSeconds is not None for r in runs) else ""),
    ]
    for workload in workloads:
        size, sessions = workload
        for name in servers:
            mine = [r for r in runs if r.server == name and (r.size, r.sessions) == workload]
            if not mine:
                continue
            rates = [r.rate for r in mine]
            lines.append(
                f"{name:9} {size:6d} {sessions:8d} {mine[0].messages:6d} "
                f"{statistics.median(r.seconds for r in mine):8.2f} {statistics.median(rates):8.0f} "
                f"{f'({min(rates):.0f}-{max(rates):.0f})':>13} "
                f"{statistics.median(r.cpuPerMessage for r in mine):10.2f} "
                f"{statistics.median(r.drainSeconds for r in mine):7.2f}" + _dbColumn(mine)
            )
    if "postfix" in servers:
        lines.append("")
        for workload in workloads:
            size, sessions = workload
            postfix = medianRate(runs, "postfix", workload)
            for name in servers:
                rate = medianRate(runs, name, workload)
                if name == "postfix" or rate is None or not postfix:
                    continue
                # Each repetition ran the servers back to back: their
                # ratio is less exposed to the machine's load changing.
                byAttempt = {(r.server, r.attempt): r.rate for r in runs if (r.size, r.sessions) == workload}
                paired = [
                    byAttempt[name, a] / byAttempt["postfix", a]
                    for (n, a) in sorted(byAttempt)
                    if n == name and ("postfix", a) in byAttempt
                ]
                lines.append(
                    f"ratio {name}/postfix msgs/s, {sizeName(size)} at {sessions:3d} sessions: "
                    f"{rate / postfix:.2f}  (per repetition: {', '.join(f'{x:.2f}' for x in paired)})"
                )
    return "\n".join(lines)


def markdown(runs: Sequence[Run], servers: Sequence[str], workloads: Sequence[Workload]) -> str:
    """
    Issue 19's table: Postfix's median rate, every other server's as a
    ratio to it, then the CPU per message of each (the README's table).
    """
    others = [name for name in servers if name != "postfix"]

    def title(name: str) -> str:
        if name.startswith("mailfw-w"):
            return f"mailfw workers={name[len('mailfw-w') :]}"
        return "bare Twisted (stores nothing)" if name == "tw-sink" else name

    def label(workload: Workload) -> str:
        size, sessions = workload
        return f"{sizeName(size)}, {sessions} session{'s' if sessions != 1 else ''}"

    header = "| workload | Postfix | " + " | ".join(title(n) for n in others) + " |"
    lines = [header, "|---" * (2 + len(others)) + "|"]
    for workload in workloads:
        postfix = medianRate(runs, "postfix", workload)
        if postfix is None:
            continue
        cells = []
        for name in others:
            rate = medianRate(runs, name, workload)
            cells.append("–" if rate is None else f"{rate / postfix:.2f}x")
        lines.append(f"| {label(workload)} | {postfix:.0f}/s | " + " | ".join(cells) + " |")
    lines += ["", "CPU per message (ms, whole server, receive to delivery):", ""]
    lines += [
        "| workload | " + " | ".join(title(n) for n in servers) + " |",
        "|---" * (1 + len(servers)) + "|",
    ]
    for workload in workloads:
        cells = []
        for name in servers:
            cpu = medianCPU(runs, name, workload)
            cells.append("–" if cpu is None else f"{cpu:.2f}")
        lines.append(f"| {label(workload)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Issue 19's workloads: 1 KB at 1, 10 and 100 sessions, 100 KB at 1 and 100.
TABLE_WORKLOADS: list[Workload] = [(1024, 1), (1024, 10), (1024, 100), (102400, 1), (102400, 100)]


def parseWorkloads(text: str) -> list[Workload]:
    """
    C{"1024:1,10,100 102400:1,100"}: body sizes, each with its session counts.
    """
    workloads = []
    for part in text.split():
        size, _, sessions = part.partition(":")
        workloads += [(int(size), int(n)) for n in sessions.split(",") if n.strip()]
    return workloads


def addArguments(parser: argparse.ArgumentParser) -> None:
    """
    The options of the accept benchmark (also used by C{full.py}).
    """
    parser.add_argument(
        "--sessions", default="1,10,100", help="comma-separated concurrent session counts (default 1,10,100)"
    )
    parser.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages per run (default: 3000/6000/10000 for 1/10/100 sessions; "
        "2000/3000/4000 for bodies of 32 KB or more)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply the default messages per run (0.5: half as long a benchmark on a busy machine)",
    )
    parser.add_argument("--size", type=int, default=1024, help="message body octets (default 1024)")
    parser.add_argument(
        "--workloads",
        default=None,
        help='several sizes, each with its session counts: "1024:1,10,100 102400:1,100" '
        "(instead of --size and --sessions)",
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="issue 19's whole table: --workloads '1024:1,10,100 102400:1,100' --workers 1,2 "
        "--reference, printed as markdown too",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per server and workload")
    parser.add_argument("--only", choices=("mailfw", "postfix"), default=None)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="send every message of a session over one connection (smtp-source -d)",
    )
    parser.add_argument(
        "--reference",
        action="store_true",
        help="also measure Twisted's stock ESMTP server keeping nothing "
        "(not durable; the ceiling of a plain Twisted server)",
    )
    parser.add_argument(
        "--workers",
        default="2",
        help="mailfw processes (twistd mailfw --workers), or several, comma-separated, "
        "each a server of its own (default 2)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per run")
    parser.add_argument(
        "--queue",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="mailfw's queue plugin (default sqlite); postgresql starts a "
        "throw-away cluster and a fresh database per run",
    )
    parser.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="mailfw nodes sharing the PostgreSQL queue, one worker each, "
        "load split evenly (default 1; only with --queue postgresql)",
    )
    parser.add_argument(
        "--pool-size",
        dest="poolSize",
        type=int,
        default=5,
        help="[queue] pool_size of each PostgreSQL node (default 5)",
    )
    parser.add_argument(
        "--py-spy",
        dest="pyspy",
        metavar="FILE",
        default=None,
        help="record mailfw with py-spy during the runs at the largest "
        "session count (FILE.svg, FILE.json or raw FILE.txt)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    addArguments(parser)
    args = parser.parse_args(argv)
    if args.nodes < 1 or (args.nodes != 1 and args.queue != "postgresql"):
        parser.error("--nodes N needs N >= 1, and N > 1 needs --queue postgresql")
    if args.table:
        args.workloads = args.workloads or "1024:1,10,100 102400:1,100"
        args.workers = "1,2" if args.workers == "2" else args.workers
        args.reference = True
    outcome = runAccept(args)
    print(outcome.heading)
    print(outcome.text)
    if args.table:
        print()
        print(outcome.markdown)
    return 0 if outcome.ok else 1


@dataclass
class AcceptOutcome:
    heading: str
    text: str
    markdown: str
    ok: bool
    runs: list[Run]


def runAccept(args: argparse.Namespace) -> AcceptOutcome:
    """
    Start the servers, run every workload C{args.repeat} times on each,
    alternating, stop the servers; the tables.
    """
    if args.workloads:
        workloads = parseWorkloads(args.workloads)
    else:
        workloads = [(args.size, int(s)) for s in args.sessions.split(",") if s.strip()]
    workerCounts = [int(w) for w in str(args.workers).split(",") if w.strip()]
    kinds: list[str] = [args.only] if args.only else ["mailfw", "postfix"]
    if args.reference:
        kinds.append("tw-sink")
    maxSessions = max(sessions for _, sessions in workloads)

    servers: list[Server] = []
    clusters: list[BenchCluster] = []

    def stopAll() -> None:
        while servers:
            server = servers.pop()
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                print(f"# stopping {server.name}: {e}", file=sys.stderr)
        while clusters:
            clusters.pop().stop()

    atexit.register(stopAll)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))

    profile = None
    if args.pyspy and "mailfw" in kinds:
        profile = pySpy(args.pyspy)

    runs: list[Run] = []
    measured: set[Server] = set()
    names: list[str] = []
    ok = True
    try:
        if args.queue == "postgresql" and "mailfw" in kinds:
            clusters.append(BenchCluster())
            print(
                f"# PostgreSQL on 127.0.0.1:{clusters[0].port} (pid {clusters[0].postmasterPID()})",
                file=sys.stderr,
            )
        for kind in kinds:
            if kind == "mailfw" and clusters:
                servers.append(PostgresMailfwServer(clusters[0], args.nodes, args.poolSize))
            elif kind == "mailfw":
                for workers in workerCounts:
                    servers.append(MailfwServer(freePort(), workers=workers, name=f"mailfw-w{workers}"))
            elif kind == "postfix":
                servers.append(PostfixServer(freePort()))
            else:
                servers.append(TwistedSinkServer(freePort()))
        for server in servers:
            names.append(server.name)
            print(
                f"# {server.name} listening on 127.0.0.1:{','.join(map(str, server.ports))} (pid {server.pid})",
                file=sys.stderr,
            )
        # Warm up: Postfix forks its smtpd processes, mailfw fills its
        # caches and creates its database pages.  A server started afresh
        # for every run warms up before each.
        for server in servers:
            if not server.freshPerRun:
                for size in sorted({size for size, _ in workloads}):
                    measure(server, maxSessions, 2 * maxSessions, size, args.reuse, args.timeout)
        for size, sessions in workloads:
            messages = messagesFor(sessions, args.messages, size, args.scale)
            for attempt in range(args.repeat):
                # Alternate which server goes first, so that slow phases
                # of a noisy machine hit both.
                order = servers if attempt % 2 == 0 else servers[::-1]
                for server in order:
                    if server.freshPerRun:
                        if server in measured:
                            server.reset()
                        measured.add(server)
                        measure(server, maxSessions, 2 * maxSessions, size, args.reuse, args.timeout)
                    run = measure(
                        server,
                        sessions,
                        messages,
                        size,
                        args.reuse,
                        args.timeout,
                        profile if sessions == maxSessions else None,
                    )
                    run.attempt = attempt
                    runs.append(run)
                    print(
                        f"# {run.server:9} {sizeName(size)} {sessions:4d} sessions: {run.messages} msgs in "
                        f"{run.seconds:.2f}s = {run.rate:.0f}/s, "
                        f"CPU {run.cpuPerMessage:.2f} ms/msg, drained {run.drainSeconds:.2f}s later",
                        file=sys.stderr,
                    )
    except (BenchmarkError, PostfixError) as e:
        print(f"benchmark failed: {e}", file=sys.stderr)
        ok = False
    finally:
        stopAll()
    heading = (
        f"durable accept, "
        f"{'one connection per session' if args.reuse else 'one connection per message'}, "
        f"median of {args.repeat}, {os.cpu_count()} CPUs, mailfw "
        + (
            f"PostgreSQL queue, {args.nodes} node(s) of 1 worker, pool_size {args.poolSize}"
            if args.queue == "postgresql"
            else f"SQLite queue, --workers={args.workers}"
        )
    )
    return AcceptOutcome(heading, report(runs, names, workloads), markdown(runs, names, workloads), ok, runs)


if __name__ == "__main__":
    sys.exit(main())
