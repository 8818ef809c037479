"""A small classifier of 16x16 blob images, for the fork test. The one file the research agent edits.

Reads DATA/meta.json and DATA/train/, trains for STEPS steps or the time budget, whichever ends first, and exports
the classifier with torch.export for the trusted evaluator (classifier.pt2, prepare_data.py's PROGRAMS).
"""
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TIME_BUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 10))  # seconds of training; the harness sets it
SEED = int(os.environ.get("AUTORESEARCH_SEED", 0))
DATA = Path(os.environ.get("AUTORESEARCH_DATA") or "data")
OUT = Path(os.environ.get("AUTORESEARCH_OUT") or "runs/dev")

LEARNING_RATE = 0.003
MOMENTUM = 0.9
STEPS = 150
BATCH_SIZE = 64
HIDDEN = 32


def main():
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    meta = json.loads((DATA / "meta.json").read_text())
    images = torch.from_numpy(np.load(DATA / "train" / "images.npy")).float().div(255).unsqueeze(1)
    labels = torch.from_numpy(np.load(DATA / "train" / "labels.npy"))
    s = meta["image_size"]
    model = nn.Sequential(nn.Flatten(), nn.Linear(s * s, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, meta["classes"]))
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    t0, step, loss = time.time(), 0, torch.tensor(float("nan"))
    while step < STEPS and time.time() - t0 < TIME_BUDGET:
        idx = torch.randint(0, len(images), (BATCH_SIZE,))
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    seconds = time.time() - t0
    print(f"step {step} | loss {loss.item():.4f} | {seconds:.1f}s", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    ep = torch.export.export(model.eval(), (torch.rand(2, 1, s, s),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(OUT / "classifier.pt2"))
    stats = {"training_seconds": round(seconds, 2), "num_steps": step,
             "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
             "num_params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 4), "final_loss": loss.item()}
    (OUT / "train_stats.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    main()
