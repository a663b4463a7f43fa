"""The distilled student as a plain Hugging Face folder: what a user takes away from a run.

`train()` ends with `save_student`, which writes `runs/<name>/student/`; `export_checkpoint`
writes the same folder from a Lightning checkpoint (`lightning-opd export`). The folder holds
what `save_pretrained` writes for the model (config.json, safetensors weights,
generation_config.json) and for its tokenizer (tokenizer.json, tokenizer_config.json with EOS
and pad, the chat template), so that

    AutoModelForCausalLM.from_pretrained(dir), AutoTokenizer.from_pretrained(dir)

load it with nothing of this package. Weights are written in `student.dtype` (float32 by
default). The generation config stops at the tokenizer's EOS and pads with its pad token, as the
rollouts and the validation did during training.

Under FSDP the student's parameters are shards (DTensors): `full_student_state` gathers them
(a collective: every rank calls it) into CPU tensors on rank 0 only, and only rank 0 writes.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from lightning_opd.config import Config
from lightning_opd.errors import CheckpointError
from lightning_opd.models import DTYPES

STUDENT_PREFIX = "student."  # the student's keys in OPDModule's (Lightning) state dict
# a wrapper's segment in parameter names (activation checkpointing under FSDP); not a HF name
WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")
# tokenizer_config.json keys that transformers' from_pretrained adds about where it read from
LOAD_CONTEXT_KEYS = ("is_local", "local_files_only")


def _clean_key(key: str) -> str:
    for segment in WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    return key


def _model_class(model: torch.nn.Module) -> type:
    """The model's own class: FSDP2's `fully_shard` swaps in a subclass `FSDP<Name>`
    (bases: FSDPModule, the original class), whose constructor we must not use."""
    from torch.distributed.fsdp import FSDPModule

    cls = type(model)
    if isinstance(model, FSDPModule):
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    return cls


def full_student_state(student: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The student's full state dict as CPU tensors; None on ranks other than 0 under FSDP.

    A sharded (FSDP2) student is gathered with `get_model_state_dict(full_state_dict=True,
    cpu_offload=True)`, which every rank must call and which leaves the tensors on rank 0 only,
    so no other rank ever holds a full copy. Unsharded (single device, DDP) it is the module's
    own state dict, moved to the CPU."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(student, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_model_state_dict(student, options=options)
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return None
    else:
        state = student.state_dict()
    return {_clean_key(k): v.detach().cpu() for k, v in state.items()}


def generation_config_for(model: torch.nn.Module, tokenizer):
    """The model's generation config, stopping at the tokenizer's EOS and padding with its pad
    token (the ids the rollouts and the validation used). Other EOS ids the model already had
    (a chat model's turn end and document end) are kept after it."""
    from transformers import GenerationConfig

    existing = getattr(model, "generation_config", None)
    generation = copy.deepcopy(existing) if existing is not None else GenerationConfig.from_model_config(model.config)
    eos = tokenizer.eos_token_id
    before = generation.eos_token_id
    others = [] if before is None else [before] if isinstance(before, int) else list(before)
    others = [i for i in others if i != eos]
    generation.eos_token_id = [eos, *others] if others else eos
    generation.pad_token_id = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    return generation


def _cast(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in `dtype` (integer buffers stay as they are)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _drop_load_context(path: Path) -> None:
    """Remove from a saved tokenizer_config.json what `from_pretrained` recorded about how the
    tokenizer was loaded (`LOAD_CONTEXT_KEYS`), not what it is: a tokenizer read from the cache
    and one trained on the spot then write the same file."""
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if any(key in config for key in LOAD_CONTEXT_KEYS):
        for key in LOAD_CONTEXT_KEYS:
            config.pop(key, None)
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _replace_directory(written: Path, directory: Path) -> None:
    """Put the finished folder `written` at `directory`, replacing what was there: a reader never
    sees a half-written folder, and no file of an earlier, different model is left behind."""
    if not directory.exists():
        written.rename(directory)
        return
    old = directory.with_name(directory.name + ".old")
    _remove(old)
    directory.rename(old)
    written.rename(directory)
    _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_student(directory: Path, model: torch.nn.Module, tokenizer, dtype: str = "float32",
                  state: Mapping[str, torch.Tensor] | None = None) -> Path:  # fmt: skip
    """Write `model` (with weights `state`, default its own) and `tokenizer` as a HF folder.

    A fresh instance of the model's class is built on the meta device and given the (cast) CPU
    tensors, so the trained module itself is never moved, cast or re-tied, and a sharded model
    (whose class FSDP replaced) is saved as the plain model it wraps. Returns `directory`."""
    directory = Path(directory)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if state is None:
        state = full_student_state(model)
        assert state is not None, "write_student on a rank that holds no full state dict"
    state = _cast(state, DTYPES[dtype])
    config = copy.deepcopy(model.config)
    with torch.device("meta"):  # no memory and no random init: every weight is assigned below
        fresh = _model_class(model)(config)
    try:  # not strict: an output layer tied to the embedding may be absent from `state`
        _, unexpected = fresh.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # a shape that differs: the config is not the run's
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"the weights do not fit a {type(fresh).__name__} built from the config: {detail}") from None
    fresh.tie_weights()  # fills a tied output layer; what is still on meta was missing
    still_empty = [name for name, tensor in fresh.state_dict().items() if tensor.is_meta]
    if still_empty or unexpected:
        raise CheckpointError(
            f"the weights do not fit a {type(fresh).__name__} built from the config: "
            f"{len(still_empty)} parameter(s) missing (first: {still_empty[:3]}), "
            f"{len(unexpected)} unexpected (first: {list(unexpected)[:3]})"
        )
    fresh.generation_config = generation_config_for(model, tokenizer)
    directory.parent.mkdir(parents=True, exist_ok=True)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    _drop_load_context(partial / "tokenizer_config.json")
    _replace_directory(partial, directory)
    if (problem := auto_tokenizer_problem(directory, tokenizer)) is not None:
        warnings.warn(f"{directory}: {problem}", stacklevel=2)
    return directory


# text that exercises what tokenizers differ in: digit runs, spaces, newlines, non-ASCII
PROBE_TEXT = "What is 123+4567?  Step 1: 3+7=10, carry 1.\n#### 4690 — ça va ünïcode 🙂"


def auto_tokenizer_problem(directory: Path, tokenizer) -> str | None:
    """Why `AutoTokenizer.from_pretrained(directory)` would not give `tokenizer` back, or None.

    transformers picks the tokenizer class from config.json's model type for some types
    (qwen2 among them) whatever tokenizer_config.json says, and that class rebuilds its own
    pre-tokenizer: a Qwen2-architecture student with a tokenizer trained here would then split
    text differently from how it was trained. Nothing written in the folder can prevent it, so
    it is found out and said."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # said, not raised: the weights are written and usable
        return f"AutoTokenizer cannot load it ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})"
    text = PROBE_TEXT + (tokenizer.eos_token or "")
    if loaded(text, add_special_tokens=False)["input_ids"] != tokenizer(text, add_special_tokens=False)["input_ids"]:
        return (f"AutoTokenizer loads it as {type(loaded).__name__}, which splits text differently from its "
                f"tokenizer.json (the tokenizer the student was trained with); load that one with "
                f"PreTrainedTokenizerFast.from_pretrained(dir)")  # fmt: skip
    if (loaded.eos_token, loaded.pad_token) != (tokenizer.eos_token, tokenizer.pad_token):
        return (f"AutoTokenizer gives EOS/pad {loaded.eos_token!r}/{loaded.pad_token!r}, trained with "
                f"{tokenizer.eos_token!r}/{tokenizer.pad_token!r}")  # fmt: skip
    return None


def save_student(student: torch.nn.Module, tokenizer, cfg: Config, directory: Path, *, is_global_zero: bool) -> Path:
    """End of `train()`: the distilled student as a HF folder at `directory`, written by rank 0.
    Every rank must call it (under FSDP the gathering is a collective)."""
    from torch.distributed.fsdp import FSDPModule

    # sharded: a collective that every rank joins (rank 0 gets the tensors); unsharded (DDP),
    # every rank holds the same whole model, so rank 0's is enough
    sharded = isinstance(student, FSDPModule)
    state = full_student_state(student) if sharded or is_global_zero else None
    if is_global_zero:
        assert state is not None
        write_student(directory, student, tokenizer, cfg.student.dtype, state)
    return directory


# --- from a Lightning checkpoint ------------------------------------------------------------------


def config_of_checkpoint(checkpoint: Path) -> Path:
    """The run's `config.yaml` of `checkpoint` (runs/<name>/checkpoints/<file>): beside the
    checkpoint or one folder up, in the run directory."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():  # said first: a mistyped path also has no config.yaml beside it
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    candidates = [checkpoint.parent / "config.yaml", checkpoint.parent.parent / "config.yaml"]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CheckpointError(
            f"no config.yaml next to {checkpoint} (looked in {candidates[0].parent} and {candidates[1].parent}); "
            "the run directory's config.yaml says how to rebuild the student"
        )
    return found


def checkpoint_student_state(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The student's weights in a Lightning checkpoint of OPDModule: a `.ckpt` file, or the
    folder a sharded (FSDP) run writes. Raises CheckpointError (one line) when there is none."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    try:
        if checkpoint.is_dir():  # torch.distributed.checkpoint shards + Lightning's meta.pt
            from lightning.fabric.utilities.load import _load_distributed_checkpoint

            loaded = _load_distributed_checkpoint(checkpoint)
        else:
            # weights_only: a checkpoint is data; OPDModule saves nothing that needs pickled code
            loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # a torn or foreign file raises many different things
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read checkpoint {checkpoint} ({type(err).__name__}: {detail})") from None
    state = loaded.get("state_dict") if isinstance(loaded, dict) else None
    student = {_clean_key(k[len(STUDENT_PREFIX):]): v for k, v in (state or {}).items()
               if k.startswith(STUDENT_PREFIX)}  # fmt: skip
    if not student:
        raise CheckpointError(f"{checkpoint} holds no student weights (not a lightning_opd training checkpoint?)")
    return student


def student_skeleton(cfg: Config, tokenizer) -> torch.nn.Module:
    """A model of the student's architecture (weights to be replaced): the tiny model the
    config builds, or, for `student.path`, the path's model built on the meta device from its
    config.json (no weights are read), with the path's generation config."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if not cfg.student.path:
        from lightning_opd.models import tiny_model

        return tiny_model(cfg.student.tiny, tokenizer, seed=cfg.student.sft.seed)
    from lightning_opd.gguf_models import local_model_path

    path = local_model_path(cfg.student.path, cfg.run.cache_dir, setting="student.path")  # GGUF: converted folder
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    try:  # as from_pretrained during training would have read it
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # the path has none: the one derived from its config stays
        pass
    return model


def export_checkpoint(checkpoint: Path, directory: Path, cfg: Config) -> Path:
    """Rebuild the student of `checkpoint` (with the run's config `cfg`) and write it as the
    HF folder that the end of `train()` writes. The tokenizer comes from the run's cache (or is
    rebuilt as `prepare` builds it)."""
    from lightning_opd.data import build_task
    from lightning_opd.prepare import prepared_tokenizer

    state = checkpoint_student_state(checkpoint)
    tokenizer = prepared_tokenizer(cfg, "student", build_task(cfg.data))
    skeleton = student_skeleton(cfg, tokenizer)
    return write_student(directory, skeleton, tokenizer, cfg.student.dtype, state)
