"""Capsules: squash, dynamic routing (the axis of the softmax, the gradient path), the layers."""

import torch

from rcn_dist.model import PrimaryCapsules, RoutedCapsules, dynamic_routing, squash


def test_squash_keeps_direction_and_gives_length_s2_over_1_plus_s2():
    torch.manual_seed(0)
    s = torch.randn(50, 8, dtype=torch.float64) * torch.logspace(-1, 1, 50, dtype=torch.float64)[:, None]
    v = squash(s)
    n = s.norm(dim=1)
    torch.testing.assert_close(v.norm(dim=1), n**2 / (1 + n**2), rtol=1e-6, atol=0)
    torch.testing.assert_close(v / v.norm(dim=1, keepdim=True), s / n[:, None])
    # The paper's printed s/|s|^2 would give length 0.8 / 2 = 0.4 here.
    assert abs(squash(torch.tensor([2.0, 0.0])).norm().item() - 0.8) < 1e-6


def test_squash_of_zero_has_finite_value_and_gradient():
    s = torch.zeros(3, 4, requires_grad=True)
    v = squash(s)
    assert torch.equal(v, torch.zeros(3, 4))
    v.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_routing_couplings_sum_to_one_over_parents():
    torch.manual_seed(0)
    u_hat = torch.randn(2, 3, 7, 4)  # (B, n_parent, n_child, dim)
    for iters in (1, 2, 3):
        _, c = dynamic_routing(u_hat, iters)
        assert c.shape == (2, 3, 7)
        torch.testing.assert_close(c.sum(dim=1), torch.ones(2, 7))
    # With several iterations the couplings are no longer uniform: routing did something.
    assert c.std() > 1e-3


def test_one_routing_iteration_is_the_mean_over_parents():
    torch.manual_seed(0)
    n_child, n_parent = 7, 3  # unequal, so a softmax over the children gives a different answer
    u_hat = torch.randn(2, n_parent, n_child, 4)
    v, c = dynamic_routing(u_hat, 1)
    assert torch.equal(c, torch.full_like(c, 1 / n_parent))
    s = u_hat.sum(dim=2) / n_parent
    torch.testing.assert_close(v, squash(s), rtol=1e-6, atol=1e-7)


def test_routing_gradient_flows_only_through_the_last_iteration():
    """d v / d u_hat must equal that of squash(sum_i c_ij u_hat) with the final c held constant."""
    torch.manual_seed(0)
    u_hat = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    v, c = dynamic_routing(u_hat, 3)
    g = torch.randn_like(v)
    (grad,) = torch.autograd.grad((v * g).sum(), u_hat)
    u2 = u_hat.detach().clone().requires_grad_(True)
    v_ref = squash(torch.einsum("bji,bjid->bjd", c.detach(), u2))
    (grad_ref,) = torch.autograd.grad((v_ref * g).sum(), u2)
    torch.testing.assert_close(v, v_ref)
    torch.testing.assert_close(grad, grad_ref)


def test_routed_layer_predictions_are_per_pair_transforms():
    torch.manual_seed(0)
    layer = RoutedCapsules(n_child=6, child_dim=4, n_parent=3, parent_dim=5, iters=2)
    u = torch.randn(2, 6, 4)
    u_hat = layer.predictions(u)
    assert u_hat.shape == (2, 3, 6, 5)
    ref = torch.stack([torch.stack([torch.stack([layer.weight[i, j] @ u[b, i] for i in range(6)])
                                    for j in range(3)]) for b in range(2)])
    torch.testing.assert_close(u_hat, ref)
    v = layer(u)
    assert v.shape == (2, 3, 5) and (v.norm(dim=-1) < 1).all()


def test_primary_capsules_shape_and_order():
    torch.manual_seed(0)
    pc = PrimaryCapsules(in_ch=3, types=4, dim=2, kernel=3, stride=2)
    x = torch.randn(2, 3, 9, 11)
    u = pc(x)
    assert u.shape == (2, 4 * 4 * 5, 2)
    # Capsule (type k, y, x) holds channels k*dim .. k*dim+dim-1 at that position.
    raw = pc.conv(x)
    k, yy, xx = 2, 1, 3
    torch.testing.assert_close(u[:, k * 20 + yy * 5 + xx], squash(raw[:, k * 2:(k + 1) * 2, yy, xx]))


def _procedure_1(u_hat: torch.Tensor, r: int) -> torch.Tensor:
    """Sabour et al.'s Procedure 1, written as literally as possible: plain loops over one image.

    u_hat[j][i] is the prediction of child i for parent j (n_parent, n_child, dim)."""
    n_parent, n_child, _ = u_hat.shape
    b = [[0.0] * n_parent for _ in range(n_child)]  # line 2: b_ij <- 0
    for _ in range(r):  # line 3
        c = [torch.softmax(torch.tensor(b[i], dtype=u_hat.dtype), 0) for i in range(n_child)]  # line 4
        s = [sum(c[i][j] * u_hat[j, i] for i in range(n_child)) for j in range(n_parent)]  # line 5
        v = [squash(s[j]) for j in range(n_parent)]  # line 6
        for i in range(n_child):  # line 7: b_ij <- b_ij + u_hat(j|i) . v_j
            for j in range(n_parent):
                b[i][j] = b[i][j] + float(u_hat[j, i] @ v[j])
    return torch.stack(v)


def test_routing_matches_a_literal_loop_of_procedure_1():
    """A sign flip in the agreement update, s_j in place of v_j, or a softmax over the children
    changes these numbers: the batched routing must equal the paper's loop with r = 3."""
    torch.manual_seed(0)
    # Predictions with a shared direction per parent, so that agreements are large and routing matters.
    u_hat = torch.randn(3, 4, 6, 5, dtype=torch.float64) * 0.7 + torch.randn(3, 4, 1, 5, dtype=torch.float64)
    v, c = dynamic_routing(u_hat, 3)
    ref = torch.stack([_procedure_1(u_hat[b], 3) for b in range(3)])
    torch.testing.assert_close(v, ref, rtol=1e-12, atol=1e-12)
    # ... and the routing moved the answer away from the uniform first guess.
    assert (v - dynamic_routing(u_hat, 1)[0]).abs().max() > 1e-2
