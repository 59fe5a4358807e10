"""Tests of llama31.py (and tokenizer.py): logits, greedy tokens and token ids against Meta's reference
(reference.py) and transformers, on tiny random-weight checkpoints written in Meta's and Hugging Face's real
formats; then the data pipeline, training (document masking, DDP and FSDP, exact resume), its reliability (SIGKILL,
signals, non-finite steps), security (no code from data files, no network) and the command line.

The sections follow llama31.py's: config, model, generation, Meta checkpoints, Hugging Face checkpoints, the
tokenizer, data, training; then reliability, security and the CLI. Fixtures and helpers that several sections use
come first; the others open their section. Tolerances are fixed in the tests and never loosened.
Run: python -m pytest -q test_llama31.py. GPU tests skip without CUDA."""

import ast
import contextlib
import dataclasses
import functools
import importlib.util
import io
import itertools
import json
import math
import os
import pickle  # to write the attacks the security tests refuse; llama31.py never imports it
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama31
import tokenizer as tk
from reference import (reference_dialog_tokens, reference_greedy, reference_logits, reference_model,
                       reference_tokenizer, reference_top_p_nucleus, nucleus_by_id)
from tokenizer import ChatFormat, Tokenizer, default_tokenizer_path

HERE = Path(__file__).resolve().parent
# DCP says so on every save and load without a process group: how one process saves, and how export reads
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
TOL = 1e-4  # max abs logit difference against Meta in float32; fixed, never loosened


# -----------------------------------------------------------------------------
# shared: the tiny model, checkpoints of it in Meta's format, the fixtures built on them

VOCAB = 128256
BOS, EOS = llama31.BOS_ID, 128001
NA = llama31.NOT_A_TARGET

# The one tiny Llama 3.1 of these tests, as its params.json: grouped-query attention (4 heads share 2 kv heads),
# scaled RoPE, Meta's FFN rounding.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=32,
            ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
# The overrides for the models the training, checkpoint-saving and file-fuzzing tests build: half as wide, the
# plain SwiGLU width, unscaled RoPE, 64 positions. Half the parameters (the 128,256-way embedding and output layer
# are most of them), 33 MB checkpoints; those tests' thresholds were set on this shape.
DIM32 = dict(dim=32, multiple_of=16, ffn_dim_multiplier=None, use_scaled_rope=False, max_seq_len=64)
SEQ, BATCH = 64, 4  # the runtime sizes Llama.build gets in the parity tests
CPU = torch.device("cpu")


def tiny_args(**kw) -> llama31.ModelArgs:
    """TINY as ModelArgs; kw overrides its keys or sets the runtime sizes (max_seq_len, max_batch_size)."""
    return llama31.ModelArgs(**{**TINY, **kw})


def tiny_model(seed: int, **kw) -> llama31.Transformer:
    """tiny_args(**kw) with random weights drawn from seed (Transformer.init_weights)."""
    model = llama31.Transformer(tiny_args(**kw))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def random_state_dict(params: dict, seed: int = 0) -> dict:
    """Random weights in bf16 (as Meta ships them), large enough that greedy choices are clear-cut."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama31.Transformer(llama31.ModelArgs(**params)).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            sd[k] = (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        else:
            sd[k] = (torch.randn(shape, generator=g) * 0.2).to(torch.bfloat16)
    return sd


def write_meta_checkpoint(path: Path, params: dict, sd: dict, n_files: int = 1) -> Path:
    """params.json + consolidated.NN.pth, split across n_files in Meta's model-parallel layout."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for i in range(n_files):
        part = {}
        for k, v in sd.items():
            if k.endswith(llama31.COLUMN_PARALLEL):
                part[k] = v.chunk(n_files, dim=0)[i].clone()
            elif k.endswith(llama31.ROW_PARALLEL):
                part[k] = v.chunk(n_files, dim=1)[i].clone()
            else:
                part[k] = v.clone()
        torch.save(part, path / f"consolidated.{i:02d}.pth")
    return path


def random_tokens(B, T, seed=1):
    return torch.randint(0, 128000, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_sd():
    return random_state_dict(TINY)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_sd):
    return write_meta_checkpoint(tmp_path_factory.mktemp("tiny"), TINY, tiny_sd)


@pytest.fixture(scope="module")
def meta(tiny_sd):
    return reference_model(TINY, tiny_sd, SEQ, BATCH)


@pytest.fixture(scope="module")
def llama(tiny_ckpt):
    return llama31.Llama.build(str(tiny_ckpt), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> Path:
    """A tiny random model saved as a checkpoint: train() builds from scratch only from a preset."""
    path = tmp_path_factory.mktemp("ckpt") / "init"
    llama31.save_checkpoint(tiny_model(seed=0, **DIM32), path, default_tokenizer_path())
    return path


# -----------------------------------------------------------------------------
# shared: checkpoint files written one by one to be broken (params.json and .pth for the error and fuzz tests)


class StateDict(dict):
    def __repr__(self):  # hypothesis prints the fixtures of a failing example
        return f"<state dict of {len(self)} tensors>"


def write_ckpt(path: Path, params, sd) -> Path:
    """params.json (a dict, or the file's text) and consolidated.00.pth (an object to save, the bytes of the
    file, or a file to hard-link: the tests write many checkpoints of 33 MB)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(params if isinstance(params, str) else json.dumps(params))
    pth = path / "consolidated.00.pth"
    pth.unlink(missing_ok=True)
    if isinstance(sd, Path):
        os.link(sd, pth)
    elif isinstance(sd, bytes):
        pth.write_bytes(sd)
    else:
        torch.save(dict(sd) if isinstance(sd, StateDict) else sd, pth)
    return path


@pytest.fixture(scope="module")
def good_sd() -> dict:
    return StateDict(tiny_model(seed=0, **DIM32).state_dict())


@pytest.fixture(scope="module")
def good_pth(good_sd, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "consolidated.00.pth"
    torch.save(dict(good_sd), path)
    return path


def load(path: Path):
    return llama31.load_model(path, None, 64, 1, CPU, torch.float32)


PARAMS = {**tiny_args(**DIM32).to_params(), "use_scaled_rope": True}  # good_sd's, as Llama 3.1's params.json


def with_changes(d: dict, changes: dict) -> dict:
    """d with each key of changes set to its value, or removed where that value is None."""
    out = dict(d)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def assert_shapes_of_tiny(a: llama31.ModelArgs):
    """a describes weights of tiny_args(**DIM32)'s shapes (good_sd's, init_ckpt's)."""
    b = tiny_args(**DIM32)
    assert (a.dim, a.n_layers, a.n_kv_heads * a.head_dim, a.hidden_dim) == (b.dim, b.n_layers,
                                                                             b.n_kv_heads * b.head_dim, b.hidden_dim)


with torch.device("meta"):
    SD_KEYS = sorted(llama31.Transformer(tiny_args(**DIM32)).state_dict())


def mutate_sd(sd: dict, kind: str, key: str):
    sd = dict(sd)
    if kind == "drop":
        sd.pop(key)
    elif kind == "extra":
        sd[key + ".extra"] = torch.zeros(1)
    elif kind == "shape":
        sd[key] = sd[key][..., :-1]
    elif kind == "unsqueeze":
        sd[key] = sd[key][None]
    elif kind in ("int", "bool", "complex"):
        sd[key] = sd[key].to({"int": torch.int32, "bool": torch.bool, "complex": torch.complex64}[kind])
    elif kind == "not_a_tensor":
        sd[key] = 1.5
    elif kind == "list":
        return list(sd.values())
    elif kind == "nested":
        return {"model": sd}
    elif kind == "tensor":
        return sd[key]
    return sd


# -----------------------------------------------------------------------------
# shared: the tokenizer, signal handlers, the GPU mark, fuzz settings, subprocesses


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """The Llama 3 tokenizer (llama-models' tokenizer.model), read once: every test that needs one takes this."""
    return Tokenizer(default_tokenizer_path())


@pytest.fixture
def cached_tokenizer(monkeypatch, tok):
    """llama31's own Tokenizer(path) hands out tok: prepare() and load_model() would read the file per call."""
    monkeypatch.setattr(llama31, "Tokenizer", lambda path: tok)


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """A train() that fails mid-way must not leave its SIGINT/SIGTERM handlers behind for later tests
    (test_train_restores_signal_handlers checks the normal path)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def fuzz(max_examples: int):
    """derandomized: the same examples every run, so a failure is reproducible"""
    return settings(max_examples=max_examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two processes share two cores
    return env


def run_cli(*args, script: str = "llama31.py", **kwargs):
    return subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


# -----------------------------------------------------------------------------
# config and presets: ModelArgs from params.json, the published shapes


def test_preset_parameter_counts():
    # the published sizes of Meta's models
    expected = {"llama3.1-8b": 8_030_261_248, "llama3.1-70b": 70_553_706_496, "llama3.1-405b": 405_853_388_800,
                "llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824}
    for name, n in expected.items():
        with torch.device("meta"):
            model = llama31.Transformer(llama31.preset(name))
        assert sum(p.numel() for p in model.parameters()) == n, name


def test_tied_embeddings_share_one_tensor():
    with torch.device("meta"):
        model = llama31.Transformer(llama31.preset("llama3.2-1b"))
    assert model.output.weight is model.tok_embeddings.weight


def test_bad_params_json(tmp_path, tiny_sd):
    ckpt = write_meta_checkpoint(tmp_path / "c", {**TINY, "dimm": 3}, tiny_sd)
    with pytest.raises(ValueError, match=r"params.json has keys this file does not know: \['dimm'\]"):
        llama31.Llama.build(str(ckpt), device="cpu")
    (ckpt / "params.json").write_text(json.dumps({**TINY, "n_layers": "2"}))
    with pytest.raises(ValueError, match="n_layers='2' must be a positive integer"):
        llama31.Llama.build(str(ckpt), device="cpu")
    (ckpt / "params.json").write_text("{not json")
    with pytest.raises(ValueError, match="params.json is not valid JSON"):
        llama31.Llama.build(str(ckpt), device="cpu")


@pytest.mark.parametrize("key, value", [
    ("dim", "32"), ("dim", 32.0), ("n_layers", True), ("n_heads", None), ("n_kv_heads", 3), ("vocab_size", -1),
    ("multiple_of", 0), ("norm_eps", "1e-5"), ("rope_theta", [5e5]), ("rope_scale_factor", 0),
    ("dim", None), ("n_layers", None),  # None stands for a missing key
    ("bogus_key", 1), ("vision_chunk_size", 560),
    # checked though the weights' shapes would not catch them: a wrong value would change the model silently
    ("rope_low_freq_factor", "x"), ("rope_high_freq_factor", 0.5), ("rope_old_context_len", "x"),
    ("ffn_dim_multiplier", [1.3]), ("ffn_hidden_dim", "64"), ("ffn_hidden_dim", 64.5), ("use_scaled_rope", "no"),
    ("tie_word_embeddings", "no"), ("norm_eps", float("inf")),
])
def test_params_json_wrong_type_or_missing_key_is_a_value_error(tmp_path, good_pth, cached_tokenizer, key,
                                                                 value):
    params = dict(PARAMS)
    if value is None:
        params.pop(key)
    else:
        params[key] = value
    path = write_ckpt(tmp_path / "ckpt", params, good_pth)
    with pytest.raises(ValueError, match=re.escape(key)):
        load(path)


@fuzz(60)
@given(changes=st.dictionaries(
    st.sampled_from(["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "norm_eps",
                     "rope_theta", "rope_scale_factor"]),
    st.none() | st.booleans() | st.integers(-3, 64) | st.floats(allow_nan=True) | st.text(max_size=3)
    | st.lists(st.integers(), max_size=2), min_size=1, max_size=3),
    text=st.none() | st.text(max_size=20))
def test_params_json_fuzz_loads_or_is_a_value_error(tmp_path, good_pth, cached_tokenizer, changes, text):
    params = with_changes(PARAMS, changes)
    path = write_ckpt(tmp_path / "ckpt", text if text is not None else params, good_pth)
    try:
        model, _ = load(path)
    except ValueError:
        return
    # what loads describes this very model: the given keys, and the shapes of the weights
    assert all(getattr(model.params, k) == v for k, v in params.items())
    assert_shapes_of_tiny(model.params)


def test_params_without_use_scaled_rope_mean_llama3_rope_as_in_meta(tmp_path, tiny_sd):
    params = {k: v for k, v in TINY.items() if k != "use_scaled_rope"}  # Llama 3.0's params.json
    ckpt = write_meta_checkpoint(tmp_path / "c", params, tiny_sd)
    ours = llama31.Llama.build(str(ckpt), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")
    assert ours.model.params.use_scaled_rope is False
    tokens = random_tokens(1, 40, seed=9)
    assert (ours.model(tokens) - reference_logits(reference_model(params, tiny_sd, SEQ, 1), tokens)).abs().max() < TOL


# -----------------------------------------------------------------------------
# model: logits equal Meta's, whole and through the KV cache; fused weights keep them


def test_logits_match_meta_whole_sequence(llama, meta):
    tokens = random_tokens(3, 40)
    ours = llama.model(tokens)
    theirs = reference_logits(meta, tokens)
    assert ours.dtype == torch.float32 and ours.shape == (3, 40, 128256)
    assert (ours - theirs).abs().max().item() < TOL


def test_logits_match_meta_step_by_step_through_kv_cache(llama, meta):
    tokens = random_tokens(2, 24, seed=2)
    model = llama.model
    model.setup_caches(2, SEQ)
    try:
        with torch.inference_mode():
            ours = [model(tokens[:, :8], torch.arange(8))]  # prefill, then one token at a time
            ours += [model(tokens[:, p: p + 1], torch.tensor([p])) for p in range(8, 24)]
    finally:
        model.clear_caches()
    theirs = [reference_logits(meta, tokens[:, :8], 0)]
    theirs += [reference_logits(meta, tokens[:, p: p + 1], p) for p in range(8, 24)]
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < TOL
    # and the cached path agrees with the cache-free one
    assert (torch.cat(ours, 1) - model(tokens)).abs().max().item() < TOL


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind a model's parameters and buffers."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*model.parameters(), *model.buffers()]}
    return sum(storages.values())


def test_fused_weights_keep_logits_meta_names_and_memory(tiny_ckpt, llama):
    assert llama.model.layers[0].attention.wqkv is not None  # Llama.build fuses
    plain, _ = llama31.load_model(tiny_ckpt, None, SEQ, BATCH, torch.device("cpu"), torch.float32)
    fused, _ = llama31.load_model(tiny_ckpt, None, SEQ, BATCH, torch.device("cpu"), torch.float32)
    before = storage_bytes(fused)
    fused.fuse_weights()
    assert storage_bytes(fused) == before  # wq, wk, wv (w1, w3) are now views of the fused matrix
    attn, ffn = fused.layers[1].attention, fused.layers[1].feed_forward
    assert attn.wk.weight.untyped_storage().data_ptr() == attn.wqkv.untyped_storage().data_ptr()
    assert ffn.w3.weight.untyped_storage().data_ptr() == ffn.w13.untyped_storage().data_ptr()
    sd, ref = fused.state_dict(), plain.state_dict()
    assert list(sd) == list(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)  # Meta's names, same values
    tokens = random_tokens(BATCH, SEQ)
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), plain(tokens), atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# generation: greedy tokens equal Meta's; sampling, stop tokens, text and chat completion


def test_defaults_on_cpu(llama):
    assert llama.model.tok_embeddings.weight.dtype == torch.float32
    assert llama.model.tok_embeddings.weight.device.type == "cpu"
    assert isinstance(llama.tokenizer, Tokenizer)


def test_batched_greedy_matches_meta_token_for_token(llama, meta):
    tok = llama.tokenizer
    prompts = ["Hello", "The capital of France is a city that", "1, 2, 3,"]
    prompt_tokens = [tok.encode(p, bos=True, eos=False) for p in prompts]
    ours = llama.generate(prompt_tokens, max_gen_len=16, temperature=0)
    theirs = reference_greedy(meta, reference_tokenizer(), prompt_tokens, max_gen_len=16)
    assert ours == theirs
    assert all(len(o) == 16 for o in ours)  # random weights never pick a stop token here
    # one prompt alone gives the same tokens as inside the batch
    assert llama.generate(prompt_tokens[1:2], max_gen_len=16, temperature=0) == ours[1:2]


def test_text_completion_echo_and_strings(llama):
    out = llama.text_completion(["Hello world"], temperature=0, max_gen_len=5)
    echoed = llama.text_completion(["Hello world"], temperature=0, max_gen_len=5, echo=True)
    assert isinstance(out[0]["generation"], str)
    assert echoed[0]["generation"] == "<|begin_of_text|>Hello world" + out[0]["generation"]


def test_generation_stops_at_stop_tokens(llama, monkeypatch):
    prompt = [llama.tokenizer.encode("Once upon a time", bos=True, eos=False)]
    free = llama.generate(prompt, max_gen_len=12, temperature=0)[0]
    # pretend the model's 5th new token is <|eot_id|>-like: generation must end right before it
    monkeypatch.setattr(llama.tokenizer, "stop_tokens", llama.tokenizer.stop_tokens + [free[4]])
    cut = llama.generate(prompt, max_gen_len=12, temperature=0)[0]
    assert cut == free[: free.index(free[4])]


def test_top_p_sampling_reproducible_from_seed(llama):
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in ("Hi", "A longer prompt here")]

    def run(seed):
        return llama.generate(prompts, max_gen_len=20, temperature=1.0, top_p=0.9,
                              sample_rng=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert a == b
    assert a != c
    assert a != llama.generate(prompts, max_gen_len=20, temperature=0)


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    g = torch.Generator().manual_seed(0)
    draws = {int(llama31.sample_top_p(probs.clone(), 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 < 0.7, so the token crossing p (0.3) is kept, the rest dropped


def assert_same_nucleus(ours: tuple, meta: tuple):
    """The same tokens, and their renormalised probabilities equal to float32 rounding: both divide by a
    float32 sum of the same numbers in another order (Meta's over the whole vocabulary with zeros, ours over
    the candidates), each within about log2(128256) * 2^-24 = 1.0e-6 relative (pairwise summation), plus
    2^-24 for the division: 3e-6 relative."""
    assert torch.equal(ours[0], meta[0]), (len(ours[0]), len(meta[0]))
    assert torch.allclose(ours[1], meta[1], rtol=3e-6, atol=0), ((ours[1] - meta[1]).abs() / meta[1]).max()


# peaked (a few tokens), spread (hundreds to thousands: past the first 256 candidates), flat (most of the
# vocabulary: the whole sort), at the temperatures and top_p of Meta's scripts and the demo
@pytest.mark.parametrize("scale", [12.0, 3.0, 0.3])
def test_top_p_nucleus_equals_metas(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    for trial in range(2):
        logits = torch.randn(2, VOCAB, generator=g) * scale
        logits[1, :300] += 4 * scale * torch.rand(300, generator=g)  # a second row with a heavier head
        for temperature, p in ((0.6, 0.9), (0.8, 0.95), (1.0, 0.5)):
            probs = torch.softmax(logits / temperature, dim=-1)
            ours = nucleus_by_id(*llama31.top_p_nucleus(probs.clone(), p))
            for o, m in zip(ours, reference_top_p_nucleus(probs, p)):
                assert_same_nucleus(o, m)


def test_top_p_nucleus_at_the_edge_of_the_candidates():
    """A nucleus that ends just inside, at, or just past the first 256 candidates (and p = 1, every token):
    the margin never drops a token past the candidates that Meta keeps. The probabilities are distinct
    (neighbours 1/128256 apart, far above float32's 2^-24), so the sorted order has no ties to break."""
    g = torch.Generator().manual_seed(0)
    spread = 1 + torch.arange(VOCAB, 0, -1, dtype=torch.float64) / VOCAB  # descending, distinct
    for p in (0.5, 0.9):
        for extra in (-1e-5, -1e-7, 0.0, 1e-7, 1e-5):  # the first 256 tokens hold p + extra of the mass
            probs = spread.clone()
            probs[:256] *= (p + extra) / float(probs[:256].sum())
            probs[256:] *= (1 - p - extra) / float(probs[256:].sum())
            probs = probs.float()[torch.randperm(VOCAB, generator=g)][None]
            assert_same_nucleus(nucleus_by_id(*llama31.top_p_nucleus(probs.clone(), p))[0],
                                reference_top_p_nucleus(probs, p)[0])
    probs = torch.softmax(torch.randn(1, VOCAB, generator=g) * 5, dim=-1)
    assert_same_nucleus(nucleus_by_id(*llama31.top_p_nucleus(probs.clone(), 1.0))[0],
                        reference_top_p_nucleus(probs, 1.0)[0])


def test_top_p_sampling_frequencies_match_the_nucleus():
    """20,000 draws from a 1,000-token distribution with a 12-token nucleus: each token's count lies within 5
    standard deviations of its binomial mean (n q, sqrt(n q (1 - q))) under Meta's nucleus probabilities q;
    tokens outside the nucleus are never drawn."""
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(1000, generator=g) * 3, dim=-1)
    ids, q = reference_top_p_nucleus(probs[None], 0.8)[0]
    n, counts = 20_000, torch.zeros(1000)
    for _ in range(10):
        counts += torch.bincount(llama31.sample_top_p(probs.expand(2000, -1).clone(), 0.8, g), minlength=1000)
    assert set(counts.nonzero().flatten().tolist()) <= set(ids.tolist())
    assert (counts[ids] - n * q).abs().le(5 * (n * q * (1 - q)).sqrt()).all(), (counts[ids], n * q)


def test_chat_completion_uses_meta_dialog_tokens(llama):

    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = reference_dialog_tokens(dialog)
    assert llama.formatter.encode_dialog_prompt(dialog) == prompt
    want = llama.tokenizer.decode(llama.generate([prompt], max_gen_len=10, temperature=0)[0])
    out = llama.chat_completion([dialog], temperature=0, max_gen_len=10)
    assert out == [{"generation": {"role": "assistant", "content": want}}]


def test_generation_argument_errors(llama):
    tok = llama.tokenizer
    with pytest.raises(ValueError, match="no room to generate within max_seq_len=64"):
        llama.generate([list(range(64))], max_gen_len=4)
    with pytest.raises(ValueError, match="5 prompts given, but max_batch_size is 4"):
        llama.generate([[1]] * 5, max_gen_len=4)
    with pytest.raises(ValueError, match="temperature=-0.1 must be >= 0"):
        llama.text_completion(["x"], temperature=-0.1)
    for top_p in (0.0, 1.5):
        with pytest.raises(ValueError, match=f"top_p={top_p} must be in"):
            llama.text_completion(["x"], top_p=top_p)
    with pytest.raises(ValueError, match="empty prompt"):
        llama.generate([tok.encode("x", bos=True, eos=False), []], max_gen_len=4)


@cuda
def test_gpu_bf16_build_matches_cpu_float32(tiny_ckpt, llama):
    gpu = llama31.Llama.build(str(tiny_ckpt), max_seq_len=SEQ, max_batch_size=BATCH)
    assert gpu.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert gpu.model.tok_embeddings.weight.device.type == "cuda"
    tokens = random_tokens(2, 32, seed=4)
    ours = gpu.model(tokens.cuda()).cpu()
    ref = llama.model(tokens)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < 2e-2  # bf16 weights and activations against float32
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello", "The capital of France")]
    out = gpu.generate(prompts, max_gen_len=8, temperature=0)
    assert [len(o) for o in out] == [8, 8]


@cuda
def test_gpu_compiled_greedy_equals_eager(tiny_ckpt):
    eager = llama31.Llama.build(str(tiny_ckpt), max_seq_len=SEQ, max_batch_size=BATCH, dtype="float32")
    compiled = llama31.Llama.build(str(tiny_ckpt), max_seq_len=SEQ, max_batch_size=BATCH, dtype="float32",
                                   compile=True)
    prompts = [eager.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello", "The capital of France is")]
    want = eager.generate(prompts, max_gen_len=24, temperature=0)
    assert compiled.generate(prompts, max_gen_len=24, temperature=0) == want
    assert compiled.generate(prompts, max_gen_len=24, temperature=0) == want  # replayed, not re-recorded


@cuda
def test_gpu_decode_attention_kernel_reads_up_to_the_token_within_its_rounding():
    """decode_attention against float64 attention over positions 0..pos of the same inputs, with NaN in every
    cached position after pos (never read): at chunk edges, past 16 chunks (the combine's second tile), for 1,
    4 and 8 query heads a kv head and 64 (batch row, kv head) pairs or more (256-position chunks). The bound,
    to first order: the kernel rounds the softmax weights p <= 1 to the inputs' dtype before p @ v (unit
    roundoff u: 2^-8 bf16, 2^-11 fp16), which moves the output by at most u max|v| over the positions it
    weighs (the sum it divides by is of the unrounded p), and rounds the output once (u |exact|); the u^2
    terms, its float32 sums and exp2 add far less (the largest error seen is half the bound). In a CUDA
    graph: the same result."""
    g = torch.Generator().manual_seed(0)
    for (B, n_heads, n_kv_heads, D, S), dtype in (((1, 32, 8, 128, 2200), torch.bfloat16),
                                                  ((9, 8, 8, 64, 2600), torch.float16),
                                                  ((2, 16, 2, 16, 300), torch.bfloat16)):
        u = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
        q = torch.randn(B, n_heads, 1, D, generator=g).to(dtype)
        k, v = (torch.randn(B, n_kv_heads, S, D, generator=g).to(dtype) for _ in range(2))
        for pos in (0, 1, 127, 128, 129, 255, 256, 257, S // 2, S - 1):
            seen = slice(0, pos + 1)
            scores = q.double() @ k[:, :, seen].double().repeat_interleave(n_heads // n_kv_heads, 1).transpose(2, 3)
            vs = v[:, :, seen].double().repeat_interleave(n_heads // n_kv_heads, 1)
            exact = torch.softmax(scores / math.sqrt(D), dim=-1) @ vs  # (B, n_heads, 1, D)
            kp, vp = k.clone(), v.clone()
            kp[:, :, pos + 1:], vp[:, :, pos + 1:] = float("nan"), float("nan")
            got = llama31.decode_attention(q.cuda(), kp.cuda(), vp.cuda(), torch.tensor([pos]).cuda()).cpu()
            assert got.dtype == dtype and got.shape == exact.shape
            bound = u * (vs.abs().amax(dim=(2, 3), keepdim=True) + exact.abs())
            assert ((got.double() - exact).abs() <= bound).all(), (B, S, pos, dtype)
    compiled = torch.compile(llama31.decode_attention, fullgraph=True, options={"triton.cudagraphs": True})
    ip = torch.tensor([S - 7]).cuda()
    for _ in range(3):  # recorded, then replayed
        assert torch.equal(compiled(q.cuda(), k.cuda(), v.cuda(), ip), llama31.decode_attention(q.cuda(), k.cuda(),
                                                                                             v.cuda(), ip))


@cuda
def test_gpu_fp16_decode_steps_match_cpu_float32_reading_the_cache_up_to_the_token(tiny_ckpt):
    """fp16 decode steps on the GPU, compiled (decode_attention over the cache) and eager (SDPA over the whole
    cache), give the float32 CPU model's logits at positions in the cache's third chunk of 128; compiled, with
    NaN in every cached position of the fourth, which it never reads. fp16, not bf16: at 266 positions the
    bf16 model's own full forward (SDPA) is 2.5-3% from float32 (measured on an H200), and the kernel's
    rounding equals SDPA's there; fp16 rounds 8 times finer."""
    cpu = llama31.Llama.build(str(tiny_ckpt), max_seq_len=512, max_batch_size=2, device="cpu")
    tokens = random_tokens(2, 269, seed=5)
    want = cpu.model(tokens)[:, 266:]  # (2, 3, vocab): the logits after tokens 266, 267, 268
    for compile in (False, True):
        gpu = llama31.Llama.build(str(tiny_ckpt), max_seq_len=512, max_batch_size=2, dtype="float16", compile=compile)
        gpu.model.setup_caches(2, 512)
        with torch.inference_mode():
            llama31.prefill(gpu.model, tokens[:, :266].cuda(), torch.arange(266, device="cuda"))
            for layer in gpu.model.layers if compile else ():  # SDPA reads (and masks) every position
                layer.attention.cache.cache_k[:, :, 384:] = float("nan")
                layer.attention.cache.cache_v[:, :, 384:] = float("nan")
            for i, pos in enumerate(range(266, 269)):  # compiled: recorded, then replayed
                got = gpu.decode(gpu.model, tokens[:, pos:pos + 1].cuda(), torch.tensor([pos], device="cuda"))
                got = got.float().cpu()
                assert torch.isfinite(got).all()
                rel = ((got - want[:, i]).norm() / want[:, i].norm()).item()
                assert rel < 2e-2, (compile, pos, rel)  # the GPU tests' bound for bf16 against float32


# -----------------------------------------------------------------------------
# checkpoint loading and saving (Meta's format): model-parallel files, clear errors, atomic saves


@pytest.mark.parametrize("n_files", [2, 4])
def test_model_parallel_files_merge_to_same_logits(tmp_path, tiny_sd, llama, n_files):
    ckpt = write_meta_checkpoint(tmp_path / f"mp{n_files}", TINY, tiny_sd, n_files)
    merged = llama31.Llama.build(str(ckpt), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")
    tokens = random_tokens(2, 16, seed=3)
    assert torch.equal(merged.model(tokens), llama.model(tokens))


def test_missing_and_empty_checkpoint_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        llama31.Llama.build(str(tmp_path / "nope"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is empty"):
        llama31.Llama.build(str(tmp_path / "empty"), device="cpu")
    (tmp_path / "noparams").mkdir()
    (tmp_path / "noparams" / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no params.json"):
        llama31.Llama.build(str(tmp_path / "noparams"), device="cpu")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "params.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="no consolidated"):
        llama31.Llama.build(str(tmp_path / "noweights"), device="cpu")


def test_missing_tokenizer(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        llama31.Llama.build(str(tiny_ckpt), tokenizer_path=str(tmp_path / "nope.model"), device="cpu")


def test_vocab_size_must_match_tokenizer(tmp_path):
    params = {**TINY, "vocab_size": 1000}
    ckpt = write_meta_checkpoint(tmp_path / "c", params, random_state_dict(params))
    with pytest.raises(ValueError, match="vocab_size=1000 but the tokenizer has 128256"):
        llama31.Llama.build(str(ckpt), device="cpu")


def test_checkpoint_files_that_do_not_fit(tmp_path, tiny_sd):
    ckpt = write_meta_checkpoint(tmp_path / "gap", TINY, tiny_sd, n_files=2)
    (ckpt / "consolidated.01.pth").rename(ckpt / "consolidated.02.pth")
    with pytest.raises(ValueError, match="do not fit together"):
        llama31.Llama.build(str(ckpt), device="cpu")
    ckpt = write_meta_checkpoint(tmp_path / "mixed", TINY, tiny_sd, n_files=2)
    other = {**TINY, "dim": 128}
    torch.save({k: v.chunk(2, 0)[0] for k, v in random_state_dict(other).items()}, ckpt / "consolidated.01.pth")
    with pytest.raises(ValueError, match="cannot be joined|does not match|has shape"):
        llama31.Llama.build(str(ckpt), device="cpu")


def test_wrong_checkpoint_is_refused_with_keys_named(tmp_path, tiny_sd):
    sd = dict(tiny_sd)
    del sd["layers.1.ffn_norm.weight"]
    sd["layers.1.extra.weight"] = torch.zeros(3)
    ckpt = write_meta_checkpoint(tmp_path / "c", TINY, sd)
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.ffn_norm.weight'\].*unexpected keys "
                                         r"\['layers.1.extra.weight'\]"):
        llama31.Llama.build(str(ckpt), device="cpu")
    sd = dict(tiny_sd)
    sd["norm.weight"] = torch.ones(65, dtype=torch.bfloat16)
    ckpt = write_meta_checkpoint(tmp_path / "d", TINY, sd)
    with pytest.raises(ValueError, match=r"norm.weight has shape \(65,\), but the config implies \(64,\)"):
        llama31.Llama.build(str(ckpt), device="cpu")
    (ckpt / "consolidated.00.pth").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="consolidated.00.pth is not a readable PyTorch checkpoint"):
        llama31.Llama.build(str(ckpt), device="cpu")


@fuzz(40)
@given(kind=st.sampled_from(["drop", "extra", "shape", "unsqueeze", "int", "bool", "complex", "not_a_tensor",
                             "list", "nested", "tensor"]),
       key=st.sampled_from(SD_KEYS))
def test_pth_with_wrong_content_is_a_value_error_naming_file_or_key(tmp_path, good_sd, cached_tokenizer, kind,
                                                                      key):
    path = write_ckpt(tmp_path / "ckpt", PARAMS, mutate_sd(good_sd, kind, key))
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg
    if kind in ("drop", "shape", "unsqueeze", "int", "bool", "complex", "extra"):
        assert key in msg


@fuzz(30)
@given(data=st.binary(max_size=600))
def test_pth_of_random_bytes_is_a_value_error_naming_it(tmp_path, data):
    path = write_ckpt(tmp_path / "ckpt", PARAMS, data)
    with pytest.raises(ValueError, match=re.escape(str(path / "consolidated.00.pth"))):
        load(path)


def test_pth_with_non_string_keys_is_a_value_error(tmp_path, good_sd, cached_tokenizer):
    path = write_ckpt(tmp_path / "ckpt", PARAMS, {**good_sd, 0: torch.zeros(1), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load(path)


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_saved_checkpoint_reloads_exactly_and_in_meta_reference(tmp_path, tie):
    model = tiny_model(seed=5, tie_word_embeddings=tie, **DIM32).eval()
    ckpt = tmp_path / "ckpt"
    llama31.save_checkpoint(model, ckpt, default_tokenizer_path())
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = BOS
    ours = model(tokens)
    llama = llama31.Llama.build(str(ckpt), max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    assert torch.equal(llama.model(tokens), ours)
    assert (llama.model.output.weight is llama.model.tok_embeddings.weight) == tie

    params = json.loads((ckpt / "params.json").read_text())
    sd = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    meta = reference_model(params, sd, max_seq_len=64, max_batch_size=2)  # loads strictly
    assert torch.allclose(reference_logits(meta, tokens), ours, rtol=0, atol=1e-4)


def failing_after(n: int, real, exc=OSError):
    """A stand-in for real that works n times, then raises exc (a crash at that point of a save)."""
    calls = []

    def f(*a, **k):
        calls.append(1)
        if len(calls) > n:
            raise exc("injected failure")
        return real(*a, **k)
    return f


@pytest.mark.parametrize("where", ["weights", "tokenizer", "interrupt"])
def test_failed_save_leaves_no_partial_step_dir(tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    old = out / "step_000001"
    llama31.save_checkpoint(tiny_model(seed=1, **DIM32), old, default_tokenizer_path())
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    if where == "tokenizer":
        monkeypatch.setattr(shutil, "copyfile", failing_after(0, shutil.copyfile))
    else:
        exc = KeyboardInterrupt if where == "interrupt" else OSError
        monkeypatch.setattr(torch, "save", failing_after(0, torch.save, exc))
    with pytest.raises((OSError, KeyboardInterrupt), match="injected failure"):
        llama31.save_checkpoint(tiny_model(seed=2, **DIM32), out / "step_000002", default_tokenizer_path())
    assert [p.name for p in out.iterdir()] == ["step_000001"]  # no partial dir, no temporary left
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_a_checkpoint_is_never_overwritten(tmp_path, monkeypatch):
    out = tmp_path / "step_000003"
    llama31.save_checkpoint(tiny_model(seed=1, **DIM32), out, default_tokenizer_path())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # replacing a directory takes two renames, and a crash between them would leave no step_000003
    with pytest.raises(FileExistsError, match=re.escape(str(out))):
        llama31.save_checkpoint(tiny_model(seed=2, **DIM32), out, default_tokenizer_path())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["step_000003"]
    (tmp_path / "empty").mkdir()  # an empty directory made beforehand is fine
    llama31.save_checkpoint(tiny_model(seed=2, **DIM32), tmp_path / "empty", default_tokenizer_path())
    assert (tmp_path / "empty" / "consolidated.00.pth").exists()


# -----------------------------------------------------------------------------
# Hugging Face checkpoints and convert: logits and greedy tokens equal transformers'


def hf_llama(tmp_path, tie: bool, rope_factor: float, legacy_config: bool = False, seed: int = 0):
    """A tiny LlamaForCausalLM saved by transformers itself (sharded safetensors + index), with weights as
    large as the Meta fixtures so greedy choices are clear-cut. legacy_config rewrites config.json the way
    transformers 4.x (and the Hub's files) have it: rope_scaling + rope_theta."""
    from transformers import LlamaConfig, LlamaForCausalLM
    rope = {"rope_type": "llama3", "factor": rope_factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    config = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         tie_word_embeddings=tie, rope_parameters=rope, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    path = tmp_path / f"hf-{tie}-{rope_factor}-{legacy_config}"
    model.save_pretrained(path, max_shard_size="20MB")
    if legacy_config:
        cfg = json.loads((path / "config.json").read_text())
        params = cfg.pop("rope_parameters")
        cfg["rope_theta"] = params.pop("rope_theta")
        cfg["rope_scaling"] = params
        (path / "config.json").write_text(json.dumps(cfg))
    return model, path


@pytest.mark.parametrize("tie,rope_factor,legacy", [(False, 8.0, True), (True, 32.0, False)])
def test_hf_checkpoint_matches_transformers(tmp_path, tie, rope_factor, legacy):
    hf, path = hf_llama(tmp_path, tie, rope_factor, legacy)
    assert (path / "model.safetensors.index.json").exists()
    ours = llama31.Llama.build(str(path), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")
    assert ours.model.params.tie_word_embeddings == tie and ours.model.params.rope_scale_factor == rope_factor
    tokens = random_tokens(2, 40, seed=5)
    a = ours.model(tokens)
    with torch.no_grad():
        b = hf(tokens).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 1e-4
    prompt = ours.tokenizer.encode("The capital of France is", bos=True, eos=False)
    ids = ours.generate([prompt], max_gen_len=12, temperature=0)[0]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           pad_token_id=0)[0, len(prompt):].tolist()
    assert ids == want


def test_convert_meta_to_hf_and_back(tmp_path, tiny_ckpt, llama):
    from transformers import LlamaForCausalLM
    r = run_cli("convert", "--ckpt_dir", str(tiny_ckpt), "--out_dir", str(tmp_path / "hf"), "--to", "hf")
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(rf"wrote {tmp_path / 'hf'}: config.json \([\d.]+ MB\), model.safetensors \([\d.]+ MB\), "
                        r"tokenizer.model \([\d.]+ MB\)\n", r.stderr), r.stderr
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = random_tokens(2, 24, seed=6)
    with torch.no_grad():
        b = hf(tokens).logits.float()
    a = llama.model(tokens)
    assert ((a - b).norm() / b.norm()).item() < 1e-4
    llama31.convert(str(tmp_path / "hf"), str(tmp_path / "meta"), to="meta")
    back = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    orig = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    assert back.keys() == orig.keys()
    assert all(torch.equal(back[k], orig[k]) and back[k].dtype == torch.bfloat16 for k in orig)
    params = llama31.ModelArgs.from_params(json.loads((tmp_path / "meta" / "params.json").read_text()))
    assert params.hidden_dim == tiny_args().hidden_dim
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left
    # every file as open() makes one (0644 under umask 022): safetensors' own save_file writes 0600
    modes = {f"{d}/{p.name}": p.stat().st_mode & 0o777 for d in ("hf", "meta") for p in (tmp_path / d).iterdir()}
    assert len(modes) == 6 and set(modes.values()) == {0o666 & ~current_umask()}, modes


def test_convert_writes_metas_params_for_each_published_shape():
    """meta_ffn_args gives the multiple_of / ffn_dim_multiplier of Meta's own params.json for each published
    SwiGLU width (a Hugging Face config has only the width), not just a pair that gives the same width."""
    published = {  # dim: (intermediate_size, Meta's params.json)
        4096: (14336, dict(multiple_of=1024, ffn_dim_multiplier=1.3)),  # Llama 3.1 8B
        8192: (28672, dict(multiple_of=4096, ffn_dim_multiplier=1.3)),  # Llama 3.1 70B
        16384: (53248, dict(multiple_of=4096, ffn_dim_multiplier=1.2)),  # Llama 3.1 405B
        2048: (8192, dict(multiple_of=256, ffn_dim_multiplier=1.5)),  # Llama 3.2 1B
        3072: (8192, dict(multiple_of=256, ffn_dim_multiplier=1.0)),  # Llama 3.2 3B
    }
    for dim, (width, params) in published.items():
        assert llama31.meta_ffn_args(dim, width) == params, dim
        assert llama31.ModelArgs(dim=dim, n_heads=1, **params).hidden_dim == width
    assert llama31.meta_ffn_args(4096, 11008) == dict(multiple_of=256, ffn_dim_multiplier=None)  # no preset: search


def test_hf_checkpoint_errors(tmp_path):
    _, path = hf_llama(tmp_path, False, 8.0)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks model-00002-of-00003.safetensors"):
        llama31.Llama.build(str(path), device="cpu")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral"}))
    with pytest.raises(ValueError, match="does not describe a Llama model"):
        llama31.Llama.build(str(path), device="cpu")
    del cfg["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks the key 'num_hidden_layers'"):
        llama31.Llama.build(str(path), device="cpu")


@pytest.fixture(scope="module")
def hf_dir(init_ckpt, tmp_path_factory) -> Path:
    """The dim-32 init checkpoint as Hugging Face files (config.json + model.safetensors)."""
    path = tmp_path_factory.mktemp("hf") / "hf"
    llama31.convert(str(init_ckpt), str(path), to="hf")
    return path


def write_hf(path: Path, config, hf_dir: Path, weights=None) -> Path:
    """config.json (a dict, or the file's text) and model.safetensors (hf_dir's, linked, or a dict of
    tensors, or the bytes of the file)."""
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    st_file = path / "model.safetensors"
    st_file.unlink(missing_ok=True)
    if weights is None:
        os.link(hf_dir / "model.safetensors", st_file)
    elif isinstance(weights, bytes):
        st_file.write_bytes(weights)
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, st_file)
    return path


HF_KEYS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "intermediate_size",
           "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "head_dim",
           "model_type", "hidden_act", "attention_bias"]


@fuzz(60)
@given(changes=st.dictionaries(
    st.sampled_from(HF_KEYS),
    st.none() | st.booleans() | st.integers(-3, 300) | st.floats(allow_nan=True) | st.text(max_size=3)
    | st.lists(st.integers(), max_size=2)
    | st.dictionaries(st.sampled_from(["rope_type", "factor", "low_freq_factor", "high_freq_factor"]),
                      st.sampled_from(["llama3", "yarn", 0, 1.0, 4, "x"]), max_size=3),
    min_size=1, max_size=3),
    text=st.none() | st.text(max_size=20))
def test_hf_config_fuzz_loads_or_is_a_value_error(tmp_path, hf_dir, cached_tokenizer, changes, text):
    config = with_changes(json.loads((hf_dir / "config.json").read_text()), changes)
    path = write_hf(tmp_path / "hf", text if text is not None else config, hf_dir)
    try:
        model, _ = load(path)
    except ValueError:
        return
    assert_shapes_of_tiny(model.params)  # what loads is the model in the weights


HF_SD_KEYS = [llama31.hf_name(k) for k in SD_KEYS]


@fuzz(40)
@given(kind=st.sampled_from(["drop", "extra", "shape", "unsqueeze", "int", "bool"]), key=st.sampled_from(HF_SD_KEYS))
def test_safetensors_with_wrong_content_is_a_value_error_naming_it(tmp_path, hf_dir, cached_tokenizer, kind, key):
    from safetensors.torch import load_file
    config = json.loads((hf_dir / "config.json").read_text())
    path = write_hf(tmp_path / "hf", config, hf_dir, mutate_sd(load_file(hf_dir / "model.safetensors"), kind, key))
    with pytest.raises(ValueError) as e:
        load(path)
    msg = str(e.value)
    assert str(path) in msg
    meta_key = SD_KEYS[HF_SD_KEYS.index(key)]
    assert key in msg or meta_key in msg, msg


@fuzz(30)
@given(data=st.binary(max_size=600))
def test_safetensors_of_random_bytes_is_a_value_error_naming_it(tmp_path, hf_dir, data):
    path = write_hf(tmp_path / "hf", json.loads((hf_dir / "config.json").read_text()), hf_dir, data)
    with pytest.raises(ValueError, match=re.escape(str(path / "model.safetensors"))):
        load(path)


def test_safetensors_index_cannot_point_outside_its_directory(tmp_path, hf_dir, cached_tokenizer):
    path = write_hf(tmp_path / "hf", json.loads((hf_dir / "config.json").read_text()), hf_dir)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.embed_tokens.weight": "../hf_elsewhere/model.safetensors"}}))
    with pytest.raises(ValueError, match="weight_map of weight names to file names"):
        load(path)


# -----------------------------------------------------------------------------
# training checkpoints (torch.distributed.checkpoint) and export: saved by each rank, loaded back exactly,
# exported tensor by tensor


def stepped_model(seed: int, tie: bool) -> tuple:
    """A tiny model and its AdamW after two steps on random tokens: weights moved away from their init, both
    moments non-zero."""
    model = tiny_model(seed, tie_word_embeddings=tie, **DIM32)
    optimizer = llama31.configure_optimizer(model, 1e-2, 0.1, CPU)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randint(0, VOCAB, (2, 16), generator=g)
        model(x, targets=x).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval(), optimizer


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def saved(request, tmp_path_factory) -> tuple:
    """(model, optimizer, step dir): a checkpoint of step 7 saved by one process."""
    model, optimizer = stepped_model(seed=3, tie=request.param)
    out = tmp_path_factory.mktemp("dcp")
    llama31.Checkpointer(out).save(7, model, optimizer, shard=1, position=96, tokenizer_path=default_tokenizer_path())
    return model, optimizer, out / "step_000007"


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_training_checkpoint_holds_weights_moments_and_position_and_loads_back_exactly(saved):
    model, optimizer, step_dir = saved
    assert sorted(p.name for p in step_dir.iterdir()) == [".metadata", "__0_0.distcp", "params.json",
                                                          "tokenizer.model"]
    assert not list(step_dir.parent.glob(".step_*"))  # the temporary directory was renamed into place
    fresh = tiny_model(seed=99, tie_word_embeddings=model.params.tie_word_embeddings, **DIM32)
    fresh_opt = llama31.configure_optimizer(fresh, 1e-2, 0.1, CPU)
    state = llama31.load_training_checkpoint(step_dir, fresh, fresh_opt)
    assert state == {"step": 7, "shard": 1, "position": 96}
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert (fresh.output.weight is fresh.tok_embeddings.weight) == model.params.tie_word_embeddings
    a, b = optimizer.state_dict(), fresh_opt.state_dict()
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert_same_state(a["state"][i], b["state"][i])  # step, exp_avg, exp_avg_sq: bitwise


def test_a_training_checkpoint_is_never_overwritten_and_a_failed_save_leaves_nothing(saved, tmp_path,
                                                                                     monkeypatch):
    model, optimizer, step_dir = saved
    out = step_dir.parent
    before = {p.name: p.read_bytes() for p in step_dir.iterdir()}
    with pytest.raises(FileExistsError, match=re.escape(f"{step_dir} already exists")):
        llama31.Checkpointer(out).save(7, model, optimizer, 0, 0, default_tokenizer_path())
    monkeypatch.setattr(torch, "save", failing_after(3, torch.save))  # the fourth tensor DCP writes
    with pytest.raises(OSError, match="injected failure"):
        llama31.Checkpointer(out).save(8, model, optimizer, 0, 0, default_tokenizer_path())
    assert [p.name for p in out.iterdir()] == [step_dir.name]  # no step_000008, no temporary directory
    assert {p.name: p.read_bytes() for p in step_dir.iterdir()} == before


def test_disk_space_check_counts_weights_both_moments_and_the_export(tmp_path, monkeypatch):
    """12 bytes a parameter for the float32 weights and AdamW's two moments (the tied embedding once), and
    2 a parameter for the bf16 export, in which Meta's format holds the tied embedding twice, and as much
    again for its scratch file while it is written."""
    model = tiny_model(seed=0, tie_word_embeddings=True, **DIM32)
    n = sum(p.numel() for p in model.parameters())
    checkpoint, exported = 12 * n, 2 * 2 * (n + VOCAB * 32)
    for free in (checkpoint + exported - 1, checkpoint + exported):
        monkeypatch.setattr(shutil, "disk_usage", lambda path: types.SimpleNamespace(free=free))
        if free < checkpoint + exported:
            with pytest.raises(OSError, match=re.escape(f"needs about {checkpoint / 1e9:.2f} GB and its export "
                                                        f"{exported / 1e9:.2f} GB while written")):
                llama31.check_disk_space(tmp_path, model)
        else:
            llama31.check_disk_space(tmp_path, model)


@torch.no_grad()
def test_export_equals_the_trained_weights_cast_and_metas_code_loads_it(saved, tmp_path):
    model, _, step_dir = saved
    llama31.export(str(step_dir), str(tmp_path / "bf16"))  # bfloat16 by default
    llama31.export(str(step_dir), str(tmp_path / "fp32"), dtype="float32")
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        out = tmp_path / name
        assert sorted(p.name for p in out.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
        sd = torch.load(out / "consolidated.00.pth", weights_only=True)
        # every weight under Meta's name (output.weight too when tied: Meta's code needs it), cast exactly
        assert_same_state(sd, {k: v.to(dtype) for k, v in model.state_dict().items()})
        assert json.loads((out / "params.json").read_text()) == model.params.to_params()
    # Meta's own Transformer loads the bf16 export (strictly) and gives our model's logits of those weights
    tokens = random_tokens(2, 24, seed=4)
    sd = torch.load(tmp_path / "bf16" / "consolidated.00.pth", weights_only=True)
    meta = reference_model(json.loads((tmp_path / "bf16" / "params.json").read_text()), sd, 64, 2)
    ours = llama31.Llama.build(str(tmp_path / "bf16"), max_seq_len=64, max_batch_size=2, device="cpu",
                               dtype="float32").model
    assert (reference_logits(meta, tokens) - ours(tokens)).abs().max() < TOL
    # Llama.build reads the training checkpoint itself: the trained float32 weights, bitwise the same logits
    direct = llama31.Llama.build(str(step_dir), max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    assert torch.equal(direct.model(tokens), model(tokens))
    assert not list(tmp_path.glob("**/*.scratch")) and not list(tmp_path.glob(".*"))  # no temporary left


@torch.no_grad()
def test_export_to_hugging_face_matches_transformers(saved, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM
    model, _, step_dir = saved
    llama31.export(str(step_dir), str(tmp_path / "hf"), to="hf", dtype="float32")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                  "tokenizer.model"]
    # the hand-written safetensors file reads back as convert's (written by the safetensors library) does
    llama31.convert(str(step_dir), str(tmp_path / "converted"), to="hf")
    assert_same_state(load_file(tmp_path / "hf" / "model.safetensors"),
                      load_file(tmp_path / "converted" / "model.safetensors"))
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = random_tokens(2, 24, seed=5)
    a, b = model(tokens), hf(tokens).logits.float()
    assert ((a - b).norm() / b.norm()).item() < 1e-4  # as test_convert_meta_to_hf_and_back


EXPORT_MEMORY = """
import sys, threading, time
import llama31
import torch._dynamo  # code, not data: DCP's load imports it on first use (llama31's own import no longer does)
peak, base, done = [0], [0], []
def rss_anon():  # the process's own memory (file pages, such as a memory-mapped scratch file, not counted)
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1]) * 1024
def sample():
    while not done:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.001)
base[0] = rss_anon()
threading.Thread(target=sample, daemon=True).start()
llama31.export(sys.argv[1], sys.argv[2])
llama31.export(sys.argv[1], sys.argv[3], to="hf")
done.append(1)
print(peak[0] - base[0])
"""


def test_export_holds_one_weight_at_a_time_not_the_model(tmp_path):
    """A 73M-parameter model (292 MB of float32 weights in the checkpoint, 146 MB once exported in bf16, the
    largest weight 3.1 MB in float32): exporting it to Meta's and to Hugging Face's format grows the
    exporting process's own memory by less than 40 MB. Holding the exported model would take 146 MB."""
    args = llama31.ModelArgs(dim=512, n_layers=24, n_heads=8, n_kv_heads=2, vocab_size=1024, multiple_of=256)
    model = llama31.Transformer(args)
    ckpt = tmp_path / "step_000001"
    dcp.save({"model": model.state_dict()}, checkpoint_id=ckpt, no_dist=True)  # export reads only the weights
    (ckpt / "params.json").write_text(json.dumps(args.to_params()))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    assert 72e6 < n_params < 74e6
    r = subprocess.run([sys.executable, "-c", EXPORT_MEMORY, ckpt, tmp_path / "meta", tmp_path / "hf"], cwd=HERE,
                       env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    grown = int(r.stdout.split()[-1])
    assert grown < 40e6, f"export grew by {grown / 1e6:.0f} MB"
    assert (tmp_path / "meta" / "consolidated.00.pth").stat().st_size > 2 * n_params  # all of it was written

# -----------------------------------------------------------------------------
# tokenizer and chat format (tokenizer.py): ids equal Meta's


def assert_same_as_meta(tok: Tokenizer, s: str, **kw) -> list[int]:
    ids = tok.encode(s, bos=False, eos=False, **kw)
    assert ids == reference_tokenizer().encode(s, bos=False, eos=False, **kw)
    return ids


def test_special_tokens_match_meta(tok):
    meta = reference_tokenizer()
    assert tok.special_tokens == meta.special_tokens
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.eot_id, tok.eom_id, tok.python_tag_id, tok.pad_id,
            tok.stop_tokens) == (
        meta.n_words, meta.bos_id, meta.eos_id, meta.eot_id, meta.eom_id, meta.python_tag_id, meta.pad_id,
        meta.stop_tokens,
    )  # fmt: skip
    assert tok.n_words == 128256


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
def test_encode_matches_meta_and_round_trips(tok, s):
    ids = assert_same_as_meta(tok, s)
    assert tok.decode(ids) == s


def test_text_spelling_a_special_token(tok):
    plain = assert_same_as_meta(tok, "<|eot_id|>")
    assert tok.eot_id not in plain and len(plain) > 1  # by default it is just text
    assert assert_same_as_meta(tok, "hi<|eot_id|>", allowed_special="all")[-1] == tok.eot_id
    assert tok.decode(plain) == "<|eot_id|>"


def test_bos_eos_flags(tok):
    body = tok.encode("hi", bos=False, eos=False)
    assert tok.encode("hi", bos=True, eos=False) == [tok.bos_id] + body
    assert tok.encode("hi", bos=False, eos=True) == body + [tok.eos_id]
    assert tok.encode("", bos=True, eos=True) == [tok.bos_id, tok.eos_id]


@pytest.mark.parametrize(
    "s",
    [
        "a" * 1_000_000,  # crosses 400k windows and 25k runs of non-whitespace
        " " * 60_001 + "x",  # a whitespace run cut twice
        "x" * 25_000 + " " * 25_000 + "y" * 25_001,  # runs just at and just over the cut length
    ],
    ids=["1M-a", "spaces", "edges"],
)
def test_long_inputs_match_meta(tok, s):
    assert tok.decode(assert_same_as_meta(tok, s)) == s


def test_long_mixed_input_matches_meta(tok):
    rng = random.Random(0)
    words = "".join(rng.choice(["word", " ", "\n", "é", "12345", "😀", "?!"]) for _ in range(200_000))
    # Long runs of both kinds, the first straddling the 400k window edge.
    s = words[:390_000] + "z" * 30_000 + " " * 30_000 + words[-50_000:]
    assert len(s) == 500_000
    assert_same_as_meta(tok, s)


def test_long_run_cuts_equal_metas():
    meta = reference_tokenizer()
    for s in ["x" * 25_001, " \u00a0\u2028" * 20_000 + "z" * 100_000, "a b" * 10 + "c" * 75_000 + "\t" * 50_000]:
        assert list(tk._split_long_runs(s)) == list(meta._split_whitespaces_or_nonwhitespaces(s, 25_000))


def test_regex_whitespace_is_str_isspace():
    # The run cutter uses re's \s where Meta's loop uses str.isspace(); they must agree everywhere.
    space = re.compile(r"\s")
    assert all(bool(space.match(chr(c))) == chr(c).isspace() for c in range(0x110000))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_random_text_matches_meta_and_round_trips(tok, s):
    assert tok.decode(assert_same_as_meta(tok, s)) == s


@fuzz(150)
@given(s=st.text(max_size=80) | st.text(alphabet=" \t\n\r<|>'sdé中🦙\x00\u200b", max_size=80))
def test_tokenizer_round_trips_random_unicode(tok, s):
    ids = tok.encode(s, bos=False, eos=False)
    assert all(0 <= i < tok.n_words for i in ids)
    assert tok.decode(ids) == s


def test_encode_rejects_non_str(tok):
    with pytest.raises(TypeError, match="takes a str"):
        tok.encode(b"bytes", bos=False, eos=False)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_malformed_tokenizer_file(tmp_path):
    path = tmp_path / "bad.model"
    path.write_text("IQ== 0\nIg== 1\nnot base64!! x\n")
    with pytest.raises(ValueError, match=r"bad\.model, line 3"):
        Tokenizer(path)
    path.write_text("\n\n")
    with pytest.raises(ValueError, match="no tokens"):
        Tokenizer(path)


def test_default_tokenizer_path_missing_package(monkeypatch):
    monkeypatch.setattr(tk.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install llama-models"):
        default_tokenizer_path()


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
def test_dialog_prompt_matches_meta(tok, name):
    messages = DIALOGS[name]
    assert ChatFormat(tok).encode_dialog_prompt(messages) == reference_dialog_tokens(messages)


def test_eom_only_for_assistant_end_of_message(tok):
    fmt = ChatFormat(tok)
    assert fmt.encode_message({"role": "assistant", "content": "x", "stop_reason": "end_of_message"})[-1] == tok.eom_id
    assert fmt.encode_message({"role": "assistant", "content": "x"})[-1] == tok.eot_id
    # Meta honours stop_reason only on assistant messages.
    assert fmt.encode_message({"role": "user", "content": "x", "stop_reason": "end_of_message"})[-1] == tok.eot_id


def test_header_and_message_layout(tok):
    fmt = ChatFormat(tok)
    header = fmt.encode_header("ipython")
    assert tok.decode(header) == "<|start_header_id|>ipython<|end_header_id|>\n\n"
    assert tok.decode(fmt.encode_message({"role": "user", "content": "hi"})) == (
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
    )


def test_dialog_with_mask_marks_only_assistant_content_and_end(tok):
    fmt = ChatFormat(tok)
    messages = DIALOGS["ipython"] + [{"role": "assistant", "content": "3**5 is 243."}]
    tokens, mask = fmt.encode_dialog_with_mask(messages)
    assert len(tokens) == len(mask)
    # The prompt form is the same dialog plus an open assistant header.
    assert tokens + fmt.encode_header("assistant") == reference_dialog_tokens(messages)
    learned = [i for i, m in zip(tokens, mask) if m]
    expected = []
    for m in messages:
        if m["role"] == "assistant":
            end = tok.eom_id if m.get("stop_reason") == "end_of_message" else tok.eot_id
            expected += tok.encode(m["content"], bos=False, eos=False) + [end]
    assert learned == expected
    assert tok.decode(learned) == "<|python_tag|>print(3**5)<|eom_id|>3**5 is 243.<|eot_id|>"
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
def test_bad_messages_raise(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        ChatFormat(tok).encode_dialog_prompt(messages)


# -----------------------------------------------------------------------------
# data: the shard format and the loader


def loader(pattern, B, T, rank=0, world=1):
    return llama31.DistributedShardedDataLoader(str(pattern), B, T, rank, world, vocab_size=VOCAB)


def write_raw_shard(path, header3, tokens):
    header = np.zeros(256, dtype=np.int32)
    header[:3] = header3
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype=np.uint32).tobytes())


@pytest.mark.parametrize("case", ["magic", "version", "truncated", "short_header", "token_id", "too_small"])
def test_broken_shard_is_refused_naming_the_file(tmp_path, case):
    path = tmp_path / "train_000000.bin"
    good = np.arange(200)
    if case == "magic":
        write_raw_shard(path, (20240802, 7, 200), good)
        what = "magic 20240802"
    elif case == "version":
        write_raw_shard(path, (20240801, 6, 200), good)
        what = "version 6"
    elif case == "truncated":
        write_raw_shard(path, (20240801, 7, 300), good)  # the header promises 100 more tokens
        what = "says it holds 300 tokens"
    elif case == "short_header":
        path.write_bytes(b"\0" * 100)
        what = "shorter than"
    elif case == "token_id":
        write_raw_shard(path, (20240801, 7, 200), np.r_[good[:-1], VOCAB])
        what = f"token id {VOCAB}"
    else:  # one step of 4 ranks x B=2 x T=32 needs 4 * 64 + 1 = 257 tokens
        write_raw_shard(path, (20240801, 7, 200), good)
        what = "too few for one step"
    world = 4 if case == "too_small" else 1
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(what)):
        loader(tmp_path / "train_*.bin", 2, 32, 0, world)


def check_shard(path: Path, tokens: np.ndarray, valid: bool):
    """open_shard and the loader either read exactly `tokens` (valid) or raise a ValueError naming path."""
    if not valid:
        with pytest.raises(ValueError, match=re.escape(str(path))):
            llama31.open_shard(str(path), VOCAB)
        with pytest.raises(ValueError, match=re.escape(str(path))):
            llama31.DistributedShardedDataLoader(str(path), 1, 4, vocab_size=VOCAB)
        return
    assert np.array_equal(llama31.open_shard(str(path), VOCAB), tokens)
    if len(tokens) < 5:
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*too few"):
            llama31.DistributedShardedDataLoader(str(path), 1, 4, vocab_size=VOCAB)
        return
    ld = llama31.DistributedShardedDataLoader(str(path), 1, 4, vocab_size=VOCAB)
    for _ in range(3):
        x, y = ld.next_batch()
        assert x.shape == y.shape == (1, 4) and int(x.max()) < VOCAB


@fuzz(60)
@given(data=st.binary(max_size=1200) | st.binary(min_size=1024, max_size=1400))
def test_shard_of_random_bytes_is_a_value_error_naming_it(tmp_path, data):
    path = tmp_path / "train_000000.bin"
    path.write_bytes(data)
    check_shard(path, None, valid=False)


@fuzz(80)
@given(magic=st.sampled_from([llama31.SHARD_MAGIC, 20240520, 0, -1]), version=st.sampled_from([7, 1, 0]),
       n=st.integers(0, 40), claimed=st.none() | st.integers(-2 ** 31, 2 ** 31 - 1) | st.integers(0, 41),
       seed=st.integers(0, 2 ** 32 - 1), high=st.sampled_from([VOCAB, 2 ** 31, 2 ** 32]), trail=st.binary(max_size=3))
def test_shard_with_fuzzed_header_and_tokens(tmp_path, magic, version, n, claimed, seed, high, trail):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, high, n, dtype=np.uint64).astype(np.uint32)
    claimed = n if claimed is None else claimed
    header = np.zeros(llama31.HEADER_INTS, dtype=np.int32)
    header[:3] = magic, version, claimed
    path = tmp_path / "train_000000.bin"
    path.write_bytes(header.tobytes() + tokens.tobytes() + trail)
    valid = (magic == llama31.SHARD_MAGIC and version == 7 and claimed == n and not trail
             and all(int(t) & (llama31.NOT_A_TARGET - 1) < VOCAB for t in tokens))
    check_shard(path, tokens, valid)


def test_not_a_target_tokens_are_inputs_but_never_targets(tmp_path):
    ids = np.array([BOS, 10, 11, 12, 13, 14, 15, 16, 17, 18], dtype=np.uint64)
    hidden = np.array([1, 1, 1, 0, 0, 1, 0, 0, 1, 0], dtype=bool)  # e.g. a chat's header and user turn
    llama31.write_shard(tmp_path / "train_000000.bin", ids | np.where(hidden, NA, 0).astype(np.uint64))
    x, y = loader(tmp_path / "train_*.bin", 1, 9).next_batch()
    assert x.tolist() == [ids[:9].tolist()]  # inputs keep the bare token ids
    assert y.tolist() == [[-100, -100, 12, 13, -100, 15, 16, -100, 18]]


def test_loader_ranks_take_consecutive_slices_switch_shards_wrap_and_resume(tmp_path):
    B, T, W = 2, 4, 3
    step = B * T * W  # 24 tokens per step over all ranks
    shards = [np.arange(0, 2 * step + 1), np.arange(1000, 1000 + 3 * step + 1)]  # 2 and 3 whole steps
    for i, s in enumerate(shards):
        llama31.write_shard(tmp_path / f"train_{i:06d}.bin", s)
    loaders = [loader(tmp_path / "train_*.bin", B, T, r, W) for r in range(W)]
    # the step -> (shard, offset of rank 0) the stream must follow: shard 0 twice, shard 1 three times, wrap
    schedule = [(0, 0), (0, step), (1, 0), (1, step), (1, 2 * step), (0, 0), (0, step)]
    seen = {r: [] for r in range(W)}
    for shard, base in schedule:
        xs = []
        for r, ld in enumerate(loaders):
            x, y = ld.next_batch()
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (B, T)
            start = base + r * B * T  # rank r's own slice, after the slices of ranks 0..r-1
            window = torch.from_numpy(shards[shard][start: start + B * T + 1].astype(np.int64))
            assert torch.equal(x, window[:-1].view(B, T))
            assert torch.equal(y, window[1:].view(B, T))  # y is x shifted by one
            xs.append(x.flatten())
            seen[r].append(x)
        # the ranks together read one consecutive run of the stream, in rank order, with no overlap
        run = torch.cat(xs)
        assert torch.equal(run, torch.arange(run[0], run[0] + B * T * W))

    # resume: a fresh loader given rank 1's state after 3 steps continues exactly where it was
    ref = loader(tmp_path / "train_*.bin", B, T, 1, W)
    for _ in range(3):
        ref.next_batch()
    state = ref.state_dict()
    assert state == {"shard": 1, "position": step + B * T}  # next: shard 1's second step, rank 1's slice
    resumed = loader(tmp_path / "train_*.bin", B, T, 1, W)
    resumed.load_state_dict(state)
    for expected in seen[1][3:]:
        assert torch.equal(resumed.next_batch()[0], expected)
    resumed.reset()
    assert torch.equal(resumed.next_batch()[0], seen[1][0])


def test_loader_ranks_stay_in_step_at_an_uneven_shard_end(tmp_path):
    B, T, W = 2, 4, 3
    llama31.write_shard(tmp_path / "train_000000.bin", np.arange(0, 60))  # 2.5 steps of 24 tokens
    llama31.write_shard(tmp_path / "train_000001.bin", np.arange(1000, 1060))
    loaders = [loader(tmp_path / "train_*.bin", B, T, r, W) for r in range(W)]
    for _ in range(5):
        run = torch.cat([ld.next_batch()[0].flatten() for ld in loaders])
        # docstring: "at each step the ranks take consecutive, disjoint B*T slices ... in rank order"
        assert torch.equal(run, torch.arange(run[0], run[0] + B * T * W)), run.tolist()


def test_loader_pattern_matching_no_file(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(pattern))):
        loader(pattern, 2, 32)


# -----------------------------------------------------------------------------
# data: prepare and tinystories


def split_docs(paths) -> list:
    """The documents of shards, each starting at its BOS."""
    stream = np.concatenate([np.asarray(llama31.open_shard(p, VOCAB)) for p in sorted(paths)]).astype(np.int64)
    starts = np.flatnonzero((stream & (NA - 1)) == BOS).tolist() + [len(stream)]
    assert starts[0] == 0
    return [stream[a:b].tolist() for a, b in zip(starts, starts[1:])]


def test_prepare_writes_shuffled_bos_eos_documents_and_masks_chat(tmp_path, tok):
    texts = [f"Document number {i} says hello {'world ' * (i % 4)}." for i in range(18)]
    folder = tmp_path / "in"
    folder.mkdir()
    for i, t in enumerate(texts[:3]):
        (folder / f"d{i}.txt").write_text(t)
    (folder / "ignored.bin").write_bytes(b"\xff\xfe")  # not text: skipped inside a folder
    dialog = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"}]
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[3:]) + "\n"
                     + json.dumps({"messages": dialog}) + "\n")
    written = llama31.prepare([str(folder), str(jsonl)], out_dir=str(tmp_path / "out"), val_fraction=0.1,
                              seed=7, shard_tokens=60)

    ids, is_target = ChatFormat(tok).encode_dialog_with_mask(dialog)
    # in input order: the folder's files by name, then the jsonl's lines; chat tokens not to learn get bit 31
    expected = [tok.encode(t, bos=True, eos=True) for t in texts] + [
        [t if m else t | NA for t, m in zip(ids, is_target)]]
    docs = split_docs(written["train"] + written["val"])
    assert sorted(docs) == sorted(expected)  # each document once, whole
    assert docs != expected  # shuffled
    assert len(split_docs(written["val"])) == 2  # round(0.1 * 19)
    assert len(written["train"]) > 1 and all(Path(p).name == f"train_{i:06d}.bin"
                                            for i, p in enumerate(written["train"]))
    for p in written["train"][:-1]:
        assert len(llama31.open_shard(p, VOCAB)) >= 60
    # the same seed gives the same bytes, another seed another order
    again = llama31.prepare([str(folder), str(jsonl)], out_dir=str(tmp_path / "again"), val_fraction=0.1,
                            seed=7, shard_tokens=60)
    for a, b in zip(written["train"] + written["val"], again["train"] + again["val"]):
        assert Path(a).read_bytes() == Path(b).read_bytes()
    other = llama31.prepare([str(folder), str(jsonl)], out_dir=str(tmp_path / "other"), val_fraction=0.1,
                            seed=8, shard_tokens=60)
    assert split_docs(other["train"] + other["val"]) != docs


def test_prepare_again_replaces_its_earlier_shards(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document number {i} " * 20}) + "\n" for i in range(20)))
    llama31.prepare(str(docs), out_dir=str(tmp_path / "d"), shard_tokens=100)  # many small shards
    many = sorted(p.name for p in (tmp_path / "d").glob("train_*.bin"))
    llama31.prepare(str(docs), out_dir=str(tmp_path / "d"))  # one shard: the old ones must not linger
    assert len(many) > 1 and sorted(p.name for p in (tmp_path / "d").glob("train_*.bin")) == ["train_000000.bin"]


def test_tinystories_from_a_local_archive(tmp_path, tok):
    stories = {f"data{i:02d}.json": [{"story": f"  Once upon a time {i}.{j}  "} for j in range(3)]
               for i in range(3)}
    archive = tmp_path / "ts.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name in ["data02.json", "data00.json", "data01.json"]:  # order in the archive is not name order
            data = json.dumps(stories[name]).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    written = llama31.tinystories(str(tmp_path / "ts"), url=archive.as_uri(), max_files=2, val_fraction=0.2)
    docs = split_docs(written["train"] + written["val"])
    assert sorted(tok.decode(d) for d in docs) == sorted(
        f"<|begin_of_text|>Once upon a time {i}.{j}<|end_of_text|>" for i in range(2) for j in range(3))
    assert len(split_docs(written["val"])) == 1  # round(0.2 * 6)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
                               st.sampled_from(["text", "messages", "role", "content", "stop_reason", "x"]), kids,
                               max_size=3), max_leaves=8)


message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "ipython", "bot"]),
                                 "content": st.text(max_size=8) | json_values})


record = (json_values | st.fixed_dictionaries({"text": st.text(max_size=20)})
          | st.fixed_dictionaries({"messages": st.lists(message | json_values, max_size=3)}))


line = record.map(json.dumps) | st.text(max_size=12)


@fuzz(60)
@given(lines=st.lists(line, max_size=4))
def test_prepare_fuzzed_jsonl_writes_shards_or_raises_value_error(tmp_path, cached_tokenizer, lines):
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    try:
        written = llama31.prepare(str(path), out_dir=str(out), val_fraction=0.0)
    except ValueError:
        return
    assert written["train"] and all(len(llama31.open_shard(p, VOCAB)) > 0 for p in written["train"])


@pytest.mark.parametrize("content, message", [
    ("", "no documents found"),
    ("\n\n   \n", "no documents found"),
    ("not json\n", "in.jsonl:1 is not valid JSON"),
    ('{"text": "ok"}\n[1, 2]\n', 'in.jsonl:2 needs a "text" string or a "messages" list'),
    ('{"text": 5}\n', 'in.jsonl:1 needs a "text" string'),
    ('{"messages": "hi"}\n', 'in.jsonl:1 needs a "text" string or a "messages" list'),
    ('{"text": "ok"}\n{"messages": [{"role": "bot", "content": "x"}]}\n', "in.jsonl:2 message 0"),
])
def test_prepare_bad_jsonl_is_a_value_error_naming_file_and_line(tmp_path, cached_tokenizer, content, message):
    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        llama31.prepare(str(tmp_path / "in.jsonl"), out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_prepare_jsonl_splits_records_at_newlines_only(tmp_path, cached_tokenizer, tok):
    texts = ["a line\u2028separator", "next\x85line", "para\u2029graph"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                       encoding="utf-8")
    written = llama31.prepare(str(tmp_path / "in.jsonl"), out_dir=str(tmp_path / "out"), val_fraction=0.0)
    stream = np.concatenate([np.asarray(llama31.open_shard(p, VOCAB)) for p in written["train"]]).tolist()
    assert sorted(tok.decode(stream).split("<|end_of_text|>")[:-1]) == sorted(
        f"<|begin_of_text|>{t}" for t in texts)


def test_prepare_empty_text_file_is_a_value_error(tmp_path, cached_tokenizer):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "empty.txt"))):
        llama31.prepare(str(tmp_path / "empty.txt"), out_dir=str(tmp_path / "out"))


# -----------------------------------------------------------------------------
# training: the loss, with document masking and the chunked cross-entropy


def token_losses(model, inputs, targets) -> torch.Tensor:
    """Per-position loss through forward_loss itself: every target but one masked with ignore_index."""
    out = []
    for t in range(inputs.size(1)):
        one = torch.full_like(targets, -100)
        one[:, t] = targets[:, t]
        out.append(model.forward_loss(inputs, one))
    return torch.stack(out)


@torch.no_grad()
def test_document_masking_trains_each_packed_document_as_if_alone():
    model = tiny_model(seed=3, **DIM32).eval()
    g = torch.Generator().manual_seed(0)
    doc1 = [BOS] + torch.randint(0, 5000, (5,), generator=g).tolist() + [EOS]
    doc2 = [BOS] + torch.randint(0, 5000, (7,), generator=g).tolist()
    nxt = torch.randint(0, 5000, (1,), generator=g).tolist()  # the token after the row
    packed = torch.tensor([doc1 + doc2 + nxt])
    x, y = packed[:, :-1], packed[:, 1:]
    alone = torch.tensor([doc2 + nxt])
    packed_losses = token_losses(model, x, y)
    alone_losses = token_losses(model, alone[:, :-1], alone[:, 1:])
    assert torch.allclose(packed_losses[len(doc1):], alone_losses, rtol=0, atol=1e-5)
    first = torch.tensor([doc1 + doc2[:1]])  # doc1 is causal as usual, doc2's BOS changes nothing before it
    assert torch.allclose(packed_losses[:len(doc1)], token_losses(model, first[:, :-1], first[:, 1:]),
                          rtol=0, atol=1e-5)
    # and the mask matters: plain causal attention over the packed row gives doc2 other losses
    causal = F.cross_entropy(model(x)[0], y[0], reduction="none")
    assert (causal[len(doc1):] - alone_losses).abs().max() > 1e-3


@torch.no_grad()
def test_forward_loss_without_inner_bos_is_plain_causal_cross_entropy():
    model = tiny_model(seed=4, **DIM32).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 5000, (3, 16), generator=g)
    x[0, 0] = BOS  # a BOS at the start only: still one document
    y = torch.randint(0, 5000, (3, 16), generator=g)
    y[1, 3:6] = -100
    plain = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert torch.allclose(model.forward_loss(x, y), plain, rtol=0, atol=1e-5)
    assert torch.allclose(model(x, targets=y), plain, rtol=0, atol=1e-5)
    # in a batch where another row is packed (so the mask path runs), rows without an inner BOS are unchanged
    packed = x.clone()
    packed[2, 8] = BOS
    y_rows01 = y.clone()
    y_rows01[2] = -100
    plain01 = F.cross_entropy(model(x).flatten(0, 1), y_rows01.flatten(), ignore_index=-100)
    assert torch.allclose(model.forward_loss(packed, y_rows01), plain01, rtol=0, atol=1e-5)


def test_linear_cross_entropy_in_place_equals_the_compiled_form(monkeypatch):
    """Eager, the gradients are made in place in the logits (no 0.5 GB copies per chunk); compiled, out of
    place: the same elementwise operations, so the same bits."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 64, generator=g, requires_grad=True)
    w = (torch.randn(VOCAB, 64, generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, VOCAB, (300,), generator=g)
    t[::7] = llama31.IGNORE_INDEX

    def loss_and_grads():
        h.grad = w.grad = None
        loss = llama31.LinearCrossEntropy.apply(h, w, t, llama31.IGNORE_INDEX, 128, True)
        loss.backward()
        return loss.detach(), h.grad, w.grad
    eager = loss_and_grads()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # the branch a compiled model takes
    assert all(torch.equal(a, b) for a, b in zip(eager, loss_and_grads()))


@pytest.mark.parametrize("chunk", [7, 50, 4096])
def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 300, (50,), generator=g)
    t[[3, 17, 49]] = -100
    saved = []  # what the autograd graph keeps for the backward: never the (N, vocab) logits
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        loss = llama31.LinearCrossEntropy.apply(h, w, t, -100, chunk, True)
    loss.backward()
    assert all(shape in (h.shape, w.shape) for shape in saved)
    got = loss.detach(), h.grad, w.grad
    h.grad = w.grad = None
    want = F.cross_entropy(h @ w.t(), t, ignore_index=-100, reduction="sum")
    want.backward()
    torch.testing.assert_close(got[0], want.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], h.grad, rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2], w.grad, rtol=0, atol=1e-5)
    # without gradients (eval) it computes only the loss
    with torch.no_grad():
        assert llama31.LinearCrossEntropy.apply(h, w, t, -100, chunk, False) == got[0]


def packed_batch(B: int, T: int, seed: int):
    """Random inputs and targets, rows packed with documents of uneven length (a BOS at each start)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5000, (B, T), generator=g)
    y = torch.randint(0, 5000, (B, T), generator=g)
    for row in range(B):
        starts = torch.randperm(T - 1, generator=g)[:5] + 1
        x[row, 0], x[row, starts] = BOS, BOS
    return x, y


def test_document_mask_stays_eager_in_a_compiled_model(monkeypatch):
    """document_mask runs eagerly inside torch.compile (its torch.compiler.disable is applied when a compiled
    model calls it, not at import), and the compiled loss equals the eager one."""
    calls, mask = [], llama31.document_mask.__wrapped__

    def recording_mask(*args, **kwargs):
        calls.append(torch.compiler.is_compiling())
        return mask(*args, **kwargs)
    monkeypatch.setattr(llama31, "document_mask", llama31.eager(recording_mask))
    model = tiny_model(seed=0)
    x, y = packed_batch(2, 32, seed=0)
    want = model(x, targets=y)
    got = torch.compile(model, backend="eager")(x, targets=y)  # dynamo's graph capture, no code generation
    assert calls == [False, False] and torch.equal(got, want)


def loss_and_grads(model, x, y, device):
    model.zero_grad(set_to_none=True)
    loss = model(x.to(device), targets=y.to(device))
    loss.backward()
    # clone: a later model.cuda() would move these very tensors
    return loss.item(), {k: p.grad.float().cpu().clone() for k, p in model.named_parameters()}


@cuda
def test_gpu_flex_attention_document_masking_equals_the_dense_mask():
    """On a GPU packed documents go through flex attention with a block mask; on the CPU through SDPA with a
    dense mask. In float32 both give the same loss and gradients."""
    args = tiny_args(multiple_of=16, ffn_dim_multiplier=None, use_scaled_rope=False, max_seq_len=256)
    model = llama31.Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    x, y = packed_batch(2, 256, seed=0)
    cpu_loss, cpu_grads = loss_and_grads(model, x, y, torch.device("cpu"))
    model.cuda()
    gpu_loss, gpu_grads = loss_and_grads(model, x, y, torch.device("cuda"))
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    for k in cpu_grads:
        torch.testing.assert_close(gpu_grads[k], cpu_grads[k], rtol=0, atol=1e-4 * cpu_grads[k].abs().max().item())


# -----------------------------------------------------------------------------
# training: the loop

B, T = 2, 32  # the training tests' micro-batch: 2 rows of 32 tokens


@pytest.fixture(scope="module")
def train_data(tmp_path_factory) -> str:
    """Two shards of 300 tokens (4.7 micro-batches of 2 x 32): packed documents of random ids."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i in range(2):
        tokens = rng.integers(0, 5000, 300)
        for start in range(0, 300, 45):
            tokens[start] = BOS
            if start:
                tokens[start - 1] = EOS
        llama31.write_shard(folder / f"train_{i:06d}.bin", tokens)
    return str(folder / "train_*.bin")


def train_kwargs(init_ckpt, train_data, out_dir, **kw) -> dict:
    return dict(ckpt_dir=str(init_ckpt), train_data=train_data, val_data=None, out_dir=str(out_dir),
                batch_size=B, seq_len=T, learning_rate=1e-3, warmup_steps=2, device="cpu") | kw


def train_flags(init_ckpt, train_data, out_dir, *extra) -> list:
    return ["train", "--ckpt_dir", str(init_ckpt), "--train_data", train_data, "--val_data", "", "--out_dir",
            str(out_dir), "--batch_size", str(B), "--seq_len", str(T), "--learning_rate", "1e-3",
            "--warmup_steps", "2", "--device", "cpu", *map(str, extra)]


def log_records(out_dir: Path) -> list:
    path = out_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_overfit_single_batch(init_ckpt, train_data, tmp_path):
    losses = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "out", max_steps=30,
                                          learning_rate=3e-2, warmup_steps=0, weight_decay=0.0,
                                          overfit_single_batch=True))
    assert len(losses) == 30
    assert abs(losses[0] - math.log(VOCAB)) < 0.5  # a random model starts near uniform
    assert losses[-1] < 0.1 * losses[0]


def test_train_restores_signal_handlers(init_ckpt, train_data, tmp_path):
    before = signal.getsignal(signal.SIGINT)
    llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "out", max_steps=1))
    assert signal.getsignal(signal.SIGINT) is before


@cuda
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_compiled_training_equals_eager(packed):
    """torch.compile'd training (bf16 autocast, float32 weights) follows the eager loss within 1e-3 relative
    over a few AdamW steps, with and without packed documents."""
    device = torch.device("cuda")
    args = tiny_args(dim=128, multiple_of=16, ffn_dim_multiplier=None, use_scaled_rope=False, max_seq_len=256)
    losses = {}
    for compile in (False, True):
        model = llama31.Transformer(args).to(device)
        model.init_weights(torch.Generator(device=device).manual_seed(0))
        model.reset_rope()
        net = torch.compile(model) if compile else model
        opt = llama31.configure_optimizer(model, 1e-3, 0.1, device)
        losses[compile] = []
        for step in range(4):
            x, y = packed_batch(4, 256, seed=step)
            if not packed:
                x[:, 1:][x[:, 1:] == BOS] = 1  # one document per row: the plain causal path
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(x.to(device), targets=y.to(device))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[compile].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    assert losses[False][-1] < losses[False][0]


# -----------------------------------------------------------------------------
# training: DDP and FSDP over 2 processes equal 1 process with gradient accumulation


def logged_losses(out_dir: Path) -> list:
    return [(d["step"], d["loss"], d["norm"]) for d in log_records(out_dir) if "loss" in d]


def train_two_and_one(init_ckpt, train_data, two_dir: Path, one_dir: Path, steps: int, device: str, timeout: float,
                      *two_flags, both: tuple = ()):
    """The same training run as 2 processes under torchrun (into two_dir) and as 1 process with twice the
    gradient accumulation (into one_dir), side by side; both must succeed. both: flags of both runs."""
    common = ["train", "--ckpt_dir", str(init_ckpt), "--train_data", train_data, "--val_data", "",
              "--batch_size", str(B), "--seq_len", str(T), "--max_steps", str(steps), "--learning_rate", "1e-3",
              "--warmup_steps", "1", "--device", device, *both]
    two = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(HERE / "llama31.py"), *common, "--out_dir", str(two_dir), *two_flags],
                           cwd=HERE, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.run([sys.executable, str(HERE / "llama31.py"), *common, "--out_dir", str(one_dir),
                          "--total_batch_size", str(2 * B * T)],
                         cwd=HERE, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    out = two.communicate(timeout=timeout)[0]
    assert two.returncode == 0, out[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert "grad_accum=1" in out and "2 process(es)" in out
    assert "grad_accum=2" in one.stderr


@pytest.mark.parametrize("fsdp", [False, True])
def test_two_processes_match_gradient_accumulation(init_ckpt, train_data, tmp_path, fsdp):
    """DDP, and FSDP2 (sharded float32 weights; on the CPU without bf16 casts), over 2 processes give the
    loss curve of 1 process with twice the gradient accumulation; FSDP's gathered checkpoint is the same."""
    train_two_and_one(init_ckpt, train_data, tmp_path / "ddp", tmp_path / "one", 4, "cpu", 120, "--fsdp", str(fsdp))
    a, b = logged_losses(tmp_path / "ddp"), logged_losses(tmp_path / "one")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, rel=1e-4, abs=0)
        assert norm_a == pytest.approx(norm_b, rel=1e-4, abs=0)
    assert a[-1][1] < a[0][1]  # and it trains
    wa = checkpoint_weights(tmp_path / "ddp" / "step_000004")
    wb = checkpoint_weights(tmp_path / "one" / "step_000004")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_fsdp_on_two_gpus_matches_one_gpu(init_ckpt, train_data, tmp_path):
    """FSDP2 over 2 GPUs (bf16 compute, float32 master weights) gives the loss curve of 1 GPU with twice the
    gradient accumulation (bf16 autocast); bf16 rounding allows 1e-2 relative."""
    train_two_and_one(init_ckpt, train_data, tmp_path / "fsdp", tmp_path / "one", 6, "cuda", 300)  # FSDP by default
    a, b = logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "one")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss, _ in a] == pytest.approx([loss for _, loss, _ in b], rel=1e-2)
    assert a[-1][1] < a[0][1]


@cuda
def test_gpu_async_checkpoints_hold_the_state_at_the_moment_of_saving(tmp_path):
    """On a GPU saves are asynchronous by default: the state is copied into pinned host buffers (kept and
    reused by the next save) and written while training goes on. Each checkpoint holds the weights and
    moments as they were when save() returned, though they change at once after it."""
    device = torch.device("cuda")
    model = tiny_model(seed=0, **DIM32).to(device)
    optimizer = llama31.configure_optimizer(model, 1e-2, 0.1, device)
    snapshots = []
    with llama31.Checkpointer(tmp_path, device=device) as checkpointer:
        assert checkpointer.executor is not None  # async
        for step in (1, 2, 3):
            x = torch.randint(0, VOCAB, (2, 16), device=device)
            model(x, targets=x).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            snapshots.append(({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                              {i: {k: v.cpu().clone() for k, v in s.items()}
                               for i, s in optimizer.state_dict()["state"].items()}))
            checkpointer.save(step, model, optimizer, 0, 64 * step, default_tokenizer_path())
            with torch.no_grad():  # the next update starts before the checkpoint is written
                for p in model.parameters():
                    p.mul_(2.0)
    for step, (weights, moments) in enumerate(snapshots, 1):
        step_dir = tmp_path / f"step_{step:06d}"
        assert_same_state(checkpoint_weights(step_dir), weights)
        fresh = tiny_model(seed=9, **DIM32)
        fresh_opt = llama31.configure_optimizer(fresh, 1e-2, 0.1, CPU)
        assert llama31.load_training_checkpoint(step_dir, fresh, fresh_opt) == {"step": step, "shard": 0,
                                                                              "position": 64 * step}
        loaded = fresh_opt.state_dict()["state"]
        for i in moments:
            assert_same_state({k: v.cpu() for k, v in loaded[i].items()}, moments[i])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_fsdp_checkpoint_of_two_gpus_resumes_on_one_and_on_two(init_ckpt, train_data, tmp_path):
    """Saved by FSDP2 on 2 GPUs (asynchronously, the default), resumed on 2 GPUs and on 1 (twice the
    accumulation for the same batch): the losses continue the uninterrupted 2-GPU run's within 1e-2 relative,
    the bf16 tolerance of test_gpu_fsdp_on_two_gpus_matches_one_gpu."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(HERE / "llama31.py")]

    def cuda_flags(out, *extra):
        return ["cuda" if a == "cpu" else a
                for a in train_flags(init_ckpt, train_data, out, "--max_steps", 6, "--save_every", 3, *extra)]
    run = functools.partial(subprocess.run, cwd=HERE, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    ref = run([*torchrun, *cuda_flags(tmp_path / "ref")])
    assert ref.returncode == 0, ref.stderr[-3000:]
    for name in ("two", "one"):
        shutil.copytree(tmp_path / "ref" / "step_000003", tmp_path / name / "step_000003")
    two = run([*torchrun, *cuda_flags(tmp_path / "two", "--resume")])
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable, str(HERE / "llama31.py"), *cuda_flags(tmp_path / "one", "--resume",
                                                                     "--total_batch_size", 2 * B * T)])
    assert one.returncode == 0, one.stderr[-3000:]
    ref_log = {s: loss for s, loss, _ in logged_losses(tmp_path / "ref")}
    for name in ("two", "one"):
        got = logged_losses(tmp_path / name)
        assert [s for s, _, _ in got] == [4, 5, 6]
        assert [loss for _, loss, _ in got] == pytest.approx([ref_log[s] for s in (4, 5, 6)], rel=1e-2)
    assert checkpoint_state(tmp_path / "one" / "step_000006") == checkpoint_state(tmp_path / "ref" / "step_000006")

# -----------------------------------------------------------------------------
# training: checkpoints and --resume


def checkpoint_weights(step_dir: Path) -> dict:
    """The weights of a training checkpoint as trained (float32), under Meta's names."""
    return dict(llama31.read_training_checkpoint(step_dir)[1])


def checkpoint_state(step_dir: Path) -> dict:
    """All of a training checkpoint loaded into a fresh model and AdamW of its shape (so every tensor is
    there and fits): the step and the data position it stores."""
    args, _ = llama31.read_training_checkpoint(step_dir)
    model = llama31.Transformer(args)
    return llama31.load_training_checkpoint(step_dir, model, llama31.configure_optimizer(model, 1e-3, 0.1, CPU))


def assert_positions(state: dict, train_data: str, steps: int, world: int):
    """The data position a checkpoint stores, handed to each of `world` ranks, puts each where its loader
    stands after `steps` batches of a run of that many processes."""
    for rank, fresh in enumerate(fresh_loader_states(train_data, steps, world)):
        ld = loader(train_data, B, T, rank, world)
        ld.load_step_start(state["shard"], state["position"], "test")
        assert ld.state_dict() == fresh, (rank, state)


def fresh_loader_states(train_data: str, steps: int, world: int) -> list:
    """Where each rank's loader stands after `steps` batches."""
    out = []
    for rank in range(world):
        ld = loader(train_data, B, T, rank, world)
        for _ in range(steps):
            ld.next_batch()
        out.append(ld.state_dict())
    return out


def assert_same_weights(a: Path, b: Path):
    wa, wb = checkpoint_weights(a), checkpoint_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_trims_the_log_to_the_resumed_step_and_loss_png_follows(init_ckpt, train_data, tmp_path):
    """A run stopped after logging steps it never saved (and half a line) resumes from its last checkpoint
    with a log.jsonl equal to the uninterrupted run's; out_dir/loss.png is drawn at each eval."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    kw = dict(max_steps=6, save_every=3, learning_rate=3e-3, val_data=train_data, val_every=2, val_steps=1)
    llama31.train(**train_kwargs(init_ckpt, train_data, a_dir, **kw))
    assert (a_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    shutil.copytree(a_dir / "step_000003", b_dir / "step_000003")
    logged = (a_dir / "log.jsonl").read_text().splitlines(keepends=True)
    up_to_5 = [line for line in logged if json.loads(line)["step"] <= 5]
    (b_dir / "log.jsonl").write_text("".join(up_to_5) + '{"step": 6, "lo')  # killed mid-line
    llama31.train(**train_kwargs(init_ckpt, train_data, b_dir, resume=True, **kw))

    def fields(records):
        return [(r["step"], r.get("loss"), r.get("val_loss"), r.get("lr")) for r in records]
    assert fields(log_records(b_dir)) == fields(log_records(a_dir))  # bitwise on the CPU
    assert [r["step"] for r in log_records(b_dir)] == [0, 1, 2, 2, 3, 4, 4, 5, 6, 6]


def test_train_defaults_and_start_checks(init_ckpt, train_data, tmp_path, capsys):
    """From scratch the default peak learning rate is 3e-4 (one that trains), finetuning keeps 3e-5; a val
    split too small for one step is skipped with a warning and the run goes on; a run that fails to start
    leaves no new empty --out_dir; samples print as plain text."""
    tiny_val = tmp_path / "val_000000.bin"
    llama31.write_shard(tiny_val, np.arange(B * T, dtype=np.uint32))  # one token short of one step
    kw = dict(max_steps=1, warmup_steps=0, learning_rate=None)  # no warmup: step 1 runs at the peak
    llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "scratch", ckpt_dir=None, model="tiny",
                                 val_data=str(tiny_val), **kw))
    assert "warning: no val loss: data shard(s) " + str(tiny_val) in capsys.readouterr().err
    assert [r.get("lr") for r in log_records(tmp_path / "scratch")] == [llama31.FROM_SCRATCH_LR]
    llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "finetune", sample_every=1, sample_len=6, **kw))
    assert [r.get("lr") for r in log_records(tmp_path / "finetune")] == [llama31.FINETUNE_LR] == [3e-5]
    llama = llama31.Llama.build(str(init_ckpt), max_seq_len=T, max_batch_size=1, device="cpu")
    first = llama.text_completion(["The"], torch.Generator().manual_seed(1337), temperature=0.8, top_p=0.95,
                                  max_gen_len=6)[0]["generation"]
    out = capsys.readouterr().out
    assert ("  sample: The" + first.replace("\n", "\n          ") + "\n") in out  # not its repr
    with pytest.raises(FileNotFoundError):
        llama31.train(**train_kwargs(init_ckpt, str(tmp_path / "none_*.bin"), tmp_path / "new" / "run", **kw))
    assert not (tmp_path / "new").exists()


def test_resume_continues_exactly(init_ckpt, train_data, tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    kw = dict(max_steps=6, save_every=3, learning_rate=3e-3)
    losses_a = llama31.train(**train_kwargs(init_ckpt, train_data, a_dir, **kw))
    assert sorted(p.name for p in a_dir.glob("step_*")) == ["step_000003", "step_000006"]
    # run B "was stopped" after step 3: it holds only A's checkpoint of step 3
    shutil.copytree(a_dir / "step_000003", b_dir / "step_000003")
    losses_b = llama31.train(**train_kwargs(init_ckpt, train_data, b_dir, resume=True, **kw))
    assert len(losses_a) == 6
    assert losses_b == losses_a[3:]  # bitwise on the CPU

    # the loader position saved at step 3 is that of a loader after 3 batches, and B ended where A did
    state3 = checkpoint_state(a_dir / "step_000003")
    assert state3["step"] == 3
    assert_positions(state3, train_data, 3, 1)
    state_a, state_b = checkpoint_state(a_dir / "step_000006"), checkpoint_state(b_dir / "step_000006")
    assert state_a == state_b and state_a["step"] == 6
    assert_same_weights(a_dir / "step_000006", b_dir / "step_000006")


def test_two_process_fsdp_checkpoint_resumes_on_two_bitwise_and_on_one(init_ckpt, train_data, tmp_path):
    """A checkpoint saved by 2 FSDP processes (each wrote its own half of every weight and moment) resumes on
    2 processes bitwise and on 1 (DCP gathers the halves; the data continues from the same token): the one
    process, with twice the accumulation for the same batch, gives the uninterrupted run's losses and norms
    within 1e-4 relative. That is the bound test_two_processes_match_gradient_accumulation holds for the same
    arithmetic in another order (FSDP averages 2 ranks' gradients, one process sums 2 micro-batches')."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(HERE / "llama31.py")]
    flags = ("--max_steps", 6, "--save_every", 3, "--fsdp", True)
    run = functools.partial(subprocess.run, cwd=HERE, env=subprocess_env(), capture_output=True, text=True,
                            timeout=240)
    ref = run([*torchrun, *train_flags(init_ckpt, train_data, tmp_path / "ref", *flags)])
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ref" / "step_000003").iterdir()) == checkpoint_files(world=2)
    for name in ("two", "one"):
        shutil.copytree(tmp_path / "ref" / "step_000003", tmp_path / name / "step_000003")
    two = subprocess.Popen([*torchrun, *train_flags(init_ckpt, train_data, tmp_path / "two", *flags, "--resume")],
                           cwd=HERE, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = run([sys.executable, str(HERE / "llama31.py"), *train_flags(
        init_ckpt, train_data, tmp_path / "one", "--max_steps", 6, "--total_batch_size", 2 * B * T, "--resume")])
    out = two.communicate(timeout=240)[0]
    assert two.returncode == 0, out[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed from" in one.stderr and "1 process(es)" in one.stderr and "grad_accum=2" in one.stderr

    ref_log = {s: (loss, norm) for s, loss, norm in logged_losses(tmp_path / "ref")}
    assert sorted(ref_log) == [1, 2, 3, 4, 5, 6]
    two_log, one_log = logged_losses(tmp_path / "two"), logged_losses(tmp_path / "one")
    assert [(s, (loss, norm)) for s, loss, norm in two_log] == [(s, ref_log[s]) for s in (4, 5, 6)]  # bitwise
    assert [s for s, _, _ in one_log] == [4, 5, 6]
    for s, loss, norm in one_log:
        assert loss == pytest.approx(ref_log[s][0], rel=1e-4, abs=0)
        assert norm == pytest.approx(ref_log[s][1], rel=1e-4, abs=0)
    assert_same_weights(tmp_path / "two" / "step_000006", tmp_path / "ref" / "step_000006")
    wa, wb = checkpoint_weights(tmp_path / "one" / "step_000006"), checkpoint_weights(tmp_path / "ref" / "step_000006")
    assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)  # as in the 2-vs-1 test
    # the one process saved its checkpoint alone, and each ended at the same token of the data
    assert sorted(p.name for p in (tmp_path / "one" / "step_000006").iterdir()) == checkpoint_files(world=1)
    state = checkpoint_state(tmp_path / "ref" / "step_000006")
    assert checkpoint_state(tmp_path / "one" / "step_000006") == checkpoint_state(tmp_path / "two" / "step_000006") \
        == state
    assert_positions(state, train_data, 6, 2)


def test_async_saves_equal_blocking_ones_keep_last_and_exports(init_ckpt, train_data, tmp_path):
    """--async_save copies the state to host memory and writes it while training goes on: every checkpoint
    equals the blocking run's bitwise, and so do the losses. --keep_last 2 leaves the 2 newest; the exports
    (every 2 steps and at the end) equal the trained weights cast to bf16 exactly."""
    kw = dict(max_steps=5, save_every=1, learning_rate=3e-3)
    losses_a = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "a", async_save=False, **kw))
    losses_b = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "b", async_save=True, keep_last=2,
                                            export_every=2, **kw))
    assert losses_a == losses_b
    assert sorted(p.name for p in (tmp_path / "a").glob("step_*")) == [f"step_{s:06d}" for s in range(1, 6)]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["export_000002", "export_000004", "export_000005",
                                                                 "log.jsonl", "step_000004", "step_000005"]
    for s in (4, 5):
        assert_same_weights(tmp_path / "a" / f"step_{s:06d}", tmp_path / "b" / f"step_{s:06d}")
        assert checkpoint_state(tmp_path / "a" / f"step_{s:06d}") == checkpoint_state(tmp_path / "b" / f"step_{s:06d}")
    for s in (2, 4, 5):
        exported = torch.load(tmp_path / "b" / f"export_{s:06d}" / "consolidated.00.pth", weights_only=True)
        trained = checkpoint_weights(tmp_path / "a" / f"step_{s:06d}")
        assert exported.keys() == trained.keys()
        assert all(exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], trained[k].to(torch.bfloat16))
                   for k in trained)
    # a training checkpoint is a --ckpt_dir to finetune from, as its weights in Meta's format (float32) are
    llama31.convert(str(tmp_path / "a" / "step_000005"), str(tmp_path / "meta"), to="meta")
    finetune = dict(max_steps=2, learning_rate=1e-3)
    assert llama31.train(**train_kwargs(tmp_path / "a" / "step_000005", train_data, tmp_path / "c", **finetune)) == \
        llama31.train(**train_kwargs(tmp_path / "meta", train_data, tmp_path / "d", **finetune))


def test_keep_last_never_removes_the_last_complete_checkpoint(init_ckpt, train_data, tmp_path, monkeypatch):
    """--keep_last 1: a checkpoint goes only once a newer one is whole. When the save of step 3 fails halfway
    (say the disk fills), step 2 is still there, complete, and nothing of step 3 is."""
    model = tiny_model(seed=0, **DIM32)
    state = llama31.training_state(model, llama31.configure_optimizer(model, 1e-3, 0.1, CPU))
    per_save = len(state["model"]) + sum(len(v) for v in state["optimizer"].values()) + len(state["train"])
    # DCP writes each tensor with its own torch.save: fail in the middle of the third save
    monkeypatch.setattr(torch, "save", failing_after(2 * per_save + per_save // 2, torch.save))
    with pytest.raises(OSError, match="injected failure"):
        llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, max_steps=6, save_every=1, keep_last=1))
    assert [d.name for d in step_dirs(tmp_path)] == ["step_000002"]
    check_checkpoint(tmp_path / "step_000002")
    assert not list(tmp_path.glob(".step_*"))  # the failed save left nothing behind
    # and by itself: the newest keep_last complete ones stay, whatever else lies around
    for name in ("step_000001", "step_000003", "step_000010", "step_000004_backup", ".step_000011.tmp1"):
        (tmp_path / name).mkdir()
    llama31.remove_old_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step_000011.tmp1", "log.jsonl", "step_000003",
                                                          "step_000004_backup", "step_000010"]

def test_train_refuses_an_out_dir_of_another_run(init_ckpt, train_data, tmp_path):
    llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "out", max_steps=1))
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume"):
        llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "out", max_steps=2))


@pytest.mark.parametrize("case", ["random_bytes", "missing_key", "meta_format"])
def test_resume_from_a_broken_training_checkpoint_is_a_value_error_naming_it(init_ckpt, train_data, tmp_path, case):
    step = tmp_path / "step_000001"
    model = tiny_model(seed=0, **DIM32)
    optimizer = llama31.configure_optimizer(model, 1e-3, 0.1, CPU)
    if case == "meta_format":  # a checkpoint of this script before it saved with DCP
        llama31.save_checkpoint(model, step, default_tokenizer_path())
        error, message = FileNotFoundError, f"{step} is not a training checkpoint of this version"
    else:
        state = llama31.training_state(model, optimizer, step=1)
        del state["train"]["position"]
        dcp.save(state, checkpoint_id=step, no_dist=True)
        (step / "params.json").write_text(json.dumps(model.params.to_params()))
        error = ValueError
        message = f"{step} does not fit: RuntimeError: Missing key in checkpoint state_dict: train.position"
        if case == "random_bytes":
            (step / ".metadata").write_bytes(np.random.default_rng(0).bytes(3000))
            message = f"{step / '.metadata'} is not DCP metadata"
    with pytest.raises(error, match=re.escape(message)):
        llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, max_steps=2, resume=True))
    assert not (tmp_path / "log.jsonl").exists()


def test_latest_checkpoint_is_the_highest_step(tmp_path):
    for s in (999_998, 999_999, 1_000_000):
        (tmp_path / f"step_{s:06d}").mkdir()
    (tmp_path / ".step_1000001.tmp123").mkdir()  # a save in progress (or killed) is no checkpoint
    assert llama31.latest_checkpoint(tmp_path) == tmp_path / "step_1000000"


def test_latest_checkpoint_ignores_other_names(tmp_path):
    for name in ("step_000001", "step_000002", "step_000002_backup", "step_000003.old"):
        (tmp_path / name).mkdir()
    assert llama31.latest_checkpoint(tmp_path) == tmp_path / "step_000002"


# -----------------------------------------------------------------------------
# LoRA and QLoRA: adapters on a frozen base, their checkpoints, merge, sample --lora_dir

LORA = llama31.LoRAArgs(rank=4, alpha=8.0, dropout=0.0, targets=tuple(llama31.LORA_TARGETS))


def tiny_base(ckpt: Path) -> llama31.Transformer:
    return llama31.load_model(ckpt, None, SEQ, BATCH, torch.device("cpu"), torch.float32)[0]


def fingerprint(model: llama31.Transformer) -> str:
    return llama31.base_fingerprint(model.params, model.state_dict())


def with_random_adapters(model: llama31.Transformer, lora: llama31.LoRAArgs, seed: int) -> llama31.Transformer:
    """Adapters as if trained: A from add_lora, B random (zero B would make every comparison trivial), sized
    so that (alpha / rank) B A is about a fifth of W."""
    llama31.add_lora(model, lora, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in llama31.lora_linears(model).values():
            m.lora_b.weight.copy_(0.05 * torch.randn(m.lora_b.weight.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lora_dir(tiny_ckpt, tmp_path_factory) -> Path:
    """A LoRA step directory of adapters on the tiny checkpoint, written as train writes one."""
    model = with_random_adapters(tiny_base(tiny_ckpt), LORA, seed=3)
    path = tmp_path_factory.mktemp("lora") / "step_000001"
    base = {"base_path": str(tiny_ckpt), "base_fingerprint": fingerprint(tiny_base(tiny_ckpt))}
    llama31.save_lora_checkpoint(path, LORA, base, llama31.lora_state_dict(model))
    return path


# Merged against unmerged, in float32: x (W + s B A)^T and x W^T + s (x A^T) B^T are the same sums in another
# order (and W + s B A is rounded once more). A logit (up to ~10 here, ulp ~1e-6) ends a chain of such dot
# products of up to 176 terms, two blocks deep, so it moves by tens of ulps: measured 2.8e-5 on these weights.
# The bound is the 1e-4 used against Meta, whose code reorders the same sums.
MERGE_TOL = 1e-4


@torch.no_grad()
def test_lora_at_step_0_gives_exactly_the_base_logits_and_loss(tiny_ckpt):
    base = tiny_base(tiny_ckpt)
    tokens = random_tokens(BATCH, SEQ)
    want, want_loss = base(tokens), base(tokens[:, :-1], targets=tokens[:, 1:])
    lora = llama31.add_lora(tiny_base(tiny_ckpt), dataclasses.replace(LORA, dropout=0.1),
                            torch.Generator().manual_seed(0))
    assert len(llama31.lora_linears(lora)) == 7 * TINY["n_layers"]
    assert torch.equal(lora.eval()(tokens), want)
    assert torch.equal(lora.train()(tokens[:, :-1], targets=tokens[:, 1:]), want_loss)  # dropout on, B = 0
    # Meta's names stay: the base weights are where a Meta checkpoint puts them, the adapters beside them
    names = set(lora.state_dict())
    assert set(base.state_dict()) <= names
    assert "layers.0.attention.wq.lora_a.weight" in names and "layers.1.feed_forward.w2.lora_b.weight" in names
    assert all(v.dtype == torch.float32 for v in llama31.lora_state_dict(lora).values())


def test_lora_trains_only_the_adapters(tiny_ckpt):
    base = tiny_base(tiny_ckpt)
    model = llama31.add_lora(tiny_base(tiny_ckpt), dataclasses.replace(LORA, targets=("wq", "wv", "w2")),
                             torch.Generator().manual_seed(0))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.{m}.{ab}.weight" for i in range(2) for m in
                         ("attention.wq", "attention.wv", "feed_forward.w2") for ab in ("lora_a", "lora_b")}
    opt = llama31.configure_optimizer(model, 1e-2, 0.0, torch.device("cpu"))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = random_tokens(2, 33)
    losses = []
    for _ in range(3):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        assert all((p.grad is not None) == (k in trainable) for k, p in model.named_parameters())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    end = model.state_dict()
    assert all(torch.equal(end[k], start[k]) for k in base.state_dict())  # the base, bit for bit
    assert all(not torch.equal(end[k], start[k]) for k in trainable)  # every adapter moved
    assert losses[-1] < losses[0]


@torch.no_grad()
def test_merged_weights_give_the_logits_of_base_plus_adapters(tiny_ckpt):
    unmerged = with_random_adapters(tiny_base(tiny_ckpt), LORA, seed=3).eval()
    tokens = random_tokens(BATCH, SEQ)
    want = unmerged(tokens)
    assert (want - tiny_base(tiny_ckpt)(tokens)).abs().max() > 0.1  # the adapters do change the logits
    merged = llama31.merge_lora(unmerged)
    assert not llama31.lora_linears(merged) and set(merged.state_dict()) == set(tiny_base(tiny_ckpt).state_dict())
    assert (merged(tokens) - want).abs().max() < MERGE_TOL


def test_merge_cli_output_loads_in_llama_build_meta_reference_and_transformers(tmp_path, tiny_ckpt, lora_dir):
    from transformers import LlamaForCausalLM
    unmerged = llama31.Llama.build(str(tiny_ckpt), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu",
                                   dtype="float32", lora_dir=str(lora_dir))
    tokens = random_tokens(2, 40, seed=7)
    want = unmerged.model(tokens)
    r = run_cli("merge", "--ckpt_dir", str(tiny_ckpt), "--lora_dir", str(lora_dir), "--out_dir", str(tmp_path / "m32"),
                "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    ours = llama31.Llama.build(str(tmp_path / "m32"), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")
    assert (ours.model(tokens) - want).abs().max() < MERGE_TOL
    params = json.loads((tmp_path / "m32" / "params.json").read_text())
    meta = reference_model(params, torch.load(tmp_path / "m32" / "consolidated.00.pth", weights_only=True), SEQ, 2)
    assert (reference_logits(meta, tokens) - want).abs().max() < MERGE_TOL  # Meta's code, strictly loaded

    llama31.merge(str(tiny_ckpt), str(lora_dir), str(tmp_path / "hf"), to="hf", dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        b = hf(tokens).logits.float()
    assert ((want - b).norm() / b.norm()).item() < 1e-4  # the bound of the other transformers tests

    # by default the base's own dtype (bf16 here, as Meta ships): W + s B A in float32, rounded once
    llama31.merge(str(tiny_ckpt), str(lora_dir), str(tmp_path / "m16"))
    m16 = torch.load(tmp_path / "m16" / "consolidated.00.pth", weights_only=True)
    base = torch.load(tiny_ckpt / "consolidated.00.pth", weights_only=True)
    adapters = lora_adapters(lora_dir)
    assert all(v.dtype == torch.bfloat16 for v in m16.values()) and m16.keys() == base.keys()
    k = "layers.1.feed_forward.w3"
    delta = adapters[f"{k}.lora_b.weight"] @ adapters[f"{k}.lora_a.weight"]
    assert torch.equal(m16[f"{k}.weight"], (base[f"{k}.weight"].float() + LORA.alpha / LORA.rank * delta).bfloat16())
    assert torch.equal(m16["norm.weight"], base["norm.weight"])


@torch.no_grad()
def test_build_with_lora_dir_runs_adapters_unmerged_and_fuses_only_what_has_none(tmp_path, tiny_ckpt):
    lora = dataclasses.replace(LORA, targets=("wq", "w2"))
    model = with_random_adapters(tiny_base(tiny_ckpt), lora, seed=4).eval()
    path = tmp_path / "step_000001"
    base = {"base_path": str(tiny_ckpt), "base_fingerprint": fingerprint(tiny_base(tiny_ckpt))}
    llama31.save_lora_checkpoint(path, lora, base, llama31.lora_state_dict(model))
    llama = llama31.Llama.build(str(tiny_ckpt), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu",
                                dtype="float32", lora_dir=str(path))
    layer = llama.model.layers[0]
    assert layer.attention.wqkv is None and layer.feed_forward.w13 is not None  # w1, w3 carry no adapter
    tokens = random_tokens(BATCH, SEQ)
    torch.testing.assert_close(llama.model(tokens), model(tokens), atol=1e-5, rtol=0)  # as the fused-weights test
    r = run_cli("sample", "--ckpt_dir", str(tiny_ckpt), "--lora_dir", str(path), "--prompt", "Hello",
                "--max_seq_len", "64", "--max_gen_len", "8", "--temperature", "0", "--device", "cpu", "--dtype",
                "float32")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello" + llama.text_completion(["Hello"], temperature=0, max_gen_len=8)[0]["generation"] + "\n"


def test_base_fingerprint_is_the_same_for_meta_and_hf_files_any_dtype_and_unread_files(tmp_path, tiny_ckpt, tiny_sd):
    fp = fingerprint(tiny_base(tiny_ckpt))
    llama31.convert(str(tiny_ckpt), str(tmp_path / "hf"), to="hf")
    hf, _ = llama31.load_model(tmp_path / "hf", None, SEQ, 1, torch.device("cpu"), torch.bfloat16)
    assert fingerprint(hf) == fp
    for path in (tmp_path / "hf", write_meta_checkpoint(tmp_path / "mp", TINY, tiny_sd, n_files=2)):
        args, sd, _ = llama31.read_checkpoint(path, None, SEQ, 1)  # only the first row of each weight is read
        assert llama31.base_fingerprint(args, sd) == fp
    other = write_meta_checkpoint(tmp_path / "other", TINY, random_state_dict(TINY, seed=1))
    assert fingerprint(tiny_base(other)) != fp


@pytest.mark.parametrize("lora, message", [
    (dict(rank=0), "--lora_rank 0 must be a positive integer"),
    (dict(rank=2.5), "--lora_rank 2.5 must be a positive integer"),
    (dict(alpha=-1.0), "--lora_alpha -1.0 must be a number above 0"),
    (dict(dropout=1.0), "--lora_dropout 1.0 must be a number in [0, 1)"),
    (dict(targets="wq,wx"), "--lora_targets 'wq,wx' must name each of some of wq,wk,wv,wo,w1,w2,w3 once "
                            "(unknown: ['wx'])"),
    (dict(targets=()), "--lora_targets '' must name"),
])
def test_bad_lora_args_are_named(lora, message):
    with pytest.raises(ValueError) as e:
        dataclasses.replace(LORA, **lora).check()
    assert message in str(e.value)


def test_lora_dir_errors_are_one_line(tmp_path, tiny_ckpt, lora_dir):
    other = write_meta_checkpoint(tmp_path / "other", TINY, random_state_dict(TINY, seed=1))
    broken = tmp_path / "broken"
    shutil.copytree(lora_dir, broken)
    (broken / "adapter.json").write_text(json.dumps({**json.loads((lora_dir / "adapter.json").read_text()),
                                                     "rank": 0}))
    cases = [
        (lambda: llama31.Llama.build(str(tiny_ckpt), device="cpu", lora_dir=str(tiny_ckpt)), FileNotFoundError,
         f"--lora_dir {tiny_ckpt} holds no adapter.json, so no LoRA adapters"),
        (lambda: llama31.Llama.build(str(lora_dir), device="cpu"), ValueError,
         f"{lora_dir} holds LoRA adapters, not a model: pass it as --lora_dir"),
        (lambda: llama31.merge(str(tiny_ckpt), str(broken), str(tmp_path / "m")), ValueError,
         f"{broken / 'adapter.json'}: --lora_rank 0 must be a positive integer"),
        (lambda: llama31.merge(str(tiny_ckpt), str(lora_dir), str(tmp_path / "m"), to="gguf"), ValueError,
         "--to 'gguf' must be hf or meta"),
        (lambda: llama31.Llama.build(str(tiny_ckpt), device="cpu", quantize="int8", lora_dir=str(lora_dir)),
         ValueError, "--lora_dir runs adapters on the base's own weights, not on --quantize'd ones; merge"),
        (lambda: llama31.export(str(lora_dir), str(tmp_path / "m")), ValueError,
         f"{lora_dir} holds LoRA adapters, not a model: merge them into the base they were trained on"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=re.escape(message)):
            call()
    assert not (tmp_path / "m").exists()
    sample = ["sample", "--prompt", "Hi", "--max_seq_len", "64", "--max_gen_len", "2", "--device", "cpu"]
    results = run_cli_all({"another_base": [*sample, "--ckpt_dir", other, "--lora_dir", lora_dir],
                           "no_adapters": [*sample, "--ckpt_dir", tiny_ckpt, "--lora_dir", tiny_ckpt]}, tmp_path)
    assert_one_line_error(results["another_base"], f"--lora_dir {lora_dir} holds adapters trained on another base "
                          f"({tiny_ckpt}", f"than --ckpt_dir {other}")
    assert_one_line_error(results["no_adapters"], f"--lora_dir {tiny_ckpt} holds no adapter.json")


def test_linear_cross_entropy_without_the_weight_gradient_gives_the_same_loss_and_input_gradient():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(50, 16, generator=g, requires_grad=True), torch.randn(300, 16, generator=g)
    t = torch.randint(0, 300, (50,), generator=g)
    full = llama31.LinearCrossEntropy.apply(h, w.requires_grad_(True), t, -100, 7, True)
    frozen = llama31.LinearCrossEntropy.apply(h, w.detach(), t, -100, 7, True, False)
    assert torch.equal(frozen, full)
    assert torch.equal(torch.autograd.grad(frozen, h)[0], torch.autograd.grad(full, h)[0])


# QLoRA: a base whose linear input sizes are multiples of the int4 group (64)
QLORA_PARAMS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=64,
                    use_scaled_rope=True)


def saved_tensor_shapes(fn) -> list:
    shapes = []

    def pack(t):
        shapes.append((tuple(t.shape), t.dtype))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return shapes


def copy_model(model: llama31.Transformer) -> llama31.Transformer:
    out = llama31.Transformer(model.params)
    out.load_state_dict(model.state_dict())
    return out


def test_qlora_computes_with_exactly_the_weights_it_holds_and_keeps_none_dequantized(tmp_path):
    base = llama31.Transformer(llama31.ModelArgs(**QLORA_PARAMS, max_seq_len=SEQ))
    base.init_weights(torch.Generator().manual_seed(0))
    qlora = copy_model(base)
    for layer in qlora.layers:
        llama31.quantize_block(layer, CPU)
    llama31.add_lora(qlora.requires_grad_(False), LORA, torch.Generator().manual_seed(1))
    int4 = {n: m for n, m in qlora.named_modules() if isinstance(m, llama31.Int4Linear)}
    assert len(int4) == 7 * 2 and all(n.endswith(".quantized") for n in int4)
    assert all(m.weight.dtype == torch.uint8 for m in int4.values())  # two to a byte, as Int4Matmul reads them
    # the same model with the dequantized weights as plain float32 linears computes the same, bit for bit
    dequantized = copy_model(base)
    with torch.no_grad():
        for n, m in int4.items():
            dequantized.get_parameter(n.removesuffix(".quantized") + ".weight").copy_(m.dequantize(torch.float32))
    llama31.add_lora(dequantized, LORA, torch.Generator().manual_seed(1))
    for model in (qlora, dequantized):  # the same adapters, with B not zero
        with torch.no_grad():
            for m in llama31.lora_linears(model).values():
                m.lora_b.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(2))
    tokens = random_tokens(3, 21)  # 60 rows: the loss's saved (rows, dim) gradient has no weight's shape
    loss_q = qlora(tokens[:, :-1], targets=tokens[:, 1:])
    loss_d = dequantized(tokens[:, :-1], targets=tokens[:, 1:])
    assert torch.equal(loss_q, loss_d)
    loss_q.backward()
    loss_d.backward()
    grads_d = {k: p.grad for k, p in dequantized.named_parameters() if p.requires_grad}
    assert {k: p.grad for k, p in qlora.named_parameters() if p.requires_grad}.keys() == grads_d.keys()
    assert all(torch.equal(p.grad, grads_d[k]) for k, p in qlora.named_parameters() if p.requires_grad)
    # what autograd keeps for the backward: the bf16-LoRA model keeps every frozen weight, QLoRA none
    # (a matmul keeps W^T, of shape (in, out))
    weight_shapes = {(m.out_features, m.in_features) for m in int4.values()}
    either_way = weight_shapes | {(i, o) for o, i in weight_shapes}
    kept = saved_tensor_shapes(lambda: qlora(tokens[:, :-1], targets=tokens[:, 1:]))
    assert not [s for s, dtype in kept if s in either_way and dtype.is_floating_point]
    kept = {s for s, _ in saved_tensor_shapes(lambda: dequantized(tokens[:, :-1], targets=tokens[:, 1:]))}
    assert all((o, i) in kept or (i, o) in kept for o, i in weight_shapes)

# training with adapters: the train command's data, schedule, checkpoints and --resume, through LoRA

LORA_FLAGS = dict(lora_rank=4, lora_alpha=8.0)


@pytest.fixture(scope="module")
def qlora_ckpt(tmp_path_factory) -> Path:
    """A tiny base QLoRA can quantize: every linear input size a multiple of the int4 group."""
    model = llama31.Transformer(llama31.ModelArgs(**QLORA_PARAMS, max_seq_len=64))
    model.init_weights(torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("qlora") / "base"
    llama31.save_checkpoint(model, path, default_tokenizer_path())
    return path


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def lora_adapters(step_dir: Path) -> dict:
    """The adapters of a LoRA step directory, whole (as merge and --lora_dir read them)."""
    return llama31.read_lora_checkpoint(step_dir)[2]


def test_lora_training_starts_at_the_base_loss_and_saves_only_the_adapters(init_ckpt, train_data, tmp_path):
    full = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "full", max_steps=1))
    losses = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "lora", max_steps=3,
                                          learning_rate=1e-2, lora_dropout=0.1, **LORA_FLAGS))
    assert losses[0] == full[0]  # the loss of step 1 is the base's, bit for bit (B = 0, dropout or not)
    step = tmp_path / "lora" / "step_000003"
    # a training checkpoint of one process (DCP's index and one shard file) with adapter.json, not params.json
    assert sorted(p.name for p in step.iterdir()) == [".metadata", "__0_0.distcp", "adapter.json"]
    assert not list((tmp_path / "lora").glob("export_*"))  # a LoRA run exports nothing
    # megabytes against the base's: here 0.2% of it (4 tensors per adapted linear, 14 adapted linears)
    assert dir_bytes(step) < 0.01 * (init_ckpt / "consolidated.00.pth").stat().st_size
    config = json.loads((step / "adapter.json").read_text())
    assert config == {"rank": 4, "alpha": 8.0, "dropout": 0.1, "targets": list(llama31.LORA_TARGETS),
                      "base_path": str(init_ckpt.resolve()),
                      "base_fingerprint": fingerprint(llama31.load_model(init_ckpt)[0])}
    adapters = lora_adapters(step)
    assert len(adapters) == 2 * 7 * 2 and all(v.dtype == torch.float32 for v in adapters.values())
    assert all(adapters[k].abs().max() > 0 for k in adapters if "lora_b" in k)  # B has left zero
    # every tensor the checkpoint holds: the adapters, AdamW's state of them alone, the step and data position
    saved = llama31.checkpoint_reader(step).read_metadata().state_dict_metadata
    moments = {f"optimizer.{k}.{m}" for k in adapters for m in ("step", "exp_avg", "exp_avg_sq")}
    assert saved.keys() == {f"model.{k}" for k in adapters} | moments | {"train.step", "train.shard",
                                                                         "train.position"}
    # the run's checkpoint is usable as it is: base + adapters unmerged, and merged
    llama31.merge(str(init_ckpt), str(step), str(tmp_path / "merged"))
    tokens = random_tokens(2, 30)
    unmerged = llama31.Llama.build(str(init_ckpt), max_seq_len=64, device="cpu", lora_dir=str(step)).model(tokens)
    merged = llama31.Llama.build(str(tmp_path / "merged"), max_seq_len=64, device="cpu").model(tokens)
    assert (merged - unmerged).abs().max() < MERGE_TOL


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_lora_and_qlora_resume_continues_exactly(init_ckpt, qlora_ckpt, train_data, tmp_path, quantize):
    """As test_resume_continues_exactly, with adapters (and dropout, which draws from the RNG), their
    checkpoints written in the background (--async_save, as on a GPU)."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    kw = dict(max_steps=6, save_every=3, learning_rate=1e-2, lora_dropout=0.1, quantize=quantize, async_save=True,
              **LORA_FLAGS)
    base = qlora_ckpt if quantize else init_ckpt
    losses_a = llama31.train(**train_kwargs(base, train_data, a_dir, **kw))
    shutil.copytree(a_dir / "step_000003", b_dir / "step_000003")
    losses_b = llama31.train(**train_kwargs(base, train_data, b_dir, resume=True, **kw))
    assert len(losses_a) == 6 and losses_b == losses_a[3:]  # bitwise on the CPU
    wa, wb = lora_adapters(a_dir / "step_000006"), lora_adapters(b_dir / "step_000006")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_lora_over_two_processes_matches_gradient_accumulation(init_ckpt, train_data, tmp_path):
    """FSDP2 shards the frozen base with the adapters: 2 processes give the losses and adapters of 1 process
    with twice the gradient accumulation (the bounds of the full-finetuning test); and their checkpoint resumes
    on 1 process as the 1-process run's own does, within the same bounds."""
    train_two_and_one(init_ckpt, train_data, tmp_path / "fsdp", tmp_path / "one", 3, "cpu", 120, "--fsdp", "True",
                      both=("--lora_rank", "4", "--lora_alpha", "8"))
    a, b = logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "one")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, rel=1e-4, abs=0)
        assert norm_a == pytest.approx(norm_b, rel=1e-4, abs=0)
    wa, wb = lora_adapters(tmp_path / "fsdp" / "step_000003"), lora_adapters(tmp_path / "one" / "step_000003")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    # each rank wrote its half of every adapter and moment; one process reads both halves (DCP reshards) and
    # goes on from the same token of the data
    assert sorted(p.name for p in (tmp_path / "fsdp" / "step_000003").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "adapter.json"]
    shutil.copytree(tmp_path / "fsdp" / "step_000003", tmp_path / "resharded" / "step_000003")
    kw = dict(max_steps=5, warmup_steps=1, total_batch_size=2 * B * T, resume=True, **LORA_FLAGS)
    resharded = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "resharded", **kw))
    continued = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "one", **kw))
    assert len(continued) == 2 and resharded == pytest.approx(continued, rel=1e-4, abs=0)
    wa, wb = lora_adapters(tmp_path / "resharded" / "step_000005"), lora_adapters(tmp_path / "one" / "step_000005")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_fsdp_lora_on_two_gpus_matches_one_gpu(init_ckpt, train_data, tmp_path):
    """FSDP2 LoRA over 2 GPUs (the bf16 base read to the CPU and sharded onto the GPUs, float32 adapters)
    follows 1 GPU with twice the gradient accumulation within the full-finetuning test's 1e-2."""
    train_two_and_one(init_ckpt, train_data, tmp_path / "fsdp", tmp_path / "one", 6, "cuda", 300,
                      both=("--lora_rank", "4", "--lora_alpha", "8"))
    a, b = logged_losses(tmp_path / "fsdp"), logged_losses(tmp_path / "one")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss, _ in a] == pytest.approx([loss for _, loss, _ in b], rel=1e-2)

def test_disk_space_check_counts_what_a_checkpoint_holds(init_ckpt, train_data, tmp_path, monkeypatch):
    """A LoRA checkpoint (adapters + their AdamW moments, 58 kB here) fits where a full one (100 MB) does not."""
    one_mb_free = shutil.disk_usage(tmp_path)._replace(free=10**6)
    monkeypatch.setattr(llama31.shutil, "disk_usage", lambda path: one_mb_free)
    llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "lora", max_steps=1, **LORA_FLAGS))
    with pytest.raises(OSError, match="has 0.00 GB free, but a checkpoint of this model needs about 0.10 GB"):
        llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "full", max_steps=1))


def test_lora_train_errors_name_the_flag_and_are_one_line(init_ckpt, train_data, tmp_path, tiny_ckpt):
    lora_run, full_run = tmp_path / "lora_run", tmp_path / "full_run"
    llama31.train(**train_kwargs(init_ckpt, train_data, lora_run, max_steps=1, **LORA_FLAGS))
    llama31.train(**train_kwargs(init_ckpt, train_data, full_run, max_steps=1))
    cases = [
        (dict(lora_rank=4, lora_alpha=-1), "--lora_alpha -1 must be a number above 0"),
        (dict(lora_rank=4, lora_targets="wq,wx"), "--lora_targets 'wq,wx' must name .* \\(unknown: \\['wx'\\]\\)"),
        (dict(lora_rank=4, quantize="int3"), "--quantize 'int3': only int4, with --lora_rank"),
        (dict(quantize="int4"), "--quantize 'int4': only int4, with --lora_rank"),
        (dict(lora_rank=4, quantize="int4"), "--group_size 64 does not divide the 32 inputs of a linear layer"),
        (dict(lora_rank=4, pure_bf16=True), "without --pure_bf16"),
        (dict(lora_rank=8, resume=True, out_dir=str(lora_run)),
         "holds adapters of LoRAArgs\\(rank=4, alpha=8.0.*flags ask for LoRAArgs\\(rank=8, alpha=16.0"),
        (dict(resume=True, out_dir=str(lora_run)), "step_000001 holds LoRA adapters; resume it with the --lora_"),
        (dict(resume=True, out_dir=str(full_run), **LORA_FLAGS), "step_000001 holds a whole model; resume it without"),
        (dict(export_every=2, **LORA_FLAGS), "--export_every 2: a LoRA run checkpoints its adapters only and exports "
                                             "nothing; merge"),
    ]
    for flags, message in cases:
        with pytest.raises(ValueError, match=message):
            llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path / "o", max_steps=2) | flags)
    assert not any((tmp_path / "o").glob("step_*"))
    # and on the command line, one line each (a lora_dir of another base: its adapters, --ckpt_dir)
    lora = ["--lora_rank", 4, "--lora_alpha", 8, "--max_steps", 2]
    results = run_cli_all({"rank_0": train_flags(init_ckpt, train_data, tmp_path / "o", "--lora_rank", 0),
                           "another_base": train_flags(tiny_ckpt, train_data, lora_run, *lora, "--resume")}, tmp_path)
    assert_one_line_error(results["rank_0"], "--lora_rank 0 must be a positive integer")
    assert_one_line_error(results["another_base"], f"holds adapters trained on another base ({init_ckpt.resolve()}",
                          f"than --ckpt_dir {tiny_ckpt}")


@cuda
@pytest.mark.parametrize("quantize", [None, "int4"])
def test_gpu_lora_and_qlora_start_at_the_bf16_base_loss_compile_and_resume(qlora_ckpt, train_data, tmp_path,
                                                                            quantize):
    """On a GPU (bf16 base, bf16 autocast, compiled, activation checkpointing): step 1's loss is the bf16 base's
    (QLoRA: the base's int4 weights, dequantized), within the 1e-3 of compiled against eager; a resumed run
    follows the uninterrupted one within it too (GPU kernels need not be bitwise reproducible)."""
    kw = dict(device="cuda", max_steps=4, save_every=2, learning_rate=1e-2, lora_dropout=0.1, quantize=quantize,
              compile=True, activation_checkpointing=True, **LORA_FLAGS)
    losses = llama31.train(**train_kwargs(qlora_ckpt, train_data, tmp_path / "a", **kw))
    shutil.copytree(tmp_path / "a" / "step_000002", tmp_path / "b" / "step_000002")
    resumed = llama31.train(**train_kwargs(qlora_ckpt, train_data, tmp_path / "b", resume=True, **kw))
    assert resumed == pytest.approx(losses[2:], rel=1e-3)
    device = torch.device("cuda")
    if quantize:
        base = llama31.load_qlora_base(qlora_ckpt, None, 64, 1, device, torch.bfloat16, llama31.INT4_GROUP_SIZE)[0]
    else:
        base = llama31.load_model(qlora_ckpt, max_seq_len=64, device=device, dtype=torch.bfloat16)[0]
    x, y = loader(train_data, B, T).next_batch()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        assert base(x.to(device), targets=y.to(device)).item() == pytest.approx(losses[0], rel=1e-3)

# -----------------------------------------------------------------------------
# reliability: SIGKILL at random moments (also mid-save) leaves loadable checkpoints; --resume is exact
# (subprocesses start in a session of their own and write to a file: a hung child never blocks a pipe)


def start(argv: list, log: Path, ddp: bool = False) -> subprocess.Popen:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if ddp \
        else [sys.executable]
    with open(log, "w") as f:
        return subprocess.Popen([*launcher, str(HERE / "llama31.py"), *argv], cwd=HERE, env=subprocess_env(),
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def descendants(pid: int) -> list:
    """Child processes, recursively (torchrun starts its workers in sessions of their own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k, *descendants(k)]
    return out


def kill_tree(proc: subprocess.Popen, sig=signal.SIGKILL):
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def wait_until(cond, proc: subprocess.Popen, log: Path, timeout: float = 90, poll: float = 0.003):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) first:\n{log.read_text()[-3000:]}"
        assert time.time() - t0 < timeout, log.read_text()[-3000:]
        time.sleep(poll)


def step_dirs(out_dir: Path) -> list:
    return sorted(p for p in out_dir.iterdir() if p.name.startswith("step_"))


def checkpoint_files(world: int) -> list:
    """A training checkpoint's files: DCP's index and each rank's shards, the model's shape, the tokenizer."""
    return sorted([".metadata", *(f"__{r}_0.distcp" for r in range(world)), "params.json", "tokenizer.model"])


def check_checkpoint(step_dir: Path, world: int = 1) -> tuple:
    """A complete training checkpoint: every file there, the weights load strictly and are finite, the
    tokenizer is whole, all of it loads into a fresh model and AdamW, and it holds the step of the
    directory's name. Returns (weights, state)."""
    assert sorted(p.name for p in step_dir.iterdir()) == checkpoint_files(world), step_dir
    args, sd = llama31.read_training_checkpoint(step_dir, max_seq_len=64)
    with torch.device("meta"):
        model = llama31.Transformer(args)
    llama31.load_weights(model, dict(sd), str(step_dir), CPU, torch.float32)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert (step_dir / "tokenizer.model").read_bytes() == default_tokenizer_path().read_bytes()
    state = checkpoint_state(step_dir)
    assert state["step"] == int(step_dir.name.removeprefix("step_"))
    return sd, state


def test_sigkill_mid_save_and_at_random_leaves_loadable_checkpoints_and_resume_is_exact(
        init_ckpt, train_data, tmp_path):
    rnd = random.Random(1234)
    flags = ("--max_steps", 6, "--save_every", 1)
    ref_dir, out = tmp_path / "ref", tmp_path / "victim"
    ref = start(train_flags(init_ckpt, train_data, ref_dir, *flags), tmp_path / "ref.log")  # uninterrupted
    killed_mid_save = []

    def check_all_complete():
        dirs = step_dirs(out)
        for d in dirs:
            check_checkpoint(d)
        # --resume picks the newest of them; half-written saves exist only under a dot-prefixed name
        assert llama31.latest_checkpoint(out) == (dirs[-1] if dirs else None)
        assert all(p.name.startswith((".step_", "step_", "export_")) or p.name == "log.jsonl" for p in out.iterdir())
        return dirs

    # kill 1: right after a save of step >= 2 has begun writing (under whatever name)
    log = tmp_path / "run1.log"
    victim = start(train_flags(init_ckpt, train_data, out, *flags), log)
    wait_until(lambda: out.exists() and any(p.name.lstrip(".")[:11] in [f"step_{s:06d}" for s in range(2, 7)]
                                            for p in out.iterdir()), victim, log)
    time.sleep(rnd.uniform(0, 0.05))
    kill_tree(victim)
    killed_mid_save.append(any(out.glob(f".step_*.tmp{victim.pid}")))
    assert len(check_all_complete()) >= 1

    # kill 2: --resume, then a random moment once it has trained a step
    n_logged = len(log_records(out))
    log = tmp_path / "run2.log"
    victim = start(train_flags(init_ckpt, train_data, out, *flags, "--resume"), log)
    wait_until(lambda: len(log_records(out)) > n_logged, victim, log)
    time.sleep(rnd.uniform(0, 0.4))
    assert victim.poll() is None, "the run finished before it could be killed"
    kill_tree(victim)
    killed_mid_save.append(any(out.glob(f".step_*.tmp{victim.pid}")))
    assert "resumed from" in log.read_text()
    latest = check_all_complete()[-1]
    assert latest.name != "step_000006"

    # run to the end
    log = tmp_path / "run3.log"
    last = start(train_flags(init_ckpt, train_data, out, *flags, "--resume"), log)
    assert last.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"resumed from {latest} at step {int(latest.name[5:])}" in log.read_text()
    assert ref.wait(timeout=120) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert any(killed_mid_save), "no kill landed inside a checkpoint save"

    # every loss any of the three runs logged is, bitwise, the uninterrupted run's loss of that step
    ref_losses = {r["step"]: (r["loss"], r["norm"]) for r in log_records(ref_dir)}
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6]
    got = [(r["step"], (r["loss"], r["norm"])) for r in log_records(out) if "loss" in r]
    assert {s for s, _ in got} == set(ref_losses)
    assert all(v == ref_losses[s] for s, v in got), (got, ref_losses)
    assert [d.name for d in check_all_complete()] == [f"step_{s:06d}" for s in range(1, 7)]
    assert not list(out.glob(".step_*")), "the temporary dirs of killed saves are cleaned up"
    assert_same_weights(out / "step_000006", ref_dir / "step_000006")
    state, ref_state = check_checkpoint(out / "step_000006")[1], check_checkpoint(ref_dir / "step_000006")[1]
    assert state == ref_state
    assert_positions(state, train_data, 6, 1)


def test_sigkill_during_an_async_save_loses_only_that_checkpoint(init_ckpt, train_data, tmp_path):
    """With --async_save the checkpoint of step N is written by a background thread while step N + 1 trains.
    A kill then loses that checkpoint (all there is of it is its temporary directory), the earlier ones stay
    complete, and --resume continues from the newest of them (removing the remains) to the end."""
    out = tmp_path / "out"
    flags = ("--max_steps", 8, "--save_every", 1, "--async_save", True)

    def writing_in_background():  # a save of step >= 2 whose shards are being written, its index not yet
        return out.exists() and any(p.name.startswith(".step_") and int(p.name[6:12]) >= 2
                                    and (p / "__0_0.distcp").exists() and not (p / ".metadata").exists()
                                    for p in out.iterdir())
    for attempt in range(4):  # the write takes a few hundred ms: a kill can land just after it, so try again
        log = tmp_path / f"run{attempt}.log"
        victim = start(train_flags(init_ckpt, train_data, out, *flags, *(["--resume"] if attempt else [])), log)
        wait_until(writing_in_background, victim, log, poll=0.001)
        kill_tree(victim)
        lost = list(out.glob(f".step_*.tmp{victim.pid}"))
        if lost:
            break
    assert lost, "no kill landed during a background write"
    dirs = step_dirs(out)
    assert dirs and dirs[-1].name < lost[0].name.removeprefix(".")  # the one being written is not among them
    for d in dirs:
        check_checkpoint(d)
    assert llama31.latest_checkpoint(out) == dirs[-1]

    log = tmp_path / "resume.log"
    resumed = start(train_flags(init_ckpt, train_data, out, *flags, "--resume"), log)
    assert resumed.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"resumed from {dirs[-1]} at step {int(dirs[-1].name[5:])}" in log.read_text()
    assert not list(out.glob(".step_*")), "the killed save's remains are removed"
    check_checkpoint(out / "step_000008")

# -----------------------------------------------------------------------------
# reliability: SIGTERM / SIGINT save the current step and exit 0


def test_sigterm_and_sigint_save_the_current_step_and_exit_0(init_ckpt, train_data, tmp_path):
    runs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        out, log = tmp_path / sig.name, tmp_path / f"{sig.name}.log"
        runs[sig] = (start(train_flags(init_ckpt, train_data, out, "--max_steps", 1000), log), out, log)
    for sig, (proc, out, log) in runs.items():
        wait_until(lambda: len(log_records(out)) >= 2, proc, log)
        proc.send_signal(sig)
    for sig, (proc, out, log) in runs.items():
        try:
            rc = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                kill_tree(proc)
        text = log.read_text()
        assert rc == 0, text[-3000:]
        last = log_records(out)[-1]["step"]
        assert f"stopped by a signal after saving step {last}; continue with --resume" in text
        assert "Traceback" not in text
        assert [d.name for d in step_dirs(out)] == [f"step_{last:06d}"]  # the step it had reached
        _, state = check_checkpoint(out / f"step_{last:06d}")
        assert_positions(state, train_data, last, 1)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_in_process_stops_after_the_step_with_a_checkpoint(init_ckpt, train_data, tmp_path, monkeypatch,
                                                                 capsys, sig):
    real, calls = llama31.Transformer.forward_loss, []

    def forward_loss(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:  # during the third step
            os.kill(os.getpid(), sig)
        return real(self, *a, **k)
    monkeypatch.setattr(llama31.Transformer, "forward_loss", forward_loss)
    losses = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, max_steps=50))
    assert len(losses) == 3 and len(calls) == 3
    assert [d.name for d in step_dirs(tmp_path)] == ["step_000003"]
    check_checkpoint(tmp_path / "step_000003")
    assert "stopped by a signal after saving step 3; continue with --resume" in capsys.readouterr().err


def test_ddp_sigterm_to_one_rank_saves_and_resume_matches_uninterrupted_ddp_run(init_ckpt, train_data, tmp_path):
    flags = ("--max_steps", 6)
    ref_dir, out = tmp_path / "ref", tmp_path / "victim"
    ref = start(train_flags(init_ckpt, train_data, ref_dir, *flags), tmp_path / "ref.log", ddp=True)
    log = tmp_path / "run1.log"
    victim = start(train_flags(init_ckpt, train_data, out, *flags), log, ddp=True)
    try:
        wait_until(lambda: len(log_records(out)) >= 1, victim, log, timeout=120, poll=0.01)
        # as under a scheduler that signals every task itself, one rank hears it first (here: only rank 1)
        environs = {pid: Path(f"/proc/{pid}/environ").read_bytes() for pid in descendants(victim.pid)}
        workers = {int(m[1]): pid for pid, env in environs.items() if (m := re.search(rb"(?:^|\0)RANK=(\d+)", env))}
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGTERM)
        rc = victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            kill_tree(victim)
    text = log.read_text()
    assert rc == 0, text[-3000:]
    last = log_records(out)[-1]["step"]
    assert 1 <= last < 6
    assert f"stopped by a signal after saving step {last}; continue with --resume" in text
    assert [d.name for d in step_dirs(out)] == [f"step_{last:06d}"]
    _, state = check_checkpoint(out / f"step_{last:06d}", world=2)
    # one data position for the run, from which each rank's own follows
    assert_positions(state, train_data, last, 2)

    log = tmp_path / "run2.log"
    resumed = start(train_flags(init_ckpt, train_data, out, *flags, "--resume"), log, ddp=True)
    assert resumed.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert f"resumed from {out / f'step_{last:06d}'} at step {last}" in log.read_text()
    assert "2 process(es)" in log.read_text()
    assert ref.wait(timeout=120) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_losses = {r["step"]: (r["loss"], r["norm"]) for r in log_records(ref_dir)}
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6]
    got = [(r["step"], (r["loss"], r["norm"])) for r in log_records(out) if "loss" in r]
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert all(v == ref_losses[s] for s, v in got), (got, ref_losses)  # bitwise
    assert_same_weights(out / "step_000006", ref_dir / "step_000006")
    assert_positions(check_checkpoint(out / "step_000006", world=2)[1], train_data, 6, 2)


# -----------------------------------------------------------------------------
# reliability: a non-finite step is skipped with a warning; --max_bad_steps in a row stop the run; NaN is never saved


class InfGrad(torch.autograd.Function):
    """The identity, whose gradient is infinite: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


def poison_steps(monkeypatch, bad: dict):
    """forward_loss returns a NaN loss ("nan") or a finite loss with an infinite gradient ("inf") on the
    0-based calls given."""
    real, calls = llama31.Transformer.forward_loss, []

    def forward_loss(self, *a, **k):
        loss = real(self, *a, **k)
        kind = bad.get(len(calls))
        calls.append(kind)
        return loss * float("nan") if kind == "nan" else InfGrad.apply(loss) if kind == "inf" else loss
    monkeypatch.setattr(llama31.Transformer, "forward_loss", forward_loss)
    return calls


def test_non_finite_steps_are_skipped_with_a_warning(init_ckpt, train_data, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, {2: "nan", 3: "inf"})
    losses = llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, max_steps=6, save_every=1,
                                          max_bad_steps=3))
    err = capsys.readouterr().err
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert "step 2: non-finite loss nan" in err and "(1 in a row)" in err
    assert re.search(r"step 3: non-finite loss [0-9.]+ or grad norm (inf|nan), step skipped \(2 in a row\)", err)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2, 5, 6]
    for d in step_dirs(tmp_path):
        check_checkpoint(d)  # all finite
    # the skipped steps changed no weight
    assert_same_weights(tmp_path / "step_000002", tmp_path / "step_000003")
    assert_same_weights(tmp_path / "step_000002", tmp_path / "step_000004")


def test_max_bad_steps_in_a_row_stops_without_saving_nan(init_ckpt, train_data, tmp_path, monkeypatch):
    calls = poison_steps(monkeypatch, {1: "nan", 2: "inf", 3: "nan"})
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row at step 3"):
        llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, max_steps=10, save_every=1, max_bad_steps=3))
    assert len(calls) == 4  # stopped right there
    assert [d.name for d in step_dirs(tmp_path)] == ["step_000001", "step_000002", "step_000003"]
    for d in step_dirs(tmp_path):
        check_checkpoint(d)


@pytest.fixture(scope="module")
def nan_ckpt(init_ckpt, tmp_path_factory) -> Path:
    """The init checkpoint with one NaN in the final norm: every loss and gradient is NaN."""
    path = tmp_path_factory.mktemp("nan") / "ckpt"
    shutil.copytree(init_ckpt, path)
    sd = torch.load(path / "consolidated.00.pth", weights_only=True)
    sd["norm.weight"][0] = float("nan")
    torch.save(sd, path / "consolidated.00.pth")
    return path


def test_no_checkpoint_with_nan_is_saved(init_ckpt, nan_ckpt, train_data, tmp_path, monkeypatch):
    # non-finite weights to start from are refused before training
    with pytest.raises(ValueError, match=re.escape(str(nan_ckpt)) + ".*non-finite weights"):
        llama31.train(**train_kwargs(nan_ckpt, train_data, tmp_path, max_steps=2, save_every=1))
    assert not any(tmp_path.iterdir())
    # weights that turn non-finite in an update (a finite gradient can still overflow) are never saved
    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(FloatingPointError, match="not saving .*step_000001.*non-finite"):
        llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, max_steps=2, save_every=1))
    assert not any(tmp_path.glob("*step_*"))


# -----------------------------------------------------------------------------
# reliability: an --out_dir that cannot be written fails before training starts


@pytest.mark.parametrize("case", ["is_a_file", "under_a_file"])
def test_out_dir_is_checked_before_the_model_or_data_are_read(tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = blocker if case == "is_a_file" else blocker / "out"
    # main() turns exactly these into a one-line error
    with pytest.raises((ValueError, OSError, FloatingPointError), match=re.escape(str(blocker))):
        llama31.train(ckpt_dir=str(tmp_path / "no_such_ckpt"), train_data=str(tmp_path / "none_*.bin"),
                      val_data=None, out_dir=str(out), device="cpu", seq_len=T, batch_size=B)
    assert blocker.read_text() == ""


# -----------------------------------------------------------------------------
# security: weights only, no code from files, no network


class Payload:
    """Unpickling this creates the file `marker` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_pickled_code_in_checkpoint_files_never_runs(init_ckpt, train_data, tmp_path, good_sd, cached_tokenizer,
                                                      fmt):
    marker = tmp_path / "pwned"

    def write_evil(path: Path, obj):
        torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")

    # the payload is live: an unrestricted load runs it
    write_evil(tmp_path / "probe.pt", {"x": Payload(marker)})
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    # in the weights
    ckpt = write_ckpt(tmp_path / "ckpt", PARAMS, b"")
    write_evil(ckpt / "consolidated.00.pth", {**good_sd, "evil": Payload(marker)})
    with pytest.raises(ValueError, match=re.escape(str(ckpt / "consolidated.00.pth"))):
        load(ckpt)
    assert not marker.exists()

    # in a training checkpoint's .metadata (DCP unpickles it), read by --resume
    out = tmp_path / "out"
    llama31.train(**train_kwargs(init_ckpt, train_data, out, max_steps=1))
    (out / "log.jsonl").unlink()
    (out / "step_000001" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="could run code"):
        llama31.train(**train_kwargs(init_ckpt, train_data, out, max_steps=2, resume=True))
    assert not marker.exists()
    assert not (out / "log.jsonl").exists()  # refused before training


@pytest.mark.parametrize("saved", [False], ids=["untied"], indirect=True)  # any checkpoint will do
def test_code_in_a_training_checkpoint_never_runs(saved, tmp_path):
    model, optimizer, step_dir = saved
    marker = tmp_path / "pwned"
    # DCP itself would run it: it reads .metadata with pickle.load
    evil = tmp_path / "evil_metadata"
    shutil.copytree(step_dir, evil)
    (evil / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    for load in (lambda: llama31.Llama.build(str(evil), max_seq_len=64, device="cpu"),
                 lambda: llama31.export(str(evil), str(tmp_path / "out")),
                 lambda: llama31.load_training_checkpoint(evil, model, optimizer)):
        with pytest.raises(ValueError, match=re.escape(str(evil / ".metadata")) + ".*could run code"):
            load()
    # a pickled object where a tensor belongs: DCP would unpickle it with weights_only=False
    bytes_item = tmp_path / "bytes_item"
    sd = llama31.training_state(model, optimizer)
    sd["model"]["norm.weight"] = Payload(marker)
    dcp.save(sd, checkpoint_id=bytes_item, no_dist=True)
    shutil.copy(step_dir / "params.json", bytes_item)
    with pytest.raises(ValueError, match="model.norm.weight is a pickled object"):
        llama31.load_training_checkpoint(bytes_item, model, optimizer)
    with pytest.raises(ValueError, match=re.escape(f"{bytes_item}: model.norm.weight has shape nothing")):
        llama31.read_training_checkpoint(bytes_item)
    (evil / ".metadata").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="is not DCP metadata"):
        llama31.export(str(evil), str(tmp_path / "out"))
    assert not marker.exists()


def dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def unsafe_calls(source: str) -> list:
    """Calls that can run code from data: eval / exec / pickle / marshal, torch.load without
    weights_only=True, np.load with allow_pickle."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"import {n}" for n in names if n and n.split(".")[0] in ("pickle", "marshal", "shelve", "dill")]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords}
        if name in ("eval", "exec", "compile", "__import__") or name.split(".")[0] in ("pickle", "marshal"):
            bad.append(name)
        elif name.split(".")[-1] == "load" and name.split(".")[0] == "torch" and not (
                isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
            bad.append(f"{name} without weights_only=True (line {node.lineno})")
        elif name in ("np.load", "numpy.load") and "allow_pickle" in kw:
            bad.append(f"{name} with allow_pickle (line {node.lineno})")
    return bad


def test_source_never_loads_code_from_data():
    # the checker itself finds what it looks for
    assert len(unsafe_calls("import pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\neval(s)\n"
                            "exec(s)\npickle.loads(b)\nnp.load(p, allow_pickle=True)\nm.eval()\n"
                            "torch.load(p, weights_only=True)\n")) == 7
    for name in ("llama31.py", "tokenizer.py"):
        source = (HERE / name).read_text()
        assert unsafe_calls(source) == [], name
        assert source.count("torch.load(") == len(re.findall(r"torch\.load\([^()]*weights_only=True", source))


def test_only_tinystories_touches_the_network_and_only_its_url():
    for name in ("llama31.py", "tokenizer.py"):
        tree = ast.parse((HERE / name).read_text())
        urls = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and "://" in n.value}
        assert urls <= {llama31.TINYSTORIES_URL}, (name, urls)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

        def function_of(node):
            while node in parents:
                node = parents[node]
                if isinstance(node, ast.FunctionDef):
                    return node.name
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(m.split(".")[0] in ("urllib", "socket", "http", "requests", "huggingface_hub", "tiktoken_ext")
                       for m in mods):
                    assert function_of(node) == "tinystories", (name, node.lineno, mods)


def block_network(monkeypatch) -> list:
    """Every way out to the network raises (and is recorded, in case a library swallows the error)."""
    attempts = []

    def refuse(*a, **k):
        attempts.append(a)
        raise OSError(f"network use in a test: {a[1:] or a}")
    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


def test_tinystories_downloads_only_its_url(tmp_path, monkeypatch, cached_tokenizer):
    fetched = []

    def urlretrieve(url, path):
        fetched.append(url)
        data = json.dumps([{"story": "Once upon a time."}, {"story": "The end."}]).encode()
        with tarfile.open(path, "w:gz") as tar:
            info = tarfile.TarInfo("data00.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    monkeypatch.setattr(urllib.request, "urlretrieve", urlretrieve)
    attempts = block_network(monkeypatch)
    written = llama31.tinystories(str(tmp_path / "ts"), max_files=1, val_fraction=0.5)
    assert fetched == [llama31.TINYSTORIES_URL] and attempts == []
    assert written["train"] and written["val"]


def test_sample_and_train_use_no_network(init_ckpt, train_data, tmp_path, monkeypatch, capsys):
    attempts = block_network(monkeypatch)
    with pytest.raises(OSError, match="network use in a test"):
        socket.create_connection(("example.com", 80))
    assert attempts
    attempts.clear()
    llama31.sample(str(init_ckpt), prompt="Hello", max_gen_len=4, max_seq_len=64, device="cpu", dtype="float32",
                   temperature=0)
    llama31.sample(str(init_ckpt), max_gen_len=4, max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    llama31.train(**train_kwargs(init_ckpt, train_data, tmp_path, val_data=train_data, val_steps=1, val_every=1,
                                 max_steps=1, sample_every=1, sample_len=4))
    assert "sample: The" in capsys.readouterr().out
    assert attempts == []
    assert (tmp_path / "step_000001").is_dir()


# -----------------------------------------------------------------------------
# CLI: sample, chat, demo; every error is one line on stderr and exit code 2, without a traceback


def run_cli_all(cases: dict, cwd: Path, timeout: float = 180) -> dict:
    """name -> argv, all run at once (each spends most of its time importing torch); name -> result."""
    procs = {name: subprocess.Popen([sys.executable, str(HERE / "llama31.py"), *map(str, argv)], cwd=cwd,
                                    env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, argv in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=timeout)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("llama31: error: "), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture(scope="module")
def cli(init_ckpt, nan_ckpt, train_data, good_sd, tmp_path_factory) -> dict:
    """Every command-line error case of this file, run at once: name -> (result, what the test needs)."""
    d = tmp_path_factory.mktemp("cli")
    blocker = d / "a_file"
    blocker.write_text("not a directory")
    empty = d / "train_000000.bin"
    empty.write_bytes(b"")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    bad_pth = write_ckpt(d / "bad_pth", PARAMS, [1, 2, 3])
    cases = {
        "nan_ckpt": (train_flags(nan_ckpt, train_data, d / "nan_out", "--max_steps", 5), nan_ckpt),
        "learning_rate": (train_flags(init_ckpt, train_data, d / "lr_out", "--max_steps", 1, "--learning_rate", "1e38"),
                          d / "lr_out"),
        "out_dir_is_a_file": (train_flags(init_ckpt, train_data, blocker, "--max_steps", 1), blocker),
        "empty_shard": (train_flags(init_ckpt, str(empty), d / "out", "--max_steps", 1), empty),
        "prepare_bad_record": (["prepare", d / "bad.jsonl", "--out_dir", d / "data"], d / "bad.jsonl"),
        "sample_bad_pth": (["sample", "--ckpt_dir", bad_pth, "--device", "cpu", "--max_seq_len", 64],
                           bad_pth / "consolidated.00.pth"),
    }
    results = run_cli_all({name: argv for name, (argv, _) in cases.items()}, d)
    assert blocker.read_text() == "not a directory"
    return {name: (results[name], info) for name, (_, info) in cases.items()}


def test_cli_sample_streams_a_completion(tiny_ckpt, llama):
    r = run_cli("sample", "--ckpt_dir", str(tiny_ckpt), "--prompt", "Hello", "--max_seq_len", "64",
                "--max_gen_len", "8", "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    expected = llama.text_completion(["Hello"], temperature=0, max_gen_len=8)[0]["generation"]
    assert r.stdout == "Hello" + expected + "\n"


CHAT_FLAGS = ["--max_seq_len", "64", "--max_gen_len", "4", "--temperature", "0", "--system", "Be brief.",
              "--device", "cpu"]
CHAT_INPUT = "Hi\nAnd then?\n"


def chat_transcript(llama) -> str:
    """What `chat CHAT_FLAGS` prints for CHAT_INPUT, from the model itself."""
    first = llama.chat_completion([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
                                  temperature=0, max_gen_len=4)[0]["generation"]
    second = llama.chat_completion([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     first, {"role": "user", "content": "And then?"}]],
                                   temperature=0, max_gen_len=4)[0]["generation"]
    # at the end of input the chat ends on a new line
    return f"user> assistant> {first['content']}\nuser> assistant> {second['content']}\nuser> \n"


def test_cli_chat_multi_turn(tiny_ckpt, llama):
    r = run_cli("chat", "--ckpt_dir", str(tiny_ckpt), *CHAT_FLAGS, input=CHAT_INPUT)
    assert r.returncode == 0, r.stderr
    assert r.stdout == chat_transcript(llama)


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The first-run demo's machinery, shortened to 3 steps: Python's docs tokenized into shards, the tiny
    preset trained from scratch, a checkpoint saved, loaded back and sampled from."""
    llama31.demo(out_dir=str(tmp_path / "out"), data_dir=str(tmp_path / "data"), max_steps=3, device="cpu")
    out = capsys.readouterr().out
    assert (tmp_path / "data" / "train_000000.bin").exists() and (tmp_path / "data" / "val_000000.bin").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["export_000003", "log.jsonl", "loss.png",
                                                                    "step_000003"]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 3 and losses[0] == pytest.approx(math.log(128256), abs=0.1)
    assert "samples from" in out and "The for statement" in out and "A function definition" in out


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = run_cli("sample", "--ckpt_dir", str(tmp_path / "missing"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"llama31: error: checkpoint directory {tmp_path / 'missing'} "
                                             "does not exist (or is not a directory)"]


def test_cli_bad_flag_value(tiny_ckpt):
    r = run_cli("sample", "--ckpt_dir", str(tiny_ckpt), "--top_p", "2", "--device", "cpu", "--max_seq_len", "64")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "top_p=2.0 must be in (0, 1]" in r.stderr


def test_cli_bad_checkpoint_file_is_a_one_line_error(cli):
    r, path = cli["sample_bad_pth"]
    assert_one_line_error(r, str(path), "does not hold a state dict of tensors")


def test_prepare_cli_bad_record_is_a_one_line_error(cli):
    r, path = cli["prepare_bad_record"]
    assert_one_line_error(r, f"{path}:2", '"text" string or a "messages" list')


def test_empty_shard_through_the_cli_is_a_one_line_error(cli):
    r, empty = cli["empty_shard"]
    assert_one_line_error(r, str(empty), "shorter than")


@pytest.mark.parametrize("flags, message", [
    (["--total_batch_size", "100"], "--total_batch_size 100 must be a multiple of"),
    (["--device", "gpu9"], "--device 'gpu9' is not a device"),
    (["--train_data", "no_such_*.bin"], "no data shard matches 'no_such_*.bin'"),
    (["--keep_last", "0"], "--keep_last 0 must be an integer >= 1 (the newest complete checkpoint is never removed)"),
    (["--export_every", "-1"], "--export_every -1 must be an integer >= 0"),
])
def test_train_cli_bad_flag_is_one_line_error(init_ckpt, train_data, tmp_path, flags, message):
    args = ["--ckpt_dir", str(init_ckpt), "--train_data", train_data, "--val_data", "", "--out_dir",
            str(tmp_path / "out"), "--batch_size", str(B), "--seq_len", str(T), "--max_steps", "1", "--device", "cpu"]
    r = subprocess.run([sys.executable, str(HERE / "llama31.py"), "train", *args, *flags], cwd=tmp_path,
                       env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("llama31: error: ") and message in lines[-1], r.stderr
    assert "Traceback" not in r.stderr
    assert len([line for line in lines if "error" in line.lower()]) == 1


def test_out_dir_that_is_a_file_is_a_clear_error_before_training(cli):
    r, blocker = cli["out_dir_is_a_file"]
    assert_one_line_error(r, f"--out_dir {blocker}: {blocker} is a file, not a directory")
    assert "model " not in r.stderr  # nothing loaded, nothing trained
    assert blocker.read_text() == "not a directory"


def test_cli_non_finite_checkpoint_and_learning_rate_are_one_line_errors(cli):
    r, nan_ckpt = cli["nan_ckpt"]
    assert_one_line_error(r, str(nan_ckpt), "non-finite weights", "norm.weight")
    assert not (nan_ckpt.parent / "nan_out" / "log.jsonl").exists()
    r, out = cli["learning_rate"]  # once a traceback from inside AdamW: the update overflowed float32
    assert_one_line_error(r, "--learning_rate 1e+38 must be a number in (0, 1]")
    assert not any(out.glob("step_*"))


def test_cli_max_bad_steps_is_a_one_line_error(init_ckpt, train_data, tmp_path, monkeypatch, capsys):
    poison_steps(monkeypatch, {0: "nan", 1: "inf"})
    monkeypatch.setattr(sys, "argv", ["llama31.py", *train_flags(init_ckpt, train_data, tmp_path, "--max_steps", 5,
                                                                 "--max_bad_steps", 2, "--save_every", 1)])
    with pytest.raises(SystemExit) as e:
        llama31.main()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("step skipped") == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("llama31: error: 2 non-finite steps in a row at step 1; stopping "
                                            "without saving. Try a lower --learning_rate or check the data.")
    assert [d.name for d in step_dirs(tmp_path)] == ["step_000001"]  # saved before the second bad step: finite
    check_checkpoint(tmp_path / "step_000001")


@pytest.mark.parametrize("saved", [False], ids=["untied"], indirect=True)  # any checkpoint will do
def test_export_cli_bad_inputs_are_one_line_errors(saved, tiny_ckpt, tmp_path):
    _, _, step_dir = saved
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("mine")
    r = run_cli_all({
        "meta_dir": ["export", "--ckpt_dir", tiny_ckpt, "--out_dir", tmp_path / "a"],
        "missing": ["export", "--ckpt_dir", tmp_path / "nope", "--out_dir", tmp_path / "b"],
        "to": ["export", "--ckpt_dir", step_dir, "--out_dir", tmp_path / "c", "--to", "gguf"],
        "dtype": ["export", "--ckpt_dir", step_dir, "--out_dir", tmp_path / "d", "--dtype", "int4"],
        "taken": ["export", "--ckpt_dir", step_dir, "--out_dir", tmp_path / "taken"],
    }, tmp_path)
    assert_one_line_error(r["meta_dir"], f"{tiny_ckpt} is not a training checkpoint (it has no .metadata)")
    assert_one_line_error(r["missing"], f"{tmp_path / 'nope'} is not a training checkpoint")
    assert_one_line_error(r["to"], "--to 'gguf' must be meta or hf")
    assert_one_line_error(r["dtype"], "--dtype 'int4' is not supported")
    assert_one_line_error(r["taken"], f"{tmp_path / 'taken'} already exists")
    assert (tmp_path / "taken" / "x").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# -----------------------------------------------------------------------------
# quantization: int8 and int4 weight-only, lazy checkpoint reading, eval

GROUP = 32  # int4 group size of the tiny models: TINY's linears have 64 and 224 inputs


def int4_scales_zeros(scales_and_zeros: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each weight's scale and zero, (n, k) float64 each, from quantize_int4's (k / group_size, n, 2): the
    weights are exactly (q - 8) * scale + zero."""
    return scales_and_zeros.double().repeat_interleave(group_size, dim=0).transpose(0, 1).unbind(-1)


def test_quantize_round_trip_is_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    w[1] += 3  # a row far from zero
    w[2, :64] = 0.7  # constant groups
    w[3] = 0  # an all-zero row
    w[4, 64:128] = torch.linspace(-1e-6, 1e-6, 64)  # a group of tiny weights
    # Half a step exactly, but for the float32 arithmetic that picks q: w / scale (int8) or (w - zero) / scale
    # (int4, within 8.5 steps) is rounded relatively by 2^-24 at most twice, which moves it by under 2^-17 of a
    # step before the rounding to an integer. The check is in float64, where the dequantized values are exact.
    slack = 0.5 + 2 ** -17
    q, scales = llama31.quantize_int8(w)
    s = scales.double()[:, None]
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((w.double() - q.double() * s).abs() <= slack * s).all()
    torch.testing.assert_close(scales.float(), (w.abs().amax(1) / 127).clamp(min=llama31.TINY_SCALE), rtol=2 ** -8,
                               atol=0)  # the step is max|w| / 127 (in bf16), not a finer one
    for group_size in (32, 64):
        q, sz = llama31.quantize_int4(w, group_size)
        assert q.dtype == torch.uint8 and q.max() <= 15 and sz.shape == (256 // group_size, 64, 2)
        s, z = int4_scales_zeros(sz, group_size)
        assert ((w.double() - ((q.double() - 8) * s + z)).abs() <= slack * s).all()
        assert (s[0] <= (w[0].abs().max() * 2 / 15) * 1.01).all()  # a step of about (max - min) / 15


def test_loading_quantizes_a_few_rows_at_a_time_to_the_same_numbers(monkeypatch):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(10, 128, generator=g) * 0.05).bfloat16()  # as read from a bf16 checkpoint
    w[3] = 0  # an all-zero row, and a row of one sign: max |w| from amax and amin
    w[5] = w[5].abs()
    whole8, whole4 = llama31.quantize_int8(w), llama31.quantize_int4(w, 32)
    monkeypatch.setattr(llama31, "QUANTIZE_ROWS", 3)  # chunks of 3, 3, 3 and 1 rows
    got8 = llama31.Int8Linear(128, 10, ("w",)).quantize(w)
    assert torch.equal(got8["weight"], whole8[0]) and torch.equal(got8["scales"], whole8[1])
    got4 = llama31.Int4Linear(128, 10, ("w",), 32, tiled=False).quantize(w)
    assert torch.equal(got4["weight"], whole4[0][:, ::2] << 4 | whole4[0][:, 1::2])
    assert torch.equal(got4["scales_and_zeros"], whole4[1])


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no CPU int4 kernel")
def test_int4_reference_follows_pytorch_int4_kernel_convention():
    """PyTorch's CPU int4 kernel reads scales_and_zeros in its CUDA kernel's layout and zero point (tinygemm's,
    which llama31's int4 kernel follows and bench.py's tinygemm peer reads); it takes the int4 values unpacked."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 128, generator=g) * 0.05, torch.randn(3, 128, generator=g).bfloat16()
    linear = llama31.Int4Linear(128, 48, ("w",), GROUP, tiled=False)
    for k, v in linear.quantize(w).items():
        setattr(linear, k, v)
    q, sz = llama31.quantize_int4(w, GROUP)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        q.int(), 2), GROUP, sz).float()
    want = linear(x.float())
    # the kernel rounds its weights and its result to bf16 (half an ulp, 2^-9, each) and sums in another order
    bound = 2 ** -9 * want.abs() + 2 ** -8 * (x.float().abs() @ linear.dequantize(torch.float32).abs().t())
    assert ((got - want).abs() <= bound).all()


def int4_mma_operands(words: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What int4_matmul's mmas multiply, read as PTX defines the m16n8k16 fragments: A (tiles, blocks, 4 steps,
    16 channels, 16 inputs) from the packed words (lane 4 g + t's register a_s of step j is nibbles s and s + 4 of
    its word j: channel g + 8 (s % 2), the step's inputs 2 t + 8 (s // 2) and + 1); B (blocks, 4 steps, 16
    inputs, rows of x) as the kernel loads x (lane t: inputs 8 t .. 8 t + 7 of each half of a block; b0 of step
    j = 2 j2 + j1 is the half j2's inputs 4 j1, + 1 of its eight, b1 4 j1 + 2, + 3, as the step's inputs 2 t, 2 t
    + 1 and 2 t + 8, 2 t + 9), zero past k."""
    tiles, blocks = words.shape[:2]
    v = words.long() & 0xFFFFFFFF
    A = torch.zeros(tiles, blocks, 4, 16, 16, dtype=torch.int64)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for s in range(4):
            for h in range(2):
                A[:, :, :, g + 8 * (s % 2), 2 * t + 8 * (s // 2) + h] = (v[:, :, lane] >> (4 * (s + 4 * h))) & 15
    xs = F.pad(x, (0, blocks * 64 - x.shape[1])).view(-1, blocks, 64)
    B = torch.zeros(blocks, 4, 16, x.shape[0], dtype=x.dtype)
    for t, j, c8, p in itertools.product(range(4), range(4), range(2), range(2)):
        B[:, j, 2 * t + 8 * c8 + p] = xs[:, :, 32 * (j // 2) + 8 * t + 4 * (j % 2) + 2 * c8 + p].t()
    return A, B


def test_int4_kernel_layout_gives_each_lane_its_mma_fragments(monkeypatch):
    """pack_int4's words, read as the tensor cores read them, with x read as the kernel reads it, multiply out to
    q x; and the algebra of the kernel's sums (of (128 + q) x and of x, then scale and zero - 136 scale) is the
    product with the dequantized weights. The kernel itself (its loops, group ends, split of k) is tested on the
    GPU."""
    g = torch.Generator().manual_seed(6)
    for n, k, group_size in ((32, 128, 64), (16, 224, 32), (48, 256, 128), (16, 512, 256), (32, 96, 32)):
        w, x = torch.randn(n, k, generator=g), torch.randn(3, k, generator=g, dtype=torch.float64)
        q, sz = llama31.quantize_int4(w, group_size)
        words = llama31.pack_int4(q)
        assert words.dtype == torch.int32 and words.shape == (n // 16, -(-k // 64), 32, 4)
        A, B = int4_mma_operands(words, x)
        xi = x.round()  # integers: the sum of products is exact
        assert torch.equal(torch.einsum("cbjrk,bjkm->mcr", A.double(), int4_mma_operands(words, xi)[1]).reshape(3, n),
                           xi @ q.double().t())
        steps, B = A.double().flatten(1, 2) + 128, B.flatten(0, 1)  # (tiles, steps, 16, 16), (steps, 16, 3)
        s, z = sz.double().unbind(-1)  # (groups, n)
        y = torch.zeros(3, n, dtype=torch.float64)
        for step in range(k // 16):  # the kernel's group ends after the steps of each group_size inputs
            part = torch.einsum("crk,km->mcr", steps[:, step], B[step]).reshape(3, n)
            grp = step * 16 // group_size
            y += s[grp] * part + (z[grp] - 136 * s[grp]) * B[step].sum(0)[:, None]
        sw, zw = int4_scales_zeros(sz, group_size)
        torch.testing.assert_close(y, x @ ((q.double() - 8) * sw + zw).t(), rtol=1e-12, atol=1e-12)
    monkeypatch.setattr(llama31, "QUANTIZE_ROWS", 16)  # quantized 16 rows (one tile) at a time: the same words
    w = torch.randn(48, 128, generator=g)
    got = llama31.Int4Linear(128, 48, ("w",), 32, tiled=True).quantize(w)
    q, sz = llama31.quantize_int4(w, 32)
    assert torch.equal(got["weight"], llama31.pack_int4(q)) and torch.equal(got["scales_and_zeros"], sz)
    with pytest.raises(ValueError, match="a linear layer of 40 outputs cannot use the int4 kernel, which needs a "
                                         "multiple of 16; use --quantize int8"):
        llama31.Int4Linear(128, 40, ("w",), 32, tiled=True)


def test_int4_on_a_gpu_older_than_ampere_is_refused_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    args, cuda = llama31.ModelArgs(**TINY), torch.device("cuda")
    with pytest.raises(ValueError, match=r"^--quantize int4 on a GPU needs compute capability 8.0 or more \(its "
                                         r"kernel multiplies on bf16 tensor cores\); the Tesla T4 has 7.5: use "
                                         r"--quantize int8$"):
        llama31.check_memory(llama31.meta_model(args, "int4", GROUP, cuda), cuda, None, "tiny", GROUP, free=2 ** 40)
    llama31.check_memory(llama31.meta_model(args, "int8", GROUP, cuda), cuda, None, "tiny", GROUP, free=2 ** 40)


def unit_gain_state_dict(params: dict, seed: int = 0) -> dict:
    """Random bf16 weights of std 1/sqrt(fan_in) (the embedding of std 1, norms near one): every matmul keeps
    its input's size, as in a trained model, rather than the sharp TINY fixture's."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama31.Transformer(llama31.ModelArgs(**params)).state_dict().items()}
    sd = {}
    for k, shape in shapes.items():
        if len(shape) == 1:
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[k] = torch.randn(shape, generator=g) / (1 if k.startswith("tok_") else math.sqrt(shape[1]))
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}


@pytest.fixture(scope="module")
def quant_sd():
    return unit_gain_state_dict(TINY)


@pytest.fixture(scope="module")
def quant_ckpts(tmp_path_factory, quant_sd) -> dict:
    """The same weights as one Meta file, two model-parallel ones, and Hugging Face safetensors."""
    root = tmp_path_factory.mktemp("quant")
    ckpts = {"meta": write_meta_checkpoint(root / "meta", TINY, quant_sd),
             "meta2": write_meta_checkpoint(root / "meta2", TINY, quant_sd, n_files=2)}
    llama31.convert(str(ckpts["meta"]), str(root / "hf"), to="hf")
    return ckpts | {"hf": root / "hf"}


@functools.cache
def built(path: Path, quantize) -> llama31.Llama:
    return llama31.Llama.build(str(path), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu", quantize=quantize,
                               group_size=GROUP)


def quantized_linears(model) -> list:
    """(the Meta names of the float weights it stacks, the quantized linear) for each quantized linear"""
    return [([f"{name.rpartition('.')[0]}.{s}.weight".lstrip(".") for s in m.sources], m)
            for name, m in model.named_modules() if isinstance(m, (llama31.Int8Linear, llama31.Int4Linear))]


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_model_is_the_float_model_of_its_dequantized_weights(quant_ckpts, quant_sd, quantize):
    q, f = built(quant_ckpts["meta"], quantize), built(quant_ckpts["meta"], None)
    linears = quantized_linears(q.model)
    assert len(linears) == 4 * TINY["n_layers"] + 1  # wqkv, wo, w13, w2 of every block, and the int8 output
    deq_sd = dict(quant_sd)
    for names, m in linears:
        deq_sd.update(zip(names, m.dequantize(torch.float32).split([quant_sd[n].shape[0] for n in names])))
    with torch.device("meta"):
        deq = llama31.Transformer(q.model.params)
    llama31.load_weights(deq, deq_sd, "dequantized", CPU, torch.float32)
    deq.eval().fuse_weights()
    tokens = random_tokens(2, 32, seed=7)
    with torch.no_grad():
        lq, ld, lf = q.model(tokens), deq(tokens), f.model(tokens)
    # the same arithmetic but for where int8's scale is applied (after the matmul): float32 rounding
    assert ((lq - ld).norm() / ld.norm()).item() < 1e-5
    prompts = [q.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello", "The capital of France is")]
    assert q.generate(prompts, max_gen_len=8, temperature=0) == llama31.Llama(deq, q.tokenizer).generate(
        prompts, max_gen_len=8, temperature=0)  # through the KV cache, one token at a time
    # Against the float model. Each quantized matrix l scales the part of the logits that flows through it by
    # an error of relative size about eps_l = |W_l' - W_l| / |W_l| (Frobenius; the error matrix is unrelated to
    # the input's direction). At unit gain (weights of std 1/sqrt(fan_in), an RMSNorm before every block and
    # the output) that part is at most the whole, and the errors of different matrices are independent, so to
    # first order they add in quadrature: relative logit error <= sqrt(sum of eps_l^2).
    eps = torch.tensor([((m.dequantize(torch.float32) - torch.cat([quant_sd[n].float() for n in names])).norm()
                         / torch.cat([quant_sd[n].float() for n in names]).norm()).item() for names, m in linears])
    rel = ((lq - lf).norm() / lf.norm()).item()
    assert rel <= eps.square().sum().sqrt().item(), (rel, eps)


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_checkpoints_load_quantized_as_their_merged_weights_quantized(quant_ckpts, quant_sd, quantize):
    """Two model-parallel Meta files and Hugging Face's layout quantize exactly as the merged float weights."""
    want = {}
    for names, m in quantized_linears(built(quant_ckpts["meta"], quantize).model):
        w = torch.cat([quant_sd[n] for n in names])
        q, scales = llama31.quantize_int8(w) if isinstance(m, llama31.Int8Linear) else llama31.quantize_int4(w, GROUP)
        assert torch.equal(m.weight, q if isinstance(m, llama31.Int8Linear) else q[:, ::2] << 4 | q[:, 1::2])
        assert torch.equal(m.scales if isinstance(m, llama31.Int8Linear) else m.scales_and_zeros, scales)
        want[names[0]] = m
    for fmt in ("meta2", "hf"):
        got = built(quant_ckpts[fmt], quantize).model.state_dict()
        ref = built(quant_ckpts["meta"], quantize).model.state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), fmt


def test_checkpoint_reader_slices_equal_slices_of_the_merged_weights(quant_ckpts, quant_sd):
    readers = {"meta2": llama31.read_meta_checkpoint(quant_ckpts["meta2"])[1],
               "hf": llama31.read_hf_checkpoint(quant_ckpts["hf"])[1]}
    for fmt, weights in readers.items():
        assert set(weights) == set(quant_sd)
        for name, merged in quant_sd.items():
            assert torch.equal(weights[name], merged), (fmt, name)
            for dim in range(merged.ndim):
                for world in (2, 4):  # 4 cuts wk's 2 heads of HF's permuted rows inside a head
                    for rank in range(world):
                        assert torch.equal(weights.read(name, dim, rank, world), merged.chunk(world, dim)[rank]), \
                            (fmt, name, dim, rank, world)
    with pytest.raises(ValueError, match=r"layers.0.attention.wk.weight has 32 entries along dim 0, which do not "
                                         r"split into 3 equal slices"):
        readers["hf"].read("layers.0.attention.wk.weight", 0, 0, 3)


def test_bad_quantize_flags_are_one_line_errors(quant_ckpts):
    r = run_cli("sample", "--ckpt_dir", str(quant_ckpts["meta"]), "--quantize", "int3", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "llama31: error: --quantize 'int3' is not supported; choose one of int8, int4 (or leave it out for "
        "unquantized weights)"]
    with pytest.raises(ValueError, match=r"--group_size 48 must be 32, 64, 128 or 256"):
        llama31.Llama.build(str(quant_ckpts["meta"]), device="cpu", quantize="int4", group_size=48)
    with pytest.raises(ValueError, match=r"--group_size 64 does not divide the 224 inputs"):
        llama31.Llama.build(str(quant_ckpts["meta"]), device="cpu", quantize="int4", group_size=64)


def test_gpu_memory_check_refuses_bf16_70b_on_an_80gb_card_naming_quantize(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # an A100 80 GB's
    args = llama31.preset("llama3.1-70b", max_seq_len=512, max_batch_size=1)
    gpu, free = torch.device("cuda"), 79 * 2 ** 30  # meta models only: no GPU needed
    bf16 = llama31.meta_model(args, None, llama31.INT4_GROUP_SIZE, gpu)
    with pytest.raises(ValueError, match=r"Llama3.1-70B needs 131.6 GiB of GPU memory .* 79.0 GiB free; --quantize "
                                         r"int8 needs 66.7 GiB for the weights and int4 38.8 GiB"):
        llama31.check_memory(bf16, gpu, torch.bfloat16, "Llama3.1-70B", llama31.INT4_GROUP_SIZE, free)
    for quantize in llama31.QUANTIZE_CHOICES:  # both fit
        model = llama31.meta_model(args, quantize, llama31.INT4_GROUP_SIZE, gpu)
        llama31.check_memory(model, gpu, torch.bfloat16, "Llama3.1-70B", llama31.INT4_GROUP_SIZE, free)


def test_bench_counts_the_weight_bytes_a_decode_step_reads():
    import bench
    args = llama31.preset("llama3.1-8b")
    d, h, v, kv, L = args.dim, args.hidden_dim, args.vocab_size, args.n_kv_heads * args.head_dim, args.n_layers
    shapes = [(d + 2 * kv, d), (d, d), (2 * h, d), (d, h)]  # (out, in) of wqkv, wo, w13, w2
    norms = 2 * (2 * L + 1) * d  # bf16
    linears = {"bf16": sum(2 * n * k for n, k in shapes), "int8": sum(n * k + 2 * n for n, k in shapes),
               "int4": sum(n * k // 2 + 4 * n * k // 64 for n, k in shapes)}
    output = {"bf16": 2 * v * d, "int8": v * d + 2 * v, "int4": v * d + 2 * v}  # quantized: the output in int8
    for mode, per_layer in linears.items():
        model = llama31.meta_model(args, None if mode == "bf16" else mode, 64, torch.device("cuda"))
        model = model.to(torch.bfloat16)  # the float weights (norms) as they are loaded
        assert bench.weight_bytes_read(model) == L * per_layer + output[mode] + norms, mode
    # bench.py matmuls times the matrices a quantized model's step multiplies by, at their shapes
    model = llama31.meta_model(args, "int8", 64, torch.device("cuda"))
    layer = {"wqkv": model.layers[0].attention.wqkv, "wo": model.layers[0].attention.wo,
             "w13": model.layers[0].feed_forward.w13, "w2": model.layers[0].feed_forward.w2, "output": model.output}
    assert bench.matrix_shapes(args) == {name: tuple(m.weight.shape) for name, m in layer.items()}


def test_bench_errors_are_one_line():
    def bench(*args):
        return run_cli(*args, script="bench.py", env=subprocess_env())
    r = bench("decode", "--quantize", "int3")  # checked before anything touches a GPU
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [
        "bench.py: error: --quantize 'int3' is not one of bf16, int8, int4 (give one or more, comma-separated)"]
    r = bench("decode", "--max_seq_len", "300")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "bench.py: error: --max_seq_len must be a whole number of at least --prompt_len + --gen_len = 384"]
    r = bench("matmuls", "--group_size", "16")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["bench.py: error: --group_size 16 must be 32, 64, 128 or 256 (the group "
                                             "sizes of the int4 kernel)"]
    if not torch.cuda.is_available():
        for command in ("decode", "matmuls", "train"):
            r = bench(command)
            assert r.returncode == 2 and r.stderr.strip().splitlines() == [
                "bench.py: error: bench.py times a CUDA GPU, and this PyTorch sees none (a CPU build, or no GPU)"]


def test_eval_command_is_evaluate_and_works_quantized(init_ckpt, train_data, capsys, monkeypatch):
    got = llama31.eval_checkpoint(str(init_ckpt), data=train_data, batch_size=2, seq_len=32, steps=3, device="cpu")
    assert f"perplexity {math.exp(got['loss']):.3f}" in capsys.readouterr().out
    assert got["perplexity"] == math.exp(got["loss"])
    model, _ = llama31.load_model(init_ckpt, None, 32, 2, CPU, torch.float32)
    want = llama31.evaluate(model, loader(train_data, 2, 32), 3, CPU, contextlib.nullcontext())
    assert got["loss"] == pytest.approx(want, rel=1e-6, abs=0)  # one fused matmul instead of three: rounding
    # quantized, eval goes through forward_loss (T > 1, the int8 output layer dequantized); cross-entropy moves
    # by at most 2 max|logit change| (its gradient in the logits, softmax - one_hot, has an L1 norm <= 2)
    real_evaluate, evaluated = llama31.evaluate, []
    monkeypatch.setattr(llama31, "evaluate", lambda m, *a: evaluated.append(m) or real_evaluate(m, *a))
    got_q = llama31.eval_checkpoint(str(init_ckpt), data=train_data, batch_size=2, seq_len=32, steps=3,
                                    device="cpu", quantize="int8")
    q = evaluated[0]
    assert isinstance(q.output, llama31.Int8Linear) and isinstance(q.layers[0].attention.wqkv, llama31.Int8Linear)
    data, max_change = loader(train_data, 2, 32), 0.0
    with torch.no_grad():
        for _ in range(3):
            x, _ = data.next_batch()
            max_change = max(max_change, (q(x) - model(x)).abs().max().item())
    assert 0 < abs(got_q["loss"] - want) <= 2 * max_change


@cuda
def test_gpu_int4_kernel_is_within_one_rounding_of_the_exact_product_and_quantizing_is_device_independent():
    g = torch.Generator().manual_seed(2)
    # 8B's wqkv and w2, every group size, an odd number of 32 inputs (padded), an odd number of blocks, blocks
    # fewer than warps; one tile a warp (up to 4,096 outputs, or not a multiple of 32) and two, 8 warps a block and
    # 4 (over 8,192 outputs); past INT4_KERNEL_ROWS: dequantized, then cuBLAS
    cases = ((1, 6144, 4096, 64), (8, 4096, 14336, 64), (5, 48, 224, 32), (3, 256, 512, 128), (2, 4112, 512, 256),
             (7, 272, 320, 64), (1, 80, 96, 32), (4, 8224, 1024, 64), (6, 8256, 768, 256), (9, 48, 224, 32),
             (40, 256, 512, 64))
    for m, n, k, group_size in cases:
        w, x = torch.randn(n, k, generator=g) * 0.02, torch.randn(m, k, generator=g).bfloat16()
        layer = llama31.Int4Linear(k, n, ("w",), group_size, tiled=True)
        state, cpu_state = layer.quantize(w.cuda()), layer.quantize(w)
        assert all(torch.equal(state[key].cpu(), cpu_state[key]) for key in state), (n, k)  # the same numbers
        for key, v in state.items():
            setattr(layer, key, v)
        q, sz = llama31.quantize_int4(w, group_size)
        cpu = llama31.dequantize_int4(q[:, ::2] << 4 | q[:, 1::2], sz, group_size, torch.bfloat16)
        assert torch.equal(layer.dequantize(torch.bfloat16).cpu(), cpu), (n, k)  # the prefill's weights
        got = layer(x.cuda())
        if m > llama31.INT4_KERNEL_ROWS:  # cuBLAS's product with those weights, as for a bf16 model
            assert torch.equal(got, F.linear(x.cuda(), cpu.cuda())), (m, n, k)
        else:
            # the kernel: exact products (128 + q) x summed in float32 over each `span` inputs (a group, or 64
            # inputs of a larger one), and x summed, then y += scale * sum + (zero - 136 scale) * sum x, rounded
            # once to bf16 (2^-8 |y|). Each float32 step is off by at most 2^-23 (tensor cores may truncate) of
            # the size of what it adds: within a span, up to span + 2 steps over terms of size |x| (143 scale +
            # |zero - 136 scale|) (`sizes`); across spans and warps (8 at most), k / span + 8 sums no larger than
            # those of |x w|
            s, z = int4_scales_zeros(sz, group_size)
            w_exact = (q.double() - 8) * s + z
            exact, xa = x.double() @ w_exact.t(), x.double().abs()
            sizes = xa @ (143 * s + (z - 136 * s).abs()).t()
            span = min(group_size, 64)
            bound = 2 ** -8 * exact.abs() + 2 ** -23 * ((span + 2) * sizes + (k // span + 8) * (xa @ w_exact.abs().t()))
            assert ((got.double().cpu() - exact).abs() <= bound).all(), (m, n, k, group_size)
            # the bound is for the worst case; float32's errors are far smaller than bf16's half step, so nearly
            # every result is the correctly rounded one (99.6-100% in a float32 emulation of the kernel's first
            # version, on the cases it had)
            rounded = (got.cpu() == exact.to(torch.bfloat16)).double().mean().item()
            assert rounded >= 0.95, (m, n, k, group_size, rounded)
            unaligned = torch.empty(m * k + 1, dtype=torch.bfloat16, device="cuda")[1:].view(m, k)
            unaligned.copy_(x)  # 2 bytes past a 16-byte boundary: the kernel reads an aligned copy
            assert torch.equal(layer(unaligned), got)
    x = torch.randn(1, 4096, generator=g).bfloat16().cuda()
    layer = llama31.Int4Linear(4096, 6144, ("w",), 64, tiled=True).cuda()
    for key, v in layer.quantize(torch.randn(6144, 4096, generator=g).cuda() * 0.02).items():
        setattr(layer, key, v)
    compiled = torch.compile(layer, fullgraph=True, options={"triton.cudagraphs": True})
    for _ in range(3):  # recorded, then replayed: bitwise the eager result
        assert torch.equal(compiled(x), layer(x))
    q8, scales = llama31.quantize_int8(w.cuda())
    assert torch.equal(q8.cpu(), llama31.quantize_int8(w)[0]) and torch.equal(scales.cpu(), llama31.quantize_int8(w)[1])


@cuda
def test_gpu_int8_kernel_is_within_one_rounding_of_the_exact_product_and_compiles():
    g = torch.Generator().manual_seed(3)
    # its decode tiles (one row or up to 16; under or over 16,384 outputs), an 8B shape, ragged shapes (masked),
    # a prefill's tiles up to INT8_KERNEL_ROWS (several row tiles of one weight tile; ragged rows and columns)
    cases = ((1, 4096, 4096), (5, 6144, 4096), (1, 16384, 512), (16, 16384, 256), (1, 70, 300), (3, 70, 300),
             (llama31.INT8_KERNEL_ROWS, 6144, 4096), (100, 70, 300), (17, 200, 64), (100, 200, 300))
    for m, n, k in cases:
        layer = llama31.Int8Linear(k, n, ("w",)).cuda()
        for key, v in layer.quantize(torch.randn(n, k, generator=g).cuda() * 0.02).items():
            setattr(layer, key, v)
        for dtype, u in ((torch.bfloat16, 2 ** -8), (torch.float16, 2 ** -11)):  # unit roundoff of the result
            x = torch.randn(m, k, generator=g).to(dtype).cuda()
            got = layer(x).double()
            exact = (x.double() @ layer.weight.double().t()) * layer.scales.double()
            # one rounding to x's dtype (u |y|) of a float32 result: its products are exact, its k sums each off
            # by at most 2^-23 of the sum so far (tensor cores may truncate rather than round), its product by
            # the scale by 2^-24: within 2^-22 k of the sum of |x w s| for k >= 2, with u's share of it
            bound = u * exact.abs() + 2 ** -22 * k * (x.double().abs() @ layer.weight.double().abs().t()) * \
                layer.scales.double()
            assert ((got - exact).abs() <= bound).all(), (m, n, k, dtype)
            if dtype == torch.bfloat16:  # the bound allows two roundings; one leaves nearly all correctly rounded
                # (a kernel rounding the sum, then its product by the scale, matched about 75% in fp16 in
                # Triton's interpreter; float32's error crosses a bf16 rounding boundary rarely)
                assert (got == exact.to(dtype).double()).double().mean() >= 0.95, (m, n, k)
    for m, dtype in ((1, torch.bfloat16), (5, torch.float16)):  # compiled in a CUDA graph: the same kernel
        x = torch.randn(m, 4096, generator=g).to(dtype).cuda()
        layer = llama31.Int8Linear(4096, 6144, ("w",)).cuda()
        for key, v in layer.quantize(torch.randn(6144, 4096, generator=g).cuda() * 0.02).items():
            setattr(layer, key, v)
        compiled = torch.compile(layer, fullgraph=True, options={"triton.cudagraphs": True})
        for _ in range(3):  # recorded, then replayed: bitwise the eager result
            assert torch.equal(compiled(x), layer(x))


@cuda
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_gpu_quantized_compiled_greedy_equals_eager_and_cpu(quant_ckpts, quantize):
    kw = dict(max_seq_len=SEQ, max_batch_size=BATCH, dtype="float32", quantize=quantize, group_size=GROUP)
    eager = llama31.Llama.build(str(quant_ckpts["meta2"]), **kw)
    compiled = llama31.Llama.build(str(quant_ckpts["meta2"]), compile=True, **kw)
    prompts = [eager.tokenizer.encode(p, bos=True, eos=False) for p in ("Hello", "The capital of France is")]
    want = eager.generate(prompts, max_gen_len=24, temperature=0)
    assert compiled.generate(prompts, max_gen_len=24, temperature=0) == want
    assert compiled.generate(prompts, max_gen_len=24, temperature=0) == want  # replayed, not re-recorded
    tokens = random_tokens(2, 32, seed=4)
    ours, ref = eager.model(tokens.cuda()).cpu(), built(quant_ckpts["meta"], quantize).model(tokens)
    # int4 on the GPU computes in bf16 (the kernel's only dtype): bf16 against float32, as for the bf16 model
    assert ((ours - ref).norm() / ref.norm()).item() < (2e-2 if quantize == "int4" else 1e-5)
    bf16 = llama31.Llama.build(str(quant_ckpts["meta2"]), max_seq_len=SEQ, max_batch_size=BATCH, quantize=quantize,
                               group_size=GROUP)  # the GPU's dtype, bf16: int8's decode rows go to its kernel
    for rows in (tokens[:1, :1], tokens[:, :1]):  # one row, two rows: the kernel's two kinds of tile
        ours, ref = bf16.model(rows.cuda()).float().cpu(), built(quant_ckpts["meta"], quantize).model(rows)
        assert ((ours - ref).norm() / ref.norm()).item() < 2e-2  # bf16 against float32, as for the bf16 model
    assert [len(o) for o in bf16.generate(prompts, max_gen_len=8, temperature=0)] == [8, 8]


# CLI: flags checked against each command's signature before any work, strings verbatim, help, chat keys,
# pipes, plot


def test_cli_flags_are_checked_against_the_signature_before_any_work():
    parse = llama31.parse_command_line
    errors = {
        ("train", "--max_steps", "3", "--save_evry", "1"): "--save_evry: unknown flag; did you mean --save_every?",
        ("train", "--max_step", "2"): "--max_step: unknown flag; did you mean --max_steps?",
        ("sample", "--ckpt_dir", "c", "--promt", "hi"): "--promt: unknown flag; did you mean --prompt?",
        ("smaple",): "'smaple' is not a command; did you mean sample?",
        ("sample",): "--ckpt_dir is required",
        ("sample", "c", "--seed", "1.5"): "--seed '1.5': expected an integer",
        ("sample", "c", "--top_p", "nan"): "--top_p 'nan': expected a finite number",
        ("sample", "c", "--temperature", "warm"): "--temperature 'warm': expected a number",
        ("sample", "c", "--compile=maybe"): "--compile 'maybe': expected true or false",
        ("sample", "c", "--prompt"): "--prompt needs a value",
        ("sample", "c", "--prompt", "--help"): "--prompt needs a value (write --prompt=VALUE",
        ("sample", "c", "a prompt"): "unexpected argument 'a prompt'",  # fire would make it --prompt
        ("train", "data/train_000000.bin"): "unexpected argument",  # fire would make it --ckpt_dir
        ("sample", "-p", "hi"): "-p: unknown flag",  # no one-letter shortcuts (fire's -p, -s, -c, -e)
    }
    for argv, message in errors.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            parse(list(argv))
    ok = {
        ("sample", "c", "--prompt=Hello, world", "--compile", "--temperature", "0"):
            {"ckpt_dir": "c", "prompt": "Hello, world", "compile": True, "temperature": 0.0},
        ("sample", "--ckpt_dir=c", "--nocompile", "--echo", "false", "--max-seq-len", "64", "--top_p", "1"):
            {"ckpt_dir": "c", "compile": False, "echo": False, "max_seq_len": 64, "top_p": 1.0},
        ("train", "--sample_prompts", "a, b", "--sample_prompts", "None", "--fsdp", "None", "--learning_rate", "1e-3"):
            {"sample_prompts": ("a, b", "None"), "fsdp": None, "learning_rate": 1e-3},
        ("train", "--resume", "--nofsdp", "--val_data", ""): {"resume": True, "fsdp": False, "val_data": ""},
        ("sample", "c", "--seed", "1", "--seed", "2"): {"ckpt_dir": "c", "seed": 2},  # the last one counts
        ("prepare", "my file.txt", "--seed=-1"): {"inputs": "my file.txt", "seed": -1},
        ("tinystories", "--val_fraction", "0.1"): {"val_fraction": 0.1},  # passed on to prepare
        ("convert", "a", "b", "--", "--to"): None,  # after --, all positional: too many
    }
    for argv, flags in ok.items():
        if flags is None:
            with pytest.raises(ValueError, match="unexpected argument '--to'"):
                parse(list(argv))
            continue
        assert parse(list(argv)) == (argv[0], [], flags)
    assert parse(["plot", "out/a", "out b", "--out", "x.png"]) == ("plot", ["out/a", "out b"], {"out": "x.png"})
    assert parse(["train", "--max_steps", "2", "-h"]) == ("train", None, None)
    assert parse([]) == ("", None, None)


def test_cli_unknown_flag_is_one_line_and_exit_2_before_anything_runs(tmp_path, tiny_ckpt):
    results = run_cli_all({"train": ["train", "--max_steps", "3", "--save_evry", "1", "--out_dir", "run"],
                           "sample": ["sample", "--ckpt_dir", tiny_ckpt, "--promt", "hi", "--device", "cpu"]},
                          tmp_path, timeout=120)
    assert_one_line_error(results["train"])
    assert results["train"].stderr == "llama31: error: --save_evry: unknown flag; did you mean --save_every?\n"
    assert results["sample"].stderr == "llama31: error: --promt: unknown flag; did you mean --prompt?\n"
    assert results["sample"].stdout == "" and not (tmp_path / "run").exists()  # nothing loaded, nothing trained


@pytest.fixture
def cli_llama(monkeypatch, llama):
    """Commands run in this process (main(argv)) get the module's tiny llama instead of loading one."""
    monkeypatch.setattr(llama31.Llama, "build", lambda *args, **kwargs: llama)
    return llama


def main_in_process(argv: list, capsys) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr)."""
    try:
        llama31.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("prompt", ["Hello, world", "None", "[1, 2]", "True", "1e3", " two  spaces ", "-x", "a=b",
                                    "{'k': 1}", "naïve 'quotes' \"and\" \\ back"])
def test_cli_prompts_reach_the_model_verbatim(cli_llama, capsys, prompt):
    """fire alone read "Hello, world" as a tuple and "None" as None; every string flag now arrives as typed."""
    code, out, err = main_in_process(["sample", "--ckpt_dir", "c", f"--prompt={prompt}", "--temperature", "0",
                               "--max_gen_len", "3"], capsys)
    assert code == 0, err
    assert out == prompt + cli_llama.text_completion([prompt], temperature=0, max_gen_len=3)[0]["generation"] + "\n"


def test_cli_a_long_prompt_gets_the_length_error(cli_llama, capsys):
    prompt = " ".join(["word"] * 2000)  # fire's ast.parse once died of MemoryError on this
    code, out, err = main_in_process(["sample", "--ckpt_dir", "c", "--prompt", prompt], capsys)
    assert code == 2 and out == ""  # refused before the prompt is echoed
    assert err == "llama31: error: a prompt of 2001 tokens leaves no room to generate within max_seq_len=64; pass a " \
                  "larger --max_seq_len or a shorter prompt\n"


def test_cli_output_has_no_ansi_codes_outside_a_terminal(cli_llama, capsys):
    code, out, _ = main_in_process(["sample", "--ckpt_dir", "c", "--max_gen_len", "3", "--temperature", "0"], capsys)
    assert code == 0 and "The repo llm.c on GitHub is" in out and "\033" not in out


def test_cli_help_describes_every_flag_with_its_default(capsys):
    code, out, _ = main_in_process(["--help"], capsys)
    assert code == 0 and all(f"\n  {name} " in out for name in llama31.COMMANDS)
    for command, fn in llama31.COMMANDS.items():
        code, out, err = main_in_process([command, "--help"], capsys)
        assert code == 0 and err == ""
        description, meanings = llama31.docstring_parts(fn)
        if command == "tinystories":
            meanings |= llama31.docstring_parts(llama31.prepare)[1]
        assert out.count(" ".join(description.split()[:6])) == 1  # once, not twice as fire printed it
        assert "Returns" not in out and "Optional[" not in out
        for name, p in llama31.command_flags(command).items():
            assert meanings.get(name), f"{command} --{name} has no line in its docstring's Args:"
            flag = name.upper() if p.kind is p.VAR_POSITIONAL else f"--{name}"
            assert re.search(rf"^  {re.escape(flag)}\b", out, re.M), (command, name)
    _, out, _ = main_in_process(["train", "--help"], capsys)
    out = " ".join(out.split())  # the lines are wrapped to the terminal
    assert "--max_steps INT" in out and "(default: 100)" in out and "presets: " + ", ".join(llama31.PRESETS) in out
    assert "3e-5 to finetune a --ckpt_dir and 3e-4 from scratch" in out


def test_cli_help_is_printed_not_paged(tmp_path):
    """On a terminal fire's help opened $PAGER (less); ours prints and exits."""
    import pty
    master, slave = pty.openpty()
    env = subprocess_env() | {"PAGER": f"touch {tmp_path / 'paged'}; cat"}
    proc = subprocess.Popen([sys.executable, str(HERE / "llama31.py"), "chat", "--help"], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=tmp_path)
    os.close(slave)
    out = read_pty_until(master, proc, lambda text: proc.poll() is not None, timeout=60)
    assert proc.wait(timeout=30) == 0 and "usage: python llama31.py chat" in out and "--system TEXT" in out
    assert not (tmp_path / "paged").exists()
    os.close(master)


def test_import_defers_what_only_some_commands_need():
    """`import llama31` does not import torch._dynamo (torch.compiler.disable, torch.compile), fire or
    matplotlib: they are imported where they are used."""
    deferred = ["torch._dynamo", "fire", "matplotlib"]
    code = f"import sys, llama31; print([m for m in {deferred!r} if m in sys.modules])"
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and r.stdout == "[]\n", r.stderr


def where_it_waits(proc: subprocess.Popen) -> str:
    """What the program's main thread is doing (Linux: /proc): its state, the kernel function it sleeps in and
    its system call ("" elsewhere, or once it has ended)."""
    try:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]  # after the command name
        function = Path(f"/proc/{proc.pid}/wchan").read_text()
        call = Path(f"/proc/{proc.pid}/syscall").read_text().split()[0]
        return f"state {state}, in {function}, system call {call}"
    except OSError:
        return ""


def wait_until_reading_keys(proc: subprocess.Popen, timeout: float = 30):
    """Until the program waits for a key (Linux: its main thread sleeps reading the terminal, or in readline's
    poll or select, per /proc). input() draws its prompt before it waits there, and CPython looks at a signal
    only when that wait is interrupted: a Ctrl-C between the two waits for the next key. A person is never that
    quick, but a test can be. Elsewhere, half a second."""
    if not where_it_waits(proc):
        time.sleep(0.5)
        return
    t0 = time.time()
    while not any(f in where_it_waits(proc) for f in ("wait_woken", "poll", "select")):
        assert time.time() - t0 < timeout, f"the program never waited for a key: {where_it_waits(proc)}"
        time.sleep(0.02)


def read_pty_until(master: int, proc: subprocess.Popen, done, timeout: float = 60, text: str = "") -> str:
    """Read what the program writes to its terminal until done(text) holds (text: everything read so far)."""
    import select
    t0 = time.time()
    while not done(text):
        assert time.time() - t0 < timeout, (where_it_waits(proc), text[-2000:])
        if select.select([master], [], [], 0.05)[0]:
            try:
                text += os.read(master, 65536).decode(errors="replace")
            except OSError:  # EIO: the program has closed the terminal, it is ending
                proc.wait(timeout=30)
                break
    return text


def test_chat_ctrl_c_stops_a_reply_and_leaves_at_the_prompt_ctrl_d_leaves(tmp_path, tiny_ckpt):
    """On a real terminal (a pseudo-terminal), with Ctrl-C as the terminal sends it (SIGINT to the program):
    mid-reply it stops the reply and the prompt comes back; /reset starts a new dialog; at the prompt Ctrl-C
    leaves with exit code 0, no traceback. Ctrl-D (end of input) leaves too, the shell prompt on a line of
    its own."""
    import pty
    argv = [sys.executable, str(HERE / "llama31.py"), "chat", "--ckpt_dir", str(tiny_ckpt), "--max_seq_len", "2048",
            "--max_gen_len", "2000", "--temperature", "1", "--device", "cpu"]
    sessions = []
    # as from a shell at a terminal, the programs start with SIGINT at its default: a test run started in the
    # background (sh's `cmd &`) has SIGINT ignored, which its children, and Python in them, would keep
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # caught here: the default after exec
    try:
        for _ in range(2):
            master, slave = pty.openpty()
            proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=subprocess_env(), cwd=tmp_path)
            os.close(slave)
            sessions.append((proc, master))
    finally:
        signal.signal(signal.SIGINT, previous)
    (proc, master), (proc2, master2) = sessions
    text = read_pty_until(master, proc, lambda t: "user> " in t)
    assert "/reset starts a new dialog" in text  # the keys are told on a terminal
    os.write(master, b"Hi\n")
    # a random model's reply runs to max_gen_len (2000 tokens): interrupt it once some of it has appeared
    text = read_pty_until(master, proc, lambda t: "assistant> " in t and len(t.split("assistant> ")[1]) > 20, text=text)
    os.kill(proc.pid, signal.SIGINT)
    text = read_pty_until(master, proc, lambda t: t.count("user> ") == 2, text=text)
    reply = text.split("assistant> ")[1].rsplit("user> ", 1)[0]
    assert len(Tokenizer(default_tokenizer_path()).encode(reply, bos=False, eos=False)) < 1000, len(reply)  # stopped
    os.write(master, b"/reset\n")
    text = read_pty_until(master, proc, lambda t: t.count("user> ") == 3, text=text)
    assert "(a new dialog)" in text
    wait_until_reading_keys(proc)  # where a person's Ctrl-C at the prompt lands
    os.kill(proc.pid, signal.SIGINT)
    text = read_pty_until(master, proc, lambda t: proc.poll() is not None, text=text)
    assert proc.wait(timeout=30) == 0 and "Traceback" not in text and "KeyboardInterrupt" not in text, text[-2000:]
    assert text.endswith("user> \r\n")

    text2 = read_pty_until(master2, proc2, lambda t: "user> " in t)
    os.write(master2, b"\x04")  # Ctrl-D at the start of a line: end of input
    text2 = read_pty_until(master2, proc2, lambda t: proc2.poll() is not None, text=text2)
    assert proc2.wait(timeout=30) == 0 and text2.endswith("user> \r\n"), text2[-500:]
    os.close(master)
    os.close(master2)


def test_chat_commands_and_a_stopped_reply_in_the_dialog(cli_llama, capsys, monkeypatch):
    """/reset empties the dialog (the system prompt stays), empty lines are skipped, /exit and /quit leave;
    a reply stopped by Ctrl-C stays in the dialog as far as it was shown; one stopped before its first
    word takes the user's message with it."""
    dialogs = []
    real_completion, real_printer = cli_llama.chat_completion, llama31.stream_printer

    def recording_completion(dialogs_, *args, **kwargs):
        dialogs.append([dict(m) for m in dialogs_[0]])
        return real_completion(dialogs_, *args, **kwargs)

    interrupt_after = iter([3, 0, None, None])  # Ctrl-C after 3 tokens, then before the first, then never

    def interrupting_printer(tokenizer):
        printer, after, seen = real_printer(tokenizer), next(interrupt_after), [0]

        def on_token(next_token, is_new):
            if after is not None and seen[0] == after:
                raise KeyboardInterrupt
            seen[0] += 1
            printer(next_token, is_new)
        on_token.shown = printer.shown
        return on_token
    monkeypatch.setattr(cli_llama, "chat_completion", recording_completion)
    monkeypatch.setattr(llama31, "stream_printer", interrupting_printer)
    for leave in ("/quit", "/exit"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(f"Hi\nHo\n\nAgain\n/reset\nNew\n{leave}\nnever read\n"))
        dialogs.clear()
        interrupt_after = iter([3, 0, None, None])
        code, out, err = main_in_process(["chat", "--ckpt_dir", "c", "--system", "Be brief, ok?", "--max_gen_len", "8",
                                   "--temperature", "0"], capsys)
        assert code == 0, err
        system = {"role": "system", "content": "Be brief, ok?"}
        partial = out.split("assistant> ")[1].split("\n")[0]  # what was shown of the stopped first reply
        assert len(dialogs) == 4 and dialogs[0] == [system, {"role": "user", "content": "Hi"}]
        assert dialogs[1] == [*dialogs[0], {"role": "assistant", "content": partial}, {"role": "user", "content": "Ho"}]
        assert dialogs[2] == [*dialogs[0], {"role": "assistant", "content": partial},
                              {"role": "user", "content": "Again"}]  # "Ho" left with its unstarted reply
        assert dialogs[3] == [system, {"role": "user", "content": "New"}]
        assert out.count("user> ") == 7 and "(a new dialog)" in out and out.endswith("user> ")


def test_cli_closed_pipe_ends_quietly(tmp_path, tiny_ckpt):
    """`llama31.py sample ... | head -1`: once the reader has gone, exit 141 (as cat or yes would be, killed
    by SIGPIPE) without "Broken pipe" or a traceback."""
    proc = subprocess.Popen([sys.executable, str(HERE / "llama31.py"), "sample", "--ckpt_dir", str(tiny_ckpt),
                             "--prompt", "first line\nsecond", "--max_seq_len", "512", "--max_gen_len", "400",
                             "--device", "cpu"], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout.readline() == b"first line\n"
    proc.stdout.close()  # as head -1 does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Broken pipe" not in err and "Traceback" not in err, err


def write_log(run_dir: Path, steps: int, val_every: int, lr: float = 1e-3) -> Path:
    run_dir.mkdir(parents=True)
    records = []
    for s in range(steps + 1):
        if s % val_every == 0:
            records.append({"step": s, "val_loss": 10.0 - s / 10})
        if s < steps:
            records.append({"step": s + 1, "loss": 11.0 - s / 10, "lr": lr, "norm": 1.0, "ms": 5.0,
                            "tok_per_s": 1000.0 + s, "mfu": None})
    (run_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


def test_plot_draws_train_and_val_loss_lr_and_tok_per_s_of_each_run(tmp_path, capsys):
    a, b = write_log(tmp_path / "a", 10, 5), write_log(tmp_path / "b", 6, 3, lr=3e-4)
    series = llama31.plot(str(a), str(b), out=str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert series[str(a)]["loss"] == (list(range(1, 11)), [11.0 - s / 10 for s in range(10)])
    assert series[str(a)]["val_loss"] == ([0, 5, 10], [10.0, 9.5, 9.0])
    assert [len(series[str(b)][k][0]) for k in ("loss", "val_loss", "lr", "tok_per_s")] == [6, 3, 6, 6]
    assert series[str(b)]["lr"][1] == [3e-4] * 6
    assert oct(os.stat(tmp_path / "loss.png").st_mode & 0o777) == oct(0o666 & ~current_umask())
    assert capsys.readouterr().err == f"wrote {tmp_path / 'loss.png'}\n"
    code, _, err = main_in_process(["plot", tmp_path / "missing"], capsys)
    assert code == 2 and err == f"llama31: error: {tmp_path / 'missing' / 'log.jsonl'} does not exist: pass the " \
                                "--out_dir of a train run\n"


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else find_spec(name, *a))
    code, _, err = main_in_process(["plot", write_log(tmp_path / "a", 2, 1)], capsys)
    assert code == 2 and err == "llama31: error: plot needs matplotlib: pip install matplotlib\n"


def current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# -----------------------------------------------------------------------------
# tensor parallelism: 2 processes (torchrun, gloo on the CPU) give one process's logits and tokens, from Meta's
# files cut 1, 2 or 4 ways and from Hugging Face's, in float and quantized


def run_main(argv: list, stdin: str) -> tuple:
    """llama31.main() on argv (the command line, in this process), reading stdin: (exit code, stdout, stderr)."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv, sys.stdin = ["llama31.py", *map(str, argv)], io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            llama31.main()
    except SystemExit as e:
        code = e.code
    return code, out.getvalue(), err.getvalue()


TP_PROMPTS = [[BOS, 9906, 1917, 11], [BOS, 791]]
TP_SAMPLE_FLAGS = ["--prompt", "Hello", "--max_seq_len", "64", "--max_gen_len", "8", "--temperature", "0",
                   "--device", "cpu"]
TP_QUANT = {**TINY, "multiple_of": 128}  # SwiGLU width 256: a rank's 128 columns of w2 are whole int4 groups


def tp_worker(out_dir: str, device: str, compile: str, *ckpts: str):
    """Run as `torchrun --nproc_per_node 2 test_llama31.py OUT DEVICE COMPILE NAME=CKPT_DIR ...` (the end of this
    file): each checkpoint loaded tensor-parallel (the first also with the output layer replicated; one named
    quant, in int8 and int4), and what it gives saved to OUT/rank{RANK}.pt under (name, quantize,
    vocab_parallel): whole-sequence logits, logits through the KV cache (prefill, then the decode step, compiled
    if COMPILE is 1), greedy tokens, the quantized weights of wo, w2 and the output layer; top-p tokens of the
    first. With a checkpoint named one_kv_head, also what sample and chat print (stdin only on rank 0) and the
    errors of sample on one_kv_head, of int4 groups that do not fit a rank's columns, and of eval."""
    tok = Tokenizer(default_tokenizer_path())
    llama31.Tokenizer = lambda path: tok  # read once, not per checkpoint (the cached_tokenizer fixture's trick)
    rank = int(os.environ["RANK"])
    _, dev = llama31.start_tensor_parallel(torch.device(device))  # this rank's GPU (made current), or the CPU
    tokens = random_tokens(2, 12, seed=3).to(dev)
    dirs = dict(arg.split("=", 1) for arg in ckpts)
    first, *others = [name for name in dirs if name not in ("quant", "one_kv_head")]
    runs = [(first, None, True), (first, None, False), *((name, None, True) for name in others)]
    runs += [("quant", q, True) for q in ("int8", "int4") if "quant" in dirs]
    results = {}
    for name, quantize, vocab_parallel in runs:
        if vocab_parallel:
            llama = llama31.Llama.build(dirs[name], max_seq_len=SEQ, max_batch_size=BATCH, device=device,
                                        dtype="float32", compile=compile == "1", quantize=quantize, group_size=GROUP)
        else:  # the other choice for the output layer, which only bench.py offers
            tp, dev = llama31.start_tensor_parallel(torch.device(device))
            tp.vocab_parallel = False
            model, _ = llama31.load_model(dirs[name], None, SEQ, BATCH, dev, torch.float32, tp=tp)
            model.eval().fuse_weights()
            llama = llama31.Llama(model, tok, compile=compile == "1")
        model = llama.model
        with torch.inference_mode():
            whole = model(tokens)
            model.setup_caches(2, SEQ)
            kv_heads = model.layers[0].attention.cache.cache_k.shape[1]
            cached = [llama31.prefill(model, tokens[:, :6], torch.arange(6, device=device))]
            # (cloned: a compiled step's output lives in its CUDA graph's memory, which the next step overwrites)
            cached += [llama.decode(model, tokens[:, p: p + 1], torch.tensor([p], device=device)).clone()
                       for p in range(6, 12)]
            if not llama.compiled:  # as generate does: a compiled decode keeps its cache (and its CUDA graph)
                model.clear_caches()
        results[(name, quantize, vocab_parallel)] = dict(
            whole=whole.cpu(), cached=torch.stack(cached, 1).cpu(), kv_heads=kv_heads,
            greedy=llama.generate(TP_PROMPTS, max_gen_len=12, temperature=0),
            quantized={k: v.cpu() for k, v in model.state_dict().items() if quantize and k.startswith(
                ("layers.0.attention.wo.", "layers.0.feed_forward.w2.", "output."))})
        if name == first and vocab_parallel:  # top-p once: sorting the vocabulary every step is slow on the CPU
            results["sampled"] = llama.generate(TP_PROMPTS, max_gen_len=12, temperature=1.0, top_p=0.9,
                                                sample_rng=torch.Generator(device=device).manual_seed(7))
    if "one_kv_head" in dirs:
        results["sample"] = run_main(["sample", "--ckpt_dir", dirs[first], *TP_SAMPLE_FLAGS], "")
        results["chat"] = run_main(["chat", "--ckpt_dir", dirs[first], *CHAT_FLAGS], CHAT_INPUT if rank == 0 else "")
        results["bad_n"] = run_main(["sample", "--ckpt_dir", dirs["one_kv_head"], *TP_SAMPLE_FLAGS], "")
        results["bad_group"] = run_main(["sample", "--ckpt_dir", dirs[first], *TP_SAMPLE_FLAGS, "--quantize", "int4",
                                         "--group_size", GROUP], "")
        results["eval"] = run_main(["eval", "--ckpt_dir", dirs[first], "--data", "no_such_*.bin"], "")
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def run_tp_worker(out_dir: Path, device: str, compile: bool, ckpts: dict, timeout: float) -> list:
    """tp_worker over 2 processes on ckpts (name -> directory): each rank's results."""
    out_dir.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE / "test_llama31.py"), str(out_dir), device, str(int(compile)),
                        *(f"{name}={path}" for name, path in ckpts.items())],
                       cwd=HERE, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.fixture(scope="module")
def tp_ckpts(tmp_path_factory, tiny_sd, tiny_ckpt) -> dict:
    """The tiny checkpoint as 1, 2 and 4 model-parallel files and as Hugging Face's safetensors; a tiny model with
    tied embeddings (the output layer stays whole under tensor parallelism), one to quantize, one with a single
    kv head."""
    d = tmp_path_factory.mktemp("tp")
    ckpts = {"mp1": tiny_ckpt, **{f"mp{n}": write_meta_checkpoint(d / f"mp{n}", TINY, tiny_sd, n) for n in (2, 4)}}
    llama31.convert(str(tiny_ckpt), str(d / "hf"), to="hf")
    ckpts["hf"] = d / "hf"
    tied = {**TINY, "tie_word_embeddings": True}
    ckpts["tied"] = write_meta_checkpoint(d / "tied", tied, random_state_dict(tied, seed=1))
    ckpts["quant"] = write_meta_checkpoint(d / "quant", TP_QUANT, unit_gain_state_dict(TP_QUANT), n_files=2)
    # one kv head cannot be split over 2 processes; refused from params.json, before the weights are read
    ckpts["one_kv_head"] = write_ckpt(d / "one_kv_head", {**TINY, "n_kv_heads": 1}, tiny_ckpt / "consolidated.00.pth")
    return ckpts


@pytest.fixture(scope="module")
def tp_cpu(tp_ckpts, tmp_path_factory) -> list:
    return run_tp_worker(tmp_path_factory.mktemp("tp_out"), "cpu", False, tp_ckpts, 300)


def float_runs(results: dict) -> dict:
    return {k: v for k, v in results.items() if isinstance(k, tuple) and k[0] not in ("tied", "quant")}


# One process sums each output of wo (K = 64 terms) and w2 (K = 224) in one dot product; 2 processes sum K/2 terms
# each and the all-reduce adds the two halves, and each rank's smaller matrices may take other BLAS blockings:
# the same float32 products, summed in another order. A reordered float32 sum of K terms moves by at most
# 2 (K - 1) 2^-24 sum|x_i w_i| (Higham's bound for recursive summation), about 7e-5 for the output layer's dot
# products here (K = 64, sum|h_i w_i| ~ 10), and typically sqrt(K) times less, since rounding errors have random
# signs. It is the same kind of difference as between this file's model and Meta's (other matmul blockings,
# fused matrices, SDPA), which TOL = 1e-4 bounds on these logits; measured here: 7e-6.
def test_tensor_parallel_logits_equal_one_process_and_every_rank_sees_the_same(tp_cpu, llama):
    tokens = random_tokens(2, 12, seed=3)
    with torch.inference_mode():
        want = llama.model(tokens)
    for key, out in float_runs(tp_cpu[0]).items():
        assert (out["whole"] - want).abs().max().item() < TOL, key
        assert (out["cached"] - want[:, 5:]).abs().max().item() < TOL, key  # prefill's last position, then steps
        # the same bytes on both ranks: so the same seeded generator draws the same token on each
        assert all(torch.equal(out[k], tp_cpu[1][key][k]) for k in ("whole", "cached")), key
        assert out["kv_heads"] == TINY["n_kv_heads"] // 2  # the KV cache holds this rank's kv heads only


def test_tensor_parallel_greedy_tokens_equal_one_process(tp_cpu, llama):
    want = llama.generate(TP_PROMPTS, max_gen_len=12, temperature=0)
    for key, out in float_runs(tp_cpu[0]).items():
        assert out["greedy"] == want, key
    # every rank draws the same tokens from the same seed (their logits are the same bytes)
    assert tp_cpu[0]["sampled"] == tp_cpu[1]["sampled"] != want


def test_tensor_parallel_reads_1_2_4_model_parallel_files_and_safetensors_as_one_model(tp_cpu):
    """Each rank reads its slices from wherever they lie (half a file, one file, two files; sliced safetensors
    reads, q and k permuted back head by head): the same weights, so the same logits to the bit."""
    ref = tp_cpu[0][("mp1", None, True)]
    for name in ("mp2", "mp4", "hf"):
        out = tp_cpu[0][(name, None, True)]
        assert torch.equal(out["whole"], ref["whole"]) and torch.equal(out["cached"], ref["cached"]), name
    # the output layer replicated instead of split over the vocabulary: the same logits within float32 rounding
    replicated = tp_cpu[0][("mp1", None, False)]
    assert (replicated["whole"] - ref["whole"]).abs().max().item() < TOL
    assert replicated["greedy"] == ref["greedy"]


def test_tensor_parallel_tied_output_layer(tp_cpu, tp_ckpts):
    one = llama31.Llama.build(str(tp_ckpts["tied"]), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")
    with torch.inference_mode():
        want = one.model(random_tokens(2, 12, seed=3))
    out = tp_cpu[0][("tied", None, True)]
    assert (out["whole"] - want).abs().max().item() < TOL
    assert out["greedy"] == one.generate(TP_PROMPTS, max_gen_len=12, temperature=0)
    # each rank computes all the logits from the all-reduced hidden states, which are the same on both
    assert torch.equal(out["whole"], tp_cpu[1][("tied", None, True)]["whole"])


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_tensor_parallel_quantizes_each_rank_s_slices_as_one_process_quantizes_the_whole(tp_cpu, tp_ckpts, quantize):
    """Each rank quantizes its slices to the integers and scales of one process's quantized model: the output
    layer's rows and their scales; wo's and w2's columns, with int8's scale of the whole row (the ranks' maxima
    all-reduced) and int4's whole groups. So the logits are one process's within float32 rounding (TOL, as above:
    the same products summed in another order) and the greedy tokens equal."""
    one = built(tp_ckpts["quant"], quantize)
    want = one.model.state_dict()
    split = {"weight": 1, "scales": None, "scales_and_zeros": 0}  # of wo and w2: each rank's columns of every row
    for rank in range(2):
        got = tp_cpu[rank][("quant", quantize, True)]["quantized"]
        assert len(got) == 6
        for k, v in got.items():
            dim = 0 if k.startswith("output.") else split[k.rpartition(".")[2]]
            assert torch.equal(v, want[k] if dim is None else want[k].chunk(2, dim)[rank]), (rank, k)
    with torch.inference_mode():
        logits = one.model(random_tokens(2, 12, seed=3))
    out = tp_cpu[0][("quant", quantize, True)]
    assert (out["whole"] - logits).abs().max().item() < TOL
    assert torch.equal(out["whole"], tp_cpu[1][("quant", quantize, True)]["whole"])
    assert out["greedy"] == one.generate(TP_PROMPTS, max_gen_len=12, temperature=0)


def test_tensor_parallel_sample_and_chat_print_once_what_one_process_prints(tp_cpu, llama):
    """Rank 0 alone prints and streams, and reads the user's lines, which it sends to rank 1."""
    completion = llama.text_completion(["Hello"], temperature=0, max_gen_len=8)[0]["generation"]
    assert tp_cpu[0]["sample"][:2] == (0, "Hello" + completion + "\n")
    assert "on each of 2 tensor-parallel processes" in tp_cpu[0]["sample"][2]
    assert tp_cpu[0]["chat"][:2] == (0, chat_transcript(llama))
    assert tp_cpu[1]["sample"][:2] == tp_cpu[1]["chat"][:2] == (0, "")


def test_tensor_parallel_that_does_not_fit_the_model_is_a_one_line_error(tp_cpu, tp_ckpts):
    for rank in range(2):
        for case, message in (
                ("bad_n", f"tensor parallelism over N=2 processes (torchrun --nproc_per_node 2) cannot split "
                          f"{tp_ckpts['one_kv_head']}: N must divide n_kv_heads=1 (and the SwiGLU width 224); "
                          "choose N from [1]"),
                ("bad_group", "--group_size 32 does not divide the 32 and 112 inputs of wo and w2 that each of N=2 "
                              "processes holds: int4's groups run along the inputs, and a rank's columns must be "
                              "whole groups; use --quantize int8 or another N"),
                ("eval", "eval runs in one process, not under torchrun (tensor parallelism is for sample and chat); "
                         "--quantize int8 fits Llama 3.1 70B on one H200")):
            code, out, err = tp_cpu[rank][case]
            assert code == 2 and out == "" and "Traceback" not in err, err
            assert err.strip().splitlines()[-1] == f"llama31: error: {message}"


@pytest.mark.parametrize("vocab_parallel", [True, False])
def test_tensor_parallel_shares_and_the_bytes_bench_counts(vocab_parallel):
    """Each of N ranks holds 1/N of every linear layer of a block (and of the output layer, or all of it), the
    whole embedding and norms; bench.py's roofline counts the bytes one step reads on a rank: not the
    embedding. 70B in bf16, which one 80 GB card cannot hold, fits two in shares of 69.5 GB."""
    import bench
    args = llama31.preset("llama3.1-70b", max_seq_len=512, max_batch_size=1)
    gpu = torch.device("cuda")  # meta models only: no GPU needed
    tp = llama31.TensorParallel(rank=1, world=2, vocab_parallel=vocab_parallel)
    one = llama31.meta_model(args, None, 64, gpu).to(torch.bfloat16)
    two = llama31.meta_model(args, None, 64, gpu, tp=tp).to(torch.bfloat16)
    norms = 2 * (2 * args.n_layers + 1) * args.dim
    output = 2 * args.vocab_size * args.dim
    blocks = bench.weight_bytes_read(one) - output - norms
    assert bench.weight_bytes_read(two) == blocks // 2 + norms + (output // 2 if vocab_parallel else output)
    assert bench.weight_bytes_read(two) / 1e9 == pytest.approx(69.5 if vocab_parallel else 70.6, abs=0.05)
    assert two.tok_embeddings.weight.shape == one.tok_embeddings.weight.shape
    attn = two.layers[0].attention
    assert (attn.n_heads, attn.n_kv_heads, attn.wk.weight.shape, attn.wo.weight.shape) == (32, 4, (512, 8192),
                                                                                           (8192, 4096))
    free = 79 * 2 ** 30
    llama31.check_memory(two, gpu, torch.bfloat16, "Llama3.1-70B", 64, free, tp)
    with pytest.raises(ValueError, match="needs 131.6 GiB of GPU memory"):
        llama31.check_memory(one, gpu, torch.bfloat16, "Llama3.1-70B", 64, free)
    # quantized: the same shares, each linear with its scales (int4's groups of wo and w2 split with them)
    for quantize in llama31.QUANTIZE_CHOICES:
        one_q = llama31.meta_model(args, quantize, 64, gpu).to(torch.bfloat16)
        two_q = llama31.meta_model(args, quantize, 64, gpu, tp=tp).to(torch.bfloat16)
        out_q = args.vocab_size * (args.dim + 2)  # int8 and a bf16 scale per row
        int8_row_scales = 4 * args.n_layers * args.dim if quantize == "int8" else 0  # wo's, w2's: whole on each
        blocks_q = bench.weight_bytes_read(one_q) - out_q - norms - int8_row_scales
        assert bench.weight_bytes_read(two_q) == (blocks_q // 2 + norms + int8_row_scales
                                                  + (out_q // 2 if vocab_parallel else out_q)), quantize


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_gpu_tensor_parallel_compiled_decode_on_two_gpus(tp_ckpts, llama, tmp_path):
    """--compile over 2 GPUs: the decode step is one CUDA graph with the all-reduces and the logits' all-gather
    (NCCL) inside it. In float32 its logits are one CPU process's within TOL (the same reordered sums as above),
    the same bytes on both GPUs, and its greedy tokens equal, with the output layer split or replicated.
    Quantized, its logits are those of one CPU process within the bounds of the quantization GPU test (int4
    computes in bf16 there), and both GPUs agree."""
    gpu = run_tp_worker(tmp_path, "cuda", True, {"mp2": tp_ckpts["mp2"], "quant": tp_ckpts["quant"]}, 600)
    tokens = random_tokens(2, 12, seed=3)
    with torch.inference_mode():
        want = llama.model(tokens)
    greedy = llama.generate(TP_PROMPTS, max_gen_len=12, temperature=0)
    for key in (("mp2", None, True), ("mp2", None, False)):
        out = gpu[0][key]
        assert (out["cached"] - want[:, 5:]).abs().max().item() < TOL, key  # through the compiled decode step
        assert (out["whole"] - want).abs().max().item() < TOL, key
        assert torch.equal(out["cached"], gpu[1][key]["cached"]), key
        assert out["greedy"] == gpu[1][key]["greedy"] == greedy, key
    assert gpu[0]["sampled"] == gpu[1]["sampled"]
    for quantize, rel in (("int8", 1e-5), ("int4", 2e-2)):
        out = gpu[0][("quant", quantize, True)]
        with torch.inference_mode():
            ref = built(tp_ckpts["quant"], quantize).model(tokens)
        assert ((out["cached"] - ref[:, 5:]).norm() / ref[:, 5:].norm()).item() < rel, quantize
        assert torch.equal(out["cached"], gpu[1][("quant", quantize, True)]["cached"]), quantize


if __name__ == "__main__":  # a worker of the tensor-parallel tests, under torchrun
    tp_worker(*sys.argv[1:])
