"""ONNX Runtime fp32 and int8 beside autoembed's local model.

Exports the model directory to ONNX (fp32), quantises it as issue 17 did
(dynamic, per channel, reduced range, int8 weights), and embeds the texts
of the benchmark's local scenario (autoembed_bench.local_products, left by
`scripts/bench.sh`) with each, batch 32, 2 threads, mean pooling, after one
warm-up pass: the median texts/s of three passes, and int8's cosine to fp32.
Needs torch, transformers, onnx, onnxscript and onnxruntime (see README,
Performance).

    python scripts/bench-local-onnx.py [model-dir]
"""
import os, sys, time, statistics, subprocess, resource, tempfile
import numpy as np, torch
from transformers import AutoTokenizer, AutoModel
import onnxruntime as ort
from onnxruntime.quantization import quantize_dynamic, QuantType
md = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.local/share/autoembed/models/all-MiniLM-L6-v2")
out = tempfile.mkdtemp(prefix="autoembed-onnx-")
fp32, int8 = os.path.join(out, "model.onnx"), os.path.join(out, "model-int8.onnx")
tok = AutoTokenizer.from_pretrained(md)
base = AutoModel.from_pretrained(md).eval()
class W(torch.nn.Module):
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, a, b, c): return self.m(input_ids=a, attention_mask=b, token_type_ids=c).last_hidden_state
m = W(base)
enc = tok(["hello world"], return_tensors="pt")
torch.onnx.export(m, (enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]), fp32,
    input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["last_hidden_state"],
    dynamic_axes={k: {0: "b", 1: "s"} for k in ["input_ids", "attention_mask", "token_type_ids", "last_hidden_state"]},
    opset_version=17, dynamo=False)
quantize_dynamic(fp32, int8, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
rows = subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-AtX", "-c",
     "SELECT replace(embedding_text, E'\\n', ' ') FROM autoembed_bench.local_products ORDER BY id"],
    check=True, capture_output=True, text=True).stdout.splitlines()
def run(path):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    def embed(texts):
        out = []
        for i in range(0, len(texts), 32):
            e = tok(texts[i:i+32], padding=True, truncation=True, max_length=256, return_tensors="np")
            h = s.run(None, {k: e[k].astype(np.int64) for k in ["input_ids", "attention_mask", "token_type_ids"]})[0]
            m = e["attention_mask"][..., None].astype(np.float32)
            v = (h * m).sum(1) / m.sum(1)
            out.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        return np.concatenate(out)
    embed(rows[:64])
    rates = []
    for _ in range(3):
        t = time.perf_counter(); vecs = embed(rows); rates.append(len(rows) / (time.perf_counter() - t))
    return statistics.median(rates), rates, vecs
r32, runs32, v32 = run(fp32)
r8, runs8, v8 = run(int8)
cos = (v32 * v8).sum(1)
print(f"onnxruntime {ort.__version__} fp32: {r32:.0f} texts/s ({', '.join(f'{r:.0f}' for r in runs32)})")
print(f"onnxruntime int8: {r8:.0f} texts/s ({', '.join(f'{r:.0f}' for r in runs8)}); cosine to ORT fp32 min {cos.min():.4f} mean {cos.mean():.4f}")
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024:.0f} MB (both sessions)")
