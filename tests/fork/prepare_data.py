"""A second project, for the fork test (tests/test_fork.py): a small image classifier on synthetic data, scored by
accuracy (higher is better). A fork replaces the template's prepare_data.py, train.py and program.md with files like
these three; the engine (autoresearch.py, run.sh, evaluator.py, Containerfile) stays as it is.

    python prepare_data.py [--out DIR]   DIR/meta.json and DIR/{train,val,test}/{images,labels}.npy

An image is 16x16 grey noise with a bright blob in one quadrant, its class (0-3), and a dimmer blob elsewhere. The
train split comes from the public --seed; val and test from a secret seed, drawn on each build and written nowhere,
so train.py (which sees meta.json and train/ only) cannot regenerate them.
"""
import argparse
import json
import os
import secrets
from pathlib import Path

import numpy as np

# What the evaluation scores (literals: the harness, run.sh and evaluator.py read them without importing this file).
METRIC = "accuracy"
DIRECTION = "maximize"
PROGRAMS = ["classifier.pt2"]              # train.py exports it: float32 [B, 1, 16, 16] in [0, 1] -> logits [B, 4]
EVAL_FILES = ["images.npy", "labels.npy"]  # what score() reads of DATA/<split>/

SIZE, CLASSES = 16, 4
NOISE = 60.0  # grey levels of noise around the blobs: what makes the classes overlap


def make_split(rng, n):
    """uint8 images [n, SIZE, SIZE] and their int64 labels."""
    labels = rng.integers(0, CLASSES, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = rng.normal(100, NOISE, (n, SIZE, SIZE))
    for i, label in enumerate(labels):
        other = (label + rng.integers(1, CLASSES)) % CLASSES
        for quadrant, peak in ((label, 120), (other, 60)):
            cy, cx = (quadrant // 2 + rng.uniform(0.2, 0.8)) * SIZE / 2, (quadrant % 2 + rng.uniform(0.2, 0.8)) * SIZE / 2
            images[i] += peak * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * 2.0 ** 2))
    return np.clip(images, 0, 255).astype(np.uint8), labels.astype(np.int64)


def score(encode, split):
    """Accuracy of the classifier's arg-max; the labels never leave this function."""
    logits = encode("classifier.pt2", split["images"][:, None].astype(np.float32) / 255)
    if logits.shape[1] != CLASSES:
        raise ValueError(f"the classifier gives {logits.shape[1]} logits, expected {CLASSES}")
    return {"accuracy": float((logits.argmax(1) == split["labels"]).mean()), "n": len(split["labels"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("AUTORESEARCH_DATA") or "data"))
    p.add_argument("--seed", type=int, default=0, help="seed of the train split (public: in meta.json)")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    args = p.parse_args(argv)
    counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
    heldout = np.random.default_rng(secrets.randbits(64))   # val and test: never reproducible from what train.py sees
    for split, n in counts.items():
        images, labels = make_split(np.random.default_rng(args.seed) if split == "train" else heldout, n)
        (args.out / split).mkdir(parents=True, exist_ok=True)
        np.save(args.out / split / "images.npy", images)
        np.save(args.out / split / "labels.npy", labels)
    meta = {"image_size": SIZE, "classes": CLASSES, "counts": counts, "seed": args.seed}
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1))   # last: it marks the data complete
    print(f"wrote {args.out}: {counts}")


if __name__ == "__main__":
    main()
