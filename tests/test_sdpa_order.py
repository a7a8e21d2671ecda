"""A forced SDPA kernel order (``attn_backend: cudnn`` / ``flash``) leaves the process's default order as torch set it."""
from __future__ import annotations

import subprocess
import sys
import types

import pytest
import torch

import ldm.attention as attn
from ldm.attention import CUDNN_FIRST, FLASH_FIRST, attention, sdpa_in_order

# which kernel plain SDPA picks at SD-1.5's largest attention shape, in a fresh process, after "plain" (nothing),
# "ldm" (our flash-first backend) or "torch" (torch's own priority context, entered before any selection)
PROBE = """
import sys, torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from ldm.attention import FLASH_FIRST, attention
q = torch.randn(2, 8, 4096, 40, device="cuda", dtype=torch.float16)
if sys.argv[1] == "ldm":
    attention(q, q, q, backend="flash")
elif sys.argv[1] == "torch":
    with sdpa_kernel(FLASH_FIRST, set_priority=True):
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
print(SDPBackend(torch._fused_sdp_choice(q, q, q)).name)
"""


@pytest.mark.parametrize("order", [CUDNN_FIRST, FLASH_FIRST])
def test_a_forced_order_computes_attention_and_puts_the_order_back(order):
    q, k, v = (torch.randn(2, 4, 16, 8, dtype=torch.float64) for _ in range(3))
    before = torch._C._get_sdp_priority_order()
    out = sdpa_in_order(q, k, v, order)
    assert torch._C._get_sdp_priority_order() == before
    torch.testing.assert_close(out, attention(q, k, v, backend="math"))


def test_the_default_order_is_settled_once_per_process_before_an_order_is_forced(monkeypatch):
    calls = []

    def choice(q, k, v):
        calls.append(q.device.type)
        raise RuntimeError("no kernel for these inputs")  # settled all the same; the SDPA call itself says why

    monkeypatch.setattr(attn, "_SETTLED", set())
    monkeypatch.setattr(torch, "_fused_sdp_choice", choice)
    cpu = torch.zeros(1)
    attn.settle_default_order(cpu, cpu, cpu)  # CPU: torch has no order to settle
    assert calls == []
    cuda = types.SimpleNamespace(device=torch.device("cuda"))  # only its device is read before torch's selection
    for _ in range(3):
        attn.settle_default_order(cuda, cuda, cuda)
    assert calls == ["cuda"]


@pytest.mark.gpu
def test_plain_sdpa_picks_the_same_kernel_after_our_forced_order():
    def picked(case: str) -> str:
        run = subprocess.run([sys.executable, "-c", PROBE, case], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        return run.stdout.strip().splitlines()[-1]

    plain, ours, theirs = picked("plain"), picked("ldm"), picked("torch")
    print(f"plain SDPA picks {plain}; after attn_backend flash {ours}; after torch's context alone {theirs}")
    assert ours == plain
