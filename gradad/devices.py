"""One rule for choosing the torch device of training, evaluation and F2PAD refinement.

torch is imported only when the function runs: this module sits in the torch-free core that the lean runtime uses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gradad.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_torch_device(name: str, setting: str) -> "torch.device":
    """``auto`` -> CUDA when torch sees a GPU, else CPU; an explicit ``cuda``/``cuda:N`` without a GPU is a
    :class:`ConfigError` naming ``setting`` (e.g. ``train.device``, ``--refine-device``)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{setting} = {name!r} but no CUDA device is available (use cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError:  # torch's "Invalid device string"
        raise ConfigError(f"{setting} = {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
