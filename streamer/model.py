"""The LSTM: the offline form (LSTMModel) and the single-step form the engine runs.

LSTMModel is the reference: nn.LSTM(batch_first=True) + a Linear head on the last step,
``forward(x, hidden=None) -> (out, (h, c))`` starting from zeros when hidden is None.

StepWeights is the same model laid out for streaming: per layer one (in + H, 4H) matrix over
cat([x, h]) and one fused bias, so advancing B devices by one reading costs one addmm per layer
plus the gate nonlinearities (nn.LSTM with seq_len=1 is several times slower for this).
"""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from streamer.errors import ModelFileError, not_a_file
from streamer.features import check_time_features

MODEL_FILE_KEYS = ("config", "state_dict", "version")

# Layers a model may have: each is a step of its own per reading; 10^8 had hung `train` building them.
MAX_LAYERS = 64
# A model's version is logged, published with every prediction and shown in metrics: one line.
MAX_VERSION_LENGTH = 256

# Sizes a config may give (input, hidden, output): torch's sizes are int64, and a model this large
# is refused long before by the weights the file holds; past it torch raises what no check expects.
MAX_SIZE = 2**31 - 1


def one_line_version(version: object) -> str:
    """A loaded file's version as it is logged and published: its text with each character that
    is not printable (a line break would forge a log line) as "?", cut to MAX_VERSION_LENGTH.
    Not refused: `train` had made longer versions of a data file's name, and they load still."""
    text = "".join(c if c.isprintable() else "?" for c in str(version))
    return text[:MAX_VERSION_LENGTH]


def version_problem(version: object) -> str | None:
    """Why ``version`` cannot be a model's version, or None: non-empty printable text (no line
    break or other control character, which would forge log lines) of at most MAX_VERSION_LENGTH
    characters."""
    if not isinstance(version, str) or not version:
        return f"must be non-empty text, got {version!r}"[:120]
    if len(version) > MAX_VERSION_LENGTH:
        return f"must be at most {MAX_VERSION_LENGTH} characters, got {len(version)}"
    if not version.isprintable():
        return f"must be printable text (no line breaks or control characters), got {version[:64]!r}"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """The LSTM's shape and what it reads.

    output_size: values per reading (the forecast predicts the next reading's values);
    input_size: output_size + 2 * len(time_features) (sine and cosine per period, see
    streamer.features); device_norm_alpha: running per-device normalisation of the values with
    this weight (None: the file's fixed ``normalization``, or none).
    """

    input_size: int
    hidden_size: int
    num_layers: int
    output_size: int
    time_features: tuple[str, ...] = ()
    device_norm_alpha: float | None = None

    def __post_init__(self) -> None:
        expected = self.output_size + 2 * len(self.time_features)
        if self.input_size != expected:
            raise ValueError(
                f"input_size {self.input_size} != output_size {self.output_size} + 2 x "
                f"{len(self.time_features)} time features"
            )
        if self.device_norm_alpha is not None and not 0 < self.device_norm_alpha <= 1:
            raise ValueError(f"device_norm_alpha must be in (0, 1], got {self.device_norm_alpha}")

    @property
    def values_size(self) -> int:
        """Values per reading."""
        return self.output_size

    @classmethod
    def from_dict(cls, raw: object, path: object) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ModelFileError(path, f"'config' must be a dict, got {type(raw).__name__}")
        if raw.get("bidirectional"):
            raise ModelFileError(path, "bidirectional LSTMs cannot stream (they need future readings)")
        values = {}
        for name in ("input_size", "hidden_size", "num_layers"):
            if not isinstance(raw.get(name), int) or isinstance(raw[name], bool) or not 1 <= raw[name] <= MAX_SIZE:
                raise ModelFileError(path, f"config.{name} must be an int in 1..{MAX_SIZE}, got {raw.get(name)!r}")
            values[name] = raw[name]
        if values["num_layers"] > MAX_LAYERS:
            raise ModelFileError(path, f"config.num_layers must be at most {MAX_LAYERS}, got {values['num_layers']}")
        try:
            time_names = check_time_features(raw.get("time_features") or ())
        except (TypeError, ValueError) as exc:
            raise ModelFileError(path, f"config.time_features: {exc}") from None
        output_size = raw.get("output_size", values["input_size"] - 2 * len(time_names))
        if not isinstance(output_size, int) or isinstance(output_size, bool) or not 1 <= output_size <= MAX_SIZE:
            raise ModelFileError(path, f"config.output_size must be an int in 1..{MAX_SIZE}, got {output_size!r}")
        alpha = raw.get("device_norm_alpha")
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float)):
            raise ModelFileError(path, f"config.device_norm_alpha must be a number, got {alpha!r}")
        try:
            return cls(output_size=output_size, time_features=time_names, device_norm_alpha=alpha, **values)
        except ValueError as exc:
            raise ModelFileError(path, f"config: {exc}") from None

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "output_size": self.output_size,
        }
        if self.time_features:
            out["time_features"] = list(self.time_features)
        if self.device_norm_alpha is not None:
            out["device_norm_alpha"] = self.device_norm_alpha
        return out


class LSTMModel(nn.Module):
    """nn.LSTM + Linear head on the last step. x: (B, T, input_size) -> out: (B, output_size)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, output_size: int | None = None):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, output_size or input_size)

    @classmethod
    def from_config(cls, config: ModelConfig) -> "LSTMModel":
        return cls(config.input_size, config.hidden_size, config.num_layers, config.output_size)

    def forward(
        self, x: Tensor, hidden: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """hidden: (h, c), each (num_layers, B, hidden_size); zeros when None."""
        seq, (h, c) = self.lstm(x, hidden)
        return self.fc(seq[:, -1, :]), (h, c)


@dataclass(frozen=True)
class Normalization:
    """Per-feature affine map applied to inputs (x - mean) / std and undone on forecasts."""

    mean: Tensor  # (input_size,)
    std: Tensor  # (input_size,)


@dataclass(frozen=True)
class ModelBundle:
    """A loaded model file. meta: what training recorded (data range, losses, settings)."""

    model: LSTMModel
    config: ModelConfig
    version: str
    normalization: Normalization | None
    path: Path | None = None
    meta: dict = field(default_factory=dict)
    signature: tuple[int, ...] | None = None  # the file's file_signature before it was read


def save_model_file(
    path: str | Path,
    model: LSTMModel,
    config: ModelConfig,
    version: str,
    normalization: Normalization | None = None,
    meta: dict | None = None,
) -> None:
    """Write the model file contract: {config, state_dict, version[, normalization][, meta]}.

    meta: plain JSON-like values only (str, numbers, bools, lists, dicts), so that the file
    still loads with weights_only=True."""
    problem = version_problem(version)
    if problem is not None:
        raise ValueError(f"model version {problem}")
    payload: dict[str, object] = {
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "version": version,
    }
    if normalization is not None:
        payload["normalization"] = {
            "mean": normalization.mean.detach().cpu().float(),
            "std": normalization.std.detach().cpu().float(),
        }
    if meta:
        payload["meta"] = meta
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # in memory first: torch's own writer reports a full disk as "unexpected pos"
    try:
        tmp.write_bytes(buffer.getbuffer())
        tmp.replace(path)
    except OSError as exc:  # a full disk, a read-only directory: one line, not a traceback
        tmp.unlink(missing_ok=True)
        raise ModelFileError(path, f"cannot be written ({exc.strerror or exc})") from None


def file_signature(path: Path) -> tuple[int, ...] | None:
    """What tells one version of a file from the next: mtime, size, inode and ctime (a file renamed
    into place, or rewritten with its old mtime restored, changes the last two); None if absent."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns


def load_model_file(path: str | Path) -> ModelBundle:
    """Load and check a model file; every failure is a ModelFileError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, not_a_file(path))
    signature = file_signature(path)  # before it is read: a change while it is read shows later
    try:
        return _load_model_file(path, signature)
    except (ModelFileError, MemoryError):
        raise
    except Exception as exc:  # a value no check foresaw: still one line naming the file, not the caller's end
        raise ModelFileError(path, f"cannot be used ({type(exc).__name__}: {exc})") from None


def _damaged_entry(path: Path) -> str | None:
    """The first entry of a zip-format torch file whose CRC-32 does not match its bytes, else None.
    torch's reader does not check them: a model file with a flipped bit in a weight had loaded,
    shapes and values plausible, and served wrong forecasts (a hot reload took it over at once)."""
    try:
        if not zipfile.is_zipfile(path):
            return None  # not a zip: torch.load says what it is
        with zipfile.ZipFile(path) as archive:
            return archive.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError):
        return None  # a structure torch.load will refuse with its own reason


def _load_model_file(path: Path, signature: tuple[int, ...] | None) -> ModelBundle:
    damaged = _damaged_entry(path)
    if damaged is not None:
        raise ModelFileError(path, f"entry {damaged} fails its CRC-32 check: the file is damaged")
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning: the refusal below says it
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        # Not chained, and without torch's advice to load with weights_only=False: that would
        # run whatever code the file holds, which a model file never needs.
        raise ModelFileError(path, f"cannot be read as a torch file of tensors ({_torch_load_reason(exc)})") from None
    if not isinstance(raw, dict):
        raise ModelFileError(path, f"expected a dict with {MODEL_FILE_KEYS}, got {type(raw).__name__}")
    missing = [k for k in MODEL_FILE_KEYS if k not in raw]
    if missing:
        raise ModelFileError(path, f"missing keys {missing}")
    config = ModelConfig.from_dict(raw["config"], path)
    state_dict = raw["state_dict"]
    if not isinstance(state_dict, dict):
        raise ModelFileError(path, "'state_dict' must be a dict of tensors")
    if not all(isinstance(key, str) for key in state_dict):
        raise ModelFileError(path, "'state_dict' keys must be parameter names (str)")
    if any("reverse" in key for key in state_dict):
        raise ModelFileError(path, "bidirectional LSTMs cannot stream (they need future readings)")
    model = _model_with(config, state_dict, path)
    broken = [name for name, tensor in model.state_dict().items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise ModelFileError(path, f"non-finite weights (NaN or inf) in {', '.join(broken[:3])}"
                                   f"{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}")
    model.eval()
    normalization = _load_normalization(raw.get("normalization"), config, path)
    if normalization is not None and config.device_norm_alpha is not None:
        raise ModelFileError(path, "has both a fixed 'normalization' and config.device_norm_alpha; pick one")
    meta = raw.get("meta") or {}
    if not isinstance(meta, dict):
        raise ModelFileError(path, f"'meta' must be a dict, got {type(meta).__name__}")
    return ModelBundle(model, config, one_line_version(raw["version"]), normalization, path, meta, signature)


def _model_with(config: ModelConfig, state_dict: dict, path: Path) -> LSTMModel:
    """The model of ``config`` holding ``state_dict``'s weights. The weights are held to the
    config's shapes on torch's meta device first, which allocates nothing: a config that claims
    a model far larger than the file's tensors is refused by the mismatch, not by the allocator."""
    try:
        with torch.device("meta"):
            shapes = LSTMModel.from_config(config)
    except (RuntimeError, TypeError, OverflowError, ValueError) as exc:  # sizes past what a tensor can have
        raise ModelFileError(path, f"config {config.to_dict()} is too large for torch: {exc}") from None
    try:
        shapes.load_state_dict(state_dict, strict=True, assign=True)  # checks, copies nothing
        model = LSTMModel.from_config(config)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, MemoryError) as exc:
        if allocation_failed(exc):
            raise ModelFileError(path, f"config {config.to_dict()} needs more memory than there is") from None
        # torch lists every mismatch on a line of its own: the first, and how many more.
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc).strip()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelFileError(path, f"state_dict does not match config {config.to_dict()}: {problems[0]}{more}") from None
    return model


def _torch_load_reason(exc: Exception) -> str:
    """torch.load's failure in one line: the unpickler's own reason, not the advice around it."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
        # Cut the allow-listing advice ("Please use `torch.serialization.add_safe_globals` ...").
        text = text.split("Please use", 1)[0].split("Check the documentation", 1)[0]
    reason = " ".join(text.split()).rstrip(". ")
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _load_normalization(raw: object, config: ModelConfig, path: Path) -> Normalization | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or "mean" not in raw or "std" not in raw:
        raise ModelFileError(path, "'normalization' must be a dict with 'mean' and 'std'")
    try:
        mean = torch.as_tensor(raw["mean"], dtype=torch.float32).flatten()
        std = torch.as_tensor(raw["std"], dtype=torch.float32).flatten()
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ModelFileError(path, f"normalization 'mean' and 'std' must be numbers ({exc})") from None
    for name, t in (("mean", mean), ("std", std)):
        if t.numel() != config.values_size:
            raise ModelFileError(path, f"normalization.{name} has {t.numel()} values, readings have {config.values_size}")
        if not torch.isfinite(t).all():
            raise ModelFileError(path, f"normalization.{name} has non-finite values")
    if (std < torch.finfo(torch.float32).tiny).any():  # a subnormal std's reciprocal is inf
        raise ModelFileError(path, f"normalization.std must be at least {torch.finfo(torch.float32).tiny:.3g}"
                                   " (float32's smallest normal number)")
    return Normalization(mean, std)


class StepWeights:
    """LSTMModel's weights laid out for one step over a batch of devices, on one torch device.

    Per layer l: w[l] is (in_l + H, 4H) = cat([W_ih, W_hh], 1).T, b[l] = b_ih + b_hh, gates in
    PyTorch's order (i, f, g, o). The head maps the top layer's h to the output.
    """

    def __init__(self, model: LSTMModel, device: torch.device, dtype: torch.dtype = torch.float32):
        lstm = model.lstm
        if lstm.bidirectional:
            raise ModelFileError(None, "bidirectional LSTMs cannot stream")
        if lstm.proj_size:
            raise ModelFileError(None, "LSTMs with proj_size are not supported")
        self.num_layers = lstm.num_layers
        self.hidden_size = lstm.hidden_size
        self.w: list[Tensor] = []
        self.b: list[Tensor] = []
        with torch.no_grad():
            for layer in range(lstm.num_layers):
                w_ih = getattr(lstm, f"weight_ih_l{layer}")
                w_hh = getattr(lstm, f"weight_hh_l{layer}")
                bias = torch.zeros(4 * lstm.hidden_size)
                if lstm.bias:
                    bias = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                self.w.append(torch.cat([w_ih, w_hh], dim=1).t().contiguous().to(device, dtype))
                self.b.append(bias.contiguous().to(device, dtype))
            self.head_w = model.fc.weight.t().contiguous().to(device, dtype)
            self.head_b = model.fc.bias.contiguous().to(device, dtype)

    def step(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Advance B devices by one reading.

        x: (B, input_size); h, c: (B, num_layers, H), read only.
        Returns (out (B, output_size), h' (B, num_layers, H), c' (B, num_layers, H)).
        """
        hs, cs = [], []
        inp = x
        for layer in range(self.num_layers):
            gates = torch.addmm(self.b[layer], torch.cat([inp, h[:, layer]], dim=1), self.w[layer])
            i, f, g, o = gates.chunk(4, dim=1)
            c_new = torch.sigmoid(f) * c[:, layer] + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            hs.append(h_new)
            cs.append(c_new)
            inp = h_new
        out = torch.addmm(self.head_b, inp, self.head_w)
        return out, torch.stack(hs, dim=1), torch.stack(cs, dim=1)


def allocation_failed(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: MemoryError, torch's OutOfMemoryError (CUDA) or the
    RuntimeError torch's CPU allocator raises, which names the allocation."""
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(exc, RuntimeError) and "alloc" in str(exc).lower())


def init_random_model(config: ModelConfig, seed: int = 0) -> LSTMModel:
    """A model with PyTorch's default init from a fixed seed (tests, benchmarks)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LSTMModel.from_config(config)
    finally:
        torch.random.set_rng_state(gen_state)
    model.eval()
    return model


