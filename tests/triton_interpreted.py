"""Run by test_triton_kernels.py with TRITON_INTERPRET=1: the Triton kernels on CPU tensors against
autograd of the direct float64 formulas (RAA in every layout its kernels read without a copy; the
quadratic layer's 'fused' strategy, forward and both gradients) and against the reference code's
loop (ARR's class means)."""
import torch

from bionets.layers import arr_triton, quadratic_triton, raa_triton
from bionets.layers.quadratic import channel_quadratic


def direct(x, v, c, dim, relu):
    """RAA written out in float64: s = v . x + c (or c), y = x Phi(x + s) or max(0, x + s)."""
    s = c if v is None else (x * (v.view(-1, 1, 1) if dim == 1 else v)).sum(dim, keepdim=True) + c
    return torch.clamp_min(x + s, 0) if relu else x * torch.special.ndtr(x + s)


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_raa():
    torch.manual_seed(0)
    layouts = {"nchw": ((3, 5, 4, 6), 1, torch.contiguous_format), "channels_last": ((3, 5, 4, 6), 1, torch.channels_last),
               "tokens": ((2, 7, 13), -1, torch.contiguous_format), "wide": ((2, 3, 300), -1, torch.contiguous_format)}
    cases = 0
    for name, (shape, dim, fmt) in layouts.items():
        for relu in (False, True):
            for with_v in (True, False):
                x = torch.randn(shape).contiguous(memory_format=fmt)
                width = shape[dim]
                v = torch.randn(width) * 0.3 if with_v else None
                c = torch.tensor([0.2])
                layout = raa_triton.ncp_layout(x, dim)
                assert layout is not None, name
                y, s = raa_triton.forward(x, v, c, layout, relu)
                grad = torch.randn(shape)                          # contiguous: differs from channels_last x
                gx, gv, gc = raa_triton.backward(x, grad, s, v, layout, relu)
                xd = x.double().requires_grad_()
                vd = v.double().requires_grad_() if with_v else None
                cd = c.double().requires_grad_()
                yd = direct(xd, vd, cd, dim, relu)
                yd.backward(grad.double())
                assert y.stride() == x.stride() and gx.stride() == x.stride(), name
                errors = [rel_err(y, yd), rel_err(gx, xd.grad), rel_err(gc, cd.grad)] + ([rel_err(gv, vd.grad)] if with_v else [])
                assert max(errors) < 1e-5, (name, relu, with_v, errors)
                cases += 1
    assert raa_triton.ncp_layout(torch.randn(4, 6, 5, 3).transpose(2, 3), 1) is None   # H, W not one stride
    assert raa_triton.ncp_layout(torch.randn(3, 8, 4, 6)[:, :5], 1) is None             # not dense: outputs would differ
    print(f"checked {cases} RAA cases")


def check_quadratic():
    """channel_quadratic with strategy 'fused' (the Triton matmuls, products formed in registers):
    q_o = sum_ij Q[o,i,j] x_i x_j, dL/dx and dL/dQ, against float64 autograd of that sum."""
    torch.manual_seed(1)
    cases = 0
    # (1000, 33, 9): 4 row blocks per split, the last one partial (with dL/dS's programs capped at 60
    # where a GPU takes 1024: 9000 rows did it under the cap, 47 s in the interpreter); C = 128: the
    # widest the default sends to these kernels; (60, 16, 16): nothing to pad
    quadratic_triton.SPLIT_PROGRAMS = 60
    for rows, c, c_out in [(70, 5, 5), (150, 20, 7), (90, 33, 40), (1000, 33, 9), (40, 128, 6), (60, 16, 16)]:
        x = torch.randn(rows, c, requires_grad=True)
        q = (0.1 * torch.randn(c_out, c, c)).requires_grad_()
        out = channel_quadratic(x, q, strategy="fused")
        grad = torch.randn(rows, c_out)
        out.backward(grad)
        xd, qd = x.detach().double().requires_grad_(), q.detach().double().requires_grad_()
        want = torch.einsum("oij,mi,mj->mo", qd, xd, xd)
        want.backward(grad.double())
        errors = [rel_err(out, want), rel_err(x.grad, xd.grad), rel_err(q.grad, qd.grad)]
        assert max(errors) < 1e-5, (rows, c, c_out, errors)
        cases += 1
    x = torch.randn(40, 6)                                       # only one of the two gradients wanted
    q = (0.1 * torch.randn(4, 6, 6)).requires_grad_()
    channel_quadratic(x, q, strategy="fused").sum().backward()
    want = q.detach().double().requires_grad_()
    torch.einsum("oij,mi,mj->mo", want, x.double(), x.double()).sum().backward()
    assert rel_err(q.grad, want.grad) < 1e-5
    x.requires_grad_()
    channel_quadratic(x, q.detach(), strategy="fused").sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    x = torch.randn(30, 13, requires_grad=True)                  # second derivatives (create_graph), C padded
    q = (0.1 * torch.randn(3, 13, 13)).requires_grad_()
    g, = torch.autograd.grad(channel_quadratic(x, q, strategy="fused").square().sum(), x, create_graph=True)
    got = torch.autograd.grad(g.square().sum(), (x, q))
    xd, qd = x.detach().double().requires_grad_(), q.detach().double().requires_grad_()
    g, = torch.autograd.grad(torch.einsum("oij,mi,mj->mo", qd, xd, xd).square().sum(), xd, create_graph=True)
    assert max(rel_err(a, b) for a, b in zip(got, torch.autograd.grad(g.square().sum(), (xd, qd)))) < 1e-5
    from bionets.layers.quadratic import _fused_works
    with torch.inference_mode():                               # a first call in evaluation: the try needs autograd
        assert _fused_works(torch.device("cpu"))               # the kernels build and run: 'auto' may pick them
    print(f"checked {cases} quadratic cases")


def check_quadratic_compiled():
    """Under torch.compile the 'fused' strategy is one opaque operator (bionets::sym_quadratic) that
    runs the Triton kernels: torch.library.opcheck of it, and a compiled call against the eager one."""
    from bionets.layers.quadratic_sym import sym_quadratic_op
    from bionets.layers.quadratic_triton import fold
    torch.manual_seed(2)
    x = torch.randn(50, 12, requires_grad=True)
    q = (0.1 * torch.randn(5, 12, 12)).requires_grad_()
    torch.library.opcheck(sym_quadratic_op, (x, fold(q).detach().requires_grad_(), "fused"))
    want = channel_quadratic(x, q, strategy="fused")
    want_grads = torch.autograd.grad(want.square().sum(), (x, q))
    got = torch.compile(lambda a, b: channel_quadratic(a, b, strategy="fused"))(x, q)
    got_grads = torch.autograd.grad(got.square().sum(), (x, q))
    assert max([rel_err(got, want)] + [rel_err(a, b) for a, b in zip(got_grads, want_grads)]) < 1e-5
    print("checked the compiled quadratic operator")


def loop_class_means(mean, seen, r, y, a, after):
    """ARR's update as the reference code loops it, in float64: the first response of a class without
    a mean starts it; each sample's class mean right after (or before) its own update."""
    m, known, out = mean.double().clone(), seen.bool().clone(), torch.empty(r.shape, dtype=torch.float64)
    for j in range(r.shape[0]):
        for i, k in enumerate(y.tolist()):
            before = m[j, k].clone() if known[j, k] else r[j, i].double()
            m[j, k] = (1 - a) * before + a * r[j, i].double()
            known[j, k] = True
            out[j, i] = m[j, k] if after else before
    return out, m, known


def check_arr():
    torch.manual_seed(0)
    cases = 0
    # (layers in memory, layers hooked, classes, features, batch): one tile; several feature blocks
    # (1000 classes: 16 features a program); a partly filled memory
    for layers, hooked, classes, dim, n in ((1, 1, 10, 64, 40), (3, 2, 5, 7, 17), (1, 1, 1000, 40, 20), (2, 2, 100, 150, 24)):
        for after in (False, True):
            for update in (True, False):
                mean = torch.randn(layers, classes, dim)
                seen = (torch.rand(layers, classes) < 0.5).to(torch.uint8)
                r = torch.randn(hooked, n, dim)
                y = torch.randint(0, min(classes, 12), (n,))
                want, want_mean, want_seen = loop_class_means(mean[:hooked], seen[:hooked], r, y, 0.1, after)
                mean0, seen0 = mean.clone(), seen.clone()
                got = arr_triton.class_means(mean, seen, r, y, 0.1, after=after, update=update)
                assert rel_err(got, want) < 1e-5, (classes, dim, after)
                if update:
                    assert rel_err(mean[:hooked], want_mean) < 1e-5 and torch.equal(seen[:hooked].bool(), want_seen)
                    assert torch.equal(mean[hooked:], mean0[hooked:]) and torch.equal(seen[hooked:], seen0[hooked:])
                else:
                    assert torch.equal(mean, mean0) and torch.equal(seen, seen0)
                cases += 1
    print(f"checked {cases} ARR cases")


if __name__ == "__main__":
    check_arr()
    check_raa()
    check_quadratic()
    check_quadratic_compiled()
