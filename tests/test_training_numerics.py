"""NaN and Inf propagate through the fused training path exactly as through
eager PyTorch, forward and backward: relu(NaN) = NaN (a max(v, 0) ReLU
would give 0), ReLU's gradient is threshold_backward on the output (a
NaN/Inf gradient where the output is 0 is dropped; a mask multiplication
would give NaN * 0 = NaN), and NaN statistics of one channel stay in that
channel. Each test compares the NaN and Inf patterns of the output, x's
gradient and every parameter's gradient with eager torchvision's, and the
finite values within a loose fp32 tolerance."""

import pytest
import torch
from training_cases import CASES, DEVICE, draw_input, models, needs_triton

pytestmark = needs_triton


def _same_pattern(name, got, want):
    got, want = got.cpu(), want.cpu().to(got.dtype)
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(got), torch.isinf(want)), f"{name}: Inf pattern differs"
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-3, atol=1e-3, msg=name)


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["identity", "projection"])
def test_nan_in_one_conv3_filter_stays_in_its_channel(case):
    """A NaN in conv3's filter for output channel c: y3[:, c], BN3's
    statistics of c and out[:, c] are NaN (relu(NaN) = NaN), the other
    channels are finite; backward spreads it as eager does."""
    c = 3

    def poison(block):
        block.conv3.weight[c, 0, 0, 0] = float("nan")

    _check_step(case, poison, None)


@pytest.mark.parametrize("where", ["clipped", "positive"])
def test_nan_and_inf_gradients(where):
    """NaN and Inf entries of the output gradient where the output is 0 are
    dropped (threshold_backward); where it is > 0 they reach BN3's sums."""
    case = CASES[1]

    def poison(grad, out):
        grad = grad.contiguous()
        pick = (out == 0) if where == "clipped" else (out > 0)
        idx = pick.contiguous().flatten().nonzero()[:2, 0]
        assert idx.numel() == 2
        grad.view(-1)[idx[0]] = float("nan")
        grad.view(-1)[idx[1]] = float("inf")
        return grad

    _check_step(case, None, poison)


def _check_step(case, poison_weights, poison_grad):
    """One step of eager torchvision and the fused block (fp32, same weights
    and x): poison_weights(block) edits parameters in place,
    poison_grad(grad, out) the output gradient (given eager's output). NaN
    and Inf patterns and finite values must agree for the output, x.grad,
    every parameter gradient and every buffer."""
    ref, eager, fused = models(case, torch.float32, "triton")
    x = draw_input(case, ref).to(device=DEVICE, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    outs, inputs = [], []
    for block in (eager, fused):
        if poison_weights is not None:
            with torch.no_grad():
                poison_weights(block)
        xi = x.clone().requires_grad_(True)
        outs.append(block(xi))
        inputs.append(xi)
    _same_pattern("out", outs[1].detach(), outs[0].detach())
    grad = torch.randn_like(outs[0])
    if poison_grad is not None:
        grad = poison_grad(grad, outs[0].detach())
    for y in outs:
        y.backward(grad)
    _same_pattern("x.grad", inputs[1].grad, inputs[0].grad)
    for (name, p1), (_, p2) in zip(eager.named_parameters(), fused.named_parameters()):
        _same_pattern(f"{name}.grad", p2.grad, p1.grad)
    for (name, b1), (_, b2) in zip(eager.named_buffers(), fused.named_buffers()):
        _same_pattern(name, b2, b1)
