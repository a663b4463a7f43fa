"""Check `lightning-opd plan` against the measured peak memory of one training step, on CPU.

    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python scripts/plan_check.py [key=value ...]
    OMP_NUM_THREADS=1 MALLOC_MMAP_THRESHOLD_=65536 .venv/bin/python scripts/plan_check.py --activations \
        ARCH HIDDEN LAYERS HEADS KV_HEADS INTERMEDIATE BATCH NEW_TOKENS DTYPE [ckpt]

(`MALLOC_MMAP_THRESHOLD_` makes glibc give every allocation of 64 KiB or more its own mapping, so
the resident set follows the live tensors; by default freed heap memory stays resident and the
peak can read far above what was alive at once.)

Step mode, one point per process (a fresh allocator): the config is configs/experiment/default.yaml with
the overrides; the tokenizers are built (trained, or loaded from a packaged fixture), then, inside
`bench.PeakMemory` (peak resident set size above the size before the models exist), the tiny
untrained models are built and two steps run as Lightning runs them: `OPDModule.training_step`,
the gradients of the previous step set to None, backward, gradient clipping, AdamW. The plan of
the same config is computed with the measured prompt length (the longest rendered student prompt
of the batches; prompts are left-padded to it). Prints one JSON line: measured bytes, the plan's
parts, and the mean response length (untrained students rarely stop early).
"""

from __future__ import annotations

import itertools
import json
import sys

import torch

from lightning_opd.cli.bench import PeakMemory
from lightning_opd.cli.plan import make_plan
from lightning_opd.config import CONFIG_DIR, load
from lightning_opd.data import build_task
from lightning_opd.models import load_tokenizer, render_prompt, tiny_model, train_tokenizer
from lightning_opd.module import OPDModule
from lightning_opd.prepare import TOKENIZER_CORPUS
from lightning_opd.sft import endless_examples

STEPS = 2


class QuietModule(OPDModule):
    def _log_train(self, values: dict, batch_size: int) -> None:
        self.last_values = {k: float(v) for k, v in values.items()}


def tokenizer(cfg, role: str, task):
    section = getattr(cfg, role).tokenizer
    if section.source != "train":
        tok = load_tokenizer(section)
    else:
        corpus = [t for ex in itertools.islice(endless_examples(task), TOKENIZER_CORPUS) for t in (ex.prompt, ex.solution)]
        tok = train_tokenizer(corpus, section, teacher=role == "teacher")
    tok.padding_side = "left"
    return tok


def warm_up() -> None:
    """One small forward + backward, so that first-use allocations (thread pools, kernels) are not counted."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    model(torch.randn(32, 64)).sum().backward()


def main(overrides: list[str]) -> dict:
    cfg = load(CONFIG_DIR / "experiment" / "default.yaml", overrides=["trainer.accelerator=cpu", *overrides])
    task = build_task(cfg.data)
    s_tok, t_tok = tokenizer(cfg, "student", task), tokenizer(cfg, "teacher", task)
    stream = task.stream(shard=0, num_shards=1)
    batches = [list(itertools.islice(stream, cfg.data.batch_size)) for _ in range(STEPS)]
    prompt_tokens = max(len(s_tok(render_prompt(s_tok, ex.prompt), add_special_tokens=False)["input_ids"])
                        for batch in batches for ex in batch)  # fmt: skip
    warm_up()
    lengths, rows = [], []
    with PeakMemory() as peak:
        torch.manual_seed(0)
        module = QuietModule(cfg, tiny_model(cfg.student.tiny, s_tok, seed=0), tiny_model(cfg.teacher.tiny, t_tok, seed=1),
                             s_tok, t_tok, task)  # fmt: skip
        module.train()
        optimizer = module.configure_optimizers()["optimizer"]
        for index, batch in enumerate(batches):
            loss = module.training_step(batch, index)
            optimizer.zero_grad(set_to_none=True)  # Lightning's order: after the step's forward
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.student.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            lengths.append(module.last_values["train/response_len"])
            rows.append(module.last_values["train/rows"])
    plan = make_plan(cfg, prompt_tokens=prompt_tokens)
    return {"overrides": overrides, "measured_bytes": peak.delta, "prompt_tokens": prompt_tokens,
            "response_len": sum(lengths) / len(lengths), "rows": max(rows), "estimated_total_bytes": plan.parts.total,
            "peak_phase": plan.parts.peak_phase, "parts_bytes": plan.to_dict()["parts_bytes"],
            "student_vocab": plan.setting.student.vocab, "teacher_vocab": plan.setting.teacher.vocab}  # fmt: skip


def activations(arch: str, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, batch: int,
                new_tokens: int, dtype: str, checkpointing: bool = False) -> dict:
    """Activation mode: the student's scoring forward + backward alone (`response_logits` as the step
    calls it, random ids, a 512-id vocabulary, prompts of 8 to 16 tokens left-padded, every response
    `new_tokens` long), measured against the plan's activations + the weights' gradients + the logits
    and their gradient. With `ckpt`, every decoder layer is checkpointed as under fsdp and the model
    runs without a KV cache (with one, the recomputed layer appends to the cache and fails; docs/
    scaling.md), so the plan's scoring cache is left out of that estimate."""
    from dataclasses import replace

    import transformers

    from lightning_opd.cli import plan
    from lightning_opd.rollout.generate import response_logits

    vocab, prompt_tokens = 512, 16
    config_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[arch]
    config = getattr(transformers, config_cls)(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                               num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=64,
                                               intermediate_size=intermediate, max_position_embeddings=4096,
                                               tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).to(getattr(torch, dtype)).train()
    if checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )

        layer = type(model.model.layers[0])
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, layer))
        forward = model.forward
        model.forward = lambda *a, **k: forward(*a, **{**k, "use_cache": False})
    prompts = [torch.randint(3, vocab, (8 + i % (prompt_tokens - 7),)).tolist() for i in range(batch)]
    responses = [torch.randint(3, vocab, (new_tokens,)).tolist() for _ in range(batch)]
    warm_up()
    response_logits(model, prompts[:1], [responses[0][:4]], 0)[0].float().sum().backward()
    model.zero_grad(set_to_none=True)
    with PeakMemory() as peak:
        logits = response_logits(model, prompts, responses, 0)[0]
        logits.float().pow(2).mean().backward()
    shape = plan.ModelShape(arch, hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=64,
                            intermediate=intermediate, vocab=vocab, tied=True, qk_norm=arch == "qwen3")  # fmt: skip
    setting = plan.Setting(student=shape, teacher=shape, prompts=batch, samples=1, prompt_tokens=prompt_tokens,
                           new_tokens=new_tokens, param_dtype=dtype, compute_dtype=dtype, teacher_param_dtype=dtype,
                           teacher_compute_dtype=dtype, strategy="fsdp" if checkpointing else "auto", world=1,
                           checkpointing=checkpointing, loss_form="sampled", chunk_rows=512, gpu=False,
                           fsdp_mixed=False)  # fmt: skip
    cache = plan.scoring_cache_bytes(shape, setting, plan.DTYPE_BYTES[dtype]) if checkpointing else 0
    parts = plan.estimate(replace(setting))
    estimated = parts.activations - cache + parts.student_grads + parts.student_logits + parts.student_logits_grad
    return {"arch": arch, "hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
            "intermediate": intermediate, "batch": batch, "tokens": prompt_tokens + new_tokens, "dtype": dtype,
            "checkpointing": checkpointing, "measured_bytes": peak.delta, "estimated_bytes": estimated,
            "activations_bytes": parts.activations - cache, "parameters": plan.parameters(shape),
            "actual_parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--activations"]:
        a = sys.argv[2:]
        print(json.dumps(activations(a[0], *map(int, a[1:8]), a[8], checkpointing=a[9:10] == ["ckpt"])))
    else:
        print(json.dumps(main(sys.argv[1:])))
