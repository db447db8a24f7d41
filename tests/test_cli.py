"""The CLI as a user meets it: help, bad values and missing files give clear errors, exit != 0."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from streamer.cli import main
from streamer.errors import StreamerError


def run_cli(*args: str, env: dict | None = None, stdin: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=120, env=env,
                          stdin=stdin)


def test_help_lists_every_setting_with_its_env_name():
    result = run_cli("run", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag, env in [
        ("--kafka-bootstrap-servers", "STREAMER_KAFKA__BOOTSTRAP_SERVERS"),
        ("--batch-max-records", "STREAMER_BATCH__MAX_RECORDS"),
        ("--model-path", "STREAMER_MODEL__PATH"),
        ("--state-ttl-seconds", "STREAMER_STATE__TTL_SECONDS"),
        ("--anomaly-threshold", "STREAMER_ANOMALY__THRESHOLD"),
        ("--metrics-port", "STREAMER_METRICS__PORT"),
    ]:
        assert flag in text and env in text, flag
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("run", "simulate", "train"))


@pytest.mark.parametrize(
    "args, named",
    [
        (["--batch-max-records", "0"], "--batch-max-records"),
        (["--state-capacity", "lots"], "STREAMER_STATE__CAPACITY"),
        (["--kafka-bootstrap-servers", "nohost"], "--kafka-bootstrap-servers"),
        # Brackets that do not close, IPv6 without them: had passed, for the clients to retry for ever.
        (["--kafka-bootstrap-servers", "[::1:9092"], "'[::1:9092' is not host:port"),
        (["--kafka-bootstrap-servers", "a:1:2"], "'a:1:2' is not host:port"),
        (["--kafka-bootstrap-servers", "[::1]:9092,[fe80::1]:0"], "port 0 is not from 1 to 65535"),
        (["--model-device", "tpu"], "--model-device"),
        (["--kafka-auto-offset-reset", "middle"], "--kafka-auto-offset-reset"),
        (["--batch-max-records", "5000", "--state-capacity", "100"], "state.capacity"),
    ],
)
def test_bad_setting_values_stop_with_a_message_naming_them(capsys, args, named):
    assert main(["run", *args]) == 2
    assert named in capsys.readouterr().err


def test_bad_env_value_is_named(monkeypatch, capsys):
    monkeypatch.setenv("STREAMER_ANOMALY__WARMUP", "-3")
    assert main(["run"]) == 2
    assert "STREAMER_ANOMALY__WARMUP" in capsys.readouterr().err


def test_missing_model_file_is_a_clear_error(tmp_path: Path):
    result = run_cli("run", "--model-path", str(tmp_path / "absent.pt"), "--metrics-enabled", "false")
    assert result.returncode == 2
    assert "absent.pt" in result.stderr and "no such file" in result.stderr
    no_model = run_cli("run", "--metrics-enabled", "false")
    assert no_model.returncode == 2 and "--model-path" in no_model.stderr


def test_config_file_values_and_their_errors(tmp_path: Path, capsys):
    config = tmp_path / "streamer.toml"
    config.write_text('[batch]\nmax_records = -1\n')
    assert main(["run", "--config", str(config)]) == 2
    assert "batch.max_records" in capsys.readouterr().err
    config.write_text('[kafka]\nno_such_setting = 1\n')
    assert main(["run", "--config", str(config)]) == 2
    assert "no_such_setting" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_flags_beat_env_beat_config_file(tmp_path: Path, monkeypatch):
    from streamer.cli import build_parser, settings_from_args

    config = tmp_path / "streamer.toml"
    config.write_text('[batch]\nmax_records = 10\nmax_wait_ms = 7\n[kafka]\ngroup_id = "from-file"\n')
    monkeypatch.setenv("STREAMER_BATCH__MAX_RECORDS", "20")
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "from-env")
    args = build_parser().parse_args(["run", "--config", str(config), "--kafka-group-id", "from-flag",
                                      "--state-ttl-seconds", "none"])
    settings = settings_from_args(args)
    assert settings.kafka.group_id == "from-flag"
    assert settings.batch.max_records == 20 and settings.batch.max_wait_ms == 7
    assert settings.state.ttl_seconds is None


def test_none_turns_off_a_setting_from_env_and_config_file(tmp_path: Path, monkeypatch):
    from streamer.settings import load_settings

    monkeypatch.setenv("STREAMER_STATE__TTL_SECONDS", "none")
    config = tmp_path / "streamer.toml"
    config.write_text('[anomaly]\nrange_tolerance = "null"\n')
    settings = load_settings({}, config)
    assert settings.state.ttl_seconds is None and settings.anomaly.range_tolerance is None
    monkeypatch.setenv("STREAMER_KAFKA__GROUP_ID", "none")  # a setting that cannot be None keeps the word
    assert load_settings({}, None).kafka.group_id == "none"


def test_errors_name_only_flags_the_command_has(tmp_path: Path):
    env = {**os.environ, "STREAMER_KAFKA__GROUP_ID": ""}
    replay = run_cli("replay", "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "o.csv"), env=env)
    assert replay.returncode == 2
    assert "--kafka-group-id" not in replay.stderr and "STREAMER_KAFKA__GROUP_ID or the config file" in replay.stderr
    run = run_cli("check-config", env=env)
    assert run.returncode == 2 and "flag --kafka-group-id, env STREAMER_KAFKA__GROUP_ID" in run.stderr


def test_json_logs_one_object_per_line_with_context(tmp_path: Path):
    import logging

    from streamer.cli import log_formatter
    from streamer.model import save_model_file
    from tests.conftest import make_bundle

    record = logging.LogRecord("streamer.partitions", logging.WARNING, __file__, 1, "%s moved", ("p-3",), None)
    record.topic, record.partition = "readings", 3
    line = json.loads(log_formatter("json").format(record))
    assert line["level"] == "WARNING" and line["message"] == "p-3 moved" and line["name"] == "streamer.partitions"
    assert line["topic"] == "readings" and line["partition"] == 3 and line["timestamp"].endswith("+00:00")

    bundle = make_bundle(input_size=1)
    model = tmp_path / "m.pt"
    save_model_file(model, bundle.model, bundle.config, "json-logs")
    closed = "127.0.0.1:9"  # the discard port: nothing answers
    result = run_cli("run", "--model-path", str(model), "--kafka-bootstrap-servers", closed, "--kafka-startup-wait-s", "0",
                     "--metrics-enabled", "false", "--run-log-format", "json")
    assert result.returncode == 2, result.stderr
    *records, last = result.stderr.strip().splitlines()
    assert records and last.startswith("streamer: error:")
    for text in records:
        assert {"timestamp", "level", "name", "message"} <= json.loads(text).keys(), text
    # The error that ends the run is a JSON record too (it had been the plain line alone).
    ending = json.loads(records[-1])
    assert ending["level"] == "ERROR" and ending["message"] == "stopped: " + last.removeprefix("streamer: error: ")


def test_simulate_and_train_reject_bad_values():
    assert run_cli("simulate", "--devices", "0", "--max-readings", "5").returncode == 2
    result = run_cli("simulate", "--devices", "3")
    assert result.returncode == 2 and "--duration or --max-readings" in result.stderr
    assert run_cli("train").returncode == 2  # --out is required


# --- issue 7: one-line errors, suggestions that exist, operator niceties -------------------------


def one_line_error(capsys) -> str:
    """stderr of a refused command: one line, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith("streamer: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_reader_that_stops_reading_ends_the_command_without_a_traceback(tmp_path: Path):
    # `streamer check-config | head -1`: the reader is gone before the settings are written (its
    # end of the pipe closed at once, long before the command has imported what it needs).
    script = ("import subprocess, sys\n"
              "p = subprocess.Popen([sys.executable, '-m', 'streamer', 'check-config', '--settings-only', '--format',"
              " 'json'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)\n"
              "p.stdout.close(); err = p.stderr.read(); sys.stdout.write(f'{p.wait()} {err!r}')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    code, err = done.stdout.split(" ", 1)
    assert code == "1" and err == "b''", done.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    import streamer

    assert capsys.readouterr().out.strip() == f"streamer {streamer.__version__}"


def test_broken_toml_names_the_file_and_line(tmp_path: Path, capsys):
    config = tmp_path / "broken.toml"
    config.write_text('[batch]\nmax_records = 10\n[kafka\nbootstrap_servers = "a:1"\n')
    assert main(["run", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert "broken.toml" in err and "line 3" in err


@pytest.mark.parametrize(
    "text, suggested",
    [
        ('[kafka]\nbootstrap_server = "a:1"\n', "bootstrap_servers (flag --kafka-bootstrap-servers, env STREAMER_KAFKA__BOOTSTRAP_SERVERS)"),
        ('[kafak]\nbootstrap_servers = "a:1"\n', "[kafka]"),
        ('bootstrap_servers = "a:1"\n', "bootstrap_servers under [kafka]"),
        ('[state]\nttl_secs = 5\n', "ttl_seconds (flag --state-ttl-seconds, env STREAMER_STATE__TTL_SECONDS)"),
    ],
)
def test_config_key_typo_suggests_the_real_key_flag_and_variable(tmp_path: Path, capsys, text: str, suggested: str):
    config = tmp_path / "typo.toml"
    config.write_text(text)
    assert main(["run", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert "typo.toml" in err and f"did you mean {suggested}" in err
    # Only flags and variables that exist are named.
    assert "--kafka-bootstrap-server " not in err and "STREAMER_KAFKA__BOOTSTRAP_SERVER " not in err


@pytest.mark.parametrize(
    "variable",
    ["STREAMER_KAFAK__BOOTSTRAP_SERVERS", "STREAMER_KAFKA_BOOTSTRAP_SERVERS", "STREAMER_KAFKA__BOOTSTRAP_SERVER"],
)
def test_unknown_streamer_variables_are_warned_about_with_the_closest_name(monkeypatch, capsys, variable: str):
    for name in [name for name in os.environ if name.upper().startswith("STREAMER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv(variable, "elsewhere:9092")
    monkeypatch.setenv("STREAMER_PORT", "tcp://10.0.0.1:9100")  # a Kubernetes service link: not ours, no warning
    assert main(["check-config", "--settings-only"]) == 0
    out, err = capsys.readouterr()
    assert f"warning: environment variable {variable} is not a setting, ignored" in err
    assert "did you mean STREAMER_KAFKA__BOOTSTRAP_SERVERS" in err and err.count("\n") == 1
    assert 'bootstrap_servers = "127.0.0.1:9092"' in out  # ignored, not used


@pytest.mark.parametrize("topic", ["bad/topic", ".", "..", "a" * 250, "spaced topic"])
def test_invalid_topic_names_are_refused(capsys, topic: str):
    assert main(["check-config", "--kafka-output-topic", topic]) == 2
    err = one_line_error(capsys)
    assert "--kafka-output-topic" in err and "not a Kafka topic name" in err
    assert main(["check-config", "--settings-only", "--kafka-output-topic", "a" * 249]) == 0


@pytest.mark.parametrize("flag, name", [("--kafka-output-topic", "output_topic"), ("--kafka-dead-letter-topic", "dead_letter_topic")])
def test_topics_written_must_differ_from_the_input_topic(capsys, flag: str, name: str):
    assert main(["check-config", "--kafka-input-topic", "readings", flag, "readings"]) == 2
    err = one_line_error(capsys)
    assert f"kafka.{name} (flag {flag}" in err and "is the input topic 'readings'" in err


def test_dead_letters_must_not_go_to_the_output_topic(capsys):
    assert main(["check-config", "--kafka-output-topic", "out", "--kafka-dead-letter-topic", "out"]) == 2
    err = one_line_error(capsys)
    assert "kafka.dead_letter_topic (flag --kafka-dead-letter-topic" in err and "is the output topic 'out'" in err


def test_busy_metrics_port_is_refused_before_connecting_to_kafka(tmp_path: Path, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    started = time.monotonic()
    try:
        code = main(["run", "--model-path", str(tmp_path / "m.pt"), "--kafka-bootstrap-servers", "127.0.0.1:1",
                     "--metrics-port", str(port)])
    finally:
        busy.close()
    assert code == 2 and time.monotonic() - started < 5
    err = one_line_error(capsys)
    assert f"metrics.port (flag --metrics-port, env STREAMER_METRICS__PORT) = {port}" in err and "in use" in err


def test_sigterm_repeated_while_the_run_ends_still_exits_0(model_file: Path, tmp_path: Path):
    """A supervisor sends SIGTERM more than once: the run stops on the first and exits 0. Python
    gives its handlers back to the system's default as it shuts down, and a later one had ended
    the process with 143 (4 runs of 4)."""
    import signal

    run = subprocess.Popen(
        [sys.executable, "-m", "streamer", "run", "--model-path", str(model_file), "--kafka-bootstrap-servers",
         "127.0.0.1:1", "--kafka-startup-wait-s", "30", "--metrics-port", "0", "--checkpoint-directory",
         str(tmp_path / "cp")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert run.stderr is not None
        for line in run.stderr:  # the model loaded: past start-up's checks, waiting for the broker
            if "state table of" in line:
                break
        time.sleep(0.5)
        for _ in range(4):
            run.send_signal(signal.SIGTERM)
            time.sleep(0.05)
        out, _ = run.communicate(timeout=20)
    finally:
        run.kill()
    assert run.returncode == 0 and '"summary"' in out


def test_garbage_model_file_gives_our_error_without_torch_advice(tmp_path: Path, capsys, monkeypatch):
    import faulthandler
    import signal

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's handlers: not in the test process
    monkeypatch.setattr(faulthandler, "register", lambda *args, **kwargs: None)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage" * 20)
    assert main(["run", "--model-path", str(garbage), "--metrics-enabled", "false"]) == 2
    err = one_line_error(capsys)
    assert "garbage.pt" in err and "cannot be read as a torch file" in err
    assert "weights_only" not in err and "torch.load" not in err


@pytest.mark.parametrize("client", ["confluent-kafka", "kafka-python"])
def test_simulate_against_brokers_that_do_not_answer_says_so_in_one_line(client: str):
    """No broker: exit 2 within kafka.startup_wait_s (at least 5 s) and one line, not the client
    library's line per refused connection (librdkafka's were a thousand in 30 s)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "streamer", "simulate", "--kafka-bootstrap-servers", "127.0.0.1:1", "--kafka-client", client,
         "--kafka-startup-wait-s", "0", "--max-readings", "1"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and time.monotonic() - started < 30, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamer: error: Kafka at 127.0.0.1:1"), done.stderr[-2000:]


@pytest.mark.parametrize("rate", ["nan", "inf", "-inf", "-5", "lots"])
def test_simulate_refuses_a_meaningless_rate(capsys, rate: str):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--rate", rate, "--max-readings", "5"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--rate" in err and "Traceback" not in err


def test_check_config_prints_resolved_settings_with_secrets_masked(tmp_path: Path, monkeypatch, capsys):
    config = tmp_path / "streamer.toml"
    config.write_text('[kafka]\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "u"\n'
                      '[batch]\nmax_records = 64\n')
    monkeypatch.setenv("STREAMER_KAFKA__SASL_PASSWORD", "hunter2")
    assert main(["check-config", "--settings-only", "--config", str(config), "--state-capacity", "500"]) == 0
    out = capsys.readouterr().out
    resolved = tomllib.loads(out)  # TOML that reads back, unset settings as comments
    assert resolved["kafka"]["sasl_password"] == "**********" and "hunter2" not in out
    assert resolved["batch"]["max_records"] == 64 and resolved["state"]["capacity"] == 500
    assert "# instance_id = (unset)" in out
    assert main(["check-config", "--settings-only", "--config", str(config), "--format", "json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert as_json["kafka"]["sasl_password"] == "**********" and as_json["kafka"]["security_protocol"] == "SASL_SSL"
    assert main(["check-config", "--batch-max-records", "0"]) == 2
    assert "--batch-max-records" in one_line_error(capsys)


def test_simulate_takes_the_kafka_settings_run_takes(tmp_path: Path, monkeypatch, capsys):
    import streamer.kafka
    from streamer.kafka.memory import MemoryBroker, MemoryProducer

    calls, waits = [], []
    broker = MemoryBroker()

    def open_producer(settings, bootstrap_timeout_ms=None):
        calls.append(settings)
        waits.append(bootstrap_timeout_ms)
        return MemoryProducer(broker)

    monkeypatch.setattr(streamer.kafka, "open_producer", open_producer)
    config = tmp_path / "streamer.toml"
    config.write_text('[kafka]\ninput_topic = "from-file"\nsecurity_protocol = "SASL_PLAINTEXT"\n'
                      'sasl_mechanism = "SCRAM-SHA-256"\nsasl_username = "sim"\nexactly_once = true\n'
                      'client = "kafka-python"\n')
    monkeypatch.setenv("STREAMER_KAFKA__BOOTSTRAP_SERVERS", "from-env:9092")
    monkeypatch.setenv("STREAMER_KAFKA__SASL_PASSWORD", "s3cret")
    assert main(["simulate", "--config", str(config), "--max-readings", "3", "--progress-interval", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["simulated"]["readings"] == 3
    kafka = calls[-1]
    assert (kafka.bootstrap_servers, kafka.client) == ("from-env:9092", "kafka-python")
    assert (kafka.security_protocol, kafka.sasl_username) == ("SASL_PLAINTEXT", "sim")
    assert kafka.sasl_password.get_secret_value() == "s3cret"
    assert not kafka.exactly_once  # readings are not a transaction's output
    assert waits[-1] == 120_000  # kafka.startup_wait_s, as `run` waits for the brokers
    assert [m.key for m in broker.messages("from-file")] and len(broker.messages("from-file")) == 3
    # Flags beat both; the old --bootstrap-servers still works, with a warning.
    assert main(["simulate", "--config", str(config), "--max-readings", "3", "--kafka-input-topic", "from-flag",
                 "--bootstrap-servers", "old-flag:9092"]) == 0
    assert (calls[-1].bootstrap_servers, calls[-1].input_topic) == ("old-flag:9092", "from-flag")
    assert "--bootstrap-servers is deprecated, use --kafka-bootstrap-servers" in capsys.readouterr().err
    assert main(["simulate", "--topic", "t2", "--max-readings", "3", "--progress-interval", "0"]) == 0
    assert calls[-1].input_topic == "t2" and len(broker.messages("t2")) == 3
    assert main(["simulate", "--max-readings", "3", "--kafka-security-protocol", "SASL_SSL"]) == 2
    assert "sasl_mechanism" in one_line_error(capsys)


def test_simulate_prints_a_progress_line_every_few_seconds(monkeypatch, capsys):
    import streamer.kafka
    from streamer.kafka.memory import MemoryBroker, MemoryProducer

    monkeypatch.setattr(streamer.kafka, "open_producer", lambda settings, **_: MemoryProducer(MemoryBroker()))
    assert main(["simulate", "--devices", "5", "--rate", "1000", "--duration", "0.45", "--progress-interval", "0.1"]) == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("streamer simulate: ")]
    assert 3 <= len(lines) <= 5, err
    assert all("readings sent in" in line and "readings/s to sensor-readings" in line for line in lines)
    assert json.loads(out)["simulated"]["readings"] > 0


def test_a_section_as_json_in_the_environment_is_checked_too(monkeypatch, capsys):
    monkeypatch.setenv("STREAMER_KAFKA", '{"sasl_pasword": "hunter2"}')
    assert main(["check-config"]) == 2
    err = one_line_error(capsys)
    assert "kafka.sasl_pasword (not a setting; did you mean kafka.sasl_password" in err and "hunter2" not in err
    for value in ("{not json", "x"):
        monkeypatch.setenv("STREAMER_KAFKA", value)
        assert main(["check-config"]) == 2
        assert one_line_error(capsys) == ("streamer: error: environment variable STREAMER_KAFKA: not a JSON object of"
                                          " settings of section 'kafka' (or set one per variable: STREAMER_KAFKA__<NAME>)\n")


def test_a_variable_nested_below_a_setting_that_does_not_exist_is_ignored_as_said(monkeypatch, capsys):
    monkeypatch.setenv("STREAMER_KAFKA__SSL__X", "1")
    assert main(["check-config", "--settings-only", "--metrics-enabled", "false"]) == 0
    assert "STREAMER_KAFKA__SSL__X is not a setting, ignored" in capsys.readouterr().err


def test_a_variable_nested_below_a_real_setting_is_ignored_as_said(monkeypatch, capsys, tmp_path: Path):
    monkeypatch.setenv("STREAMER_KAFKA__SSL_CAFILE__X", "1")
    assert main(["check-config", "--settings-only"]) == 0  # it had reached kafka.ssl_cafile as its value
    assert "STREAMER_KAFKA__SSL_CAFILE__X is not a setting, ignored" in capsys.readouterr().err
    # The setting itself, given in the section's JSON, stays.
    cafile = tmp_path / "ca.pem"
    cafile.write_text("x")
    monkeypatch.setenv("STREAMER_KAFKA", json.dumps({"ssl_cafile": str(cafile)}))
    assert main(["check-config", "--settings-only", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["kafka"]["ssl_cafile"] == str(cafile)


@pytest.mark.parametrize("text, named, why", [
    ("[state]\ncapacity = true\n", "state.capacity", "true is no number"),  # had been a table of 1 row
    ("[state]\nttl_seconds = false\n", "state.ttl_seconds", "false is no number"),
    ("[batch]\nmax_records = true\n", "batch.max_records", "true is no number"),
    ("[checkpoint]\nenabled = 1\n", "checkpoint.enabled", "1 is neither true nor false"),
    ("[checkpoint]\ndirectory = \"\"\n", "checkpoint.directory", "an empty path"),  # had been the working directory
    ("[model]\npath = \" \"\n", "model.path", "an empty path"),
    ('[kafka]\nbootstrap_servers = "h:99999"\n', "kafka.bootstrap_servers", "port 99999 is not from 1 to 65535"),
    ('[kafka]\nbootstrap_servers = "h:9092,h:0"\n', "kafka.bootstrap_servers", "port 0 is not from 1 to 65535"),
])
def test_values_that_stand_in_for_another_type_are_refused(tmp_path: Path, capsys, text: str, named: str, why: str):
    config = tmp_path / "streamer.toml"
    config.write_text(text)
    assert main(["check-config", "--settings-only", "--config", str(config)]) == 2
    err = one_line_error(capsys)
    assert named in err and why in err, err


def test_numbers_and_switches_from_the_environment_are_still_read_from_their_text(monkeypatch, capsys):
    for name, value in [("STATE__CAPACITY", "5000"), ("STATE__TTL_SECONDS", "60"), ("CHECKPOINT__ENABLED", "1"),
                        ("METRICS__ENABLED", "off"), ("ANOMALY__FLAT_RUNS", "false")]:
        monkeypatch.setenv(f"STREAMER_{name}", value)
    assert main(["check-config", "--settings-only", "--format", "json"]) == 0
    out = capsys.readouterr().out
    for expected in ('"capacity": 5000', '"ttl_seconds": 60.0', '"flat_runs": false'):
        assert expected in out
    monkeypatch.setenv("STREAMER_CHECKPOINT__DIRECTORY", "")
    assert main(["check-config", "--settings-only"]) == 2
    assert "checkpoint.directory" in one_line_error(capsys)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    from streamer.model import save_model_file
    from tests.conftest import make_bundle

    bundle = make_bundle(input_size=1, hidden_size=8, num_layers=2)
    path = tmp_path / "model.pt"
    save_model_file(path, bundle.model, bundle.config, "cli-test")
    return path


@pytest.fixture
def no_signal_handlers(monkeypatch):
    import faulthandler
    import signal

    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main's handlers: not in the test process
    monkeypatch.setattr(faulthandler, "register", lambda *args, **kwargs: None)


def test_an_unresolvable_metrics_host_is_refused_also_on_any_free_port(model_file: Path, capsys):
    for port in ("0", "9100"):
        assert main(["run", "--model-path", str(model_file), "--kafka-bootstrap-servers", "127.0.0.1:1",
                     "--metrics-host", "no such host!", "--metrics-port", port]) == 2
        err = one_line_error(capsys)
        assert "metrics.host (flag --metrics-host, env STREAMER_METRICS__HOST) = 'no such host!'" in err


def test_a_checkpoint_directory_that_cannot_be_written_is_refused_before_connecting(model_file: Path, tmp_path: Path,
                                                                                    capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for directory, says in ((a_file, "not a directory"), (a_file / "under", "Not a directory")):
        started = time.monotonic()
        assert main(["run", "--model-path", str(model_file), "--kafka-bootstrap-servers", "127.0.0.1:1",
                     "--metrics-enabled", "false", "--checkpoint-directory", str(directory)]) == 2
        assert time.monotonic() - started < 5
        err = one_line_error(capsys)
        assert "checkpoint.directory (flag --checkpoint-directory" in err and says in err
    # With checkpoints off, or in Kafka, the directory is not used.
    assert main(["check-config", "--model-path", str(model_file), "--checkpoint-directory", str(a_file),
                 "--checkpoint-enabled", "false", "--metrics-enabled", "false"]) == 0


def test_check_config_refuses_what_run_refuses_before_connecting(model_file: Path, tmp_path: Path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    ok = ["--model-path", str(model_file), "--metrics-enabled", "false", "--checkpoint-directory", str(tmp_path / "new" / "ck")]
    # No model file at all: `run` stops at once, and so does the check (it had passed, exit 0).
    assert main(["check-config", *ok[2:]]) == 2
    assert one_line_error(capsys) == "streamer: error: no model file: set --model-path (env STREAMER_MODEL__PATH)\n"
    assert main(["check-config", *ok[2:], "--settings-only"]) == 0
    capsys.readouterr()
    assert main(["check-config", *ok]) == 0
    assert not (tmp_path / "new").exists()  # nothing created
    capsys.readouterr()
    for extra, says in (
        (["--model-path", str(tmp_path / "missing.pt")], "no such file"),
        (["--model-path", str(tmp_path)], f"model file {tmp_path}: a directory, not a file"),
        (["--checkpoint-directory", str(a_file / "ck")], "is not a directory"),
        # Root's access() says yes to /proc, where no file can be made: run refuses it.
        (["--checkpoint-directory", "/proc/streamer-ck"], "in /proc"),
        (["--metrics-enabled", "true", "--metrics-host", "no such host!"], "metrics.host"),
    ):
        assert main(["check-config", *ok, *extra]) == 2, extra
        assert says in one_line_error(capsys)
        assert main(["check-config", *ok, *extra, "--settings-only"]) == 0, extra  # a config checked elsewhere
        capsys.readouterr()
    assert main(["check-config", *ok, "--config", str(tmp_path), "--settings-only"]) == 2
    assert f"config file {tmp_path}: a directory, not a file" in one_line_error(capsys)
    # Beside the running service, its metrics port is taken: not a problem of the settings.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        assert main(["check-config", *ok, "--metrics-enabled", "true", "--metrics-port", str(busy.getsockname()[1])]) == 0
    finally:
        busy.close()


def test_a_cuda_device_the_host_lacks_is_one_line_in_check_config_and_run(model_file: Path, capsys, monkeypatch,
                                                                          no_signal_handlers):
    import torch

    from streamer.engine import resolve_device
    from streamer.errors import StreamerError

    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    says = "this host has" if torch.cuda.is_available() else "CUDA is not available here"
    base = ["--model-path", str(model_file), "--metrics-enabled", "false", "--model-device", missing]
    assert main(["check-config", *base]) == 2
    assert f"device {missing!r} asked for, but {says}" in one_line_error(capsys)
    assert main(["run", *base, "--kafka-bootstrap-servers", "127.0.0.1:1", "--checkpoint-enabled", "false"]) == 2
    assert f"device {missing!r} asked for, but {says}" in one_line_error(capsys)
    # A GPU index past those the host has, as on a one-GPU host.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(StreamerError, match=r"device 'cuda:1' asked for, but this host has 1 CUDA device\(s\)"):
        resolve_device("cuda:1")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


def test_a_model_file_of_the_wrong_shape_or_with_nan_weights_is_one_line(model_file: Path, tmp_path: Path, capsys):
    import torch

    raw = torch.load(model_file, weights_only=False)
    shape = tmp_path / "shape.pt"
    torch.save({**raw, "config": {**raw["config"], "hidden_size": 16}}, shape)
    assert main(["check-config", "--model-path", str(shape), "--metrics-enabled", "false"]) == 2
    err = one_line_error(capsys)
    assert "state_dict does not match config" in err and "size mismatch for lstm." in err and "more)" in err
    state = dict(raw["state_dict"])
    state["fc.bias"] = torch.full_like(state["fc.bias"], float("nan"))
    nan = tmp_path / "nan.pt"
    torch.save({**raw, "state_dict": state}, nan)
    assert main(["check-config", "--model-path", str(nan), "--metrics-enabled", "false"]) == 2
    assert "non-finite weights (NaN or inf) in fc.bias" in one_line_error(capsys)


def test_a_state_table_too_big_for_the_memory_is_one_line_in_run_and_check_config(model_file: Path, capsys,
                                                                                   no_signal_handlers):
    # The most the setting takes: hundreds of GB here. check-config had passed it (only `run`
    # allocated the table), and a table that the allocator took but the host could not hold was
    # killed as torch wrote its zeros, with no word.
    for command in ("run", "check-config"):
        assert main([command, "--model-path", str(model_file), "--kafka-bootstrap-servers", "127.0.0.1:1",
                     "--metrics-enabled", "false", "--checkpoint-enabled", "false",
                     "--state-capacity", str(2**31 - 1)]) == 2
        err = one_line_error(capsys)
        may = "may have" if command == "check-config" else "may still take"  # beside the service: the whole
        assert f"state table capacity {2**31 - 1}: " in err and f"GiB of memory this process {may}" in err


def test_simulate_and_train_refuse_bad_paths_seeds_and_both_bootstrap_flags(tmp_path: Path, capsys):
    sim = ["simulate", "--devices", "1", "--duration", "1", "--kafka-bootstrap-servers", "127.0.0.1:1"]
    assert main([*sim, "--labels", str(tmp_path / "missing" / "labels.jsonl")]) == 2
    assert "does not exist" in one_line_error(capsys)
    assert main([*sim, "--labels", str(tmp_path)]) == 2
    assert "is a directory" in one_line_error(capsys)
    assert main([*sim, "--bootstrap-servers", "127.0.0.1:2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "deprecated" in err[0] and err[-1] == (
        "streamer: error: --bootstrap-servers and --kafka-bootstrap-servers both given: use --kafka-bootstrap-servers alone")
    # --topic is --kafka-input-topic's other name, not deprecated: both given, the last had won unsaid
    assert main([*sim, "--topic", "a", "--kafka-input-topic", "b"]) == 2
    assert capsys.readouterr().err.splitlines() == ["streamer: error: --topic and --kafka-input-topic both given: use one"]
    for command in (sim, ["train", "--out", str(tmp_path / "m.pt")]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--seed", str(2**64)])
        assert exit_.value.code == 2
        assert "argument --seed" in capsys.readouterr().err


def test_abbreviated_flags_are_refused(capsys):
    for command in (["check-config"], ["topics", "create"], ["simulate", "--duration", "1"]):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--kafka-bootstrap-server", "127.0.0.1:1"])
        assert exit_.value.code == 2
        assert "unrecognized arguments: --kafka-bootstrap-server" in capsys.readouterr().err


@pytest.mark.parametrize("args, says", [
    (["run", "--state-capacity"], "streamer run: error: argument --state-capacity: expected one argument"),
    (["train", "--out", "m.pt", "--epochs", "0"], "streamer train: error: argument --epochs: '0' must be >= 1"),
    (["bogus"], "streamer: error: argument COMMAND: invalid choice: 'bogus'"),
    # inf had passed as a number > 0: a time budget of inf, a ttl that `run` then refuses
    (["train", "--out", "m.pt", "--time-budget", "inf"],
     "streamer train: error: argument --time-budget: 'inf' must be a finite number > 0"),
    (["train", "--out", "m.pt", "--state-ttl-seconds", "1e400"],
     "streamer train: error: argument --state-ttl-seconds: '1e400' must be a finite number > 0"),
    (["simulate", "--duration", "inf"], "streamer simulate: error: argument --duration: 'inf' must be a finite number > 0"),
    # a version is logged and published: a line break in it forged a log line
    (["train", "--out", "m.pt", "--version", "v1\nERROR forged"],
     "streamer train: error: argument --version: a model version must be printable text"),
])
def test_a_bad_flag_is_one_line_naming_it_not_the_usage(capsys, args, says):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(says) and "--help)" in err, err


def test_train_refuses_flags_that_contradict_each_other_and_simulated_history_too_big(tmp_path: Path, capsys):
    data = tmp_path / "history.csv"
    data.write_text("timestamp,value\n1,1\n")
    out = str(tmp_path / "m.pt")
    assert main(["train", "--out", out, "--csv", str(data), "--data", str(data)]) == 2  # the last had won
    assert capsys.readouterr().err == ("streamer: warning: --csv is deprecated, use --data\n"
                                       "streamer: error: --csv and --data both given: use --data alone\n")
    assert main(["train", "--out", out, "--data", str(data), "--history", "5"]) == 2  # had been ignored
    assert one_line_error(capsys) == "streamer: error: --history describes simulated history: it does not go with --data\n"
    assert main(["train", "--out", out, "--features", str(10**9)]) == 2  # numpy's MemoryError traceback
    assert one_line_error(capsys) == ("streamer: error: simulated history of --devices 200 x --history 1000 x"
                                      " --features 1000000000 values does not fit in memory\n")


def test_replay_refuses_outputs_among_its_inputs_and_names_its_own_flags(model_file: Path, tmp_path: Path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("timestamp,value\n1,1\n")
    replay = ["replay", "--model-path", str(model_file), "--data", str(data)]
    # A new table in the data directory would be read as data by the next replay.
    assert main([*replay, "--out", str(data / "results.csv")]) == 2
    assert "would overwrite the data it reads, or be read as data next time" in one_line_error(capsys)
    # The page among the device plots could take a device's plot's name.
    plots = tmp_path / "plots"
    assert main([*replay, "--out", str(tmp_path / "r.csv"), "--plots", str(plots), "--plots-page",
                 str(plots / "a.png")]) == 2
    assert f"--plots-page {plots / 'a.png'} is in --plots {plots}" in one_line_error(capsys)
    assert main([*replay, "--out", str(tmp_path / "r.csv"), "--batch-size", str(10**14)]) == 2
    assert "batch.max_records (flag --batch-size, env STREAMER_BATCH__MAX_RECORDS)" in one_line_error(capsys)
    assert not (tmp_path / "r.csv").exists() and not plots.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a disk that is always full)")
def test_outputs_that_cannot_be_written_are_one_line_naming_them(model_file: Path, tmp_path: Path, capsys, monkeypatch):
    data = tmp_path / "h.csv"
    data.write_text("device_id,timestamp,value\n" + "".join(f"a,{1_700_000_000 + 60 * t},{t % 7}\n" for t in range(30)))
    replay = ["replay", "--model-path", str(model_file), "--data", str(data), "--no-progress"]
    for suffix in ("csv", "parquet"):
        full = tmp_path / f"full.{suffix}"
        full.symlink_to("/dev/full")
        assert main([*replay, "--out", str(full)]) == 2  # it had ended in OSError's traceback
        assert f"--out {full}: cannot be written (" in one_line_error(capsys)
        plots, full = tmp_path / f"fresh-{suffix}" / "plots", tmp_path / f"full-too.{suffix}"
        full.symlink_to("/dev/full")
        assert main([*replay, "--out", str(full), "--plots", str(plots)]) == 2
        assert f"--out {full}: cannot be written (" in one_line_error(capsys)
        assert not plots.parent.exists()  # the --plots directory it made is removed, as after a failed replay
    page = tmp_path / "page.png"
    page.symlink_to("/dev/full")
    assert main([*replay, "--out", str(tmp_path / "r.csv"), "--plots-page", str(page)]) == 2
    assert f"--plots-page {page}: cannot be written (No space left on device)" in one_line_error(capsys)
    # A model file on a full disk: torch's own writer had said "unexpected pos 2624 vs 2576".
    from streamer.model import ModelConfig, init_random_model, save_model_file

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    config = ModelConfig(1, 4, 1, 1)
    with pytest.raises(StreamerError, match=r"model file .*m.pt: cannot be written \(No space left on device\)"):
        save_model_file(tmp_path / "m.pt", init_random_model(config, seed=0), config, "v")
    assert not list(tmp_path.glob("m.pt*"))
    monkeypatch.undo()
    assert main([*replay, "--out", str(tmp_path / "r.csv"), "--model-path", "/dev/null"]) == 2
    assert "model file /dev/null: not a regular file" in one_line_error(capsys)
    # A model file is written beside its path and renamed over it: a FIFO (or, as root, /dev/null)
    # had been replaced by a regular file.
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    assert main(["train", "--data", str(data), "--out", str(fifo), "--no-progress"]) == 2
    assert f"cannot write model file {fifo}: is not a regular file" in one_line_error(capsys)
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_files_whose_names_are_not_utf8_are_read_and_written(model_file: Path, tmp_path: Path, capsys):
    # Arrow encodes a str path as UTF-8, which Python's escapes of other bytes are not: a traceback.
    rows = "device_id,timestamp,value\n" + "".join(f"a,{1_700_000_000 + 60 * t},{t % 7}\n" for t in range(30))
    data = tmp_path / os.fsdecode(b"h\xff.csv")
    data.write_text(rows)
    for suffix in ("csv", "parquet"):
        out = tmp_path / os.fsdecode(b"out\xfe." + suffix.encode())
        assert main(["replay", "--model-path", str(model_file), "--data", str(data), "--out", str(out),
                     "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["readings"] == 30
        assert main(["replay", "--model-path", str(model_file), "--data", str(out), "--value-columns", "value_value",
                     "--out", str(tmp_path / f"again.{suffix}"), "--no-progress"]) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["readings"] == 30


def test_bounds_that_keep_a_value_from_hanging_or_overflowing_a_client(tmp_path: Path, capsys):
    data = tmp_path / "h.csv"
    data.write_text("device_id,timestamp,value\n" + "".join(f"a,{1_700_000_000 + 60 * t},{t % 7}\n" for t in range(30)))
    # 10^8 layers had hung train building them; 1e12 s had overflowed librdkafka's timeout (it gave up at once).
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--num-layers", str(10**8)]) == 2
    assert "train option num_layers must be at most 64" in one_line_error(capsys)
    assert main(["check-config", "--settings-only", "--kafka-startup-wait-s", "1e12"]) == 2
    assert "kafka.startup_wait_s" in one_line_error(capsys)
    assert main(["check-config", "--settings-only", "--kafka-startup-wait-s", "604800"]) == 0
    # 2**63 had overflowed torch's sizes (its traceback); a model file's config is bounded so.
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--hidden-size", str(2**63)]) == 2
    assert "train option hidden_size must be at most 2147483647" in one_line_error(capsys)


def test_replay_plots_histories_at_the_ends_of_the_years_it_takes(model_file: Path, tmp_path: Path, capsys):
    # matplotlib's dates end at years 1 and 9999: there the axis is in epoch seconds.
    for name, first in (("year1", -62_135_596_800), ("year9999", 253_402_297_199 - 59 * 3600)):
        data = tmp_path / f"{name}.csv"
        data.write_text("timestamp,value\n" + "".join(f"{first + 3600 * t},{t % 7}\n" for t in range(60)))
        assert main(["replay", "--model-path", str(model_file), "--data", str(data), "--out",
                     str(tmp_path / f"{name}-out.csv"), "--plots", str(tmp_path / name), "--plots-page",
                     str(tmp_path / f"{name}.png"), "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["plots"] == 1
        assert (tmp_path / name / f"{name}.png").stat().st_size > 5000 and (tmp_path / f"{name}.png").stat().st_size > 5000


def test_train_and_replay_refuse_to_overwrite_their_data_and_train_bounds_its_batch(model_file: Path, tmp_path: Path,
                                                                                   capsys, monkeypatch):
    data = tmp_path / "history.csv"
    data.write_text("device_id,timestamp,value\n" + "".join(f"a,{1_700_000_000 + 60 * t},{t % 7}\n" for t in range(50)))
    before = data.read_bytes()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "." / "history.csv"), "--epochs", "1",
                 "--no-progress"]) == 2
    assert "would overwrite the data it reads" in one_line_error(capsys)
    assert main(["replay", "--data", str(tmp_path), "--model-path", str(model_file), "--out", str(data)]) == 2
    assert "--out" in one_line_error(capsys) and data.read_bytes() == before
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--batch-size", str(10**7)]) == 2
    assert "train option batch_size must be at most 65536" in one_line_error(capsys)
    # A batch too big for the memory there: one line, whatever the allocator says.
    import streamer.train

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: 1e11 bytes")

    monkeypatch.setattr(streamer.train, "_fit", no_memory)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--window", "8", "--no-progress"]) == 2
    assert "batch_size is too big for the memory of cpu at window 8" in one_line_error(capsys)
    # Epoch milliseconds: one line naming the file and line, not a traceback where the time is printed.
    millis = tmp_path / "ms.csv"
    millis.write_text("device_id,timestamp,value\na,1700000000000,1.0\n")
    for command in (["train", "--out", str(tmp_path / "m.pt")], ["replay", "--model-path", str(model_file),
                                                                   "--out", str(tmp_path / "r.csv")]):
        assert main([*command, "--data", str(millis)]) == 2, command
        assert "ms.csv line 2: timestamp past year 9999" in one_line_error(capsys)


# The main thread spins in stop.wait(0), as run's waits do, while another thread sends SIGTERM:
# the handler runs at whatever bytecode the main thread is at, inside the event's lock at times.
# Set from the handler itself, stop.set() deadlocked in most trials (the process hung for good).
SIGNALLED_WHILE_WAITING = """
import os, random, signal, sys, threading, time
from streamer.cli import stop_on_signals
for trial in range(200):
    stop = threading.Event()
    stop_on_signals(stop)
    killer = threading.Thread(target=lambda: (time.sleep(random.uniform(0, 0.003)), os.kill(os.getpid(), signal.SIGTERM)))
    killer.start()
    while not stop.wait(0):
        pass
    killer.join()
print("stopped every time")
"""


def test_sigterm_sets_stop_without_deadlocking_a_waiting_main_thread():
    try:
        done = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_WAITING], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("a SIGTERM left the waiting main thread deadlocked")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "stopped every time"


# streamer.__main__ holds SIGTERM and SIGINT while Python imports the CLI (a tenth of a second),
# where the system's default had ended `run` with 143: given to main as EarlySignals, here as if
# one had come then.
HELD_THEN = """
import signal, sys, time
from streamer.cli import EarlySignals, main
before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
started = time.monotonic()
code = main(sys.argv[1:], early=EarlySignals(before, [signal.SIGTERM]))
print("took", time.monotonic() - started, file=sys.stderr)
sys.exit(code)
"""


def test_a_sigterm_held_while_the_cli_was_imported_stops_run_before_kafka_and_ends_other_commands(model_file: Path):
    run = subprocess.run([sys.executable, "-c", HELD_THEN, "run", "--model-path", str(model_file),
                          "--kafka-bootstrap-servers", "127.0.0.1:1", "--metrics-enabled", "false",
                          "--checkpoint-enabled", "false"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1])["summary"]["readings"] == 0
    assert "received SIGTERM" in run.stderr and "stopped during start-up, before Kafka was contacted" in run.stderr
    # The brokers at 127.0.0.1:1 would have been waited for kafka.startup_wait_s, 120 s.
    assert float(run.stderr.split("took")[-1]) < 60, run.stderr[-2000:]
    for other in (["check-config", "--settings-only"], ["--version"], ["run", "--no-such-flag"]):
        done = subprocess.run([sys.executable, "-c", HELD_THEN, *other], capture_output=True, text=True, timeout=120)
        assert done.returncode == -signal.SIGTERM, other  # as without the hold: SIGTERM's default, at the latest on exit


def handles(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``signum`` (SigCgt in /proc)."""
    with open(f"/proc/{pid}/status") as status:
        caught = next(int(line.split()[1], 16) for line in status if line.startswith("SigCgt:"))
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads SigCgt in /proc")
def test_sigterm_from_the_moment_the_command_handles_it_exits_0(model_file: Path):
    # The first moment: streamer.__main__'s first lines, before the CLI's imports.
    process = subprocess.Popen([sys.executable, "-m", "streamer", "run", "--model-path", str(model_file),
                                "--kafka-bootstrap-servers", "127.0.0.1:1", "--metrics-enabled", "false",
                                "--checkpoint-enabled", "false"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not handles(process.pid, signal.SIGTERM):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.0005)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err[-2000:]
    assert time.monotonic() - signalled < 30 and json.loads(out.strip().splitlines()[-1])["summary"]["readings"] == 0


def librdkafka_started(pid: int) -> bool:
    """Whether process ``pid`` runs librdkafka's threads (named rdk:main, rdk:broker...)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "comm").read_text().startswith("rdk:"):
                return True
        except OSError:  # the thread ended meanwhile
            pass
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads thread names in /proc")
def test_ctrl_c_ends_simulate_while_it_waits_for_a_broker():
    # librdkafka's bootstrap waits in C, where Python runs no signal handler: Ctrl-C was answered
    # only once the wait for a broker gave up (kafka.startup_wait_s).
    process = subprocess.Popen([sys.executable, "-m", "streamer", "simulate", "--duration", "100", "--kafka-client",
                                "confluent-kafka", "--kafka-bootstrap-servers", "127.0.0.1:1", "--kafka-startup-wait-s",
                                "90"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not librdkafka_started(process.pid):
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.01)
        time.sleep(0.5)  # in the bootstrap's wait
        signalled = time.monotonic()
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130 and time.monotonic() - signalled < 10


# --- values that ended in a traceback: one line each, exit 2 ----------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (["--kafka-startup-wait-s", "inf"], "kafka.startup_wait_s (flag --kafka-startup-wait-s"),
        (["--model-reload-interval-s", "inf"], "model.reload_interval_s"),
        (["--state-capacity", str(10**20)], "state.capacity"),
        (["--anomaly-warmup", str(10**20)], "anomaly.warmup"),
        (["--anomaly-adapt-after", str(2**24 + 1)], "anomaly.adapt_after"),
        (["--model-device", "cuda:128"], "model.device"),
        (["--model-device", "cuda:" + "9" * 20], "model.device"),
        (["--topics-replication-factor", str(2**15)], "topics.replication_factor"),
        (["--topics-partitions", str(2**31)], "topics.partitions"),
    ],
)
def test_values_past_what_can_be_used_are_refused_naming_them(capsys, args, named):
    assert main(["check-config", "--checkpoint-enabled", "false", *args]) == 2
    assert named in one_line_error(capsys)


def test_the_largest_values_allowed_are_taken(capsys):
    assert main(["check-config", "--checkpoint-enabled", "false", "--model-device", "cuda:127", "--anomaly-warmup",
                 str(2**24), "--topics-replication-factor", str(2**15 - 1)]) in (0, 2)
    err = capsys.readouterr().err
    assert "invalid settings" not in err, err  # cuda:127 is absent here: refused later, as a device


def test_a_metrics_host_that_cannot_be_encoded_is_one_line(model_file: Path, capsys):
    assert main(["check-config", "--model-path", str(model_file), "--checkpoint-enabled", "false",
                 "--metrics-host", "\u00e9..x"]) == 2
    assert "metrics.host (flag --metrics-host, env STREAMER_METRICS__HOST)" in one_line_error(capsys)


def test_a_tls_file_no_client_could_use_is_one_line_naming_the_setting(tmp_path: Path):
    # Loaded as the clients load them, before any connection: librdkafka had refused it only as the
    # client was made, kafka-python only at a connection (a TLS failure retried for startup_wait_s).
    garbage = tmp_path / "ca.pem"
    garbage.write_text("not a certificate\n")
    done = run_cli("simulate", "--kafka-bootstrap-servers", "127.0.0.1:1", "--kafka-client", "confluent-kafka",
                   "--kafka-startup-wait-s", "0", "--max-readings", "1", "--kafka-security-protocol", "SSL",
                   "--kafka-ssl-cafile", str(garbage))
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"streamer: error: invalid settings: kafka: kafka.ssl_cafile (flag --kafka-ssl-cafile, env STREAMER_KAFKA__SSL_CAFILE) {garbage} cannot be read as PEM")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make keys")
def test_an_encrypted_key_is_read_with_ssl_password_never_by_a_prompt(tmp_path: Path):
    # Without ssl_password OpenSSL asked for the pass phrase on the terminal (the process stopped
    # there; without a terminal, 14 prompts on stderr), then a TLS failure retried for startup_wait_s.
    openssl = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "2", "-subj", "/CN=streamer-test"]
    subprocess.run([*openssl, "-passout", "pass:right-one", "-keyout", "enc.key", "-out", "cert.pem"], cwd=tmp_path,
                   check=True, capture_output=True, timeout=60)
    subprocess.run([*openssl, "-nodes", "-keyout", "other.key", "-out", "other.pem"], cwd=tmp_path, check=True,
                   capture_output=True, timeout=60)
    common = ["check-config", "--settings-only", "--kafka-bootstrap-servers", "127.0.0.1:1", "--kafka-security-protocol",
              "SSL", "--kafka-ssl-certfile", str(tmp_path / "cert.pem")]
    for extra, said in (
        (["--kafka-ssl-keyfile", str(tmp_path / "enc.key")], "an encrypted key needs kafka.ssl_password (flag --kafka-ssl-password"),
        (["--kafka-ssl-keyfile", str(tmp_path / "enc.key"), "--kafka-ssl-password", "wrong-one"],
         "STREAMER_KAFKA__SSL_PASSWORD) must be its password"),
        (["--kafka-ssl-keyfile", str(tmp_path / "other.key")], "KEY_VALUES_MISMATCH"),
    ):
        done = run_cli(*common, *extra, stdin=subprocess.DEVNULL)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and said in lines[0], done.stderr[-2000:]
        assert "pass phrase" not in done.stderr and "wrong-one" not in done.stderr
    done = run_cli(*common, "--kafka-ssl-keyfile", str(tmp_path / "enc.key"), "--kafka-ssl-password", "right-one")
    assert done.returncode == 0, done.stderr[-2000:]
    # Encrypted with an empty pass phrase: still needs ssl_password (given none, the clients prompt).
    subprocess.run([*openssl, "-passout", "pass:", "-keyout", "empty.key", "-out", "empty.pem"], cwd=tmp_path,
                   capture_output=True, timeout=60)
    if (tmp_path / "empty.key").is_file() and b"ENCRYPTED" in (tmp_path / "empty.key").read_bytes():
        done = run_cli(*common[:-1], str(tmp_path / "empty.pem"), "--kafka-ssl-keyfile", str(tmp_path / "empty.key"),
                       stdin=subprocess.DEVNULL)
        assert done.returncode == 2 and "an encrypted key needs kafka.ssl_password (flag --kafka-ssl-password" in done.stderr, done.stderr[-2000:]
    # The key in the certificate's own file: taken, and librdkafka is told where the key is.
    both = tmp_path / "both.pem"
    both.write_bytes((tmp_path / "other.pem").read_bytes() + (tmp_path / "other.key").read_bytes())
    from streamer.kafka.confluent import security_config
    from streamer.settings import load_settings

    settings = load_settings({"kafka": {"bootstrap_servers": "127.0.0.1:1", "security_protocol": "SSL",
                                        "ssl_certfile": both}})
    assert security_config(settings.kafka)["ssl.key.location"] == str(both)


def test_topics_create_says_what_exists_as_far_as_the_brokers_tell(monkeypatch, capsys):
    # Describing configs refused (kafka-python gives empty configs then): nothing taken to differ.
    # Describing failing outright: one warning line, the topics as created or left.
    import streamer.kafka as streamer_kafka
    import streamer.kafka.clients as clients

    monkeypatch.setattr(streamer_kafka, "ensure_topics", lambda *a, **k: [])
    monkeypatch.setattr(clients, "describe_topics", lambda bootstrap, names, keys, *a, **k: {
        name: clients.TopicState(6, 1, {}) for name in names})
    argv = ["topics", "create", "--kafka-bootstrap-servers", "127.0.0.1:1", "--checkpoint-store", "kafka"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)["topics"]
    assert all(t["configs"] == {} and not any("=" in d for d in t.get("differs", [])) for t in printed), printed
    assert "None" not in captured.err and "None" not in captured.out

    def fails(*args, **kwargs):
        raise clients.KafkaTimeoutError("no answer")

    monkeypatch.setattr(clients, "describe_topics", fails)
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert [t.keys() == {"name", "created"} for t in json.loads(captured.out)["topics"]] == [True] * 4
    assert "could not be described (KafkaTimeoutError" in captured.err


def test_a_password_of_another_type_is_not_shown_in_the_error(tmp_path: Path, capsys):
    config = tmp_path / "s.toml"
    for value in ("987654321", '["hunter2list"]', "987654321.5"):
        config.write_text('[kafka]\nsecurity_protocol = "SASL_PLAINTEXT"\nsasl_mechanism = "PLAIN"\n'
                          f'sasl_username = "u"\nsasl_password = {value}\nssl_password = 123456789\n')
        assert main(["check-config", "--settings-only", "--config", str(config)]) == 2
        error = one_line_error(capsys)
        assert "kafka.sasl_password" in error and "987654321" not in error and "hunter2" not in error, error
        assert "123456789" not in error


def test_topics_create_without_a_broker_is_one_line():
    done = run_cli("topics", "create", "--kafka-bootstrap-servers", "127.0.0.1:1", "--kafka-startup-wait-s", "0")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("streamer: error: Kafka at 127.0.0.1:1") and "(first: " in lines[0]


def test_train_refuses_a_device_it_cannot_use_and_a_model_too_big_to_allocate(tmp_path: Path, capsys):
    common = ["train", "--out", str(tmp_path / "m.pt"), "--devices", "2", "--history", "100", "--epochs", "1",
              "--no-progress"]
    assert main([*common, "--device", "mps"]) == 2
    assert "device" in one_line_error(capsys)
    assert main([*common, "--hidden-size", str(10**12), "--num-layers", "1"]) == 2
    assert "hidden_size" in one_line_error(capsys)


def test_no_other_threads_line_follows_the_runs_last_line():
    """`streamer run` prints its summary last: a thread the run abandoned (a client's bootstrap
    waiting for a broker) logs on until exit, and a line of it had followed the summary when it
    was written just as the run's handler stopped the client libraries (CI, under load)."""
    code = (
        "import logging, sys, threading, time\n"
        "from streamer.cli import RunLogHandler, _setup_logging\n"
        "_setup_logging('INFO')\n"
        "started = threading.Event()\n"
        "def chatter():\n"
        "    while True:\n"
        "        logging.getLogger('kafka.net.manager').warning('Bootstrap bootstrap-0 not ready')\n"
        "        logging.getLogger('streamer.kafka.clients').warning('a line of ours from that thread')\n"
        "        started.set()\n"
        "threading.Thread(target=chatter, daemon=True).start()\n"
        "started.wait()\n"
        "logging.getLogger('streamer').info('the main thread, before')\n"
        "for handler in logging.getLogger().handlers:\n"
        "    if isinstance(handler, RunLogHandler):\n"
        "        handler.main_thread_only()\n"
        "sys.stderr.write('{\"summary\": {}}\\n')\n"
        "time.sleep(0.3)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1] == '{"summary": {}}', lines[-3:]
    assert any("not ready" in line for line in lines) and any("the main thread, before" in line for line in lines)


def test_a_mistyped_flag_of_a_command_points_to_that_commands_help(capsys):
    # Left to the top parser, it had pointed to `streamer --help`, which lists none of run's flags.
    for argv, prog in ((["run", "--kafka-bootstrap-server", "a:1"], "streamer run"),
                       (["simulate", "--state-capacity", "5"], "streamer simulate"),
                       (["topics", "create", "--bogus"], "streamer topics create")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"{prog}: error: unrecognized arguments: {argv[-2] if argv[0] != 'topics' else '--bogus'}")
        assert err.endswith(f"(usage: {prog} --help)\n") and err.count("\n") == 1
    assert main(["check-config", "--settings-only", "--kafka-bootstrap-servers", "[::1]:9092"]) == 0


def test_a_nul_in_a_path_is_a_settings_error_not_a_traceback(tmp_path: Path, model_file: Path, capsys):
    # From TOML's or JSON's \u0000: run's mkdir raised ValueError (a traceback, exit 1), and
    # check-config's Path.exists() took it for absent and passed it.
    config = tmp_path / "nul.toml"
    config.write_text('[checkpoint]\ndirectory = "x\\u0000y"\n')
    for argv in (["check-config", "--config", str(config), "--model-path", str(model_file)],
                 ["run", "--config", str(config), "--model-path", str(model_file), "--kafka-bootstrap-servers",
                  "127.0.0.1:1", "--metrics-enabled", "false"]):
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert "checkpoint.directory (flag --checkpoint-directory, env STREAMER_CHECKPOINT__DIRECTORY)" in err
        assert "a NUL character in a path" in err


def test_a_check_of_several_settings_names_each_with_its_flag_and_variable(monkeypatch, capsys):
    assert main(["check-config", "--settings-only", "--state-capacity", "1"]) == 2
    assert one_line_error(capsys) == (
        "streamer: error: invalid settings: batch.max_records (flag --batch-max-records, env STREAMER_BATCH__MAX_RECORDS)"
        " (4096) exceeds state.capacity (flag --state-capacity, env STREAMER_STATE__CAPACITY) (1): one batch's devices"
        " must fit in the table\n")  # no "settings: settings:"
    # replay names batch.max_records by its own flag.
    assert main(["replay", "--data", "x.csv", "--out", "y.csv", "--state-capacity", "2"]) == 2
    assert "batch.max_records (flag --batch-size, env STREAMER_BATCH__MAX_RECORDS) (4096)" in one_line_error(capsys)
    monkeypatch.setenv("STREAMER_KAFKA__SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("STREAMER_KAFKA__SASL_USERNAME", "u")
    assert main(["check-config", "--settings-only"]) == 2
    err = one_line_error(capsys)
    assert ("kafka: kafka.security_protocol (flag --kafka-security-protocol, env STREAMER_KAFKA__SECURITY_PROTOCOL)"
            " SASL_SSL needs kafka.sasl_mechanism (flag --kafka-sasl-mechanism, env STREAMER_KAFKA__SASL_MECHANISM),"
            " kafka.sasl_password (flag --kafka-sasl-password, env STREAMER_KAFKA__SASL_PASSWORD)") in err
    # Names described already are not described twice.
    assert main(["check-config", "--settings-only", "--kafka-output-topic", "out", "--kafka-dead-letter-topic", "out"]) == 2
    assert one_line_error(capsys).count("(flag --kafka-dead-letter-topic") == 1
