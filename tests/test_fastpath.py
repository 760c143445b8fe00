"""The fast training step (channels-last, fused Adam, bf16 autocast with fp32 routing) against the
eager one: fp32 equal within 1e-5 relative, bf16 within 2e-2 of fp32 on the loss."""

import pytest
import torch

from rcn_dist.bench import CapsNetSabour, Options, rcn_step, train_step
from rcn_dist.config import preset
from rcn_dist.model import RoutedCapsules, dynamic_routing, squash

CPU = torch.device("cpu")


def _losses(make_step, steps: int = 3) -> list[float]:
    step = make_step()
    return [float(step()) for _ in range(steps)]


def _capsnet(opt: Options, batch: int = 4):
    def make():
        torch.manual_seed(0)
        x = (torch.rand(batch, 1, 28, 28) > 0.6).float()
        y = torch.randint(0, 10, (batch,))
        model = CapsNetSabour()
        return train_step(model, model.loss, (x, y), opt)

    return make


def _rcn(opt: Options, batch: int = 4):
    return lambda: rcn_step(preset("tiny"), batch, opt)


@pytest.mark.parametrize("build", [_capsnet, _rcn], ids=["capsnet", "rcn"])
def test_fast_fp32_equals_eager_before_and_after_an_adam_step(build):
    fast = _losses(build(Options(CPU, "fp32", fast=True)), steps=2)
    eager = _losses(build(Options(CPU, "fp32", fast=False)), steps=2)
    torch.testing.assert_close(torch.tensor(fast), torch.tensor(eager), rtol=1e-5, atol=0)
    assert fast[0] != fast[1]  # the fused Adam step did change the weights


@pytest.mark.parametrize("build", [_capsnet, _rcn], ids=["capsnet", "rcn"])
def test_bf16_loss_within_2e2_of_fp32(build):
    bf16 = _losses(build(Options(CPU, "bf16")), steps=1)
    fp32 = _losses(build(Options(CPU, "fp32", fast=False)), steps=1)
    for a, b in zip(bf16, fp32):
        assert abs(a - b) <= 2e-2 * abs(b), (bf16, fp32)
    assert bf16 != fp32  # autocast did run in bf16


def test_routing_runs_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = RoutedCapsules(12, 4, 3, 8, iters=3)
    u = torch.randn(2, 12, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u_hat = layer.predictions(u)
        v = layer(u)
    assert u_hat.dtype == torch.bfloat16  # the prediction matmul does use bf16
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, dynamic_routing(u_hat.float(), 3)[0], rtol=1e-6, atol=1e-7)


def test_squash_scale_form_equals_the_textbook_formula():
    torch.manual_seed(0)
    s = torch.randn(64, 8, dtype=torch.float64) * 3
    n2 = (s * s).sum(-1, keepdim=True)
    textbook = (n2 / (1 + n2)) * s / torch.sqrt(n2 + 1e-8)
    torch.testing.assert_close(squash(s), textbook, rtol=1e-12, atol=0)
