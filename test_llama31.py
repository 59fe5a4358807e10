"""Tests of llama31.py against Meta's reference (reference.py) on tiny random-weight checkpoints written in
Meta's real format. Run: python -m pytest -q test_llama31.py. GPU tests skip without CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llama31
from reference import reference_greedy, reference_logits, reference_model, reference_tokenizer
from tokenizer import Tokenizer, default_tokenizer_path

HERE = Path(__file__).parent
TOL = 1e-4  # max abs logit difference against Meta in float32; fixed, never loosened

# A tiny Llama 3.1: grouped-query attention (4 heads share 2 kv heads), scaled RoPE, Meta's FFN rounding.
TINY = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256, multiple_of=32,
            ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
SEQ, BATCH = 64, 4


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


def random_tokens(B, T, seed=1):
    return torch.randint(0, 128000, (B, T), generator=torch.Generator().manual_seed(seed))


# -----------------------------------------------------------------------------
# model parity with Meta


def test_defaults_on_cpu(llama):
    assert llama.model.tok_embeddings.weight.dtype == torch.float32
    assert llama.model.tok_embeddings.weight.device.type == "cpu"
    assert isinstance(llama.tokenizer, Tokenizer)


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


@pytest.mark.parametrize("n_files", [2, 4])
def test_model_parallel_files_merge_to_same_logits(tmp_path, tiny_sd, llama, n_files):
    ckpt = write_meta_checkpoint(tmp_path / f"mp{n_files}", TINY, tiny_sd, n_files)
    merged = llama31.Llama.build(str(ckpt), max_seq_len=SEQ, max_batch_size=BATCH, device="cpu")
    tokens = random_tokens(2, 16, seed=3)
    assert torch.equal(merged.model(tokens), llama.model(tokens))


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


# -----------------------------------------------------------------------------
# bad input: clear errors that name the problem


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


def test_vocab_size_must_match_tokenizer(tmp_path):
    params = {**TINY, "vocab_size": 1000}
    ckpt = write_meta_checkpoint(tmp_path / "c", params, random_state_dict(params))
    with pytest.raises(ValueError, match="vocab_size=1000 but the tokenizer has 128256"):
        llama31.Llama.build(str(ckpt), device="cpu")


def test_missing_tokenizer(tiny_ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        llama31.Llama.build(str(tiny_ckpt), tokenizer_path=str(tmp_path / "nope.model"), device="cpu")


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


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, str(HERE / "llama31.py"), *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def test_cli_errors_are_one_line_without_traceback(tmp_path):
    r = run_cli("sample", "--ckpt_dir", str(tmp_path / "missing"))
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"llama31: error: checkpoint directory {tmp_path / 'missing'} "
                                             "does not exist (or is not a directory)"]


def test_cli_sample_streams_a_completion(tiny_ckpt, llama):
    r = run_cli("sample", "--ckpt_dir", str(tiny_ckpt), "--prompt", "Hello", "--max_seq_len", "64",
                "--max_gen_len", "8", "--temperature", "0", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    expected = llama.text_completion(["Hello"], temperature=0, max_gen_len=8)[0]["generation"]
    assert r.stdout == "Hello" + expected + "\n"


def test_cli_bad_flag_value(tiny_ckpt):
    r = run_cli("sample", "--ckpt_dir", str(tiny_ckpt), "--top_p", "2", "--device", "cpu", "--max_seq_len", "64")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "top_p=2 must be in (0, 1]" in r.stderr


# -----------------------------------------------------------------------------
# GPU (bf16, flash attention, compiled decode): skipped without CUDA, run on the device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


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


# -----------------------------------------------------------------------------
# Hugging Face checkpoints, conversion both ways, chat


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
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name else 0.2 * torch.randn(p.shape, generator=g))
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
    assert params.hidden_dim == llama31.ModelArgs(**TINY).hidden_dim
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left


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


def test_chat_completion_uses_meta_dialog_tokens(llama):
    from reference import reference_dialog_tokens
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    prompt = reference_dialog_tokens(dialog)
    assert llama.formatter.encode_dialog_prompt(dialog) == prompt
    want = llama.tokenizer.decode(llama.generate([prompt], max_gen_len=10, temperature=0)[0])
    out = llama.chat_completion([dialog], temperature=0, max_gen_len=10)
    assert out == [{"generation": {"role": "assistant", "content": want}}]


def test_cli_chat_multi_turn(tiny_ckpt, llama):
    r = run_cli("chat", "--ckpt_dir", str(tiny_ckpt), "--max_seq_len", "64", "--max_gen_len", "4",
                "--temperature", "0", "--system", "Be brief.", "--device", "cpu", input="Hi\nAnd then?\n")
    assert r.returncode == 0, r.stderr
    first = llama.chat_completion([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
                                  temperature=0, max_gen_len=4)[0]["generation"]
    second = llama.chat_completion([[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                     first, {"role": "user", "content": "And then?"}]],
                                   temperature=0, max_gen_len=4)[0]["generation"]
    assert r.stdout == f"user> assistant> {first['content']}\nuser> assistant> {second['content']}\nuser> "
