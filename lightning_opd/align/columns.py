"""Teacher scoring restricted to the vocabulary columns the aligner reads (`loss.restrict_teacher_columns`).

The frozen teacher is scored at every response position of the batch. Over its whole vocabulary
that is an (N, V_T) logit tensor: N = 32k response tokens of a 152k-id Qwen teacher hold 9.3 GiB
in bf16, most of it never read by a V∩ aligner. What each aligner reads of the teacher is:

- `exact` / `simct_1to1` (full form): the V∩ logits at the anchors (the loss renormalises over
  V∩, so no full-vocabulary normaliser is needed for the loss itself);
- `simct` / `random_span`: the same, plus the raw logits of the span tokens (`mean_logit`) or
  their log-probabilities (`mean_logprob`: logit minus the full-vocabulary normaliser);
- `alm`, and every aligner's sampled form, SOD and GRPO mixing: log-probabilities of the
  sampled tokens only (their logit minus the normaliser);
- `teacher_mass` (logged every step): the softmax share of V∩ (and simct's anchor token), a
  logsumexp over V∩ minus the full-vocabulary one;
- `bpm` (a projection of the whole distribution) and `uld`'s full form (top-k of the whole
  softmax): every column.

So every aligner but the last two needs, besides a column set S it declares
(`Aligner.teacher_columns`: V∩_T, or nothing), the sampled tokens' own logits and the full
log-normaliser lse_p = logsumexp_v(z_p,v / τ) at the loss temperature τ. The restricted scorer
keeps exactly that: logits over S ∪ {response token ids} (sorted, C columns) and lse (N,) float32,
in a `ScoredSide` with `columns` set (base.py), which maps vocabulary ids to columns and serves
`token_logprobs` / `log_normaliser` from the stored normaliser.

How: `response_logits(..., head=ColumnHead(...))` runs the model's own forward (so everything
up to the LM head is the model's: final norm, any hidden-state scaling, FSDP's unsharding of the
root's parameters), with a forward pre-hook on the output embedding (`get_output_embeddings()`,
tied or not) that takes the final hidden states at the response positions, h (N, H), computes
z = h Wᵀ (+ b) and, for Gemma-style models, the final logit soft-capping cap·tanh(z/cap), chunk by
chunk of `chunk` positions (loss.chunk_rows): from each (chunk, V_T) block it keeps the C columns
of S and the row logsumexp, then frees it; the LM head itself is handed zero positions. The
matmul is still the full vocabulary's (the normaliser needs every logit); what shrinks is the
memory: N×C kept plus one (chunk, V_T) block, instead of N×V_T. The loss phase shrinks too: V∩
rows are gathered from (r, C) blocks and `teacher_mass` reads the stored normaliser instead of a
logsumexp over (r, V_T) float32 copies.

Any model: the first restricted scoring of a model is checked once against its own full forward
on one response (one extra short forward per run), and a model whose logits the head hook does
not reproduce (a head not called as a module, a scale applied after it such as Cohere's
`logit_scale`) is scored over its full vocabulary from then on, with a warning.

The student is not restricted: its loss needs gradients through the full-vocabulary normaliser
in the sampled form, SOD, GRPO mixing and `mean_logprob`, see docs/performance.md.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from lightning_opd.align.base import ScoredSide
from lightning_opd.threads import cpu_threads

# model -> whether its restricted scoring reproduced its own logits (checked once per model)
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def column_set(declared: torch.Tensor, responses: list[list[int]]) -> torch.Tensor:
    """The columns to score: the declared teacher ids and every response token id, (C,) long,
    ascending and unique (`ScoredSide.column` looks ids up by binary search)."""
    tokens = torch.tensor([t for r in responses for t in r], dtype=torch.long)
    return torch.unique(torch.cat([declared.detach().cpu().long().flatten(), tokens]))  # sorted


def logit_softcap(model: torch.nn.Module) -> float | None:
    """The final logit soft-capping of Gemma-2/3-style models (logits = cap·tanh(logits / cap)
    after the LM head), from the model's (text) config; None where there is none."""
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for c in configs:
        cap = getattr(c, "final_logit_softcapping", None)
        if cap:
            return float(cap)
    return None


def output_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head when it is a plain linear map (tied or not), else None."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head if isinstance(head, torch.nn.Linear) else None


# vocabulary rows of the LM head per logit block on the CPU (`ColumnHead._compute_blocked`): a
# (positions, 4096) float32 block stays in cache through the logsumexp's passes (measured on the
# bench-gold teacher, 623 positions x 129,280 ids, one thread: 2048-4096 fastest, 16384 as slow as
# the whole row)
HEAD_BLOCK_COLUMNS = 4096


class ColumnHead:
    """Computes, inside one forward of the model (`installed`), the logits over `columns` and
    the full-vocabulary log-normaliser at `temperature` from the final hidden states at the
    response positions, `chunk` positions at a time. After the forward: `logits` (N, C) in the
    dtype the LM head would give, `normaliser` (N,) float32; both None if the hook never ran."""

    def __init__(self, columns: torch.Tensor, temperature: float, chunk: int, softcap: float | None = None):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.columns = columns
        self.temperature = float(temperature)
        self.chunk = max(int(chunk), 1)
        self.softcap = softcap
        self.logits: torch.Tensor | None = None
        self.normaliser: torch.Tensor | None = None

    def _head(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        z = F.linear(hidden, weight, bias)  # the LM head's own op and dtype
        if self.softcap is not None:  # as Gemma-2's forward: divide, tanh, multiply, in that dtype
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def compute(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """hidden (N, H) -> self.logits (N, C), self.normaliser (N,); one (chunk, V) block alive
        (on the CPU one (chunk, HEAD_BLOCK_COLUMNS) block: `_compute_blocked`)."""
        columns = self.columns.to(weight.device)
        n = hidden.shape[0]
        kept: list[torch.Tensor] = []  # the (n, C) logits, made on the first block, in its dtype

        def logits_for(z: torch.Tensor) -> torch.Tensor:
            if not kept:
                kept.append(torch.empty((n, len(columns)), dtype=z.dtype, device=z.device))
            return kept[0]

        normaliser = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for lo in range(0, max(n, 1), self.chunk):
            h = hidden[lo : lo + self.chunk]
            if hidden.device.type == "cpu" and weight.shape[0] > HEAD_BLOCK_COLUMNS:
                with cpu_threads(1, hidden.device):  # many small ops (threads.py)
                    self._compute_blocked(h, weight, bias, columns, lambda z, lo=lo: logits_for(z)[lo : lo + self.chunk],
                                          normaliser[lo : lo + self.chunk])  # fmt: skip
                continue
            z = self._head(h, weight, bias)  # (c, V)
            logits_for(z)[lo : lo + self.chunk] = z.index_select(1, columns)  # (c, C); faster than z[:, columns]
            scaled = z.float()
            if self.temperature != 1.0:
                scaled = scaled / self.temperature
            normaliser[lo : lo + self.chunk] = torch.logsumexp(scaled, dim=-1)
            del z, scaled
        self.logits, self.normaliser = kept[0], normaliser

    def _compute_blocked(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         columns: torch.Tensor, logits_for, normaliser: torch.Tensor) -> None:  # fmt: skip
        """`compute` for one chunk of positions, HEAD_BLOCK_COLUMNS vocabulary rows of the head at a
        time: each (c, block) logit block gives its kept columns and joins a running logsumexp
        (max m, Σ exp(z − m) rescaled when m grows), so no (c, V) tensor is ever made. The same
        logits (the head's rows are the same dot products) and the same normaliser to float32
        rounding; on the CPU 2.5x faster than one (c, V) block (a 129k-id head: 0.19 s against 0.53
        s for 623 positions), whose float32 passes stream through memory."""
        vocab, block = weight.shape[0], HEAD_BLOCK_COLUMNS
        starts = list(range(0, vocab, block))
        edges = torch.searchsorted(columns, torch.tensor([*starts, vocab], device=columns.device)).tolist()
        m = torch.full((hidden.shape[0],), float("-inf"), dtype=torch.float32, device=hidden.device)
        total = torch.zeros_like(m)
        for i, v0 in enumerate(starts):
            z = self._head(hidden, weight[v0 : v0 + block], None if bias is None else bias[v0 : v0 + block])
            a, b = edges[i], edges[i + 1]
            logits = logits_for(z)  # (c, C): this chunk's rows of the kept logits
            if b > a:
                logits[:, a:b] = z.index_select(1, columns[a:b] - v0)
            z = z.float()  # a temporary either way: worked on in place from here
            if self.temperature != 1.0:
                z.div_(self.temperature)
            new_m = torch.maximum(m, z.amax(dim=-1))
            total = total * torch.exp(m - new_m) + z.sub_(new_m[:, None]).exp_().sum(dim=-1)
            m = new_m
        out = m + total.log()
        if not bool(torch.isfinite(out).all()):  # an infinite logit: torch.logsumexp's conventions decide
            z = self._head(hidden, weight, bias).float()
            out = torch.logsumexp(z / self.temperature if self.temperature != 1.0 else z, dim=-1)
        normaliser.copy_(out)

    @contextlib.contextmanager
    def installed(self, model: torch.nn.Module, keep: torch.Tensor) -> Iterator[None]:
        """For one `model(...)` call whose LM head sees the last R+1 positions of each sequence
        (logits_to_keep = R+1): keep (B, R) bool marks the response positions, in the layout of
        `response_logits` (position P-1+j predicts response token j). The LM head is handed no
        position, so the model's own logits come back empty."""
        head = output_head(model)
        if head is None:
            raise ValueError("restricted scoring needs a linear LM head (get_output_embeddings)")
        width = keep.shape[1]

        def hook(module: torch.nn.Linear, args: tuple) -> tuple:
            hidden = args[0]  # (B, ≥ R+1, H): the final hidden states the head would map
            at_response = hidden[:, hidden.shape[1] - width - 1 : hidden.shape[1] - 1]  # (B, R, H)
            self.compute(at_response[keep.to(hidden.device)], module.weight, module.bias)
            return (hidden[:, :0], *args[1:])

        handle = head.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()


def _reproduces(head: ColumnHead, start: int, full: torch.Tensor) -> bool:
    """Whether the head's positions start.. match the model's own logits `full` (n, V) there:
    the kept columns and the log-normaliser."""
    n = full.shape[0]
    if head.logits is None or start + n > head.logits.shape[0]:
        return False
    mine = head.logits[start : start + n].float()  # (n, C)
    kept = full[:, head.columns.to(full.device)].float()  # (n, C)
    lse = torch.logsumexp(full.float() / head.temperature, dim=-1)  # (n,)
    # float32: the same matmul blocked differently; half types: one rounding of the logits
    if n == 0:  # an empty response: nothing to compare (the hook ran, which is all that is known)
        return True
    tol = (1e-4 if full.dtype == torch.float32 else 3e-2) * (1.0 + float(full.float().abs().max()))
    return torch.allclose(mine, kept, rtol=0.0, atol=tol) and torch.allclose(
        head.normaliser[start : start + n], lse, rtol=0.0, atol=tol
    )


def score_side(model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]], pad_id: int, *,
               columns: torch.Tensor | None, temperature: float, chunk: int) -> ScoredSide:  # fmt: skip
    """Score `responses` after `prompts` with `model`, packed (`response_logits`): over the full
    vocabulary when `columns` is None (or the model cannot be restricted), else over
    `column_set(columns, responses)` with the full-vocabulary normaliser at `temperature`
    (module docstring). One forward of the model; two on a model's first restricted call, the
    second over one response, to check that the restriction reproduces the model's logits."""
    from lightning_opd.rollout.generate import response_logits  # rollout imports nothing of align

    if columns is None or output_head(model) is None or _CHECKED.get(model) is False:
        return ScoredSide(*response_logits(model, prompts, responses, pad_id))
    head = ColumnHead(column_set(columns, responses), temperature, chunk, logit_softcap(model))
    logits, ids, offsets = response_logits(model, prompts, responses, pad_id, head=head)
    if model not in _CHECKED:
        # every rank makes this call on its first step, so the extra forward is collective-safe (FSDP)
        b = next((i for i, r in enumerate(responses) if r), 0)
        full, _, _ = response_logits(model, prompts[b : b + 1], responses[b : b + 1], pad_id)
        _CHECKED[model] = ok = _reproduces(head, int(offsets[b]), full)
        if not ok:
            warnings.warn(
                f"{type(model).__name__}: scoring over the aligner's vocabulary columns does not reproduce the "
                "model's own logits (a scale applied after its LM-head module?); it is scored over its full "
                "vocabulary instead (loss.restrict_teacher_columns=false silences this)",
                RuntimeWarning, stacklevel=2,
            )  # fmt: skip
            return ScoredSide(*response_logits(model, prompts, responses, pad_id))
    return ScoredSide(logits, ids, offsets, columns=head.columns.to(logits.device), normaliser=head.normaliser,
                      temperature=head.temperature)  # fmt: skip
