"""Print the `bpm` rows of one held-out problem as a markdown table (docs/results/conflict.md).

    .venv/bin/python scripts/inspect_bpm_rows.py EXPERIMENT [PROBLEM_INDEX]

Loads the experiment's cached teacher and student (it trains them first if the cache is cold),
lets the student answer the problem greedily, scores its answer with both models, and prints
for every student token: the teacher token covering its first byte (and how many bytes of it
come before), the teacher's top-3 next tokens, the teacher's probability on V∩ (what exact and
simct compare over), bpm's projected target (top 3), the residual, and the student's top 3.
"""

from __future__ import annotations

import sys

import torch

from lightning_opd.align import ScoredBatch, ScoredSide, TokenizerPair, align_batch, build_aligner
from lightning_opd.config import load
from lightning_opd.data.tasks import build_task
from lightning_opd.models import render_prompt
from lightning_opd.prepare import prepare


def top3(probs: torch.Tensor, name) -> str:
    values, ids = probs.topk(3)
    return ", ".join(f"{name(int(i))} {float(v):.2f}" for v, i in zip(values, ids, strict=True))


def main(experiment: str, index: int = 0) -> None:
    cfg = load(f"configs/experiment/{experiment}.yaml")
    task = build_task(cfg.data)
    prepared = prepare(cfg, task)
    s_tok, t_tok = prepared.student_tokenizer, prepared.teacher_tokenizer
    pair = TokenizerPair.build(s_tok, t_tok)
    example = task.validation_set()[index]
    s_prompt = s_tok(render_prompt(s_tok, example.prompt), add_special_tokens=False)["input_ids"]
    t_prompt = t_tok(render_prompt(t_tok, example.prompt), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = prepared.student.generate(torch.tensor([s_prompt]), max_new_tokens=cfg.rollout.max_new_tokens,
                                        do_sample=False, eos_token_id=s_tok.eos_token_id,
                                        pad_token_id=s_tok.pad_token_id)  # fmt: skip
        response = out[0, len(s_prompt):].tolist()
        ended = s_tok.eos_token_id in response
        response = response[: response.index(s_tok.eos_token_id)] if ended else response
        aligned = align_batch(pair, [response], [ended])
        t_ids = aligned.teacher_ids[0]
        s_ids = response + ([s_tok.eos_token_id] if ended else [])
        zt = prepared.teacher(torch.tensor([t_prompt + t_ids])).logits[0, len(t_prompt) - 1 : -1].float()
        zs = prepared.student(torch.tensor([s_prompt + s_ids])).logits[0, len(s_prompt) - 1 : -1].float()
    batch = ScoredBatch(ScoredSide(zs, torch.tensor(s_ids), torch.tensor([0, len(s_ids)])),
                        ScoredSide(zt, torch.tensor(t_ids), torch.tensor([0, len(t_ids)])), pair.vocab)  # fmt: skip
    aligner = build_aligner("bpm")
    rows = aligner.build_rows(aligned.segments, batch)
    target, reached = aligner.target_of(rows, batch, 1.0)(slice(0, len(rows)))
    q, p = torch.softmax(zt, -1), torch.softmax(zs, -1)
    shared = torch.zeros(q.shape[1], dtype=torch.bool)
    shared[pair.vocab.teacher_ids] = True

    def name_of(table, tok):
        return lambda i: repr(table[i].decode("utf-8", "replace") or tok.convert_ids_to_tokens(i))

    s_name, t_name = name_of(pair.student_bytes.table, s_tok), name_of(pair.teacher_bytes.table, t_tok)
    print(f"problem: {example.prompt!r}, answer {example.answer}; student wrote {aligned.texts[0]!r}\n")
    print("| student token | teacher token (bytes before) | teacher top 3 | teacher mass on V∩ "
          "| bpm target top 3 | residual | student top 3 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in range(len(rows)):
        i, k, w = int(rows.student_pos[r]), int(rows.teacher_pos[r]), int(rows.within[r])
        print(f"| {s_name(s_ids[i])} | {t_name(t_ids[k])} ({w}) | {top3(q[k], t_name)} | {float(q[k][shared].sum()):.2f} "
              f"| {top3(target[r], s_name)} | {1 - float(reached[r]):.2f} | {top3(p[i], s_name)} |")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
