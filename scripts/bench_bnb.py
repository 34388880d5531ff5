"""bitsandbytes 0.50.2 on the CPU, the same work as `cargo bench --bench nf4` (2 threads,
medians): NF4 quantize with double quantization and dequantize of a 4096x4096 f32 matrix built
with the same formula, and matmul_4bit at batch 1/8/128.

    .venv/bin/python scripts/bench_bnb.py
"""
import json
import statistics
import time

import torch
import bitsandbytes as bnb
import bitsandbytes.functional as F

torch.set_num_threads(2)
n = 4096
i = torch.arange(n * n, dtype=torch.float32)
w = (torch.sin(i * 0.618) * 0.05).reshape(n, n)


def median_ms(fn, runs=10):
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


out = {}
out["quantize_double_quant_ms"] = median_ms(lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True))
q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
out["dequantize_f32_ms"] = median_ms(lambda: F.dequantize_4bit(q, st))
src = torch.ones(n * n * 4, dtype=torch.uint8)
out["memcpy_same_output_bytes_ms"] = median_ms(lambda: src.clone())
for m in (1, 8, 128):
    x = torch.cos(torch.arange(m * n, dtype=torch.float32) * 0.377).reshape(m, n)
    with torch.no_grad():
        out[f"matmul_4bit_batch{m}_ms"] = median_ms(lambda: bnb.matmul_4bit(x, q.t(), quant_state=st))
print(json.dumps(out, indent=1))
