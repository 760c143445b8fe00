"""rcn_dist.model.cells against torch: the LSTM cell against nn.LSTMCell and the linear layer
against F.linear, values and every gradient, in fp64, fp32, bf16 and under CPU bf16 autocast; and
their op counts."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from rcn_dist.bench.base import count_events, rcn_inputs
from rcn_dist.config import preset
from rcn_dist.model import RCN
from rcn_dist.model.cells import LSTMCell, linear, lstm_cell

GRAD_NAMES = ("h'", "c'", "inp", "h", "c", "weight_ih", "weight_hh", "bias_ih", "bias_hh")


def _pair(n_in: int, hidden: int, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0):
    """torch's nn.LSTMCell and a cells.LSTMCell holding the same parameters."""
    torch.manual_seed(seed)
    ref = nn.LSTMCell(n_in, hidden, bias=bias).to(dtype)
    new = LSTMCell(n_in, hidden, bias=bias).to(dtype)
    new.load_state_dict(ref.state_dict())
    return ref, new


def _data(batch: int, n_in: int, hidden: int, dtype: torch.dtype, seed: int = 1):
    """inp (B, I), h, c (B, H) and upstream gradients dh', dc' (B, H). h and c away from 0 so
    that the saturating gates are exercised."""
    g = torch.Generator().manual_seed(seed)
    x, h, c = (torch.randn(batch, n, generator=g).to(dtype) for n in (n_in, hidden, hidden))
    return x, 2 * h, 2 * c, torch.randn(batch, hidden, generator=g), torch.randn(batch, hidden, generator=g)


def _run(cell: nn.Module, x, h, c, dh, dc, wanted=(True, True, True), autocast: bool = False):
    """cell(x, (h, c)) and the gradients of sum(dh' h' + dc' c') (None in dh or dc: that output
    unused) with respect to the inputs marked in `wanted` and every parameter: [h', c', then the
    gradients in GRAD_NAMES' order, None where not asked for]."""
    ins = [t.clone().requires_grad_(w) for t, w in zip((x, h, c), wanted)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = cell(ins[0], (ins[1], ins[2]))
    outs = [o for o, d in zip(out, (dh, dc)) if d is not None]
    grads_out = [d.to(o.dtype) for o, d in zip(out, (dh, dc)) if d is not None]
    wrt = [t for t in ins if t.requires_grad] + list(cell.parameters())
    got = iter(torch.autograd.grad(outs, wrt, grads_out, allow_unused=True))
    grads = [next(got) if t.requires_grad else None for t in ins] + [next(got) for _ in cell.parameters()]
    return [out[0].detach(), out[1].detach(), *grads]


def _assert_close(new, ref, rel: float, names=GRAD_NAMES):
    """Each tensor of `new` within rel * max |ref| of `ref`, in ref's dtype; None where ref's is."""
    for name, a, b in zip(names, new, ref):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
        err = (a.double() - b.double()).abs().max().item()
        assert err <= rel * b.double().abs().max().item(), (name, err)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("dtype", "rel"), [(torch.float64, 1e-10), (torch.float32, 1e-6)])
@pytest.mark.parametrize(("n_in", "hidden"), [(338, 128), (37, 24)])
def test_lstm_cell_equals_nn_lstmcell_values_and_every_gradient(bias, dtype, rel, n_in, hidden):
    """h', c' and the gradients of inp, h, c, both weights and both biases as nn.LSTMCell's: fp64
    to 1e-10 and fp32 to 1e-6 of each tensor's largest entry (a few fp32 ulps). Measured: equal to
    the bit at the small preset's encoder cell (338 -> 128); about 1e-7 in fp32 at 37 -> 24, where
    torch's per-gate sigmoid computes some columns in the kernel's scalar tail."""
    ref, new = _pair(n_in, hidden, bias, dtype)
    data = _data(5, n_in, hidden, dtype)
    got, want = _run(new, *data), _run(ref, *data)
    names = GRAD_NAMES if bias else GRAD_NAMES[:7]
    _assert_close(got, want, rel, names)


@pytest.mark.parametrize("wanted", [(True, False, False), (False, True, True), (False, False, False),
                                    (False, False, True)])
def test_only_the_requested_input_gradients_are_made(wanted):
    """Gradients asked for some of inp, h, c only (the weights' always): those equal torch's, the
    others are not computed (None)."""
    ref, new = _pair(19, 8, dtype=torch.float64)
    data = _data(3, 19, 8, torch.float64)
    _assert_close(_run(new, *data, wanted=wanted), _run(ref, *data, wanted=wanted), 1e-10)


@pytest.mark.parametrize("unused", ["h'", "c'"])
def test_one_output_unused(unused):
    """A gradient from c' alone (h' unused: the decoder's last h, say) or from h' alone: the Function
    gets None for the other (grads are not materialised) and still matches torch."""
    ref, new = _pair(19, 8, dtype=torch.float64)
    x, h, c, dh, dc = _data(3, 19, 8, torch.float64)
    dh, dc = (None, dc) if unused == "h'" else (dh, None)
    _assert_close(_run(new, x, h, c, dh, dc), _run(ref, x, h, c, dh, dc), 1e-10)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("n_in", "hidden"), [(338, 128), (37, 24)])
def test_under_cpu_bf16_autocast_as_nn_lstmcell_under_autocast(bias, n_in, hidden):
    """An fp32 cell under CPU bf16 autocast (`rcn bench --precision bf16`): the matmuls in bf16,
    f c, c' and h' in fp32 as for torch's composite cell under autocast, fp32 gradients; within
    bf16 rounding of nn.LSTMCell under the same autocast (2^-7 of each tensor's largest entry).
    Measured: equal to the bit, values and gradients."""
    ref, new = _pair(n_in, hidden, bias)
    data = _data(4, n_in, hidden, torch.float32)
    got, want = _run(new, *data, autocast=True), _run(ref, *data, autocast=True)
    assert got[0].dtype == got[1].dtype == torch.float32
    _assert_close(got, want, 2 ** -7, GRAD_NAMES if bias else GRAD_NAMES[:7])


def test_under_autocast_the_backward_runs_the_same_with_autocast_still_on():
    """A backward called inside the caller's autocast context (the Function switches it off for its
    own ops, backward too) gives what one outside it gives."""
    _, new = _pair(19, 8)
    x, h, c, dh, dc = _data(3, 19, 8, torch.float32)
    ins = [t.clone().requires_grad_() for t in (x, h, c)]
    grads = []
    for inside in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = new(ins[0], (ins[1], ins[2]))
            if inside:
                grads.append(torch.autograd.grad(out, ins, (dh, dc)))
        if not inside:
            grads.append(torch.autograd.grad(out, ins, (dh, dc)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_a_bf16_held_cell_runs_in_bf16_as_nn_lstmcell():
    """A cell held in bf16 as a whole (DeepSpeed's bf16 engine; its inputs cast by the caller):
    bf16 values and gradients, within bf16 rounding of nn.LSTMCell's (measured: equal to the bit)."""
    ref, new = _pair(37, 24, dtype=torch.bfloat16)
    data = _data(4, 37, 24, torch.bfloat16)
    got = _run(new, *data)
    assert all(t.dtype == torch.bfloat16 for t in got)
    _assert_close(got, _run(ref, *data), 2 ** -7)


def test_the_module_is_an_nn_lstmcell_with_its_state_dict_and_its_other_forms():
    """cells.LSTMCell is an nn.LSTMCell (isinstance checks, the FLOP counter's hooks) with the same
    state dict keys; unbatched input and a missing state go to torch's own forward."""
    ref, new = _pair(7, 5, dtype=torch.float64)
    assert isinstance(new, nn.LSTMCell) and list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(7, dtype=torch.float64)
    for a, b in zip(new(x), ref(x)):
        torch.testing.assert_close(a, b)
    xb = torch.randn(3, 7, dtype=torch.float64)
    for a, b in zip(new(xb), ref(xb)):
        torch.testing.assert_close(a, b)


def test_lstm_cell_runs_on_the_meta_device():
    """The FLOP counter runs the model on the meta device: shapes and dtypes come out, nothing is
    computed; a meta backward runs too."""
    w_ih, w_hh = torch.empty(32, 10, device="meta", requires_grad=True), torch.empty(32, 8, device="meta")
    b = torch.empty(32, device="meta")
    x, h, c = (torch.empty(3, n, device="meta") for n in (10, 8, 8))
    h2, c2 = lstm_cell(x, (h, c), w_ih, w_hh, b, b)
    assert h2.shape == c2.shape == (3, 8) and h2.device.type == "meta"
    (g,) = torch.autograd.grad(h2, w_ih, torch.empty_like(h2))
    assert g.shape == w_ih.shape


def test_rcn_with_the_written_out_cells_equals_rcn_with_torch_cells():
    """The whole model, fp64: RCN (its encoder and decoder cells cells.LSTMCell) against a copy
    whose cells are nn.LSTMCell with the same weights: the loss and every parameter's gradient to
    1e-10."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, T=3))
    torch.manual_seed(0)
    model = RCN(cfg.model).double()
    torch_cells = RCN(cfg.model).double()
    torch_cells.load_state_dict(model.state_dict())
    assert isinstance(model.encoder.rnn, LSTMCell) and isinstance(model.decoder.rnn, LSTMCell)
    for stack in (torch_cells.encoder, torch_cells.decoder):
        cell = nn.LSTMCell(stack.rnn.input_size, stack.rnn.hidden_size).double()
        cell.load_state_dict(stack.rnn.state_dict())
        stack.rnn = cell
    x, y, eps = (t.double() if t.is_floating_point() else t for t in rcn_inputs(cfg, 3))
    losses = [m.loss(x, y, eps)[0] for m in (model, torch_cells)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) <= 1e-10 * abs(losses[1].item())
    for (name, p), q in zip(model.named_parameters(), torch_cells.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).abs().max() <= 1e-10 * q.grad.abs().max() + 1e-300, name


# ------------------------------------------------------------------ linear
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 37), (4, 3, 37)])
@pytest.mark.parametrize(("dtype", "autocast", "rel"), [(torch.float64, False, 1e-10), (torch.float32, False, 1e-6),
                                                        (torch.bfloat16, False, 2 ** -7), (torch.float32, True, 2 ** -7)])
def test_linear_equals_f_linear(bias, shape, dtype, autocast, rel):
    """cells.linear against F.linear: the output and the gradients of x, W and b, in fp64, fp32,
    a bf16-held layer and under CPU bf16 autocast (bf16 output and matmuls, fp32 gradients for
    fp32 leaves), for a 2-D and a 3-D input. Measured: equal to the bit in every case."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(10, shape[-1], generator=g).to(dtype), torch.randn(10, generator=g).to(dtype)
    x = torch.randn(*shape, generator=g).to(dtype)
    d = torch.randn(*shape[:-1], 10, generator=g)
    results = []
    for fn in (linear, F.linear):
        ins = [t.clone().requires_grad_() for t in (x, w, b)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(ins[0], ins[1], ins[2] if bias else None)
        used = ins if bias else ins[:2]
        results.append([out.detach(), *torch.autograd.grad(out, used, d.to(out.dtype))])
    _assert_close(results[0], results[1], rel, ("out", "x", "weight", "bias"))


# ------------------------------------------------------------------ op counts
def _top_level_ops(prof) -> int:
    """Top-level aten ops of a profile (count_events' "aten": events named aten::... with no
    aten:: ancestor)."""
    return count_events(prof.events())["aten"]


def _ops_forward_backward(fn, ins, grads) -> tuple[int, int]:
    """(forward, backward) top-level aten ops of fn(*ins) and of autograd.grad of its outputs
    (torch.autograd.grad, not backward: no AccumulateGrad into .grad, which is the same for both
    and not the cell's). The second of two runs (the first warms up)."""
    for _ in range(2):
        with profile(activities=[ProfilerActivity.CPU]) as fwd:
            out = fn(*ins)
        out = out if isinstance(out, tuple) else (out,)
        with profile(activities=[ProfilerActivity.CPU]) as bwd:
            torch.autograd.grad(out, [t for t in ins if t.requires_grad], grads)
    return _top_level_ops(fwd), _top_level_ops(bwd)


@pytest.mark.parametrize("stack", ["enc", "dec"])
def test_the_written_out_cell_dispatches_fewer_aten_ops_than_nn_lstmcell(stack):
    """Forward + backward top-level aten ops of one cell call at the small preset's sizes, batch 2
    (encoder 338 -> 128, decoder 64 -> 128), every gradient wanted. Measured (torch 2.13, CPU):
    nn.LSTMCell 1 forward (aten::lstm_cell, a composite: its linears, sigmoids and tanhs run below
    it) + 29 backward = 30; cells.LSTMCell 13 + 15 = 28, for both cells."""
    m = preset("small").model
    n_in, hidden = (m.enc_rnn_in(), m.enc_hidden) if stack == "enc" else (m.dec_rnn_in(), m.dec_hidden)
    ref, new = _pair(n_in, hidden)
    x, h, c, dh, dc = _data(2, n_in, hidden, torch.float32)
    counts = {}
    for name, cell in (("torch", ref), ("cells", new)):
        ins = [t.clone().requires_grad_() for t in (x, h, c)] + list(cell.parameters())
        counts[name] = _ops_forward_backward(lambda x, h, c, *_, cell=cell: cell(x, (h, c)), ins, (dh, dc))
    assert sum(counts["cells"]) < sum(counts["torch"]), counts
    assert counts["cells"][1] < counts["torch"][1], counts


def test_linear_dispatches_fewer_aten_ops_than_f_linear():
    """Forward + backward top-level aten ops of the small preset's latent head (128 -> 2 z), batch
    2. Measured (torch 2.13, CPU): F.linear 1 + 8 (TBackward0's t, AddmmBackward0's t, mm, t, mm,
    t, sum, view) = 9; cells.linear 1 + 3 (sum, mm, tensordot) = 4."""
    m = preset("small").model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, m.enc_hidden, generator=g, requires_grad=True)
    w = torch.randn(2 * m.z_dim, m.enc_hidden, generator=g, requires_grad=True)
    b = torch.randn(2 * m.z_dim, generator=g, requires_grad=True)
    d = (torch.randn(2, 2 * m.z_dim, generator=g),)
    ref, new = _ops_forward_backward(F.linear, [x, w, b], d), _ops_forward_backward(linear, [x, w, b], d)
    assert sum(new) < sum(ref), (new, ref)


def test_the_linear_module_is_an_nn_linear_with_its_state_dict_and_values():
    """cells.Linear: an nn.Linear (isinstance, the same state dict keys and shapes), whose forward
    and gradients are F.linear's."""
    from rcn_dist.model.cells import Linear

    torch.manual_seed(0)
    ref, new = nn.Linear(37, 5), Linear(37, 5)
    new.load_state_dict(ref.state_dict())
    assert isinstance(new, nn.Linear) and list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 37, dtype=torch.float32, requires_grad=True)
    outs = [m(x) for m in (ref, new)]
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
    grads = [torch.autograd.grad(o.square().sum(), (x, m.weight, m.bias)) for o, m in zip(outs, (ref, new))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
