"""The `streamer` command, and `python -m streamer`.

SIGTERM and SIGINT are held from here on, before the CLI's imports (a tenth of a second, pydantic's
among them), in which the system's default had ended a `run` told to stop as it started with 143:
the CLI then delivers them once its own handling is in place (cli.EarlySignals): `run` stops
before it contacts Kafka, any other command ends as it would have.
"""

import signal
import sys


def main() -> int:
    held: list[int] = []
    before = {signum: signal.signal(signum, lambda signum, _frame: held.append(signum))
              for signum in (signal.SIGTERM, signal.SIGINT)}
    from streamer.cli import EarlySignals
    from streamer.cli import main as cli_main

    return cli_main(early=EarlySignals(before, held))


if __name__ == "__main__":
    sys.exit(main())
