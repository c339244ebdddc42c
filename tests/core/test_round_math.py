import pytest
import torch

from cellm.core.aggregate import aggregate
from cellm.core.ledger import Ledger
from cellm.core.schedule import density_at
from cellm.core.server_opt import ServerOptSpec, server_step
from cellm.core.sparse import SparseVector


def test_density_decays_every_period_starting_after_round_one():
    got = [density_at(0.5, 0.5, 2, t) for t in range(0, 7)]
    assert got == [0.5, 0.5, 0.5, 0.25, 0.25, 0.125, 0.125]


def test_density_without_decay_is_constant():
    assert {density_at(0.25, 1.0, 1, t) for t in range(1, 20)} == {0.25}


def test_mean_aggregation_divides_by_the_number_of_clients_counting_missing_entries_as_zero():
    a = SparseVector(4, torch.tensor([0, 2]), torch.tensor([2.0, 4.0]))
    b = SparseVector(4, torch.tensor([2]), torch.tensor([2.0]))
    assert aggregate([a, b]).tolist() == [1.0, 0.0, 3.0, 0.0]


def test_weighted_aggregation_weights_by_example_count():
    a = SparseVector.from_dense(torch.tensor([1.0, 0.0]))
    b = SparseVector.from_dense(torch.tensor([4.0, 3.0]))
    assert aggregate([a, b], [3, 1]).tolist() == pytest.approx([1.75, 0.75])


def test_sgd_with_lr_one_and_dense_deltas_is_plain_fedavg_of_client_weights():
    torch.manual_seed(0)
    w = torch.randn(50)
    clients = [w + torch.randn(50) for _ in range(4)]
    deltas = [SparseVector.from_dense(w - c) for c in clients]  # delta = start - trained
    new_w, _ = server_step(w, aggregate(deltas), None, ServerOptSpec(name="sgd", lr=1.0))
    assert torch.allclose(new_w, torch.stack(clients).mean(0), atol=1e-6)


def test_server_step_moves_against_the_delta_and_leaves_its_inputs_untouched():
    w, g = torch.zeros(3), torch.tensor([1.0, -1.0, 0.0])
    new_w, state = server_step(w, g, None, ServerOptSpec(name="adamw", lr=0.1))
    assert new_w[0] < 0 < new_w[1] and new_w[2] == 0
    assert torch.equal(w, torch.zeros(3))
    again, state2 = server_step(new_w, g, state, ServerOptSpec(name="adamw", lr=0.1))
    assert state2["state"][0]["step"] == 2 and state["state"][0]["step"] == 1


def test_ledger_totals_equal_the_sum_of_recorded_message_lengths():
    led = Ledger()
    msgs = [(1, "down", 100, 10), (1, "down", 100, 10), (1, "up", 37, 5), (2, "up", 41, 6), (2, "down", 90, 9)]
    for t, d, b, k in msgs:
        led.record(t, d, b, k)
    tot = led.totals()
    assert tot["down_bytes"] == 290 and tot["up_bytes"] == 78
    assert tot["down_messages"] == 3 and tot["up_nonzeros"] == 11
    assert led.cum_bytes(1) == 237 and led.cum_bytes() == 368
    assert Ledger.from_state_dict(led.state_dict()).totals() == tot
