"""Llama 3 tokenizer (tiktoken BPE plus Meta's 256 special tokens) and the chat format.

Token ids match Meta's llama_models.llama3 Tokenizer and ChatFormat exactly; the tests
check that against Meta's code (reference.py).
"""

import base64
import binascii
import importlib.util
import re
from pathlib import Path

import tiktoken

# Meta's pre-tokenizer regex: contractions, words, 1-3 digit groups, punctuation, whitespace.
PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501

NUM_SPECIAL_TOKENS = 256
# Named special tokens in Meta's order; the rest of the 256 are reserved placeholders.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model expects a tool result next
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]

# tiktoken panics on much longer inputs, so text is encoded in windows of this many chars.
MAX_ENCODE_CHARS = 400_000
# tiktoken is very slow on (and can crash for) long runs of whitespace or of non-whitespace
# (openai/tiktoken#195), so such runs are cut into pieces of at most this many chars.
MAX_RUN_CHARS = 25_000
# A run longer than MAX_RUN_CHARS, matched only where it starts (the lookbehind) so that the
# scan stays linear. Python's \s is exactly str.isspace(), which Meta's per-char loop uses.
_LONG_RUN = re.compile(rf"(?<!\s)\s{{{MAX_RUN_CHARS + 1},}}|(?<!\S)\S{{{MAX_RUN_CHARS + 1},}}")


def default_tokenizer_path() -> Path:
    """The tokenizer.model shipped inside the installed llama-models package."""
    # find_spec locates the package without importing it (importing it is slow).
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no default tokenizer: the llama-models package is not installed; "
            "run `pip install llama-models` or pass --tokenizer_path /path/to/tokenizer.model"
        )
    path = Path(spec.submodule_search_locations[0]) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(
            f"no tokenizer at {path} (llama-models is installed but lacks it); "
            "reinstall llama-models or pass --tokenizer_path /path/to/tokenizer.model"
        )
    return path


def load_bpe_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one `<base64 token> <rank>` per line."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():  # Meta's loader skips blank lines too
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except (ValueError, binascii.Error):
                raise ValueError(
                    f"{path}, line {lineno}: expected '<base64 token> <rank>', got {line.strip()[:80]!r}; "
                    "is this a Llama 3 tokenizer.model?"
                ) from None
    if not ranks:
        raise ValueError(f"{path} holds no tokens; is this a Llama 3 tokenizer.model?")
    return ranks


def _split_long_runs(s: str):
    """Cut s so that no piece holds more than MAX_RUN_CHARS consecutive whitespace or
    non-whitespace chars, at the same places as Meta's per-char loop: every MAX_RUN_CHARS
    chars from the start of a long run."""
    start = 0
    for run in _LONG_RUN.finditer(s):
        for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
            yield s[start:cut]
            start = cut
    yield s[start:]


class Tokenizer:
    """Text <-> token ids for Llama 3 / 3.1."""

    def __init__(self, model_path):
        model_path = Path(model_path)
        ranks = load_bpe_ranks(model_path)
        n_base = len(ranks)
        names = NAMED_SPECIAL_TOKENS + [
            f"<|reserved_special_token_{i}|>" for i in range(2, 2 + NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS))
        ]
        self.special_tokens = {name: n_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(
            name=model_path.name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=self.special_tokens
        )
        self.n_words = n_base + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s: str, *, bos: bool, eos: bool, allowed_special=None, disallowed_special=()) -> list[int]:
        """Token ids of s. By default text that spells a special token (e.g. "<|eot_id|>") is
        encoded as plain text; allowed_special="all" (or a set of names) turns it into the
        special token instead."""
        if not isinstance(s, str):
            raise TypeError(f"Tokenizer.encode takes a str, got {type(s).__name__}; decode bytes first")
        allowed_special = set() if allowed_special is None else allowed_special
        ids = [self.bos_id] if bos else []
        for i in range(0, len(s), MAX_ENCODE_CHARS):
            for piece in _split_long_runs(s[i : i + MAX_ENCODE_CHARS]):
                ids += self.model.encode(piece, allowed_special=allowed_special, disallowed_special=disallowed_special)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        """Text of a sequence of token ids (special tokens come out as their names)."""
        return self.model.decode(list(ids))


# Meta's Role.tool is rendered as "ipython" in the header; we name it by what it renders.
ROLES = ("system", "user", "assistant", "ipython")
STOP_REASONS = ("end_of_turn", "end_of_message", "out_of_tokens")


def check_message(message, where: str) -> None:
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        got = message.get("role") if isinstance(message, dict) else type(message).__name__
        raise ValueError(f"{where}: expected a dict with 'role' one of {', '.join(ROLES)}; got {got!r}")
    if not isinstance(message.get("content"), str):
        raise ValueError(f"{where}: 'content' must be a str, got {type(message.get('content')).__name__}")
    stop_reason = message.get("stop_reason")
    if stop_reason is not None and stop_reason not in STOP_REASONS:
        raise ValueError(f"{where}: 'stop_reason' must be one of {', '.join(STOP_REASONS)}; got {stop_reason!r}")


class ChatFormat:
    """Llama 3.1 chat template on token ids:
    <|begin_of_text|> then per message
    <|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>
    and, for a prompt, an open assistant header for the model to complete."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def encode_header(self, role: str) -> list[int]:
        t = self.tokenizer
        return [
            t.special_tokens["<|start_header_id|>"],
            *t.encode(role, bos=False, eos=False),
            t.special_tokens["<|end_header_id|>"],
            *t.encode("\n\n", bos=False, eos=False),
        ]

    def _header_and_body(self, message: dict) -> tuple[list[int], list[int]]:
        """(header ids, content ids + closing eot/eom) of an already checked message."""
        body = self.tokenizer.encode(message["content"], bos=False, eos=False)
        # An assistant message that ends in a tool call stops with eom: the turn goes on
        # once the tool's answer is in. Meta honours stop_reason only for the assistant.
        eom = message["role"] == "assistant" and message.get("stop_reason") == "end_of_message"
        body.append(self.tokenizer.eom_id if eom else self.tokenizer.eot_id)
        return self.encode_header(message["role"]), body

    def encode_message(self, message: dict) -> list[int]:
        check_message(message, "message")
        header, body = self._header_and_body(message)
        return header + body

    def encode_dialog_prompt(self, messages: list[dict]) -> list[int]:
        """Prompt for the model's next assistant turn."""
        tokens, _ = self.encode_dialog_with_mask(messages)
        return tokens + self.encode_header("assistant")

    def encode_dialog_with_mask(self, messages: list[dict]) -> tuple[list[int], list[bool]]:
        """The whole dialog for finetuning, and per token whether the loss should learn it:
        True only for assistant content and its closing eot/eom, so the model is not trained
        to write the user's turns or the headers it is always given."""
        tokens, mask = [self.tokenizer.bos_id], [False]
        for i, message in enumerate(messages):
            check_message(message, f"message {i}")
            header, body = self._header_and_body(message)
            tokens += header + body
            mask += [False] * len(header) + [message["role"] == "assistant"] * len(body)
        return tokens, mask
