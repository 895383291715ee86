"""Structured configs: typed dataclasses, loaded from YAML with OmegaConf dot-list overrides.

    cfg = load_config("configs/mqar_gdn_mom.yaml", ["train.steps=200", "model.mixer.rule=gla"])

Every field has a type, a default and a one-line doc. A bad file raises `ConfigError` with one line
that names the key (`model.mixer.topk: 5 > model.mixer.num_memories = 4`); the CLI prints it
without a traceback and exits with status 2.
"""
from __future__ import annotations

import difflib
import os
import sysconfig
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

MIXER_TYPES = ("rule", "mom", "attention")
DATA_KINDS = ("mqar", "text")
PRECISIONS = ("auto", "fp32", "bf16")
LOSS_POSITIONS = ("all", "labelled")
PARALLEL = ("none", "ddp", "fsdp")
VARIANTS = ("single", "mom", "single_same_state", "single_active_state")
SELECTIONS = ("mean", "two_stage")
# keys a sweep sets itself (ablate.seeds / ablate.lrs / per cell), so `ablate.grid` may not
SWEEP_OWNED = ("name", "train.seed", "data.seed", "train.lr", "train.out_dir", "model.mixer.rule", "model.mixer.type")


class ConfigError(ValueError):
    """A user error in a config file or override: one line that names the key."""


# --------------------------------------------------------------------------- model
@dataclass
class MixerConfig:
    """The token mixer of a block."""

    type: str = "rule"                 # "rule" (one memory), "mom" (Mixture-of-Memories over the rule) or "attention"
    rule: str = "gated_deltanet"       # update rule, a name from lsm.rules.names()
    num_heads: int = 2                 # heads of the mixer
    head_dim: Optional[int] = None     # key dim per head; None = hidden_size / num_heads
    value_dim: Optional[int] = None    # value dim per head; None = head_dim
    conv_size: int = 4                 # short causal convolution width on q/k/v
    use_short_conv: bool = True        # short convolution before the rule
    use_output_gate: bool = True       # gated output norm
    chunk_size: int = 64               # chunk length of the chunked form
    backend: str = "auto"              # "auto", "torch", "triton" or "fla"
    rule_options: dict[str, Any] = field(default_factory=dict)  # extra keyword options of the rule
    # Mixture-of-Memories (type: mom)
    num_memories: int = 4              # memories a token can be routed to
    topk: int = 2                      # memories each token updates and reads
    shared_memory: bool = True         # an always-on memory every token updates
    aux_loss_weight: float = 0.01      # weight of the load-balancing loss
    router_conv: int = 0               # > 1: the router reads a causal depthwise conv of x over this many tokens; 0 = x_t
    router_temperature: float = 1.0    # router scores are softmax(logits / temperature)
    router_init_std: Optional[float] = None  # std of the router's init; None = model.init_std
    readout: str = "sum"               # "sum": memories' reads summed before the output projection; "per_memory":
                                       # each read normed, gated and projected through its own slice of it
    # softmax attention (type: attention, and the attention layers of hybrids)
    rope_theta: float = 10000.0        # RoPE base


@dataclass
class ModelConfig:
    """embedding -> num_layers x (pre-norm mixer + pre-norm SwiGLU MLP) -> RMSNorm -> head."""

    vocab_size: Optional[int] = None   # None = taken from the data (MQAR vocab, 256 for bytes)
    hidden_size: int = 64              # model width
    num_layers: int = 2                # blocks
    mixer: MixerConfig = field(default_factory=MixerConfig)
    attention_every: int = 0           # hybrids: every n-th block (n-1, 2n-1, ...) is softmax attention; 0 = none
    attention_layers: list[int] = field(default_factory=list)  # hybrids: explicit attention block indices
    mlp_ratio: float = 4.0             # SwiGLU hidden size = mlp_ratio * hidden_size * 2/3 (rounded up to 8); 0 = no MLP
    norm_eps: float = 1e-5             # RMSNorm epsilon
    tie_embeddings: bool = True        # share the embedding and the output head
    init_std: Optional[float] = 0.02   # std of the normal init of linear and embedding weights; None = PyTorch's defaults


# --------------------------------------------------------------------------- data
@dataclass
class MQARConfig:
    """Multi-query associative recall (Zoology): key-value pairs, then the keys again as queries."""

    vocab_size: int = 256              # keys are drawn from [1, V/2), values from [V/2, V); 0 is the filler
    seq_len: int = 64                  # training sequence length (input tokens)
    train_pairs: list[int] = field(default_factory=lambda: [4, 8, 16])  # each example draws its number of pairs from this list
    test_pairs: list[int] = field(default_factory=lambda: [4, 8, 16])   # evaluation sweep over the number of pairs
    test_seq_lens: list[int] = field(default_factory=list)  # evaluation sweep over lengths; empty = [seq_len]
    # (seq_len, pairs) cells, each [seq_len, pairs]; when given they replace the keys above
    train_cells: list[list[int]] = field(default_factory=list)  # each example draws a cell; shorter ones are right-padded
    test_cells: list[list[int]] = field(default_factory=list)   # the evaluation sweep, cell by cell
    num_test: int = 256                # test examples per (pairs, length) cell
    num_val: int = 128                 # validation examples per cell (own stream; early stopping and LR selection use it)
    power_a: float = 0.01              # query positions follow a power law in the gap to their key (Zoology's alpha)


@dataclass
class TextConfig:
    """Byte-level language modelling on local files (no download)."""

    path: Optional[str] = None         # a file or a folder; None = the Python standard library's source
    glob: str = "**/*.py"              # files taken from a folder
    seq_len: int = 256                 # bytes per training sequence
    max_bytes: int = 4_000_000         # read at most this many bytes
    test_fraction: float = 0.02        # the last fraction of the bytes is the test split
    val_fraction: float = 0.01         # the fraction before the test split is the validation split


@dataclass
class DataConfig:
    kind: str = "mqar"                 # "mqar" or "text"
    seed: int = 0                      # data seed (train, validation and test streams are derived from it)
    mqar: MQARConfig = field(default_factory=MQARConfig)
    text: TextConfig = field(default_factory=TextConfig)


# --------------------------------------------------------------------------- training / eval
@dataclass
class TrainConfig:
    steps: int = 500                   # optimizer steps
    batch_size: int = 64               # sequences per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    lr: float = 3e-3                   # peak learning rate
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 50             # linear warm-up steps
    weight_decay: float = 0.1          # AdamW decoupled weight decay (not on norms, biases, embeddings, gates)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    grad_clip: float = 1.0             # max global grad norm; 0 = off
    seed: int = 0                      # parameter init seed
    device: str = "auto"               # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    parallel: str = "none"             # "none", "ddp" or "fsdp" (launch with torchrun; batch_size is the global micro-batch)
    precision: str = "auto"            # "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32" or "bf16"
    threads: int = 0                   # CPU threads for torch; 0 = torch's default (small models on busy CPUs: 1)
    out_dir: str = "runs/${name}"      # metrics, checkpoints and the resolved config go here
    log_every: int = 10                # metrics JSONL line every n steps
    eval_every: int = 0                # evaluate on the validation stream every n steps; 0 = at the end only
    target_accuracy: float = 0.0       # MQAR: stop once validation accuracy reaches this (checked every eval_every); 0 = off
    ckpt_every: int = 0                # checkpoint every n steps; 0 = at the end only
    keep_checkpoints: int = 2          # keep the newest n checkpoints
    progress: bool = True              # tqdm progress bar
    tensorboard: bool = True           # also log to TensorBoard when it is installed
    peak_tflops: float = 0.0           # device peak TFLOP/s for MFU; 0 = from lsm.console's table by GPU name
    loss_positions: str = "all"        # "all", or "labelled": the output head runs at the labelled positions only (MQAR's
                                       # queries: the same loss, the head's cost / (seq_len / pairs)); lsm.step
    cuda_graph: bool = False           # CUDA: replay the whole training step as one CUDA graph (lsm.step; one process,
                                       # grad_accum 1, one batch shape); ignored on CPU


@dataclass
class EvalConfig:
    batch_size: int = 128              # sequences per evaluation batch
    text_batches: int = 16             # text: evaluation batches (bits per byte over batch_size * text_batches windows)


@dataclass
class AblateConfig:
    """`lsm ablate`: rules x variants x grid x learning rates x seeds, each cell trained and evaluated."""

    rules: list[str] = field(default_factory=lambda: ["gated_deltanet"])
    variants: list[str] = field(default_factory=lambda: ["single", "mom"])  # lsm.config.VARIANTS
    seeds: list[int] = field(default_factory=lambda: [0])   # a run's seed sets train.seed and data.seed
    lrs: list[float] = field(default_factory=list)          # learning-rate grid; empty = [train.lr]
    grid: dict[str, list[Any]] = field(default_factory=dict)  # any config key -> values, e.g. {model.mixer.topk: [1, 2]}
    selection: str = "mean"            # best LR by validation mean over all seeds, or "two_stage" (LR grid at seeds[0])
    jobs: int = 1                      # worker processes running cells side by side (CPU: train.threads or 1 thread each)
    streams: int = 1                   # cells of one group (rule, variant, grid point) a worker trains at once, each in a
                                       # thread on a CUDA stream of its own: their kernels can overlap on the GPU, where
                                       # processes only take turns (lsm.ablate._run_cells)
    devices: list[str] = field(default_factory=list)        # devices handed round the workers; empty = train.device
    out_dir: str = "runs/${name}"      # runs.csv, results.{md,csv}, plots, and one run folder per cell in cells/


@dataclass
class Config:
    name: str = "run"                  # run name, used in output paths
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)


# --------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML file (or the defaults when `path` is None), apply dot-list overrides, validate.

    Returns a `Config` dataclass with every interpolation resolved. Raises `ConfigError`.
    """
    layers = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as e:  # YAML syntax errors come from several libraries
            raise ConfigError(f"{p}: not valid YAML: {first_line(e)}") from None
        if not isinstance(layers[0], DictConfig):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, train, ...)")
    if overrides:
        layers.append(parse_overrides(overrides))
    return from_dict(OmegaConf.merge(*layers) if layers else {})


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """OmegaConf dot-list overrides (`train.steps=200`) as a config to merge; a malformed one is a `ConfigError`."""
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like key=value (e.g. train.steps=200)")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except Exception as e:  # OmegaConf's own errors and YAML syntax errors of a value
        raise ConfigError(f"bad override: {first_line(e)}") from None


def from_dict(data: Any) -> Config:
    """Validate a plain/OmegaConf mapping against `Config` and return the resolved dataclass."""
    user = data if isinstance(data, DictConfig) else OmegaConf.create(data or {})
    raw = OmegaConf.to_container(user, resolve=False)
    _check_keys(raw, Config, "")
    grid = (raw.get("ablate") or {}).get("grid") if isinstance(raw.get("ablate"), dict) else None
    if isinstance(grid, dict):  # `ablate.grid.model.mixer.topk=[1,2]` on the command line nests; the grid is flat
        raw["ablate"]["grid"] = _flatten(grid)
        user = OmegaConf.create(raw)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), user)
        OmegaConf.resolve(merged)
        cfg: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e)) from None
    validate(cfg)
    return cfg


def to_yaml(cfg: Config, without: tuple[str, ...] = ()) -> str:
    """The resolved config as YAML (what checkpoints store); `without`: top-level sections left out."""
    if not without:
        return OmegaConf.to_yaml(OmegaConf.structured(cfg))
    data = OmegaConf.to_container(OmegaConf.structured(cfg))
    return OmegaConf.to_yaml({k: v for k, v in data.items() if k not in without})


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted keys replaced, e.g. {"model.mixer.type": "mom"}; validated."""
    base = OmegaConf.structured(cfg)
    for key, value in overrides.items():
        OmegaConf.update(base, key, value, merge=False)
    return from_dict(OmegaConf.to_container(base))


def first_line(e: BaseException) -> str:
    """An exception's first line (library errors can span many lines), else its type's name."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = first_line(e)
    if "could not be converted to" in msg or "Value '" in msg:
        msg = "wrong type: " + msg
    return f"{key}: {msg}" if key else msg


def _check_keys(node: Any, schema: type, prefix: str) -> None:
    """Unknown keys, with the nearest valid one, and mappings where a value is expected (and back)."""
    if not isinstance(node, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(node).__name__} {node!r}")
    valid = {f.name: f for f in fields(schema)}
    for key, value in node.items():
        full = f"{prefix}{key}"
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown key {full}{hint} (valid keys: {', '.join(valid)})")
        sub = _dataclass_type(valid[key])
        if sub is not None:
            _check_keys(value, sub, full + ".")


def _flatten(node: dict, prefix: str = "") -> dict:
    """{"model": {"mixer": {"topk": [1, 2]}}} -> {"model.mixer.topk": [1, 2]}."""
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_key(key: str, where: str) -> None:
    """`key` (dotted, e.g. model.mixer.topk) names a setting of `Config`; else `ConfigError` with the nearest one."""
    schema, prefix = Config, ""
    parts = key.split(".")
    for i, part in enumerate(parts):
        valid = {f.name: f for f in fields(schema)}
        if part not in valid:
            close = difflib.get_close_matches(part, list(valid), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key}{hint} (valid keys under {prefix.rstrip('.') or 'the top level'}: "
                              f"{', '.join(valid)})")
        sub = _dataclass_type(valid[part])
        if sub is None:
            if i != len(parts) - 1:
                raise ConfigError(f"{where}: {prefix}{part} is a setting, not a section (in {key})")
            return
        schema, prefix = sub, f"{prefix}{part}."
    raise ConfigError(f"{where}: {key} is a section; name one of its settings ({', '.join(f.name for f in fields(schema))})")


def _dataclass_type(f) -> type | None:
    if f.default_factory is not MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
        return type(default) if is_dataclass(default) else None
    return None


# --------------------------------------------------------------------------- validation
def validate(cfg: Config) -> None:
    """Cross-field checks that types alone cannot express. Raises `ConfigError` naming the key."""
    from lsm import rules

    m, mx, d, t = cfg.model, cfg.model.mixer, cfg.data, cfg.train
    _choice("model.mixer.type", mx.type, MIXER_TYPES)
    uses_rule = mx.type != "attention"
    if uses_rule:
        try:
            rule = rules.get(mx.rule)
        except rules.UnknownRuleError as e:
            raise ConfigError(f"model.mixer.rule: {e}") from None
        unknown = set(mx.rule_options) - set(rule.options)
        if unknown:
            raise ConfigError(f"model.mixer.rule_options: {mx.rule!r} has no option {sorted(unknown)[0]!r}; "
                              f"it takes {sorted(rule.options) or 'none'}")
    from lsm.rules import BACKENDS
    _choice("model.mixer.backend", mx.backend, BACKENDS)
    for key, value in (("model.hidden_size", m.hidden_size), ("model.num_layers", m.num_layers),
                       ("model.mixer.num_heads", mx.num_heads), ("model.mixer.chunk_size", mx.chunk_size)):
        _positive(key, value)
    if m.vocab_size is not None:
        _positive("model.vocab_size", m.vocab_size)
    if mx.head_dim is None and m.hidden_size % mx.num_heads:
        raise ConfigError(f"model.mixer.num_heads: {mx.num_heads} heads do not divide model.hidden_size = {m.hidden_size} "
                          f"(set model.mixer.head_dim, or pick num_heads from {_divisors(m.hidden_size)})")
    if mx.head_dim is not None:
        _positive("model.mixer.head_dim", mx.head_dim)
    if mx.value_dim is not None:
        _positive("model.mixer.value_dim", mx.value_dim)
    if mx.use_short_conv:
        _positive("model.mixer.conv_size", mx.conv_size)
    if mx.type == "mom":
        _positive("model.mixer.num_memories", mx.num_memories)
        _positive("model.mixer.topk", mx.topk)
        if mx.topk > mx.num_memories:
            raise ConfigError(f"model.mixer.topk: {mx.topk} > model.mixer.num_memories = {mx.num_memories} "
                              f"(a token is routed to at most num_memories memories)")
        if mx.aux_loss_weight < 0:
            raise ConfigError(f"model.mixer.aux_loss_weight: must be >= 0, got {mx.aux_loss_weight}")
        if mx.router_conv < 0:
            raise ConfigError(f"model.mixer.router_conv: must be >= 0 (0 or 1 = the router reads x_t alone), "
                              f"got {mx.router_conv}")
        _positive("model.mixer.router_temperature", mx.router_temperature)
        _choice("model.mixer.readout", mx.readout, ("sum", "per_memory"))
        if mx.router_init_std is not None and mx.router_init_std < 0:
            raise ConfigError(f"model.mixer.router_init_std: must be >= 0 (None = model.init_std), got {mx.router_init_std}")
    if m.attention_every < 0:
        raise ConfigError(f"model.attention_every: must be >= 0 (0 = no attention blocks), got {m.attention_every}")
    for i in m.attention_layers:
        if not 0 <= i < m.num_layers:
            raise ConfigError(f"model.attention_layers: block index {i} is outside [0, {m.num_layers - 1}]")
    if mx.type == "attention" or m.attention_every or m.attention_layers:
        if m.hidden_size % mx.num_heads:
            raise ConfigError(f"model.mixer.num_heads: attention needs num_heads dividing model.hidden_size = {m.hidden_size}, "
                              f"got {mx.num_heads} (pick from {_divisors(m.hidden_size)})")
        if (m.hidden_size // mx.num_heads) % 2:
            raise ConfigError(f"model.mixer.num_heads: attention head size {m.hidden_size // mx.num_heads} must be even for RoPE")
    if m.mlp_ratio < 0:
        raise ConfigError(f"model.mlp_ratio: must be >= 0 (0 = mixer-only blocks), got {m.mlp_ratio}")
    _positive("model.norm_eps", m.norm_eps)

    _choice("data.kind", d.kind, DATA_KINDS)
    if d.kind == "mqar":
        q = d.mqar
        _positive("data.mqar.seq_len", q.seq_len)
        _positive("data.mqar.num_test", q.num_test)
        _positive("data.mqar.num_val", q.num_val)
        if q.vocab_size < 4 or q.vocab_size % 2:
            raise ConfigError(f"data.mqar.vocab_size: must be an even number >= 4, got {q.vocab_size}")
        if not q.train_pairs and not q.train_cells:
            raise ConfigError("data.mqar.train_pairs: give at least one number of pairs")
        n_keys = q.vocab_size // 2 - 1
        for key, pairs in (("data.mqar.train_pairs", q.train_pairs), ("data.mqar.test_pairs", q.test_pairs)):
            for n in pairs:
                _positive(key, n)
                if n > n_keys:
                    raise ConfigError(f"{key}: {n} pairs need {n} distinct keys, but data.mqar.vocab_size = {q.vocab_size} "
                                      f"has {n_keys} (keys are [1, V/2))")
        for key, cells in (("data.mqar.train_cells", q.train_cells), ("data.mqar.test_cells", q.test_cells)):
            for c in cells:
                if len(c) != 2 or not all(isinstance(x, int) and x > 0 for x in c):
                    raise ConfigError(f"{key}: each cell is [seq_len, pairs] of two positive ints, got {list(c)}")
                L, n = c
                if n > n_keys:
                    raise ConfigError(f"{key}: {n} pairs need {n} distinct keys, but data.mqar.vocab_size = {q.vocab_size} "
                                      f"has {n_keys} (keys are [1, V/2))")
                if 4 * n > L:
                    raise ConfigError(f"{key}: cell [{L}, {n}]: {n} pairs need seq_len >= {4 * n} "
                                      f"(2n key-value tokens + n query/answer slots of 2)")
        if not q.train_cells:
            for n in q.train_pairs:
                if 4 * n > q.seq_len:
                    raise ConfigError(f"data.mqar.train_pairs: {n} pairs need data.mqar.seq_len >= {4 * n} "
                                      f"(2n key-value tokens + n query/answer slots of 2), got {q.seq_len}")
        for L in q.test_seq_lens:
            _positive("data.mqar.test_seq_lens", L)
        if not q.test_cells and q.test_pairs and all(4 * n > L for n in q.test_pairs for L in (q.test_seq_lens or [q.seq_len])):
            raise ConfigError("data.mqar.test_pairs: no (pairs, length) cell fits (a length needs >= 4 x pairs)")
        if m.vocab_size is not None and m.vocab_size < q.vocab_size:
            raise ConfigError(f"model.vocab_size: {m.vocab_size} < data.mqar.vocab_size = {q.vocab_size}")
    else:
        x = d.text
        _positive("data.text.seq_len", x.seq_len)
        _positive("data.text.max_bytes", x.max_bytes)
        if not 0 < x.test_fraction < 1:
            raise ConfigError(f"data.text.test_fraction: must be in (0, 1), got {x.test_fraction}")
        if not 0 < x.val_fraction < 1 - x.test_fraction:
            raise ConfigError(f"data.text.val_fraction: must be in (0, 1 - test_fraction), got {x.val_fraction}")
        if x.path is not None and not Path(x.path).expanduser().exists():
            raise ConfigError(f"data.text.path: {x.path} does not exist (give a file or a folder of text; "
                              f"leave it unset to use the Python standard library's source in {default_text_path()})")
        if m.vocab_size is not None and m.vocab_size < 256:
            raise ConfigError(f"model.vocab_size: byte-level text needs >= 256, got {m.vocab_size}")

    for key in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
        _positive(f"train.{key}", getattr(t, key))
    if not 0 <= t.target_accuracy <= 1:
        raise ConfigError(f"train.target_accuracy: must be in [0, 1] (0 = no early stopping), got {t.target_accuracy}")
    if t.target_accuracy and not t.eval_every:
        raise ConfigError("train.eval_every: early stopping (train.target_accuracy > 0) needs train.eval_every > 0 "
                          "(how often the validation accuracy is checked)")
    if t.target_accuracy and d.kind != "mqar":
        raise ConfigError("train.target_accuracy: early stopping on accuracy needs data.kind: mqar (set it to 0 for text)")
    for key in ("threads", "warmup_steps", "eval_every", "ckpt_every", "grad_clip", "weight_decay", "peak_tflops"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {getattr(t, key)}")
    _positive("train.lr", t.lr)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {t.min_lr_ratio}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"train.betas: must be two numbers in [0, 1), got {list(t.betas)}")
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.parallel", t.parallel, PARALLEL)
    _choice("train.loss_positions", t.loss_positions, LOSS_POSITIONS)
    if t.cuda_graph and (t.grad_accum != 1 or t.parallel != "none"):
        raise ConfigError("train.cuda_graph: needs train.grad_accum: 1 and train.parallel: none (one graph replays one "
                          "micro-batch in one process); set train.cuda_graph: false to accumulate or run DDP/FSDP")
    if not (t.device in ("auto", "cpu", "cuda", "mps") or t.device.startswith("cuda:")):
        raise ConfigError(f"train.device: unknown device {t.device!r}; use auto, cpu, cuda or cuda:N")
    _positive("eval.batch_size", cfg.eval.batch_size)
    _positive("eval.text_batches", cfg.eval.text_batches)

    a = cfg.ablate
    for r in a.rules:
        try:
            rules.get(r)
        except rules.UnknownRuleError as e:
            raise ConfigError(f"ablate.rules: {e}") from None
    for v in a.variants:
        _choice("ablate.variants", v, VARIANTS)
    if not a.rules:
        raise ConfigError("ablate.rules: give at least one rule")
    if not a.variants:
        raise ConfigError(f"ablate.variants: give at least one of {', '.join(VARIANTS)}")
    if not a.seeds:
        raise ConfigError("ablate.seeds: give at least one seed, e.g. ablate.seeds=[0,1,2]")
    if len(set(a.seeds)) != len(a.seeds):
        raise ConfigError(f"ablate.seeds: seeds repeat in {list(a.seeds)}")
    for lr in a.lrs:
        _positive("ablate.lrs", lr)
    _choice("ablate.selection", a.selection, SELECTIONS)
    _positive("ablate.jobs", a.jobs)
    _positive("ablate.streams", a.streams)
    if a.streams > 16:
        raise ConfigError(f"ablate.streams: at most 16 runs side by side per process (their CUDA streams come from "
                          f"torch's pool of 32 per device), got {a.streams}; raise ablate.jobs instead")
    backends = {cfg.model.mixer.backend, *a.grid.get("model.mixer.backend", [])}
    if a.streams > 1 and backends - {"triton", "torch"}:
        raise ConfigError(f"ablate.streams: runs side by side in one process need model.mixer.backend triton or torch "
                          f"(fla's autotuned kernels are not safe to launch from several threads at once), got "
                          f"{', '.join(sorted(backends))}; set the backend or ablate.streams: 1")
    for dev in a.devices:
        if not (dev in ("cpu", "cuda", "mps") or dev.startswith("cuda:")):
            raise ConfigError(f"ablate.devices: unknown device {dev!r}; use cpu, cuda or cuda:N")
    for key, values in a.grid.items():
        check_key(key, "ablate.grid")
        if key in SWEEP_OWNED or key.startswith("ablate."):
            raise ConfigError(f"ablate.grid: {key} is set by the sweep itself (seeds: ablate.seeds, learning rates: "
                              f"ablate.lrs, rules/variants: ablate.rules/ablate.variants)")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"ablate.grid: {key} needs a non-empty list of values, got {values!r}")


def _choice(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key}: unknown value {value!r}{hint} (choose from {', '.join(map(str, allowed))})")


def _positive(key: str, value) -> None:
    if not value > 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0 and d <= 64]


def default_text_path() -> str:
    """The Python standard library's source folder: text every machine with Python has."""
    return sysconfig.get_paths()["stdlib"]


def data_vocab_size(cfg: Config) -> int:
    """The vocabulary the data needs: MQAR's vocab or 256 bytes."""
    return cfg.data.mqar.vocab_size if cfg.data.kind == "mqar" else 256


def model_vocab_size(cfg: Config) -> int:
    """The model's vocabulary: `model.vocab_size` or, when unset, the data's."""
    return cfg.model.vocab_size if cfg.model.vocab_size is not None else data_vocab_size(cfg)


__all__ = ["AblateConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "MQARConfig", "MixerConfig",
           "ModelConfig", "TextConfig", "TrainConfig", "check_key", "data_vocab_size", "default_text_path", "from_dict",
           "load_config", "model_vocab_size", "to_yaml", "validate", "with_overrides"]
