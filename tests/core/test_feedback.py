import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cellm.core.codec import CodecSpec
from cellm.core.feedback import compress


@given(st.integers(1, 400), st.sampled_from([1.0, 0.5, 0.1, 0.01]), st.sampled_from(["fp32", "fp16", "int8"]),
       st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_error_feedback_conserves_what_was_dropped(n, d, values, seed):
    g = torch.Generator().manual_seed(seed)
    x, old = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1
    _, sent, new = compress(x, d, CodecSpec(values=values), residual=old)
    # what was sent plus what is kept equals what there was to send: nothing is lost, only delayed
    assert torch.allclose(sent.to_dense() + new, x + old, atol=1e-6)


def test_without_feedback_no_residual_is_kept():
    _, sent, new = compress(torch.tensor([3.0, -1.0, 0.5, 0.0]), 0.5, CodecSpec())
    assert new is None and sent.indices.tolist() == [0, 1]


def test_exact_zeros_are_not_sent():
    _, sent, _ = compress(torch.tensor([0.0, 2.0, 0.0, 0.0]), 1.0, CodecSpec())
    assert sent.indices.tolist() == [1] and sent.k == 1


def test_a_support_restricts_the_message_to_its_positions():
    x = torch.tensor([5.0, 1.0, 4.0, 2.0])
    _, sent, _ = compress(x, 0.5, CodecSpec(), support=torch.tensor([False, True, False, True]))
    assert sent.indices.tolist() == [1, 3]
