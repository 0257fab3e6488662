"""Time (and with a second argument, profile) stage-1 and stage-2 training steps on the headline run's cached
features (session 22; no test image read). CL=1: the whole model and its inputs in channels_last.

    python benchmarks/experiments/issue11_s22_profile_steps.py 10 [prof]
"""
import sys, time, torch
from gradad.training.config import load_config
from gradad.training.trainer import prepare_training_data, abnormal_step, normal_step, optimizer_step, stage_parameters, make_optimizer, set_stage_mode, _batches
from gradad.training.features import FeatureExtractor
from gradad.training.model import GRADModel
cfg = load_config("runs/s21_unified/config.yaml")
ext = FeatureExtractor(cfg.backbone)
data = prepare_training_data(cfg, ext, torch.device("cpu"))
del ext
_, c, h, w = data.features.shape
print("features", data.features.shape, "defects", None if data.defects is None else len(data.defects.features))
torch.manual_seed(0)
model = GRADModel(c, (h, w), cfg.model)
import os
CL = os.environ.get("CL") == "1"
if CL: model = model.to(memory_format=torch.channels_last)
gen = torch.Generator().manual_seed(0)
cs = data.channel_std
nsteps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
prof = len(sys.argv) > 2
for stage in ("abnormal", "normal"):
    params = stage_parameters(model, stage, cfg); opt = make_optimizer(model, params, cfg)
    set_stage_mode(model, stage)
    it = _batches(len(data.features), cfg.train.batch_size, gen)
    def step():
        idx = next(it); x = data.features[idx].float()
        if CL: x = x.contiguous(memory_format=torch.channels_last)
        if stage == "abnormal":
            real = None if data.defects is None else data.defects.batch(4, gen, torch.device("cpu"))
            loss = abnormal_step(model, x, cfg, cs, gen, real)
        else:
            loss = normal_step(model, x)
        return optimizer_step(loss, opt, params, cfg.train.grad_clip)
    step(); step()
    t = time.perf_counter()
    if prof:
        with torch.profiler.profile() as p:
            for _ in range(nsteps): step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    else:
        for _ in range(nsteps): step()
    dt = (time.perf_counter() - t) / nsteps
    print(f"{stage}: {dt*1000:.0f} ms/step, {len(data.features)//cfg.train.batch_size} steps/epoch -> {dt*len(data.features)/cfg.train.batch_size:.1f} s/epoch")
