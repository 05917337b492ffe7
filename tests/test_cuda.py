"""CUDA paths (AMP bf16/fp16, channels_last, DDP-free): skipped on machines without a GPU."""
import json

import pytest
import torch

from bionets.engine.trainer import train
from engine_helpers import fast_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_channels_last_training_on_cuda(tmp_path, amp):
    cfg = fast_config(tmp_path, "model.name=resnet20_cifar", "model.kwargs={img_size: 8}", "train.epochs=2",
                      f"train.amp={amp}", "train.channels_last=true", "train.device=cuda", name=amp)
    summary = train(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / amp / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in records)
    assert summary["final_top1"] > 50


@pytest.mark.parametrize("base", ["gelu", "relu"])
def test_raa_on_cuda_under_bf16_autocast_matches_the_float64_cpu_result(base):
    """The eager RAA function on CUDA, channels_last, under bf16 autocast: the same values and
    gradients as in float64 on the CPU, to bf16's precision; the output keeps the input's dtype."""
    from bionets.layers.raa import RAA
    torch.manual_seed(0)
    ref = RAA(8, base=base).double()
    with torch.no_grad():
        ref.v.normal_(0, 0.3)
        ref.c.fill_(0.2)
    gpu = RAA(8, base=base).cuda()
    gpu.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    xg = x.cuda().bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu(xg)
    assert out.dtype == torch.bfloat16
    g = torch.randn_like(x)
    out.backward(g.cuda().bfloat16())
    xr = xg.detach().double().cpu().requires_grad_()
    want = ref(xr)
    want.backward(g)
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=3e-2, atol=3e-2)
    z = xr.detach() + (xr.detach() * ref.v.detach().view(-1, 1, 1)).sum(1, keepdim=True) + ref.c.detach()
    # bf16 may flip ReLU's kink, and a flip changes the shift's gradient for the whole pixel
    away = ((z.abs() > 0.1).all(1, keepdim=True) if base == "relu" else torch.ones_like(z[:, :1], dtype=torch.bool)).expand_as(z)
    torch.testing.assert_close(xg.grad.double().cpu()[away], xr.grad[away], rtol=5e-2, atol=5e-2)
    if base == "gelu":
        for p, q in zip(gpu.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.double().cpu(), q.grad, rtol=5e-2, atol=0.5)
