"""Training-half tests, to be merged into test_llama31.py: data shards, DistributedShardedDataLoader,
prepare / tinystories, document-masked loss, the train loop (overfit, DDP vs accumulation, resume),
checkpoints against Meta's reference, and the training CLI's errors. Everything runs on the CPU with a
model of dim 32 (its vocabulary stays 128256, the size the Llama 3 tokenizer is checked against)."""

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llama31
from tokenizer import ChatFormat, Tokenizer, default_tokenizer_path

HERE = Path(__file__).resolve().parent
VOCAB = 128256
BOS, EOS = llama31.BOS_ID, 128001
NA = llama31.NOT_A_TARGET


def tiny_args(**kw) -> llama31.ModelArgs:
    return llama31.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, vocab_size=VOCAB,
                             max_seq_len=64, **kw)


def tiny_model(seed: int, **kw) -> llama31.Transformer:
    model = llama31.Transformer(tiny_args(**kw))
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """train() installs SIGINT/SIGTERM handlers and leaves them (see test_train_restores_signal_handlers);
    put pytest's back after every test so Ctrl-C still stops the session."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two processes share two cores
    return env


# -----------------------------------------------------------------------------
# shards and the loader


def loader(pattern, B, T, rank=0, world=1):
    return llama31.DistributedShardedDataLoader(str(pattern), B, T, rank, world, vocab_size=VOCAB)


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


def test_not_a_target_tokens_are_inputs_but_never_targets(tmp_path):
    ids = np.array([BOS, 10, 11, 12, 13, 14, 15, 16, 17, 18], dtype=np.uint64)
    hidden = np.array([1, 1, 1, 0, 0, 1, 0, 0, 1, 0], dtype=bool)  # e.g. a chat's header and user turn
    llama31.write_shard(tmp_path / "train_000000.bin", ids | np.where(hidden, NA, 0).astype(np.uint64))
    x, y = loader(tmp_path / "train_*.bin", 1, 9).next_batch()
    assert x.tolist() == [ids[:9].tolist()]  # inputs keep the bare token ids
    assert y.tolist() == [[-100, -100, 12, 13, -100, 15, 16, -100, 18]]


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


def test_loader_pattern_matching_no_file(tmp_path):
    pattern = str(tmp_path / "nothing_*.bin")
    with pytest.raises(FileNotFoundError, match=re.escape(repr(pattern))):
        loader(pattern, 2, 32)


# -----------------------------------------------------------------------------
# prepare and tinystories


def split_docs(paths) -> list:
    """The documents of shards, each starting at its BOS."""
    stream = np.concatenate([np.asarray(llama31.open_shard(p, VOCAB)) for p in sorted(paths)]).astype(np.int64)
    starts = np.flatnonzero((stream & (NA - 1)) == BOS).tolist() + [len(stream)]
    assert starts[0] == 0
    return [stream[a:b].tolist() for a, b in zip(starts, starts[1:])]


def test_prepare_writes_shuffled_bos_eos_documents_and_masks_chat(tmp_path):
    tok = Tokenizer(default_tokenizer_path())
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


def test_tinystories_from_a_local_archive(tmp_path):
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
    tok = Tokenizer(default_tokenizer_path())
    docs = split_docs(written["train"] + written["val"])
    assert sorted(tok.decode(d) for d in docs) == sorted(
        f"<|begin_of_text|>Once upon a time {i}.{j}<|end_of_text|>" for i in range(2) for j in range(3))
    assert len(split_docs(written["val"])) == 1  # round(0.2 * 6)


# -----------------------------------------------------------------------------
# document masking


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
    model = tiny_model(seed=3).eval()
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
    model = tiny_model(seed=4).eval()
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


# -----------------------------------------------------------------------------
# the train loop


B, T = 2, 32


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> Path:
    """A tiny random model saved as a checkpoint: train() builds from scratch only from a preset."""
    path = tmp_path_factory.mktemp("ckpt") / "init"
    llama31.save_checkpoint(tiny_model(seed=0), path, default_tokenizer_path())
    return path


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


def logged_losses(out_dir: Path) -> list:
    lines = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [(d["step"], d["loss"], d["norm"]) for d in lines if "loss" in d]


def test_ddp_two_processes_match_gradient_accumulation(init_ckpt, train_data, tmp_path):
    common = ["train", "--ckpt_dir", str(init_ckpt), "--train_data", train_data, "--val_data", "",
              "--batch_size", str(B), "--seq_len", str(T), "--max_steps", "4", "--learning_rate", "1e-3",
              "--warmup_steps", "1", "--device", "cpu"]
    ddp = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(HERE / "llama31.py"), *common, "--out_dir", str(tmp_path / "ddp")],
                           cwd=HERE, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    single = subprocess.run([sys.executable, str(HERE / "llama31.py"), *common, "--out_dir", str(tmp_path / "one"),
                             "--total_batch_size", str(2 * B * T)],
                            cwd=HERE, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    out = ddp.communicate(timeout=120)[0]
    assert ddp.returncode == 0, out[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    assert "grad_accum=1" in out and "2 process(es)" in out
    assert "grad_accum=2" in single.stderr
    a, b = logged_losses(tmp_path / "ddp"), logged_losses(tmp_path / "one")
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4]
    for (_, loss_a, norm_a), (_, loss_b, norm_b) in zip(a, b):
        assert loss_a == pytest.approx(loss_b, rel=1e-4, abs=0)
        assert norm_a == pytest.approx(norm_b, rel=1e-4, abs=0)
    assert a[-1][1] < a[0][1]  # and it trains


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
    state3 = torch.load(a_dir / "step_000003" / "train_state.pt", weights_only=True)
    fresh = loader(train_data, B, T)
    for _ in range(3):
        fresh.next_batch()
    assert state3["step"] == 3 and state3["loaders"] == [fresh.state_dict()]
    state_a = torch.load(a_dir / "step_000006" / "train_state.pt", weights_only=True)
    state_b = torch.load(b_dir / "step_000006" / "train_state.pt", weights_only=True)
    assert state_a["loaders"] == state_b["loaders"] and state_a["step"] == state_b["step"] == 6
    wa = torch.load(a_dir / "step_000006" / "consolidated.00.pth", weights_only=True)
    wb = torch.load(b_dir / "step_000006" / "consolidated.00.pth", weights_only=True)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("flags, message", [
    (["--total_batch_size", "100"], "--total_batch_size 100 must be a multiple of"),
    (["--device", "gpu9"], "--device 'gpu9' is not a device"),
    (["--train_data", "no_such_*.bin"], "no data shard matches 'no_such_*.bin'"),
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


# -----------------------------------------------------------------------------
# checkpoints: our loader and Meta's reference read what save_checkpoint writes


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_saved_checkpoint_reloads_exactly_and_in_meta_reference(tmp_path, tie):
    model = tiny_model(seed=5, tie_word_embeddings=tie).eval()
    ckpt = tmp_path / "ckpt"
    llama31.save_checkpoint(model, ckpt, default_tokenizer_path())
    assert sorted(p.name for p in ckpt.iterdir()) == ["consolidated.00.pth", "params.json", "tokenizer.model"]
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = BOS
    ours = model(tokens)
    llama = llama31.Llama.build(str(ckpt), max_seq_len=64, max_batch_size=2, device="cpu", dtype="float32")
    assert torch.equal(llama.model(tokens), ours)
    assert (llama.model.output.weight is llama.model.tok_embeddings.weight) == tie

    from reference import reference_logits, reference_model  # Meta's llama_models Transformer
    params = json.loads((ckpt / "params.json").read_text())
    sd = torch.load(ckpt / "consolidated.00.pth", map_location="cpu", weights_only=True)
    meta = reference_model(params, sd, max_seq_len=64, max_batch_size=2)  # loads strictly
    assert torch.allclose(reference_logits(meta, tokens), ours, rtol=0, atol=1e-4)
