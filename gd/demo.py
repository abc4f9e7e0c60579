"""Pieces of the embedded demo (tools/demo.sh) that are not the pipeline's own commands.

    python -m gd.demo reference OUT.npz [--limit N]     Fashion-MNIST test images as an FID reference batch
    python -m gd.demo report RUN_DIR EVAL_JSON [--baseline RUN_DIR EVAL_JSON] [--out DIR]

`reference` writes the ADM layout (arr_0 uint8 N×H×W×3) that `gd.evaluate metrics.reference=` reads. The test
split is used so that the reference never overlaps the training shards (built from the train split).
`report` turns a finished run into the three files a newcomer looks at: samples.png (the class grid of the
evaluation), loss.png (training loss, raw and smoothed) and metrics.json (FID and the run's settings).
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from gd.io import atomic_path, atomic_write_text

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def write_reference(out: Path, limit: int = 2000, root: Path = FASHION_MNIST) -> Path:
    """The first `limit` Fashion-MNIST test images as uint8 RGB under arr_0 (labels under arr_1)."""
    from gd.data.sources import read_idx_gz

    images_file, labels_file = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
    if not images_file.exists():
        raise FileNotFoundError(f"{images_file} not found: install Debian's dataset-fashion-mnist "
                                "(bash tools/system-deps.sh fashion-mnist) or copy the idx .gz files there")
    images = read_idx_gz(images_file)[:limit]
    labels = read_idx_gz(labels_file)[:limit].astype(np.int64)
    rgb = np.repeat(images[..., None], 3, axis=-1).astype(np.uint8)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, arr_0=rgb, arr_1=labels)
    return out


def _losses(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-image loss series from the trainer's metrics.jsonl: {"all", "cond", "group"} -> (steps, values).

    "all" is the logged objective (a group step's sums its N members); "cond" / "group" are per-image means over
    each log window's conditional / group steps. The last record of a step wins (a resumed run logs it again).
    """
    by_step: dict[int, dict] = {}
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                by_step[int(rec["step"])] = rec
    if not by_step:
        raise ValueError(f"{run_dir}/metrics.jsonl holds no loss records: did the run log any step?")
    series = {}
    for key, field in (("all", "loss"), ("cond", "loss_cond"), ("group", "loss_group")):
        steps = [s for s in sorted(by_step) if field in by_step[s]]
        series[key] = (np.array(steps), np.array([by_step[s][field] for s in steps]))
    return series


def plot_losses(runs: dict[str, Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colors = iter(("tab:blue", "tab:green", "tab:orange", "tab:red"))
    for label, run_dir in runs.items():
        series = _losses(run_dir)
        grouped = len(series["group"][0]) > 0
        parts = [("cond", f"{label}: conditional steps"), ("group", f"{label}: group steps (unconditional)")]
        for key, name in parts if grouped else [("cond", label)]:
            steps, loss = series[key] if len(series[key][0]) else series["all"]
            color = next(colors)
            ax.plot(steps, loss, color=color, alpha=0.25, lw=1)
            k = max(1, len(loss) // 15)
            ax.plot(steps[k - 1:], np.convolve(loss, np.ones(k) / k, mode="valid"), color=color, lw=2, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("per-image velocity MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("GroupDiff demo: training loss (moving mean)")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def report(run_dir: Path, eval_json: Path, out_dir: Path, baseline: tuple[Path, Path] | None = None) -> dict:
    """samples.png, loss.png and metrics.json in out_dir; returns the metrics dict."""
    ev = json.loads(eval_json.read_text())
    grid = Path(ev["samples"]).parent / "grid.png"
    with atomic_path(out_dir / "samples.png") as tmp:
        shutil.copyfile(grid, tmp)
    runs = {"GroupDiff": run_dir}
    metrics = {"groupdiff": _summary(run_dir, ev, eval_json)}
    if baseline is not None:
        runs["plain SiT"] = baseline[0]
        metrics["plain_sit"] = _summary(baseline[0], json.loads(baseline[1].read_text()), baseline[1])
    plot_losses(runs, out_dir / "loss.png")
    metrics["note"] = ("FID on a few thousand 28x28 Fashion-MNIST images against the test split, with "
                       + ev.get("fid_label", "FID") + "; not comparable to ImageNet FID-50K")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _summary(run_dir: Path, ev: dict, eval_json: Path) -> dict:
    series = _losses(run_dir)
    steps, _ = series["all"]
    cond_steps, cond = series["cond"]
    group_steps, _ = series["group"]
    tail = cond[-max(1, len(cond) // 5):] if len(cond) else np.array([np.nan])
    return {
        "run_dir": str(run_dir),
        "fid": ev["fid"],
        "fid_label": ev.get("fid_label"),
        "precision": ev.get("precision"),
        "recall": ev.get("recall"),
        "num_images": ev["num_images"],
        "reference_images": ev["reference"]["num_images"],
        "sampler": ev["sampler"],
        "steps": int(steps[-1]),
        "logs_with_group_steps": int(len(group_steps)),
        "final_cond_loss": float(np.mean(tail)),
        "eval_json": str(eval_json),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gd.demo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("reference", help="write the Fashion-MNIST test-split reference .npz")
    ref.add_argument("out", type=Path)
    ref.add_argument("--limit", type=int, default=2000)
    rep = sub.add_parser("report", help="samples.png, loss.png, metrics.json from a finished run")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("eval_json", type=Path)
    rep.add_argument("--baseline", nargs=2, type=Path, metavar=("RUN_DIR", "EVAL_JSON"))
    rep.add_argument("--out", type=Path, default=None, help="default: RUN_DIR")
    args = parser.parse_args(argv)
    if args.cmd == "reference":
        print(write_reference(args.out, args.limit))
        return
    metrics = report(args.run_dir, args.eval_json, args.out or args.run_dir,
                     tuple(args.baseline) if args.baseline else None)
    for name in ("groupdiff", "plain_sit"):
        if name in metrics:
            m = metrics[name]
            print(f"{name:>10}: FID {m['fid']:.2f} on {m['num_images']} images "
                  f"({m['steps']} steps, conditional-step loss {m['final_cond_loss']:.3f})")


if __name__ == "__main__":
    main()
