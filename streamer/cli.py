"""streamer's command line: parse, build settings, call one function.

  streamer run       the service: Kafka in, predictions and metrics out
  streamer simulate  a fleet of simulated sensors writing to the input topic
  streamer train     train the LSTM on CSV/Parquet or simulated history, write a model file
  streamer replay    device histories through the engine, no broker: a results table and plots
  streamer check-config  the settings `run` would use, secrets masked
  streamer topics create  the input, output, dead-letter and checkpoint topics, as settings say
"""

from __future__ import annotations

import argparse
import atexit
import errno
import faulthandler
import json
import logging
import math
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import UnionType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from streamer.errors import StreamerError
from streamer.settings import (
    CONFIG_ENV,
    NONE_WORDS,
    SECRET_SETTINGS,
    KafkaSettings,
    Settings,
    closest_setting,
    describe_setting,
    env_name,
    flag_name,
    load_settings,
    setting_names,
    unknown_env_vars,
)

if TYPE_CHECKING:
    from streamer.engine import Engine
    from streamer.history import Histories

log = logging.getLogger("streamer")

MAX_PLOTS, PAGE_DEVICES = 50, 16  # replay's --max-plots and --page-devices when their plots are asked for
SIMULATED = {"devices": 200, "history": 1000, "features": 1}  # train's simulated history without --data
MIN_BOOTSTRAP_S = 5.0  # topics create and simulate wait at least this long for a broker (kafka.startup_wait_s when longer)
MAX_BAD_ROWS_SHOWN = 20  # train and replay --on-bad skip: rows printed, then a count


class EarlySignals:
    """SIGTERM and SIGINT held by the entry point (streamer.__main__) while the CLI was imported:
    the handlers it replaced, and the signals it got."""

    def __init__(self, before: dict[int, Any], held: list[int]) -> None:
        self.before = before
        self.held = held

    def restore(self) -> list[int]:
        """Put the handlers before back; returns the signals held (to be delivered after)."""
        for signum, handler in self.before.items():
            signal.signal(signum, handler)
        return list(self.held)

    def release(self) -> None:
        """Put the handlers before back and have the signals held as they would have come."""
        for signum in self.restore():
            signal.raise_signal(signum)


def main(argv: list[str] | None = None, early: EarlySignals | None = None) -> int:
    """``early``: signals held since the process started (streamer.__main__); `run` takes them as
    a stop once its relay is in place, any other command gets them as the handlers before would
    have given them (SIGTERM's default ends it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, --version, a bad flag: the signals held are had as they came
        if early is not None:
            early.release()
        raise
    args.early = None
    if early is not None:
        if args.handler is _run:
            args.early = early
        else:
            early.release()
    try:
        return args.handler(args)
    except StreamerError as exc:
        print(f"streamer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader of stdout went away (`streamer check-config | head -1`): nothing is left to
        # say to it, and Python's flush of stdout at exit would raise again. As Python's
        # documentation of SIGPIPE advises: stdout to /dev/null, exit 1.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags: --kafka-bootstrap-server is a typo, not --kafka-bootstrap-servers (and
    an abbreviation that works today breaks the day a second flag shares its prefix)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """A bad flag is one line, exit 2: the error and where to read the usage, not the usage
        itself (run's fifty flags buried the line that mattered)."""
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        """A command's parser refuses what it does not know itself: left to the top parser, a
        mistyped `run` flag pointed to `streamer --help`, which lists none of run's flags."""
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self.is_command:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    is_command = False  # set on each command's (and sub-command's) parser by build_parser


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"streamer {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="consume readings, publish forecasts and anomaly scores, serve metrics",
        description="Consume readings, publish forecasts and anomaly scores, serve /metrics and /healthz. "
        "Each setting comes from its flag, else its environment variable, else the config file, else its default.",
    )
    run.add_argument("--config", type=Path, default=None, help="TOML config file (env STREAMER_CONFIG)")
    _add_settings_flags(run)
    run.set_defaults(handler=_run)

    sim = commands.add_parser(
        "simulate",
        help="write readings of a simulated sensor fleet to Kafka",
        description="Write readings of a simulated sensor fleet to the input topic. Kafka settings (brokers, "
        "topic, TLS, SASL) are read as `streamer run` reads them: flag, else environment variable, else the "
        "config file, else the default.",
    )
    sim.add_argument("--topic", dest="kafka.input_topic", default=argparse.SUPPRESS, metavar="TOPIC",
                     action=_Alias, new_flag="--kafka-input-topic",
                     help="topic to write readings to (the same as --kafka-input-topic)")
    sim.add_argument("--bootstrap-servers", dest="kafka.bootstrap_servers", default=argparse.SUPPRESS,
                     action=_Alias, new_flag="--kafka-bootstrap-servers", deprecated=True, help=argparse.SUPPRESS)
    sim.add_argument("--devices", type=_positive_int, default=100, help="number of sensors")
    sim.add_argument("--features", type=_positive_int, default=1, help="values per reading")
    sim.add_argument("--rate", type=_non_negative_float, default=1000.0, help="readings per second in all (0: as fast as possible)")
    sim.add_argument("--duration", type=_positive_float, default=None, help="seconds to run")
    sim.add_argument("--max-readings", type=_positive_int, default=None, help="readings to write in all")
    sim.add_argument("--anomaly-rate", type=float, default=0.002, help="probability per reading that an anomaly starts")
    sim.add_argument("--seed", type=_seed, default=0, help="random seed of the fleet")
    sim.add_argument("--labels", type=Path, default=None, help="write the injected anomalies here (JSON lines)")
    sim.add_argument("--format", dest="message_format", choices=("json", "arrow"), default="json",
                     help="json: a message per reading, keyed by device; arrow: batch messages of a gateway's "
                     "devices (README, Topics and messages) [default: json]")
    sim.add_argument("--batch-rows", type=_positive_int, default=None, metavar="N",
                     help="with --format arrow: devices per gateway, the readings of one batch message [default: 1000]")
    sim.add_argument("--progress-interval", type=_non_negative_float, default=5.0, metavar="S",
                     help="seconds between progress lines on stderr (0: none) [default: 5]")
    sim.add_argument("--config", type=Path, default=None, help=f"TOML config file (env {CONFIG_ENV})")
    _add_settings_flags(sim, ("kafka",))
    sim.set_defaults(handler=_simulate)

    check = commands.add_parser(
        "check-config",
        help="print the settings `run` would use (secrets masked), or the error that stops it",
        description="Resolve the settings as `streamer run` does (flag, else environment variable, else the "
        "config file, else the default), check what `run` checks before connecting to Kafka (a model file is "
        "set and loads, the state table fits the host memory the process may have (rows on a GPU: found by `run`'s "
        "allocation alone), the metrics host can be bound, the checkpoint directory can be written; not with --settings-only), "
        "print the settings with passwords masked and exit 0, or print the problems and exit 2.",
    )
    check.add_argument("--config", type=Path, default=None, help=f"TOML config file (env {CONFIG_ENV})")
    check.add_argument("--format", choices=("toml", "json"), default="toml", help="output format [default: toml]")
    check.add_argument("--settings-only", action="store_true",
                       help="check the settings alone, not the files and address they name (a config checked away "
                       "from where it runs)")
    _add_settings_flags(check)
    check.set_defaults(handler=_check_config)

    train = commands.add_parser(
        "train",
        help="train the LSTM and write a model file",
        description="Train the LSTM to forecast each device's next reading, on device histories (CSV or "
        "Parquet, a file or a directory) or on simulated history, and write a model file. The last "
        "--val-fraction of the data's time range validates; training stops early when it stops improving.",
    )
    train.add_argument("--out", type=Path, required=True, help="model file to write")
    data = train.add_argument_group("data")
    data.add_argument("--data", type=Path, default=argparse.SUPPRESS, metavar="PATH",
                      help="CSV or Parquet file, or a directory of them (see streamer.history); "
                      "without it: simulated history")
    data.add_argument("--csv", type=Path, dest="data", default=argparse.SUPPRESS, action=_Alias,
                      new_flag="--data", deprecated=True, help=argparse.SUPPRESS)
    data.add_argument("--value-columns", type=_names, default=None, metavar="A,B",
                      help="value columns to read (default: every column but device_id and the timestamp)")
    data.add_argument("--on-bad", choices=("refuse", "skip"), default=None,
                      help="a bad row stops training (refuse), or is skipped and reported (skip) [default: refuse]")
    data.add_argument("--devices", type=_positive_int, default=None,
                      help=f"simulated devices (without --data) [default: {SIMULATED['devices']}]")
    data.add_argument("--history", type=_positive_int, default=None,
                      help=f"simulated readings per device [default: {SIMULATED['history']}]")
    data.add_argument("--features", type=_positive_int, default=None,
                      help=f"values per simulated reading [default: {SIMULATED['features']}]")
    fit = train.add_argument_group("model and training")
    fit.add_argument("--hidden-size", type=_positive_int, default=32)
    fit.add_argument("--num-layers", type=_positive_int, default=2)
    fit.add_argument("--time-features", type=_time_features, default=(), metavar="day,week|none",
                     help="sine and cosine of each reading's phase in these periods, as inputs [default: none]")
    fit.add_argument("--normalization", choices=("device", "global", "none"), default="device",
                     help="values as running per-device z-scores, z-scores with the training data's mean and "
                     "std, or raw [default: device]")
    fit.add_argument("--norm-alpha", type=_unit_interval, default=0.001,
                     help="weight of a reading in the device normalisation, once 1/alpha seen [default: 0.001]")
    fit.add_argument("--window", type=_positive_int, default=64, help="readings per training window [default: 64]")
    fit.add_argument("--epochs", type=_positive_int, default=20, help="most epochs (each covers the training "
                     "readings once) [default: 20]")
    fit.add_argument("--batch-size", type=_positive_int, default=64, help="windows per step [default: 64]")
    fit.add_argument("--lr", type=_positive_float, default=1e-2, help="Adam learning rate [default: 0.01]")
    fit.add_argument("--val-fraction", type=_fraction, default=0.2,
                     help="last part of the time range kept for validation, 0 for none [default: 0.2]")
    fit.add_argument("--patience", type=_positive_int, default=3,
                     help="epochs without a better validation loss before stopping [default: 3]")
    fit.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N [default: auto]")
    fit.add_argument("--time-budget", type=_positive_float, default=None, help="stop training after this many seconds")
    fit.add_argument("--seed", type=_seed, default=0, help="random seed (in [0, 2**63))")
    fit.add_argument("--state-ttl-seconds", type=_positive_float_or_none, default=86400.0, metavar="S",
                     help="the state.ttl_seconds the model will be served with: a series is cut where a device is idle"
                     " longer, where the engine starts it again from zero state (none: never) [default: 86400]")
    fit.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                     help="torch CPU threads; the weights are the same for a seed and thread count (recorded in the"
                     " model file) [default: 1 up to hidden size 64, else the cores, at most 8]")
    fit.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    train.add_argument("--version", type=_model_version, default=None,
                       help="model version: printable text, one line (default: derived from the settings)")
    train.set_defaults(handler=_train)
    _add_replay_parser(commands)
    _add_topics_parser(commands)
    _mark_commands(parser)
    return parser


def _mark_commands(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                command.is_command = True
                _mark_commands(command)


# --- run ---------------------------------------------------------------------------------------


def _add_settings_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] | None = None) -> None:
    """One flag per setting, --<section>-<field>, whose help names its environment variable;
    of ``sections`` only, when given (the others still come from env, config file, default).
    The parsed namespace's ``setting_flags`` names the (section, name) pairs the command offers."""
    offered: set[tuple[str, str]] = set(parser.get_default("setting_flags") or ())
    for section, section_field in Settings.model_fields.items():
        if sections is not None and section not in sections:
            continue
        group = parser.add_argument_group(f"{section} settings")
        model_cls = section_field.annotation
        assert isinstance(model_cls, type) and issubclass(model_cls, BaseModel)
        offered |= {(section, name) for name in model_cls.model_fields}
        for name, info in model_cls.model_fields.items():
            flag = flag_name(section, name)
            choices = _literal_choices(info.annotation)
            help_text = f"{info.description} (env {env_name(section, name)})"
            group.add_argument(
                flag,
                dest=f"{section}.{name}",
                default=argparse.SUPPRESS,
                metavar=_metavar(info.annotation, choices),
                help=help_text + f" [default: {info.default}]",
            )
    parser.set_defaults(setting_flags=frozenset(offered))


def _literal_choices(annotation: Any) -> tuple[str, ...] | None:
    if get_origin(annotation) is Literal:
        return tuple(str(a) for a in get_args(annotation))
    return None


def _metavar(annotation: Any, choices: tuple[str, ...] | None) -> str:
    if choices:
        return "{" + ",".join(choices) + "}"
    args = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) in (Union, UnionType) else [annotation]
    base = get_args(args[0])[0] if get_args(args[0]) else args[0]
    return {int: "INT", float: "FLOAT", bool: "BOOL", Path: "PATH"}.get(base, "TEXT")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags over env over config file; a bad value raises StreamerError naming flag and env."""
    overrides: dict[str, dict[str, object]] = {}
    for dest, raw in vars(args).items():
        if "." not in dest:
            continue
        section, name = dest.split(".", 1)
        overrides.setdefault(section, {})[name] = raw  # "none" is None where allowed (settings.Section)
    config_file = args.config
    if config_file is None:
        env_config = os.environ.get(CONFIG_ENV)
        config_file = Path(env_config) if env_config else None
    for warning in unknown_env_vars():
        print(f"streamer: warning: {warning}", file=sys.stderr)
    try:
        return load_settings(overrides, config_file)
    except ValidationError as exc:
        raise StreamerError(_describe_validation(exc, getattr(args, "setting_flags", None),
                                                 getattr(args, "renamed_setting_flags", None))) from None


def _name_where_set(message: str, section: str | None, offered: set[tuple[str, str]] | None,
                    renamed: dict[tuple[str, str], str]) -> str:
    """A check of several settings together names each of them as a single setting's error
    does, with its flag and variable: ``section.name`` in a check of the whole tree, a bare
    ``name`` with an underscore in one of a ``section``'s (names already described are kept)."""
    known = setting_names()

    def describe(match: re.Match) -> str:
        qualified, bare = match.group(1), match.group(2)
        pair = tuple(qualified.split(".", 1)) if qualified else (section, bare)
        if pair not in known:
            return match.group(0)
        return describe_setting(*pair, offered is None or pair in offered, renamed.get(pair))

    pattern = r"\b(?:([a-z]+\.[a-z_]+)|([a-z]+_[a-z_]+))\b(?! \((?:flag|env) )" if section else r"\b([a-z]+\.[a-z_]+)()\b(?! \((?:flag|env) )"
    return re.sub(pattern, describe, message)


def _describe_validation(exc: ValidationError, offered: set[tuple[str, str]] | None = None,
                         renamed: dict[tuple[str, str], str] | None = None) -> str:
    """One line: each bad value with its setting, flag (where the command has one, ``offered``:
    (section, name) pairs; None: every setting's; ``renamed``: the command's flags named
    otherwise than --section-name) and variable, separated by "; "."""
    problems = []
    renamed = renamed or {}
    for error in exc.errors(include_url=False):
        loc = [str(p) for p in error["loc"]]
        if len(loc) >= 2 and (loc[0], loc[1]) in setting_names():
            where = describe_setting(loc[0], loc[1], offered is None or (loc[0], loc[1]) in offered,
                                     renamed.get((loc[0], loc[1])))
        elif len(loc) >= 2:  # e.g. a key in STREAMER_KAFKA='{...}': name no flag that does not exist
            match = closest_setting(loc[0], loc[1])
            where = f"{loc[0]}.{loc[1]} (not a setting{'; did you mean ' + describe_setting(*match) if match else ''})"
        elif loc:
            where = loc[0]
        else:
            where = ""
        given = error.get("input")
        # A key that is no setting may be a mistyped password: its value is not shown; nor is a
        # password's, of whatever type it came (a number in TOML is no SecretStr).
        secret = bool(loc) and loc[-1] in SECRET_SETTINGS
        shown = "" if isinstance(given, dict) or error["type"] == "extra_forbidden" or secret else f" = {given!r}"
        message = _name_where_set(str(error["msg"]).removeprefix("Value error, "), loc[0] if loc else None, offered,
                                  renamed)
        problems.append(f"{where}{shown}: {message}" if where else message)
    return "invalid settings: " + "; ".join(problems)


def stop_on_signals(stop: threading.Event) -> Callable[[], None]:
    """SIGTERM and SIGINT set ``stop``, by a thread of their own; returns what puts the handlers
    before back. A Python signal handler runs in the main thread between any two of its
    bytecodes: stop.set() there deadlocked when the main thread was inside stop.wait() holding
    the event's lock, and the run hung on SIGTERM for good. The handler only puts the signal in a
    SimpleQueue, whose put is reentrant."""
    received: queue.SimpleQueue[int] = queue.SimpleQueue()

    def relay() -> None:
        while True:
            signum = received.get()
            log.info("received %s, stopping (the batch in hand is finished and committed)", signal.Signals(signum).name)
            stop.set()

    threading.Thread(target=relay, name="signals", daemon=True).start()
    before = {signum: signal.signal(signum, lambda signum, _frame: received.put_nowait(signum))
              for signum in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for signum, handler in before.items():
            signal.signal(signum, handler)

    return restore


def _run(args: argparse.Namespace) -> int:
    # From the start of the command: a SIGTERM in the first second or two (settings, checks,
    # importing torch) had ended the process with 143 and no word. Set, it stops the run before it
    # consumes. One while Python imported the CLI was held by streamer.__main__ (args.early).
    stop = threading.Event()
    held = args.early.restore() if args.early is not None else []
    restore = stop_on_signals(stop)
    for signum in held:  # a stop before this, as Python imported the CLI: nothing is loaded or contacted
        signal.raise_signal(signum)
    settings = None
    try:
        settings = settings_from_args(args)
        _setup_logging(settings.run.log_level, settings.run.log_format)
        _require_model_path(settings)
        if settings.metrics.enabled:
            _check_metrics_port(settings.metrics.host, settings.metrics.port)
        _check_checkpoint_directory(settings)
        from streamer.kafka.clients import silence_client_logs
        from streamer.service import run_service

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints every thread's stack
        summary = run_service(settings, stop)
    except BaseException as exc:
        restore()  # a run that ends on an error (main's caller may go on: a test process)
        if isinstance(exc, StreamerError) and settings is not None and settings.run.log_format == "json":
            # Log pipelines read the JSON lines: the error that ends the run is one of them too
            # (it had been only main's plain line). main still prints that line, as ever.
            log.error("stopped: %s", exc)
        raise
    # Every client of the run is closed; one abandoned while it waited for a broker (its
    # bootstrap does not look at signals) may still log from its thread: not after the summary.
    silence_client_logs()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RunLogHandler):
            handler.main_thread_only()
    print(json.dumps({"summary": summary.__dict__}), flush=True)
    # The run is over: a SIGTERM or SIGINT repeated now (supervisors send one to each process of
    # a group, or again) is no reason to die. Python gives its handlers back to the system's
    # default as the interpreter shuts down, and one arriving then had ended an exit 0 as 143:
    # at exit (not before: a caller of main may go on) they are ignored instead.
    atexit.register(_ignore_stop_signals)
    return 0


def _ignore_stop_signals() -> None:
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


def _check_metrics_port(host: str, port: int) -> None:
    """Refuse a metrics address that cannot be bound, before minutes of model loading and broker
    connecting (port 0: the host is checked, on a free port). The probe socket is closed at once:
    the server (streamer.metrics) binds its own, after the broker answers. Another process could
    take the port in between; that rare race ends in the server's own error, not in a silent clash."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As the server does (socketserver's allow_reuse_address): a port in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
    except (OSError, UnicodeError, TypeError) as exc:  # TypeError: a name IDNA cannot encode
        if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
            raise StreamerError(
                f"{describe_setting('metrics', 'port')} = {port}: {host}:{port} is already in use") from None
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StreamerError(
            f"{describe_setting('metrics', 'host')} = {host!r}: cannot bind {host}:{port} ({reason})") from None
    finally:
        probe.close()


def _check_checkpoint_directory(settings: Settings, create: bool = True) -> None:
    """Refuse a checkpoint directory that cannot be created or written (a file, a read-only
    mount) before the run starts: every checkpoint would fail, and devices restart from zero.
    create=False (check-config): nothing is created; the nearest existing folder is checked."""
    checkpoint = settings.checkpoint
    if not checkpoint.enabled or checkpoint.store != "directory":
        return
    from streamer.history import cannot_create_files_in

    where = f"{describe_setting('checkpoint', 'directory')} = {str(checkpoint.directory)!r}"
    if not create:
        existing = checkpoint.directory.absolute()
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise StreamerError(f"{where}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StreamerError(f"{where}: cannot write in {existing}")
        reason = cannot_create_files_in(existing)  # an unnamed file, gone at once: nothing is left behind
        if reason is not None:
            raise StreamerError(f"{where}: {reason}")
        return
    try:
        checkpoint.directory.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StreamerError(f"{where}: not a directory") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path (settings refuse it; kept as a guard)
        raise StreamerError(f"{where}: cannot write there ({getattr(exc, 'strerror', None) or exc})") from None
    reason = cannot_create_files_in(checkpoint.directory)
    if reason is not None:
        raise StreamerError(f"{where}: {reason}")


def _check_config(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    # What `run` checks before connecting to Kafka, but creating nothing; the metrics host alone
    # (any free port), so that a check beside the running service does not find its port taken.
    if not args.settings_only:
        from streamer.engine import StateLayout, check_table_fits, resolve_device
        from streamer.kernels import STATE_DTYPES

        device = resolve_device(settings.model.device)
        _require_model_path(settings)  # as `run` does: a config without a model file cannot run
        from streamer.model import load_model_file

        bundle = load_model_file(settings.model.path)
        check_table_fits(settings.state.capacity, StateLayout.of(bundle.config), device, STATE_DTYPES[settings.state.dtype],
                         total=True)  # against the whole: beside the running service, what is free is not its
        if settings.metrics.enabled:
            _check_metrics_port(settings.metrics.host, 0)
        _check_checkpoint_directory(settings, create=False)
    resolved = settings.model_dump(mode="json")  # SecretStr dumps as "**********"
    if args.format == "json":
        print(json.dumps(resolved, indent=2))
    else:
        print(_toml(resolved), end="")
    return 0


def _toml(tree: dict[str, dict[str, object]]) -> str:
    """The settings tree as TOML; unset (None) settings as comments, TOML having no null."""
    lines = []
    for section, values in tree.items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            # JSON's strings, numbers and booleans are TOML's too.
            lines.append(f"# {name} = (unset)" if value is None else f"{name} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


# --- topics ------------------------------------------------------------------------------------


def _add_topics_parser(commands: argparse._SubParsersAction) -> None:
    topics = commands.add_parser(
        "topics",
        help="create the Kafka topics streamer uses",
        description="Manage the Kafka topics streamer uses.",
    )
    actions = topics.add_subparsers(dest="topics_command", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create",
        help="create the input, output and dead-letter topics (and the checkpoint changelog)",
        description="Create the input, output and dead-letter topics with the partitions, replication factor "
        "and retention of the settings section `topics`, and, with checkpoint.store = kafka, the checkpoint "
        "changelog (cleanup.policy=compact). Topics that exist are left as they are. Prints one JSON object.",
    )
    create.add_argument("--config", type=Path, default=None, help=f"TOML config file (env {CONFIG_ENV})")
    _add_settings_flags(create, ("kafka", "topics", "checkpoint"))
    create.set_defaults(handler=_topics_create)


@contextmanager
def _client_logs_in_the_error() -> Iterator[None]:
    """The client library's log lines held back: brokers that do not answer are one line of ours,
    not the library's every retry, with the library's first complaint in it."""
    from streamer.kafka.clients import KafkaBootstrapError, kafka_logs_folded

    with kafka_logs_folded() as complaint:
        try:
            yield
        except KafkaBootstrapError as exc:
            if complaint.first is None:
                raise
            raise StreamerError(f"{exc} (first: {complaint.first})") from None


def _topics_create(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    _setup_logging(settings.run.log_level, settings.run.log_format)
    from streamer.kafka import ensure_topics
    from streamer.kafka.clients import describe_topics, security_config
    from streamer.kafka.topics import topic_specs

    kafka = settings.kafka
    specs = topic_specs(settings)
    with _client_logs_in_the_error():
        created = ensure_topics(
            kafka.bootstrap_servers, specs, kafka.client_id, security=security_config(kafka),
            bootstrap_timeout_ms=_bootstrap_timeout_ms(kafka),
        )
    kept = [name for name in specs if name not in created]
    try:  # what exists: said as the brokers have it; a failure here undoes nothing done above
        states = describe_topics(
            kafka.bootstrap_servers, kept, sorted({key for name in kept for key in specs[name].configs}), kafka.client_id,
            security=security_config(kafka), bootstrap_timeout_ms=_bootstrap_timeout_ms(kafka),
        ) if kept else {}
    except Exception as exc:  # noqa: BLE001 - housekeeping, said in one line
        print(f"streamer: warning: the existing topics could not be described ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        states = {}
    topics = []
    for name, spec in specs.items():
        if name in created:
            topics.append({"name": name, "partitions": spec.partitions, "replication_factor": spec.replication_factor,
                           "configs": spec.configs, "created": True})
            continue
        # An existing topic is left as it is: said as the brokers have it, and where it differs
        # from what the settings ask (a changelog that is not compacted loses checkpoints).
        state = states.get(name)
        found = {"name": name, "created": False}
        if state is not None:
            # Configs the brokers did not give (describing them refused) are left out, not taken to differ.
            found.update(partitions=state.partitions, replication_factor=state.replication_factor,
                         configs={k: state.configs[k] for k in spec.configs if k in state.configs})
            differs = ([f"{state.partitions} partitions, not {spec.partitions}"] if state.partitions != spec.partitions
                       else []) + [f"{k}={state.configs[k]}, not {v}" for k, v in spec.configs.items()
                                   if k in state.configs and state.configs[k] != v]
            if differs:
                found["differs"] = differs
                print(f"streamer: warning: topic {name} exists with {'; '.join(differs)}: left as it is",
                      file=sys.stderr)
        topics.append(found)
    print(json.dumps({"topics": topics}), flush=True)
    return 0


# --- simulate, train ---------------------------------------------------------------------------


class _Alias(argparse.Action):
    """Stores like the flag it stands for (given with ``dest`` = that flag's dest, and
    default=argparse.SUPPRESS on both); ``deprecated``: says to use that flag instead. Both
    given: an error, whichever came first (``_resolve_aliases``): the last had won unsaid."""

    def __init__(self, *args: Any, new_flag: str, deprecated: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.new_flag, self.deprecated = new_flag, deprecated

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if self.deprecated:
            print(f"streamer: warning: {option_string} is deprecated, use {self.new_flag}", file=sys.stderr)
        aliased = namespace.__dict__.setdefault("_aliased", {})
        aliased[self.dest] = (option_string, self.new_flag, values, self.deprecated)


def _resolve_aliases(args: argparse.Namespace) -> None:
    """Put what aliases stored where their flags store it; StreamerError when a flag and its
    alias were both given."""
    for dest, (alias, flag, value, deprecated) in args.__dict__.pop("_aliased", {}).items():
        if hasattr(args, dest):
            raise StreamerError(f"{alias} and {flag} both given: use {flag if deprecated else 'one'}"
                                f"{' alone' if deprecated else ''}")
        setattr(args, dest, value)


def _bootstrap_timeout_ms(kafka: KafkaSettings) -> int:
    """How long topics create and simulate wait for a broker: kafka.startup_wait_s, at least MIN_BOOTSTRAP_S."""
    return int(max(MIN_BOOTSTRAP_S, kafka.startup_wait_s) * 1000)


def _simulate(args: argparse.Namespace) -> int:
    _resolve_aliases(args)
    settings = settings_from_args(args)
    _setup_logging(settings.run.log_level, settings.run.log_format)
    from streamer.kafka import open_producer
    from streamer.kafka.clients import interruptible
    from streamer.simulate import DEFAULT_BATCH_ROWS, FleetSpec, run_simulator

    if args.duration is None and args.max_readings is None:
        raise StreamerError("simulate needs --duration or --max-readings")
    if not 0 <= args.anomaly_rate <= 1:
        raise StreamerError(f"--anomaly-rate must be in [0, 1], got {args.anomaly_rate}")
    if args.batch_rows is not None and args.message_format != "arrow":
        raise StreamerError("--batch-rows applies to --format arrow only")
    if args.labels is not None:
        from streamer.history import unwritable_reason

        reason = unwritable_reason(args.labels)
        if reason is not None:
            raise StreamerError(f"--labels {args.labels}: {reason}")
    spec = FleetSpec(devices=args.devices, features=args.features, seed=args.seed, anomaly_rate=args.anomaly_rate)
    kafka = settings.kafka
    last = [0, 0.0]  # readings sent and seconds at the previous progress line

    def progress(sent: int, elapsed: float) -> None:
        recent = (sent - last[0]) / max(elapsed - last[1], 1e-9)
        last[:] = [sent, elapsed]
        print(f"streamer simulate: {sent} readings sent in {elapsed:.0f} s, {recent:.0f} readings/s "
              f"to {kafka.input_topic}", file=sys.stderr, flush=True)

    # The client of kafka.client, as `run` uses it, but never transactional: readings are not a
    # consumed batch's output.
    with _client_logs_in_the_error():
        # On a helper thread: librdkafka's bootstrap waits in C, where Ctrl-C was answered only
        # once it gave up (kafka.startup_wait_s). Nothing sets the event: a signal ends the wait.
        producer = interruptible(lambda: open_producer(kafka.model_copy(update={"exactly_once": False}),
                                                       bootstrap_timeout_ms=_bootstrap_timeout_ms(kafka)),
                                 threading.Event())
    try:
        summary = run_simulator(
            producer,
            kafka.input_topic,
            spec,
            rate=args.rate,
            duration_s=args.duration,
            max_readings=args.max_readings,
            labels_path=args.labels,
            progress=progress if args.progress_interval > 0 else None,
            progress_interval_s=args.progress_interval or 5.0,
            message_format=args.message_format,
            batch_rows=args.batch_rows or DEFAULT_BATCH_ROWS,
        )
    finally:
        producer.close(5)
    print(json.dumps({"simulated": summary.__dict__}), flush=True)
    return 0


def _refuse_overwriting_data(out: Path, data: Path | None, flag: str) -> None:
    from streamer.history import overwrites_data

    if data is not None and overwrites_data(Path(out), Path(data)):
        raise StreamerError(f"{flag} {out} would overwrite the data it reads, or be read as data next time"
                            f" (--data {data})")


def _train(args: argparse.Namespace) -> int:
    _resolve_aliases(args)
    args.data = getattr(args, "data", None)
    simulated = [name for name in SIMULATED if getattr(args, name) is not None]
    if args.data is not None and simulated:
        raise StreamerError(f"--{simulated[0]} describes simulated history: it does not go with --data")
    if args.data is None:
        given = [flag for flag, value in (("--value-columns", args.value_columns), ("--on-bad", args.on_bad))
                 if value is not None]
        if given:
            raise StreamerError(f"{given[0]} reads the history of --data: without --data, history is simulated")
        args.on_bad = "refuse"
    for name, default in SIMULATED.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    _setup_logging("INFO")
    from streamer.history import load_histories
    from streamer.model import one_line_version
    from streamer.simulate import FleetSpec
    from streamer.train import TrainOptions, check_output_path, save, simulated_series, train_model

    options = TrainOptions(
        hidden_size=args.hidden_size, num_layers=args.num_layers, window=args.window, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, patience=args.patience,
        time_features=args.time_features, normalization=args.normalization, norm_alpha=args.norm_alpha,
        device=args.device, seed=args.seed, time_budget_s=args.time_budget, progress=args.progress,
        threads=args.threads, ttl_seconds=args.state_ttl_seconds,
    )
    check_output_path(args.out)  # before minutes of loading and training
    _refuse_overwriting_data(args.out, args.data, "--out")
    extra_meta: dict[str, object]
    if args.data is not None:
        histories = load_histories(args.data, value_columns=args.value_columns, on_bad=args.on_bad or "refuse")
        _show_bad_rows(histories)
        series = [(h.ts, h.values) for h in histories.devices.values()]
        source = args.data.name
        extra_meta = {"source": str(args.data), "value_columns": list(histories.value_columns),
                      "bad_rows_skipped": len(histories.bad_rows)}
    else:
        spec = FleetSpec(devices=args.devices, features=args.features, seed=args.seed)
        try:
            series = simulated_series(spec, args.history)
        except (MemoryError, ValueError) as exc:  # numpy: "array is too big" past what can be addressed
            if not isinstance(exc, MemoryError) and "too big" not in str(exc):
                raise
            raise StreamerError(f"simulated history of --devices {args.devices} x --history {args.history} x"
                                f" --features {args.features} values does not fit in memory") from None
        source = f"sim{args.devices}x{args.history}"
        extra_meta = {"source": "simulated", "simulation": {"devices": args.devices, "readings": args.history,
                                                            "features": args.features, "seed": args.seed}}
    result = train_model(series, options)
    features = "-" + "+".join(options.time_features) if options.time_features else ""
    version = args.version or one_line_version(  # a data file's name may hold anything
        f"lstm-h{args.hidden_size}-l{args.num_layers}-{options.normalization}{features}-{source}-e{result.best_epoch}")
    save(result, args.out, version, extra_meta)
    summary = {
        "model": str(args.out),
        "version": version,
        "loss": round(result.train_loss, 6),
        "val_loss": None if result.val_loss is None else round(result.val_loss, 6),
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_run,
        "seconds": round(result.seconds, 2),
    }
    print(json.dumps(summary), flush=True)
    return 0


def _names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"{text!r} has an empty name")
    return names


def _time_features(text: str) -> tuple[str, ...]:
    from streamer.features import check_time_features

    if text.strip().lower() in NONE_WORDS:
        return ()
    try:
        return check_time_features(_names(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _non_negative_float(text: str) -> float:
    """A finite number >= 0 (not nan, not inf)."""
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def _unit_interval(text: str) -> float:
    """A number in (0, 1]."""
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in (0, 1]")
    return value


# --- replay ------------------------------------------------------------------------------------

REPLAY_SECTIONS = ("model", "state", "anomaly")  # the settings replay takes flags for


def _add_replay_parser(commands: argparse._SubParsersAction) -> None:
    replay = commands.add_parser(
        "replay",
        help="replay device histories through the engine, no broker: a results table and plots",
        description="Step device histories through the engine `streamer run` serves, in timestamp order, and "
        "write one row per reading: its values, the forecast of the device's next reading, the residual, "
        "anomaly score, surprise and flag. The state table's TTL follows the readings' timestamps. Model, "
        "state and anomaly settings are read as `streamer run` reads them: flag, else environment variable, "
        "else the config file, else the default.",
    )
    replay.add_argument("--data", type=Path, required=True, metavar="PATH",
                        help="CSV or Parquet file, or a directory of them (see streamer.history)")
    replay.add_argument("--out", type=Path, required=True, metavar="FILE",
                        help="results table to write, .csv or .parquet (one row per reading, grouped by device)")
    replay.add_argument("--value-columns", type=_names, default=None, metavar="A,B",
                        help="value columns to read, in the model's order (default: the columns the model was trained "
                        "on, by name, where its file names them; else every column but device_id and the timestamp)")
    replay.add_argument("--on-bad", choices=("refuse", "skip"), default="refuse",
                        help="a bad row stops the replay (refuse), or is skipped and reported (skip) [default: refuse]")
    # One engine step's readings is what batch.max_records is to `streamer run`: the same setting.
    replay.add_argument("--batch-size", type=_positive_int, dest="batch.max_records", default=argparse.SUPPRESS,
                        metavar="N", help="readings per engine step (the batch.max_records setting, env "
                        f"{env_name('batch', 'max_records')}) [default: {Settings.model_fields['batch'].default.max_records}]")
    replay.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write a PNG per device here: readings, forecast, flags, anomaly score")
    replay.add_argument("--max-plots", type=_positive_int, default=None, metavar="N",
                        help=f"plot at most N devices, those with the most flagged readings first [default: {MAX_PLOTS}]")
    replay.add_argument("--plots-page", type=Path, default=None, metavar="FILE",
                        help="write one PNG with a grid of the devices with the most flagged readings")
    replay.add_argument("--page-devices", type=_positive_int, default=None, metavar="N",
                        help=f"devices on the --plots-page grid [default: {PAGE_DEVICES}]")
    replay.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    replay.add_argument("--config", type=Path, default=None, help="TOML config file (env STREAMER_CONFIG)")
    _add_settings_flags(replay, REPLAY_SECTIONS)
    replay.set_defaults(handler=_replay, renamed_setting_flags={("batch", "max_records"): "--batch-size"})


def _replay_histories(args: argparse.Namespace, engine: "Engine") -> "Histories":
    """The histories of --data, their value columns those the model was trained on, by name, where
    its file names them and --value-columns does not: taken by position, a file with the same
    columns in another order had been replayed with each column fed as another, without a word."""
    from streamer.history import HistoryError, load_histories

    trained_on = engine.bundle.meta.get("value_columns")
    named = (isinstance(trained_on, list) and len(trained_on) == engine.config.values_size
             and all(isinstance(name, str) and name for name in trained_on))
    if args.value_columns is not None or not named:
        return load_histories(args.data, value_columns=args.value_columns, on_bad=args.on_bad)
    try:
        return load_histories(args.data, value_columns=trained_on, on_bad=args.on_bad)
    except HistoryError as exc:
        if not exc.reason.startswith("missing value column"):
            raise
        raise StreamerError(f"{exc}: model {engine.bundle.path} was trained on value columns {trained_on}; name"
                            " this data's columns that stand for them, in that order, with --value-columns") from None


def _replay(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = settings_from_args(args)
    _setup_logging(settings.run.log_level, settings.run.log_format)
    from streamer.replay import check_output_file, make_output_dir, plot_devices, plot_page, remove_empty_dirs, replay
    from streamer.service import build_engine

    # Everything that can be refused without the data, before minutes of loading and stepping.
    for flag, value, plots_flag, plots in (("--max-plots", args.max_plots, "--plots", args.plots),
                                           ("--page-devices", args.page_devices, "--plots-page", args.plots_page)):
        if value is not None and plots is None:
            raise StreamerError(f"{flag} applies to {plots_flag} only")
    check_output_file(args.out, ("csv", "parquet"), "--out")
    _refuse_overwriting_data(args.out, args.data, "--out")
    if args.plots_page is not None:
        if args.plots is not None and args.plots_page.resolve().parent == args.plots.resolve():
            raise StreamerError(f"--plots-page {args.plots_page} is in --plots {args.plots}, where the device plots"
                                " go (one may have its name): put it elsewhere")
        check_output_file(args.plots_page, ("png",), "--plots-page")
    created = make_output_dir(args.plots, "--plots") if args.plots is not None else None
    try:
        _require_model_path(settings)
        engine = build_engine(settings)
        histories = _replay_histories(args, engine)
        _show_bad_rows(histories)
        result = replay(histories, engine, batch_size=settings.batch.max_records, progress=args.progress)
        with _writing("--out", args.out):
            result.write(args.out)
        with _writing("--plots", args.plots):
            plots = (plot_devices(result, args.plots, max_devices=args.max_plots or MAX_PLOTS)
                     if args.plots is not None else [])
    except BaseException:
        if created is not None:  # a replay that failed leaves no empty --plots directory behind
            remove_empty_dirs(args.plots, created)
        raise
    if args.plots_page is not None:
        with _writing("--plots-page", args.plots_page):
            plot_page(result, args.plots_page, max_devices=args.page_devices or PAGE_DEVICES)
    summary = {
        "readings": len(result),
        "devices": len(result.device_rows),
        "flagged": result.flagged,
        "skipped_rows": len(histories.bad_rows),
        "evicted_ttl": result.evicted_ttl,
        "evicted_capacity": result.evicted_capacity,
        "model_version": result.model_version,
        "replay_seconds": round(result.seconds, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "out": str(args.out),
        "plots": len(plots),
        "plots_dir": None if args.plots is None else str(args.plots),
        "plots_page": None if args.plots_page is None else str(args.plots_page),
    }
    print(json.dumps(summary), flush=True)
    return 0


@contextmanager
def _writing(flag: str, path: Path | None) -> Iterator[None]:
    """An OSError while writing what ``flag`` names (a full disk, a file made read-only meanwhile)
    as one line naming it, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise StreamerError(f"{flag} {path}: cannot be written ({exc.strerror or exc})") from None


def _show_bad_rows(histories: Histories) -> None:
    """The first MAX_BAD_ROWS_SHOWN skipped rows and their count, on stderr."""
    for bad in histories.bad_rows[:MAX_BAD_ROWS_SHOWN]:
        print(f"{bad.path}:{bad.line}: {bad.reason} ({bad.value})", file=sys.stderr)
    if histories.bad_rows:
        print(f"streamer: skipped {len(histories.bad_rows)} bad row(s)", file=sys.stderr)


def _require_model_path(settings: Settings) -> None:
    if settings.model.path is None:
        raise StreamerError("no model file: set --model-path (env STREAMER_MODEL__PATH)")


# --- helpers -----------------------------------------------------------------------------------


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 2**63)")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _positive_float(text: str) -> float:
    """A finite number > 0 (not inf: "none" says "no limit" where there may be none)."""
    value = _number(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def _model_version(text: str) -> str:
    from streamer.model import version_problem

    problem = version_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"a model version {problem}")
    return text


def _positive_float_or_none(text: str) -> float | None:
    return None if text.strip().lower() in NONE_WORDS else _positive_float(text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("streamer")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from streamer import __version__

        return __version__


def log_formatter(log_format: str) -> logging.Formatter:
    """text: a readable line per record; json: one object per line with timestamp (ISO 8601,
    UTC), level, name, message and the record's context fields (``extra``: topic, partition...)."""
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter("{levelname}{name}{message}", style="{", rename_fields={"levelname": "level"}, timestamp=True)
    return logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")


class RunLogHandler(logging.StreamHandler):
    """The run's log lines on stderr. Once ``main_thread_only()`` is called, records of other
    threads are dropped: a thread the run abandoned (a client's bootstrap, which does not look
    at signals) may log until exit, and its lines must not follow the summary. Decided in
    ``emit``, under the handler's lock: a record another thread is writing is finished first,
    and none starts after."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._others_dropped = False

    def main_thread_only(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._others_dropped = True

    def emit(self, record: logging.LogRecord) -> None:
        if self._others_dropped and record.thread != threading.main_thread().ident:
            return
        super().emit(record)


def _setup_logging(level: str, log_format: str = "text") -> None:
    for earlier in logging.getLogger().handlers:  # a run before this one in the process (basicConfig keeps it)
        if isinstance(earlier, RunLogHandler):
            earlier._others_dropped = False
    handler = RunLogHandler(sys.stderr)
    handler.setFormatter(log_formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("kafka").setLevel(logging.WARNING)
    logging.getLogger("librdkafka").setLevel(logging.WARNING)  # confluent-kafka's, see streamer/kafka/confluent.py


if __name__ == "__main__":
    sys.exit(main())
