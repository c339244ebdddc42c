"""One short real run on a chosen device and precision, watched from outside the engine, and the checks that
compare two such runs. tests/gpu/test_gpu.py runs them on a GPU against the CPU; a CPU-only test runs the same
code CPU-vs-CPU so that a bug in the checks shows up before a GPU ever runs them.

The run goes through ``cellm.run``; what it cannot report is observed with torch's global module hooks and a
wrapper around :class:`cellm.models.flat.FlatView` (the one door between the model and the federated side):

- every forward pass reads the same word-embedding storage (one base model, shared by every client and the
  evaluation), on the chosen device, and its batches arrive there;
- linear layers compute in the chosen precision (bf16 autocast really on, fp32 really off);
- every flat vector read from or written into the model is a float32 CPU vector, and every tensor the server
  state and the clients' kept state hold (looked up while the run evaluates) is on CPU;
- on CUDA, the memory allocated while the run evaluates is one base model and less than two.

The model is a small BERT written to a folder with dropout 0 (``model.path``): CPU and CUDA draw different
dropout masks from the same seed, so with dropout the runs would differ by more than arithmetic.
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import cellm
from cellm.federated.client import ClientState
from cellm.federated.server import ServerState
from cellm.models.flat import FlatView

LEDGER_FIELDS = ("down_bytes", "down_nonzeros", "down_messages", "up_bytes", "up_nonzeros", "up_messages")
MIN_VOCAB = 1000  # an nn.Embedding at least this large is the word embedding (positions: 64, token types: 2)


@dataclass(frozen=True)
class Tolerance:
    """How far a run may drift from the reference: eval and train loss (absolute), accuracy (examples)."""

    loss: float
    accuracy_examples: int


# fp32 on a GPU differs from the CPU only in the order of sums and in last-bit differences of kernels (TF32 is off
# by default in PyTorch): ~1e-7..1e-6 relative an op. Perturbing every base weight by 1e-6 (relative) moved the
# losses of this setup by ~1e-6 over three rounds on CPU, and a top-k near-tie flipped by such noise moves one
# entry of a small delta. 1e-4 leaves a factor of 100; a real fault (a lost or doubled step, a wrong batch, a
# wrong precision) moves the loss by far more. Accuracy: at most 1 of the 64 held-out examples flips.
FP32 = Tolerance(loss=1e-4, accuracy_examples=1)
# bf16 keeps 8 bits of mantissa (2^-9 = 0.2% relative rounding an op) in the autocast forward of training and
# of evaluation. A bf16 run on CPU differed from fp32 by at most 5e-4 in loss over three rounds of this setup
# (hidden 32 and hidden 512); CUDA's autocast casts a slightly different set of ops (attention runs in bf16 on
# fused kernels), so 1e-2 allows 20x that, and 3 of 64 examples for argmaxes of a barely trained classifier
# that flip. A broken bf16 path (weights stepped in bf16, fp16 overflow, a lost update) moves the loss by more.
BF16 = Tolerance(loss=1e-2, accuracy_examples=3)


def save_small_bert(folder: Path, hidden: int = 32, intermediate: int = 64, heads: int = 2) -> int:
    """A random 2-layer BERT classifier for bbc's 5 labels, dropout 0, with MiniLM's tokenizer; returns the
    bytes of its parameters (what one copy of the base model takes on a device)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from cellm.models.registry import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=heads,
                        intermediate_size=intermediate, max_position_embeddings=64, num_labels=5,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        model = BertForSequenceClassification(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@dataclass
class Observed:
    """What one run reported (metrics rows, ledger totals) and what the hooks saw during it."""

    device: str
    precision: str
    test_examples: int  # held-out examples behind each accuracy
    rows: list[dict[str, Any]]
    totals: dict[str, int]
    adapter_devices: set[str]
    embedding_storages: set[int] = field(default_factory=set)  # data_ptr of each word-embedding weight used
    embedding_devices: set[str] = field(default_factory=set)
    batch_devices: set[str] = field(default_factory=set)
    linear_dtypes: set[torch.dtype] = field(default_factory=set)
    flat_vectors: set[tuple[str, torch.dtype]] = field(default_factory=set)  # (device, dtype) through FlatView
    state_devices: set[str] = field(default_factory=set)  # devices of tensors in server / client state
    states_seen: int = 0
    live_over_base: list[float] = field(default_factory=list)  # CUDA: allocated / one base model, at each eval


def observe(device: str, precision: str, model_dir: Path, cache_dir: str, base_bytes: int,
            rounds: int = 3, overrides: tuple[str, ...] = ()) -> Observed:
    """Run the ``tiny`` preset's federation (3 of 10 clients a round, eval every round) on ``model_dir``.

    FedAvg (server SGD with lr 1) and plain client SGD with a small step: the wide model learns steadily (the
    preset's Adam server step and client lr overshoot on it, and a run that diverges is a poor reference).

    ``comm.positions = bitmap``: its size depends only on N and k, whereas ``auto`` picks the smaller of bitmap
    and gaps per message, and gaps' size depends on which entries top-k kept, i.e. on the values. Error feedback
    is on so that the clients keep tensors between rounds, which the placement check then sees.
    """
    cfg = cellm.load_config(preset="tiny", overrides=[
        f"model.path='{model_dir}'", f"data.cache_dir='{cache_dir}'", f"run.device='{device}'",
        f"run.precision='{precision}'", "comm.positions='bitmap'", "comm.error_feedback_up=true", f"rounds={rounds}",
        "fl.eval_every=1", "server.optimizer='sgd'", "server.lr=1.0", "client.lr=0.02", "client.momentum=0.0",
        *overrides])
    obs = Observed(device, precision, cfg.data.max_test_examples, [], {}, set())
    cuda = device == "cuda"
    baseline = _cuda_baseline() if cuda else 0
    looked = [False]  # whether this evaluation was looked at already (one look per evaluation, not per batch)

    def pre_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not isinstance(module, torch.nn.Embedding) or module.num_embeddings < MIN_VOCAB:
            return
        obs.embedding_storages.add(module.weight.data_ptr())
        obs.embedding_devices.add(module.weight.device.type)
        obs.batch_devices.add(args[0].device.type)
        if torch.is_grad_enabled():  # training; what follows is looked at once an evaluation, the state settled
            looked[0] = False
            return
        if looked[0]:
            return
        looked[0] = True
        for o in gc.get_objects():
            if type(o) in (ServerState, ClientState):  # not isinstance: it wakes lazy modules up
                obs.states_seen += 1
                obs.state_devices |= {t.device.type for t in _tensors(o, set())}
        if cuda:
            obs.live_over_base.append((_cuda_live() - baseline) / base_bytes)

    def post_hook(module: torch.nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if type(module) is torch.nn.Linear and isinstance(out, torch.Tensor):
            obs.linear_dtypes.add(out.dtype)

    real_get, real_set = FlatView.get, FlatView.set

    def get(self: FlatView) -> torch.Tensor:
        vec = real_get(self)
        obs.flat_vectors.add((vec.device.type, vec.dtype))
        return vec

    def set_(self: FlatView, vec: torch.Tensor) -> None:
        obs.flat_vectors.add((vec.device.type, vec.dtype))
        real_set(self, vec)

    pre = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    post = torch.nn.modules.module.register_module_forward_hook(post_hook)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(FlatView, "get", get)
            mp.setattr(FlatView, "set", set_)
            res = cellm.run(cfg, save=False)
    finally:
        pre.remove()
        post.remove()
    obs.rows, obs.totals = res.metrics, dict(res.totals)
    obs.adapter_devices = {t.device.type for t in res.adapter.values()}
    return obs


def check_placement(obs: Observed) -> None:
    """One base model on the run's device, batches there, autocast as asked; vectors and state on CPU."""
    where = f"{obs.device}/{obs.precision}"
    assert len(obs.embedding_storages) == 1, f"{where}: forward passes used {len(obs.embedding_storages)} " \
                                             "different base models; the run should share one"
    assert obs.embedding_devices == {obs.device}, f"{where}: the base model lives on {obs.embedding_devices}"
    assert obs.batch_devices == {obs.device}, f"{where}: batches arrived on {obs.batch_devices}"
    expected = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[obs.precision]
    assert expected in obs.linear_dtypes, f"{where}: linear layers computed in {obs.linear_dtypes}"
    if obs.precision == "fp32":
        assert obs.linear_dtypes == {torch.float32}, f"{where}: fp32 run computed in {obs.linear_dtypes}"
    assert obs.flat_vectors == {("cpu", torch.float32)}, \
        f"{where}: vectors read from / written into the model were {obs.flat_vectors}, not float32 on CPU"
    assert obs.states_seen > 0, f"{where}: no server or client state was found while the run evaluated"
    assert obs.state_devices <= {"cpu"}, f"{where}: server / client state holds tensors on {obs.state_devices}"
    assert obs.adapter_devices == {"cpu"}, f"{where}: the returned adapter is on {obs.adapter_devices}"
    if obs.device == "cuda":
        assert obs.live_over_base, f"{where}: no evaluation pass was seen"
        worst = max(obs.live_over_base)
        assert min(obs.live_over_base) >= 1.0 and worst < 1.5, \
            f"{where}: CUDA memory allocated while evaluating was {worst:.2f} base models; expected one (and less " \
            "than two): a second copy of the model, or state kept on the GPU"


def compare(ref: Observed, other: Observed, tol: Tolerance) -> None:
    """The same bytes and nonzeros on the wire, round by round, and metrics within ``tol`` of ``ref``."""
    what = f"{other.device}/{other.precision} vs {ref.device}/{ref.precision}"
    assert other.totals == ref.totals, f"{what}: ledger totals differ: {other.totals} vs {ref.totals}"
    assert [r["round"] for r in other.rows] == [r["round"] for r in ref.rows]
    for a, b in zip(ref.rows, other.rows, strict=True):
        r = a["round"]
        assert {k: b[k] for k in LEDGER_FIELDS} == {k: a[k] for k in LEDGER_FIELDS}, f"{what}: round {r} ledger"
        assert "eval" in a and "eval" in b, f"round {r} was not evaluated"
        ea, eb = a["eval"], b["eval"]
        assert abs(eb["loss"] - ea["loss"]) <= tol.loss, \
            f"{what}: round {r} eval loss {eb['loss']:.6f} vs {ea['loss']:.6f} (tolerance {tol.loss})"
        n = ref.test_examples
        flips = round(abs(eb["accuracy"] - ea["accuracy"]) * n)
        assert flips <= tol.accuracy_examples, \
            f"{what}: round {r} accuracy {eb['accuracy']} vs {ea['accuracy']} ({flips} of {n} examples)"
        if a["train_loss"] is not None or b["train_loss"] is not None:
            assert abs(b["train_loss"] - a["train_loss"]) <= tol.loss, \
                f"{what}: round {r} train loss {b['train_loss']:.6f} vs {a['train_loss']:.6f}"


def _tensors(obj: Any, seen: set[int]) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``obj`` through dataclass fields, dicts, lists and tuples."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _tensors(v, seen)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, f.name), seen)
    elif type(obj).__module__.startswith("cellm.") and hasattr(obj, "__dict__"):
        for v in vars(obj).values():
            yield from _tensors(v, seen)


def _clear_cublas_workspaces() -> None:
    """cuBLAS keeps a workspace (32 MiB on Hopper) per handle and stream in the caching allocator: not the run's."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def _cuda_live() -> int:
    torch.cuda.synchronize()
    _clear_cublas_workspaces()
    return torch.cuda.memory_allocated()


def _cuda_baseline() -> int:
    """Allocated CUDA memory before the run, after a warm-up matmul (fp32 and bf16, forward and backward) so that
    workspaces a torch without the clearing call keeps are counted here, not as the run's."""
    gc.collect()
    x = torch.randn(8, 16, device="cuda", requires_grad=True)
    lin = torch.nn.Linear(16, 16, device="cuda")
    lin(x).sum().backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        lin(x).float().sum().backward()
    del x, lin
    gc.collect()
    return _cuda_live()
