"""Which operators launch the U-Net step's memsets (eager, fp16, channels_last, the fast defaults)."""
import collections, json, os, sys
import torch
from torch.profiler import ProfilerActivity, profile
import ldm
from ldm.loading import _fast_defaults

ours = ldm.load(config="configs/sd/v1-inference.yaml").to("cuda", torch.float16).eval()
_fast_defaults(ours)
x = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16).repeat(2, 1, 1, 1)
t = torch.tensor([500, 500], device="cuda")
c = torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
with torch.no_grad():
    for _ in range(3):
        ours.unet(x[:1], t[:1], context=c, repeat=2)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        ours.unet(x[:1], t[:1], context=c, repeat=2)
        torch.cuda.synchronize()
by_op, kinds = collections.Counter(), collections.Counter()
for e in prof.events():
    for k in e.kernels:
        kinds[k.name[:60]] += 1
        if "memset" in k.name.lower():
            top, p = e, e
            while p is not None:
                if p.name.startswith("aten::"):
                    top = p
                p = p.cpu_parent
            by_op[top.name] += 1
res = {"memsets_by_op": dict(by_op), "kernels": sum(kinds.values())}
print(json.dumps(res))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "memsets.json"), "w"))
