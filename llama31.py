"""
Llama 3.1 in one file of PyTorch: the model, Meta-checkpoint loading, sampling, data and training.

    python llama31.py sample --ckpt_dir Llama3.1-8B --prompt "The capital of France is"
    torchrun --nproc_per_node 8 llama31.py train --ckpt_dir Llama3.1-8B --train_data "data/train_*.bin"

The numerics follow Meta's reference (llama_models.llama3) line for line where it matters: RMSNorm in
float32, RoPE in float32 with Llama 3.1's frequency scaling, float32 logits. test_llama31.py holds that
claim against Meta's own code (reference.py). Where this file deliberately differs from Meta's, a comment
marked "differs from Meta" says how and why.
"""

import dataclasses
import glob
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import ChatFormat, Tokenizer, default_tokenizer_path

# -----------------------------------------------------------------------------
# config and presets


@dataclass
class ModelArgs:
    # the keys of Meta's params.json
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None means n_heads (no grouped-query attention)
    vocab_size: int = 128256
    multiple_of: int = 256  # the SwiGLU hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = True
    # RoPE frequency scaling; Meta's code hard-codes these Llama 3.1 values. Llama 3.2 1B/3B use a factor
    # of 32 (Hugging Face configs carry it); Meta's params.json never does, so 8 is the default here.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_old_context_len: int = 8192
    tie_word_embeddings: bool = False  # Llama 3.2 1B/3B share the output layer with the embedding
    # runtime sizes, not part of the weights: the longest sequence and largest batch a run will use
    max_seq_len: int = 2048
    max_batch_size: int = 4

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model argument {name}={value!r} must be a positive integer")
        for name in ("norm_eps", "rope_theta", "rope_scale_factor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"model argument {name}={value!r} must be a positive number")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"dim={self.dim}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads} do not fit together: "
                "dim must split into n_heads heads of even size, and n_heads must be a multiple of n_kv_heads"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """The SwiGLU width, computed exactly as Meta's FeedForward does."""
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
                  "rope_old_context_len", "tie_word_embeddings"):
            if params[k] == getattr(defaults, k):
                del params[k]
        return params


# keys that some params.json files carry and that change nothing here
PARAMS_IGNORED = {"max_seq_len", "max_batch_size"}

# the published text models' shapes (Meta's params.json), and a small one for demos and tests
PRESETS = {
    "llama3.1-8b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3),
    "llama3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3),
    "llama3.1-405b": dict(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, multiple_of=4096,
                          ffn_dim_multiplier=1.2),
    "llama3.2-1b": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.5,
                        rope_scale_factor=32.0, tie_word_embeddings=True),
    "llama3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=1.0,
                        rope_scale_factor=32.0, tie_word_embeddings=True),
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64, tie_word_embeddings=True),
}


def preset(name: str, **runtime) -> ModelArgs:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelArgs(**PRESETS[name], **runtime)


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
        self.cache_k.index_copy_(2, input_pos, xk)
        self.cache_v.index_copy_(2, input_pos, xv)
        return self.cache_k, self.cache_v


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: Optional[KVCache] = None  # set only while generating

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        B, T, _ = x.shape
        xq = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        xq, xk, xv = xq.transpose(1, 2), xk.transpose(1, 2), xv.transpose(1, 2)  # (B, heads, T, head_dim)
        gqa = self.n_kv_heads != self.n_heads
        if self.cache is not None:
            keys, values = self.cache.update(input_pos, xk, xv)
        if self.cache is None or T > 1:
            # training, eval, and prefill (which always starts at position 0): the new tokens attend among
            # themselves, causally or by the document mask, through SDPA's flash / fused kernels
            y = F.scaled_dot_product_attention(xq, xk, xv, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        else:
            # one new token attends to every cached position up to its own; later slots are masked out
            visible = torch.arange(keys.size(2), device=x.device) <= input_pos  # (max_seq_len,)
            y = F.scaled_dot_product_attention(xq, keys, values, attn_mask=visible, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU


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
            h = layer(h, freqs_cis, input_pos, mask)
        return self.norm(h)

    def forward(self, tokens: torch.Tensor, input_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits (B, T, vocab_size) of every position. Without input_pos: the whole sequence,
        causal, no cache (training, eval, tests). With input_pos: through the KV cache (generation)."""
        return self.output(self.hidden(tokens, input_pos)).float()

    def setup_caches(self, batch_size: int, seq_len: int):
        """Give every layer a KV cache, reusing the present ones when the size is unchanged (so a compiled
        decode step replays its CUDA graph instead of recording a new one)."""
        first = self.layers[0].attention.cache
        if first is not None and first.cache_k.shape[0] == batch_size and first.cache_k.shape[2] == seq_len:
            return
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.cache = KVCache(batch_size, seq_len, self.params.n_kv_heads, self.params.head_dim,
                                            weight.device, weight.dtype)

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.cache = None


# -----------------------------------------------------------------------------
# generation: prefill, decode step, sampling, text and chat completion


def prefill(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """Run the prompt (which starts at position 0) through the model, filling the KV cache.
    tokens: (B, T); returns the logits of the last position, (B, vocab_size)."""
    return model(tokens, input_pos)[:, -1]


def decode_one_token(model: Transformer, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """One step: token (B, 1) at input_pos (1,) -> logits (B, vocab_size). This is the function that
    --compile turns into a single CUDA graph."""
    return model(token, input_pos)[:, -1]


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Nucleus sampling, as Meta's sample_top_p, drawing from an explicit generator.
    probs: (B, vocab_size) -> (B,) token ids."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    probs_sort[probs_sum - probs_sort > p] = 0.0  # drop tokens past the nucleus, keep the one crossing p
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
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
        self.decode = decode_one_token
        if compile:
            # each decode step becomes one CUDA-graph replay; the prefill stays eager (its shape varies,
            # and its matmuls are large enough to run at full speed without compilation)
            self.decode = torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True)

    @staticmethod
    def build(ckpt_dir: str, tokenizer_path: Optional[str] = None, max_seq_len: int = 512, max_batch_size: int = 4,
              device: Optional[str] = None, dtype: Optional[str] = None, compile: bool = False) -> "Llama":
        """Load a Meta checkpoint directory (params.json + consolidated.NN.pth) or a Hugging Face one
        (config.json + safetensors). device: cuda, then mps, then cpu by default; dtype: bfloat16 on a
        GPU that supports it, else float32."""
        device = pick_device(device)
        dtype = pick_dtype(dtype, device)
        t0 = time.time()
        model, tokenizer = load_model(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype)
        print0(f"loaded {ckpt_dir} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
               f"{dtype}, {device}) in {time.time() - t0:.1f}s", file=sys.stderr)
        return Llama(model.eval(), tokenizer, compile=compile)

    def check_sampling(self, temperature: float, top_p: float):
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")

    @torch.inference_mode()
    def generate(self, prompt_tokens: list[list[int]], max_gen_len: int, temperature: float = 0.6,
                 top_p: float = 0.9, echo: bool = False, sample_rng: Optional[torch.Generator] = None,
                 on_token: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None) -> list[list[int]]:
        """Complete a batch of token lists of different lengths, each stopping at its first stop token.
        Returns the new tokens of each prompt (with the prompt too if echo), without the stop token.
        on_token(tokens (B,), is_new (B,)) is called after every step, for streaming; is_new is False
        for rows still inside their prompt.

        As in Meta's loop, every row advances by one position per step from the shortest prompt's end;
        a row still inside its prompt takes its prompt token instead of the sampled one."""
        params = self.model.params
        self.check_sampling(temperature, top_p)
        bsz = len(prompt_tokens)
        if not 1 <= bsz <= params.max_batch_size:
            raise ValueError(f"{bsz} prompts given, but max_batch_size is {params.max_batch_size}; "
                             "pass a larger --max_batch_size or fewer prompts")
        lengths = [len(t) for t in prompt_tokens]
        if min(lengths) < 1:
            raise ValueError("an empty prompt was given; every prompt needs at least one token")
        if max(lengths) >= params.max_seq_len:
            raise ValueError(f"a prompt of {max(lengths)} tokens leaves no room to generate within "
                             f"max_seq_len={params.max_seq_len}; pass a larger --max_seq_len or a shorter prompt")
        if max_gen_len < 1:
            raise ValueError(f"max_gen_len={max_gen_len} must be at least 1")
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
                        temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
                        echo: bool = False) -> list[dict]:
        """Complete each prompt (a base model's task). Returns [{"generation": str}, ...]."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        out = self.generate(prompt_tokens, max_gen_len, temperature, top_p, echo, sample_rng)
        return [{"generation": self.tokenizer.decode(t)} for t in out]

    def chat_completion(self, dialogs: list[list[dict]], sample_rng: Optional[torch.Generator] = None,
                        temperature: float = 0.6, top_p: float = 0.9, max_gen_len: Optional[int] = None,
                        on_token=None) -> list[dict]:
        """Answer each dialog (a list of {"role", "content"} messages) as the assistant (an Instruct
        model's task). Returns [{"generation": {"role": "assistant", "content": str}}, ...]."""
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.formatter.encode_dialog_prompt(d) for d in dialogs]
        out = self.generate(prompt_tokens, max_gen_len, temperature, top_p, False, sample_rng, on_token)
        return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(t)}} for t in out]


# -----------------------------------------------------------------------------
# checkpoint loading and saving (Meta and Hugging Face formats)


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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_torch_file(path) -> dict:
    """A state dict, memory-mapped and with weights_only=True: nothing in the file can run code."""
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises many types for a corrupt or foreign file; all mean the same here
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return sd


# How Meta's model-parallel files (consolidated.00.pth ... .NN.pth) split each weight: column-parallel
# weights are cut along their output dim 0, row-parallel ones along their input dim 1; norms are whole in
# every file.
COLUMN_PARALLEL = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "feed_forward.w1.weight",
                   "feed_forward.w3.weight", "output.weight", "tok_embeddings.weight")
ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")


def read_meta_checkpoint(ckpt_dir: Path, **runtime) -> tuple[ModelArgs, dict]:
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
    shards = [load_torch_file(p) for p in paths]
    for sd in shards:
        sd.pop("rope.freqs", None)  # Llama 2's precomputed RoPE table; recomputed here
    for p, sd in zip(paths[1:], shards[1:]):
        if sd.keys() != shards[0].keys():
            diff = sorted(set(sd) ^ set(shards[0]))[:5]
            raise ValueError(f"{p} and {paths[0]} hold different weights (e.g. {diff}): not parts of one checkpoint")
    if len(shards) == 1:
        return args, shards[0]
    merged = {}
    for key in shards[0]:
        parts = [sd[key] for sd in shards]
        dim = 0 if key.endswith(COLUMN_PARALLEL) else 1 if key.endswith(ROW_PARALLEL) else None
        if dim is None:  # replicated
            merged[key] = parts[0]
            continue
        other = 1 - dim
        if any(t.ndim != 2 or t.shape[other] != parts[0].shape[other] for t in parts):
            raise ValueError(f"{key} has shapes {[tuple(t.shape) for t in parts]} across {ckpt_dir}'s files, "
                             f"which cannot be joined along dim {dim}: the files do not fit together")
        merged[key] = torch.cat(parts, dim=dim)
    return args, merged


def load_weights(model: Transformer, sd: dict, source: str, device: torch.device, dtype: torch.dtype):
    """Load sd strictly into a model built on the meta device, moving each tensor to device/dtype once."""
    if model.params.tie_word_embeddings:
        sd.pop("output.weight", None)  # the same tensor as the embedding
        sd["output.weight"] = sd.get("tok_embeddings.weight")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model its config describes: "
                         f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
                         f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for k, t in expected.items():
        if sd[k].shape != t.shape:
            raise ValueError(f"{source}: {k} has shape {tuple(sd[k].shape)}, but the config implies {tuple(t.shape)}")
        if not sd[k].is_floating_point():
            raise ValueError(f"{source}: {k} has dtype {sd[k].dtype}; weights must be floating point")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, strict=True, assign=True)
    if model.params.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.reset_rope()


def resolve_tokenizer(ckpt_dir: Path, tokenizer_path: Optional[str]) -> Tokenizer:
    if tokenizer_path is None:
        local = ckpt_dir / "tokenizer.model"  # Meta's download and our checkpoints bring one
        tokenizer_path = local if local.exists() else default_tokenizer_path()
    return Tokenizer(Path(tokenizer_path))


def load_model(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype) -> tuple[Transformer, Tokenizer]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} does not exist (or is not a directory)")
    if not any(ckpt_dir.iterdir()):
        raise FileNotFoundError(f"checkpoint directory {ckpt_dir} is empty: expected params.json and "
                                "consolidated.00.pth (Meta) or config.json and *.safetensors (Hugging Face)")
    runtime = dict(max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    args, sd = read_meta_checkpoint(ckpt_dir, **runtime)
    tokenizer = resolve_tokenizer(ckpt_dir, tokenizer_path)
    if args.vocab_size != tokenizer.n_words:
        raise ValueError(f"{ckpt_dir} has vocab_size={args.vocab_size} but the tokenizer has {tokenizer.n_words} "
                         "tokens; pass the checkpoint's own --tokenizer_path")
    with torch.device("meta"):
        model = Transformer(args)
    load_weights(model, sd, str(ckpt_dir), device, dtype)
    return model, tokenizer


# -----------------------------------------------------------------------------
# CLI


def stream_printer(tokenizer: Tokenizer):
    """An on_token callback that prints one sequence's new text as it is made, holding back an incomplete
    UTF-8 character until its last byte arrives."""
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
            print(text[printed:], end="", flush=True)
            printed = len(text)
    return on_token


EXAMPLE_PROMPTS = [
    "Clearly, the meaning of life is",
    "Simply put, the theory of relativity states that",
    "The repo llm.c on GitHub is",
    "Translate English to French:\n\nsea otter => loutre de mer\npeppermint => menthe poivrée\ncheese =>",
]


def sample(ckpt_dir: str, prompt: Optional[str] = None, tokenizer_path: Optional[str] = None,
           max_seq_len: int = 512, max_gen_len: int = 256, max_batch_size: int = 4, temperature: float = 0.6,
           top_p: float = 0.9, seed: int = 1, device: Optional[str] = None, dtype: Optional[str] = None,
           compile: bool = False, echo: bool = False):
    """Complete --prompt (streamed), or a few example prompts as one batch, with a base model."""
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, device, dtype, compile)
    llama.check_sampling(temperature, top_p)
    device = llama.model.tok_embeddings.weight.device
    rng = torch.Generator(device=device).manual_seed(seed)
    if prompt is not None:
        print(prompt, end="", flush=True)
        tokens = [llama.tokenizer.encode(str(prompt), bos=True, eos=False)]
        llama.generate(tokens, max_gen_len, temperature, top_p, sample_rng=rng, on_token=stream_printer(llama.tokenizer))
        print()
        return
    results = llama.text_completion(EXAMPLE_PROMPTS[:max_batch_size], rng, temperature, top_p, max_gen_len, echo)
    for p, r in zip(EXAMPLE_PROMPTS, results):
        print(f"{p}\033[1m{r['generation']}\033[0m\n" + "-" * 60)


def main():
    import fire  # imported here so the module itself needs only torch and tiktoken
    try:
        fire.Fire({"sample": sample})
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
        print(f"llama31: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
