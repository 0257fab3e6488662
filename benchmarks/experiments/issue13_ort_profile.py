"""Session 7: ONNX Runtime CPU profile of a bundle's model by operator and node (2 threads, batch 1):
python benchmarks/experiments/issue13_ort_profile.py models/unified_s6/model.onnx"""
import onnxruntime as ort, numpy as np, json, sys, time, collections
path = sys.argv[1]
so = ort.SessionOptions(); so.intra_op_num_threads = 2; so.enable_profiling = True
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
inp = s.get_inputs()[0]; print(inp.name, inp.shape, inp.type)
x = np.random.randint(0, 255, (1, 3, 256, 256), np.uint8) if "uint8" in inp.type else np.random.rand(1, 3, 256, 256).astype(np.float32)
for _ in range(5): s.run(None, {inp.name: x})
t = time.perf_counter()
for _ in range(20): s.run(None, {inp.name: x})
print("mean ms", (time.perf_counter() - t) / 20 * 1e3)
prof = s.end_profiling(); ev = json.load(open(prof))
by_op = collections.Counter(); by_node = collections.Counter()
for e in ev:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        by_op[e["args"]["op_name"]] += e["dur"]; by_node[e["name"].replace("_kernel_time", "")] += e["dur"]
tot = sum(by_op.values())
for k, v in by_op.most_common(12): print(f"{k:25s} {100*v/tot:5.1f}%")
for k, v in by_node.most_common(15): print(f"{k[:80]:80s} {100*v/tot:5.1f}%")
import os; os.remove(prof)
