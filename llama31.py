"""
Llama 3.1 in one file of PyTorch: the model, Meta-checkpoint loading, sampling, data and training.

    python llama31.py sample --ckpt_dir Llama3.1-8B --prompt "The capital of France is"
    torchrun --nproc_per_node 8 llama31.py train --ckpt_dir Llama3.1-8B --train_data "data/train_*.bin"

The numerics follow Meta's reference (llama_models.llama3) line for line where it matters: RMSNorm in
float32, RoPE in float32 with Llama 3.1's frequency scaling, float32 logits. test_llama31.py holds that
claim against Meta's own code (reference.py). Where this file deliberately differs from Meta's, a comment
marked "differs from Meta" says how and why.
"""

import atexit
import contextlib
import ctypes
import dataclasses
import difflib
import functools
import glob
import hashlib
import importlib.util
import inspect
import json
import math
import mmap
import os
import pickletools
import re
import shutil
import signal
import sys
import textwrap
import time
import types
import typing
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from tokenizer import ChatFormat, Tokenizer, check_message, default_tokenizer_path

# -----------------------------------------------------------------------------
# config and presets

VOCAB_SIZE = 128256  # the Llama 3 tokenizer's, shared by every Llama 3.x text model
BOS_ID = 128000  # <|begin_of_text|> of the Llama 3 tokenizer: where a document starts in packed training data
IGNORE_INDEX = -100  # a training target the loss skips (F.cross_entropy's convention)

# keys that some params.json files carry and that change nothing here
PARAMS_IGNORED = {"max_seq_len", "max_batch_size"}


@dataclass
class ModelArgs:
    # the keys of Meta's params.json
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means n_heads (no grouped-query attention)
    vocab_size: int = VOCAB_SIZE
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False  # Meta's default, for a params.json without the key (Llama 3.0)
    # RoPE frequency scaling; Meta's code hard-codes these Llama 3.1 values. Llama 3.2 1B/3B use a factor
    # of 32 (Hugging Face configs carry it); Meta's params.json never does, so 8 is the default here.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B share the output layer with the embedding
    # an explicit SwiGLU width, for Hugging Face configs whose intermediate_size no multiple_of /
    # ffn_dim_multiplier pair reproduces (Meta's code does not read it)
    ffn_hidden_dim: Optional[int] = None
    # runtime sizes, not part of the weights: the longest sequence and largest batch a run will use
    max_seq_len: int = 2048
    max_batch_size: int = 4

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        self.check()

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width, computed exactly as Meta's FeedForward does."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden_dim = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden_dim = int(self.ffn_dim_multiplier * hidden_dim)
        return self.multiple_of * ((hidden_dim + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict, source: str = "params.json", **runtime) -> "ModelArgs":
        """ModelArgs from the dict of a params.json; an unknown key is an error, so a wrong file is not
        half-understood. `runtime` sets max_seq_len / max_batch_size."""
        if not isinstance(params, dict):
            raise ValueError(f"{source} must hold a JSON object of model arguments, got {type(params).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)} - {"max_seq_len", "max_batch_size"}
        unknown = sorted(set(params) - fields - PARAMS_IGNORED)
        if unknown:
            raise ValueError(
                f"{source} has keys this file does not know: {unknown}. Known keys: {sorted(fields)}. "
                "Vision, quantized and LoRA checkpoints are not supported."
            )
        missing = sorted({"dim", "n_layers", "n_heads"} - set(params))
        if missing:
            raise ValueError(f"{source} lacks the required keys {missing}")
        return cls(**{k: v for k, v in params.items() if k in fields}, **runtime)

    def to_params(self) -> dict:
        """The params.json Meta's reference reads (it ignores keys it does not know, such as our RoPE
        factor and tie flag, which are written only where they differ from Llama 3.1's)."""
        params = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("max_seq_len", "max_batch_size")}
        defaults = ModelArgs()
        for k in ("rope_scale_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_old_context_len", "tie_word_embeddings", "ffn_hidden_dim"):
            if params[k] == getattr(defaults, k):
                del params[k]
        return params

    def check(self):
        """Every field's type and range, and that the shapes fit together: a wrong params.json or
        config.json fails here, naming the value, not as a shape error deep inside the model."""
        optional = ("ffn_dim_multiplier", "ffn_hidden_dim")  # None: derived from dim and multiple_of
        for names, kind in ((("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                               "ffn_hidden_dim"), "integer"),
                            (("norm_eps", "rope_theta", "rope_scale_factor", "rope_low_freq_factor",
                              "rope_high_freq_factor", "rope_old_context_len", "ffn_dim_multiplier"), "number")):
            for name in names:
                value = getattr(self, name)
                if not (value is None and name in optional):
                    check_number(f"model argument {name}={value!r}", value, lambda v: 0 < v < math.inf,
                                 f"a positive {kind}", integer=kind == "integer")
        for name in ("use_scaled_rope", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model argument {name}={getattr(self, name)!r} must be true or false")
        if self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"model arguments rope_high_freq_factor={self.rope_high_freq_factor} must be larger "
                             f"than rope_low_freq_factor={self.rope_low_freq_factor}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not fit together: "
                "dim must split into n_heads heads of even size, and n_heads must be a multiple of n_kv_heads"
            )


# the published text models' shapes (Meta's params.json), and a small one for demos and tests
PRESETS = {  # all use Llama 3.1's scaled RoPE (use_scaled_rope=True, added below)
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.2),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                        rope_scale_factor=32.0, tie_word_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                        rope_scale_factor=32.0, tie_word_embeddings=True),
    # the first-run demo's model: small enough to train on 2 CPU cores in minutes; its 128,256-way output
    # layer (shared with the embedding) is most of its 17M parameters and most of its compute
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, multiple_of=64, tie_word_embeddings=True),
}


def preset(name: str, **runtime) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelArgs(**PRESETS[name], use_scaled_rope=True, **runtime)


# -----------------------------------------------------------------------------
# utilities: rank-0 printing, device and dtype, JSON, flag checks


def print0(*args, **kwargs):
    """print on rank 0 only, so torchrun does not repeat every line N times"""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def pick_device(device: Optional[str] = None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")  # the one place the device is named
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} was asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    return device


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def jsonl_records(path: Path, text: str):
    """(line number, record) for each non-blank line of the text of jsonl file `path`, split at "\n" only:
    str.splitlines() also breaks at U+2028 and U+0085, which JSON strings may hold."""
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno} is not valid JSON ({e})") from None
        yield lineno, record


def check_number(label: str, value, ok: Callable[[float], bool], what: str, integer: bool = False):
    """Raise ValueError(f"{label} must be {what}") unless value is a number (an int where integer) for which
    ok(value) holds. A bool is no number here, though Python counts it as an int."""
    kinds = int if integer else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or not ok(value):
        raise ValueError(f"{label} must be {what}")


# -----------------------------------------------------------------------------
# the model: RMSNorm, RoPE, attention, feed-forward, block, Transformer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the weight, as Meta does (it matters in bf16)
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def precompute_freqs_cis(args: ModelArgs) -> torch.Tensor:
    """cos and sin of every (position, frequency) pair, (max_seq_len, head_dim // 2, 2) float32.
    Computed on the CPU in float32 like Meta's, so every device starts from the same table."""
    dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, device="cpu")[: dim // 2].float() / dim))
    if args.use_scaled_rope:
        # Llama 3.1: long wavelengths slowed by scale_factor, short ones kept, a smooth blend between
        low_freq_wavelen = args.rope_old_context_len / args.rope_low_freq_factor
        high_freq_wavelen = args.rope_old_context_len / args.rope_high_freq_factor
        wavelen = 2 * math.pi / freqs
        new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / args.rope_scale_factor, freqs)
        smooth = (args.rope_old_context_len / wavelen - args.rope_low_freq_factor) / (
            args.rope_high_freq_factor - args.rope_low_freq_factor)
        freqs = torch.where((wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
                            (1 - smooth) * new_freqs / args.rope_scale_factor + smooth * new_freqs, new_freqs)
    t = torch.arange(args.max_seq_len, device="cpu", dtype=torch.float32)
    angles = torch.outer(t, freqs)
    # differs from Meta: real cos/sin instead of complex64, since torch.compile handles real tensors better
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each consecutive pair (x[2i], x[2i+1]) of every head, in float32.
    x: (B, T, n_heads, head_dim); freqs_cis: (T, head_dim // 2, 2)."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, head_dim // 2, 2)
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    cos, sin = fc[..., 0], fc[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)
    return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Keys and values of every position generated so far, at fixed size (max_batch_size, n_kv_heads,
    max_seq_len, head_dim) so shapes never change and the decode step can be one CUDA graph."""

    def __init__(self, batch_size, seq_len, n_kv_heads, head_dim, device, dtype):
        super().__init__()
        shape = (batch_size, n_kv_heads, seq_len, head_dim)
        self.register_buffer("cache_k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("cache_v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)

    def update(self, input_pos, xk, xv):
        # input_pos: (T,) positions; xk, xv: (B, n_kv_heads, T, head_dim)
        self.cache_k.index_copy_(2, input_pos, xk.to(self.cache_k.dtype))  # (autocast may give bf16)
        self.cache_v.index_copy_(2, input_pos, xv.to(self.cache_v.dtype))
        return self.cache_k, self.cache_v


@functools.cache
def compiled_flex_attention() -> Callable:
    """flex attention is fast only compiled (eager, it runs a reference implementation that materialises
    the scores); compiled on first use, not at import (which would cost every command 2 s)."""
    return torch.compile(flex_attention, dynamic=False)


HAS_TRITON = importlib.util.find_spec("triton") is not None  # in PyTorch's CUDA builds for Linux, not Windows'


def triton_gpu(x: torch.Tensor) -> bool:
    """Whether llama31's Triton kernels can take x: bf16 or fp16 on a CUDA GPU of compute capability 8.0 or
    more (Ampere on), with Triton installed. Constants for a given model, so torch.compile folds them."""
    return x.is_cuda and HAS_TRITON and x.dtype in (torch.bfloat16, torch.float16) \
        and torch.cuda.get_device_properties(x.device).major >= 8


# One new token attending to its cached positions (a decode step) reads the cache and little else. SDPA with a
# dense mask reads all max_seq_len positions every step: for 8B on an H200, 8.9 us a layer at batch 1 with a
# cache of 384, 11.9 with chat's 4,096 however short the dialog, 40 us at batch 8. This Triton kernel (flash
# decoding) reads only the positions up to the token's, in chunks that programs attend to in parallel, the
# query heads that share a kv head together; a second kernel combines the chunks' softmax sums: 6.0, 6.5 and
# 10.4 us at position 383 of those caches; over a whole cache of 4,096, 9.1 at batch 1 and SDPA's 40 at 8
# (at batch 8 over a whole 8,192, 72 against SDPA's 70).
@functools.cache
def decode_attention_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def attend_chunk(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, seq_len, n_chunks, scale_log2,
                     G: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_G: tl.constexpr):
        bh, chunk = tl.program_id(0), tl.program_id(1)  # (batch row, kv head), a chunk of positions
        start = chunk * CHUNK
        end = tl.minimum(start + CHUNK, tl.load(pos_ptr) + 1)  # the token's own position is the last one read
        if start < end:
            g, d = tl.arange(0, BLOCK_G), tl.arange(0, D)  # the kv head's G query heads (padded), dimensions
            q = tl.load(q_ptr + (bh * G + g)[:, None] * D + d[None, :], mask=g[:, None] < G, other=0.0)
            m = tl.full((BLOCK_G,), float("-inf"), tl.float32)  # running max of the scores, in log2 units
            l = tl.zeros((BLOCK_G,), tl.float32)  # running sum of exp2(score - m)
            acc = tl.zeros((BLOCK_G, D), tl.float32)  # running sum of exp2(score - m) * value
            kv = bh.to(tl.int64) * seq_len * D
            for n0 in range(start, end, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)
                at, seen = kv + n[:, None] * D + d[None, :], n[:, None] < end  # (BLOCK_N, D) of keys and values
                k = tl.load(k_ptr + at, mask=seen, other=0.0)
                s = tl.where(n[None, :] < end, tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
                m_new = tl.maximum(m, tl.max(s, 1))
                alpha, p = tl.exp2(m - m_new), tl.exp2(s - m_new[:, None])
                v = tl.load(v_ptr + at, mask=seen, other=0.0)
                l = l * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)  # p in bf16, as flash attention's
                m = m_new
            rows = (bh * G + g) * n_chunks + chunk
            tl.store(acc_ptr + rows[:, None] * D + d[None, :], acc, mask=g[:, None] < G)
            tl.store(ml_ptr + rows * 2, m, mask=g < G)
            tl.store(ml_ptr + rows * 2 + 1, l, mask=g < G)

    @triton.jit
    def combine(acc_ptr, ml_ptr, pos_ptr, out_ptr, n_chunks, D: tl.constexpr, CHUNK: tl.constexpr,
                TILE: tl.constexpr):
        row = tl.program_id(0)  # (batch row, query head)
        d = tl.arange(0, D)
        last = tl.load(pos_ptr) // CHUNK  # the token's chunk
        m_all, l_all = float("-inf"), 0.0
        out = tl.zeros((D,), tl.float32)
        for c0 in range(0, last + 1, TILE):  # the chunks up to the token's, TILE at a time
            c = c0 + tl.arange(0, TILE)
            used, slot = c <= last, row * n_chunks + c
            m = tl.load(ml_ptr + slot * 2, mask=used, other=float("-inf"))
            l = tl.load(ml_ptr + slot * 2 + 1, mask=used, other=0.0)
            acc = tl.load(acc_ptr + slot[:, None] * D + d[None, :], mask=used[:, None], other=0.0)
            m_new = tl.maximum(m_all, tl.max(m, 0))
            w, rescale = tl.where(used, tl.exp2(m - m_new), 0.0), tl.exp2(m_all - m_new)
            l_all = l_all * rescale + tl.sum(w * l, 0)
            out = out * rescale + tl.sum(w[:, None] * acc, 0)
            m_all = m_new
        tl.store(out_ptr + row * D + d, (out / l_all).to(out_ptr.dtype.element_ty))
    return attend_chunk, combine


@torch.library.custom_op("llama31::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     input_pos: torch.Tensor) -> torch.Tensor:
    """softmax(q keys^T / sqrt(head_dim)) values over the cached positions 0..input_pos, the query heads
    grouped over the kv heads as SDPA's enable_gqa groups them. q (B, n_heads, 1, head_dim) bf16 or fp16;
    keys, values: the whole cache (B, n_kv_heads, max_seq_len, head_dim); input_pos (1,) -> (B, n_heads, 1,
    head_dim) in q's dtype. A CUDA device of compute capability 8.0 or more, head_dim a power of 2 >= 16."""
    import triton
    (B, n_heads, _, D), (n_kv_heads, seq_len) = q.shape, keys.shape[1:3]
    G = n_heads // n_kv_heads
    # chunks of 128 positions (256 at batch 8 for 8B): the fastest of a sweep on an H200, by shape alone
    chunk = 128 if B * n_kv_heads < 64 else 256
    n_chunks = -(-seq_len // chunk)
    acc = torch.empty(B * n_heads * n_chunks, D, dtype=torch.float32, device=q.device)  # each chunk's sums
    ml = torch.empty(B * n_heads * n_chunks, 2, dtype=torch.float32, device=q.device)
    out = torch.empty(B, n_heads, 1, D, dtype=q.dtype, device=q.device)
    attend_chunk, combine = decode_attention_kernels()
    attend_chunk[(B * n_kv_heads, n_chunks)](q.contiguous(), keys.contiguous(), values.contiguous(), input_pos,
                                            acc, ml, seq_len, n_chunks, math.log2(math.e) / math.sqrt(D), G=G, D=D,
                                            CHUNK=chunk, BLOCK_N=64, BLOCK_G=max(16, triton.next_power_of_2(G)))
    combine[(B * n_heads,)](acc, ml, input_pos, out, n_chunks, D=D, CHUNK=chunk, TILE=16)
    return out


@decode_attention.register_fake
def _(q, keys, values, input_pos):
    return q.new_empty(q.shape)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.register_buffer("wqkv", None, persistent=False)  # wq, wk, wv as one matrix: see fuse_weights
        self.cache: Optional[KVCache] = None  # set only while generating

    def fuse_weights(self):
        self.wqkv = fuse_linears(self.wq, self.wk, self.wv)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        B, T, _ = x.shape
        if self.wqkv is not None:  # a fused matrix (see fuse_weights), or a quantized linear (quantize_linears)
            xqkv = self.wqkv(x) if isinstance(self.wqkv, nn.Module) else F.linear(x, self.wqkv)
            kv_dim = self.n_kv_heads * self.head_dim
            xq, xk, xv = xqkv.split([self.n_heads * self.head_dim, kv_dim, kv_dim], dim=-1)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        xq = xq.view(B, T, self.n_heads, self.head_dim)
        xk = xk.view(B, T, self.n_kv_heads, self.head_dim)
        xv = xv.view(B, T, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (B, heads, T, head_dim)
        gqa = self.n_kv_heads != self.n_heads
        # differs from Meta: SDPA's fused kernels (float32 softmax inside) instead of explicit matmuls, a
        # softmax cast to float32 and back; equal within float32 rounding on the CPU
        if self.cache is not None:
            keys, values = self.cache.update(input_pos, xk, xv)
        if isinstance(mask, BlockMask):
            # packed documents on a GPU: flex attention computes only the blocks the document mask keeps
            attend = flex_attention if torch.compiler.is_compiling() else compiled_flex_attention()
            y = attend(xq, xk, xv, block_mask=mask, enable_gqa=gqa)
        elif self.cache is None or T > 1:
            # training, eval, and prefill (which always starts at position 0): the new tokens attend among
            # themselves, causally or by a dense document mask, through SDPA's flash / fused kernels
            y = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        elif torch.compiler.is_compiling() and triton_gpu(xq) and keys.dtype == xq.dtype and self.head_dim >= 16 \
                and self.head_dim & (self.head_dim - 1) == 0:  # (the kernel's head_dim: a power of 2, >= 16)
            # a compiled decode step (one CUDA graph): one new token attends to the cached positions up to its own
            y = decode_attention(xq, keys, values, input_pos)
        else:
            # one new token attends to every cached position up to its own; later slots are masked out (and
            # read). Uncompiled decoding keeps this: the kernel was timed compiled only, and from Python it costs
            # two Triton launches and three allocations where SDPA is one launch
            visible = (torch.arange(keys.size(2), device=x.device) <= input_pos).view(1, 1, 1, -1)  # (.., S)
            y = F.scaled_dot_product_attention(xq, keys, values, attn_mask=visible, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.register_buffer("w13", None, persistent=False)  # w1 and w3 as one matrix: see fuse_weights

    def fuse_weights(self):
        self.w13 = fuse_linears(self.w1, self.w3)

    def forward(self, x):
        if self.w13 is not None:  # a fused matrix (see fuse_weights), or a quantized linear (quantize_linears)
            a, b = (self.w13(x) if isinstance(self.w13, nn.Module) else F.linear(x, self.w13)).chunk(2, dim=-1)
        else:
            a, b = self.w1(x), self.w3(x)
        return self.w2(F.silu(a) * b)  # SwiGLU


def fuse_linears(*linears: nn.Linear) -> Optional[torch.Tensor]:
    """The weights of linears that read the same input, stacked into one (sum of out_features, in_features)
    matrix; each linear's weight becomes a frozen view of its rows, so memory and the state dict (Meta's
    names) stay as they were. For generation only: the views must not be trained. None (nothing fused)
    when one of them carries a LoRA adapter, which must see the input on its own."""
    if any(isinstance(m, LoRALinear) for m in linears):
        return None
    fused = torch.cat([m.weight.detach() for m in linears])
    for m, w in zip(linears, fused.split([m.out_features for m in linears])):
        m.weight = nn.Parameter(w, requires_grad=False)
    return fused


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


def eager(fn: Callable) -> Callable:
    """fn run eagerly, also inside a compiled model: torch.compiler.disable(fn), applied when a compiled
    model calls it rather than at import (torch.compiler.disable imports torch._dynamo, 0.4 s that every
    command would pay). Uncompiled callers call fn itself."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():  # only ever true while torch._dynamo traces, so it is imported
            return torch.compiler.disable(fn)(*args, **kwargs)
        return fn(*args, **kwargs)
    return run


# built eagerly, also in a compiled model: whether a row holds several documents depends on the data
@eager
def document_mask(inputs: torch.Tensor, bos_id: int, flex: bool):
    """The attention mask of packed rows [BOS doc1 EOS][BOS doc2 ...]: a token attends to the tokens at or
    after the latest BOS at or before it. None when no row holds more than one document (plain causal);
    a BlockMask for flex attention if flex, else a dense boolean mask for SDPA."""
    if not bool((inputs[:, 1:] == bos_id).any()):
        return None
    doc = torch.cumsum(inputs == bos_id, dim=1)  # (B, T) index of each token's document in its row
    B, T = inputs.shape
    if flex:  # a block mask for flex attention: (B, 1, T/128, T/128) blocks

        def same_document_causal(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)
        return create_block_mask(same_document_causal, B, None, T, T, device=inputs.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=inputs.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


class LinearCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of logits = h @ weight.T against targets, `chunk` rows at a time, so the
    (N, vocab_size) logits never exist whole (in float32 they would be 4 GiB for 8192 tokens of Llama 3).
    The gradients are made in the forward pass, chunk by chunk, from softmax - one_hot (all that the
    backward of cross-entropy needs): nothing is recomputed and no chunk is kept for the backward.
    need_weight_grad=False (a frozen output layer, LoRA) skips the weight's (vocab_size, dim) gradient."""

    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index: int, chunk: int, need_grad: bool,
                need_weight_grad: bool = True):
        # h (N, dim) in the compute dtype, weight (vocab_size, dim), targets (N,). Written without in-place
        # updates: inductor (CUDA) lost the gradients that were filled in place here.
        losses, grad_h, grad_weight = [], [], None
        for i in range(0, h.size(0), chunk):
            hc, tc = h[i:i + chunk], targets[i:i + chunk]
            logits = (hc @ weight.t()).float()  # (chunk, vocab_size), the matmul in the compute dtype
            valid = tc != ignore_index
            tc = torch.where(valid, tc, 0)
            logsumexp = torch.logsumexp(logits, dim=-1)
            losses.append(((logsumexp - logits.gather(1, tc[:, None])[:, 0]) * valid).sum())
            if need_grad:  # d loss / d logits = softmax - one_hot(target), zero on ignored rows
                minus_one = torch.full((len(tc), 1), -1.0, dtype=logits.dtype, device=logits.device)
                if torch.compiler.is_compiling():  # inductor fuses these into one kernel
                    g = torch.exp(logits - logsumexp[:, None])
                    g = g.scatter_add(1, tc[:, None], minus_one) * valid[:, None]
                else:  # eager: the same numbers, in place in the logits: each (chunk, vocab_size) float32 copy
                    # (0.5 GB for 1024 rows) is memory the kernel zero-fills page by page, most of a CPU step
                    g = logits.sub_(logsumexp[:, None]).exp_().scatter_add_(1, tc[:, None], minus_one)
                    g = g.mul_(valid[:, None])
                g = g.to(hc.dtype)
                grad_h.append(g @ weight.to(hc.dtype))
                if need_weight_grad:
                    grad_weight = (g.t() @ hc).float() + (0 if grad_weight is None else grad_weight)
        loss = torch.stack(losses).sum()
        grad_h = torch.cat(grad_h) if need_grad else None
        ctx.save_for_backward(grad_h, grad_weight)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_h * grad_loss, grad_weight, None, None, None, None, None


class Transformer(nn.Module):
    def __init__(self, params: ModelArgs):
        super().__init__()
        self.params = params
        self.tok_embeddings = nn.Embedding(params.vocab_size, params.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, params) for i in range(params.n_layers))
        self.norm = RMSNorm(params.dim, eps=params.norm_eps)
        self.output = nn.Linear(params.dim, params.vocab_size, bias=False)
        if params.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("freqs_cis", None, persistent=False)
        self.reset_rope()
        self.checkpoint_activations = False  # training: trade a second forward per block for activation memory

    def reset_rope(self):
        """(Re)compute the RoPE table on the model's device: a model built on the meta device gets it
        after its weights are loaded."""
        self.freqs_cis = precompute_freqs_cis(self.params).to(self.tok_embeddings.weight.device)

    def init_weights(self, generator: Optional[torch.Generator] = None):
        """Weights for training from scratch (Meta's checkpoints bring their own): normal(0, 0.02), the
        residual projections scaled by 1/sqrt(2 * n_layers) as in GPT-2, norms at one."""
        residual_std = 0.02 / math.sqrt(2 * self.params.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                nn.init.ones_(p)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std, generator=generator)

    def hidden(self, tokens, input_pos=None, mask=None):
        """The final-norm hidden states (B, T, dim). input_pos: (T,) positions when a KV cache is set."""
        _, T = tokens.shape
        h = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[:T] if input_pos is None else self.freqs_cis[input_pos]
        for layer in self.layers:
            if self.checkpoint_activations and self.training:  # keep only block inputs; recompute in backward
                h = checkpoint(layer, h, freqs_cis, input_pos, mask, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, input_pos, mask)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits (B, T, vocab_size) of every position. Without input_pos: the whole sequence,
        causal, no cache (training, eval, tests). With input_pos: through the KV cache (generation).
        With targets: the training loss instead (so DDP, which wraps forward, sees it)."""
        if targets is not None:
            return self.forward_loss(tokens, targets)
        return self.output(self.hidden(tokens, input_pos)).float()

    def forward_loss(self, inputs: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                     bos_id: int = BOS_ID) -> torch.Tensor:
        """Mean next-token cross-entropy over the targets that are not ignore_index, with document
        masking: in a packed row [BOS doc1 EOS][BOS doc2 ...] a token attends only to tokens at or after
        the latest BOS at or before it, so doc2 is trained as if it stood alone.
        inputs, targets: (B, T)."""
        # flex attention runs on GPUs (not yet fast on the CPU), for heads of 16 dimensions or more (its kernel's
        # minimum; Llama's have 64 or 128)
        mask = document_mask(inputs, bos_id, flex=inputs.device.type == "cuda" and self.params.head_dim >= 16)
        h = self.hidden(inputs, mask=mask)
        # differs from a plain F.cross_entropy(self.output(h).float(), ...): the same loss, without the
        # whole float32 logits (see LinearCrossEntropy)
        weight = self.output.weight if isinstance(self.output, nn.Linear) else self.output.dequantize(h.dtype)
        if torch.is_autocast_enabled(h.device.type):  # what autocast would do to self.output(h)
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)
        need_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        # rows per chunk: its float32 logits 256 MiB (512 rows of Llama 3's vocabulary), of which about three
        # live at once: 0.75 GiB, small beside even an 8B QLoRA run's 6 GiB of weights, and still a matmul
        # of 512 x dim x vocab_size per chunk, large enough to keep a GPU busy
        chunk = max(1, (256 << 20) // (4 * self.params.vocab_size))
        loss = LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets.flatten(), ignore_index, chunk, need_grad,
                                        need_grad and weight.requires_grad)
        # sum / count rather than mean, so a batch with no target at all (chat data) gives 0, not NaN
        return loss / (targets != ignore_index).sum().clamp(min=1)

    def setup_caches(self, batch_size: int, seq_len: int):
        """Give every layer a KV cache, reusing the present ones when the size is unchanged (so a compiled
        decode step replays its CUDA graph instead of recording a new one)."""
        first = self.layers[0].attention.cache
        if first is not None and first.cache_k.shape[0] == batch_size and first.cache_k.shape[2] == seq_len:
            return
        weight = self.tok_embeddings.weight
        for layer in self.layers:  # the layer's own kv heads: under tensor parallelism, this rank's share
            layer.attention.cache = KVCache(batch_size, seq_len, layer.attention.n_kv_heads, self.params.head_dim,
                                            weight.device, weight.dtype)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None

    def fuse_weights(self):
        """For generation: wq/wk/wv and w1/w3 each read as one matrix, so a decode step reads them in two
        matmul kernels instead of five per layer (8B on an H200: 183 -> 206 tok/s). The model can no
        longer be trained."""
        for layer in self.layers:
            layer.attention.fuse_weights()
            layer.feed_forward.fuse_weights()


# -----------------------------------------------------------------------------
# quantization: int8 and int4 weight-only
#
# A decode step reads every weight once to make one token per sequence, so its speed is the bytes it reads
# (bench.py's roofline). Weight-only quantization stores the blocks' linear weights in fewer bits and keeps
# the activations in bf16: int8 reads half the bytes of bf16, int4 a little over a quarter. As in gpt-fast's
# quantize.py, quantized linears replace the nn.Linear modules; the embedding stays as it is (one row is read
# per token), and so do the norms.

QUANTIZE_CHOICES = ("int8", "int4")
# int4 weights share a scale and a zero point (2 bf16) in groups of 64 along each row: 0.5625 bytes a weight
# (128 would give 0.53125, 6% fewer bytes). Smaller groups follow the weights more closely, and quality is the
# harder target: torchao's Llama 3.1 8B int4 numbers (1.90x bf16's speed, perplexity 7.54 -> 8.44) are for 64.
INT4_GROUP_SIZE = 64
TINY_SCALE = torch.finfo(torch.bfloat16).tiny  # the scale of an all-zero row or group, which stays zero
# Loading quantizes a matrix this many rows at a time (each row's numbers depend on that row alone), so its
# float32 temporaries are those of 4,096 rows, not of the matrix: 70B's output layer is 4.2 GB in float32.
# A multiple of 16: whole tiles of int4's GPU layout (pack_int4).
QUANTIZE_ROWS = 4096


def check_quantize(quantize: Optional[str], group_size: int):
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize {quantize!r} is not supported; choose one of {', '.join(QUANTIZE_CHOICES)} "
                         "(or leave it out for unquantized weights)")
    if quantize == "int4" and group_size not in (32, 64, 128, 256):
        raise ValueError(f"--group_size {group_size!r} must be 32, 64, 128 or 256 (the group sizes of the int4 "
                         "kernel)")


def exact_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b rounded correctly on every device: CUDA divides by a Python number through its reciprocal, which
    can differ in the last bit, and quantizing must give the same integers on the GPU as on the CPU."""
    return a / torch.tensor(b, dtype=a.dtype, device=a.device)


def quantize_int8(w: torch.Tensor, row_max: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per output channel: w ~ q * scale, within half a step (scale / 2) for
    every weight. w (n, k) float -> q (n, k) int8, scales (n,) bf16. row_max: max|w| of each whole row, where w
    holds only some of its columns (tensor parallelism), so that the scales are the whole rows'."""
    w = w.float()
    row_max = w.abs().amax(dim=1) if row_max is None else row_max
    # the scale is kept in bf16, within 2^-8 of max|w| / 127: max|w| / scale <= 127 / (1 - 2^-8) < 127.5, so
    # every weight still rounds to a q within [-127, 127] and the rounding is never clamped
    scales = exact_div(row_max, 127).clamp(min=TINY_SCALE).to(torch.bfloat16)
    q = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 in groups of group_size along each row, in the convention of PyTorch's int4 kernel
    (tinygemm), which int4_matmul follows: w ~ (q - 8) * scale + zero with q in [0, 15] (the zero is the value of
    q = 8), within half a step (scale / 2) for every weight. w (n, k) float -> q (n, k) uint8, scales_and_zeros
    (k / group_size, n, 2) bf16, both kernels' layout."""
    n, k = w.shape
    g = w.float().view(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)  # (n, groups)
    zeros = (lo + exact_div(8 * (hi - lo), 15)).to(torch.bfloat16).float()  # the grid's 9th of 16 points, in bf16
    # the step that reaches both ends of the group from the rounded zero; kept in bf16 (within 2^-8), the grid
    # [zero - 8 step, zero + 7 step] still covers every weight to within half a step
    scales = torch.maximum(exact_div(hi - zeros, 7), (zeros - lo) / 8).clamp(min=TINY_SCALE).to(torch.bfloat16)
    q = torch.round((g - zeros[..., None]) / scales.float()[..., None]) + 8
    scales_and_zeros = torch.stack([scales, zeros.to(torch.bfloat16)], dim=-1).transpose(0, 1).contiguous()
    return q.clamp(0, 15).to(torch.uint8).view(n, k), scales_and_zeros


# A decode step multiplies a few rows of activations (one per sequence) by each weight matrix: its time is the time
# to read the weights. PyTorch has no fast product with int8 weights on CUDA (aten._weight_int8pack_mm reads at 2%
# of an H200's bandwidth), and gpt-fast's route, F.linear on weight.to(bf16) left to inductor, made 8B decode read
# at 40% of it, barely faster than bf16 through cuBLAS. This Triton kernel (Triton comes with PyTorch's CUDA
# builds) reads each int8 weight once: a program owns BLOCK_N output channels of BLOCK_M rows and walks along k,
# BLOCK_K weights of each row at a time, summing in float32; the scales are applied at the end and the result
# rounded once to x's dtype. Int8Linear sends it matmuls of up to INT8_KERNEL_ROWS rows (batch x tokens): decode
# steps, and prefills of up to that many tokens in all, where the programs of one tile of weights run one after
# another, so that the weights are read from memory about once however many tiles of rows there are. On an H200,
# 8B's matrices, it took 0.25-0.75 of the time of cuBLAS on a converted copy of the weights at 128 to 512 rows,
# 0.93-1.02 at 1,024: about even where the work becomes compute-bound, so longer prefills keep the converted route.
INT8_KERNEL_ROWS = 512


@functools.cache
def int8_matmul_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, w_ptr, scales_ptr, y_ptr, m, n, k,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # program p: row tile p % row_tiles, column tile p // row_tiles (one weight tile's programs back to back)
        row_tiles = tl.cdiv(m, BLOCK_M)
        rows = tl.program_id(0) % row_tiles * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) // row_tiles * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's output channels
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * k + ks[None, :], mask=(rows[:, None] < m) & (ks[None, :] < k),
                        other=0.0)  # (BLOCK_M, BLOCK_K)
            w = tl.load(w_ptr + cols[:, None] * k + ks[None, :], mask=(cols[:, None] < n) & (ks[None, :] < k),
                        other=0)  # (BLOCK_N, BLOCK_K) int8
            if BLOCK_M == 1:  # one row: products and a sum along k
                acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)[None, :]
            else:  # the tensor cores' product, exact for int8 weights in bf16 or fp16
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        y = acc * tl.load(scales_ptr + cols, mask=cols < n, other=0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * n + cols[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))
    return kernel


@torch.library.custom_op("llama31::int8_matmul", mutates_args=())
def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (m, k) bf16 or fp16, weight (n, k) int8, scales (n,) -> x weight^T scales (m, n) in x's dtype, on a
    CUDA device of compute capability 8.0 or more (see Int8Linear.forward)."""
    (m, k), n = x.shape, weight.shape[0]
    # tiles chosen by shape alone rather than timed, so every process sums in the same order: for decode the
    # fastest of a sweep over 8B's matrices on an H200 (long runs along k; for one row, few output channels a
    # program), for a prefill Triton's usual matmul tiles (no faster one in a short sweep at 128 and 512 rows)
    if m == 1:
        block_m, (block_n, block_k, warps) = 1, ((8, 2048, 4) if n >= 16384 else (2, 2048, 2))
    elif m <= 16:  # tensor-core tiles of 16 rows
        block_m, (block_n, block_k, warps) = 16, ((128, 256, 4) if n >= 16384 else (32, 512, 4))
    else:  # a prefill's
        block_m, block_n, block_k, warps = 64, 128, 64, 4
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (-(-m // block_m) * -(-n // block_n),)
    int8_matmul_kernel()[grid](x.contiguous(), weight.contiguous(), scales, y, m, n, k, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return y


@int8_matmul.register_fake
def _(x, weight, scales):
    return x.new_empty(x.shape[0], weight.shape[0])


class Int8Linear(nn.Module):
    """A linear layer of int8 weights (out_features, in_features) with one bf16 scale per output channel,
    computed in the input's dtype. On a CUDA GPU up to INT8_KERNEL_ROWS rows in bf16 or fp16 (decode, a
    prefill of up to that many tokens in all) go through int8_matmul, which reads one byte a weight and rounds
    once; otherwise (more rows, a float32 model, the CPU) F.linear on the weights converted to x's dtype, then
    the scales, rounded twice.
    `sources` name the float weights it stacks, beside it in its parent module."""

    def __init__(self, in_features: int, out_features: int, sources: tuple):
        super().__init__()
        self.in_features, self.out_features, self.sources = in_features, out_features, sources
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.bfloat16))
        self.rows_split = False  # tensor parallelism's wo and w2: every rank holds some columns of each row

    def quantize(self, w: torch.Tensor) -> dict:
        row_max = torch.maximum(w.amax(dim=1), -w.amin(dim=1)).float()  # max |w| of each row, with no |w| copy
        if self.rows_split:  # the whole rows' max, so every rank's scales are the ones one process would give
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX)
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scales = torch.empty(w.shape[0], dtype=torch.bfloat16, device=w.device)
        for i in range(0, w.shape[0], QUANTIZE_ROWS):
            rows = slice(i, i + QUANTIZE_ROWS)
            q[rows], scales[rows] = quantize_int8(w[rows], row_max[rows])
        return {"weight": q, "scales": scales}

    def forward(self, x):
        rows = x.numel() // self.in_features
        if rows <= INT8_KERNEL_ROWS and triton_gpu(x):
            y = int8_matmul(x.reshape(rows, self.in_features), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)


# int4's decode kernel. PyTorch's int4 product (aten._weight_int4pack_mm, tinygemm) reads 8B's matrices at 32-47% of
# an H200's bandwidth for one row and takes 1.9-2.5 times as long for 8 rows. This CUDA kernel, compiled at
# first use by NVRTC through torch.cuda._compile_kernel (CUDA builds of PyTorch ship NVRTC), multiplies up to
# INT4_KERNEL_ROWS rows on the tensor cores, as Marlin does: the weights are stored so that one 32-bit word is
# a lane's whole A fragment of an m16n8k16 mma (16 output channels x 16 inputs), and one LOP3 puts two of its
# 4-bit numbers under bf16's exponent of 128 (0x4300), making 128 + q exactly with no data movement; the rows of
# x are the mma's 8 columns. Sums run in float32 per group (per 64 inputs of a larger one), then take its scale
# and zero: y += scale * sum x (128 + q) + (zero - 136 scale) * sum x, sum x from an mma by ones. A block owns
# TILES tiles of 16 output channels (two share x's loads and sums) and its WARPS warps split k, each loading the
# next two 64-input blocks of weights, x and scales while it multiplies the current two (two named stages: a
# `current = next` copy cost some 40 register moves a block, and with them the kernel was bound by issuing
# instructions, at 60% of the bandwidth); their sums meet in shared memory. The inputs are permuted within each
# half block of 32 (the same for weights and x, so the sum is unchanged, and groups of 32 stay whole) so that a
# lane's share of x is 8 consecutive inputs of each half, read straight from x's rows. On an H200 (bench.py
# matmuls), 8B's wqkv, wo, w13, w2 and output layer: 7.7, 6.1, 21.8, 14.2, 82.6 us for one row (tinygemm 9.8,
# 7.0, 34.8, 19.3, 148.2), about the same for 8 (tinygemm 24.6, 13.5, 78.9, 41.0, 344.4); 70B's: 61-86% of the
# bandwidth. More rows (a prefill) dequantize the weights with a second kernel and multiply in bf16 (cuBLAS).
INT4_KERNEL_ROWS = 8
INT4_CUDA = r"""
__device__ __forceinline__ unsigned bf16x2(unsigned v) {  // nibbles 0 and 4 of v -> bf16x2 (128 + lo, 128 + hi)
    unsigned r;
    asm("lop3.b32 %0, %1, 0x000f000f, 0x43004300, 0xea;" : "=r"(r) : "r"(v));  // (v & 0x000f000f) | 0x43004300
    return r;
}

__device__ __forceinline__ void mma(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                    unsigned b1) {  // d (16 x 8, float32) += a (16 x 16, bf16) b (16 x 8, bf16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};" : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mma0(float* d, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0,
                                     unsigned b1) {  // d = a b: mma with a zero accumulator
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%10,%10,%10};" : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
}

__device__ __forceinline__ unsigned short to_bf16(float f) {  // rounded to nearest even
    const unsigned u = __float_as_uint(f);
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#define SPAN (GROUP < 64 ? GROUP : 64)  // the inputs whose sums take one scale: a group, or a block of one

struct Stage {  // a lane's share of two 64-input blocks of the warp's TILES tiles: weights, x, scales and zeros
    uint4 w[2][TILES], x0[2], x1[2];
    unsigned sz[2][64 / SPAN][TILES][2];
};

// Loads those of blocks kb and kb + 1 that are the warp's (kb < kb1 is the same for the whole warp: no
// divergence), from w and x at block kb, and moves w and x on by two blocks. Where groups are over 64 inputs
// the warps start at whole groups, so kb is even and both blocks are in group kb * 64 / GROUP.
__device__ __forceinline__ void load(Stage& s, int kb, int kb1, const uint4*& w, const uint4*& x,
                                     const unsigned* sz, int n, int k, int tile_stride) {
    const unsigned* z = sz + (kb * 64 / GROUP) * n;
#pragma unroll
    for (int u = 0; u < 2; u++) {
        if (kb + u >= kb1) break;
        // the block's second half exists (after an odd number of 32 inputs it is padding: nothing is read for
        // it, neither x nor the scales of its group, which would be past the end, and its sums are never taken)
        const bool half = GROUP > 32 || (kb + u) * 64 + 32 < k;
#pragma unroll
        for (int c = 0; c < TILES; c++) s.w[u][c] = w[c * tile_stride + u * 32];
        s.x0[u] = x[u * 8];  // inputs 8 t .. 8 t + 7 of the block
        if (half) s.x1[u] = x[u * 8 + 4];  // inputs 32 + 8 t .. 32 + 8 t + 7
#pragma unroll
        for (int i = 0; i < 64 / SPAN; i++) {
            if (i == 1 && !half) break;  // groups of 32: the second is padding
            const int grp = GROUP <= 64 ? u * 64 / GROUP + i : 0;
#pragma unroll
            for (int c = 0; c < TILES; c++) {
                s.sz[u][i][c][0] = z[grp * n + 16 * c];  // channels c0 + 16 c and c0 + 16 c + 8
                s.sz[u][i][c][1] = z[grp * n + 16 * c + 8];
            }
        }
    }
    w += 64;
    x += 16;
}

// acc[c] += the products of the stage's blocks for tile c: per SPAN inputs, sums in float32 of (128 + q) x and
// of x (an mma by ones, shared by the tiles), then y += scale * sum (128 + q) x + (zero - 136 scale) * sum x.
__device__ __forceinline__ void multiply(const Stage& s, int kb, int kb1, int k, float (*acc)[4]) {
    const unsigned ones = 0x3F803F80u;  // bf16x2 (1, 1)
#pragma unroll
    for (int u = 0; u < 2; u++) {
        if (kb + u >= kb1) break;
        const unsigned b[8] = {s.x0[u].x, s.x0[u].y, s.x0[u].z, s.x0[u].w, s.x1[u].x, s.x1[u].y, s.x1[u].z, s.x1[u].w};
        float part[TILES][4], sx[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {  // the block's 4 steps of 16 inputs: 2 in each half
            const bool first = j * 16 % SPAN == 0;  // the step starts the sums
#pragma unroll
            for (int c = 0; c < TILES; c++) {
                const uint4& q = s.w[u][c];
                const unsigned v = j == 0 ? q.x : j == 1 ? q.y : j == 2 ? q.z : q.w;
                const unsigned a0 = bf16x2(v), a1 = bf16x2(v >> 4), a2 = bf16x2(v >> 8), a3 = bf16x2(v >> 12);
                if (first) mma0(part[c], a0, a1, a2, a3, b[2 * j], b[2 * j + 1]);
                else mma(part[c], a0, a1, a2, a3, b[2 * j], b[2 * j + 1]);
            }
            if (first) mma0(sx, ones, ones, ones, ones, b[2 * j], b[2 * j + 1]);
            else mma(sx, ones, ones, ones, ones, b[2 * j], b[2 * j + 1]);
            // the sums end, unless they are the padding after an odd number of 32 inputs (groups of 32 only)
            if ((j * 16 + 16) % SPAN == 0 && (GROUP > 32 || j < 2 || (kb + u) * 64 + 64 <= k)) {
#pragma unroll
                for (int c = 0; c < TILES; c++) {
                    const unsigned* z = s.sz[u][(j * 16 + 16) / SPAN - 1][c];
                    const float s0 = __uint_as_float(z[0] << 16), s1 = __uint_as_float(z[1] << 16);
                    const float z0 = __uint_as_float(z[0] & 0xffff0000u) - 136.f * s0;
                    const float z1 = __uint_as_float(z[1] & 0xffff0000u) - 136.f * s1;
                    acc[c][0] = fmaf(sx[0], z0, fmaf(part[c][0], s0, acc[c][0]));  // d[0], d[1]: channel c0 + 16 c
                    acc[c][1] = fmaf(sx[1], z0, fmaf(part[c][1], s0, acc[c][1]));
                    acc[c][2] = fmaf(sx[2], z1, fmaf(part[c][2], s1, acc[c][2]));  // d[2], d[3]: 8 channels on
                    acc[c][3] = fmaf(sx[3], z1, fmaf(part[c][3], s1, acc[c][3]));
                }
            }
        }
    }
}

// w: (n / 16, ceil(k / 64), 32, 4) words (pack_int4); x: (m, k) bf16, m <= 8; sz: (k / GROUP, n) words, the scale
// in the low half, the zero in the high; y: (m, n) bf16. Grid: n / (16 TILES) blocks of WARPS warps, each warp
// TILES tiles of 16 output channels over its share of k.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
int4_matmul(const uint4* __restrict__ w, const uint4* __restrict__ x, const unsigned* __restrict__ sz,
            unsigned short* __restrict__ y, int m, int n, int k) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int kbs = (k + 63) / 64, unit = GROUP > 64 ? GROUP / 64 : 1;  // a warp's share: whole groups
    const int kb0 = warp * (kbs / unit) / WARPS * unit, kb1 = (warp + 1) * (kbs / unit) / WARPS * unit;
    const int c0 = blockIdx.x * 16 * TILES + g;  // the lane's output channels: c0 + 16 c and c0 + 16 c + 8
    const uint4* wp = w + ((size_t)blockIdx.x * TILES * kbs + kb0) * 32 + lane;
    // lane g carries row g of x (column g of the mma's b); lanes past the rows read row 0, into columns never stored
    const uint4* xp = x + ((size_t)(g < m ? g : 0) * k + kb0 * 64 + t * 8) / 8;
    const int tile_stride = kbs * 32;  // words from one tile's block to the next tile's
    sz += c0;
    float acc[TILES][4] = {};
    Stage s0, s1;  // they take turns: nothing is copied from one into the other
    load(s0, kb0, kb1, wp, xp, sz, n, k, tile_stride);
    for (int kb = kb0; kb < kb1; kb += 4) {  // load the next stage, multiply the current
        load(s1, kb + 2, kb1, wp, xp, sz, n, k, tile_stride);
        multiply(s0, kb, kb1, k, acc);
        if (kb + 2 >= kb1) break;
        load(s0, kb + 4, kb1, wp, xp, sz, n, k, tile_stride);
        multiply(s1, kb + 2, kb1, k, acc);
    }
    __shared__ float sums[WARPS][TILES][32][4];
#pragma unroll
    for (int c = 0; c < TILES; c++)
#pragma unroll
        for (int i = 0; i < 4; i++) sums[warp][c][lane][i] = acc[c][i];
    __syncthreads();
    for (int c = warp; c < TILES; c += WARPS) {  // warp w adds up tiles w, w + WARPS, ...
#pragma unroll
        for (int i = 0; i < 4; i++) {  // d[i]: row 2 t + i % 2 of x, channel c0 + 16 c + 8 (i / 2)
            float s = 0.f;
            for (int v = 0; v < WARPS; v++) s += sums[v][c][lane][i];
            const int r = 2 * t + (i & 1);
            if (r < m) y[(size_t)r * n + c0 + 16 * c + 8 * (i >> 1)] = to_bf16(s);
        }
    }
}

// The weights (n, k) in bf16, as dequantize_int4 computes them: one thread a word, 4 inputs of 2 channels.
extern "C" __global__ void int4_dequantize(const unsigned* __restrict__ w, const unsigned* __restrict__ sz,
                                           uint2* __restrict__ out, int n, int k) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x, kbs = (k + 63) / 64;
    if (i >= (size_t)n / 16 * kbs * 128) return;
    const int j = i & 3, lane = (i >> 2) & 31, g = lane >> 2, t = lane & 3;
    const int col = (i >> 7) % kbs * 64 + 32 * (j >> 1) + 8 * t + 4 * (j & 1);  // the word's inputs: col .. col + 3
    if (col >= k) return;
    const unsigned v = w[i];
#pragma unroll
    for (int hi = 0; hi < 2; hi++) {  // channel g, then g + 8, of the word's tile
        const size_t c = (i >> 7) / kbs * 16 + g + 8 * hi;
        const unsigned s = sz[(size_t)(col / GROUP) * n + c];
        const float scale = __uint_as_float(s << 16), zero = __uint_as_float(s & 0xffff0000u);
        unsigned short q[4];
#pragma unroll
        for (int e = 0; e < 4; e++)  // input col + e: nibble 4 (e % 2) + 2 (e / 2) + hi
            q[e] = to_bf16(fmaf((float)((v >> (4 * (4 * (e & 1) + 2 * (e >> 1) + hi))) & 15u) - 8.f, scale, zero));
        out[(c * k + col) / 4] = make_uint2(q[0] | (unsigned)q[1] << 16, q[2] | (unsigned)q[3] << 16);
    }
}
"""


@functools.cache
def int4_kernel(name: str, group_size: int, warps: int, tiles: int, device: torch.device):
    """INT4_CUDA's kernel `name` for one group size, block size and tiles a warp, compiled for (and loaded on)
    one GPU."""
    with torch.cuda.device(device):
        defines = f"#define GROUP {group_size}\n#define WARPS {warps}\n#define TILES {tiles}\n"
        return torch.cuda._compile_kernel(defines + INT4_CUDA, name)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (n, k) uint8 in [0, 15] -> (n / 16, ceil(k / 64), 32, 4) int32, int4_matmul's layout: word j of lane
    4 g + t of tile (c, b) is that lane's A fragment of step j = 2 j2 + j1. Its nibble 4 p + 2 c8 + h is the
    weight of output channel 16 c + g + 8 h and input 64 b + 32 j2 + 8 t + 4 j1 + 2 c8 + p, which the mma takes as
    its input 2 t + 8 c8 + p of the step (PTX's m16n8k16 A fragment: registers a0..a3 = (g, 2t), (g + 8, 2t),
    (g, 2t + 8), (g + 8, 2t + 8), two inputs each; register s is nibbles s and s + 4). An odd number of 32 inputs
    is padded to a whole block."""
    n, k = q.shape
    kbs = -(-k // 64)
    q = F.pad(q, (0, kbs * 64 - k)).view(n // 16, 2, 8, kbs, 2, 4, 2, 2, 2)  # c, h, g, b, j2, t, j1, c8, p
    nibbles = q.permute(0, 3, 2, 5, 4, 6, 8, 7, 1).reshape(n // 16, kbs, 32, 4, 8).to(torch.int32)  # ..., 4p + 2c8 + h
    words = nibbles[..., 0]
    for i in range(1, 8):
        words = words | nibbles[..., i] << (4 * i)
    return words


@torch.library.custom_op("llama31::int4_matmul", mutates_args=())
def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (m, k) bf16, m <= INT4_KERNEL_ROWS; weight from pack_int4; scales_and_zeros (k / group_size, n, 2) bf16
    -> x W^T (m, n) bf16."""
    (m, k), n = x.shape, scales_and_zeros.shape[1]
    if m > INT4_KERNEL_ROWS:
        raise ValueError(f"int4_matmul takes up to {INT4_KERNEL_ROWS} rows, not {m} (Int4Linear dequantizes for more)")
    if not x.is_contiguous() or x.data_ptr() % 16:  # the kernel reads x 16 bytes at a time
        x = x.clone(memory_format=torch.contiguous_format)
    # measured on an H200 over 2, 4 and 8 warps and 1 and 2 tiles, on 8B's and 70B's matrices: two tiles a warp
    # (x and its sums shared by twice the weights) past 4,096 outputs (up to them, blocks would be fewer than
    # multiprocessors), 8 warps up to 8,192 outputs and 4 past them were the fastest or within 6% of it
    tiles = 2 if n % 32 == 0 and n > 4096 else 1
    warps = 8 if n <= 8192 else 4
    y = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    if m == 0:  # nothing to launch (the kernel's lanes past the rows read row 0)
        return y
    with torch.cuda.device(x.device):  # launched on x's GPU's current stream
        int4_kernel("int4_matmul", group_size, warps, tiles, x.device)(
            grid=(n // (16 * tiles), 1, 1), block=(32 * warps, 1, 1), args=[weight, x, scales_and_zeros, y, m, n, k])
    return y


@int4_matmul.register_fake
def _(x, weight, scales_and_zeros, group_size):
    return x.new_empty(x.shape[0], scales_and_zeros.shape[1])


@torch.library.custom_op("llama31::int4_dequantize", mutates_args=())
def int4_dequantize(weight: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """The bf16 weights (n, k) of int4_matmul's weights, equal to dequantize_int4's."""
    n = scales_and_zeros.shape[1]
    w = torch.empty(n, k, dtype=torch.bfloat16, device=weight.device)
    with torch.cuda.device(weight.device):
        int4_kernel("int4_dequantize", group_size, 1, 1, weight.device)(
            grid=(-(-weight.numel() // 256), 1, 1), block=(256, 1, 1), args=[weight, scales_and_zeros, w, n, k])
    return w


@int4_dequantize.register_fake
def _(weight, scales_and_zeros, group_size, k):
    return weight.new_empty(scales_and_zeros.shape[1], k, dtype=torch.bfloat16)


class Int4Linear(nn.Module):
    """A linear layer of int4 weights in groups (see quantize_int4). On a CUDA device the weights are in
    int4_matmul's layout (pack_int4), which reads half a byte per weight and computes in bf16 whatever the
    model's dtype; elsewhere they are two to a byte (the even column in the high half) and are dequantized for
    each call: the reference semantics the kernel is tested against."""

    def __init__(self, in_features: int, out_features: int, sources: tuple, group_size: int, tiled: bool):
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"--group_size {group_size} does not divide the {in_features} inputs of a linear "
                             "layer of this model; choose one of 32, 64, 128, 256 that does")
        if tiled and out_features % 16:
            raise ValueError(f"a linear layer of {out_features} outputs cannot use the int4 kernel, which needs a "
                             "multiple of 16; use --quantize int8")
        self.in_features, self.out_features, self.sources = in_features, out_features, sources
        self.group_size = group_size
        if tiled:  # (n / 16, ceil(k / 64), 32 lanes, 4 words) int32
            weight = torch.empty(out_features // 16, -(-in_features // 64), 32, 4, dtype=torch.int32)
        else:
            weight = torch.empty(out_features, in_features // 2, dtype=torch.uint8)
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                             dtype=torch.bfloat16))

    def quantize(self, w: torch.Tensor) -> dict:
        tiled = self.weight.dtype == torch.int32
        packed = torch.empty(self.weight.shape, dtype=self.weight.dtype, device=w.device)
        scales_and_zeros = torch.empty(self.scales_and_zeros.shape, dtype=torch.bfloat16, device=w.device)
        for i in range(0, w.shape[0], QUANTIZE_ROWS):  # a multiple of 16 rows: whole tiles
            rows = slice(i, i + QUANTIZE_ROWS)
            q, scales_and_zeros[:, rows] = quantize_int4(w[rows], self.group_size)
            if tiled:
                packed[i // 16:(i + QUANTIZE_ROWS) // 16] = pack_int4(q)
            else:
                packed[rows] = q[:, ::2] << 4 | q[:, 1::2]
        return {"weight": packed, "scales_and_zeros": scales_and_zeros}

    def forward(self, x):
        if self.weight.dtype == torch.int32:
            rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
            if rows.shape[0] <= INT4_KERNEL_ROWS:
                y = int4_matmul(rows, self.weight, self.scales_and_zeros, self.group_size)
            else:
                y = F.linear(rows, self.dequantize(torch.bfloat16))
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        # x W^T with W dequantized, also for QLoRA's training, which keeps no dequantized copy (see Int4Matmul)
        return Int4Matmul.apply(x, self.weight, self.scales_and_zeros, self.group_size)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        if self.weight.dtype == torch.int32:  # rounded to bf16, the weights a prefill multiplies by
            return int4_dequantize(self.weight, self.scales_and_zeros, self.group_size, self.in_features).to(dtype)
        return dequantize_int4(self.weight, self.scales_and_zeros, self.group_size, dtype)


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The float weights (out_features, in_features) of Int4Linear's weights two to a byte: (q - 8) * scale +
    zero, computed in float32 (exact but for the last bit of the sum) and rounded once to dtype, as
    int4_dequantize rounds its float32 fma to bf16."""
    q = torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], packed.shape[1] * 2)
    scales, zeros = scales_and_zeros.float().repeat_interleave(group_size, dim=0).unbind(-1)
    return ((q.float() - 8) * scales.t() + zeros.t()).to(dtype)


def quantize_linears(model: Transformer, quantize: str, group_size: int, device: torch.device,
                     output: bool = True) -> Transformer:
    """Replace the linear layers of every block of a model on the meta device by quantized ones, which
    load_weights then fills: wq/wk/wv as one matrix (wqkv) and w1/w3 as one (w13), so a decode step reads
    them in two matmul kernels instead of five, as Transformer.fuse_weights does for float weights. With
    output=True the output layer becomes int8 too: it is 1/15 of 8B's bf16 bytes but 1/5 of its int4 bytes,
    and int8 with a scale per row (per token) keeps the logits close. The model can no longer be trained."""
    def linear(in_features, out_features, sources):
        if quantize == "int8":
            return Int8Linear(in_features, out_features, sources)
        return Int4Linear(in_features, out_features, sources, group_size, tiled=device.type == "cuda")
    with torch.device("meta"):  # the float linears' sizes: under tensor parallelism, this rank's share
        for layer in model.layers:
            attention, ffn = layer.attention, layer.feed_forward
            qkv_dim = attention.wq.out_features + attention.wk.out_features + attention.wv.out_features
            attention.wqkv = linear(attention.wq.in_features, qkv_dim, ("wq", "wk", "wv"))
            attention.wo = linear(attention.wo.in_features, attention.wo.out_features, ("wo",))
            attention.wq = attention.wk = attention.wv = None
            ffn.w13 = linear(ffn.w1.in_features, 2 * ffn.w1.out_features, ("w1", "w3"))
            ffn.w2 = linear(ffn.w2.in_features, ffn.w2.out_features, ("w2",))
            ffn.w1 = ffn.w3 = None
        if output:
            model.output = Int8Linear(model.output.in_features, model.output.out_features, ("output",))
    return model


# -----------------------------------------------------------------------------
# tensor parallelism: generation over N processes of one host (torchrun), each holding 1/N of every layer

# Megatron's split, which Meta's model-parallel files use too: wq/wk/wv and w1/w3 keep 1/N of their output rows
# (whole heads; hidden units), so each rank runs its own heads and its share of the SwiGLU on the whole input;
# wo and w2 keep the matching 1/N of their input columns, so each rank's output is a partial sum, and one
# all-reduce after the attention and one after the feed-forward add the N partial sums up. (Meta's files cut
# these weights along the same dims, COLUMN_PARALLEL and ROW_PARALLEL: a rank reads the files its slice is in.)
TP_COLUMN = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
             "feed_forward.w3.weight")
TP_ROW = ("attention.wo.weight", "feed_forward.w2.weight")
# the functional all-gather is all_gather_single from PyTorch 2.13 on (all_gather_tensor, the old name, warns)
all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def add_partial_sums(module, inputs, output):
    """Forward hook of each attention and feed-forward under tensor parallelism: the partial sums of their
    row-parallel wo / w2, added up on every rank. A functional collective, so torch.compile captures it into
    the decode step's CUDA graph."""
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def gather_vocab(module, inputs, output):
    """Forward hook of a vocabulary-parallel output layer: the ranks' slices of the logits, joined along the
    vocabulary: the same bytes on every rank. Gathered along the first dim, then joined here: PyTorch 2.11's
    all_gather_tensor along another dim calls a function torch.compile refuses to trace."""
    slices = all_gather(output.contiguous(), 0, dist.group.WORLD)  # (world * B, T, vocab_size / world)
    return torch.cat(slices.chunk(dist.get_world_size()), dim=-1)


@dataclass
class TensorParallel:
    """One process's share of a model spread over `world` processes for generation: rank r holds query heads
    [r, r + 1) * n_heads / world and the kv heads they read, the same share of every feed-forward's hidden
    units and (vocab_parallel) of the output layer's rows. The embedding and the norms are whole on every rank:
    a step reads one embedding row per token, so splitting it would save memory, not time, at the cost of one
    more all-reduce per step. Quantized, each rank quantizes its own slices, to the integers and scales one
    process would give them (see Int8Linear.rows_split; int4's groups run along the inputs, so a rank's
    columns of wo and w2 must be whole groups). Every rank samples the same token with no broadcast of rank
    0's: the logits are the same bytes on every rank (all-gathered; or, replicated, computed by the same
    kernels from the same all-reduced sums, which NCCL and gloo hand to every rank alike), and every rank
    draws from a generator of the same seed."""
    rank: int
    world: int
    # The output layer split over the vocabulary, its logits all-gathered. Replicated, every rank would read all
    # of it every step: 8B on 2 GPUs, 1.05 GB on top of a rank's 7.5 GB in bf16 (+7%; on 4 GPUs +21%), where
    # the all-gather moves B x 128256 logits (256 KB at batch 1, tens of microseconds). A tied output layer is
    # the embedding, which every rank holds whole anyway: it stays replicated.
    vocab_parallel: bool = True

    def split_dim(self, name: str, args: ModelArgs) -> Optional[int]:
        """The dim along which weight `name` is cut across ranks (0: output rows, 1: input columns), or None
        where every rank holds it whole."""
        if name.endswith(TP_COLUMN) or (name == "output.weight" and self.vocab_parallel
                                        and not args.tie_word_embeddings):
            return 0
        return 1 if name.endswith(TP_ROW) else None

    def check(self, args: ModelArgs, source, quantize: Optional[str] = None, group_size: int = INT4_GROUP_SIZE):
        """N must split the kv heads (and so the query heads), the SwiGLU width and (vocab_parallel) the
        vocabulary evenly, and int4's groups must fit a rank's columns of wo and w2."""
        def fits(n: int) -> bool:
            return (args.n_kv_heads % n == 0 and args.hidden_dim % n == 0
                    and (args.vocab_size % n == 0 or self.split_dim("output.weight", args) is None))
        if not fits(self.world):
            choices = [n for n in range(1, args.n_kv_heads + 1) if fits(n)]
            raise ValueError(f"tensor parallelism over N={self.world} processes (torchrun --nproc_per_node "
                             f"{self.world}) cannot split {source}: N must divide n_kv_heads={args.n_kv_heads} (and "
                             f"the SwiGLU width {args.hidden_dim}); choose N from {choices}")
        inputs = (args.dim // self.world, args.hidden_dim // self.world)  # a rank's columns of wo and w2
        if quantize == "int4" and any(k % group_size for k in inputs):
            fit = [g for g in (32, 64, 128, 256) if not any(k % g for k in inputs)]
            raise ValueError(f"--group_size {group_size} does not divide the {inputs[0]} and {inputs[1]} inputs of "
                             f"wo and w2 that each of N={self.world} processes holds: int4's groups run along the "
                             "inputs, and a rank's columns must be whole groups; "
                             + (f"choose --group_size from {fit} or another N" if fit else
                                "use --quantize int8 or another N"))

    def shard(self, model: Transformer):
        """Cut a model built on the meta device down to this rank's shapes, before its linears are quantized and
        its weights loaded: the split linears get their local sizes (fuse_weights then fuses a rank's own rows)
        and attention its local head counts (and so the KV cache its local kv heads)."""
        for name, m in model.named_modules():
            dim = self.split_dim(f"{name}.weight", model.params) if isinstance(m, nn.Linear) else None
            if dim is not None:
                shape = list(m.weight.shape)
                shape[dim] //= self.world
                m.weight = nn.Parameter(torch.empty(shape, dtype=m.weight.dtype, device="meta"))
                m.out_features, m.in_features = shape
        for layer in model.layers:
            layer.attention.n_heads //= self.world
            layer.attention.n_kv_heads //= self.world

    def add_collectives(self, model: Transformer):
        """The collectives, as forward hooks, so the model's own code runs unchanged: an all-reduce after every
        attention and feed-forward, and the all-gather of a vocabulary-parallel output layer's logits."""
        for layer in model.layers:
            layer.attention.register_forward_hook(add_partial_sums)
            layer.feed_forward.register_forward_hook(add_partial_sums)
            for row_parallel in (layer.attention.wo, layer.feed_forward.w2):
                if isinstance(row_parallel, Int8Linear):
                    row_parallel.rows_split = True
        if self.split_dim("output.weight", model.params) == 0:
            model.output.register_forward_hook(gather_vocab)


def start_tensor_parallel(device: torch.device) -> tuple[Optional[TensorParallel], torch.device]:
    """Under torchrun with WORLD_SIZE > 1 (Llama.build, sample, chat, bench.py decode; train means DDP/FSDP
    there): this process's TensorParallel, the process group started if nobody has (NCCL on GPUs, gloo on the
    CPU), and its device: the GPU of its LOCAL_RANK, or the CPU. In one process: (None, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"tensor parallelism runs on CUDA GPUs (NCCL) or the CPU (gloo), not on {device}; "
                         "pass --device cuda or --device cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
        atexit.register(end_tensor_parallel)
    return TensorParallel(dist.get_rank(), dist.get_world_size()), device


def end_tensor_parallel():
    """At exit: the CUDA graphs of compiled decode steps first (torch._dynamo.reset frees them), then the
    process group, unless the caller has destroyed it. The graphs hold NCCL's communicators: destroying the
    group while they live hangs."""
    torch._dynamo.reset()
    if dist.is_initialized():
        dist.destroy_process_group()


# -----------------------------------------------------------------------------
# LoRA: low-rank adapters on the frozen linear layers of the blocks

# the linear layers an adapter can sit on, and the sub-module of a block that holds each
LORA_TARGETS = {"wq": "attention", "wk": "attention", "wv": "attention", "wo": "attention",
                "w1": "feed_forward", "w2": "feed_forward", "w3": "feed_forward"}


@dataclass
class LoRAArgs:
    """The shape of a run's adapters, as adapter.json records it (train's --lora_* flags)."""
    rank: int
    alpha: float
    dropout: float
    targets: tuple

    def __post_init__(self):
        if isinstance(self.targets, str):  # fire passes `--lora_targets wq` as a string, `wq,wv` as a tuple
            self.targets = tuple(t for t in self.targets.split(",") if t)
        self.targets = tuple(self.targets)

    def check(self):
        check_number(f"--lora_rank {self.rank!r}", self.rank, lambda v: v >= 1,
                     "a positive integer (8 or 16 are usual)", integer=True)
        check_number(f"--lora_alpha {self.alpha!r}", self.alpha, lambda v: 0 < v < math.inf,
                     "a number above 0 (the update is scaled by alpha / rank; 16 is usual)")
        check_number(f"--lora_dropout {self.dropout!r}", self.dropout, lambda v: 0 <= v < 1, "a number in [0, 1)")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"--lora_targets {','.join(map(str, self.targets))!r} must name each of some of "
                             f"{','.join(LORA_TARGETS)} once (unknown: {unknown})")
        return self


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, as in Hu et al. (2021) and torchtune's
    LoRALinear: y = x W^T + (alpha / rank) * dropout(x) A^T B^T, with A (rank, in) and B (out, rank) in
    float32. The frozen weight keeps its place and name (`layers.0.attention.wq.weight`), so a Meta
    checkpoint loads into it unchanged; the adapters add `...wq.lora_a.weight` and `...wq.lora_b.weight`."""

    def __init__(self, base, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        # QLoRA: the frozen weight in 4 bits (`wq.quantized.weight`, ...); else the weight under Meta's name
        self.quantized = base if isinstance(base, Int4Linear) else None
        if self.quantized is None:
            self.weight = base.weight.requires_grad_(False)
        device = base.weight.device
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # p=0 would still cost a mask
        self.scale = alpha / rank

    def reset_parameters(self, generator: Optional[torch.Generator] = None):
        """A as torchtune and peft draw it (kaiming-uniform, nn.Linear's own init), B zero: until the first
        update the adapter adds exactly 0, and the model computes what the base does."""
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x):
        y = F.linear(x, self.weight) if self.quantized is None else self.quantized(x)
        return y + self.scale * self.lora_b(self.lora_a(self.dropout(x)))

    def merged_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W + (alpha / rank) B A, computed in float32 and cast once, to dtype. (A QLoRA run's adapters are
        merged into the bf16 base they were trained from: `merge` reads that from its files.)"""
        delta = self.lora_b.weight.float() @ self.lora_a.weight.float()  # (out, in)
        return (self.weight.float() + self.scale * delta).to(dtype)


def lora_linears(model: Transformer) -> dict[str, LoRALinear]:
    """The adapted linears by their module name (`layers.0.attention.wq`)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(model: Transformer, lora: LoRAArgs, generator: Optional[torch.Generator] = None) -> Transformer:
    """Freeze every weight of the model and put an adapter on each target linear of every block (in place).
    Only the adapters are trainable; at step 0 the model's output is exactly the base's."""
    lora.check()
    model.requires_grad_(False)
    for layer in model.layers:
        for name in lora.targets:
            parent = getattr(layer, LORA_TARGETS[name])
            adapted = LoRALinear(getattr(parent, name), lora.rank, lora.alpha, lora.dropout)
            adapted.reset_parameters(generator)
            setattr(parent, name, adapted)
    return model


@torch.no_grad()
def merge_lora(model: Transformer, dtype: Optional[torch.dtype] = None) -> Transformer:
    """Fold every adapter into its weight (W + (alpha / rank) B A in float32, cast to dtype, default the
    weight's own) and put plain linears back: the model is a base Transformer again (in place)."""
    for name, m in lora_linears(model).items():
        parent_name, child = name.rsplit(".", 1)
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(dtype or m.weight.dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name), child, linear)
    return model


# -----------------------------------------------------------------------------
# QLoRA: the frozen base in 4 bits, dequantized in the forward and the backward pass
#
# A training step multiplies by W (the forward pass) and by W^T (the backward pass, for the input's gradient),
# for thousands of tokens at a time: the weights are dequantized to bf16 for the ordinary matmul, one linear
# layer at a time, rather than read by an int4 kernel made for one-token decoding.

class Int4Matmul(torch.autograd.Function):
    """x W^T for an Int4Linear's weights two to a byte (W dequantized in the forward and again in the
    backward): between the two only the 4-bit weight is kept, never a bf16 copy (for 70B, 140 GB). W is
    frozen: no gradient."""

    @staticmethod
    def forward(ctx, x, packed, scales_and_zeros, group_size: int):
        ctx.save_for_backward(packed, scales_and_zeros)
        ctx.group_size = group_size
        return F.linear(x, dequantize_int4(packed, scales_and_zeros, group_size, x.dtype))

    @staticmethod
    def backward(ctx, grad_y):
        packed, scales_and_zeros = ctx.saved_tensors
        return grad_y @ dequantize_int4(packed, scales_and_zeros, ctx.group_size, grad_y.dtype), None, None, None


def int4_linears(layer: TransformerBlock, group_size: int) -> dict[str, Int4Linear]:
    """Replace each linear layer of a block (in place) by an empty Int4Linear on the meta device, alone (not
    fused as for generation: an adapter may sit on any) and two to a byte (the layout Int4Matmul reads)."""
    int4 = {}
    for name, module in LORA_TARGETS.items():
        parent, linear = getattr(layer, module), getattr(getattr(layer, module), name)
        with torch.device("meta"):
            int4[name] = Int4Linear(linear.in_features, linear.out_features, (name,), group_size, tiled=False)
        setattr(parent, name, int4[name])
    return int4


@torch.no_grad()
def quantize_block(layer: TransformerBlock, device: torch.device, group_size: int = INT4_GROUP_SIZE):
    """Quantize the linear layers of a block with weights (in place) onto device, one weight at a time."""
    weights = {name: getattr(getattr(layer, module), name).weight for name, module in LORA_TARGETS.items()}
    for name, int4 in int4_linears(layer, group_size).items():
        int4.load_state_dict(int4.quantize(weights.pop(name).to(device)), assign=True)


def load_qlora_base(ckpt_dir: str, tokenizer_path: Optional[str], max_seq_len: int, max_batch_size: int,
                    device: torch.device, dtype: torch.dtype,
                    group_size: int) -> tuple[Transformer, Tokenizer, str]:
    """QLoRA's frozen base: the blocks' linear layers quantized to int4 as they are read (load_weights, one
    matrix at a time: neither the device nor the host holds the float model whole), the rest (embedding,
    norms, output layer) in dtype. Also the base's fingerprint, taken from its files."""
    args, sd, tokenizer = read_checkpoint(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size)
    fingerprint = base_fingerprint(args, sd)
    with torch.device("meta"):
        model = Transformer(args)
    for layer in model.layers:
        int4_linears(layer, group_size)
    load_weights(model, sd, str(ckpt_dir), device, dtype)
    bad = non_finite_keys(model.state_dict())
    if bad:
        raise ValueError(f"{ckpt_dir} holds non-finite weights ({bad[:4]}): training from it gives only NaN")
    return model.requires_grad_(False), tokenizer, fingerprint


# -----------------------------------------------------------------------------
# generation: prefill, decode step, sampling, text and chat completion

TEMPERATURE, TOP_P = 0.6, 0.9  # the sampling defaults of Meta's example scripts


def prefill(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt (which starts at position 0) through the model, filling the KV cache.
    tokens: (B, T); returns the logits of the last position, (B, vocab_size)."""
    return model(tokens, input_pos)[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One step: token (B, 1) at input_pos (1,) -> logits (B, vocab_size). This is the function that
    --compile turns into a single CUDA graph."""
    return model(token, input_pos)[:, -1]


def top_p_nucleus(probs: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The nucleus of Meta's sample_top_p: (probs_sort, probs_idx), each row's most probable tokens in
    descending order with those past the nucleus zeroed and the rest renormalised, and their token ids.
    probs: (B, vocab_size) float32.

    differs from Meta: Meta sorts all 128,256 probabilities every step (on a CPU most of a small model's
    sampling time). The nucleus is a prefix of that order, so the top k tokens hold it whenever they hold
    more than p together: every token after them has more than p before it. On a CPU k grows (256, 4096,
    then the whole vocabulary, which is Meta's code) until they do; the first k of Meta's running sums are
    the same numbers (a CPU cumsum adds one element at a time, in float64), so the same tokens are kept. On a
    GPU the whole sort takes a fraction of a millisecond and the check would cost a host sync per token."""
    V = probs.size(-1)
    for k in (256, 4096, V) if probs.device.type == "cpu" else (V,):
        probs_sort, probs_idx = torch.topk(probs, min(k, V), dim=-1)  # sorted, largest first
        probs_sum = torch.cumsum(probs_sort, dim=-1)
        # 1e-6 (8 float32 ulps at 1.0) covers the rounding of the float32 sums Meta compares with p
        if k >= V or bool((probs_sum[:, -1] > p + 1e-6).all()):
            break
    probs_sort[probs_sum - probs_sort > p] = 0.0  # drop tokens past the nucleus, keep the one crossing p
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    return probs_sort, probs_idx


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Nucleus sampling with the distribution of Meta's sample_top_p, drawing from an explicit generator.
    probs: (B, vocab_size) -> (B,) token ids."""
    probs_sort, probs_idx = top_p_nucleus(probs, p)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token).reshape(-1)


def sample_next(logits, temperature: float, top_p: float, generator: Optional[torch.Generator]):
    """logits (B, vocab_size) -> (B,) next tokens: greedy at temperature 0, else top-p."""
    if temperature > 0:
        return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator)
    return torch.argmax(logits, dim=-1)


class Llama:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.formatter = ChatFormat(tokenizer)
        self.compiled = compile
        # compiled, each decode step is one CUDA-graph replay; the prefill stays eager (its shape varies, and
        # its matmuls are large enough to run at full speed without compilation)
        self.decode = decode_one_token
        if compile:
            options = {"triton.cudagraphs": True}  # mode="reduce-overhead"
            self.decode = torch.compile(decode_one_token, fullgraph=True, options=options)

    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: Optional[str] = None, max_seq_len: int = 512, max_batch_size: int = 4,
              device: Optional[str] = None, dtype: Optional[str] = None, compile: bool = False,
              quantize: Optional[str] = None, group_size: int = INT4_GROUP_SIZE,
              lora_dir: Optional[str] = None) -> "Llama":
        """Load a Meta checkpoint directory (params.json + consolidated.NN.pth), a Hugging Face one
        (config.json + safetensors) or a training checkpoint of train (step_NNNNNN: DCP's .metadata and
        shards). device: cuda, then mps, then cpu by default; dtype: bfloat16 on a GPU that supports it, else
        float32. quantize: "int8" or "int4" (groups of group_size) weights, quantized tensor by tensor as they
        are read (see quantize_linears). Under torchrun with N processes, tensor-parallel: each process reads
        and runs its share of the model (see TensorParallel), on the GPU of its LOCAL_RANK. lora_dir: the
        adapters of a LoRA run on this base (its step_NNNNNN), kept apart from its (unquantized) weights;
        `merge` folds them in."""
        check_quantize(quantize, group_size)
        if quantize is not None and lora_dir is not None:
            raise ValueError("--lora_dir runs adapters on the base's own weights, not on --quantize'd ones; merge "
                             "them into the base first (llama31.py merge), then quantize that")
        tp, device = start_tensor_parallel(pick_device(device))
        if tp is not None and lora_dir is not None:
            raise ValueError("--lora_dir runs whole adapters in one process, not on a tensor-parallel share of the "
                             "base; under torchrun, merge them into the base first (llama31.py merge)")
        dtype = pick_dtype(dtype, device)
        t0 = time.time()
        model, tokenizer = load_model(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len,
                                      max_batch_size=max_batch_size, device=device, dtype=dtype, quantize=quantize,
                                      group_size=group_size, tp=tp)
        weights = f"{quantize} weights, " if quantize else ""
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB" if device.type == "cuda" else ""
        share = f" on each of {tp.world} tensor-parallel processes" if tp else ""
        print0(f"loaded {ckpt_dir} ({model_bytes(model, dtype) / 2 ** 30:.2f} GiB{share}, {weights}{dtype}, {device}"
               f"{peak}) in {time.time() - t0:.1f}s", file=sys.stderr)
        if lora_dir is not None:
            load_lora(model, lora_dir, ckpt_dir, dtype)
        model.eval()
        if quantize is None:
            model.fuse_weights()  # (quantized linears are fused as they are made; adapted ones never)
        return Llama(model, tokenizer, compile=compile)

    def check_sampling(self, temperature: float, top_p: float):
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")

    def check_prompts(self, prompt_tokens: list[list[int]], max_gen_len: int):
        params = self.model.params
        if not 1 <= len(prompt_tokens) <= params.max_batch_size:
            raise ValueError(f"{len(prompt_tokens)} prompts given, but max_batch_size is {params.max_batch_size}; "
                             "pass a larger --max_batch_size or fewer prompts")
        lengths = [len(t) for t in prompt_tokens]
        if min(lengths) < 1:
            raise ValueError("an empty prompt was given; every prompt needs at least one token")
        if max(lengths) >= params.max_seq_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room to generate within "
                             f"max_seq_len={params.max_seq_len}; pass a larger --max_seq_len or a shorter prompt")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len={max_gen_len} must be at least 1")

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = TEMPERATURE,
                 top_p: float = TOP_P, echo: bool = False, sample_rng: Optional[torch.Generator] = None,
                 on_token: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> list[list[int]]:
        """Complete a batch of token lists of different lengths, each stopping at its first stop token.
        Returns the new tokens of each prompt (with the prompt too if echo), without the stop token.
        on_token(tokens (B,), is_new (B,)) is called after every step, for streaming; is_new is False
        for rows still inside their prompt.

        As in Meta's loop, every row advances by one position per step from the shortest prompt's end;
        a row still inside its prompt takes its prompt token instead of the sampled one."""
        params = self.model.params
        self.check_sampling(temperature, top_p)
        self.check_prompts(prompt_tokens, max_gen_len)
        bsz, lengths = len(prompt_tokens), [len(t) for t in prompt_tokens]
        min_len, max_len = min(lengths), max(lengths)
        total_len = min(params.max_seq_len, max_gen_len + max_len)

        device = self.model.tok_embeddings.weight.device
        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        prompt_len = torch.tensor(lengths, device=device)
        in_prompt = torch.arange(total_len, device=device)[None, :] < prompt_len[:, None]  # (B, total_len)
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=device)
        done = torch.zeros(bsz, dtype=torch.bool, device=device)

        self.model.setup_caches(bsz, params.max_seq_len)
        try:
            logits = prefill(self.model, tokens[:, :min_len], torch.arange(min_len, device=device))
            input_pos = torch.tensor([min_len - 1], device=device)
            for cur_pos in range(min_len, total_len):
                if cur_pos > min_len:
                    input_pos += 1  # in place on the device: no host-to-device copy per token
                    logits = self.decode(self.model, tokens[:, cur_pos - 1: cur_pos], input_pos)
                next_token = sample_next(logits, temperature, top_p, sample_rng)
                next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                done |= ~in_prompt[:, cur_pos] & torch.isin(next_token, stop_tokens)
                if on_token is not None:
                    on_token(next_token, ~in_prompt[:, cur_pos])
                # stop tokens are checked on the device; the host looks only every 16 steps
                if cur_pos % 16 == 0 and bool(done.all()):
                    break
        finally:
            if not self.compiled:  # a compiled decode keeps its cache so its CUDA graph stays valid
                self.model.clear_caches()

        out = []
        for i, row in enumerate(tokens.tolist()):
            start = 0 if echo else lengths[i]
            row = row[start: lengths[i] + max_gen_len]
            stops = [j for j, t in enumerate(row) if t in self.tokenizer.stop_tokens]
            out.append(row[: stops[0]] if stops else row)
        return out

    def text_completion(self, prompts: list[str], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = TEMPERATURE, top_p: float = TOP_P, max_gen_len: Optional[int] = None,
                        echo: bool = False) -> list[dict]:
        """Complete each prompt (a base model's task). Returns [{"generation": str}, ...]."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        out = self.generate(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, echo=echo,
                            sample_rng=sample_rng)
        return [{"generation": self.tokenizer.decode(t)} for t in out]

    def chat_completion(self, dialogs: list[list[dict]], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = TEMPERATURE, top_p: float = TOP_P, max_gen_len: Optional[int] = None,
                        on_token=None) -> list[dict]:
        """Answer each dialog (a list of {"role", "content"} messages) as the assistant (an Instruct
        model's task). Returns [{"generation": {"role": "assistant", "content": str}}, ...]."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        out = self.generate(prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, sample_rng=sample_rng,
                            on_token=on_token)
        return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}} for t in out]


# -----------------------------------------------------------------------------
# checkpoint loading and saving (Meta's format)


def load_model(ckpt_dir: str | Path, tokenizer_path: Optional[str] = None, max_seq_len: int = 2048,
               max_batch_size: int = 1, device: torch.device = torch.device("cpu"),
               dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None,
               group_size: int = INT4_GROUP_SIZE, tp: Optional[TensorParallel] = None) -> tuple[Transformer, Tokenizer]:
    """The model and tokenizer of a Meta checkpoint directory (params.json + consolidated.NN.pth), a Hugging
    Face one (config.json + safetensors) or a training checkpoint of train (step_NNNNNN), built on the meta
    device and loaded strictly, each weight moved to device once. max_seq_len / max_batch_size size the RoPE
    table and KV caches.
    dtype: the weights' dtype on device; None keeps the checkpoint's own (convert does). Llama.build and
    the commands choose it with pick_dtype (bfloat16 on a GPU that has it, else float32); train uses its
    master dtype. The weights are read tensor by tensor (CheckpointWeights), quantized as they are read with
    quantize="int8" or "int4" (see quantize_linears), after a check that they fit the GPU (check_memory).
    tp: tensor parallelism, this rank's share of the model only, read from its slices of the files."""
    args, sd, tokenizer = read_checkpoint(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size)
    if tp is not None:
        tp.check(args, ckpt_dir, quantize, group_size)
    model = meta_model(args, quantize, group_size, device, tp=tp)
    check_memory(model, device, dtype, str(ckpt_dir), group_size, tp=tp)
    load_weights(model, sd, str(ckpt_dir), device, dtype, tp)
    return model, tokenizer


def read_checkpoint(ckpt_dir: str | Path, tokenizer_path: Optional[str], max_seq_len: int,
                    max_batch_size: int) -> tuple[ModelArgs, "CheckpointWeights", Tokenizer]:
    """The model arguments, the weights (not yet read) and the tokenizer of a checkpoint directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist (or is not a directory)")
    if not any(ckpt_dir.iterdir()):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} is empty: expected params.json and "
                                "consolidated.00.pth (Meta) or config.json and *.safetensors (Hugging Face)")
    if (ckpt_dir / "adapter.json").exists():
        raise ValueError(f"{ckpt_dir} holds LoRA adapters, not a model: pass it as --lora_dir, with the base it "
                         "was trained on as --ckpt_dir")
    runtime = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    is_hf = (ckpt_dir / "config.json").exists()
    if is_training_checkpoint(ckpt_dir):  # a step_NNNNNN directory of train: its weights (the rest is --resume's)
        args, sd = read_training_checkpoint(ckpt_dir, **runtime)
    else:
        args, sd = (read_hf_checkpoint if is_hf else read_meta_checkpoint)(ckpt_dir, **runtime)
    tokenizer = Tokenizer(resolve_tokenizer_path(ckpt_dir, tokenizer_path))
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(f"{ckpt_dir} has vocab_size={args.vocab_size} but the tokenizer has {tokenizer.n_words} "
                         "tokens; pass the checkpoint's own --tokenizer_path")
    return args, sd, tokenizer


def meta_model(args: ModelArgs, quantize: Optional[str], group_size: int, device: torch.device,
               quantize_output: bool = True, tp: Optional[TensorParallel] = None) -> Transformer:
    """The model built on the meta device (no memory), its linears quantized for device if asked; with tp,
    this rank's share of it, with its collectives."""
    with torch.device("meta"):
        model = Transformer(args)
    if tp is not None:
        tp.shard(model)
    if quantize:
        quantize_linears(model, quantize, group_size, device, quantize_output)
    if tp is not None:
        tp.add_collectives(model)
    return model


def model_bytes(model: Transformer, dtype: torch.dtype) -> int:
    """The bytes of a model's parameters in dtype and of its buffers in theirs (quantized weights, scales),
    counted on the meta device as well as on any other."""
    return (sum(p.numel() for p in model.parameters()) * dtype.itemsize  # parameters(): a tied weight once
            + sum(b.numel() * b.element_size() for b in model.buffers()))


def check_memory(model: Transformer, device: torch.device, dtype: Optional[torch.dtype], source: str,
                 group_size: int, free: Optional[int] = None, tp: Optional[TensorParallel] = None):
    """Refuse, before reading any weight, a model (on the meta device) that the GPU cannot run: int4 weights on
    a GPU older than Ampere, or weights and KV cache beyond its free memory (free bytes: the device's own by
    default), instead of failing minutes into loading. Tensor-parallel (tp), this rank's share and GPU."""
    if device.type != "cuda":
        return
    int4 = any(isinstance(m, Int4Linear) for m in model.modules())
    if int4 and (capability := torch.cuda.get_device_capability(device)) < (8, 0):
        raise ValueError(f"--quantize int4 on a GPU needs compute capability 8.0 or more (its kernel multiplies on "
                         f"bf16 tensor cores); the {torch.cuda.get_device_name(device)} has "
                         f"{'.'.join(map(str, capability))}: use --quantize int8")
    args, dtype = model.params, dtype or torch.bfloat16
    kv_heads = model.layers[0].attention.n_kv_heads  # this rank's, tensor-parallel
    kv_cache = 2 * args.n_layers * args.max_batch_size * args.max_seq_len * kv_heads * args.head_dim * dtype.itemsize
    need = model_bytes(model, dtype) + kv_cache
    if free is None:  # the device's free memory and what this process holds cached but unused
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(
            device)
    if need > free:
        options = {q: model_bytes(meta_model(args, q, group_size, device, tp=tp), dtype) for q in QUANTIZE_CHOICES}
        raise ValueError(
            f"{source} needs {need / 2 ** 30:.1f} GiB of GPU memory (weights and a KV cache of "
            f"{args.max_batch_size} x {args.max_seq_len} tokens), but {device} has {free / 2 ** 30:.1f} GiB free; "
            f"--quantize int8 needs {options['int8'] / 2 ** 30:.1f} GiB for the weights and int4 "
            f"{options['int4'] / 2 ** 30:.1f} GiB (sample, chat and eval take --quantize)")


def resolve_tokenizer_path(ckpt_dir: Optional[Path], tokenizer_path: Optional[str]) -> Path:
    """--tokenizer_path, else the checkpoint's own tokenizer.model (Meta's download and our checkpoints
    bring one), else the one shipped in the llama-models package."""
    if tokenizer_path is not None:
        return Path(tokenizer_path)
    local = Path(ckpt_dir) / "tokenizer.model" if ckpt_dir is not None else None
    return local if local is not None and local.exists() else default_tokenizer_path()


def load_torch_file(path, weights: bool = True):
    """A state dict (or, weights=False, any object of tensors and plain types), memory-mapped and with
    weights_only=True: nothing in the file can run code."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file; all mean the same here
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if weights and (not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values())):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return sd


# How Meta's model-parallel files (consolidated.00.pth ... .NN.pth) split each weight: column-parallel
# weights are cut along their output dim 0, row-parallel ones along their input dim 1; norms are whole in
# every file.
COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                   "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


class CheckpointWeights(Mapping):
    """A checkpoint's weights under Meta's names, read from the (memory-mapped) files only when asked for:
    whole (`weights[name]`), or one of `world` equal slices along `dim` (`weights.read(name, dim, rank,
    world)`), touching only the files and bytes that slice lies in. Shapes and dtypes are known without
    reading. Loading tensor by tensor (quantized, with one matrix in memory at a time) is built on it, and
    so is tensor parallelism (a rank reads only its slices)."""

    def __init__(self, shapes: dict, dtypes: dict, read: Callable[[str, Optional[int], int, int], torch.Tensor]):
        self.shapes, self.dtypes = shapes, dtypes
        self._read = read  # read(name, dim, start, stop): rows/columns start:stop along dim (dim None: whole)

    @classmethod
    def from_dict(cls, sd: dict) -> "CheckpointWeights":
        return cls({k: v.shape for k, v in sd.items()}, {k: v.dtype for k, v in sd.items()},
                   lambda k, dim, start, stop: sd[k] if dim is None else sd[k].narrow(dim, start, stop - start))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self._read(name, None, 0, 0)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def read(self, name: str, dim: Optional[int] = None, rank: int = 0, world: int = 1) -> torch.Tensor:
        if dim is None:
            return self[name]
        size = self.shapes[name][dim]
        if size % world:
            raise ValueError(f"{name} has {size} entries along dim {dim}, which do not split into {world} equal "
                             "slices")
        return self._read(name, dim, rank * size // world, (rank + 1) * size // world)


def read_meta_checkpoint(ckpt_dir: Path, **runtime) -> tuple[ModelArgs, CheckpointWeights]:
    params_path = ckpt_dir / "params.json"
    if not params_path.exists():
        raise FileNotFoundError(f"{ckpt_dir} has no params.json: a Meta checkpoint directory holds params.json "
                                "and consolidated.00.pth (a Hugging Face one holds config.json)")
    args = ModelArgs.from_params(read_json(params_path), str(params_path), **runtime)
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise FileNotFoundError(f"{ckpt_dir} has params.json but no consolidated.NN.pth weight files")
    expected = [f"consolidated.{i:02d}.pth" for i in range(len(paths))]
    if [p.name for p in paths] != expected:
        raise ValueError(f"the weight files in {ckpt_dir} do not fit together: found "
                         f"{[p.name for p in paths]}, expected {expected}")
    shards = [load_torch_file(p) for p in paths]  # memory-mapped: nothing is read until a tensor is used
    for sd in shards:
        sd.pop("rope.freqs", None)  # Llama 2's precomputed RoPE table; recomputed here
    for p, sd in zip(paths[1:], shards[1:]):
        if sd.keys() != shards[0].keys():
            diff = sorted(map(str, set(sd) ^ set(shards[0])))[:5]
            raise ValueError(f"{p} and {paths[0]} hold different weights (e.g. {diff}): not parts of one checkpoint")
    cat_dims, shapes = {}, {}  # the dim along which each weight's parts are joined (None: whole in file 0)
    for key in shards[0]:
        parts = [sd[key] for sd in shards]
        shapes[key], cat_dims[key] = parts[0].shape, None
        if len(shards) > 1 and key.endswith(COLUMN_PARALLEL + ROW_PARALLEL):
            dim = cat_dims[key] = 0 if key.endswith(COLUMN_PARALLEL) else 1
            other = 1 - dim
            if any(t.ndim != 2 or t.shape[other] != parts[0].shape[other] for t in parts):
                raise ValueError(f"{key} has shapes {[tuple(t.shape) for t in parts]} across {ckpt_dir}'s files, "
                                 f"which cannot be joined along dim {dim}: the files do not fit together")
            shapes[key] = torch.Size([sum(t.shape[0] for t in parts), parts[0].shape[1]] if dim == 0 else
                                     [parts[0].shape[0], sum(t.shape[1] for t in parts)])

    def read(key, dim, start, stop):
        parts, cat = [sd[key] for sd in shards], cat_dims[key]
        if cat is None:  # one file, or a weight every file holds whole (norms)
            return parts[0] if dim is None else parts[0].narrow(dim, start, stop - start)
        if dim is None:
            return torch.cat(parts, dim=cat)
        if dim != cat:  # a slice across the cut: a piece of every file
            return torch.cat([t.narrow(dim, start, stop - start) for t in parts], dim=cat)
        pieces, offset = [], 0  # a slice along the cut: only the files it overlaps
        for t in parts:
            lo, hi = max(start, offset), min(stop, offset + t.shape[cat])
            if lo < hi:
                pieces.append(t.narrow(cat, lo - offset, hi - lo))
            offset += t.shape[cat]
        return torch.cat(pieces, dim=cat) if len(pieces) > 1 else pieces[0]
    return args, CheckpointWeights(shapes, {k: t.dtype for k, t in shards[0].items()}, read)


def non_finite_keys(sd: dict) -> list:
    """The names of the tensors in sd that hold a NaN or an infinity."""
    return [k for k, v in sd.items() if not torch.isfinite(v).all()]


def load_weights(model: Transformer, sd: Mapping, source: str, device: torch.device, dtype: Optional[torch.dtype],
                 tp: Optional[TensorParallel] = None):
    """Load sd (Meta's names: a dict, or CheckpointWeights read tensor by tensor) strictly into a model built
    on the meta device, moving each tensor to device/dtype once (dtype None keeps the checkpoint's own, for
    convert). The quantized linears of a model made by quantize_linears get their float weights one matrix
    at a time, quantized on the device: the float model is never whole in memory. Tensor-parallel (tp), the
    model is this rank's share and each weight is read as this rank's slice: no rank reads the whole model."""
    if not isinstance(sd, CheckpointWeights):
        sd = CheckpointWeights.from_dict(sd)
    tie = model.params.tie_word_embeddings

    def name_in_sd(k):  # tied: the output layer is the embedding, whatever the file holds under output.weight
        return "tok_embeddings.weight" if tie and k == "output.weight" else k
    with torch.device("meta"):
        expected = Transformer(model.params).state_dict()  # the float model's names and shapes
    present = (set(sd) | {"output.weight"}) if tie else set(sd)
    missing = sorted(set(expected) - present)
    unexpected = sorted(map(str, present - set(expected)))  # map(str): a foreign file may have other keys
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model its config describes: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, t in expected.items():
        shape, dtype_k = sd.shapes[name_in_sd(k)], sd.dtypes[name_in_sd(k)]
        if shape != t.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(shape)}, but the config implies {tuple(t.shape)}")
        if not (isinstance(dtype_k, torch.dtype) and dtype_k.is_floating_point):
            raise ValueError(f"{source}: {k} has dtype {dtype_k}; weights must be floating point")

    def get(k, dtype):  # one float weight (or this rank's slice of it), read from disk now, on the device
        name = name_in_sd(k)
        t = sd[name] if tp is None else sd.read(name, tp.split_dim(name, model.params), tp.rank, tp.world)
        return t.to(device=device, dtype=dtype or t.dtype)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            # quantized from the checkpoint's own values (not from a bf16 copy of float32 weights), so a model
            # quantizes to the same integers whatever dtype it runs in
            parent = name.rpartition(".")[0]
            w = torch.cat([get(f"{parent}.{s}.weight".lstrip("."), None) for s in module.sources])
            state.update({f"{name}.{k}": v for k, v in module.quantize(w).items()})
            del w  # freed before the next matrix is read
    for k in model.state_dict():
        if k not in state:
            state[k] = state["tok_embeddings.weight"] if tie and k == "output.weight" else get(k, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tie and isinstance(model.output, nn.Linear):
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()


def atomic_write(path: Path, write: Callable[[Path], None]):
    """write(tmp) then rename onto path: a reader (or a run killed mid-write) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        usual_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def usual_file_mode(path: Path):
    """The mode open() gives a new file (0644 under the usual umask 022), whatever the writer chose:
    safetensors' save_file writes 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_dir_atomically(out_dir: Path, files: dict):
    """Write each files[name](path) into a temporary directory beside out_dir, fsync, then rename it to
    out_dir: a reader never sees a half-written directory. An existing out_dir is never replaced: one
    directory cannot be swapped for another in one atomic rename, and a crash between two renames would
    leave neither under its name."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists; choose another output directory or remove it first")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        for name, write in files.items():
            write(tmp / name)
            with open(tmp / name, "rb+") as f:
                os.fsync(f.fileno())
            usual_file_mode(tmp / name)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp)  # a failed write (disk full, interrupt) leaves nothing behind
        raise
    parent = os.open(out_dir.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def save_checkpoint(model: Transformer, out_dir: Path, tokenizer_path: Path):
    """Write a Meta-format checkpoint directory (params.json, consolidated.00.pth, tokenizer.model) that
    Llama.build and Meta's reference both load. It is built under a temporary name and renamed into place
    when whole, so a kill leaves the whole checkpoint or none, never a half-written one; an existing out_dir
    is refused, never overwritten. Weights are saved in their own dtype. (train writes training checkpoints
    with DCP instead, and export turns them into this format tensor by tensor.)"""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # tied weights stored twice:
    # Meta's reference needs output.weight, and clone() unshares them so torch.save keeps both
    bad = non_finite_keys(sd)
    if bad:  # a checkpoint is what a run falls back to: never let one hold NaN or inf
        raise FloatingPointError(f"not saving {out_dir}: the weights {bad[:4]} hold non-finite values")
    files = {"params.json": lambda p: p.write_text(json.dumps(model.params.to_params(), indent=2)),
             "consolidated.00.pth": lambda p: torch.save(sd, p),
             "tokenizer.model": lambda p: shutil.copyfile(tokenizer_path, p)}
    write_dir_atomically(out_dir, files)


# -----------------------------------------------------------------------------
# Hugging Face checkpoints and convert


# Hugging Face's names for Meta's weights; q and k are also permuted (see hf_permute)
HF_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}
HF_LAYER_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                  "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                  "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                  "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                  "ffn_norm": "post_attention_layernorm"}


def hf_name(meta_name: str) -> str:
    if meta_name in HF_NAMES:
        return HF_NAMES[meta_name]
    _, i, rest = meta_name.split(".", 2)  # layers.{i}.{module}.weight
    return f"model.layers.{i}.{HF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def hf_permute(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Hugging Face's rotate-half RoPE pairs dimension i with i + head_dim/2, Meta's pairs 2i with 2i+1:
    the rows of wq and wk are reordered within each head to match. inverse=True goes back to Meta's."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    if inverse:
        return w.view(n_heads, 2, half, cols).transpose(1, 2).reshape(rows, cols)
    return w.view(n_heads, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_layout(meta_name: str, w: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    """Weight meta_name of Meta's layout in Hugging Face's: wq and wk rows permuted to rotate-half pairs."""
    if meta_name.endswith(("wq.weight", "wk.weight")):
        return hf_permute(w, args.n_heads if "wq" in meta_name else args.n_kv_heads)
    return w


def meta_ffn_args(dim: int, width: int) -> dict:
    """The multiple_of / ffn_dim_multiplier of Meta's published models that give this SwiGLU width, so
    a converted params.json reads right in Meta's code too: a published shape's own values (Meta's
    params.json), else the first pair of the published values that fits, else an explicit ffn_hidden_dim."""
    for shape in PRESETS.values():
        if shape["dim"] == dim and ModelArgs(**shape).hidden_dim == width:
            return dict(multiple_of=shape["multiple_of"], ffn_dim_multiplier=shape.get("ffn_dim_multiplier"))
    for multiple_of in (256, 1024, 4096, 16, 32, 64, 128, 512, 2048):
        for multiplier in (None, 1.0, 1.2, 1.3, 1.5):
            args = dict(multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
            if ModelArgs(dim=dim, n_heads=1, **args).hidden_dim == width:
                return args
    return dict(ffn_hidden_dim=width)


def read_hf_checkpoint(ckpt_dir: Path, **runtime) -> tuple[ModelArgs, CheckpointWeights]:
    """A transformers LlamaForCausalLM directory: config.json + model.safetensors (or shards listed in
    model.safetensors.index.json), in Meta's layout and names, read tensor by tensor."""
    args = hf_model_args(ckpt_dir / "config.json", **runtime)
    return args, read_hf_weights(ckpt_dir, args)


def hf_model_args(path: Path, **runtime) -> ModelArgs:
    """ModelArgs from a transformers config.json of a Llama model. `runtime` sets max_seq_len /
    max_batch_size."""
    config = read_json(path)
    if not isinstance(config, dict) or config.get("model_type") != "llama":
        found = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{path} does not describe a Llama model (model_type {found!r}, expected 'llama')")
    try:
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        if type(dim) is not int or type(n_heads) is not int or dim < 1 or n_heads < 1:
            raise ValueError(f"{path}: hidden_size {dim!r} and num_attention_heads {n_heads!r} must be positive "
                             "integers")
        if config.get("head_dim", dim // n_heads) != dim // n_heads:
            raise ValueError(f"{path}: head_dim {config['head_dim']} != hidden_size / num_attention_heads")
        if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{path}: biases or an activation other than silu are not Llama 3's")
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}  # transformers 5.x or 4.x
        if not isinstance(rope, dict):
            raise ValueError(f"{path}: rope_scaling {rope!r} must be an object")
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{path}: RoPE type {rope_type!r} is not supported (default or llama3)")
        args = ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads", n_heads), vocab_size=config["vocab_size"],
            norm_eps=config.get("rms_norm_eps", 1e-5),
            rope_theta=rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            use_scaled_rope=rope_type == "llama3", rope_scale_factor=rope.get("factor", 8.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_old_context_len=rope.get("original_max_position_embeddings", 8192),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            **meta_ffn_args(dim, config["intermediate_size"]), **runtime)
    except KeyError as e:
        raise ValueError(f"{path} lacks the key {e}") from None
    except TypeError as e:
        raise ValueError(f"{path} has a value of the wrong type ({e})") from None
    return args


def read_hf_weights(ckpt_dir: Path, args: ModelArgs) -> CheckpointWeights:
    """The weights of model.safetensors (or the shards its index lists) under Meta's names and layout (q and k
    permuted back to Meta's RoPE pairing as they are read), each checked against the shape args implies:
    the files' headers are read now, each weight (or a rank's slice of it) when it is asked for."""
    from safetensors import SafetensorError, safe_open
    index = ckpt_dir / "model.safetensors.index.json"
    weight_map = read_json(index) if index.exists() else {"weight_map": {"*": "model.safetensors"}}
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    # file names only: an index does not get to point outside its directory
    if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n and Path(n).name == n
                                                   for n in weight_map.values()):
        raise ValueError(f"{index} needs a weight_map of weight names to file names in {ckpt_dir}")
    files = sorted(set(weight_map.values()))
    handles = {}  # each weight's Hugging Face name -> its open file, whose header alone has been read so far
    for name in files:
        if not (ckpt_dir / name).exists():
            raise FileNotFoundError(f"{ckpt_dir} lacks {name}, which its config or index names")
        try:
            f = safe_open(ckpt_dir / name, framework="pt")  # safetensors: plain tensors, nothing to execute
            handles.update({key: f for key in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{ckpt_dir / name} is not a readable safetensors file ({e})") from None
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    sd_shapes, sd_dtypes, hf_names = {}, {}, {}
    for meta, shape in shapes.items():
        key = hf_name(meta)
        if key not in handles:
            if meta == "output.weight" and args.tie_word_embeddings:
                continue
            raise ValueError(f"{ckpt_dir} lacks the weight {key}")
        f = handles.pop(key)
        w = f.get_slice(key)
        if tuple(w.get_shape()) != shape:
            raise ValueError(f"{ckpt_dir}: {key} has shape {tuple(w.get_shape())}, but the config implies "
                             f"{tuple(shape)}")
        sd_shapes[meta], hf_names[meta] = shape, (key, f)
        sd_dtypes[meta] = SAFETENSORS_DTYPES.get(w.get_dtype(), w.get_dtype())
    handles = {k: v for k, v in handles.items() if not k.endswith("rotary_emb.inv_freq")}
    if handles:
        raise ValueError(f"{ckpt_dir} holds weights this model does not have: {sorted(handles)[:8]}")

    def read(meta, dim, start, stop):
        key, f = hf_names[meta]
        w = f.get_slice(key)
        heads = args.n_heads if meta.endswith("wq.weight") else args.n_kv_heads if meta.endswith("wk.weight") else 0
        if heads and dim == 0:  # q and k are permuted within each head: read the whole heads the rows lie in
            head_dim = sd_shapes[meta][0] // heads
            lo, hi = start // head_dim * head_dim, -(-stop // head_dim) * head_dim
            return hf_permute(w[lo:hi], (hi - lo) // head_dim, inverse=True)[start - lo: stop - lo]
        index = [slice(None)] * len(sd_shapes[meta])
        if dim is not None:
            index[dim] = slice(start, stop)
        t = w[tuple(index)]
        return hf_permute(t, heads, inverse=True) if heads else t
    return CheckpointWeights(sd_shapes, sd_dtypes, read)


# safetensors' names of the float dtypes; a weight of any other is refused by load_weights, which names it
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def hf_config(args: ModelArgs, dtype: torch.dtype) -> dict:
    """A transformers config.json for these arguments (rope_scaling + rope_theta, which transformers 4.x
    writes and 5.x still reads)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
              "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "hidden_act": "silu", "max_position_embeddings": 131072 if args.use_scaled_rope else 8192,
              "tie_word_embeddings": args.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": BOS_ID, "eos_token_id": [128001, 128008, 128009],
              "torch_dtype": str(dtype).removeprefix("torch.")}
    if args.use_scaled_rope:
        config["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_scale_factor,
                                  "low_freq_factor": args.rope_low_freq_factor,
                                  "high_freq_factor": args.rope_high_freq_factor,
                                  "original_max_position_embeddings": args.rope_old_context_len}
    return config


def convert(ckpt_dir: str, out_dir: str, to: str = "hf", tokenizer_path: Optional[str] = None):
    """Convert a checkpoint directory: Meta to Hugging Face (--to hf: config.json + model.safetensors, for
    transformers or vLLM) or Hugging Face to Meta (--to meta: params.json + consolidated.00.pth +
    tokenizer.model). Weights keep their dtype. The output directory appears whole or not at all.

    Args:
        ckpt_dir: the checkpoint directory to convert
        out_dir: the directory to write; it must not exist yet (or be empty)
        to: hf (Hugging Face) or meta (Meta's format)
        tokenizer_path: the tokenizer.model to copy; by default the checkpoint's own, else Llama 3's
    """
    if to not in ("hf", "meta"):
        raise ValueError(f"--to {to!r} must be hf or meta")
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    model, _ = load_model(ckpt_dir, tokenizer_path)  # on the CPU, in the checkpoint's dtype
    save = save_checkpoint if to == "meta" else save_hf_checkpoint
    save(model, out_dir, resolve_tokenizer_path(ckpt_dir, tokenizer_path))
    print_written(out_dir)


def save_hf_checkpoint(model: Transformer, out_dir: Path, tokenizer_path: Path):
    """Write config.json + model.safetensors (+ tokenizer.model) that transformers' LlamaForCausalLM loads,
    atomically like save_checkpoint."""
    from safetensors.torch import save_file
    hf = {}
    for k, v in model.state_dict().items():
        if k == "output.weight" and model.params.tie_word_embeddings:
            continue  # transformers ties lm_head to the embedding itself
        hf[hf_name(k)] = hf_layout(k, v, model.params).contiguous()
    write_dir_atomically(out_dir, {
        "config.json": lambda p: p.write_text(json.dumps(hf_config(model.params, model.output.weight.dtype),
                                                           indent=2)),
        "model.safetensors": lambda p: save_file(hf, p, metadata={"format": "pt"}),
        "tokenizer.model": lambda p: shutil.copyfile(tokenizer_path, p)})


def print_written(out_dir: Path):
    sizes = ", ".join(f"{p.name} ({p.stat().st_size / 1e6:,.1f} MB)" for p in sorted(out_dir.iterdir()))
    print(f"wrote {out_dir}: {sizes}", file=sys.stderr)


# -----------------------------------------------------------------------------
# training checkpoints: sharded and asynchronous with torch.distributed.checkpoint (DCP); export to one file

# A run's out_dir/step_NNNNNN/ is a DCP directory. Every rank writes its own shards in parallel (__R_N.distcp:
# under FSDP its 1/world of every weight and AdamW moment; under DDP a share of the replicated tensors, each
# written once), and rank 0 writes DCP's index .metadata (which chunk of which tensor lies where in which
# file), params.json and tokenizer.model. It holds tensors only, so loading it unpickles no Python object:
#   model.*      the weights as trained (float32 master weights) under Meta's names; a tied output.weight is
#                left out (it is the embedding)
#   optimizer.*  AdamW's step, exp_avg and exp_avg_sq of every parameter, by name (its settings come from flags)
#   train.*      the step and the data position (a shard, and where in it the next step starts)
# Any number of processes can load it: each reads the chunks that overlap what it holds (DCP reshards).
# It is not one file to hand around: `export` streams its weights into a Meta or Hugging Face checkpoint.
# A LoRA run's step directory is the same but for model.*, which holds only the adapters (`...wq.lora_a.weight`,
# float32), and optimizer.*, only theirs; adapter.json (the LoRAArgs, the base's path and fingerprint) stands
# in for params.json and tokenizer.model: megabytes, where the base is gigabytes (see "LoRA adapters on disk").

DCP_METADATA = ".metadata"  # its presence is what marks a training checkpoint directory

# The globals DCP's .metadata pickle names. DCP reads that file with pickle.load, which runs whatever code a
# crafted file names, so check_dcp_metadata reads it opcode by opcode first (pickletools parses, runs nothing).
DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath"},
    "torch": {"Size"} | {name for name, v in vars(torch).items() if isinstance(v, torch.dtype)},
}


def is_training_checkpoint(ckpt_dir: Path) -> bool:
    return (Path(ckpt_dir) / DCP_METADATA).is_file()


def check_dcp_metadata(path: Path):
    """Refuse a .metadata pickle that names a global other than DCP's metadata classes (or is no pickle)."""
    try:
        ops = list(pickletools.genops(path.read_bytes()))
    except Exception as e:  # pickletools raises several types for bytes that are no pickle
        raise ValueError(f"{path} is not DCP metadata ({type(e).__name__}: {e})") from None
    memo, pushed = {}, [None, None]  # pushed: what each op put on the stack, None where not a string
    for op, arg, _ in ops:
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
            pushed.append(arg)
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(arg))
        elif op.name == "MEMOIZE":  # stores the stack's top, as pickle does, at the next free index
            memo[len(memo)] = pushed[-1]
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1]
        elif op.name not in ("PROTO", "FRAME"):  # these two leave the stack alone; every other op may change it
            # a global's module and name must be its argument (GLOBAL) or the two strings pushed just before
            # (STACK_GLOBAL); an object made any other way (INST, OBJ, EXT*) is refused
            module, name = (arg.split(" ", 1) if op.name == "GLOBAL" else pushed[-2:] if op.name == "STACK_GLOBAL"
                            else (None, None))
            if op.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4") and \
                    name not in DCP_METADATA_GLOBALS.get(module, ()):
                raise ValueError(f"{path} names {module}.{name}, which is not part of DCP's metadata: refused "
                                 "unread, as it could run code")
            pushed.append(None)


@functools.cache
def dcp_io() -> tuple[type, type]:
    """DCP's file reader and load planner, made safe; defined on first use, since importing
    torch.distributed.checkpoint would cost every command half a second."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class CheckpointReader(FileSystemReader):
        """Checks the .metadata pickle before DCP unpickles it (once per reader: export reads a checkpoint
        with one reader, a tensor per dcp.load)."""
        checked = False

        def read_metadata(self, *args, **kwargs):
            if not self.checked:
                check_dcp_metadata(Path(self.path) / DCP_METADATA)
                self.checked = True
            return super().read_metadata(*args, **kwargs)

    class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
        """Refuses pickled objects (DCP would unpickle them with weights_only=False)."""

        def load_bytes(self, read_item, value):
            raise ValueError(f"{read_item.dest_index.fqn} is a pickled object, but a training checkpoint holds "
                             "only tensors: refused unread")
    return CheckpointReader, TensorsOnlyLoadPlanner


def checkpoint_reader(path):
    return dcp_io()[0](path)


def tensors_only_planner(**kwargs):
    return dcp_io()[1](**kwargs)


@contextlib.contextmanager
def dcp_errors(ckpt_dir: Path):
    """DCP wraps each rank's failure in a CheckpointException, a BaseException that the CLI's one-line errors
    would miss: raise the first underlying one instead (an OSError as it is, the rest as a ValueError naming
    the checkpoint)."""
    from torch.distributed.checkpoint.api import CheckpointException
    try:
        yield
    except CheckpointException as e:
        error = next(iter(e.failures.values()))[0]
        if isinstance(error, (OSError, ValueError, FloatingPointError)):
            raise error from None
        raise ValueError(f"{ckpt_dir} does not fit: {type(error).__name__}: {error}") from None


def non_finite_anywhere(weights: dict, group: Optional[dist.ProcessGroup]) -> Optional[list]:
    """None if the weights are finite on every rank (under FSDP each checks its own shards); else the names of
    this rank's non-finite ones (empty if only another rank's are). Every rank gets the same verdict."""
    from torch.distributed.tensor import DTensor
    bad = non_finite_keys({k: v.to_local() if isinstance(v, DTensor) else v for k, v in weights.items()})
    count = torch.tensor(len(bad))
    if group is not None:
        dist.all_reduce(count, group=group)
    return bad if count else None


def trained_weights(model: nn.Module, adapters_only: bool = False) -> dict:
    """The model's state dict (FSDP: this rank's DTensor shards), or with adapters_only a LoRA run's adapters
    alone: the frozen base, whether bf16 weights or QLoRA's int4 buffers, is --ckpt_dir's and never saved."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    weights = get_model_state_dict(model)
    return {k: v for k, v in weights.items() if ".lora_" in k} if adapters_only else weights


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, step: int = 0, shard: int = 0,
                   position: int = 0, adapters_only: bool = False) -> dict:
    """What a training checkpoint holds, as DCP saves it and loads into it in place (see above). Under FSDP
    the weights and moments are DTensors, of which each rank holds and writes its own shards.
    adapters_only: a LoRA run's (the adapters; AdamW holds nothing else)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    weights = trained_weights(model, adapters_only)
    if model.params.tie_word_embeddings and not adapters_only:
        del weights["output.weight"]  # the embedding again; load ties it back
    moments = get_optimizer_state_dict(model, optimizer)["state"]  # makes AdamW's state if no step was taken yet
    return {"model": weights, "optimizer": moments,
            "train": {"step": torch.tensor(step), "shard": torch.tensor(shard), "position": torch.tensor(position)}}


def load_training_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             group: Optional[dist.ProcessGroup] = None, adapters_only: bool = False) -> dict:
    """Load a training checkpoint saved by any number of processes into this rank's model and optimizer (FSDP:
    its shards); adapters_only: a LoRA run's, into the adapters. Returns the train state: step, shard,
    position."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)
    state = training_state(model, optimizer, adapters_only=adapters_only)
    with dcp_errors(ckpt_dir):  # (DCP fails on any tensor of state that the checkpoint lacks)
        dcp.load(state, storage_reader=checkpoint_reader(ckpt_dir), planner=tensors_only_planner(),
                 process_group=group)
    weights = state["model"]
    if model.params.tie_word_embeddings and not adapters_only:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    # adapters_only: the base is not in weights (it came from --ckpt_dir), so not strict; DCP has found every
    # adapter of this model in the checkpoint
    set_model_state_dict(model, weights, options=StateDictOptions(strict=not adapters_only))
    param_groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"], "param_groups": param_groups})
    return {k: int(v) for k, v in state["train"].items()}


def publish_dir(tmp: Path, out_dir: Path):
    """Rename a whole directory tmp into place as out_dir (never over an existing one) and make it durable."""
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; a checkpoint is never overwritten")
    os.rename(tmp, out_dir)
    parent = os.open(out_dir.parent, os.O_RDONLY)
    try:
        os.fsync(parent)
    finally:
        os.close(parent)


def remove_old_checkpoints(out_dir: Path, keep_last: int):
    """Delete all but the keep_last newest complete step directories. Each is renamed out of the step_NNNNNN
    namespace first, so a kill halfway through a deletion leaves no half-deleted checkpoint under its name."""
    steps = sorted((p for p in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                   key=lambda p: int(p.name.removeprefix("step_")))
    for old in steps[:-keep_last]:
        doomed = old.with_name(f".{old.name}.removing")
        os.rename(old, doomed)
        shutil.rmtree(doomed)


class Checkpointer:
    """Writes a run's training checkpoints out_dir/step_NNNNNN/, one at a time. Each is written by every rank
    into a temporary directory .step_NNNNNN.tmpPID, which rank 0 renames into place once all ranks have
    written theirs: a kill at any moment leaves the complete checkpoints as they were and at most a temporary
    directory (removed at the next start). Rank 0 then exports it if asked and removes the oldest beyond
    keep_last, so an older checkpoint goes only once a newer one is whole.
    async_save: the weights and AdamW moments are copied to host memory (on a GPU into pinned buffers kept for
    the next save: one more float32 copy of this rank's shards of the weights and both moments), which is the
    only pause of training, and written by a background thread while training goes on. A kill then loses the
    checkpoint being written; the previous one stays."""

    def __init__(self, out_dir: Path, async_save: Optional[bool] = None, keep_last: Optional[int] = None,
                 device: torch.device = torch.device("cpu")):
        from torch.distributed.checkpoint import FileSystemWriter
        if async_save is None:
            # on by default on GPUs: the pause is then a copy to pinned host memory at tens of GB/s instead of a
            # write to disk at a few; on the CPU the copy itself is most of a save, and the writer thread
            # would take cores from training
            async_save = device.type == "cuda"
        self.out_dir, self.keep_last = out_dir, keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        # DCP coordinates the ranks through a gloo group of its own: async_save needs a CPU backend, and the
        # writer thread's collectives must not interleave with training's on the default group
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        pid = [os.getpid()]  # the temporary directory is named after rank 0's process
        if self.group is not None:
            dist.broadcast_object_list(pid, src=0, group=self.group)
        self.tmp_suffix = f".tmp{pid[0]}"
        # one writer for every async save (each gets its own directory), so its pinned buffers are reused
        self.writer = FileSystemWriter(out_dir, cache_staged_state_dict=device.type == "cuda") if async_save else None
        self.executor = ThreadPoolExecutor(max_workers=1) if async_save else None
        self.pending: Optional[Future] = None

    def save(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, shard: int, position: int,
             tokenizer_path: Path, export_to: Optional[Path] = None, blocking: bool = False,
             adapter: Optional[dict] = None):
        """Save step's checkpoint (all ranks call this); with export_to, rank 0 then exports it there (Meta
        format, bf16). Asynchronous unless blocking or async_save is off. adapter: a LoRA run's adapter.json;
        the checkpoint then holds the adapters alone, and adapter.json instead of params.json and
        tokenizer.model (a LoRA checkpoint has no export: `merge` makes the model)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter
        if adapter is not None and export_to is not None:
            raise ValueError("a LoRA checkpoint holds adapters, not a model to export: merge it into its base")
        self.wait()  # one save at a time: its host buffers and the gloo group are in use until it is done
        path = self.out_dir / f"step_{step:06d}"
        if path.exists():  # every rank sees it (DCP needs a file system all ranks share), so all stop here
            raise FileExistsError(f"{path} already exists; a checkpoint is never overwritten")
        state = training_state(model, optimizer, step, shard, position, adapters_only=adapter is not None)
        bad = non_finite_anywhere(state["model"], self.group)
        if bad is not None:  # a checkpoint is what a run falls back to: never let one hold NaN or inf
            raise FloatingPointError(f"not saving {path}: the weights {bad[:4] or '(of another rank)'} hold "
                                     "non-finite values")
        tmp = self.out_dir / f".{path.name}{self.tmp_suffix}"
        try:
            if self.rank == 0:
                tmp.mkdir(exist_ok=True)
                if adapter is not None:
                    atomic_write(tmp / "adapter.json", lambda p: p.write_text(json.dumps(adapter, indent=2)))
                else:
                    atomic_write(tmp / "params.json", lambda p: p.write_text(json.dumps(model.params.to_params(),
                                                                                        indent=2)))
                    atomic_write(tmp / "tokenizer.model", lambda p: shutil.copyfile(tokenizer_path, p))
            if self.executor is not None and not blocking:
                with dcp_errors(tmp):
                    written = dcp.async_save(state, checkpoint_id=tmp, storage_writer=self.writer,
                                             process_group=self.group)
                self.pending = self.executor.submit(self.finish, written, tmp, path, export_to)
                return
            with dcp_errors(tmp):
                dcp.save(state, storage_writer=FileSystemWriter(tmp), process_group=self.group)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves nothing behind
            raise
        self.finish(None, tmp, path, export_to)

    def finish(self, written: Optional[Future], tmp: Path, path: Path, export_to: Optional[Path]):
        """After this rank's part of the save (written: its background write): rank 0 renames the directory
        into place, exports it and removes old ones. Runs in the writer thread when the save is asynchronous."""
        if written is not None:
            try:
                with dcp_errors(tmp):
                    written.result()
            except BaseException:
                if self.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        if self.rank != 0:
            return
        # DCP's save ends by gathering every rank's write results on rank 0, which then writes .metadata: once
        # it returns there, all ranks' shards are on disk (and fsynced), so the directory is whole
        publish_dir(tmp, path)
        print0(f"saved {path}", file=sys.stderr)
        if export_to is not None:
            export(str(path), str(export_to))
            print0(f"exported {export_to}", file=sys.stderr)
        if self.keep_last is not None:
            remove_old_checkpoints(self.out_dir, self.keep_last)

    def wait(self):
        """Wait for the checkpoint being written in the background, if any; raise its error, if any."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc):
        """Let the checkpoint being written finish (also when training failed: it is a good one)."""
        try:
            self.wait()
        finally:
            if self.executor is not None:
                self.executor.shutdown()


def read_training_checkpoint(ckpt_dir: Path, **runtime) -> tuple[ModelArgs, CheckpointWeights]:
    """The model arguments (params.json) of a training checkpoint and its weights, each read only when asked
    for: whole, on the CPU in its saved dtype, from the chunks that every rank's file holds of it (in this one
    process). Shapes and dtypes come from DCP's metadata, checked first against the model params.json
    describes. Llama.build, convert, train --ckpt_dir and export read a training checkpoint so."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / "adapter.json").exists():
        raise ValueError(f"{ckpt_dir} holds LoRA adapters, not a model: merge them into the base they were "
                         f"trained on (llama31.py merge --ckpt_dir BASE --lora_dir {ckpt_dir} --out_dir D)")
    if not is_training_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a training checkpoint (it has no {DCP_METADATA}): export "
                                "reads the step_NNNNNN directories that train writes; convert reads Meta and "
                                "Hugging Face checkpoints")
    if not (ckpt_dir / "params.json").is_file():
        raise FileNotFoundError(f"{ckpt_dir} has DCP's {DCP_METADATA} but no params.json: not a checkpoint of train")
    args = ModelArgs.from_params(read_json(ckpt_dir / "params.json"), str(ckpt_dir / "params.json"), **runtime)
    reader = checkpoint_reader(ckpt_dir)  # one reader: the metadata pickle is checked once
    metadata = reader.read_metadata()
    with torch.device("meta"):
        expected = Transformer(args).state_dict()
    if args.tie_word_embeddings:
        del expected["output.weight"]
    index = {}
    for name, t in expected.items():
        md = metadata.state_dict_metadata.get(f"model.{name}")
        if not isinstance(md, TensorStorageMetadata) or tuple(md.size) != tuple(t.shape):
            found = tuple(md.size) if isinstance(md, TensorStorageMetadata) else "nothing"
            raise ValueError(f"{ckpt_dir}: model.{name} has shape {found}, but its params.json implies "
                             f"{tuple(t.shape)}")
        index[name] = md

    def read(name, dim, start, stop):
        t = torch.empty(index[name].size, dtype=index[name].properties.dtype)
        with dcp_errors(ckpt_dir):
            dcp.load({"model": {name: t}}, storage_reader=reader,
                     planner=tensors_only_planner(allow_partial_load=True), no_dist=True)
        return t if dim is None else t.narrow(dim, start, stop - start)
    return args, CheckpointWeights({k: md.size for k, md in index.items()},
                                   {k: md.properties.dtype for k, md in index.items()}, read)


def save_streamed(path: Path, names: list, make: Callable[[str], torch.Tensor]):
    """torch.save({name: make(name)}) without ever holding all the tensors. A torch.save file is one zip whose
    pickle comes first, so it cannot be appended to tensor by tensor; instead each tensor is written to a
    scratch file beside path as it is made (and freed), and torch.save then reads them back from that file
    memory-mapped: their bytes pass through the page cache, which the kernel can drop, not through the
    process's own memory. The scratch file takes as much disk as the result, until the end."""
    scratch = path.with_name(path.name + ".scratch")
    try:
        layout = {}
        with open(scratch, "wb") as f:
            for name in names:
                t = make(name).contiguous()
                layout[name] = (f.tell(), t.shape, t.dtype)
                f.write(t.reshape(-1).view(torch.uint8).numpy())
        with open(scratch, "rb") as f:  # copy-on-write: torch.frombuffer wants a writable buffer; nothing writes
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        sd = {name: torch.frombuffer(mapped, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)
              for name, (offset, shape, dtype) in layout.items()}
        torch.save(sd, path)
        del sd  # the tensors hold the mapping open
        mapped.close()
    finally:
        scratch.unlink(missing_ok=True)


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}  # what safetensors calls a dtype


def save_safetensors_streamed(path: Path, layout: dict, make: Callable[[str], torch.Tensor], metadata: dict):
    """A safetensors file of {name: make(name)}, layout[name] = (shape, dtype), written tensor by tensor: the
    format is an 8-byte header length, a JSON header of every tensor's dtype, shape and byte range, and then
    the tensors' bytes in that order, so the header can be written before any tensor is made."""
    header, offset = {}, 0
    for name, (shape, dtype) in layout.items():
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # padded to 8 bytes with spaces, as the safetensors library writes it
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name, (shape, dtype) in layout.items():
            t = make(name).contiguous()
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, the header says {tuple(shape)} {dtype}")
            f.write(t.reshape(-1).view(torch.uint8).numpy())


def export(ckpt_dir: str, out_dir: str, to: str = "meta", dtype: str = "bfloat16",
           tokenizer_path: Optional[str] = None):
    """Write the model of a training checkpoint (a step_NNNNNN directory of train) as a Meta checkpoint
    (--to meta: params.json + consolidated.00.pth + tokenizer.model, which Meta's own code loads) or a Hugging
    Face one (--to hf: config.json + model.safetensors + tokenizer.model), in --dtype (bfloat16 by default;
    float32 keeps the trained weights exactly). No GPU, and never the whole model in memory: one weight at a
    time is read from the shards, cast and written (peak memory: the largest weight in float32, about twice,
    plus its cast). The output directory appears whole or not at all; an existing one is refused.

    Args:
        ckpt_dir: a training checkpoint (out/run/step_NNNNNN)
        out_dir: the directory to write; it must not exist yet
        to: meta (Meta's format) or hf (Hugging Face's)
        dtype: float32, bfloat16 or float16
        tokenizer_path: the tokenizer.model to copy; by default the checkpoint's own, else Llama 3's
    """
    if to not in ("meta", "hf"):
        raise ValueError(f"--to {to!r} must be meta or hf")
    ckpt_dir, out_dir, dtype = Path(ckpt_dir), Path(out_dir), pick_dtype(dtype, torch.device("cpu"))
    args, weights = read_training_checkpoint(ckpt_dir)
    tokenizer = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
    with torch.device("meta"):
        names = list(Transformer(args).state_dict())  # Meta's order; output.weight too when tied (Meta's code needs it)

    def weight(name: str) -> torch.Tensor:
        if name == "output.weight" and args.tie_word_embeddings:
            name = "tok_embeddings.weight"
        return weights[name].to(dtype)

    if to == "meta":
        files = {"params.json": lambda p: p.write_text(json.dumps(args.to_params(), indent=2)),
                 "consolidated.00.pth": lambda p: save_streamed(p, names, weight)}
    else:
        if args.tie_word_embeddings:
            names.remove("output.weight")  # transformers ties lm_head to the embedding itself
        meta_name = {hf_name(k): k for k in names}

        def hf_weight(key: str) -> torch.Tensor:
            return hf_layout(meta_name[key], weight(meta_name[key]), args)
        layout = {hf_name(k): (weights.shapes[k], dtype) for k in names}
        files = {"config.json": lambda p: p.write_text(json.dumps(hf_config(args, dtype), indent=2)),
                 "model.safetensors": lambda p: save_safetensors_streamed(p, layout, hf_weight, {"format": "pt"})}
    files["tokenizer.model"] = lambda p: shutil.copyfile(tokenizer, p)
    write_dir_atomically(out_dir, files)


# -----------------------------------------------------------------------------
# LoRA adapters on disk: a LoRA run's step_NNNNNN is a training checkpoint as above whose model.* holds only the
# adapters and optimizer.* only their AdamW state, with adapter.json (the LoRAArgs, and the path and fingerprint
# of the base they were trained on) in place of params.json and tokenizer.model: megabytes, not the base's
# gigabytes. `merge`, sample/chat --lora_dir and --resume read it with the base of --ckpt_dir.


def base_fingerprint(args: ModelArgs, weights: Mapping) -> str:
    """A short hash that tells one base model from another: its shape and the first 16 values of the first
    row of every weight (Meta's names), rounded to bf16, so the same base read from Meta's or Hugging Face's
    files, as bf16 or float32, hashes the same. weights: a base model's state dict (before any adapter,
    sharding or quantization), or a checkpoint's CheckpointWeights, of which only those rows are read."""
    shape = dict(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads,
                 vocab_size=args.vocab_size, hidden_dim=args.hidden_dim, tie=args.tie_word_embeddings)
    h = hashlib.sha256(json.dumps(shape, sort_keys=True).encode())
    if not isinstance(weights, CheckpointWeights):
        weights = CheckpointWeights.from_dict(weights)
    for name in sorted(weights):
        if name == "output.weight" and args.tie_word_embeddings:
            continue  # the embedding (a tied checkpoint may or may not hold it twice)
        first_row = weights.read(name, 0, 0, weights.shapes[name][0]).detach().flatten()[:16]
        h.update(name.encode())
        h.update(first_row.to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


def lora_state_dict(model: nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k}


def adapter_config(lora: LoRAArgs, base_path: str, fingerprint: str) -> dict:
    """What adapter.json holds: the adapters' shape and the base they sit on."""
    return {**dataclasses.asdict(lora), "targets": list(lora.targets), "base_path": base_path,
            "base_fingerprint": fingerprint}


def save_lora_checkpoint(out_dir: Path, lora: LoRAArgs, base: dict, adapters: dict):
    """A step directory of adapters alone (adapter.json naming base, its base_path and base_fingerprint, and the
    adapters as DCP shards) in the format train's LoRA checkpoints have, less AdamW's state and the data
    position: what `merge` and --lora_dir read. It appears whole or not at all, never over an existing one."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; a checkpoint is never overwritten")
    sd = {k: v.detach().cpu().contiguous() for k, v in adapters.items()}
    bad = non_finite_keys(sd)
    if bad:
        raise FloatingPointError(f"not saving {out_dir}: the adapters {bad[:4]} hold non-finite values")
    config = adapter_config(lora, base["base_path"], base["base_fingerprint"])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        atomic_write(tmp / "adapter.json", lambda p: p.write_text(json.dumps(config, indent=2)))
        with dcp_errors(tmp):
            dcp.save({"model": sd}, storage_writer=FileSystemWriter(tmp), no_dist=True)
        publish_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter_config(lora_dir: Path) -> tuple[LoRAArgs, dict]:
    """(the adapters' LoRAArgs, adapter.json) of a LoRA run's step directory."""
    path = Path(lora_dir) / "adapter.json"
    if not path.exists():
        raise FileNotFoundError(f"--lora_dir {lora_dir} holds no adapter.json, so no LoRA adapters (a run of "
                                "train --lora_rank writes them into its step_NNNNNN directories)")
    config = read_json(path)
    keys = ("rank", "alpha", "dropout", "targets", "base_path", "base_fingerprint")
    if not isinstance(config, dict) or any(k not in config for k in keys):
        raise ValueError(f"{path} must be a JSON object with the keys {list(keys)}")
    try:
        lora = LoRAArgs(config["rank"], config["alpha"], config["dropout"], config["targets"]).check()
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return lora, config


def check_lora_base(config: dict, fingerprint: str, lora_dir: Path, base_dir):
    """Refuse adapters (adapter.json's config) trained on another base than base_dir, of that fingerprint."""
    if config["base_fingerprint"] != fingerprint:
        raise ValueError(f"--lora_dir {lora_dir} holds adapters trained on another base ({config['base_path']}, "
                         f"fingerprint {config['base_fingerprint']}) than --ckpt_dir {base_dir} (fingerprint "
                         f"{fingerprint}); pass the base they were trained on")


def read_lora_checkpoint(lora_dir: Path) -> tuple[LoRAArgs, dict, dict]:
    """(the adapters' LoRAArgs, adapter.json, the adapters: float32, whole, on the CPU) of a LoRA run's step
    directory, saved by any number of processes; its AdamW state and data position (--resume's) are not read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    lora_dir = Path(lora_dir)
    lora, config = read_adapter_config(lora_dir)
    if not is_training_checkpoint(lora_dir):
        raise FileNotFoundError(f"--lora_dir {lora_dir} has adapter.json but no {DCP_METADATA}: not a checkpoint "
                                "of train --lora_rank (whose adapters are DCP shards)")
    reader = checkpoint_reader(lora_dir)  # one reader: the metadata pickle is checked once
    sd = {}
    for key, md in reader.read_metadata().state_dict_metadata.items():
        if key.startswith("model."):
            if not isinstance(md, TensorStorageMetadata):
                raise ValueError(f"{lora_dir}: {key} is not a tensor")
            sd[key.removeprefix("model.")] = torch.empty(md.size, dtype=md.properties.dtype)
    with dcp_errors(lora_dir):
        dcp.load({"model": sd}, storage_reader=reader, planner=tensors_only_planner(allow_partial_load=True),
                 no_dist=True)
    return lora, config, sd


@torch.no_grad()
def load_lora(model: Transformer, lora_dir: Path, base_dir, dtype: torch.dtype = torch.float32) -> LoRAArgs:
    """Put the adapters of lora_dir on a base model (in place, unmerged), after checking that they were
    trained on this base. dtype: the adapters' (float32 to merge, the model's own to generate with)."""
    lora, config, sd = read_lora_checkpoint(lora_dir)
    bad = non_finite_keys(sd)
    if bad:
        raise ValueError(f"{lora_dir} holds non-finite adapters ({bad[:4]})")
    check_lora_base(config, base_fingerprint(model.params, model.state_dict()), lora_dir, base_dir)
    device = model.tok_embeddings.weight.device
    add_lora(model, lora, torch.Generator(device))  # A's random init is overwritten below
    expected = lora_state_dict(model)
    if sd.keys() != expected.keys():
        diff = sorted(set(sd) ^ set(expected))
        raise ValueError(f"{lora_dir} does not hold the adapters its adapter.json describes: {diff[:4]}")
    for k, v in sd.items():
        if v.shape != expected[k].shape:
            raise ValueError(f"{lora_dir}: {k} has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
        model.get_parameter(k).copy_(v)
    for m in lora_linears(model).values():
        m.lora_a.to(dtype)
        m.lora_b.to(dtype)
    return lora


def merge(ckpt_dir: str, lora_dir: str, out_dir: str, to: str = "meta", dtype: Optional[str] = None,
          tokenizer_path: Optional[str] = None):
    """Fold the adapters of a LoRA run (--lora_dir out/run/step_N) into their base (--ckpt_dir): each adapted
    weight becomes W + (alpha / rank) B A, computed in float32 and cast to --dtype (default: the base's own,
    bf16 for Meta's downloads). Writes a full checkpoint in Meta's format (--to meta) or Hugging Face's
    (--to hf) that Llama.build, Meta's code and transformers load; whole or not at all, never over an
    existing --out_dir.

    Args:
        ckpt_dir: the base checkpoint the LoRA run trained on
        lora_dir: the LoRA run's checkpoint (out/run/step_N)
        out_dir: the directory to write; it must not exist yet
        to: meta (Meta's format) or hf (Hugging Face's)
        dtype: float32, bfloat16 or float16; by default the base's own
        tokenizer_path: the tokenizer.model to copy; by default the base's own, else Llama 3's
    """
    if to not in ("hf", "meta"):
        raise ValueError(f"--to {to!r} must be hf or meta")
    dtype = pick_dtype(dtype, torch.device("cpu")) if dtype is not None else None
    model, _ = load_model(ckpt_dir, tokenizer_path)  # on the CPU, in the checkpoint's dtype
    load_lora(model, lora_dir, ckpt_dir)
    merge_lora(model, dtype)
    if dtype is not None:
        model.to(dtype)  # the weights without adapters (embedding, norms, linears not targeted)
    save = save_checkpoint if to == "meta" else save_hf_checkpoint
    save(model, Path(out_dir), resolve_tokenizer_path(Path(ckpt_dir), tokenizer_path))
    print_written(Path(out_dir))


# -----------------------------------------------------------------------------
# data: the shard format, DistributedShardedDataLoader, preparing shards from text

# A shard is a header of 256 int32 (magic, version, number of tokens, zeros) followed by the tokens as
# uint32 (llm.c's layout). A token with bit 31 set is read as an input but never as a training target:
# chat data marks everything but the assistant's replies that way.
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240801, 7, 256
NOT_A_TARGET = 1 << 31


def write_shard(path: Path, tokens: np.ndarray):
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint32).tobytes())
    atomic_write(path, write)


def open_shard(path: str, vocab_size: int) -> np.ndarray:
    """The tokens of one shard, memory-mapped, after checking the header and the token ids."""
    size = os.path.getsize(path)
    if size < HEADER_INTS * 4:
        raise ValueError(f"data shard {path} is {size} bytes, shorter than the {HEADER_INTS * 4}-byte header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise ValueError(f"data shard {path} has magic {header[0]} version {header[1]}, expected magic "
                         f"{SHARD_MAGIC} version {SHARD_VERSION}: not a shard written by `llama31.py prepare`")
    n = int(header[2])
    if n < 0 or size != (HEADER_INTS + n) * 4:
        raise ValueError(f"data shard {path} says it holds {n} tokens but its size ({size} bytes) holds "
                         f"{size // 4 - HEADER_INTS}: the file is truncated or corrupt")
    tokens = np.memmap(path, dtype=np.uint32, mode="r", offset=HEADER_INTS * 4, shape=(n,))
    top = int((tokens & (NOT_A_TARGET - 1)).max()) if n else 0
    if top >= vocab_size:
        raise ValueError(f"data shard {path} holds token id {top}, but the model's vocabulary has {vocab_size} "
                         "tokens: it was prepared with another tokenizer")
    return tokens


class ShardsTooSmall(ValueError):
    """No shard matching a pattern holds enough tokens for one step."""


class DistributedShardedDataLoader:
    """Batches (x, y) of B rows of T tokens from shards matching filename_pattern. At each step the
    ranks take consecutive, disjoint B*T slices of the token stream in rank order; when a rank's next slice
    would run past the end of a shard it continues in the next shard (cycling) at its own offset."""

    def __init__(self, filename_pattern: str, B: int, T: int, process_rank: int = 0, num_processes: int = 1,
                 vocab_size: int = VOCAB_SIZE):
        self.files = sorted(glob.glob(filename_pattern))
        if not self.files:
            raise FileNotFoundError(f"no data shard matches {filename_pattern!r}; create some with "
                                    "`python llama31.py prepare`")
        self.B, self.T, self.rank, self.world = B, T, process_rank, num_processes
        need = B * T * num_processes + 1
        shards = [(f, open_shard(f, vocab_size)) for f in self.files]  # all checked now, not hours into a run
        small = [f"{f} ({len(t)} tokens)" for f, t in shards if len(t) < need]
        shards = [(f, t) for f, t in shards if len(t) >= need]
        if not shards:
            raise ShardsTooSmall(f"data shard(s) {', '.join(small)}: too few for one step of {num_processes} "
                                 f"process(es) x B={B} x T={T} (+1); use a smaller B or T, or more data")
        if small:
            print0(f"skipping data shard(s) too small for one step: {', '.join(small)}", file=sys.stderr)
        self.files, self.shards = [f for f, _ in shards], [t for _, t in shards]
        self.reset()

    def reset(self):
        self.load_state_dict({"shard": 0, "position": self.B * self.T * self.rank})

    def state_dict(self) -> dict:
        return {"shard": self.shard, "position": self.position}

    def load_state_dict(self, state: dict):
        self.shard, self.position = state["shard"], state["position"]
        self.tokens = self.shards[self.shard]

    def step_start(self, state: dict) -> tuple[int, int]:
        """The data position of a state of this rank's, as every rank shares it: the shard, and where in it
        the next step starts (rank 0's position). A checkpoint stores this, not each rank's own."""
        return state["shard"], state["position"] - self.B * self.T * self.rank

    def load_step_start(self, shard: int, position: int, source: str):
        """Continue from a data position saved by any number of processes, as if this run's processes had
        read the token stream up to there: rank r takes its slice at position + r * B * T, and if this run's
        whole step no longer fits in the shard, all ranks move on to the next one, as next_batch does. With
        the same processes, B and T as the saving run, every rank is exactly where it stopped."""
        if not (0 <= shard < len(self.files) and 0 <= position < len(self.shards[shard])):
            raise ValueError(f"{source} stopped at token {position} of shard {shard}, which the "
                             f"{len(self.files)} shard(s) given here do not have: resume on the same data")
        if position + self.B * self.T * self.world + 1 > len(self.shards[shard]):
            shard, position = (shard + 1) % len(self.files), 0
        self.load_state_dict({"shard": shard, "position": position + self.B * self.T * self.rank})

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (B, T) int64; y is x shifted by one, with IGNORE_INDEX where the token is not a training target."""
        B, T = self.B, self.T
        buf = torch.from_numpy(self.tokens[self.position: self.position + B * T + 1].astype(np.int64))
        ids = buf & (NOT_A_TARGET - 1)
        x = ids[:-1].view(B, T)
        y = torch.where(buf[1:] >= NOT_A_TARGET, IGNORE_INDEX, ids[1:]).view(B, T)
        self.position += B * T * self.world
        # all ranks move on together, when the whole next step (not just this rank's slice) would not fit
        if self.position - B * T * self.rank + B * T * self.world + 1 > len(self.tokens):
            self.load_state_dict({"shard": (self.shard + 1) % len(self.files), "position": B * T * self.rank})
        return x, y


def progress(i: int, n: int, what: str):
    """A one-line progress bar on stderr."""
    if n and (i == n or i % max(1, n // 200) == 0):
        done = int(30 * i / n)
        print(f"\r{what} [{'#' * done}{'.' * (30 - done)}] {i}/{n}", end="\n" if i == n else "", file=sys.stderr,
              flush=True)


def read_documents(inputs) -> list:
    """Documents from text files (one document each), folders of them (*.txt, *.md, *.jsonl inside), or
    jsonl files with one record per line: {"text": str} for plain text, {"messages": [...]} for chat."""
    paths = []
    for item in ([inputs] if isinstance(inputs, (str, Path)) else inputs):
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix in (".txt", ".md", ".jsonl") and p.is_file())
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    docs = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e})") from None
        if not text.strip():
            print(f"skipped {path}: it holds no text", file=sys.stderr)
            continue
        if path.suffix != ".jsonl":
            docs.append(text)
            continue
        for lineno, record in jsonl_records(path, text):
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                docs.append(record["text"])
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                for i, message in enumerate(record["messages"]):
                    check_message(message, f"{path}:{lineno} message {i}")
                docs.append(record["messages"])
            else:
                raise ValueError(f'{path}:{lineno} needs a "text" string or a "messages" list')
    if not docs:
        raise ValueError(f"no documents found in {inputs}")
    return docs


def prepare(inputs: str | list, out_dir: str = "data", val_fraction: float = 0.05, seed: int = 1337,
            shard_tokens: int = 100_000_000, tokenizer_path: Optional[str] = None) -> dict:
    """Tokenize text files, folders or jsonl into train_NNNNNN.bin / val_NNNNNN.bin shards: each
    document becomes BOS doc EOS, documents shuffled with seed, a val_fraction of them held out (at least
    one). Chat records ({"messages": [...]}) train only on the assistant's tokens.

    Args:
        inputs: a text file (one document), a folder of .txt / .md / .jsonl files, or a jsonl file of
            {"text": ...} or {"messages": [...]} records (Python callers may pass a list of these)
        out_dir: where the shards go
        val_fraction: the fraction of documents held out for the val loss (at least one); 0 for none
        seed: the seed of the shuffle
        shard_tokens: tokens per shard file
        tokenizer_path: the tokenizer.model to use; by default Llama 3's

    Returns:
        {"train": [paths], "val": [paths]}
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val_fraction {val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"--shard_tokens {shard_tokens} must be positive")
    tokenizer = Tokenizer(resolve_tokenizer_path(None, tokenizer_path))
    chat = ChatFormat(tokenizer)
    docs = read_documents(inputs)
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, round(val_fraction * len(docs))) if val_fraction > 0 and len(docs) > 1 else 0
    splits = {"val": order[:n_val], "train": order[n_val:]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, idx in splits.items():
        buf, n_buf, shard, written[split] = [], 0, 0, []

        def flush():
            nonlocal buf, shard
            path = out_dir / f"{split}_{shard:06d}.bin"
            write_shard(path, np.concatenate(buf))
            written[split].append(str(path))
            buf, shard = [], shard + 1
        for i, j in enumerate(idx, 1):
            doc = docs[j]
            if isinstance(doc, str):
                ids = np.array(tokenizer.encode(doc, bos=True, eos=True), dtype=np.uint32)
            else:
                toks, is_target = chat.encode_dialog_with_mask(doc)
                ids = np.array(toks, dtype=np.uint32) | np.where(is_target, 0, NOT_A_TARGET).astype(np.uint32)
            buf.append(ids)
            n_buf += len(ids)
            if n_buf >= shard_tokens:
                flush()
                n_buf = 0
            progress(i, len(idx), f"tokenizing {split}")
        if buf:
            flush()
        for old in sorted(set(map(str, out_dir.glob(f"{split}_[0-9]*.bin"))) - set(written[split])):
            os.remove(old)  # a shard of an earlier, larger preparation here would be read as part of this one
            print(f"removed {old}, left from an earlier preparation", file=sys.stderr)
    print(f"wrote {len(written['train'])} train and {len(written['val'])} val shard(s) to {out_dir}",
          file=sys.stderr)
    return written


TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStories_all_data.tar.gz"


def tinystories(out_dir: str = "data/tinystories", url: str = TINYSTORIES_URL, max_files: int = 2, **kwargs):
    """Download TinyStories (the one command here that uses the network), then prepare shards from the
    stories of its first max_files json files.

    Args:
        out_dir: where the archive and the shards go
        url: where TinyStories is downloaded from
        max_files: how many of the archive's 50 json files to read (about 100k stories each)
        **kwargs: prepare's flags (--val_fraction, --seed, --shard_tokens, --tokenizer_path)
    """
    import tarfile
    import urllib.request
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / "TinyStories_all_data.tar.gz"
    if not archive.exists():
        print(f"downloading {url}", file=sys.stderr)
        atomic_write(archive, lambda tmp: urllib.request.urlretrieve(url, tmp))
    stories = []
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".json")),
                         key=lambda m: m.name)[:max_files]
        for m in members:  # read as data only: nothing from the archive is extracted or executed
            stories += [{"text": s["story"].strip()} for s in json.load(tar.extractfile(m))]
    jsonl = out_dir / "stories.jsonl"
    atomic_write(jsonl, lambda tmp: tmp.write_text("".join(json.dumps(s) + "\n" for s in stories)))
    return prepare(str(jsonl), out_dir=str(out_dir), **kwargs)


# -----------------------------------------------------------------------------
# training: optimizer, schedule, loop, eval, checkpointing


PEAK_FLOPS = 989e12  # dense bf16 matmul peak of an H100 / H200 SXM (989 TFLOP/s): what MFU is a fraction of


@dataclass
class Run:
    """Where this process trains: its rank among world processes, its device, how the model is spread
    ("ddp": replicated, "fsdp": sharded, None: one process), and the signals received so far."""
    rank: int
    world: int
    device: torch.device
    strategy: Optional[str]
    stop_signals: list


@contextlib.contextmanager
def distributed(device: Optional[str], fsdp: Optional[bool]):
    """Set up one process of a run (under torchrun one per GPU, or per CPU process): the process group over
    NCCL (GPUs) or gloo (CPU), and SIGTERM / SIGINT handlers that only note the signal, so the loop can
    finish its step, save and exit cleanly. Both are undone on the way out, also after an error."""
    torchrun = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device)
    if fsdp is None:  # several GPUs: shard the model (FSDP2) rather than replicate it (DDP)
        fsdp = torchrun and world > 1 and device.type == "cuda"
    if fsdp and not torchrun:
        raise ValueError("--fsdp needs several processes: start with torchrun --nproc_per_node N")
    if torchrun:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    stop_signals = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop_signals.append(signum))
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield Run(rank, world, device, "fsdp" if fsdp else "ddp" if torchrun else None, stop_signals)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if torchrun:
            dist.destroy_process_group()


def check_train_flags(**flags):
    """Every numeric flag of train, by name, before any work: a bad value fails here, not deep in a step."""
    at_least = dict(batch_size=1, seq_len=1, max_steps=1, val_steps=1, max_bad_steps=1, sample_len=1,
                    warmup_steps=0, val_every=0, sample_every=0, save_every=0, export_every=0, seed=0)
    for flag, low in at_least.items():
        check_number(f"--{flag} {flags[flag]!r}", flags[flag], lambda v: v >= low, f"an integer >= {low}",
                     integer=True)
    if flags["keep_last"] is not None:  # None keeps them all
        check_number(f"--keep_last {flags['keep_last']!r}", flags["keep_last"], lambda v: v >= 1,
                     "an integer >= 1 (the newest complete checkpoint is never removed)", integer=True)
    in_range = dict(
        # an AdamW learning rate above 1 is never meant, and near float32's limit the update overflows
        learning_rate=(lambda v: 0 < v <= 1, "in (0, 1]"), min_lr_frac=(lambda v: 0 <= v <= 1, "in [0, 1]"),
        weight_decay=(lambda v: 0 <= v <= 1, "in [0, 1]"),
        grad_clip=(lambda v: 0 <= v < math.inf, ">= 0 (0 turns clipping off)"),
        peak_flops=(lambda v: 0 < v < math.inf, "above 0"))
    for flag, (ok, what) in in_range.items():
        check_number(f"--{flag} {flags[flag]!r}", flags[flag], ok, f"a number {what}")


def prepare_out_dir(out_dir: Path, resume: bool):
    """Rank 0, before the model or data are read: out_dir exists and is writable, holds no other run's
    checkpoints unless resuming, and no save, export or removal cut short by a kill."""
    blocker = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"--out_dir {out_dir}: {blocker} is a file, not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"--out_dir {out_dir} is not writable")
    if not resume and latest_checkpoint(out_dir) is not None:
        raise ValueError(f"--out_dir {out_dir} already holds checkpoints ({latest_checkpoint(out_dir).name}); "
                         "pass --resume to continue that run, or choose another --out_dir")
    for pattern in (".step_*.tmp*", ".step_*.removing", ".export_*.tmp*"):  # never a checkpoint or an export
        for stale in out_dir.glob(pattern):
            shutil.rmtree(stale)


@contextlib.contextmanager
def removed_if_left_empty(out_dir: Path):
    """The directories of out_dir that do not exist yet are removed again if the run fails while they are still
    empty: a failed start leaves no new empty --out_dir behind."""
    new = [p for p in (out_dir, *out_dir.parents) if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for p in new:
            with contextlib.suppress(OSError):  # not empty (the run wrote something), or already gone
                p.rmdir()
        raise


def trim_log(path: Path, step: int):
    """Keep the records of log.jsonl that precede a run resumed at `step`: a run stopped after its last
    checkpoint had logged steps (and maybe half a line) that the resumed run logs again. The val loss at `step`
    itself is measured again."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().split("\n"):
        with contextlib.suppress(json.JSONDecodeError, TypeError, KeyError):
            record = json.loads(line)
            if record["step"] < step or (record["step"] == step and "val_loss" not in record):
                kept.append(line + "\n")
    atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))


def build_train_model(source: Optional[Path], preset_name: str, tokenizer_file: Path, seq_len: int,
                      n_prompts: int, device: torch.device, dtype: torch.dtype, seed: int,
                      resuming: bool = False) -> tuple[Transformer, Tokenizer]:
    """The model to train: a checkpoint's (to finetune), else a preset from scratch. resuming: the shape of
    our training checkpoint `source`, weights unset (restore loads them, each rank only its shards)."""
    if resuming:
        if not is_training_checkpoint(source):
            raise FileNotFoundError(f"{source} is not a training checkpoint of this version (it has no "
                                    f"{DCP_METADATA}), so --resume cannot continue it; finetune from it with "
                                    f"--ckpt_dir {source} into a new --out_dir instead")
        args, _ = read_training_checkpoint(source, max_seq_len=seq_len, max_batch_size=n_prompts)
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to_empty(device=device).to(dtype)
        if args.tie_word_embeddings:
            model.output.weight = model.tok_embeddings.weight  # to_empty gave each its own tensor
        model.reset_rope()
        return model, Tokenizer(tokenizer_file)
    if source is None:
        tokenizer = Tokenizer(tokenizer_file)
        model = Transformer(preset(preset_name, max_seq_len=seq_len, max_batch_size=n_prompts))
        model = model.to(device=device, dtype=dtype)
        model.reset_rope()  # the .to() above cast the RoPE table too; it stays float32
        model.init_weights(torch.Generator(device=device).manual_seed(seed))
        return model, tokenizer
    model, tokenizer = load_model(source, tokenizer_file, max_seq_len=seq_len, max_batch_size=n_prompts,
                                  device=device, dtype=dtype)
    bad = non_finite_keys(model.state_dict())
    if bad:
        raise ValueError(f"{source} holds non-finite weights ({bad[:4]}): training from it gives only NaN")
    return model, tokenizer


def build_lora_model(ckpt_dir: str, lora: LoRAArgs, quantize: Optional[str], group_size: int,
                     resume_from: Optional[Path], tokenizer_file: Path, seq_len: int, n_prompts: int,
                     device: torch.device, on_device: bool, seed: int) -> tuple[Transformer, Tokenizer, dict]:
    """A LoRA run's model: the base of ckpt_dir frozen (bf16 on a GPU, float32 on the CPU; --quantize int4:
    load_qlora_base) with float32 adapters drawn from seed (resume_from: after a check that its adapters sit on
    this base and have this shape; restore loads them). Also the adapter.json of every checkpoint of the run.
    on_device=False leaves the base on the CPU for FSDP2, which moves each block to the GPU as it shards it."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quantize:
        model, tokenizer, fingerprint = load_qlora_base(ckpt_dir, tokenizer_file, seq_len, n_prompts, device, dtype,
                                                        group_size)
    else:
        model, tokenizer = build_train_model(Path(ckpt_dir), "", tokenizer_file, seq_len, n_prompts,
                                             device if on_device else torch.device("cpu"), dtype, seed)
        fingerprint = base_fingerprint(model.params, model.state_dict())
    if resume_from is not None:
        saved, config = read_adapter_config(resume_from)
        check_lora_base(config, fingerprint, resume_from, ckpt_dir)
        if saved != lora:
            raise ValueError(f"--resume: {resume_from} holds adapters of {saved}, but the --lora_* flags ask for "
                             f"{lora}; pass the flags it was trained with")
    add_lora(model, lora, torch.Generator(model.tok_embeddings.weight.device).manual_seed(seed))
    return model, tokenizer, adapter_config(lora, str(Path(ckpt_dir).resolve()), fingerprint)


def configure_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, device: torch.device):
    """AdamW with weight decay on the 2-D weights (matmuls, embedding) only, not on the norms;
    the fused kernel on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def shard_model(model: Transformer, param_dtype: torch.dtype, compile: bool) -> Transformer:
    """FSDP2: each rank keeps 1/world of every float32 master weight, gradient and AdamW state; a block's
    weights are all-gathered in param_dtype (bf16 on GPUs) just for its forward and backward, and
    gradients are reduced in float32. Blocks are compiled one by one, before sharding."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # cast_forward_inputs off: the RoPE table passed to every block must stay float32, as in Meta's code
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for layer in model.layers:
        if compile:
            layer.compile()  # in place: parameter names stay Meta's
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def wrap_model(model: Transformer, run: Run, compile: bool, compute_dtype: torch.dtype) -> nn.Module:
    """What the loop calls: the model sharded (FSDP2, in place) or replicated (DDP) across ranks, and
    compiled if asked. `model` itself stays the one to save, clip and optimise."""
    if run.strategy == "fsdp":
        return shard_model(model, compute_dtype, compile)
    net = torch.compile(model) if compile else model
    if run.strategy == "ddp":
        net = DDP(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return net


def get_lr(step: int, max_steps: int, learning_rate: float, warmup_steps: int, min_lr_frac: float) -> float:
    """Linear warmup over warmup_steps, then cosine decay to min_lr_frac * learning_rate at max_steps."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress_ = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return learning_rate * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress_)))


class Batches:
    """The loader's batches on the device, one fetched ahead: prefetch(), called while the GPU runs a forward
    pass, copies the next batch from pinned memory asynchronously (nanoGPT: "immediately async prefetch next
    batch while model is doing the forward pass on the GPU"). loader_state is the loader's position before
    the batch not yet used: what a checkpoint resumes from."""

    def __init__(self, loader: DistributedShardedDataLoader, device: torch.device, fixed: bool = False):
        self.loader, self.device, self.pending = loader, device, None
        self.fixed = self.fetch() if fixed else None  # --overfit_single_batch: one batch, again and again
        self.loader_state = loader.state_dict()

    def fetch(self) -> tuple[torch.Tensor, torch.Tensor]:
        pin = self.device.type == "cuda"  # only a copy from pinned memory runs asynchronously
        return tuple(t.pin_memory().to(self.device, non_blocking=True) if pin else t.to(self.device)
                     for t in self.loader.next_batch())

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch, self.pending = self.fixed or self.pending or self.fetch(), None
        return batch

    def prefetch(self):
        self.loader_state = self.loader.state_dict()
        if self.fixed is None:
            self.pending = self.fetch()


def evaluate(model: nn.Module, loader: DistributedShardedDataLoader, steps: int, device, autocast_ctx) -> float:
    """Mean loss over `steps` batches of the val loader from its start, averaged over ranks."""
    model.eval()
    loader.reset()
    total = torch.zeros((), device=device)
    for _ in range(steps):
        x, y = loader.next_batch()
        with autocast_ctx:
            total += model(x.to(device), targets=y.to(device)).float()
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.AVG)
    return total.item() / steps


def train_step(net: nn.Module, model: Transformer, optimizer, batches: Batches, grad_accum: int, run: Run,
               grad_clip: float, autocast_ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step's gradients, over grad_accum micro-batches: returns the mean loss (averaged
    over ranks too) and the gradient norm before clipping. The caller applies or skips the update."""
    loss_accum = torch.zeros((), device=run.device)
    for micro_step in range(grad_accum):
        x, y = batches.get()
        # gradients are reduced across ranks only on the last micro-step: the earlier ones just accumulate
        # locally (DDP's documented way is the no_sync() context manager; the flag says the same in one line)
        last = micro_step == grad_accum - 1
        if run.strategy == "ddp":
            net.require_backward_grad_sync = last
        elif run.strategy == "fsdp":
            net.set_requires_gradient_sync(last)
        with autocast_ctx:
            # the gradients of successive backward() calls add up, i.e. a SUM over micro-batches; we want
            # their MEAN, so each micro-batch's loss is scaled by 1 / grad_accum here
            loss = net(x, targets=y) / grad_accum
        batches.prefetch()  # the CPU fetches the next batch while the GPU runs this forward pass
        loss_accum += loss.detach()
        loss.backward()
    if dist.is_initialized():
        dist.all_reduce(loss_accum, op=dist.ReduceOp.AVG)  # for the log: the loss over every rank's rows
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if run.strategy == "fsdp":
        norm = norm.full_tensor()  # a DTensor: the norm over every rank's shards
    return loss_accum, norm


def sample_during_training(model: Transformer, tokenizer: Tokenizer, prompts: tuple, max_gen_len: int, seed: int,
                           autocast_ctx):
    """Print a completion of each prompt from the model as it is now (rank 0, the whole model)."""
    model.eval()
    rng = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    with autocast_ctx:
        outs = Llama(model, tokenizer).text_completion(list(prompts), rng, temperature=0.8, top_p=0.95,
                                                        max_gen_len=max_gen_len)
    for p, o in zip(prompts, outs):
        print0(f"  sample: {p}{o['generation']}".replace("\n", "\n          "))  # later lines indented alike
    model.train()


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest complete step_NNNNNN directory (incomplete ones live under a temporary name)."""
    steps = [p for p in out_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name)]  # not step_000002_backup
    steps.sort(key=lambda p: int(p.name.removeprefix("step_")))
    return steps[-1] if steps else None


def restore(ckpt: Path, model: Transformer, optimizer, loader: DistributedShardedDataLoader,
            group: Optional[dist.ProcessGroup], adapters_only: bool = False) -> int:
    """The weights (adapters_only: a LoRA run's adapters), AdamW's state and the data position from our
    training checkpoint ckpt, saved by any number of processes (DCP hands each rank the chunks it holds now);
    returns the step to continue from."""
    state = load_training_checkpoint(ckpt, model, optimizer, group, adapters_only)
    bad = non_finite_anywhere(trained_weights(model, adapters_only), group)
    if bad is not None:
        raise ValueError(f"{ckpt} holds non-finite weights ({bad[:4]}): training from it gives only NaN")
    loader.load_step_start(state["shard"], state["position"], str(ckpt))
    print0(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    return state["step"]  # the checkpoint of step s holds the weights after s updates


def check_disk_space(out_dir: Path, model: Transformer, export: bool = True):
    """What a run writes at the least: a training checkpoint (the trained weights, all or a LoRA run's
    adapters, and AdamW's two moments, each in the weights' dtype, so 12 bytes a parameter with float32 master
    weights, a tied embedding once; every rank's shards land in out_dir) and, with export, the export at the
    end (2 bytes a parameter in bf16, and Meta's output.weight even when tied; twice that while it is written,
    through a scratch file as large). Refuse a run without room for both."""
    params = list(model.parameters())  # each shared parameter once; under FSDP whole (DTensor) sizes
    checkpoint = sum(3 * p.numel() * p.element_size() for p in params if p.requires_grad)
    exported = export * 2 * 2 * (sum(p.numel() for p in params)
                                 + model.params.tie_word_embeddings * model.output.weight.numel())
    free = shutil.disk_usage(out_dir).free
    if free < checkpoint + exported:
        raise OSError(f"--out_dir {out_dir} has {free / 1e9:.2f} GB free, but a checkpoint of this model "
                      f"needs about {checkpoint / 1e9:.2f} GB and its export {exported / 1e9:.2f} GB while written")


def flops_per_token(args: ModelArgs, T: int, frozen: bool = False) -> float:
    """Training FLOPs per token, as nanoGPT counts them: 6 per parameter in the matmuls (2 forward, 4
    backward), plus attention's score and value matmuls, 6 * 2 * n_layers * T * dim (counted over the
    full T x T square, as PaLM's MFU does, though the causal half is skipped by flash attention).
    frozen (LoRA): 4 per parameter, as a frozen weight gets no gradient (the adapters' few are not counted)."""
    n_matmul = args.n_layers * (args.dim * (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
                                + args.n_heads * args.head_dim * args.dim + 3 * args.dim * args.hidden_dim)
    n_matmul += args.dim * args.vocab_size  # the output layer (the embedding lookup is no matmul)
    return (4 if frozen else 6) * n_matmul + 12 * args.n_layers * T * args.dim


def dropout_seed(seed: int, step: int, rank: int) -> int:
    """A 64-bit seed for one rank's dropout masks in one step, as unrelated to its neighbours' as a hash makes it."""
    return int.from_bytes(hashlib.sha256(f"{seed} {step} {rank}".encode()).digest()[:8], "little")


def log_json(path: Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_lora_flags(lora: Optional["LoRAArgs"], quantize: Optional[str], group_size: int,
                     ckpt_dir: Optional[str], pure_bf16: bool, export_every: int):
    """The flags that LoRA and QLoRA runs take, and those they cannot, checked before any work."""
    if quantize not in (None, "int4") or (quantize and lora is None):
        raise ValueError(f"--quantize {quantize!r}: only int4, with --lora_rank (QLoRA: a 4-bit base is trained "
                         "through adapters)")
    check_quantize(quantize, group_size)
    if lora is not None and (ckpt_dir is None or pure_bf16):
        raise ValueError("--lora_rank finetunes the base model of --ckpt_dir (without --pure_bf16: the base is "
                         "bf16 already, the adapters and their AdamW state stay float32)")
    if lora is not None and export_every:
        raise ValueError(f"--export_every {export_every}: a LoRA run checkpoints its adapters only and exports "
                         "nothing; merge a checkpoint into the base (llama31.py merge --ckpt_dir BASE --lora_dir "
                         "out/run/step_N --out_dir D)")


def describe_trainable(model: Transformer, lora: Optional["LoRAArgs"], quantize: Optional[str]) -> str:
    if lora is None:
        return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters"
    return (f"{'QLoRA' if quantize else 'LoRA'} rank {lora.rank} on {','.join(lora.targets)}: "
            f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable parameters on "
            f"a frozen base{' in int4' if quantize else ''}")


def train_loop(net: nn.Module, model: Transformer, optimizer, batches: Batches,
               val_loader: Optional[DistributedShardedDataLoader], run: Run, *, start_step: int, max_steps: int,
               learning_rate: float, warmup_steps: int, min_lr_frac: float, grad_accum: int, grad_clip: float,
               max_bad_steps: int, val_every: int, val_steps: int, sample_every: int, sample_prompts: tuple,
               sample_len: int, seed: int, save_every: int, export_every: int, checkpointer: Checkpointer,
               out_dir: Path, tokenizer: Tokenizer, tokenizer_file: Path, autocast_ctx, tokens_per_step: int,
               peak_flops: float, adapter: Optional[dict] = None) -> list:
    """Steps start_step .. max_steps - 1 of train (which describes the flags), with eval, samples,
    checkpoints and exports between them; returns the losses of the steps taken. adapter: a LoRA run's
    adapter.json, which its checkpoints hold with the adapters (and no export)."""
    losses, bad_steps, on_gpu = [], 0, run.device.type == "cuda"
    flops_per_tok = flops_per_token(model.params, batches.loader.T, frozen=adapter is not None)
    for step in range(start_step, max_steps + 1):
        last_step = step == max_steps
        # eval and samples at step 0 (where the run starts from), every N steps, and after the last update
        if val_loader is not None and val_every and (step % val_every == 0 or last_step):
            val_loss = evaluate(net, val_loader, val_steps, run.device, autocast_ctx)
            print0(f"step {step}/{max_steps} | val loss {val_loss:.4f}")
            if run.rank == 0:
                log_json(out_dir / "log.jsonl", {"step": step, "val_loss": val_loss})
                write_loss_png(out_dir)
        if run.rank == 0 and sample_every and (step % sample_every == 0 or last_step):
            sample_during_training(model, tokenizer, sample_prompts, sample_len, seed, autocast_ctx)
        stop = bool(run.stop_signals)
        if dist.is_initialized():  # a signal that reached one rank stops all of them at the same step
            flag = torch.tensor(float(stop), device=run.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        # an export is made from a checkpoint, so its steps are saved too; a signal saves without one, to exit
        # within a scheduler's grace period (`llama31.py export` makes it later). A LoRA run exports nothing:
        # its adapters are merged into their base by `llama31.py merge`
        export_now = adapter is None and not stop and (last_step or export_every and step % export_every == 0)
        if step > start_step and (save_every and step % save_every == 0 or export_now or last_step or stop):
            checkpointer.save(step, model, optimizer, *batches.loader.step_start(batches.loader_state), tokenizer_file,
                              export_to=out_dir / f"export_{step:06d}" if export_now else None,
                              blocking=last_step or stop, adapter=adapter)
        if last_step or stop:
            break

        t0 = time.time()
        if adapter is not None:
            # LoRA's dropout masks come from a seed of (seed, step, rank), not from an RNG state carried along:
            # a resumed run draws what the uninterrupted one drew (on any number of processes, what a run of
            # that many draws), and a checkpoint needs no RNG state
            torch.manual_seed(dropout_seed(seed, step, run.rank))
        lr = get_lr(step, max_steps, learning_rate, warmup_steps, min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, norm = train_step(net, model, optimizer, batches, grad_accum, run, grad_clip, autocast_ctx)
        if not (torch.isfinite(loss) and torch.isfinite(norm)):
            # a non-finite loss or gradient: skip the update rather than poison the weights
            optimizer.zero_grad(set_to_none=True)
            bad_steps += 1
            print0(f"step {step}: non-finite loss {loss.item()} or grad norm {norm.item()}, step skipped "
                   f"({bad_steps} in a row)", file=sys.stderr)
            if bad_steps >= max_bad_steps:
                raise FloatingPointError(f"{bad_steps} non-finite steps in a row at step {step}; stopping "
                                         "without saving. Try a lower --learning_rate or check the data.")
            continue
        bad_steps = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_gpu:
            torch.cuda.synchronize()  # so the step's time is the GPU's, not just the launches'
        dt = time.time() - t0
        tok_per_s = tokens_per_step / dt
        losses.append(loss.item())
        mfu = flops_per_tok * tok_per_s / run.world / peak_flops if on_gpu else None
        print0(f"step {step + 1:4d}/{max_steps} | loss {losses[-1]:.4f} | lr {lr:.2e} | norm {norm.item():.3f} | "
               f"{dt * 1000:.1f} ms | {tok_per_s:,.0f} tok/s" + (f" | mfu {100 * mfu:.1f}%" if mfu else ""))
        if run.rank == 0:
            log_json(out_dir / "log.jsonl", {"step": step + 1, "loss": losses[-1], "lr": lr, "norm": norm.item(),
                                             "ms": dt * 1000, "tok_per_s": tok_per_s, "mfu": mfu})
    if stop:
        print0(f"stopped by a signal after saving step {step}; continue with --resume", file=sys.stderr)
    elif adapter is not None:
        print0(f"LoRA: {out_dir / f'step_{step:06d}'} holds the adapters (a LoRA run exports nothing); merge them "
               f"into their base: llama31.py merge --ckpt_dir {adapter['base_path']} --lora_dir "
               f"{out_dir / f'step_{step:06d}'} --out_dir DIR", file=sys.stderr)
    return losses


# the peak learning rates train uses unless --learning_rate is given: finetuning moves a trained model gently;
# from scratch, Llama 3 8B's own pretraining peak (3e-4: 3e-5 barely moves a model from its random start)
FINETUNE_LR, FROM_SCRATCH_LR = 3e-5, 3e-4


def train(ckpt_dir: Optional[str] = None, model: str = "tiny", train_data: str = "data/train_*.bin",
          val_data: Optional[str] = "data/val_*.bin", out_dir: str = "out", batch_size: int = 4,
          seq_len: int = 1024, total_batch_size: Optional[int] = None, max_steps: int = 100,
          learning_rate: Optional[float] = None, warmup_steps: int = 10, min_lr_frac: float = 0.1,
          weight_decay: float = 0.1, grad_clip: float = 1.0, val_every: int = 50, val_steps: int = 10,
          sample_every: int = 0, sample_prompts: tuple[str, ...] = ("The",), sample_len: int = 48,
          save_every: int = 0, resume: bool = False, seed: int = 1337, device: Optional[str] = None,
          pure_bf16: bool = False, compile: bool = False, overfit_single_batch: bool = False, max_bad_steps: int = 5,
          peak_flops: float = PEAK_FLOPS, tokenizer_path: Optional[str] = None, fsdp: Optional[bool] = None,
          activation_checkpointing: bool = False, async_save: Optional[bool] = None, export_every: int = 0,
          keep_last: Optional[int] = None, lora_rank: Optional[int] = None, lora_alpha: float = 16.0,
          lora_dropout: float = 0.0, lora_targets: tuple = tuple(LORA_TARGETS), quantize: Optional[str] = None,
          group_size: int = INT4_GROUP_SIZE) -> list:
    """Finetune a checkpoint (--ckpt_dir) or train a --model preset from scratch, on shards made by
    `prepare`. One log line per step, also in out_dir/log.jsonl (and out_dir/loss.png at each eval, with
    matplotlib). Under torchrun: DDP over NCCL (GPUs) or gloo (CPU); with several GPUs (or --fsdp) the model
    is sharded with FSDP2 instead. On a GPU the weights and AdamW state are float32 and the matmuls bf16.
    Checkpoints out_dir/step_NNNNNN (every --save_every steps, at the end, on SIGTERM / SIGINT) are sharded:
    each rank writes its own part, and --resume continues one on any number of processes. --lora_rank R:
    LoRA instead of full finetuning (the base frozen; --quantize int4 with it: QLoRA).

    Args:
        ckpt_dir: the checkpoint to finetune (Meta's or Hugging Face's format); without it, --model from scratch
        model: the preset trained from scratch when no --ckpt_dir is given
        train_data: a glob of the training shards
        val_data: a glob of the val shards; '' for none (shards too small for one step are skipped with a warning)
        out_dir: where log.jsonl, loss.png and the step_NNNNNN checkpoints go
        batch_size: rows per micro-batch per process
        seq_len: tokens per row
        total_batch_size: tokens per optimizer step; gradient accumulation makes up what one micro-batch per
            process does not; by default one micro-batch per process
        max_steps: optimizer steps
        learning_rate: the peak learning rate (warmup, then cosine decay); by default 3e-5 to finetune a
            --ckpt_dir and 3e-4 from scratch
        warmup_steps: steps of linear warmup
        min_lr_frac: the learning rate at the last step, as a fraction of the peak
        weight_decay: AdamW's weight decay, on the 2-D weights only
        grad_clip: the gradient norm is clipped to this; 0 turns clipping off
        val_every: the val loss every this many steps (and at the first and last); 0 for never
        val_steps: batches per val loss
        sample_every: print a sample every this many steps; 0 for never
        sample_prompts: a prompt for those samples; give the flag once per prompt
        sample_len: tokens per sample
        save_every: a checkpoint every this many steps; 0 saves only after the last step
        resume: continue from the newest checkpoint in --out_dir (weights, AdamW, data position)
        seed: the seed of the initial weights (from scratch) and the samples
        device: cpu, cuda, cuda:N or mps; by default cuda (the process's own GPU under torchrun), then mps, cpu
        pure_bf16: weights and AdamW state in bf16: half the memory, but updates smaller than about 1/256 of
            a weight are lost, so small learning rates stall
        compile: compile the model with torch.compile (each block, under FSDP)
        overfit_single_batch: train on the first batch again and again (a debugging check: the loss should
            fall to near 0)
        max_bad_steps: this many non-finite steps in a row stop the run (each is skipped)
        peak_flops: the accelerator's peak FLOP/s, for the MFU in the log
        tokenizer_path: the tokenizer.model to use; by default the checkpoint's own, else Llama 3's
        fsdp: shard the model with FSDP2 (--fsdp) or replicate it with DDP (--nofsdp); by default FSDP2 on
            several GPUs
        activation_checkpointing: recompute each block in the backward pass, to save activation memory
        async_save: write checkpoints in the background, pausing training only to copy them to host memory;
            by default on GPUs
        export_every: also write out_dir/export_NNNNNN (the model alone, Meta's format, bf16) every this many
            steps; 0 only at the end
        keep_last: keep only this many newest checkpoints; by default all
        lora_rank: LoRA instead of full finetuning, with adapters of this rank (only they are trained and
            checkpointed; `merge` folds them into the base); by default full finetuning
        lora_alpha: LoRA's adapters are scaled by lora_alpha / lora_rank
        lora_dropout: dropout on the adapters' input
        lora_targets: a linear of each block that gets an adapter; give the flag once per linear
        quantize: int4 with --lora_rank: QLoRA, the frozen blocks in 4 bits (one process); none by default
        group_size: int4: weights per quantization group

    Returns:
        the list of per-step training losses
    """
    if learning_rate is None:
        learning_rate = FINETUNE_LR if ckpt_dir is not None else FROM_SCRATCH_LR
    check_train_flags(batch_size=batch_size, seq_len=seq_len, max_steps=max_steps, val_steps=val_steps,
                      max_bad_steps=max_bad_steps, sample_len=sample_len, warmup_steps=warmup_steps,
                      val_every=val_every, sample_every=sample_every, save_every=save_every, seed=seed,
                      export_every=export_every, keep_last=keep_last,
                      learning_rate=learning_rate, min_lr_frac=min_lr_frac, weight_decay=weight_decay,
                      grad_clip=grad_clip, peak_flops=peak_flops)
    lora = None if lora_rank is None else LoRAArgs(lora_rank, lora_alpha, lora_dropout, lora_targets).check()
    check_lora_flags(lora, quantize, group_size, ckpt_dir, pure_bf16, export_every)
    sample_prompts = (sample_prompts,) if isinstance(sample_prompts, str) else tuple(sample_prompts)
    B, T, out_dir = batch_size, seq_len, Path(out_dir)
    with (removed_if_left_empty(out_dir), distributed(device, fsdp) as run,
          Checkpointer(out_dir, async_save, keep_last, run.device) as checkpointer):
        if sample_every and run.strategy == "fsdp":
            raise ValueError("--sample_every needs the whole model in one process, which FSDP shards; sample "
                             "from a saved checkpoint with `llama31.py sample` instead")
        if quantize and run.world > 1:
            raise ValueError("--quantize int4 (QLoRA) runs in one process; on several GPUs use LoRA, whose bf16 "
                             "base FSDP2 shards")
        tokens_per_micro_step = B * T * run.world
        total_batch_size = total_batch_size or tokens_per_micro_step
        if total_batch_size % tokens_per_micro_step:
            raise ValueError(f"--total_batch_size {total_batch_size} must be a multiple of batch_size x seq_len x "
                             f"processes = {B} x {T} x {run.world} = {tokens_per_micro_step}")
        grad_accum = total_batch_size // tokens_per_micro_step
        if run.rank == 0:
            prepare_out_dir(out_dir, resume)
        resume_from = latest_checkpoint(out_dir) if resume else None
        if resume and resume_from is None:
            print0(f"--resume: no checkpoint in {out_dir} yet, starting from the beginning", file=sys.stderr)
        if resume_from is not None and (resume_from / "adapter.json").exists() != (lora is not None):
            raise ValueError(f"--resume: {resume_from} holds {'LoRA adapters' if lora is None else 'a whole model'}"
                             f"; resume it {'with' if lora is None else 'without'} the --lora_* flags it was "
                             "trained with")

        # the model: float32 master weights; on a GPU the matmuls run in bf16, by autocast or by FSDP's policy
        master_dtype = torch.bfloat16 if pure_bf16 else torch.float32
        on_gpu = run.device.type == "cuda"
        use_autocast = on_gpu and not pure_bf16 and run.strategy != "fsdp"
        autocast_ctx = torch.autocast("cuda", dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        adapter = None
        if lora is None:  # a checkpoint to finetune, ours to resume, or a preset from scratch
            tokenizer_file = resolve_tokenizer_path(resume_from or ckpt_dir, tokenizer_path)
            raw_model, tokenizer = build_train_model(resume_from or ckpt_dir, model, tokenizer_file, T,
                                                     len(sample_prompts), run.device, master_dtype, seed,
                                                     resuming=resume_from is not None)
        else:  # the model and tokenizer from --ckpt_dir, whose base the adapters of resume_from sit on
            tokenizer_file = resolve_tokenizer_path(ckpt_dir, tokenizer_path)
            raw_model, tokenizer, adapter = build_lora_model(
                ckpt_dir, lora, quantize, group_size, resume_from, tokenizer_file, T, len(sample_prompts),
                run.device, on_device=run.strategy != "fsdp", seed=seed)
        raw_model.train()
        raw_model.checkpoint_activations = activation_checkpointing
        net = wrap_model(raw_model, run, compile, torch.bfloat16 if on_gpu and not pure_bf16 else master_dtype)
        optimizer = configure_optimizer(raw_model, learning_rate, weight_decay, run.device)

        # the data: each rank its own slice of every step's tokens
        vocab_size = raw_model.params.vocab_size
        train_loader = DistributedShardedDataLoader(train_data, B, T, run.rank, run.world, vocab_size)
        val_loader = None
        if val_data:
            try:
                val_loader = DistributedShardedDataLoader(val_data, B, T, run.rank, run.world, vocab_size)
            except ShardsTooSmall as e:  # a small dataset's val split: train anyway, without a val loss
                print0(f"warning: no val loss: {e}", file=sys.stderr)
        start_step = 0
        if resume_from is not None:
            start_step = restore(resume_from, raw_model, optimizer, train_loader, checkpointer.group,
                                 adapters_only=lora is not None)
        if run.rank == 0 and resume:
            trim_log(out_dir / "log.jsonl", start_step)
        if run.rank == 0:
            check_disk_space(out_dir, raw_model, export=lora is None)
        print0(f"model {describe_trainable(raw_model, lora, quantize)} | {run.world} process(es) | B={B} T={T} "
               f"grad_accum={grad_accum} -> "
               f"{total_batch_size:,} tokens/step | {run.device} {master_dtype}"
               f"{' + bf16 autocast' if use_autocast else ''}", file=sys.stderr)

        # LoRA's dropout draws from the global RNG, which train_loop seeds at every step: the caller's RNG
        # state comes back when train returns
        with torch.random.fork_rng(devices=[run.device] if on_gpu else []):
            return train_loop(net, raw_model, optimizer, Batches(train_loader, run.device, fixed=overfit_single_batch),
                              val_loader, run, start_step=start_step, max_steps=max_steps,
                              learning_rate=learning_rate, warmup_steps=warmup_steps, min_lr_frac=min_lr_frac,
                              grad_accum=grad_accum, grad_clip=grad_clip, max_bad_steps=max_bad_steps,
                              val_every=val_every, val_steps=val_steps, sample_every=sample_every,
                              sample_prompts=sample_prompts, sample_len=sample_len, seed=seed, save_every=save_every,
                              export_every=export_every, checkpointer=checkpointer, out_dir=out_dir,
                              tokenizer=tokenizer, tokenizer_file=tokenizer_file, autocast_ctx=autocast_ctx,
                              tokens_per_step=total_batch_size, peak_flops=peak_flops, adapter=adapter)


# -----------------------------------------------------------------------------
# loss curves: a run's log.jsonl drawn as a picture

LOG_SERIES = {"loss": "train loss", "val_loss": "val loss", "lr": "learning rate", "tok_per_s": "tok/s"}


def read_log(run_dir: str | Path) -> dict:
    """{key: (steps, values)} for each of LOG_SERIES in run_dir/log.jsonl (what train writes)."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass the --out_dir of a train run")
    series = {key: ([], []) for key in LOG_SERIES}
    for _, record in jsonl_records(path, path.read_text()):
        for key, (steps, values) in series.items():
            if isinstance(record, dict) and isinstance(record.get(key), (int, float)):
                steps.append(record["step"])
                values.append(record[key])
    return series


def draw_loss_curves(logs: dict, out: Path):
    """A PNG of the runs' loss curves: {label: read_log(...)} -> out (written whole or not at all)."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no display needed
    fig = Figure(figsize=(9, 6.5), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(2, 1))
    ax_loss, ax_lr, ax_tok = fig.add_subplot(grid[0, :]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    for i, (label, log) in enumerate(logs.items()):
        color = f"C{i % 10}"  # one color per run: its train line, val points, lr and tok/s
        ax_loss.plot(*log["loss"], color=color, alpha=0.7, linewidth=1, label=f"{label} train")
        ax_loss.plot(*log["val_loss"], color=color, marker="o", linestyle="--", label=f"{label} val")
        ax_lr.plot(*log["lr"], color=color)
        ax_tok.plot(*log["tok_per_s"], color=color)
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning rate"), (ax_tok, "tok/s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_loss.legend()
    atomic_write(Path(out), lambda tmp: fig.savefig(tmp, format="png", dpi=80))


def write_loss_png(out_dir: Path):
    """out_dir/loss.png from its log.jsonl, where matplotlib is installed (train, at each eval)."""
    if importlib.util.find_spec("matplotlib") is not None:
        draw_loss_curves({str(out_dir): read_log(out_dir)}, out_dir / "loss.png")


def plot(*runs: str, out: str = "loss.png") -> dict:
    """Draw the train and val loss of one or more runs against the step, overlaid, with the learning rate and
    tok/s below, into a PNG. Needs matplotlib.

    Args:
        runs: the --out_dir of each train run (holding its log.jsonl)
        out: the PNG file to write

    Returns:
        {run: {key: (steps, values)}}: the points drawn
    """
    if not runs:
        raise ValueError("plot needs at least one run directory: python llama31.py plot out/run [out/run2 ...]")
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("plot needs matplotlib: pip install matplotlib")
    logs = {str(run): read_log(run) for run in runs}
    draw_loss_curves(logs, Path(out))
    print(f"wrote {out}", file=sys.stderr)
    return logs


# -----------------------------------------------------------------------------
# CLI


def stream_printer(tokenizer: Tokenizer):
    """An on_token callback that prints one sequence's new text as it is made, holding back an incomplete
    UTF-8 character until its last byte arrives. Its shown() is the text printed so far."""
    ids, printed, stopped = [], 0, False

    def on_token(next_token, is_new):
        nonlocal printed, stopped
        if stopped or not bool(is_new[0]):
            return
        t = int(next_token[0])
        if t in tokenizer.stop_tokens:
            stopped = True
            return
        ids.append(t)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            print0(text[printed:], end="", flush=True)
            printed = len(text)
    on_token.shown = lambda: tokenizer.decode(ids)[:printed]
    return on_token


EXAMPLE_PROMPTS = [
    "Clearly, the meaning of life is",
    "Simply put, the theory of relativity states that",
    "The repo llm.c on GitHub is",
    "Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\ncheese =>",
]


def sample(ckpt_dir: str, prompt: Optional[str] = None, tokenizer_path: Optional[str] = None,
           max_seq_len: int = 512, max_gen_len: int = 256, max_batch_size: int = 4, temperature: float = TEMPERATURE,
           top_p: float = TOP_P, seed: int = 1, device: Optional[str] = None, dtype: Optional[str] = None,
           compile: bool = False, echo: bool = False, quantize: Optional[str] = None,
           group_size: int = INT4_GROUP_SIZE, lora_dir: Optional[str] = None):
    """Complete --prompt (streamed), or a few example prompts as one batch, with a base model (plus the
    adapters of a LoRA run on it: --lora_dir out/run/step_N).

    Args:
        ckpt_dir: a checkpoint directory: Meta's (params.json, consolidated.NN.pth) or Hugging Face's
            (config.json, *.safetensors)
        prompt: the text to continue, exactly as given; without it, example prompts as one batch
        tokenizer_path: the tokenizer.model to use; by default the checkpoint's own, else Llama 3's
        max_seq_len: the most tokens of prompt plus completion
        max_gen_len: the most new tokens per prompt
        max_batch_size: how many example prompts to complete at once
        temperature: softmax temperature; 0 is greedy
        top_p: nucleus sampling: draw from the most probable tokens that together hold this probability
        seed: the sampling generator's seed
        device: cpu, cuda, cuda:N or mps; by default cuda, then mps, then cpu
        dtype: float32, bfloat16 or float16; by default bfloat16 on a GPU that has it, else float32
        compile: GPU: compile the decode step into one CUDA graph (slow to start, faster per token)
        echo: print each example prompt again before its completion
        quantize: int8 or int4 weights (faster on a GPU; Llama 3.1 70B fits one H200 or 80 GB card); none by
            default
        group_size: int4: weights per quantization group
        lora_dir: a LoRA run's checkpoint (out/run/step_N) whose adapters go on the model; none by default
    """
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                        device=device, dtype=dtype, compile=compile, quantize=quantize, group_size=group_size,
                        lora_dir=lora_dir)
    llama.check_sampling(temperature, top_p)
    device = llama.model.tok_embeddings.weight.device
    rng = torch.Generator(device=device).manual_seed(seed)
    if prompt is not None:
        tokens = [llama.tokenizer.encode(prompt, bos=True, eos=False)]
        llama.check_prompts(tokens, max_gen_len)  # before the prompt is echoed
        print0(prompt, end="", flush=True)
        llama.generate(tokens, max_gen_len, temperature, top_p, sample_rng=rng,
                       on_token=stream_printer(llama.tokenizer))
        print0()
        return
    results = llama.text_completion(EXAMPLE_PROMPTS[:max_batch_size], rng, temperature=temperature, top_p=top_p,
                                    max_gen_len=max_gen_len, echo=echo)
    for p, r in zip(EXAMPLE_PROMPTS, results):
        print0(f"{p}{bold(r['generation'])}\n" + "-" * 60)


CHAT_HELP = "(/reset starts a new dialog; /quit, /exit, Ctrl-D or Ctrl-C here leave; Ctrl-C during a reply stops it)"


def chat(ckpt_dir: str, system: Optional[str] = None, tokenizer_path: Optional[str] = None, max_seq_len: int = 4096,
         max_gen_len: int = 1024, temperature: float = TEMPERATURE, top_p: float = TOP_P, seed: int = 1,
         device: Optional[str] = None, dtype: Optional[str] = None, compile: bool = False,
         quantize: Optional[str] = None, group_size: int = INT4_GROUP_SIZE, lora_dir: Optional[str] = None):
    """Talk with an Instruct model (plus the adapters of a LoRA run on it: --lora_dir): multi-turn, streamed,
    with an optional --system prompt. Ctrl-C during a reply stops it (the part shown stays in the dialog);
    /reset starts a new dialog; /quit, /exit, Ctrl-D or Ctrl-C at the prompt leave.

    Args:
        ckpt_dir: an Instruct model's checkpoint directory (Meta's or Hugging Face's format)
        system: a system prompt, exactly as given; none by default
        tokenizer_path: the tokenizer.model to use; by default the checkpoint's own, else Llama 3's
        max_seq_len: the most tokens of the whole dialog
        max_gen_len: the most new tokens per reply
        temperature: softmax temperature; 0 is greedy
        top_p: nucleus sampling: draw from the most probable tokens that together hold this probability
        seed: the sampling generator's seed
        device: cpu, cuda, cuda:N or mps; by default cuda, then mps, then cpu
        dtype: float32, bfloat16 or float16; by default bfloat16 on a GPU that has it, else float32
        compile: GPU: compile the decode step into one CUDA graph (slow to start, faster per token)
        quantize: int8 or int4 weights, as for sample; none by default
        group_size: int4: weights per quantization group
        lora_dir: a LoRA run's checkpoint (out/run/step_N) whose adapters go on the model; none by default
    """
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=max_seq_len, max_batch_size=1, device=device,
                        dtype=dtype, compile=compile, quantize=quantize, group_size=group_size, lora_dir=lora_dir)
    llama.check_sampling(temperature, top_p)
    rng = torch.Generator(device=llama.model.tok_embeddings.weight.device).manual_seed(seed)
    new_dialog = [{"role": "system", "content": system}] if system else []
    dialog = list(new_dialog)
    if sys.stdin.isatty():
        print0(CHAT_HELP, file=sys.stderr)
    while True:
        user = read_line("user> ")
        if user is None:  # end of input (Ctrl-D) or Ctrl-C at the prompt: leave, the shell on a new line
            print0()
            return
        if user.strip() in ("/quit", "/exit"):
            return
        if user.strip() == "/reset":
            dialog = list(new_dialog)
            print0("(a new dialog)")
            continue
        if not user.strip():
            continue
        dialog.append({"role": "user", "content": user})
        print0("assistant> ", end="", flush=True)
        printer = stream_printer(llama.tokenizer)
        try:
            out = llama.chat_completion([dialog], rng, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len,
                                        on_token=printer)
            reply = out[0]["generation"]
        except KeyboardInterrupt:  # Ctrl-C mid-reply: stop it; what was shown stays in the dialog, as said
            reply = {"role": "assistant", "content": printer.shown()}
        except ValueError as e:  # the conversation outgrew max_seq_len: say so, keep talking
            print0(f"\n({e})")
            dialog.pop()
            continue
        print0()
        if reply["content"]:
            dialog.append(reply)
        else:  # stopped before a word: as if the message had not been sent
            dialog.pop()


def read_line(prompt: str) -> Optional[str]:
    """A line of input (None at its end, Ctrl-D, or at Ctrl-C), read by rank 0 alone and sent to the other ranks
    under tensor parallelism, so that every rank generates from the same dialog."""
    line = None
    if int(os.environ.get("RANK", 0)) == 0:
        try:
            line = input(prompt)
        except (EOFError, KeyboardInterrupt):
            pass
    if dist.is_initialized():
        box = [line]
        dist.broadcast_object_list(box, src=0)
        line = box[0]
    return line


def eval_checkpoint(ckpt_dir: str, data: str = "data/val_*.bin", batch_size: int = 4, seq_len: int = 1024,
                    steps: int = 10, quantize: Optional[str] = None, group_size: int = INT4_GROUP_SIZE,
                    tokenizer_path: Optional[str] = None, device: Optional[str] = None,
                    dtype: Optional[str] = None) -> dict:
    """The mean loss and perplexity of a checkpoint on --steps batches of --batch_size x --seq_len tokens of
    shards (`prepare`), from their start, with the document masking training uses: the number that compares
    a quantized model (--quantize) or a finetuned one with its origin. The model runs as sample runs it.

    Args:
        ckpt_dir: the checkpoint directory (Meta's or Hugging Face's format)
        data: a glob of the shards to measure on
        batch_size: rows per batch
        seq_len: tokens per row
        steps: batches
        quantize: int8 or int4 weights, as for sample; none by default
        group_size: int4: weights per quantization group
        tokenizer_path: the tokenizer.model to use; by default the checkpoint's own, else Llama 3's
        device: cpu, cuda, cuda:N or mps; by default cuda, then mps, then cpu
        dtype: float32, bfloat16 or float16; by default bfloat16 on a GPU that has it, else float32

    Returns:
        {"loss": float, "perplexity": float}
    """
    for flag, value in (("batch_size", batch_size), ("seq_len", seq_len), ("steps", steps)):
        check_number(f"--{flag} {value!r}", value, lambda v: v >= 1, "an integer >= 1", integer=True)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # its loss needs the whole output layer on one rank
        raise ValueError("eval runs in one process, not under torchrun (tensor parallelism is for sample and chat); "
                         "--quantize int8 fits Llama 3.1 70B on one H200")
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=seq_len, max_batch_size=batch_size, device=device,
                        dtype=dtype, quantize=quantize, group_size=group_size)
    model = llama.model
    loader = DistributedShardedDataLoader(data, batch_size, seq_len, vocab_size=model.params.vocab_size)
    loss = evaluate(model, loader, steps, model.tok_embeddings.weight.device, contextlib.nullcontext())
    print(f"{ckpt_dir}{f' ({quantize})' if quantize else ''}: loss {loss:.4f} | perplexity {math.exp(loss):.3f} | "
          f"{steps} batches of {batch_size} x {seq_len} tokens of {data}")
    return {"loss": loss, "perplexity": math.exp(loss)}


def demo(out_dir: str = "out/demo", data_dir: str = "data/pydoc", max_steps: int = 100, seed: int = 1337,
         device: Optional[str] = None):
    """The first run, needing no weights and no network: tokenize Python's own reference documentation
    (pydoc_data.topics, which ships with Python), train the `tiny` Llama 3.1-shaped model on it from scratch
    while the loss falls, save a checkpoint, load it back with Llama.build and sample from it. Under 2 minutes
    on 2 CPU cores.

    Args:
        out_dir: where the run goes (log.jsonl, loss.png, step_NNNNNN/); an earlier demo run there is replaced
        data_dir: where the documentation's shards go
        max_steps: training steps
        seed: the seed of the data split, the initial weights and the samples
        device: cpu, cuda, cuda:N or mps; by default cuda, then mps, then cpu
    """
    import pydoc_data.topics
    t0 = time.time()
    previous = [p for pattern in ("step_[0-9]*", "export_[0-9]*", "log.jsonl") for p in Path(out_dir).glob(pattern)]
    if previous:  # the demo's own output from an earlier run
        print(f"replacing the earlier demo run in {out_dir}", file=sys.stderr)
        for p in previous:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    docs = data_dir / "pydoc_topics.jsonl"
    atomic_write(docs, lambda tmp: tmp.write_text(
        "".join(json.dumps({"text": text}) + "\n" for _, text in sorted(pydoc_data.topics.topics.items()))))
    prepare(str(docs), out_dir=str(data_dir), val_fraction=0.05, seed=seed)
    print(f"\ntraining the tiny preset from scratch on {docs} ({max_steps} steps); the loss starts near "
          f"ln({VOCAB_SIZE}) = {math.log(VOCAB_SIZE):.2f}, the loss of a uniform guess\n")
    train(model="tiny", train_data=str(data_dir / "train_*.bin"), val_data=str(data_dir / "val_*.bin"),
          out_dir=out_dir, batch_size=4, seq_len=256, max_steps=max_steps, learning_rate=5e-3, warmup_steps=5,
          val_every=25, val_steps=4, seed=seed, device=device)
    ckpt = Path(out_dir) / f"step_{max_steps:06d}"
    llama = Llama.build(str(ckpt), max_seq_len=256, max_batch_size=2, device=device)
    prompts = ["The for statement", "A function definition"]
    rng = torch.Generator(device=llama.model.tok_embeddings.weight.device).manual_seed(seed)
    print(f"\nsamples from {ckpt} (temperature 0.8, top-p 0.95):")
    for p, r in zip(prompts, llama.text_completion(prompts, rng, temperature=0.8, top_p=0.95, max_gen_len=40)):
        print(f"  {p}{bold(r['generation'])}")
    print(f"\ndemo done in {time.time() - t0:.0f}s; try: python llama31.py sample --ckpt_dir {ckpt} "
          f"--prompt \"The with statement\" --max_seq_len 256")


# -----------------------------------------------------------------------------
# the command line: flags checked against each command's signature before fire runs it, values kept as typed

# Fire reads every value as a Python literal: "Hello, world" becomes a tuple, "None" becomes None, and a long
# prompt can exhaust ast.parse. So argv is checked here first, by each parameter's annotation: a value for a
# str (or Path) parameter is handed to fire as a quoted literal, which it reads back verbatim; bool, int and
# float values are checked; a flag the command does not take is an error naming the closest one.

def flag_kind(annotation) -> tuple[type, bool]:
    """(what a flag's text is read as: str, bool, int, float, or tuple for a str flag given once per item;
    whether None is allowed) from a parameter's annotation. Unannotated parameters take text."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (str if str in kinds else flag_kind(kinds[0])[0]), len(kinds) < len(typing.get_args(annotation))
    if annotation in (bool, int, float):
        return annotation, False
    return (tuple if tuple in (annotation, typing.get_origin(annotation)) else str), False


def command_flags(command: str) -> dict:
    """flag name -> inspect.Parameter, for every flag the command takes (tinystories passes prepare's on);
    *args (plot's run directories) under its own name."""
    params = dict(inspect.signature(COMMANDS[command]).parameters)
    if command == "tinystories":
        del params["kwargs"]
        params |= {k: v for k, v in inspect.signature(prepare).parameters.items() if k not in ("inputs", "out_dir")}
    return params


def read_flag_value(flag: str, param: inspect.Parameter, text: str):
    kind, optional = flag_kind(param.annotation)
    if kind in (str, tuple):
        return text  # verbatim
    if optional and text.lower() == "none":
        return None
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{flag} {text!r}: expected true or false (or {flag} / --no{flag[2:]} alone)")
        return text.lower() == "true"
    try:
        value = kind(text)  # int("1.5") and int("1e3") fail: an integer flag takes digits
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise ValueError(f"{flag} {text!r}: expected a finite number")
    return value


def is_flag(arg: str) -> bool:
    return arg.startswith("--") or re.match(r"-[A-Za-z]", arg) is not None  # as fire tells them: "-1" is a value


def parse_command_line(argv: list) -> tuple[str, list, dict]:
    """(command, positional arguments, flags) from argv, checked against the command's signature before any
    work starts: an unknown command or flag, a missing or malformed value or a required one missing is a
    ValueError; a flag given twice takes its last value. --flag alone sets a bool flag, --noflag clears it;
    --name=value and --name value both work; after a bare -- every argument is positional. -h / --help
    anywhere: (command, None, None)."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        return "", None, None
    command = argv[0]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        raise ValueError(f"{command!r} is not a command" + (f"; did you mean {close[0]}?" if close else "")
                         + f" (commands: {', '.join(COMMANDS)})")
    params = command_flags(command)
    varargs = next((p for p in params.values() if p.kind is p.VAR_POSITIONAL), None)
    positional, flags, rest = [], {}, list(argv[1:])
    while rest:
        arg = rest.pop(0)
        if arg == "--":
            positional += rest
            break
        if arg in ("-h", "--help"):
            return command, None, None
        if not is_flag(arg):
            positional.append(arg)
            continue
        key, has_value, text = arg.partition("=")
        name = key.lstrip("-").replace("-", "_")  # --max-seq-len is --max_seq_len, as in fire
        negated = not has_value and name.startswith("no") and name not in params and name[2:] in params
        if negated and flag_kind(params[name[2:]].annotation)[0] is bool:
            name, has_value, text = name[2:], True, "false"
        if name not in params or params[name].kind in (params[name].VAR_POSITIONAL, params[name].VAR_KEYWORD):
            close = difflib.get_close_matches(name, [n for n in params if n != getattr(varargs, "name", None)], n=1)
            raise ValueError(f"{key}: unknown flag" + (f"; did you mean --{close[0]}?" if close else
                                                       f"; see python llama31.py {command} --help"))
        flag, (kind, optional) = f"--{name}", flag_kind(params[name].annotation)
        if not has_value and kind is bool:
            # alone, a bool flag is true; a true or false (or None) that follows is its value, as fire reads it
            words = ("true", "false", "none") if optional else ("true", "false")
            has_value, text = True, rest.pop(0) if rest and rest[0].lower() in words else "true"
        if not has_value:
            if not rest or is_flag(rest[0]):
                raise ValueError(f"{flag} needs a value (write {flag}=VALUE for one that begins with -)")
            text = rest.pop(0)
        value = read_flag_value(flag, params[name], text)
        # a flag given again overrides (as in fire and argparse); a tuple flag collects one item per use
        flags[name] = flags.get(name, ()) + (value,) if kind is tuple else value
    # positional arguments fill the required parameters not given as flags, in order, then *args (fire would
    # fill optional ones too: `train data/x.bin` would become --ckpt_dir)
    for name, p in params.items():
        if positional and p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD and name not in flags:
            flags[name] = read_flag_value(f"--{name}", p, positional.pop(0))
    if positional and varargs is None:
        raise ValueError(f"unexpected argument {positional[0]!r}: flags are written --name value "
                         f"(see python llama31.py {command} --help)")
    missing = [n for n, p in params.items() if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
               and n not in flags]
    if missing:
        raise ValueError(f"--{missing[0]} is required (see python llama31.py {command} --help)")
    return command, positional, flags


def docstring_parts(fn: Callable) -> tuple[str, dict]:
    """(description, {parameter: meaning}) of a docstring with a Google-style Args: section (fire's
    format); a Returns: section is for Python callers and left out."""
    doc = inspect.getdoc(fn) or ""
    description, _, args = doc.partition("\nArgs:\n")
    meanings, name = {}, None
    for line in args.splitlines():
        if line and not line[0].isspace():  # the next section
            break
        m = re.match(r"\s+\**(\w+): (.*)", line)
        if m and (name is None or len(line) - len(line.lstrip()) <= indent):
            name, indent = m.group(1), len(line) - len(line.lstrip())
            meanings[name] = m.group(2)
        elif name and line.strip():
            meanings[name] += " " + line.strip()
    return description.split("\nReturns:")[0].strip(), meanings


def command_help(command: str) -> str:
    """What --help prints: the command's description, then one line per flag (wrapped to the terminal):
    its meaning from the docstring's Args: section and its default from the signature."""
    width = min(110, shutil.get_terminal_size().columns)
    if not command:
        lines = ["usage: python llama31.py COMMAND [--flag value ...]   (python llama31.py COMMAND --help: its flags)",
                 "", "commands:"]
        for name, fn in COMMANDS.items():
            first = docstring_parts(fn)[0].split(". ")[0].split("\n\n")[0].replace("\n", " ")
            lines.append(textwrap.fill(first, width, initial_indent=f"  {name:<12} ", subsequent_indent=" " * 15))
        return "\n".join(lines)
    fn, params = COMMANDS[command], command_flags(command)
    description, meanings = docstring_parts(fn)
    if command == "tinystories":
        meanings = docstring_parts(prepare)[1] | meanings
    required = [f"--{n} {n.upper()}" for n, p in params.items()
                if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    varargs = [f"{n.upper()} ..." for n, p in params.items() if p.kind is p.VAR_POSITIONAL]
    lines = [" ".join(["usage: python llama31.py", command, *required, *varargs, "[--flag value ...]"]), "",
             "\n\n".join(textwrap.fill(par, width) for par in description.split("\n\n")), "", "flags:"]
    for name, p in params.items():
        kind, _ = flag_kind(p.annotation)
        if p.kind is p.VAR_POSITIONAL:
            flag = name.upper()
        else:
            flag = f"--{name}" + {bool: "", int: " INT", float: " NUM"}.get(kind, " TEXT")
        if p.default is p.empty:
            default = " (required)" if p.kind is p.POSITIONAL_OR_KEYWORD else ""
        elif p.default is None:
            default = ""  # the meaning says what no value does
        elif kind is bool:
            default = f" (default: {'on' if p.default else 'off'}; --no{name} turns it off)" if p.default else \
                " (default: off)"
        else:
            shown = ", ".join(map(str, p.default)) if isinstance(p.default, tuple) else \
                f"{p.default:g}" if isinstance(p.default, float) else p.default
            default = f" (default: {shown})"
        text = meanings.get(name, "") + default
        if name == "model":
            text += f"; presets: {', '.join(PRESETS)}"
        lines.append(textwrap.fill(text, width, initial_indent=f"  {flag:<27} ", subsequent_indent=" " * 30))
    return "\n".join(lines)


def bold(text: str) -> str:
    """text in bold on a terminal; as it is in a pipe or a file"""
    return f"\033[1m{text}\033[0m" if sys.stdout.isatty() else text


def tune_cpu_allocator():
    """Keep freed memory for reuse instead of returning it to the kernel (glibc only; the command line only).
    CPU training allocates float32 logits of (rows, 128256) several times a step, each hundreds of MB: glibc
    serves such blocks with a fresh mmap and unmaps them on free, so every step faults in gigabytes of new
    zeroed pages (the demo spent 45% of its CPU time in the kernel). Served from the heap and kept, they are
    reused, at the price of a higher peak (the demo's: 2.7 to 4.3 GB instead of 2.1 to 2.5). Numerics do not
    change."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): leave the allocator alone
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    mallopt(M_MMAP_MAX, 0)  # no mmap per block: large blocks come from the heap too
    mallopt(M_TRIM_THRESHOLD, -1)  # and freed heap memory is never given back


COMMANDS = {"demo": demo, "sample": sample, "chat": chat, "train": train, "plot": plot, "eval": eval_checkpoint,
            "export": export, "merge": merge, "prepare": prepare, "tinystories": tinystories, "convert": convert}


def main(argv: Optional[list] = None):
    try:
        command, positional, flags = parse_command_line(sys.argv[1:] if argv is None else argv)
        if positional is None:
            print(command_help(command))  # printed, not paged (fire's help would open less on a terminal)
            return
        if command in ("train", "demo") and __name__ == "__main__":  # the program's allocator, not an importer's
            tune_cpu_allocator()
        import fire  # imported here so the module itself needs only torch and tiktoken
        import warnings
        # DCP warns on every save or load without a process group, which is how one process saves and export reads
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        # every value as a Python literal, which fire reads back exactly: a str stays the str that was typed
        fire.Fire(COMMANDS, command=[command, *map(repr, positional), *(f"--{k}={v!r}" for k, v in flags.items())],
                  serialize=lambda result: None)  # results are for Python callers (tests)
        sys.stdout.flush()  # a closed pipe shows here rather than in the interpreter's flush at exit
    except BrokenPipeError:  # `llama31.py sample ... | head -1`: the reader left; end quietly, as cat would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt:  # Ctrl-C (train saves and chat stops a reply themselves): no traceback
        print(file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (ValueError, OSError, FloatingPointError) as e:  # the user's to fix: one line, no traceback
        print(f"llama31: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
