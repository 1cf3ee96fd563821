"""NaN and Inf propagate through the fused training path exactly as through
eager PyTorch, forward and backward: relu(NaN) = NaN (a max(v, 0) ReLU
would give 0), ReLU's gradient is threshold_backward on the output (a
NaN/Inf gradient where the output is 0 is dropped; a mask multiplication
would give NaN * 0 = NaN), and NaN statistics of one channel stay in that
channel. Each test runs the poisoned step on the float64 torchvision
block, eager torchvision in fp32 and the fused block in fp32, and compares
the NaN and Inf patterns of the output, x's gradient, every parameter's
gradient and every buffer with both, and the finite values with the
package's tolerance rule (training_cases.close: 3x eager's error vs the
float64 block, plus the floor)."""

import pytest
import torch
from training_cases import CASES, DEVICE, close, draw_input, models, needs_triton

pytestmark = needs_triton


def _same_pattern(name, got, ref, eager):
    """got (fused) and eager have ref's (float64) NaN and Inf patterns, and
    got's finite values are within the tolerance rule of ref's."""
    got, ref, eager = got.detach().cpu(), ref.detach().cpu(), eager.detach().cpu()
    for what, t in (("fused", got), ("eager", eager)):
        assert torch.equal(torch.isnan(t), torch.isnan(ref)), f"{name}: {what}'s NaN pattern differs"
        assert torch.equal(torch.isinf(t), torch.isinf(ref)), f"{name}: {what}'s Inf pattern differs"
    finite = torch.isfinite(ref)
    if finite.any():
        close(name, got[finite], ref[finite], eager[finite])


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
    """One step of the float64 torchvision block, eager torchvision in fp32
    and the fused block in fp32 (same weights and x): poison_weights(block)
    edits parameters in place, poison_grad(grad, out) the output gradient
    (given eager's output). NaN and Inf patterns and finite values must
    agree (_same_pattern) for the output, x.grad, every parameter gradient
    and every buffer."""
    ref, eager, fused = models(case, torch.float32, "triton")
    x = draw_input(case, ref)
    outs, inputs = [], []
    for block in (ref, eager, fused):
        if poison_weights is not None:
            with torch.no_grad():
                poison_weights(block)
        dtype, device = (torch.float64, "cpu") if block is ref else (torch.float32, DEVICE)
        xi = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_(True)
        outs.append(block(xi))
        inputs.append(xi)
    _same_pattern("out", outs[2], outs[0], outs[1])
    grad = torch.randn_like(outs[0])
    if poison_grad is not None:
        grad = poison_grad(grad, outs[1].detach().double().cpu())
    for y in outs:
        y.backward(grad.to(device=y.device, dtype=y.dtype))
    _same_pattern("x.grad", inputs[2].grad, inputs[0].grad, inputs[1].grad)
    for (name, p0), (_, p1), (_, p2) in zip(ref.named_parameters(), eager.named_parameters(),
                                           fused.named_parameters()):
        _same_pattern(f"{name}.grad", p2.grad, p0.grad, p1.grad)
    for (name, b0), (_, b1), (_, b2) in zip(ref.named_buffers(), eager.named_buffers(), fused.named_buffers()):
        if name.endswith("num_batches_tracked"):
            assert b2.item() == b1.item() == b0.item(), name
        else:
            _same_pattern(name, b2, b0, b1)
