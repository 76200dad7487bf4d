# Which hydra_lite op invalidates a CUDA graph capture (temporary debugging aid).
import sys, types, torch
sys.path.insert(0, "."); sys.path.insert(0, "tests")
import hydra_lite as hl
from test_runtime import tiny_heads, tiny_model
state = {"in": False, "reported": False}
def wrap(name, fn):
    def f(*a, **k):
        before = torch.cuda.is_current_stream_capturing() if state["in"] else None
        out = fn(*a, **k)
        if state["in"] and before and not torch.cuda.is_current_stream_capturing() and not state["reported"]:
            state["reported"] = True
            print("CAPTURE BROKEN BY", name, [tuple(x.shape) if hasattr(x, "shape") else x for x in a][:6], flush=True)
        return out
    return f
for name in dir(hl):
    obj = getattr(hl, name)
    if isinstance(obj, types.FunctionType) and obj.__module__ == "hydra_lite":
        setattr(hl, name, wrap(name, obj))
import kernels as K
for name in dir(K):
    obj = getattr(K, name)
    if isinstance(obj, types.FunctionType) and not name.startswith("_"):
        setattr(K, name, wrap("kernels." + name, obj))
orig_graph = torch.cuda.graph
class G(orig_graph):
    def __enter__(self):
        r = super().__enter__(); state["in"] = True; return r
    def __exit__(self, *a):
        state["in"] = False; return super().__exit__(*a)
torch.cuda.graph = G
import test_gpu
for kind in ["medusa", "hydra", "hydra++"]:
    for context, dynamic in [(0, False), (10, False), (10, True)]:
        try:
            test_gpu.test_gpu_speculative_equals_autoregressive_fp32(kind, context, dynamic)
            print("ok", kind, context, dynamic, flush=True)
        except Exception as e:
            print("ERR", kind, context, dynamic, type(e).__name__, str(e)[:300], flush=True)
