"""The drawing step's LSTM cell and a linear layer as autograd Functions with written-out backwards.

On the CPU aten::lstm_cell is a composite op. Its forward is one top-level aten op (the linears,
chunk, sigmoids and tanhs run below it), but autograd records those ops one by one, and their
backward is 29 top-level ops per cell (AddmmBackward0 and TBackward0 twice, UnsafeSplitBackward0,
a SigmoidBackward0 per gate, ...; 33 in the model, with the gradients' accumulation over the T
steps). `lstm_cell` writes the backward out: one (B, 4H) gate gradient from one multiply, one
sigmoid_backward and a tanh_backward for g, feeding the four matmuls: 15 ops, for a forward of 13
(it dispatches from Python the ops the composite ran below it). 28 top-level ops a cell where
torch's are 30: the backward saves 14, the forward spends 12 of them. F.linear's TBackward0 and
AddmmBackward0 are 8 ops, `linear`'s backward 3 (9 and 4 with the forward). tests/test_cells.py
holds both to torch's, values and gradients, and has the counts.

The arithmetic is torch's, op for op: gates = (h W_hh^T + b_hh) + (inp W_ih^T + b_ih) as aten's
CPU cell adds them, c' = (f c) + (i g), the same sigmoid, tanh, sigmoid_backward, tanh_backward and
mm kernels on the same values. Measured: bitwise equal to nn.LSTMCell in fp32, fp64, bf16 and under
bf16 autocast, values and every gradient, at the model's sizes (H = 128). One sigmoid over all 4H
columns is the same function as torch's sigmoid per gate, but where H is not a multiple of the
SIMD width torch's per-gate call computes some columns in the kernel's scalar tail, which rounds
differently: an ulp here and there in fp32 (about 1e-7) at such sizes.

On CUDA (XPU, PrivateUse1) aten's cell is fused (two matmuls and one pointwise kernel each way,
_thnn_fused_lstm_cell): the Function's dozen pointwise ops a direction would launch more kernels,
so there `lstm_cell` is torch's (and on any other device but the CPU and the meta device, which
the FLOP counter uses).

Precision follows torch's. Under a caller's autocast (CPU bf16: `rcn bench --precision bf16` runs
the fp32 model so) the matmul operands are cast to the autocast dtype inside the Function, whose
ops, backward included, run with autocast off. c keeps its dtype, so that, as in torch's composite
cell under autocast, f c, c' and h' come out in the wider of c's dtype and the autocast dtype (fp32
for an fp32 state) and i g in the autocast dtype. A model held in bf16 as a whole runs the cell in
bf16; fp64 stays fp64. Each gradient is returned in its input's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rcn_dist.model.precision import autocast_on, cast_to, no_autocast

FUNCTION_DEVICES = ("cpu", "meta")
"""Device types on which lstm_cell runs the Function: the CPU, where aten::lstm_cell is the
composite, and the meta device. Elsewhere torch's cell (fused on CUDA, XPU and PrivateUse1
backends; nothing else measured)."""


def _cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else cast_to(t, dtype)


class _LSTMCellFn(torch.autograd.Function):
    """(inp (B, I), h (B, H), c (B, H), W_ih (4H, I), W_hh (4H, H), b_ih (4H,) or None, b_hh (4H,)
    or None, dtype) -> (h' (B, H), c' (B, H)).

    gates = (h W_hh^T + b_hh) + (inp W_ih^T + b_ih) in `dtype`, its columns the gates i, f, g, o;
    i, f, o = sigmoid, g = tanh; c' = f c + i g; h' = o tanh(c'). inp, h, the weights and biases
    are cast to `dtype`; c is not (see the module docstring).
    """

    @staticmethod
    def forward(ctx, inp, h, c, weight_ih, weight_hh, bias_ih, bias_hh, dtype):
        hidden = weight_hh.shape[1]
        x, hx, w_ih, w_hh = (cast_to(t, dtype) for t in (inp, h, weight_ih, weight_hh))
        # In aten's order (RNN.cpp's LSTMCell: linear_hh(hx).add_(linear_ih(input))), in place: the
        # sum is a fresh tensor nobody else holds. F.linear is one top-level op (t + addmm below it).
        gates = F.linear(hx, w_hh, _cast(bias_hh, dtype))
        gates.add_(F.linear(x, w_ih, _cast(bias_ih, dtype)))  # (B, 4H)
        # One sigmoid over all 4H columns (its g block unused) and a tanh of g's own pre-activations:
        # 4 ops where chunk + 3 sigmoids + tanh are 5. act's i, f, o blocks are torch's gates.
        act = gates.sigmoid()  # (B, 4H)
        i, f, _, o = act.chunk(4, 1)  # views, (B, H) each
        g = gates.narrow(1, 2 * hidden, hidden).tanh()  # (B, H)
        # As aten does it, (f c).add_(i g): an addcmul would be one op less, but it rounds f c + i g
        # differently (fused on this CPU build: up to an ulp in fp32), and the cell is kept exact.
        c_new = (f * c).add_(i * g)
        tc = c_new.tanh()
        # What the backward multiplies its first factors by, as one (B, 4H) tensor (one cat here
        # saves three muls and a cat there): the gate gradients before their activations' backward
        # are (d c' g, d c' c, d c' i, dh' tanh(c')), one multiply of [d c', d c', d c', dh'] by k.
        # tanh(c') is saved, not recomputed from c'; g and tc also on their own (2H a row more
        # memory), where slicing them out of k would be two ops more.
        k = torch.cat([g, c, i, tc], 1)
        ctx.save_for_backward(x, hx, w_ih, w_hh, act, f, o, g, tc, k)
        ctx.dtypes = (inp.dtype, h.dtype, c.dtype, weight_ih.dtype, weight_hh.dtype,
                      None if bias_ih is None else bias_ih.dtype, None if bias_hh is None else bias_hh.dtype)
        ctx.set_materialize_grads(False)  # an unused h' or c' brings None, not a tensor of zeros
        return o * tc, c_new

    @staticmethod
    def backward(ctx, dh, dc):
        if dh is None and dc is None:  # neither output got a gradient (grads are not materialised)
            return (None,) * 8
        if autocast_on(dh.device if dh is not None else dc.device):
            # A backward called under the caller's autocast: the Function's ops stay in its dtypes.
            with no_autocast(dh.device if dh is not None else dc.device):
                return _lstm_backward(ctx, dh, dc)
        return _lstm_backward(ctx, dh, dc)


def _lstm_backward(ctx, dh: Tensor | None, dc: Tensor | None) -> tuple[Tensor | None, ...]:
    """The gradients of _LSTMCellFn's 7 tensor inputs (and None for its dtype) from dh' and dc'
    (B, H), either of them None (that output unused). 15 ops with every gradient wanted.

    With c' = f c + i g and h' = o tanh(c'): d c'_total = dc' + tanh_backward(dh' o, tanh(c'));
    di = d c'_total g, df = d c'_total c, dg = d c'_total i, do = dh' tanh(c'), dc = d c'_total f;
    each through its activation's backward gives the gate gradient G (B, 4H), and then d inp = G
    W_ih, d h = G W_hh, d W_ih = G^T inp, d W_hh = G^T h, d b_ih = d b_hh = sum_B G.
    """
    x, hx, w_ih, w_hh, act, f, o, g, tc, k = ctx.saved_tensors
    need, dtypes = ctx.needs_input_grad, ctx.dtypes
    hidden = f.shape[1]
    if dh is not None:
        dct = torch.ops.aten.tanh_backward(dh * o, tc)
        if dc is not None:
            dct.add_(dc)  # dct is fresh, and in c's dtype as dc is
    else:  # h' unused: o's gate gets no gradient
        dct = dc
    # i g is a product in the gates' dtype, f c one in c's (wider under autocast: fp32 c, bf16
    # gates): i g's gradient comes to i and g in the gates' dtype, as autograd hands it to torch's
    # cell. An op only where the dtypes differ.
    dct_ig = cast_to(dct, act.dtype)
    first = torch.cat([dct_ig, dct, dct_ig, torch.zeros_like(dct) if dh is None else dh], 1)
    # (B, 4H): d i, d f, d g, d o, the gradients of the activations' outputs, in their dtype (under
    # autocast bf16, as autograd hands torch's cell its sigmoids' and tanh's gradients; else no op).
    d_act = cast_to(first * k, act.dtype)
    # sigmoid_backward over all 4H columns (right for i, f and o), then g's block overwritten in
    # place by its tanh_backward (out=): 4 ops where a backward per gate and a cat are 5.
    d_gates = torch.ops.aten.sigmoid_backward(d_act, act)  # (B, 4H)
    torch.ops.aten.tanh_backward.grad_input(d_act.narrow(1, 2 * hidden, hidden), g,
                                            grad_input=d_gates.narrow(1, 2 * hidden, hidden))
    dc_prev = cast_to(dct * f, dtypes[2]) if need[2] else None
    # b_ih and b_hh enter the gates alike: one sum serves both.
    db = d_gates.sum(0) if need[5] or need[6] else None
    d_inp = cast_to(d_gates.mm(w_ih), dtypes[0]) if need[0] else None
    d_h = cast_to(d_gates.mm(w_hh), dtypes[1]) if need[1] else None
    # G^T inp (4H, I) and G^T h (4H, H), in the weights' layout: tensordot is one top-level op (its
    # transpose is a view below it) where G.t().mm(inp) is two, and the same mm kernel.
    dw_ih = cast_to(torch.tensordot(d_gates, x, ([0], [0])), dtypes[3]) if need[3] else None
    dw_hh = cast_to(torch.tensordot(d_gates, hx, ([0], [0])), dtypes[4]) if need[4] else None
    db_ih = cast_to(db, dtypes[5]) if need[5] else None
    db_hh = cast_to(db, dtypes[6]) if need[6] else None
    return d_inp, d_h, dc_prev, dw_ih, dw_hh, db_ih, db_hh, None


def lstm_cell(inp: Tensor, state: tuple[Tensor, Tensor], weight_ih: Tensor, weight_hh: Tensor,
              bias_ih: Tensor | None = None, bias_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """torch's LSTM cell: inp (B, I), state (h, c), each (B, H), weights (4H, I) and (4H, H),
    biases (4H,) or None -> (h', c'), each (B, H). The Function on the CPU and the meta device,
    torch's own cell elsewhere (FUNCTION_DEVICES)."""
    h, c = state
    if inp.device.type not in FUNCTION_DEVICES:
        return torch.lstm_cell(inp, (h, c), weight_ih, weight_hh, bias_ih, bias_hh)
    if autocast_on(inp.device):  # the matmul operands in autocast's dtype, the ops with autocast off
        with no_autocast(inp.device):
            return _LSTMCellFn.apply(inp, h, c, weight_ih, weight_hh, bias_ih, bias_hh,
                                     torch.get_autocast_dtype(inp.device.type))
    return _LSTMCellFn.apply(inp, h, c, weight_ih, weight_hh, bias_ih, bias_hh, weight_ih.dtype)


class LSTMCell(nn.LSTMCell):
    """nn.LSTMCell whose batched forward with a state given is `lstm_cell` on the module's own
    parameters. The same parameters and state dict; a subclass rather than a call of lstm_cell from
    the caller, so that the module's forward still runs: the FLOP counter's forward hooks
    (rcn_dist.flops) and ZeRO-3's parameter gathering hang on it. Unbatched input or no state:
    torch's forward, as it does them."""

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        if hx is None or input.dim() != 2:
            return super().forward(input, hx)
        return lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class _LinearFn(torch.autograd.Function):
    """(x (..., in), W (out, in), b (out,) or None, dtype) -> x W^T + b (..., out), in `dtype`
    (x, W and b are cast to it)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        xc, wc = cast_to(x, dtype), cast_to(weight, dtype)
        ctx.save_for_backward(xc, wc)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.set_materialize_grads(False)
        return F.linear(xc, wc, _cast(bias, dtype))  # one top-level op

    @staticmethod
    def backward(ctx, d):
        if d is None:
            return None, None, None, None
        if autocast_on(d.device):
            with no_autocast(d.device):
                return _linear_backward(ctx, d)
        return _linear_backward(ctx, d)


def _linear_backward(ctx, d: Tensor) -> tuple[Tensor | None, ...]:
    xc, wc = ctx.saved_tensors
    return (*linear_grads(d, xc, wc, ctx.needs_input_grad[:3], ctx.dtypes), None)


def linear_grads(d: Tensor, xc: Tensor, wc: Tensor, need: tuple[bool, ...],
                 dtypes: tuple[torch.dtype | None, ...]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The gradients (d x, d W, d b) of y = xc wc^T + b from d = d loss / d y (..., out), where
    xc and wc are the matmul's operands as it ran: d x = d W, d W = d^T x, d b = sum d over the
    rows, each cast to its input's dtype in `dtypes` and only where `need` says. 4 ops for a 2-D
    x with every gradient wanted, where F.linear's TBackward0 and AddmmBackward0 are 8."""
    d2, x2 = d, xc
    if d.dim() != 2:  # (..., out): the matmuls want rows (view ops, only for these shapes)
        d2, x2 = d.reshape(-1, d.shape[-1]), xc.reshape(-1, xc.shape[-1])
    db = cast_to(d2.sum(0), dtypes[2]) if need[2] else None  # before the cast: in d's dtype
    d2 = cast_to(d2, wc.dtype)
    dx = None
    if need[0]:
        dx = d2.mm(wc)
        dx = cast_to(dx if d.dim() == 2 else dx.view(xc.shape), dtypes[0])
    dw = cast_to(torch.tensordot(d2, x2, ([0], [0])), dtypes[1]) if need[1] else None  # d^T x: see _lstm_backward
    return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) with a written-out backward: x (..., in), weight (out, in), bias
    (out,) or None -> (..., out), in the weights' dtype or the caller's autocast dtype."""
    if autocast_on(x.device):
        with no_autocast(x.device):
            return _LinearFn.apply(x, weight, bias, torch.get_autocast_dtype(x.device.type))
    return _LinearFn.apply(x, weight, bias, weight.dtype)


class Linear(nn.Linear):
    """nn.Linear whose forward is `linear`: the same parameters and state dict, 4 backward ops
    where F.linear's are 8 (its transposes are views, so the kernels are the same: two matmuls and
    a sum). A subclass, not a call of `linear` from the caller, for the reason LSTMCell is one:
    the module's own forward gathers its weights under ZeRO-3 and carries the FLOP counter's hooks."""

    def forward(self, input: Tensor) -> Tensor:
        return linear(input, self.weight, self.bias)
