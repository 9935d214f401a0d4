"""sentence-transformers on PyTorch, beside autoembed's local model.

Embeds the texts of the benchmark's local scenario (autoembed_bench.local_products,
left by `scripts/bench.sh`) with the same model directory, batch 32, after
one warm-up pass, and prints the median texts/s of three passes and the
peak RSS. Needs torch and sentence-transformers (see README, Performance).

    python scripts/bench-local-pytorch.py [model-dir]
"""
import os
import resource
import statistics
import subprocess
import sys
import time

from sentence_transformers import SentenceTransformer

model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser(
    "~/.local/share/autoembed/models/all-MiniLM-L6-v2")
rows = subprocess.run(
    ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-AtX", "-c",
     "SELECT replace(embedding_text, E'\\n', ' ') FROM autoembed_bench.local_products ORDER BY id"],
    check=True, capture_output=True, text=True).stdout.splitlines()
model = SentenceTransformer(model_dir, device="cpu")
model.encode(rows[:64], batch_size=32)
rates = []
for _ in range(3):
    start = time.perf_counter()
    model.encode(rows, batch_size=32)
    rates.append(len(rows) / (time.perf_counter() - start))
import torch  # noqa: E402  (after the model: its threads are set by then)
print(f"sentence-transformers {len(rows)} texts, batch 32, torch {torch.__version__}, "
      f"{torch.get_num_threads()} threads: {statistics.median(rates):.0f} texts/s "
      f"(runs {', '.join(f'{r:.0f}' for r in rates)}), peak RSS "
      f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
