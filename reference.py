"""The parity oracle for the tests: Meta's own Llama 3 code from the llama-models package.

Meta's model is built from fairscale's model-parallel layers, so it runs here on the CPU in
float32 at model-parallel size 1, over a one-process gloo group. llama31.py and tokenizer.py
are tested against what these functions return. llama_models is imported inside the
functions, so `import reference` stays cheap for tests that never use it.
"""

import contextlib
import importlib.util
import io
import sys
import types

import torch


def init_model_parallel() -> None:
    """Set up the one-process gloo group and fairscale's model-parallel groups of size 1.
    Safe to call again, and keeps a process group that someone else already started."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        # An in-memory store needs no file or port, so parallel test runs cannot collide.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(io.StringIO()):  # fairscale prints its group sizes
            fs_init.initialize_model_parallel(1)


def reference_model(params: dict, state_dict: dict, max_seq_len: int, max_batch_size: int):
    """Meta's llama_models.llama3.model.Transformer in float32 on the CPU, weights loaded
    strictly. params is a params.json dict (ModelArgs ignores keys it does not know)."""
    init_model_parallel()
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    args = ModelArgs(**{**params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size})
    # Meta's Llama3.build sets the global default device and dtype before building; a
    # device context is scoped instead, and .float() fixes the dtype whatever the default.
    with torch.device("cpu"):
        model = Transformer(args).float()
    model.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=True)
    return model.eval()


def reference_logits(model, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
    """Meta's forward: float32 logits (B, T, vocab) for tokens (B, T) at positions
    start_pos.. . With start_pos > 0 it attends to the KV cache left by earlier calls."""
    B, T = tokens.shape
    if B > model.params.max_batch_size or start_pos + T > model.params.max_seq_len:
        raise ValueError(
            f"tokens of shape {(B, T)} at start_pos {start_pos} do not fit the reference model's cache "
            f"(max_batch_size {model.params.max_batch_size}, max_seq_len {model.params.max_seq_len})"
        )
    # Meta's forward runs under inference_mode; a clone is an ordinary tensor again.
    return model.forward(tokens, start_pos).clone()


def _meta_generation():
    """Meta's generation module. It imports the vision model, which needs torchvision, and
    PyPI has only CUDA builds of torchvision, which fail beside a CPU torch. Text generation
    never touches the vision model, so without torchvision a placeholder stands in for it."""
    name = "llama_models.llama3.multimodal.model"
    if importlib.util.find_spec("torchvision") is None and name not in sys.modules:
        placeholder = types.ModuleType(name, "Placeholder: Meta's vision model needs torchvision.")
        placeholder.CrossAttentionTransformer = type("CrossAttentionTransformer", (), {})
        sys.modules[name] = placeholder
    from llama_models.llama3 import generation

    return generation


def reference_greedy(model, tokenizer, prompt_tokens: list[list[int]], max_gen_len: int) -> list[list[int]]:
    """Greedy decoding (temperature 0) by Meta's own Llama3.generate.

    For each prompt p, returns Meta's token row out[len(p) : len(p) + max_gen_len], cut
    before its first stop token (eos, eom or eot). Meta's rows end at total_len =
    min(max_prompt_len + max_gen_len, max_seq_len), so a prompt gets fewer than
    max_gen_len tokens only where max_seq_len cuts it off."""
    if not prompt_tokens or not all(prompt_tokens):
        raise ValueError("reference_greedy needs at least one prompt, each of at least one token")
    if max_gen_len < 1:  # Meta's generate reads 0 as "up to max_seq_len"
        raise ValueError(f"max_gen_len must be at least 1, got {max_gen_len}")
    longest = max(len(p) for p in prompt_tokens)
    if len(prompt_tokens) > model.params.max_batch_size or longest >= model.params.max_seq_len:
        # Meta's generate asserts on the first and silently yields nothing on the second.
        raise ValueError(
            f"{len(prompt_tokens)} prompts of up to {longest} tokens do not fit the reference model "
            f"(max_batch_size {model.params.max_batch_size}, max_seq_len {model.params.max_seq_len}: "
            "a prompt must leave room for one new token)"
        )
    generation = _meta_generation()
    from llama_models.llama3.chat_format import LLMInput

    init_model_parallel()
    llama = generation.Llama3(model, tokenizer, model.params)
    rows = [[] for _ in prompt_tokens]
    # generate yields, per position, one result per prompt; positions still inside a
    # prompt come flagged ignore_token and hold the prompt's own token.
    for step in llama.generate([LLMInput(tokens=p) for p in prompt_tokens], temperature=0, max_gen_len=max_gen_len):
        for result in step:
            if not result.ignore_token:
                rows[result.batch_idx].append(result.token)
    stops = set(tokenizer.stop_tokens)
    out = []
    for row in rows:
        row = row[:max_gen_len]
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        out.append(row[:cut])
    return out


def reference_top_p_nucleus(probs: torch.Tensor, p: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What Meta's own sample_top_p draws from: per row of probs, (token ids, probabilities) of the tokens it
    keeps, renormalised as it renormalises them, in the order of the ids. Meta's function runs unchanged; the
    module-level torch it calls is swapped for a view that records the arguments of its torch.multinomial
    (the renormalised sorted probabilities) and torch.gather (the sorted token ids)."""
    generation = _meta_generation()
    seen = {}

    class Recording:
        def __getattr__(self, name):
            return getattr(torch, name)

        def multinomial(self, probs_sort, *args, **kwargs):
            seen["probs"] = probs_sort.clone()
            return torch.multinomial(probs_sort, *args, **kwargs)

        def gather(self, probs_idx, *args, **kwargs):
            seen["idx"] = probs_idx.clone()
            return torch.gather(probs_idx, *args, **kwargs)

    generation.torch = Recording()
    try:
        generation.sample_top_p(probs.clone(), p)
    finally:
        generation.torch = torch
    return nucleus_by_id(seen["probs"], seen["idx"])


def nucleus_by_id(probs_sort: torch.Tensor, probs_idx: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (the ids of the tokens with probability > 0, their probabilities), in the order of the ids."""
    out = []
    for idx, row in zip(probs_idx, probs_sort):
        ids, q = idx[row > 0], row[row > 0]
        order = ids.argsort()
        out.append((ids[order], q[order]))
    return out


def reference_tokenizer():
    """Meta's Tokenizer, loaded once from the tokenizer.model that llama-models ships."""
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def reference_chat_format():
    """Meta's ChatFormat over reference_tokenizer()."""
    from llama_models.llama3.chat_format import ChatFormat

    return ChatFormat(reference_tokenizer())


def reference_dialog_tokens(messages: list[dict]) -> list[int]:
    """Meta's encode_dialog_prompt ids for messages given as tokenizer.ChatFormat takes them:
    dicts with role system/user/assistant/ipython, content, optional stop_reason."""
    from llama_models.datatypes import RawMessage, StopReason

    raw = [
        RawMessage(
            role="tool" if m["role"] == "ipython" else m["role"],  # Meta's Role.tool renders as ipython
            content=m["content"],
            stop_reason=StopReason(m["stop_reason"]) if m.get("stop_reason") else None,
        )
        for m in messages
    ]
    return reference_chat_format().encode_dialog_prompt(raw).tokens
