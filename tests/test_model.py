from pathlib import Path

import pytest
import torch

from streamer.errors import ModelFileError
from streamer.model import (
    LSTMModel,
    ModelConfig,
    Normalization,
    StepWeights,
    init_random_model,
    load_model_file,
    save_model_file,
)


def test_forward_starts_from_zeros_and_carries_state():
    model = init_random_model(ModelConfig(2, 8, 2, 2), seed=1)
    x = torch.randn(3, 10, 2)
    out_zero, _ = model(x, (torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)))
    out, (h, c) = model(x)
    assert out.shape == (3, 2) and h.shape == (2, 3, 8) and c.shape == (2, 3, 8)
    torch.testing.assert_close(out, out_zero)
    # Passing the final state of the first half in as the initial state of the second half
    # is the same as running the whole sequence.
    _, hidden = model(x[:, :6])
    out_split, _ = model(x[:, 6:], hidden)
    torch.testing.assert_close(out_split, out, atol=1e-6, rtol=0)


def test_step_weights_match_nn_lstm_one_step():
    config = ModelConfig(3, 16, 3, 3)
    model = init_random_model(config, seed=2)
    weights = StepWeights(model, torch.device("cpu"))
    x = torch.randn(5, 3)
    h = torch.randn(5, 3, 16)
    c = torch.randn(5, 3, 16)
    out, h_new, c_new = weights.step(x, h, c)
    ref_out, (ref_h, ref_c) = model(x[:, None, :], (h.transpose(0, 1).contiguous(), c.transpose(0, 1).contiguous()))
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(h_new, ref_h.transpose(0, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(c_new, ref_c.transpose(0, 1), atol=1e-6, rtol=0)


def test_model_file_round_trip(tmp_path: Path):
    config = ModelConfig(2, 8, 1, 2)
    model = init_random_model(config, seed=3)
    norm = Normalization(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0]))
    path = tmp_path / "m.pt"
    save_model_file(path, model, config, "v7", norm)
    bundle = load_model_file(path)
    assert bundle.config == config and bundle.version == "v7"
    torch.testing.assert_close(bundle.normalization.std, norm.std)
    for key, value in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"config": {"input_size": 2}}, "missing keys"),
        ([1, 2, 3], "expected a dict"),
        ({"config": {"input_size": 2, "hidden_size": 0, "num_layers": 1}, "state_dict": {}, "version": "x"}, "hidden_size"),
        ({"config": {"input_size": 2, "hidden_size": 4, "num_layers": 1, "bidirectional": True},
          "state_dict": {}, "version": "x"}, "bidirectional"),
        ({"config": {"input_size": 2, "hidden_size": 4, "num_layers": 1}, "state_dict": {}, "version": "x"},
         "does not match"),
    ],
)
def test_bad_model_files_are_refused_naming_the_file(tmp_path: Path, payload, message):
    path = tmp_path / "bad.pt"
    torch.save(payload, path)
    with pytest.raises(ModelFileError, match=message) as err:
        load_model_file(path)
    assert str(path) in str(err.value)


def good_payload() -> dict:
    config = ModelConfig(2, 8, 2, 2)
    return {"config": config.to_dict(), "state_dict": init_random_model(config).state_dict(), "version": "v"}


def with_(payload: dict, key: str, value: object, inside: str | None = None) -> dict:
    """``payload`` with ``key`` set to ``value`` (in its dict ``inside``, when given)."""
    if inside is None:
        return {**payload, key: value}
    return {**payload, inside: {**payload[inside], key: value}}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: with_(p, 3, torch.zeros(2), "state_dict"), "keys must be parameter names"),
        (lambda p: with_(p, "fc.bias", 3, "state_dict"), "does not match.*expected torch.Tensor"),
        (lambda p: with_(p, "normalization", {"mean": ["a", "b"], "std": [1.0, 1.0]}), "must be numbers"),
        (lambda p: with_(p, "normalization", {"mean": [[1.0], [1.0, 2.0]], "std": [1.0, 1.0]}), "must be numbers"),
        # A config far larger than the file's weights: refused by the shapes, nothing allocated.
        (lambda p: with_(p, "hidden_size", 10**6, "config"), "does not match.*size mismatch"),
        (lambda p: with_(p, "hidden_size", 2**31 - 1, "config"), "too large for torch"),
        # Sizes torch cannot even take as a size (TypeError, OverflowError): one line all the same,
        # the loop serving on (they had ended a running loop at its hot reload).
        (lambda p: with_(p, "hidden_size", 10**12, "config"), r"hidden_size must be an int in 1\.\.2147483647"),
        (lambda p: with_(with_(p, "input_size", 2**70, "config"), "output_size", 2**70, "config"),
         "input_size must be an int in"),
        (lambda p: with_(p, "output_size", 2**70, "config"), "output_size must be an int in"),
        (lambda p: with_(p, "normalization", {"mean": [10**400, 0], "std": [1.0, 1.0]}), "must be numbers"),
        # A subnormal std passes > 0, and its reciprocal is inf: forecasts of 0 and dead letters.
        (lambda p: with_(p, "normalization", {"mean": [0.0, 0.0], "std": [1e-45, 1.0]}), "std must be at least 1.18e-38"),
    ],
)
def test_model_files_of_the_wrong_kinds_inside_are_refused(tmp_path: Path, change, message):
    path = tmp_path / "odd.pt"
    torch.save(change(good_payload()), path)
    with pytest.raises(ModelFileError, match=message) as err:
        load_model_file(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("version, loaded", [
    ("v1\n2026-01-01 streamer ERROR forged", "v1?2026-01-01 streamer ERROR forged"),  # had forged a log line
    ("lstm-h16-l1-device-" + "x" * 240 + ".csv-e3", "lstm-h16-l1-device-" + "x" * 237),  # an older train's
    (5, "5"),
    ("v2", "v2"),
])
def test_a_files_version_is_loaded_as_one_printable_line(tmp_path: Path, version: object, loaded: str):
    path = tmp_path / "m.pt"
    torch.save(with_(good_payload(), "version", version), path)
    assert load_model_file(path).version == loaded


def test_a_version_saved_is_one_printable_line_of_at_most_256_characters(tmp_path: Path):
    config = ModelConfig(2, 8, 2, 2)
    for version in ("v1\nforged", "", "v" * 257):
        with pytest.raises(ValueError, match="model version must be"):
            save_model_file(tmp_path / "m.pt", init_random_model(config), config, version)


def test_bidirectional_state_dict_is_refused(tmp_path: Path):
    lstm = torch.nn.LSTM(2, 4, 1, batch_first=True, bidirectional=True)
    state = {f"lstm.{k}": v for k, v in lstm.state_dict().items()}
    state.update({"fc.weight": torch.zeros(2, 8), "fc.bias": torch.zeros(2)})
    path = tmp_path / "bi.pt"
    torch.save({"config": {"input_size": 2, "hidden_size": 4, "num_layers": 1}, "state_dict": state, "version": "b"}, path)
    with pytest.raises(ModelFileError, match="bidirectional"):
        load_model_file(path)


def test_corrupt_and_missing_files(tmp_path: Path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00not a torch file at all")
    with pytest.raises(ModelFileError, match="cannot be read") as err:
        load_model_file(corrupt)
    assert "corrupt.pt" in str(err.value)
    with pytest.raises(ModelFileError, match="no such file"):
        load_model_file(tmp_path / "absent.pt")


def test_a_model_file_with_a_flipped_bit_in_a_weight_is_refused(tmp_path: Path):
    # torch's zip reader does not check the entries' CRC-32: the file had loaded, one weight wrong.
    import zipfile

    config = ModelConfig(1, 16, 2, 1)
    path = tmp_path / "m.pt"
    save_model_file(path, init_random_model(config, seed=4), config, "v")
    load_model_file(path)
    with zipfile.ZipFile(path) as archive:
        largest = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    # The entry's bytes follow its local header (30 bytes, its name, its extra field).
    name_len, extra_len = int.from_bytes(data[largest.header_offset + 26:largest.header_offset + 28], "little"), \
        int.from_bytes(data[largest.header_offset + 28:largest.header_offset + 30], "little")
    start = largest.header_offset + 30 + name_len + extra_len
    data[start + largest.file_size // 2] ^= 0x40
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    assert torch.load(flipped, weights_only=True)["version"] == "v"  # torch alone takes it
    with pytest.raises(ModelFileError, match=f"flipped.pt.*entry {largest.filename} fails its CRC-32 check"):
        load_model_file(flipped)


def test_pickled_objects_are_not_loaded(tmp_path: Path):
    path = tmp_path / "pickled.pt"
    torch.save({"config": {"input_size": 1, "hidden_size": 2, "num_layers": 1}, "state_dict": LSTMModel(1, 2, 1),
                "version": "p"}, path)
    with pytest.raises(ModelFileError, match="cannot be read"):
        load_model_file(path)


def test_a_plain_pickle_is_refused_in_the_error_alone(tmp_path: Path):
    # torch.load had warned first (pickle protocol 4, 2 lines on stderr), then the one-line refusal.
    import pickle
    import warnings

    path = tmp_path / "plain.pt"
    path.write_bytes(pickle.dumps({"config": 1}, protocol=4))
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ModelFileError, match="cannot be read"):
        warnings.simplefilter("always")
        load_model_file(path)
    assert caught == []
