"""The one torch-device rule of training, evaluation and refinement."""

from __future__ import annotations

import pytest
import torch

from gradad.devices import resolve_torch_device
from gradad.errors import ConfigError


def test_auto_follows_what_torch_sees_and_cpu_is_always_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_torch_device("auto", "train.device").type == expected
    assert resolve_torch_device("cpu", "train.device") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: explicit cuda is valid here")
@pytest.mark.parametrize("name", ["cuda", "cuda:1"])
def test_explicit_cuda_without_a_gpu_names_the_setting(name):
    with pytest.raises(ConfigError, match=r"refinement device = 'cuda.*no CUDA device"):
        resolve_torch_device(name, "refinement device")
