"""Markdown summary of a bench_cpu.py run (pytest-benchmark JSON): per-layer median times of
PyTorch's CPU block and fastdw's CPU kernels, speed-ups, and the sums over the layers.

    pytest bench/bench_cpu.py --benchmark-json=cpu.json && python bench/report_cpu.py cpu.json
"""
import json
import re
import sys
from collections import defaultdict


def main(path: str) -> None:
    data = json.load(open(path))
    med = defaultdict(dict)  # (mode, layout) -> layer -> provider -> median ms
    n = None
    for b in data["benchmarks"]:
        m = re.match(r"test_(\w+)\[(\w+)-(\w+)-(\w+)\]", b["name"])
        mode, layer, provider, layout = m.groups()
        med[(mode, layout)].setdefault(layer, {})[provider] = b["stats"]["median"] * 1e3
        n = b["extra_info"].get("N", n)
    mi = data.get("machine_info", {})
    print(f"N={n}, fp32; {mi.get('cpu', {}).get('brand_raw', '')}; median of 10 rounds\n")
    print("| mode | layout | layers | PyTorch block (ms) | fastdw (ms) | speed-up | layers fastdw wins |")
    print("|---|---|---|---|---|---|---|")
    for (mode, layout), layers in sorted(med.items()):
        rows = [v for v in layers.values() if "torch" in v and "fastdw" in v]
        t = sum(v["torch"] for v in rows)
        f = sum(v["fastdw"] for v in rows)
        wins = sum(v["fastdw"] < v["torch"] for v in rows)
        print(f"| {mode} | {layout} | {len(rows)} | {t:.2f} | {f:.2f} | {t / f:.2f}x | {wins}/{len(rows)} |")
    for (mode, layout), layers in sorted(med.items()):
        print(f"\n{mode}, {layout}: " + ", ".join(
            f"{k} {v['torch'] / v['fastdw']:.2f}x" for k, v in sorted(layers.items()) if len(v) == 2))


if __name__ == "__main__":
    main(sys.argv[1])
