"""--patch_chunk: its values, the auto rule, and chunked forwards that compute what one forward does."""
import copy

import pytest
import torch

from core.batchnorm import BNPlan
from core.config import parse_args
from core.step import CPU_ACTIVATION_BUDGET, auto_patch_chunk, build_model, patch_features

CPU = torch.device("cpu")


def args_with(*flags: str):
    return parse_args({"strategy": "ctopk_w", "head": "csi"}, ["--demo", *flags])


def test_flag_values():
    assert args_with().patch_chunk == "auto"
    assert args_with("--patch_chunk", "0").patch_chunk == 0
    assert args_with("--patch_chunk", "12").patch_chunk == 12
    for bad in ("-4", "all", "1.5"):
        with pytest.raises(SystemExit):
            args_with("--patch_chunk", bad)


def test_cpu_rule_keeps_the_largest_activation_within_the_budget():
    # a tile's largest activation: 64 channels at half its side, 4 bytes each
    assert auto_patch_chunk(CPU, 168, 64, 64) == 32  # 64-px tiles (128-px images): 256 KiB per tile
    assert auto_patch_chunk(CPU, 80, 128, 128) == 8  # resnet50 at 256 px: 1 MiB per tile
    assert auto_patch_chunk(CPU, 80, 128, 128, itemsize=2) == 16  # bf16 autocast
    assert auto_patch_chunk(CPU, 300, 256, 256) == 4  # never less than one task
    assert auto_patch_chunk(CPU, 32, 64, 64) == 0  # everything fits one forward
    for tiles, side in ((168, 64), (80, 128), (400, 96)):
        chunk = auto_patch_chunk(CPU, tiles, side, side)
        assert chunk % 4 == 0
        assert chunk * 64 * (side // 2) ** 2 * 4 <= CPU_ACTIVATION_BUDGET


@pytest.mark.parametrize("chunk", [4, 8, 12])
def test_chunked_forwards_equal_one_forward(chunk):
    # BatchNorm follows the reference's per-task calls, so whole-task chunks change nothing but rounding,
    # the running statistics included (folded call by call either way)
    args = args_with("--image_size", "64")
    torch.manual_seed(0)
    whole = build_model(args).train()
    chunked = copy.deepcopy(whole)
    tiles = torch.randn(16, 3, 32, 32)
    plan = BNPlan.for_calls(4, 4)
    expected = patch_features(whole, tiles, plan, 0, no_grad=True)
    got = patch_features(chunked, tiles, plan, chunk, no_grad=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not got.requires_grad
    reference = whole.state_dict()
    for key, value in chunked.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)


def test_cuda_rule_is_one_forward_unless_memory_is_short(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: gib)
    cuda = torch.device("cuda")
    # resnet50 at 512 px, batch 32, 2.6 tasks per image: 333 tiles of 256 px, 4 x 4 MiB each
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (60 * gib, 80 * gib))
    assert auto_patch_chunk(cuda, 333, 256, 256) == 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * gib, 80 * gib))
    chunk = auto_patch_chunk(cuda, 333, 256, 256)  # half of 3 + 1 GiB free: 128 tiles of 16 MiB
    assert chunk == 128
