"""SLoRA as a two-stage run: the seeded subset, the SVD switch, resume across it, learning in both stages, and
one-stage runs untouched."""

import pytest
import torch
from safetensors.torch import load_file

from cellm.config import load_config
from cellm.core.codec import decode
from cellm.core.slora import scatter_delta, subset_indices, svd_lora_init
from cellm.data.types import Split
from cellm.federated.server import model_weights
from cellm.interface import api
from cellm.models.evaluate import evaluate
from cellm.runtime import runfolder as rf
from cellm.runtime.embedded import Simulator, simulate
from cellm.runtime.setup import load_setup
from cellm.runtime.stages import stage_config


def _cfg(cache_dir, *extra):
    return load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "rounds=6", "slora.stage1_rounds=3",
                                                 "slora.density=0.05", *extra])


def test_the_svd_start_is_the_best_rank_r_approximation_of_the_stage1_change():
    gen = torch.Generator().manual_seed(0)
    idx = subset_indices(12 * 10, 0.3, seed=3, module=0)
    delta = scatter_delta(torch.randn(idx.numel(), generator=gen), idx, (12, 10))
    a, b = svd_lora_init(delta, rank=3, scaling=2.0)
    approx = 2.0 * b @ a
    u, s, vh = torch.linalg.svd(delta.double())
    best = (u[:, :3] * s[:3]) @ vh[:3]
    assert torch.allclose(approx.double(), best, atol=1e-5)
    # Eckart-Young: no rank-3 matrix is closer; the error is the dropped singular values
    assert torch.isclose(torch.linalg.matrix_norm(delta.double() - approx.double()), s[3:].norm(), atol=1e-5)
    assert a.shape == (3, 10) and b.shape == (12, 3)


def test_a_rank_above_the_matrix_rank_leaves_the_extra_factors_zero():
    a, b = svd_lora_init(torch.ones(4, 3), rank=5, scaling=1.0)
    assert torch.allclose(b @ a, torch.ones(4, 3), atol=1e-5) and (a[3:] == 0).all() and (b[:, 3:] == 0).all()


def test_the_stage1_subset_comes_from_the_seed_so_server_and_client_agree_and_it_is_never_sent(cache_dir):
    cfg = _cfg(cache_dir)
    server, client = load_setup(cfg), load_setup(cfg)

    def subsets(setup):
        return [b for n, b in setup.loaded.model.named_buffers() if n.endswith("parametrizations.weight.0.idx")]

    assert len(subsets(server)) == 4  # query and value of the tiny model's 2 layers
    assert all(torch.equal(x, y) for x, y in zip(subsets(server), subsets(client), strict=True))
    assert not torch.equal(subsets(server)[0], subsets(load_setup(_cfg(cache_dir, "seed=1")))[0])
    # stage 1's vector is the subset's values (and the head): messages index into it, never into the matrices
    k = sum(x.numel() for x in subsets(server))
    head = sum(p.numel() for n, p in server.loaded.model.named_parameters() if p.requires_grad and "classifier" in n)
    assert server.flat.numel == k + head
    seen = []
    real = Simulator.run_clients

    def spy(self, plan, arrived):
        seen.extend(plan.tasks.values())
        return real(self, plan, arrived)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Simulator, "run_clients", spy)
        api.run(cfg, save=False)
    stage1 = [t for t in seen if t.stage == 1]
    assert stage1 and all(decode(t.download, max_n=10**7).n == k + head for t in stage1)
    assert all(decode(t.download, max_n=10**7).n > k + head for t in seen if t.stage == 2)


def test_a_slora_run_lowers_the_training_loss_in_both_stages(cache_dir, own_models, own_files):
    cfg = load_config(preset="tiny", overrides=[
        f"data.cache_dir='{cache_dir}'", f"model.path='{own_models['llama']}'", "data.name=files",
        f"data.path='{own_files['jsonl']}'", "data.text_column=text", "data.partition=iid", "data.num_clients=6",
        "data.seq_len=32", "data.min_client_size=2", "rounds=8", "slora.stage1_rounds=4",
        "slora.density=0.2", "client.lr=0.5", "fl.local_steps=4", "comm.down_density=1.0", "comm.up_density=1.0"])
    setup = load_setup(cfg)
    train = Split.concat(setup.data.clients)
    loss = {}

    def on_round(state, row):
        if state.round in (0, 4, 8):
            assert state.stage == (1 if state.round <= 4 else 2)
            setup.flat.set(model_weights(state, stage_config(cfg, state.stage), state.round + 1))
            loss[state.round] = evaluate(setup.loaded.model, train, "causal_lm")["loss"]

    simulate(cfg, setup, on_round=on_round)
    assert loss[4] < loss[0] - 0.005 and loss[8] < loss[4] - 0.005, loss


def test_a_run_stopped_after_the_switch_resumes_to_the_same_adapter_and_ledger(tmp_path, cache_dir, monkeypatch):
    cfg = _cfg(cache_dir, "run.checkpoint_every=1", "run.threads=1")
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    api.run(cfg, full)

    class Stop(Exception):
        pass

    real = rf.save_checkpoint

    def save_then_stop(out, state):
        real(out, state)
        if state["server"]["round"] == 4:  # one round into stage 2
            raise Stop

    monkeypatch.setattr(rf, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        api.run(cfg, stopped)
    monkeypatch.setattr(rf, "save_checkpoint", real)
    assert rf.load_checkpoint(stopped)["server"]["stage"] == 2
    api.resume(stopped)
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = rf.read_metrics(full), rf.read_metrics(stopped)
    strip = ("wall_s", "round_s", "eval_s", "overhead_s")
    assert [{k: v for k, v in r.items() if k not in strip} for r in ra] == \
           [{k: v for k, v in r.items() if k not in strip} for r in rb]


def test_slora_refuses_what_its_second_stage_cannot_do(cache_dir):
    from cellm.errors import ConfigError

    with pytest.raises(ConfigError, match="comm.init_relative"):
        _cfg(cache_dir, "comm.init_relative=true")
    with pytest.raises(ConfigError, match="slora.stage1_rounds"):
        _cfg(cache_dir, "slora.stage1_rounds=6")


@pytest.mark.parametrize(("extra", "down", "up"), [
    ([], 22947, 22950),
    (["comm.init_relative=true", "comm.codec_down=int4", "comm.codec_up=int4", "comm.error_feedback_up=true"],
     1635, 4356),
])
def test_one_stage_runs_send_the_same_bytes_as_before_stages_existed(cache_dir, extra, down, up):
    """Figures of the tiny preset measured on the code before staged runs were added (and before robust
    aggregation, whose bound changes the trajectory, so it is off here)."""
    cfg = load_config(preset="tiny", overrides=[f"data.cache_dir='{cache_dir}'", "run.threads=1",
                                                "robust.clip_factor=0", *extra])
    result = api.run(cfg, save=False)
    assert (result.totals["down_bytes"], result.totals["up_bytes"]) == (down, up)
    assert all("stage" not in row for row in result.metrics)
