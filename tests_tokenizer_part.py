"""Tokenizer and chat-format tests, to be merged into test_llama31.py: ids must equal Meta's."""

import functools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer as tk
from reference import reference_dialog_tokens, reference_tokenizer


@functools.cache
def ours() -> tk.Tokenizer:
    return tk.Tokenizer(tk.default_tokenizer_path())


def assert_same_as_meta(s: str, **kw) -> list[int]:
    ids = ours().encode(s, bos=False, eos=False, **kw)
    assert ids == reference_tokenizer().encode(s, bos=False, eos=False, **kw)
    return ids


def test_special_tokens_match_meta():
    meta, t = reference_tokenizer(), ours()
    assert t.special_tokens == meta.special_tokens
    assert (t.n_words, t.bos_id, t.eos_id, t.eot_id, t.eom_id, t.python_tag_id, t.pad_id, t.stop_tokens) == (
        meta.n_words, meta.bos_id, meta.eos_id, meta.eot_id, meta.eom_id, meta.python_tag_id, meta.pad_id,
        meta.stop_tokens,
    )  # fmt: skip
    assert t.n_words == 128256


AWKWARD = [
    "",
    "Hello, world!",
    "héllo wörld — ünïcödé façade",
    "emoji 👋🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵",
    "中文字符和日本語のテキスト、한국어",
    "1234567 and 3.14159 and 1,000,000",
    "I'll've we'RE they'd can't",
    "\n\n \t  \r\n\x0b\x0c end   ",
    "\u00a0non-breaking\u2028line\u3000ideographic space",
    "def f(x):\n    return x**2  # comment\n",
]


@pytest.mark.parametrize("s", AWKWARD)
def test_encode_matches_meta_and_round_trips(s):
    ids = assert_same_as_meta(s)
    assert ours().decode(ids) == s


def test_text_spelling_a_special_token():
    t = ours()
    plain = assert_same_as_meta("<|eot_id|>")
    assert t.eot_id not in plain and len(plain) > 1  # by default it is just text
    assert assert_same_as_meta("hi<|eot_id|>", allowed_special="all")[-1] == t.eot_id
    assert t.decode(plain) == "<|eot_id|>"


def test_bos_eos_flags():
    t = ours()
    body = t.encode("hi", bos=False, eos=False)
    assert t.encode("hi", bos=True, eos=False) == [t.bos_id] + body
    assert t.encode("hi", bos=False, eos=True) == body + [t.eos_id]
    assert t.encode("", bos=True, eos=True) == [t.bos_id, t.eos_id]


@pytest.mark.parametrize(
    "s",
    [
        "a" * 1_000_000,  # crosses 400k windows and 25k runs of non-whitespace
        " " * 60_001 + "x",  # a whitespace run cut twice
        "x" * 25_000 + " " * 25_000 + "y" * 25_001,  # runs just at and just over the cut length
    ],
    ids=["1M-a", "spaces", "edges"],
)
def test_long_inputs_match_meta(s):
    assert ours().decode(assert_same_as_meta(s)) == s


def test_long_mixed_input_matches_meta():
    rng = random.Random(0)
    words = "".join(rng.choice(["word", " ", "\n", "é", "12345", "😀", "?!"]) for _ in range(200_000))
    # Long runs of both kinds, the first straddling the 400k window edge.
    s = words[:390_000] + "z" * 30_000 + " " * 30_000 + words[-50_000:]
    assert len(s) == 500_000
    assert_same_as_meta(s)


def test_long_run_cuts_equal_metas():
    meta = reference_tokenizer()
    for s in ["x" * 25_001, " \u00a0\u2028" * 20_000 + "z" * 100_000, "a b" * 10 + "c" * 75_000 + "\t" * 50_000]:
        assert list(tk._split_long_runs(s)) == list(meta._split_whitespaces_or_nonwhitespaces(s, 25_000))


def test_regex_whitespace_is_str_isspace():
    # The run cutter uses re's \s where Meta's loop uses str.isspace(); they must agree everywhere.
    space = re.compile(r"\s")
    assert all(bool(space.match(chr(c))) == chr(c).isspace() for c in range(0x110000))


def test_encode_rejects_non_str():
    with pytest.raises(TypeError, match="takes a str"):
        ours().encode(b"bytes", bos=False, eos=False)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tk.Tokenizer(tmp_path / "nope.model")


def test_malformed_tokenizer_file(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text("IQ== 0\nIg== 1\nnot base64!! x\n")
    with pytest.raises(ValueError, match=r"bad\.model, line 3"):
        tk.Tokenizer(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no tokens"):
        tk.Tokenizer(path)


DIALOGS = {
    "system+user": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ],
    "ipython": [
        {"role": "system", "content": "Environment: ipython"},
        {"role": "user", "content": "Compute 3**5"},
        {"role": "assistant", "content": "<|python_tag|>print(3**5)", "stop_reason": "end_of_message"},
        {"role": "ipython", "content": "243"},
    ],
    "empty-content": [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
    "spells-eot": [{"role": "user", "content": "say <|eot_id|> please"}],
    "stop-reasons": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "stop_reason": "end_of_turn"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d", "stop_reason": "end_of_message"},
    ],
    "none": [],
}


@pytest.mark.parametrize("name", DIALOGS)
def test_dialog_prompt_matches_meta(name):
    messages = DIALOGS[name]
    assert tk.ChatFormat(ours()).encode_dialog_prompt(messages) == reference_dialog_tokens(messages)


def test_eom_only_for_assistant_end_of_message():
    t, fmt = ours(), tk.ChatFormat(ours())
    assert fmt.encode_message({"role": "assistant", "content": "x", "stop_reason": "end_of_message"})[-1] == t.eom_id
    assert fmt.encode_message({"role": "assistant", "content": "x"})[-1] == t.eot_id
    # Meta honours stop_reason only on assistant messages.
    assert fmt.encode_message({"role": "user", "content": "x", "stop_reason": "end_of_message"})[-1] == t.eot_id


def test_header_and_message_layout():
    t, fmt = ours(), tk.ChatFormat(ours())
    header = fmt.encode_header("ipython")
    assert t.decode(header) == "<|start_header_id|>ipython<|end_header_id|>\n\n"
    assert t.decode(fmt.encode_message({"role": "user", "content": "hi"})) == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    )


def test_dialog_with_mask_marks_only_assistant_content_and_end():
    t, fmt = ours(), tk.ChatFormat(ours())
    messages = DIALOGS["ipython"] + [{"role": "assistant", "content": "3**5 is 243."}]
    tokens, mask = fmt.encode_dialog_with_mask(messages)
    assert len(tokens) == len(mask)
    # The prompt form is the same dialog plus an open assistant header.
    assert tokens + fmt.encode_header("assistant") == reference_dialog_tokens(messages)
    learned = [tok for tok, m in zip(tokens, mask) if m]
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            end = t.eom_id if m.get("stop_reason") == "end_of_message" else t.eot_id
            expected += t.encode(m["content"], bos=False, eos=False) + [end]
    assert learned == expected
    assert t.decode(learned) == "<|python_tag|>print(3**5)<|eom_id|>3**5 is 243.<|eot_id|>"
    assert not mask[0]  # BOS


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "ok"}, {"role": "tool", "content": "x"}], r"message 1: .*'tool'"),
        ([{"role": "user", "content": ["a list"]}], r"message 0: 'content' must be a str, got list"),
        ([{"role": "user"}], r"message 0: 'content' must be a str, got NoneType"),
        (["just a string"], r"message 0: .*got 'str'"),
        ([{"role": "assistant", "content": "x", "stop_reason": "eom"}], r"message 0: 'stop_reason'"),
    ],
)
def test_bad_messages_raise(messages, match):
    with pytest.raises(ValueError, match=match):
        tk.ChatFormat(ours()).encode_dialog_prompt(messages)


def test_default_tokenizer_path_missing_package(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install llama-models"):
        tk.default_tokenizer_path()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_random_text_matches_meta_and_round_trips(s):
    assert ours().decode(assert_same_as_meta(s)) == s
