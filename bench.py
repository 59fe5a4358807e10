"""
Speed of llama31.py on one GPU, against the card's own limits measured in the same run. Random weights of
a preset shape, so no checkpoint is needed.

    python bench.py decode                      # Llama 3.1 8B shape, bf16 / int8 / int4, batch 1 and 8, compiled
    python bench.py decode --model llama3.1-70b --quantize int8,int4 --batch_sizes 1   # 70B on one H200
    python bench.py decode --quantize bf16 --hf # also transformers' static-cache compiled generate
    python bench.py decode --quantize bf16,int8 --batch_sizes 1 --max_seq_len 4096   # chat's KV cache size
    python bench.py matmuls                     # each weight matrix alone: bf16, int8, int4, tinygemm
    torchrun --nproc_per_node 2 bench.py decode --model llama3.1-70b --quantize bf16   # tensor-parallel, 2 GPUs
    python bench.py train --model llama3.2-1b   # training step: tok/s, MFU, peak memory
    torchrun --nproc_per_node 2 bench.py train --model llama3.1-8b --batch_size 1 --activation_checkpointing
    python bench.py train --model llama3.1-8b --batch_size 2 --lora_rank 8 [--quantize int4]   # LoRA, QLoRA
    python bench.py checkpoint --model llama3.2-3b # the pause a training checkpoint costs, its size and write time

Decode reads every weight once per step, so its ceiling is memory bandwidth: roofline tok/s per sequence =
measured copy bandwidth / bytes read per step: the weights in their stored format (int8 or int4 with their
scales), but not the embedding, of which a step reads one row per token; plus the KV cache's positions up to
the token (on average prompt_len + gen_len / 2: what a step must read, whatever the cache's size). Tensor-parallel,
the bytes one GPU reads (its slices and its kv heads), as all read theirs at once. Training is
matmul-bound: MFU is model FLOPs per second over --peak_flops, and the card's measured bf16 matmul rate is
printed beside it.
"""

import contextlib
import copy
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

import llama31
from llama31 import print0
from tokenizer import Tokenizer, default_tokenizer_path


def cuda_time(fn, repeat: int = 10) -> float:
    """Median seconds of fn() over `repeat` runs, timed with CUDA events after one warm-up run."""
    fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return sorted(times)[len(times) // 2]


def gpu() -> torch.device:
    if not torch.cuda.is_available():
        raise ValueError("bench.py times a CUDA GPU, and this PyTorch sees none (a CPU build, or no GPU)")
    return llama31.pick_device("cuda")


def measure_card(device) -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, dense bf16 matmul FLOP/s) of this card."""
    src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)  # 2 GiB, far past the L2
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / cuda_time(lambda: dst.copy_(src))
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    flops = 2 * n ** 3 / cuda_time(lambda: a @ b)
    return bw, flops


def random_model(name: str, device, dtype, max_seq_len: int, max_batch_size: int, quantize=None,
                 group_size: int = llama31.INT4_GROUP_SIZE, quantize_output: bool = True,
                 tp: Optional[llama31.TensorParallel] = None) -> llama31.Transformer:
    """A preset-shaped model with random weights (normal(0, 0.02), norms at one), ready to generate. Built on
    the meta device and given its weights tensor by tensor, drawn on the GPU as load_weights asks for them and
    quantized as they come with `quantize`: the path of a real checkpoint, and no bf16 70B ever exists. With
    tp, this rank's share only, drawn slice by slice: no GPU ever holds the whole 70B or 405B."""
    args = llama31.preset(name, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    if tp is not None:
        tp.check(args, f"the {name} preset", quantize, group_size)
    model = llama31.meta_model(args, quantize, group_size, device, quantize_output, tp)
    llama31.check_memory(model, device, dtype, f"the {name} preset", group_size, tp=tp)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama31.Transformer(args).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)

    def read(key, dim, start, stop):  # the whole weight, or rows / columns start:stop along dim
        shape = list(shapes[key])
        if dim is not None:
            shape[dim] = stop - start
        if key.endswith("norm.weight"):
            return torch.ones(shape, device=device, dtype=dtype)
        return torch.randn(shape, generator=g, device=device, dtype=dtype) * 0.02
    weights = llama31.CheckpointWeights(shapes, dict.fromkeys(shapes, dtype), read)
    llama31.load_weights(model, weights, f"random {name}", device, dtype, tp)
    model.eval()
    if quantize is None:
        model.fuse_weights()  # as Llama.build does
    return model


def weight_bytes_read(net: llama31.Transformer) -> int:
    """The bytes of weights one decode step reads: every linear layer and norm. Not the embedding, of which
    it reads one row per token (a tied output layer reads it whole, as the output layer)."""
    kinds = (torch.nn.Linear, llama31.RMSNorm, llama31.Int8Linear, llama31.Int4Linear)
    return sum(t.numel() * t.element_size() for m in net.modules() if isinstance(m, kinds)
               for t in m.state_dict().values())


def kv_bytes_read(args: llama31.ModelArgs, batch: int, kv_heads: int, prompt_len: int, gen_len: int) -> float:
    """The bf16 keys and values a decode step must read, on average over a generation: those of the
    positions up to its token (prompt_len + gen_len / 2), whatever the cache's size."""
    return 2 * args.n_layers * batch * kv_heads * (prompt_len + gen_len / 2) * args.head_dim * 2


def decode(model: str = "llama3.1-8b", prompt_len: int = 128, gen_len: int = 256, batch_sizes: tuple = (1, 8),
           compile: bool = True, hf: bool = False, profile: bool = False, quantize="bf16,int8,int4",
           group_size: int = llama31.INT4_GROUP_SIZE, quantize_output: bool = True, vocab_parallel: bool = True,
           max_seq_len: Optional[int] = None):
    """Time generation for each of --quantize (comma-separated: bf16, int8, int4; one model after another, in
    one run): compile warm-up, time to first token, decode tok/s, % of the bandwidth roofline, peak memory
    while loading and while generating. --group_size: int4's; --quantize_output False keeps the output
    layer in bf16 when quantizing. --profile: also print where one batch-1 generation's GPU time goes,
    kernel by kernel. --max_seq_len: llama31's KV cache positions (default prompt_len + gen_len; chat's is
    4096; transformers' static cache, --hf, stays prompt_len + gen_len). Under torchrun with N processes:
    tensor-parallel over N GPUs, rank 0 printing; --vocab_parallel False replicates the output layer instead
    of splitting it over the vocabulary."""
    modes = quantize.split(",") if isinstance(quantize, str) else list(quantize)  # fire may pass a tuple
    batch_sizes = (batch_sizes,) if isinstance(batch_sizes, int) else tuple(batch_sizes)  # --batch_sizes 1
    for mode in modes:
        if mode not in ("bf16", *llama31.QUANTIZE_CHOICES):
            raise ValueError(f"--quantize {mode!r} is not one of bf16, {', '.join(llama31.QUANTIZE_CHOICES)} "
                             "(give one or more, comma-separated)")
        llama31.check_quantize(None if mode == "bf16" else mode, group_size)
    max_seq_len = prompt_len + gen_len if max_seq_len is None else max_seq_len
    llama31.check_number("--max_seq_len", max_seq_len, lambda v: v >= prompt_len + gen_len,
                         f"a whole number of at least --prompt_len + --gen_len = {prompt_len + gen_len}", integer=True)
    tp, device = llama31.start_tensor_parallel(gpu())
    if tp is not None:
        if hf:
            raise ValueError("--hf runs transformers on one GPU: leave out torchrun")
        tp = dataclasses.replace(tp, vocab_parallel=vocab_parallel)
    gpus = torch.cuda.get_device_name() + (f" x {tp.world} (tensor-parallel; GiB: rank 0's)" if tp else "")
    bw, mm = measure_card(device)
    print0(f"{gpus}: copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s (each GPU)")
    rows = []
    for mode in modes:
        torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        net = random_model(model, device, torch.bfloat16, max_seq_len, max(batch_sizes),
                           None if mode == "bf16" else mode, group_size, quantize_output, tp)
        load_s, load_gib = time.time() - t0, torch.cuda.max_memory_allocated() / 2 ** 30
        args = net.params
        llama = llama31.Llama(net, Tokenizer(default_tokenizer_path()), compile=compile)
        llama.tokenizer.stop_tokens = []  # random weights: every run makes exactly gen_len tokens
        weight_bytes = weight_bytes_read(net)
        what = mode + (f" g{group_size}" if mode == "int4" else "")
        what += " (bf16 output)" if mode != "bf16" and not quantize_output else ""
        if tp is not None:
            what += f" TP{tp.world}" + ("" if tp.split_dim("output.weight", args) == 0 else " whole-out")
        print0(f"{what}: built in {load_s:.1f}s, peak {load_gib:.1f} GiB while building; a decode step reads "
               f"{weight_bytes / 1e9:.2f} GB of weights{' on each GPU' if tp else ''}", flush=True)
        for B in batch_sizes:
            prompts = torch.randint(0, 128000, (B, prompt_len), generator=torch.Generator().manual_seed(B)).tolist()
            t0 = time.time()
            llama.generate(prompts, gen_len, temperature=0)  # warm-up: compiles and records the CUDA graph
            torch.cuda.synchronize()
            warmup = time.time() - t0
            tokens = torch.tensor(prompts, device=device)
            net.setup_caches(B, max_seq_len)
            with torch.inference_mode():
                ttft = cuda_time(lambda: llama31.prefill(net, tokens, torch.arange(prompt_len, device=device)), 5)
            torch.cuda.reset_peak_memory_stats()
            torch.cuda.synchronize()
            t0 = time.time()
            llama.generate(prompts, gen_len, temperature=0)
            torch.cuda.synchronize()
            total = time.time() - t0
            per_seq = (gen_len - 1) / (total - ttft)  # decode steps per second, each making B tokens
            kv_heads = net.layers[0].attention.n_kv_heads  # this rank's, tensor-parallel
            roofline = bw / (weight_bytes + kv_bytes_read(args, B, kv_heads, prompt_len, gen_len))
            rows.append((f"llama31 {what} {'compiled' if compile else 'eager'}", B, warmup, ttft * 1000, per_seq * B,
                         100 * per_seq / roofline, load_gib, torch.cuda.max_memory_allocated() / 2 ** 30))
            print_table(model, prompt_len, gen_len, max_seq_len, rows, gpus)
            if profile and B == batch_sizes[0]:
                from torch.profiler import ProfilerActivity
                with torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    llama.generate(prompts, 64, temperature=0)
                    torch.cuda.synchronize()
                print0(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
        del llama, net
        torch._dynamo.reset()  # frees the CUDA graphs recorded for this model before the next is built
        torch.cuda.empty_cache()
    if hf:
        args = llama31.preset(model, max_seq_len=max_seq_len)
        bf16_bytes = weight_bytes_read(llama31.meta_model(args, None, group_size, device).to(torch.bfloat16))
        rows += hf_decode(args, device, prompt_len, gen_len, batch_sizes, bw, bf16_bytes)
        print_table(model, prompt_len, gen_len, max_seq_len, rows, gpus)


def matrix_shapes(args: llama31.ModelArgs) -> dict:
    """(out_features, in_features) of each weight matrix a decode step reads, as generation fuses them."""
    return {"wqkv": ((args.n_heads + 2 * args.n_kv_heads) * args.head_dim, args.dim),
            "wo": (args.dim, args.n_heads * args.head_dim), "w13": (2 * args.hidden_dim, args.dim),
            "w2": (args.dim, args.hidden_dim), "output": (args.vocab_size, args.dim)}


class Tinygemm(torch.nn.Module):
    """PyTorch's int4 product (aten._weight_int4pack_mm, tinygemm) of the same int4 numbers as Int4Linear: the peer
    of llama31's int4 kernel."""

    def __init__(self, w: torch.Tensor, group_size: int):
        super().__init__()
        q, scales_and_zeros = llama31.quantize_int4(w, group_size)
        inner_k_tiles = next(t for t in (8, 4, 2) if w.shape[1] % (16 * t) == 0)
        self.register_buffer("weight", torch.ops.aten._convert_weight_to_int4pack(q[:, ::2] << 4 | q[:, 1::2],
                                                                                   inner_k_tiles))
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.group_size = group_size

    def forward(self, x):
        return torch.ops.aten._weight_int4pack_mm(x, self.weight, self.group_size, self.scales_and_zeros)


def matmuls(model: str = "llama3.1-8b", rows: tuple = (1, 8, 1024), group_size: int = llama31.INT4_GROUP_SIZE):
    """Where a decode step's time goes, matrix by matrix: each weight matrix of a preset timed alone for each
    number of rows (a decode step's batch; 1024: a prefill's) in bf16 (cuBLAS), int8 (llama31's kernel up to
    llama31.INT8_KERNEL_ROWS rows, cuBLAS on converted weights above), int4 (llama31's kernel up to
    llama31.INT4_KERNEL_ROWS rows, cuBLAS on dequantized weights above) and, its peer, int4 through PyTorch's
    tinygemm: microseconds and the weights' bytes per second as % of the copy bandwidth. Each timing is one CUDA graph
    over enough copies of the matrix to pass the L2 cache, as a step reads every matrix once."""
    args = llama31.preset(model)
    llama31.check_quantize("int4", group_size)
    device = gpu()
    import triton.testing
    rows = (rows,) if isinstance(rows, int) else tuple(rows)
    bw, _ = measure_card(device)
    print(f"{model}, {torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s; us (% of it)")
    print(f"{'matrix':<8}{'out x in':>14}{'rows':>6}{'bf16':>16}{'int8':>16}{'int4':>16}{'tinygemm':>16}")
    g = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in matrix_shapes(args).items():
        w = torch.randn(n, k, generator=g, device=device, dtype=torch.bfloat16) * 0.02
        layers = {"bf16": torch.nn.Linear(k, n, bias=False, device="meta"),
                  "int8": llama31.Int8Linear(k, n, ("w",)),
                  "int4": llama31.Int4Linear(k, n, ("w",), group_size, tiled=True)}
        layers["bf16"].weight = torch.nn.Parameter(w, requires_grad=False)
        for kind in ("int8", "int4"):
            for key, v in layers[kind].to_empty(device=device).quantize(w).items():
                setattr(layers[kind], key, v)
        layers["tinygemm"] = Tinygemm(w, group_size)
        for m in rows:
            x = torch.randn(m, k, generator=g, device=device, dtype=torch.bfloat16)
            cells = []
            for layer in layers.values():
                nbytes = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                copies = [copy.deepcopy(layer) for _ in range(-(-(1 << 29) // nbytes))]  # 512 MB or more

                def run():
                    with torch.no_grad():
                        for c in copies:
                            c(x)
                seconds = triton.testing.do_bench_cudagraph(run, rep=40) / 1000 / len(copies)
                cells.append(f"{seconds * 1e6:8.1f} ({100 * nbytes / seconds / bw:3.0f}%)")
            print(f"{name:<8}{f'{n} x {k}':>14}{m:>6}" + "".join(f"{c:>16}" for c in cells), flush=True)
        del layers, w
        torch.cuda.empty_cache()


def print_table(model, prompt_len, gen_len, max_seq_len, rows, gpus):
    print0(f"\n{model}, prompt {prompt_len}, {gen_len} new tokens, KV cache of {max_seq_len}, {gpus}")
    print0(f"{'what':<40}{'batch':>6}{'warm-up s':>11}{'TTFT ms':>9}{'tok/s':>9}{'% roofline':>12}"
           f"{'load GiB':>10}{'peak GiB':>10}")
    for name, B, warm, ttft_ms, tps, pct, load, mem in rows:
        print0(f"{name:<40}{B:>6}{warm:>11.1f}{ttft_ms:>9.1f}{tps:>9.1f}{pct:>12.1f}{load:>10.1f}{mem:>10.1f}",
               flush=True)


def hf_decode(args, device, prompt_len, gen_len, batch_sizes, bw, weight_bytes):
    """transformers' LlamaForCausalLM with its static cache and compiled forward, on the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                         num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                         max_position_embeddings=prompt_len + gen_len, tie_word_embeddings=args.tie_word_embeddings)
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf = hf.to(dtype=torch.bfloat16).to_empty(device=device).eval()  # random weights: speed only
    # a static cache makes generate compile the forward itself (CUDA graphs, as transformers documents)
    hf.generation_config.cache_implementation = "static"
    rows = []
    for B in batch_sizes:
        ids = torch.randint(0, 128000, (B, prompt_len), device=device)
        kw = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0)
        t0 = time.time()
        hf.generate(ids, **kw)
        torch.cuda.synchronize()
        warmup = time.time() - t0
        t0 = time.time()
        hf.generate(ids, **kw)
        torch.cuda.synchronize()
        total = time.time() - t0
        kv_bytes = kv_bytes_read(args, B, args.n_kv_heads, prompt_len, gen_len)
        per_seq = gen_len / total
        rows.append(("transformers bf16 static+compile", B, warmup, float("nan"), per_seq * B,
                     100 * per_seq / (bw / (weight_bytes + kv_bytes)), float("nan"),
                     torch.cuda.max_memory_allocated() / 2 ** 30))
    del hf
    return rows


def random_frozen_base(args: llama31.ModelArgs, device, quantize: bool) -> llama31.Transformer:
    """A frozen bf16 base of random weights, built on the meta device and materialised one block at a time on
    device; with quantize, each block's linear layers go to 4 bits before the next block is made, so a bf16
    70B model never exists."""
    with torch.device("meta"):
        net = llama31.Transformer(args)
    net.to(dtype=torch.bfloat16).requires_grad_(False)
    g = torch.Generator(device=device).manual_seed(0)

    def materialise(module):
        module.to_empty(device=device)
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(1.0) if p.ndim == 1 else p.normal_(0, 0.02, generator=g)
    for layer in net.layers:
        materialise(layer)
        if quantize:
            llama31.quantize_block(layer, device)
    for module in (net.tok_embeddings, net.norm, net.output):
        materialise(module)
    if args.tie_word_embeddings:
        net.output.weight = net.tok_embeddings.weight
    net.reset_rope()
    return net


def train(model: str = "llama3.2-1b", batch_size: int = 4, seq_len: int = 2048, steps: int = 10,
          compile: bool = True, activation_checkpointing: bool = False, peak_flops: float = llama31.PEAK_FLOPS,
          doc_len: int = 0, lora_rank: int = 0, quantize: str = ""):
    """Time training steps on random tokens: float32 master weights, bf16 matmuls, fused AdamW.
    --doc_len N packs documents of N tokens into each row (a BOS every N tokens), so attention runs
    with document masking (flex attention on a GPU); 0: one document per row. One GPU:
    bf16 autocast. Under torchrun with several GPUs: FSDP2 (llama31.shard_model), built on the meta device
    and materialised shard by shard, so no GPU ever holds the whole float32 model.
    --lora_rank R: LoRA instead, the base frozen in bf16 and float32 adapters of rank R (alpha 2R) on every
    linear layer of the blocks; with --quantize int4 (one GPU): QLoRA, the blocks' linear layers in 4 bits.
    MFU then counts 4 FLOPs per frozen parameter (no weight gradients)."""
    world, device = start_gpus()
    _, mm = measure_card(device)
    args, net, opt, step = training(model, batch_size, seq_len, compile, activation_checkpointing, doc_len, device,
                                    world, lora_rank=lora_rank, quantize=quantize)
    B, T = batch_size, seq_len
    t0 = time.time()
    step()
    torch.cuda.synchronize()
    warmup = time.time() - t0
    torch.cuda.reset_peak_memory_stats()
    dt = cuda_time(step, steps)
    tps = B * T / dt  # per GPU
    flops = llama31.flops_per_token(args, T, frozen=bool(lora_rank))
    mfu = flops * tps / peak_flops
    method = "fp32 master + bf16 compute"
    if lora_rank:
        method = f"{'QLoRA (int4 base)' if quantize else 'LoRA (bf16 base)'} rank {lora_rank}, fp32 adapters"
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"\n{model} training on {world} GPU(s), B={B} T={T} per GPU, {method}"
              f"{', FSDP2' if world > 1 else ''}{', activation checkpointing' if activation_checkpointing else ''}, "
              f"{'compiled' if compile else 'eager'}{f', documents of {doc_len} tokens' if doc_len else ''}, "
              f"{torch.cuda.get_device_name()} "
              f"(measured bf16 matmul {mm / 1e12:.0f} TFLOP/s)")
        print(f"warm-up {warmup:.1f}s | {dt * 1000:.1f} ms/step | {tps:,.0f} tok/s per GPU | MFU {100 * mfu:.1f}% of "
              f"{peak_flops / 1e12:.0f} TFLOP/s ({100 * flops * tps / mm:.1f}% of measured)"
              f" | peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB", flush=True)
    if world > 1:
        dist.destroy_process_group()


def start_gpus() -> tuple[int, torch.device]:
    """(world size, this process's GPU); under torchrun with several GPUs, the NCCL process group too."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = gpu()
    return world, device


def training(model: str, batch_size: int, seq_len: int, compile: bool, activation_checkpointing: bool, doc_len: int,
             device: torch.device, world: int, lora_rank: int = 0, quantize: str = ""):
    """(args, model, AdamW, step()) of a preset-shaped model with random weights training on random tokens,
    as train's loop runs it (one GPU: bf16 autocast; several: FSDP2); lora_rank, quantize: as for `train`."""
    if quantize not in ("", "int4") or (quantize and not lora_rank):
        raise ValueError(f"--quantize {quantize!r}: only int4, and only with --lora_rank (QLoRA)")
    args = llama31.preset(model, max_seq_len=seq_len)
    lora = llama31.LoRAArgs(lora_rank, 2.0 * lora_rank, 0.0, tuple(llama31.LORA_TARGETS)) if lora_rank else None
    if lora is not None and world == 1:
        net = random_frozen_base(args, device, quantize == "int4")
        llama31.add_lora(net, lora, torch.Generator(device=device).manual_seed(1))
    else:
        with torch.device("meta"):
            net = llama31.Transformer(args)
        if lora is not None:  # FSDP2: a bf16 base sharded with the float32 adapters
            llama31.add_lora(net.to(dtype=torch.bfloat16), lora)
    net.checkpoint_activations = activation_checkpointing
    if world > 1:
        step_fn = llama31.shard_model(net, torch.bfloat16, compile)
        autocast = contextlib.nullcontext()  # FSDP's policy casts to bf16
    else:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    if lora is None or world > 1:
        net.to_empty(device=device)
        if args.tie_word_embeddings and world == 1:
            net.output.weight = net.tok_embeddings.weight
        torch.manual_seed(0)  # a script: the global RNG also seeds FSDP's sharded random init
        net.init_weights()
        net.reset_rope()
    if world == 1:
        step_fn = torch.compile(net) if compile else net
    opt = llama31.configure_optimizer(net, 1e-4, 0.1, device)
    B, T = batch_size, seq_len
    x = torch.randint(0, 128000, (B, T), device=device)
    if doc_len:
        x[:, ::doc_len] = llama31.BOS_ID
    y = torch.randint(0, 128000, (B, T), device=device)

    def step():
        with autocast:
            loss = step_fn(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return args, net, opt, step


def checkpoint(model: str = "llama3.2-3b", batch_size: int = 4, seq_len: int = 2048, out_dir: str = "bench_ckpt",
               compile: bool = True, activation_checkpointing: bool = False, export: bool = True, max_steps: int = 400,
               lora_rank: int = 0):
    """What a training checkpoint costs a run, with train's own Checkpointer: training steps (as `train` times
    them) with two asynchronous saves (the GPU default; the first also allocates the pinned host buffers the
    later ones reuse) and a blocking one (train --async_save False) for comparison, each after 4 more steps
    and once the one before is written and removed. Prints the median step, each save's pause (until
    training may go on), the steps run while the background write went on and their time over the median,
    the write's duration and the checkpoint's size on disk; with --export, how long rank 0 takes to export the
    last one to Meta's bf16 format (what --export_every does in the background). Each checkpoint is removed
    once measured: an 8B one takes 96 GB. The stall of a save = its pause + the excess of the steps during
    its write. --lora_rank R: a LoRA run's checkpoints (adapters and their AdamW state; no export)."""
    world, device = start_gpus()
    rank = int(os.environ.get("RANK", 0))
    _, net, opt, step = training(model, batch_size, seq_len, compile, activation_checkpointing, 0, device, world,
                                 lora_rank=lora_rank)
    adapter = None
    if lora_rank:  # as train --lora_rank writes it; random weights have no base to name
        lora = llama31.LoRAArgs(lora_rank, 2.0 * lora_rank, 0.0, tuple(llama31.LORA_TARGETS))
        adapter, export = llama31.adapter_config(lora, "random weights", "none"), False
    out = Path(out_dir)
    if rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
    times, saves = [], []  # step seconds; (label, step, pause s, write s, GB, steps during the write)

    def timed_step():
        t0 = time.time()
        step()
        torch.cuda.synchronize()
        times.append(time.time() - t0)

    timed_step()  # warm-up (compilation)
    times.clear()
    with llama31.Checkpointer(out, async_save=True, device=device) as checkpointer:
        for label, blocking in (("first async", False), ("second async", False), ("blocking", True)):
            for _ in range(4):
                timed_step()
            n = len(times)
            t0 = time.time()
            checkpointer.save(n, net, opt, 0, 0, default_tokenizer_path(), blocking=blocking, adapter=adapter)
            pause = time.time() - t0
            written = []  # when this rank's part of the save is on disk (rank 0: and renamed into place)
            if blocking:
                written.append(time.time())
            else:
                checkpointer.pending.add_done_callback(lambda f: written.append(time.time()))
            while len(times) < max_steps:  # train while it is written, until every rank's part is
                all_written = torch.tensor(float(bool(written)), device=device)
                if world > 1:
                    dist.all_reduce(all_written, op=dist.ReduceOp.MIN)
                if all_written.item():
                    break
                timed_step()
            checkpointer.wait()
            write, during = (written[0] if written else time.time()) - t0, len(times) - n
            path = out / f"step_{n:06d}"
            size = sum(f.stat().st_size for f in path.iterdir()) / 1e9 if rank == 0 else 0.0
            saves.append((label, n, pause, write, size, times[n:n + during]))  # the steps that ran during the write
            if rank == 0 and not (blocking and export):
                shutil.rmtree(path)
            if world > 1:
                dist.barrier()
        for _ in range(4):
            timed_step()
    if rank == 0:
        median = sorted(times)[len(times) // 2]
        print(f"\n{model} training on {world} GPU(s), B={batch_size} T={seq_len} per GPU, "
              f"{torch.cuda.get_device_name()}: median step {median * 1000:.0f} ms over {len(times)} steps")
        for label, n, pause, write, size, during in saves:
            excess = sum(t - median for t in during)
            print(f"{label} save after step {n}: pause {pause:.2f} s | {len(during)} steps during the write, "
                  f"{excess:+.2f} s over the median | stall {pause + excess:.2f} s = {(pause + excess) / median:.1f} "
                  f"steps | written in {write:.1f} s | {size:.1f} GB on disk ({size / write:.2f} GB/s)", flush=True)
        if export:
            path = out / f"step_{saves[-1][1]:06d}"
            t0 = time.time()
            llama31.export(str(path), str(out / "export"))
            exported = sum(f.stat().st_size for f in (out / "export").iterdir()) / 1e9
            print(f"export of {path.name} to Meta's format in bf16: {time.time() - t0:.1f} s, {exported:.1f} GB",
                  flush=True)
        shutil.rmtree(out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    import fire
    try:
        fire.Fire({"decode": decode, "matmuls": matmuls, "train": train, "checkpoint": checkpoint},
                  serialize=lambda result: None)
    except ValueError as e:  # a bad flag value or no GPU: one line, no traceback, as llama31.py's errors
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
