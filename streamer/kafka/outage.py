"""A broker outage in a few lines of ours instead of the client libraries' dozens.

While the run loop runs, the client libraries' loggers (clients.CLIENT_LOGGERS: kafka-python's
``kafka.*``, librdkafka's ``librdkafka``) hand their records to one handler here instead of the
application's. Outside an outage they pass on unchanged. An outage episode starts when the loop
finds the brokers unreachable (``away``) or a library complains about a connection; it logs one
WARNING of ours, holds every library record back while it lasts (counted), and ends with one
INFO line when the loop hears from the brokers again (``back``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from streamer.kafka.clients import client_logs_handled_by

log = logging.getLogger(__name__)

# A library record that says a connection to a broker failed starts an episode at once.
CONNECTION_TROUBLE = re.compile(
    r"connect|refused|unreachable|disconnect|timed out|timeout|brokers? (is |are )?down|transport|"
    r"NodeNotReady|not available|no route",
    re.IGNORECASE,
)


class _Fold(logging.Handler):
    def __init__(self, outage: BrokerOutageLog) -> None:
        super().__init__(logging.NOTSET)
        self.outage = outage

    def emit(self, record: logging.LogRecord) -> None:
        self.outage._library_record(record)


class BrokerOutageLog:
    """One line when the brokers become unreachable, one when they answer again."""

    def __init__(self, logger: logging.Logger = log, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.clock = clock
        self.since: float | None = None  # monotonic start of the episode in progress; None: no outage
        self.held_back = 0  # library records held back in this episode
        self.episodes = 0

    def away(self, reason: str) -> None:
        """The brokers did not answer (``reason``); logs only when this starts an episode."""
        if self.since is not None:
            return
        self.since = self.clock()
        self.held_back = 0
        self.episodes += 1
        self.logger.warning(
            "Kafka brokers unreachable: %s; the client library's messages are held back until they answer", reason
        )

    def back(self) -> None:
        """The brokers answered; ends the episode in progress, if any, with one line."""
        if self.since is None:
            return
        self.logger.info(
            "Kafka brokers answer again after %.1fs unreachable (%d client library messages held back)",
            self.clock() - self.since, self.held_back,
        )
        self.since = None

    def _library_record(self, record: logging.LogRecord) -> None:
        if self.since is None and record.levelno >= logging.WARNING:
            try:
                message = record.getMessage()
            except Exception:  # a malformed record: passed on for the handler to report
                message = ""
            if CONNECTION_TROUBLE.search(message):
                self.away(f"{record.name}: {message}")
        if self.since is not None:
            self.held_back += 1
            return
        logging.getLogger().handle(record)  # the application's handlers, as propagation would

    @contextmanager
    def installed(self) -> Iterator[BrokerOutageLog]:
        """While inside, the client libraries' records go through this fold."""
        with client_logs_handled_by(_Fold(self)):
            yield self
