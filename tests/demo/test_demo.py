"""The README's first command, shortened: tools/demo.sh end to end (shards → DeepSpeed → samples → FID → report)."""
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.long
def test_demo_script_end_to_end(tmp_path: Path, fashion_mnist_dir: Path) -> None:
    env = {**os.environ, "GD_DEMO_ROOT": str(tmp_path / "runs"), "GD_DEMO_STEPS": "30",
           "GD_DEMO_TRAIN_IMAGES": "1000", "GD_DEMO_EVAL_IMAGES": "40", "GD_DEMO_REF_IMAGES": "40",
           "GD_DEMO_SAMPLE_STEPS": "8", "GD_DEMO_BASELINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", "tools/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "runs" / "demo"

    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("groupdiff", "plain_sit"):
        m = metrics[name]
        assert math.isfinite(m["fid"]) and m["fid"] > 0, m
        assert m["num_images"] == 40 and m["steps"] == 30
    assert metrics["groupdiff"]["logs_with_group_steps"] > 0    # group steps happened in GroupDiff-l
    assert metrics["plain_sit"]["logs_with_group_steps"] == 0
    assert "FID" in proc.stdout and "plain_sit" in proc.stdout

    grid = np.asarray(Image.open(run / "samples.png"))
    assert grid.shape[0] >= 10 * 28 and grid.std() > 5          # ten class rows of non-constant images
    loss = Image.open(run / "loss.png")
    assert loss.size[0] > 100 and loss.size[1] > 100
    assert (run / "ema.pt").exists() and (run / "checkpoints" / "latest").exists()
