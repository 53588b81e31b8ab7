"""The report's PNG plots (bench/report.py): throughput, TTFT and ITL against concurrency through
Triton, and batch-1 decode against the baseline and the roofline."""
from __future__ import annotations

from pathlib import Path

from bench.report import SHORT, level, workload_of


def plots(data: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    gpu = data.get("versions", {}).get("gpu", "CPU")
    for metric, label, scale, fname in (("tokens_per_s", "output tokens/s", 1, "llm_throughput.png"),
                                        ("ttft_p50_s", "TTFT p50 (ms)", 1e3, "llm_ttft.png"),
                                        ("itl_p50_s", "inter-token latency p50 (ms)", 1e3, "llm_itl.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        any_line = False
        for shape, r in data["shapes"].items():
            by_w: dict[str, list] = {}
            for lv in r.get("triton", {}).get("levels", []):
                by_w.setdefault(workload_of(lv), []).append((lv["concurrency"], lv[metric] * scale))
            for w, pts in by_w.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{shape} {w}")
                any_line = True
        if not any_line:
            plt.close(fig)
            continue
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.set_title(f"{label} through Triton — {gpu}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    # Batch-1 decode: naive vs ours vs roofline.
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names, vals, colors = [], [], []
    for shape, r in data["shapes"].items():
        lv = level(r, SHORT, 1)
        for label, v, col in ((f"{shape}\nHF generate", (r.get("hf_naive") or {}).get("decode_tokens_per_s"), "gray"),
                              (f"{shape}\nours (Triton)", 1 / lv["tpot_p50_s"] if lv and lv.get("tpot_p50_s") else None, "C0"),
                              (f"{shape}\nroofline", (r.get("roofline") or {}).get("tokens_per_s"), "C3")):
            if v:
                names.append(label)
                vals.append(v)
                colors.append(col)
    if vals:
        ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, fontsize=6)
        ax.set_ylabel("batch-1 decode tokens/s")
        ax.set_yscale("log")
        ax.set_title(f"batch-1 decode — {gpu}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "llm_batch1.png", dpi=110)
        made.append("llm_batch1.png")
    plt.close(fig)
    return made
