"""Session-22 screen: run a grad-* command with every image's exposure normalised after the resize (mean grey 128,
`issue11_s22_aspect_screen._gain`), by patching `gradad.data.images.resize_image` (the one resize of training and
of grad-bench's PyTorch rows). Give training its own feature cache (`--set data.cache_dir=...`): the cache key does
not know about the patch.

    python benchmarks/experiments/issue11_s22_gain_run.py grad-train --data ../shared/datasets/mtd \\
        --data ../shared/datasets/mvtec3d --set model.abnormal_branch=false --set data.cache_dir=cache/features_gain \\
        -o runs/s22_gain_normal_only
    python benchmarks/experiments/issue11_s22_gain_run.py grad-bench accuracy --data work/tuneset \\
        --checkpoint runs/s22_gain_normal_only/model.pt --backend pytorch --threads 2 -o work/s22 --name tuneset_gain
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import gradad.data.images as images  # noqa: E402
from issue11_s22_aspect_screen import _gain  # noqa: E402

_resize = images.resize_image
images.resize_image = lambda img, size: _gain(_resize(img, size))
command, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
if command == "grad-train":
    from gradad.training.cli import main
elif command == "grad-bench":
    from gradad.benchmarks.cli import main
else:
    raise SystemExit(f"unknown command {command}")
main()
