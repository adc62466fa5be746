"""The evaluation's outputs: metrics for DVC, the FID-vs-w curve, sample grids, and one report in
Markdown and in self-contained HTML (images inlined), which people would rather look at."""
from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path

import numpy as np

from stages.artifacts import ArtifactWriter


def grid_image(images: np.ndarray, grid: int, scale: int = 2):
    from PIL import Image

    c, h, w = images.shape[1:]
    canvas = np.zeros((grid * h, grid * w, c), dtype=np.uint8)
    for i in range(min(grid * grid, len(images))):
        r, q = divmod(i, grid)
        canvas[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[i].transpose(1, 2, 0)
    img = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def scatter_image(points: np.ndarray, size: int = 320):
    """Points of a 2D (vector) family as a scatter plot, on fixed axes so base and Neon compare."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, ax = plt.subplots(figsize=(size / 100, size / 100), dpi=100)
    ax.scatter(points[:, 0], points[:, 1], s=2, alpha=0.5)
    ax.set(xlim=(-5, 5), ylim=(-5, 5), aspect="equal")
    ax.tick_params(labelsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def picture(samples: np.ndarray, grid: int):
    """A grid of images, or a scatter plot of points."""
    return grid_image(samples, grid) if samples.ndim == 4 else scatter_image(samples)


def side_by_side(left, right, gap: int = 8):
    from PIL import Image

    out = Image.new(left.mode, (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def plot_curve(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = result["primary_space"]
    space = result["confirm"][primary]
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for g in sorted({r["guidance"] for r in result["sweep"]}):
        line = [r for r in result["sweep"] if r["guidance"] == g]
        tag = f", guidance {g:g}" if result["conditional"] else ""
        ax.plot([r["w"] for r in line], [r["fid"] for r in line], "-", lw=0.8, color="grey")
        for kind, marker in (("sweep", "o"), ("refine", "^")):
            pts = [r for r in line if r["stage"] == kind]
            if pts:
                ax.plot([r["w"] for r in pts], [r["fid"] for r in pts], marker, label=f"{kind}{tag} (seed run 0)")
    ax.errorbar([0, result["best_w"]], [space["base"]["fid_mean"], space["neon"]["fid_mean"]],
                yerr=[space["base"]["fid_std"], space["neon"]["fid_std"]], fmt="s", color="black", capsize=4,
                label=f"mean ± std over {result['seeds']} fresh seeds")
    ax.set_xlabel("Neon weight w  (w = 0: base)")
    ax.set_ylabel(f"FID, {primary} features (n={result['feature_spaces'][primary]['n_generated']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dvc_metrics(result: dict) -> dict:
    out = {"best_w": result["best_w"]}
    if result["conditional"]:
        out.update(best_guidance=result["best_guidance"], base_guidance=result["base_guidance"])
    for space, s in result["confirm"].items():
        out[space] = {"fid_base": round(s["base"]["fid_mean"], 4), "fid_base_std": round(s["base"]["fid_std"], 4),
                      "fid_neon": round(s["neon"]["fid_mean"], 4), "fid_neon_std": round(s["neon"]["fid_std"], 4),
                      "relative_gain": round(s["relative_gain"], 4), "improved": s["improved"],
                      "gain": round(s["gain"]["mean"], 4), "gain_low": round(s["gain"]["interval"][0], 4),
                      "gain_high": round(s["gain"]["interval"][1], 4), "verdict": s["gain"]["verdict"],
                      "precision_base": round(s["base"]["precision"], 4), "precision_neon": round(s["neon"]["precision"], 4),
                      "recall_base": round(s["base"]["recall"], 4), "recall_neon": round(s["neon"]["recall"], 4),
                      "kid_base": round(s["base"]["kid"], 6), "kid_neon": round(s["neon"]["kid"], 6)}
    return out


def verdict(space: str, s: dict) -> str:
    """One line: the paired gain with its t interval, and what it lets us conclude."""
    b, n, g = s["base"]["fid_mean"], s["neon"]["fid_mean"], s["gain"]
    lo, hi = g["interval"]
    gain = (f"gain {g['mean']:.3f}, {100 * g['level']:.0f}% interval [{lo:.3f}, {hi:.3f}] "
            f"(paired t over {g['runs']} seed runs, {g['df']} df)")
    if g["verdict"] == "improved":
        return f"{space}: Neon improved FID {b:.3f} -> {n:.3f} ({100 * s['relative_gain']:.1f}%): {gain}"
    if g["verdict"] == "worse":
        return f"{space}: Neon made FID worse, {b:.3f} -> {n:.3f}: {gain}"
    line = f"{space}: no conclusion, the interval includes 0: FID {b:.3f} -> {n:.3f}, {gain}"
    if g["runs_needed"] and g["runs_needed"] > g["runs"]:
        line += (f"; too few seed runs to conclude: about {g['runs_needed']} would resolve a difference of this "
                 "size at this spread (evaluate.seeds)")
    return line


def plot_training(path: Path, curve: dict[str, list[tuple[int, float]]], stage: str) -> None:
    """Loss (left axis) and images/s (right axis) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=120)
    ax.plot(*zip(*curve["loss"]), "o-", color="tab:blue", ms=3)
    ax.set_xlabel(f"{stage} step")
    ax.set_ylabel("training loss", color="tab:blue")
    if curve.get("images_per_s"):
        speed = ax.twinx()
        speed.plot(*zip(*curve["images_per_s"]), ".:", color="tab:grey")
        speed.set_ylabel("images/s", color="tab:grey")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(result: dict, lineage: list[tuple[str, str]]) -> str:
    chosen = f"w = {result['best_w']:g}"
    if result["conditional"]:
        chosen += (f" with guidance {result['best_guidance']:g} (the base's best guidance: "
                   f"{result['base_guidance']:g}; joint search)")
    lines = ["# Neon evaluation", "", f"Model family: {result['family']}.",
             f"Best {chosen} (chosen on {result['primary_space']} FID, seed run 0; "
             f"confirmed on {result['seeds']} fresh seed runs)."]
    if result["best_at_sweep_edge"]:
        lines.append("The best w lies at the edge of the sweep: widen `merge.weights`.")
    lines += ["", "| feature space | model | w | FID mean ± std | FID per seed | KID | precision | recall | n gen / n real |",
              "|---|---|---|---|---|---|---|---|---|"]
    for space, s in result["confirm"].items():
        fs = result["feature_spaces"][space]
        for label, w in (("base", 0), ("neon", result["best_w"])):
            m = s[label]
            runs = ", ".join(f"{v:.2f}" for v in m["fid_runs"])
            interval = (f" (95% bootstrap {m['fid_interval_seed1'][0]:.2f}–{m['fid_interval_seed1'][1]:.2f})"
                        if "fid_interval_seed1" in m else "")
            lines.append(f"| {space} ({fs['dim']}-d) | {label} | {w:g} | {m['fid_mean']:.3f} ± {m['fid_std']:.3f}{interval} "
                         f"| {runs} | {m['kid']:.4f} | {m['precision']:.3f} | {m['recall']:.3f} | {fs['n_generated']} / {fs['n_real']} |")
    lines += [""] + [f"- {verdict(space, s)}" for space, s in result["confirm"].items()]
    small = [f"{sp} ({fs['n_generated']} < {fs['dim']}-d)" for sp, fs in result["feature_spaces"].items()
             if fs["n_generated"] < fs["dim"]]
    if small:
        lines.append(f"- Fewer samples than feature dimensions in {', '.join(small)}: that FID is biased upward; "
                     "compare it only between models at equal n.")
    lines += ["", f"## FID vs w ({result['primary_space']} features, seed run 0)", "",
              "| w | guidance | found by | FID | KID | precision | recall |", "|---|---|---|---|---|---|---|"]
    for r in result["sweep"]:
        lines.append(f"| {r['w']:g} | {r['guidance']:g} | {r['stage']} | {r['fid']:.3f} | {r['kid']:.4f} "
                     f"| {r['precision']:.3f} | {r['recall']:.3f} |")
    lines += ["", "## Lineage", ""] + [f"- {k}: {v}" for k, v in lineage]
    return "\n".join(lines) + "\n"


def _inline(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def html_page(md: str, out_dir: Path) -> str:
    """Self-contained HTML: the Markdown's tables and lists rendered, images inlined."""
    body, rows = [], []

    def flush():
        if rows:
            head, *rest = rows
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>" +
                        "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest) +
                        "</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                rows.append(cells)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
            body.append(f"<img alt='FID vs w' src='{_inline(out_dir / 'fid_vs_w.png')}'>")
            body.append("<h2>Samples: base (left) vs best Neon (right), same seeds</h2>"
                        f"<img alt='base vs neon samples' src='{_inline(out_dir / 'grid_compare.png')}'>")
            if (out_dir / "finetune_curve.png").exists():
                body.append("<h2>Fine-tuning on the synthetic set</h2>"
                            f"<img alt='fine-tuning curve' src='{_inline(out_dir / 'finetune_curve.png')}'>")
        elif line.startswith("- "):
            body.append(f"<p>• {html.escape(line[2:])}</p>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}img{display:block;margin:1em 0}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>Neon evaluation</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def strict_json(obj):
    """NaN (a metric that could not be measured, e.g. KID without real features) as null: strict JSON."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def write(out: ArtifactWriter, result: dict, grids: dict[str, np.ndarray], grid: int,
          lineage: list[tuple[str, str]], measurements=None, finetune_curve: dict | None = None) -> None:
    """`measurements`: every measurement as a long-format pandas table, written as measurements.csv;
    `finetune_curve`: the fine-tuning's logged (step, value) rows by figure, drawn when it has a loss."""
    (out.path("evaluation.json")).write_text(json.dumps(strict_json(result), indent=2) + "\n")
    (out.path("metrics.json")).write_text(json.dumps(strict_json(dvc_metrics(result)), indent=2) + "\n")
    with open(out.path("fid_vs_w.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["w", "guidance", "stage", "fid", "kid", "precision", "recall"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in writer.fieldnames} for r in result["sweep"])
    if measurements is not None:
        measurements.to_csv(out.path("measurements.csv"), index=False)
    plot_curve(out.path("fid_vs_w.png"), result)
    if finetune_curve and finetune_curve.get("loss"):
        plot_training(out.path("finetune_curve.png"), finetune_curve, "fine-tuning")
    base, neon = picture(grids["base"], grid), picture(grids["neon"], grid)
    base.save(out.path("grid_base.png"))
    neon.save(out.path("grid_best.png"))
    side_by_side(base, neon).save(out.path("grid_compare.png"))
    md = markdown(result, lineage)
    out.path("report.md").write_text(md)
    out.path("report.html").write_text(html_page(md, out.dir))
