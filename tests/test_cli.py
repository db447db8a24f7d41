"""The CLI as a user meets it: help, bad values and missing files give clear errors, exit != 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from streamer.cli import main


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True, timeout=120, env=env)


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


def test_simulate_and_train_reject_bad_values():
    assert run_cli("simulate", "--devices", "0", "--max-readings", "5").returncode == 2
    result = run_cli("simulate", "--devices", "3")
    assert result.returncode == 2 and "--duration or --max-readings" in result.stderr
    assert run_cli("train").returncode == 2  # --out is required
