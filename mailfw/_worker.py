"""
The entry point of one worker process of C{twistd mailfw --workers N}: it
builds the same service as the parent on the listening sockets it inherits
(see L{mailfw._workers}) and runs until the parent goes away.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence

from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.stdio import StandardIO
from twisted.logger import ILogObserver, globalLogBeginner
from twisted.python import usage
from twisted.python.failure import Failure

from mailfw._workers import LOG_DIRECT, JSONLineObserver, LineObserver, parseSockets
from mailfw.config import ConfigError
from mailfw.tap import Options, buildService


def main(argv: Sequence[str]) -> int:
    """
    A worker: C{python -m mailfw._worker NUMBER SOCKETS log=stdout|relay
    MAILFW-OPTIONS...}.
    """
    from twisted.internet import reactor

    number, sockets, logMode, rest = int(argv[0]), parseSockets(argv[1]), argv[2], list(argv[3:])
    out = sys.stdout
    observer: ILogObserver = (
        LineObserver(out.fileno(), number)
        if logMode == LOG_DIRECT
        else JSONLineObserver(out.write, out.flush)
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    options = Options()
    try:
        options.parseOptions(rest)
        if isinstance(observer, LineObserver) and "metrics" in options.serverConfig.raw:
            # The parent's metrics and status page need the named events.
            observer.eventsFD = sys.stderr.fileno()
        service = buildService(options.serverConfig, reactor, worker=sockets, reloadArguments=rest)
    except (usage.UsageError, ConfigError) as e:
        sys.stderr.write(f"mailfw worker {number}: {e}\n")
        return 1

    class ParentWatch(Protocol):
        # Standard input closes when the parent exits, however it exits.
        def connectionLost(self, reason: Failure = connectionDone) -> None:
            if reactor.running:
                reactor.stop()

    # mypy reads the Windows variant of StandardIO, which has no stdin or stdout.
    StandardIO(ParentWatch(), stdin=0, stdout=os.open(os.devnull, os.O_WRONLY))  # type: ignore[call-arg]
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C goes to the parent
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
