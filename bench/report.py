"""Turn a results file (bench/results/*.json, the RESULTS spec) into the README's tables and plot.

    python bench/report.py                         # newest results file -> markdown on stdout
    python bench/report.py FILE --readme README.md # replace the block between the results markers
    python bench/report.py FILE --plot bench/results/bandwidth.png

Every figure is computed here from the raw times in the file, never typed:
  * per layer: fastdw's GPU time, its bandwidth (the mode's minimal bytes / time) and that as a
    fraction of the run's clone bandwidth, and its speed-up over each baseline of the same row;
  * per network: the sums over all of its depthwise layers (each distinct shape counted as often
    as the network has it), speed-ups, and the Triton / CUDA ratio;
  * whole networks: stock vs converted, eager / compile / CUDA graphs.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastdw.layers import NETWORKS  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
BASELINES = ("eager", "eager_folded", "compile", "compile_max")
FASTDW = ("fastdw_cuda", "fastdw_triton", "fastdw_cpu")  # fastdw_cpu: a CPU rehearsal (bench --dry)


def newest(results_dir: Path = ROOT / "bench" / "results") -> Path:
    files = sorted(results_dir.glob("*.json"))
    if not files:
        raise SystemExit(f"report: no results files in {results_dir}")
    return max(files, key=lambda p: (p.name[:10], p.stat().st_mtime))


def multiplicity(net: str, row: dict) -> int:
    key = (row["C"], row["H"], row["W"], row["k"], row["stride"])
    n = sum(1 for L in NETWORKS.get(net, []) if (L.C, L.H, L.W, L.k, L.stride) == key)
    return max(1, n)


def _t(row):
    return row.get("median_us") if row and row.get("checked") else None


def _x(a, b):
    return f"{b / a:.2f}x" if a and b else "-"


def layer_tables(res: dict) -> str:
    clone = res.get("clone_gbps") or float("nan")
    groups = defaultdict(lambda: defaultdict(dict))  # (net, N, dtype, layout, mode) -> layer -> provider -> row
    for r in res.get("layers", []):
        groups[(r["net"], r["N"], r["dtype"], r["layout"], r["mode"])][r["layer"]][r["provider"]] = r
    out = []
    summary = ["| net | N | dtype | layout | mode | fastdw_cuda (us) | % of clone BW | vs eager | vs eager_folded | "
               "vs compile | vs compile_max | triton / cuda |", "|" + "---|" * 12]
    for key in sorted(groups):
        net, N, dtype, layout, mode = key
        layers = groups[key]
        main = next((p for p in FASTDW if any(_t(v.get(p)) for v in layers.values())), None)
        if main is None:
            continue
        rows = [f"\n**{net}, N={N}, {dtype}, {layout}, {mode}** (time in us; bandwidth = minimal bytes / time; "
                f"clone {clone:.0f} GB/s)\n",
                f"| layer | C | HxW | k/s | {main} (us) | GB/s | % of clone | " +
                " | ".join(f"vs {b}" for b in BASELINES) + " | clone (us) | eager kernel |",
                "|" + "---|" * (9 + len(BASELINES))]
        tot = defaultdict(float)
        have = defaultdict(lambda: True)
        for layer in sorted(layers):
            p = layers[layer]
            f = p.get(main)
            tf = _t(f)
            any_row = next(iter(p.values()))
            m = multiplicity(net, any_row)
            for prov in (*FASTDW, *BASELINES):
                t = _t(p.get(prov))
                if t:
                    tot[prov] += m * t
                else:
                    have[prov] = False
            gbps = any_row["bytes"] / (tf * 1e-6) / 1e9 if tf else None
            rows.append(f"| {layer}{f' (x{m})' if m > 1 else ''} | {any_row['C']} | {any_row['H']}x{any_row['W']} | "
                        f"{any_row['k']}/{any_row['stride']} | {tf:.1f} | {gbps:.0f} | {gbps / clone * 100:.0f}% | "
                        if tf else f"| {layer} | {any_row['C']} | {any_row['H']}x{any_row['W']} | "
                        f"{any_row['k']}/{any_row['stride']} | - | - | - | ")
            rows[-1] += " | ".join(_x(tf, _t(p.get(b))) for b in BASELINES)
            rows[-1] += f" | {_t(p.get('clone')):.1f}" if _t(p.get("clone")) else " | -"
            rows[-1] += f" | {(p.get('eager') or {}).get('note', '')} |"
        out += rows
        full = lambda prov: tot[prov] if have[prov] and tot[prov] else None  # noqa: E731
        summary.append(f"| {net} | {N} | {dtype} | {layout} | {mode} | {full(main) or 0:.0f} | "
                       f"{_pct_of_clone(layers, main, clone)} | " +
                       " | ".join(_x(full(main), full(b)) for b in BASELINES) +
                       f" | {_ratio(full('fastdw_triton'), full('fastdw_cuda'))} |")
    if len(summary) == 2:
        return "No fastdw layer rows with times in this file.\n"
    return "\n".join(["### Per network (sums over every depthwise layer)\n"] + summary +
                     ["\n### Per layer\n"] + out) + "\n"


def _pct_of_clone(layers, prov, clone):
    b = t = 0.0
    for p in layers.values():
        r = p.get(prov)
        if _t(r):
            b += r["bytes"]
            t += r["median_us"]
    return f"{b / (t * 1e-6) / 1e9 / clone * 100:.0f}%" if t else "-"


def _ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def model_table(res: dict) -> str:
    rows = res.get("models", [])
    if not rows:
        return ""
    g = defaultdict(dict)
    for r in rows:
        g[(r["model"], r["N"], r["dtype"], r["layout"], r["mode"])][r["provider"]] = r
    out = ["\n### Whole networks (ms per call; speed-up = stock / fastdw)\n",
           "| model | N | dtype | layout | mode | stock eager | fastdw eager | speed-up | stock compile | "
           "fastdw compile | speed-up | stock graph | fastdw graph | speed-up |", "|" + "---|" * 14]
    for key in sorted(g):
        p = g[key]
        t = {k: v.get("median_ms") for k, v in p.items()}
        cells = []
        for how in ("eager", "compile", "graph"):
            s, f = t.get(f"stock_{how}"), t.get(f"fastdw_{how}")
            cells += [f"{s:.2f}" if s else "-", f"{f:.2f}" if f else "-", _x(f, s)]
        out.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def render(res: dict, path: Path) -> str:
    v = res.get("versions", {})
    head = (f"From `{path.name}`: {res.get('device')} (sm_{res.get('sm')}), driver {res.get('driver')}, torch "
            f"{v.get('torch')}, CUDA {v.get('cuda')}, cuDNN {v.get('cudnn')}, Triton {v.get('triton')}; commit "
            f"`{(res.get('commit') or '')[:10]}`{' (dirty)' if res.get('dirty') else ''}; clone bandwidth "
            f"{res.get('clone_gbps', 0):.0f} GB/s. Generated by `python bench/report.py`.\n\n")
    return head + layer_tables(res) + model_table(res)


def replace_block(readme: Path, text: str) -> None:
    s = readme.read_text()
    if BEGIN not in s or END not in s:
        raise SystemExit(f"report: {readme} has no {BEGIN} ... {END} block")
    s = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda m: f"{BEGIN}\n{text}\n{END}", s, flags=re.S)
    readme.write_text(s)


def plot(res: dict, out: Path) -> None:
    """Bandwidth per layer (minimal bytes / time) of every provider, against the clone line, one
    panel per (net, N, dtype, layout) in inference mode."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("report: --plot needs matplotlib (pip install matplotlib, or the bench extra: "
                         "pip install --no-build-isolation -e '.[bench]')") from None
    groups = defaultdict(lambda: defaultdict(dict))
    for r in res.get("layers", []):
        if r["mode"] == "inference" and _t(r):
            groups[(r["net"], r["N"], r["dtype"], r["layout"])][r["provider"]][r["layer"]] = \
                r["bytes"] / (r["median_us"] * 1e-6) / 1e9
    if not groups:
        raise SystemExit("report: no timed inference rows to plot")
    keys = sorted(groups)
    fig, axes = plt.subplots(len(keys), 1, figsize=(11, 3.2 * len(keys)), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        provs = [p for p in ("clone", *FASTDW, *BASELINES) if p in groups[key]]
        layers = sorted({lay for p in provs for lay in groups[key][p]})
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            ax.bar([j + i * width for j in range(len(layers))], [groups[key][p].get(lay, 0) for lay in layers],
                   width, label=p)
        ax.axhline(res.get("clone_gbps", 0), color="k", lw=1, ls="--", label="clone (1 GiB)")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], [str(lay) for lay in layers])
        ax.set_ylabel("GB/s")
        ax.set_title(f"{key[0]} N={key[1]} {key[2]} {key[3]}: inference bandwidth per depthwise layer", fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def load_results(path: Path) -> dict:
    """A results file of `python -m fastdw.bench` (schema fastdw-results/1), or a clear error
    naming the file and what is wrong with it."""
    try:
        res = json.loads(path.read_text())
    except OSError as e:
        raise SystemExit(f"report: cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"report: {path} is not a results file (not JSON: {e})") from None
    if not isinstance(res, dict) or res.get("schema") != "fastdw-results/1":
        got = res.get("schema") if isinstance(res, dict) else type(res).__name__
        raise SystemExit(f"report: {path} is not a results file of `python -m fastdw.bench` "
                         f"(schema {got!r}, expected 'fastdw-results/1')")
    if not isinstance(res.get("layers"), list):
        raise SystemExit(f"report: {path} has no 'layers' list: not a complete results file")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", help="results JSON (default: the newest in bench/results/)")
    ap.add_argument("--readme", help="write the tables into this file between the results markers")
    ap.add_argument("--plot", help="write the bandwidth plot (PNG) here")
    args = ap.parse_args(argv)
    path = Path(args.file) if args.file else newest()
    res = load_results(path)
    text = render(res, path)
    if args.readme:
        replace_block(Path(args.readme), text)
    else:
        print(text)
    if args.plot:
        plot(res, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
