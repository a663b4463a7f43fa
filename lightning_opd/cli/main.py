"""`lightning-opd` — a thin command line over the library.

    lightning-opd train configs/experiment/default.yaml trainer.max_steps=20 aligner.name=exact
    lightning-opd config configs/experiment/default.yaml      # print the resolved config
    lightning-opd plan configs/experiment/simct_qwen7b_gemma2b.yaml --gpu-memory 80   # memory per device
    lightning-opd export runs/NAME/checkpoints/last.ckpt --out models/NAME   # the student, HF folder
    lightning-opd eval runs/NAME/student --limit 100      # its greedy accuracy on the task

Config problems (unknown key, wrong type, bad value, unreadable checkpoint) and the other errors a
user can act on (`errors.UserError`: a malformed data file, a model or tokenizer that cannot be
found) exit with code 2 and a one-line message naming the file and line, key or id, and the fix;
Ctrl-C exits with 130 (128 + SIGINT, as shells report it), after `train` saved the last finished
step and printed how to resume.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from lightning_opd.config import ConfigError, load, to_yaml
from lightning_opd.errors import TrainingInterrupted, UserError

EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    files = [x for x in items if "=" not in x]
    return files, [x for x in items if "=" in x]


def cmd_config(args: argparse.Namespace) -> int:
    files, overrides = _split(args.items)
    print(to_yaml(load(*files, overrides=overrides)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    files, overrides = _split(args.items)
    cfg = load(*files, overrides=overrides)
    from lightning_opd.train import train

    summary = train(cfg)
    if summary.get("global_rank", 0) == 0:
        print_summary(summary)
    return 0


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"lightning_opd — {summary.get('experiment')} ({summary.get('run_dir')})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("aligner", "teacher_accuracy", "student_accuracy_before", "student_accuracy_after",
                "coverage", "final_loss", "tool_calls", "tool_success_rate", "steps", "seconds"):  # fmt: skip
        if key not in summary:
            continue
        value = summary.get(key)
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    if summary.get("student_dir"):
        print(f"distilled student (Hugging Face folder): {summary['student_dir']}")


def _items_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", help="config files and key=value overrides")


def _lazy(module: str, attribute: str) -> Callable:
    """`module.attribute`, imported when called: each subcommand's imports stay in its module."""

    def call(*args, **kwargs):
        import importlib

        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)

    return call


def _in_module(module: str, run: str, add_arguments: str) -> tuple[Callable, Callable]:
    return _lazy(f"lightning_opd.cli.{module}", run), _lazy(f"lightning_opd.cli.{module}", add_arguments)


# name -> (run, add its arguments, help)
COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None], str]] = {
    "train": (cmd_train, _items_arguments, "run an experiment: CONFIG.yaml... [key=value...]"),
    "config": (cmd_config, _items_arguments, "print the resolved config: CONFIG.yaml... [key=value...]"),
    "align": (*_in_module("align", "run_align", "add_align_arguments"),
              "alignment coverage of tokenizer pairs on a JSONL file"),
    "ablate": (*_in_module("ablate", "run_ablate", "add_ablate_arguments"),
               "one run per overlay of a knob and seed, then the report"),
    "report": (*_in_module("report", "run_report", "add_report_arguments"),
               "table.md and curves.png from run directories"),
    "bench": (*_in_module("bench", "run_bench_command", "add_bench_arguments"),
              "time alignment, rows, loss and one training step (docs/performance.md)"),
    "plan": (*_in_module("plan", "run_plan", "add_plan_arguments"),
             "per-device memory estimate of a run: CONFIG.yaml... [key=value...] [--gpu-memory GiB]"),
    "export": (*_in_module("export", "run_export", "add_export_arguments"),
               "the student of a checkpoint as a Hugging Face folder: CKPT --out DIR [key=value...]"),
    "eval": (*_in_module("export", "run_eval", "add_eval_arguments"),
             "greedy accuracy of a Hugging Face folder: MODEL_DIR [CONFIG.yaml...] [key=value...] [--limit N]"),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-opd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, add_arguments, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _one_line(err: BaseException) -> str:
    """The error's message on one line: the messages are written as one, this only guards the
    promise of one line against a library's text inside them."""
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops filling a positional list at the first option: `ablate EXP --knob K a=b`
    # leaves a=b over; key=value items after the options are overrides all the same
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command][0](args)
    except ConfigError as err:
        print(f"lightning-opd: config error: {_one_line(err)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except UserError as err:  # data, model, tokenizer: the message names the place and the fix
        print(f"lightning-opd: {_one_line(err)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except TrainingInterrupted:  # train printed where the checkpoint is and how to resume
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C outside training (preparation, between ablation runs)
        print("lightning-opd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
