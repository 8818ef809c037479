"""Data preparation and the trusted evaluation for autoresearch. The research agent never edits this file.

    python prepare_data.py                       build the offline synthetic dataset into ./data
    python prepare_data.py --ukiyoe-vg DIR       ingest a local copy of Ukiyo-eVG instead
    python prepare_data.py --download-weights    cache the pretrained ViT-S/16 and DistilBERT in ./weights (internet)
    python prepare_data.py --preview 8           PNGs of validation images with their heatmaps, into ./previews
    python prepare_data.py --evaluate RUN_DIR    trusted retrieval evaluation of an exported model (val split);
                                                 with --data - the split comes as a tar stream on stdin (run.sh)

The synthetic train split is a pure function of --seed (public: meta.json records it). The val and test splits
come from a separate secret --heldout-seed, drawn at random on the first build and recorded only in
DATA/raw-synthetic/params.json (never mounted into a sandbox, never in meta.json), so train.py cannot regenerate
them. Given both seeds, every split is deterministic.

The synthetic data is written in exactly the Ukiyo-eVG layout (ODVG JSONL + image files) and then ingested by the
same code as the real data, so both go through one path. torch and transformers are imported lazily, so that
`from prepare_data import box_heatmap` stays cheap.
"""
import argparse
import io
import itertools
import json
import os
import re
import secrets
import select
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# The project's metric, declared once: autoresearch.py reads these two literals with ast (INTERFACE.md §A).
METRIC = "mean_rank"
DIRECTION = "minimize"
ROOT = Path(__file__).resolve().parent
SPLIT_FILES = {  # the Ukiyo-eVG release layout, relative to the --ukiyoe-vg directory
    "train": "Ukiyo-eVG/refined/ukiyoe_vg_train_pgt_odvg.jsonl",
    "val": "Ukiyo-eVG/refined/ukiyoe_vg_val_pgt_odvg.jsonl",
    "test": "Ukiyo-eVG/ukiyoe_vg_test_annotated.jsonl",
}
CACHE_ENTRIES = ["train", "val", "test", "vocab.txt", "meta.json"]  # what a data dir holds; meta.json goes in last
PRETRAINED = {"vit": "timm/vit_small_patch16_224.augreg_in21k_ft_in1k", "text": "distilbert-base-uncased"}
MAX_LEN_CAP = 64
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]  # word-level vocab ids 0..3, same pad id (0) as DistilBERT
STAT_KEYS = ["training_seconds", "num_steps", "peak_memory_mb", "num_params_m"]


class UserError(Exception):
    """An error we explain to the user in one line, without a traceback."""


def default_data_dir():
    return Path(os.environ.get("AUTORESEARCH_DATA") or ROOT / "data")


def default_weights_dir():
    return Path(os.environ.get("AUTORESEARCH_WEIGHTS") or ROOT / "weights")


# ----------------------------------------------------------------------------------------------- heatmaps

def box_heatmap(boxes, width, height, size):
    """size x size float32 map: one Gaussian per pixel-space xyxy box, in coordinates normalized to [0, 1]
    (sigma = max(box extent / image extent / 2, 0.02), peak 1), merged by elementwise maximum."""
    grid = np.linspace(0.0, 1.0, size, dtype=np.float64)
    heat = np.zeros((size, size), dtype=np.float64)
    for x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        sx, sy = max((x2 - x1) / width / 2, 0.02), max((y2 - y1) / height / 2, 0.02)
        gx = np.exp(-((grid - cx) ** 2) / (2 * sx ** 2))
        gy = np.exp(-((grid - cy) ** 2) / (2 * sy ** 2))
        heat = np.maximum(heat, gy[:, None] * gx[None, :])
    return heat.astype(np.float32)


# ----------------------------------------------------------------------------------------------- synthetic data
# Scenes of 2-4 coloured shapes on a textured background, each in its own cell of a 3x3 grid. The caption names
# every object by size, colour, shape and position, in random order, so matching an image to its caption needs
# binding attributes to places - which is exactly what the box heatmaps make explicit.

COLORS = {"red": (215, 35, 35), "green": (35, 160, 55), "blue": (40, 75, 215), "yellow": (235, 205, 35),
          "purple": (135, 55, 175), "orange": (240, 130, 25), "white": (245, 245, 245), "black": (20, 20, 20)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
SIZES = {"small": (0.055, 0.075), "large": (0.11, 0.15)}  # radius as a fraction of the image side
PLACES = [["at the top left", "at the top", "at the top right"],
          ["on the left", "in the centre", "on the right"],
          ["at the bottom left", "at the bottom", "at the bottom right"]]
RAW_SIZE = 96
MAX_OBJECTS = 3
DISTRACTORS = 1  # up to this many extra shapes the caption does not mention: matching needs the described ones


def _draw_shape(draw, shape, cx, cy, r, color):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=max(2, round(r * 0.35)))
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=color)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
    elif shape == "cross":
        t = r * 0.33
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=color)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=color)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        box = [cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85]
    elif shape == "triangle":
        box = [cx - r, cy - r, cx + r, cy + r * 0.8]
    return box


def _background(rng, n):
    base = rng.uniform(70, 185, size=3) * 0.5 + rng.uniform(70, 185) * 0.5  # muted, slightly tinted grey
    coarse = rng.normal(0, 18, size=(4, 4, 3))  # low-frequency blotches
    blotches = np.asarray(Image.fromarray(np.clip(coarse + 128, 0, 255).astype(np.uint8)).resize((n, n), Image.BILINEAR))
    img = base + (blotches.astype(np.float32) - 128) + rng.normal(0, 6, size=(n, n, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def synthetic_scene(rng):
    """One scene: (PIL image, caption, [(phrase, [x1, y1, x2, y2])])."""
    n = RAW_SIZE
    img = _background(rng, n)
    draw = ImageDraw.Draw(img)
    k = int(rng.integers(2, MAX_OBJECTS + 1))
    extra = int(rng.integers(0, DISTRACTORS + 1))
    cells = rng.choice(9, size=k + extra, replace=False)
    regions = []
    for i, cell in enumerate(cells):
        row, col = divmod(int(cell), 3)
        size = str(rng.choice(list(SIZES)))
        color = str(rng.choice(list(COLORS)))
        shape = str(rng.choice(SHAPES))
        r = rng.uniform(*SIZES[size]) * n
        margin = n / 3 / 2 - r
        cx = (col + 0.5) * n / 3 + rng.uniform(-margin, margin) * 0.8
        cy = (row + 0.5) * n / 3 + rng.uniform(-margin, margin) * 0.8
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
        box = _draw_shape(draw, shape, cx, cy, r, fill)
        if i < k:
            phrase = f"a {size} {color} {shape} {PLACES[row][col]}"
            regions.append((phrase, [round(float(v), 2) for v in box]))
    phrases = [p for p, _ in regions]
    caption = phrases[0] if k == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return img, caption, regions


def write_synthetic_odvg(raw_dir, seed, counts, heldout_seed):
    """Writes the synthetic dataset in the Ukiyo-eVG layout (JSONL + PNGs). Captions are unique across all splits.
    Train comes from `seed` alone (it is in meta.json, which training sees); val and test come from the secret
    `heldout_seed` and only avoid the train captions, so train says nothing about them beyond the distribution."""
    train_rng, heldout_rng = np.random.default_rng(seed), np.random.default_rng(heldout_seed)
    (raw_dir / "images").mkdir(parents=True)
    seen = set()
    for split in ["train", "val", "test"]:
        rng = train_rng if split == "train" else heldout_rng
        path = raw_dir / SPLIT_FILES[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            i = 0
            while i < counts[split]:
                img, caption, regions = synthetic_scene(rng)
                if caption in seen:
                    continue
                seen.add(caption)
                name = f"{split}_{i:05d}.png"
                img.save(raw_dir / "images" / name, compress_level=1)
                rec = {"filename": name, "height": RAW_SIZE, "width": RAW_SIZE,
                       "grounding": {"caption": caption,
                                     "regions": [{"bbox": box, "phrase": phrase} for phrase, box in regions]}}
                f.write(json.dumps(rec) + "\n")
                i += 1


def ensure_synthetic_raw(data_dir, seed, counts, heldout_seed=None):
    """The raw synthetic ODVG tree under DATA/raw-synthetic, regenerated only when its parameters change.
    heldout_seed None: keep the one recorded in raw-synthetic/params.json, else draw a new secret one. That file
    sits next to the val/test images themselves and is never mounted into a sandbox."""
    raw = data_dir / "raw-synthetic"
    marker = raw / "params.json"
    old = json.loads(marker.read_text()) if marker.exists() else {}
    if heldout_seed is None:
        heldout_seed = old.get("heldout_seed")
        if not isinstance(heldout_seed, int):
            heldout_seed = secrets.randbits(63)
    params = {"seed": seed, "heldout_seed": heldout_seed, "counts": counts, "raw_size": RAW_SIZE,
              "max_objects": MAX_OBJECTS, "distractors": DISTRACTORS, "version": 3}
    if old == params:
        return raw
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".raw-", dir=data_dir))
    try:
        t0 = time.time()
        write_synthetic_odvg(tmp, seed, counts, heldout_seed)
        (tmp / "params.json").write_text(json.dumps(params))
        if raw.exists():
            shutil.rmtree(raw)
        tmp.rename(raw)
        print(f"wrote synthetic ODVG data to {raw} in {time.time() - t0:.1f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return raw


# ----------------------------------------------------------------------------------------------- ODVG ingestion

def parse_odvg_lines(lines, where):
    """Records kept from ODVG JSONL lines and a count of those skipped. Blank lines are ignored; records with an
    empty caption or without usable regions are skipped; boxes are clipped to the image."""
    kept, skipped = [], 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            grounding = rec.get("grounding") or {}
            caption = (grounding.get("caption") or "").strip()
            filename = rec["filename"]
            width, height = rec.get("width"), rec.get("height")
            raw_regions = grounding.get("regions") or []
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise UserError(f"{where}:{lineno}: not a valid ODVG record ({type(e).__name__}: {e})")
        regions = []
        for reg in raw_regions:
            try:
                x1, y1, x2, y2 = (float(v) for v in reg["bbox"])
                phrase = str(reg.get("phrase") or "").strip()
            except (KeyError, TypeError, ValueError) as e:
                raise UserError(f"{where}:{lineno}: bad region {reg!r} ({type(e).__name__})")
            regions.append((phrase, [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]))
        if not caption or not regions:
            skipped += 1
            continue
        kept.append({"filename": filename, "width": width, "height": height, "caption": caption, "regions": regions})
    return kept, skipped


def clip_regions(regions, width, height):
    """Boxes clipped to the image; regions that end up empty are dropped."""
    out = []
    for phrase, (x1, y1, x2, y2) in regions:
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
        if x2 > x1 and y2 > y1:
            out.append((phrase, [x1, y1, x2, y2]))
    return out


def word_tokenize(text):
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


class WordTokenizer:
    """Fallback tokenizer: a word-level vocabulary built from the training captions and phrases."""

    def __init__(self, vocab):
        self.vocab = list(vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def build(cls, texts):
        counts = Counter(w for t in texts for w in word_tokenize(t))
        return cls(SPECIALS + sorted(counts, key=lambda w: (-counts[w], w)))

    def encode(self, texts, max_len):
        out = np.zeros((len(texts), max_len), dtype=np.int32)
        unk, cls, sep = (self.ids[s] for s in SPECIALS[1:])
        for i, t in enumerate(texts):
            ids = [cls] + [self.ids.get(w, unk) for w in word_tokenize(t)][: max_len - 2] + [sep]
            out[i, : len(ids)] = ids
        return out

    def length(self, text):
        return len(word_tokenize(text)) + 2


class BertTokenizer:
    """The DistilBERT WordPiece tokenizer, loaded only from the local weights cache."""

    def __init__(self, weights_dir):
        os.environ["HF_HUB_OFFLINE"] = "1"
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(PRETRAINED["text"], cache_dir=str(weights_dir), local_files_only=True)
        self.vocab_size = self.tok.vocab_size

    def encode(self, texts, max_len):
        enc = self.tok(list(texts), padding="max_length", truncation=True, max_length=max_len)
        return np.asarray(enc["input_ids"], dtype=np.int32)

    def length(self, text):
        return len(self.tok(text)["input_ids"])


def has_cached(weights_dir, repo_id):
    snap = Path(weights_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return snap.is_dir() and any(snap.iterdir())


def make_tokenizer(train_texts, weights_dir):
    if has_cached(weights_dir, PRETRAINED["text"]):
        try:
            return BertTokenizer(weights_dir), "distilbert-base-uncased"
        except Exception as e:  # a broken cache should not stop data preparation
            print(f"warning: DistilBERT tokenizer in {weights_dir} unusable ({e}); using a word-level vocabulary")
    return WordTokenizer.build(train_texts), "word"


def load_image(path, size):
    with Image.open(path) as im:
        w, h = im.size
        return np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.uint8), w, h


def build_split(records, images_dir, size, tokenizer, max_len):
    n = len(records)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    heatmaps = np.zeros((n, size, size), dtype=np.uint8)
    index, boxes, phrases = [], [], []
    for i, rec in enumerate(records):
        images[i], w, h = load_image(images_dir / rec["filename"], size)
        width, height = float(rec["width"] or w), float(rec["height"] or h)
        heatmaps[i] = np.round(box_heatmap([b for _, b in rec["regions"]], width, height, size) * 255).astype(np.uint8)
        for phrase, (x1, y1, x2, y2) in rec["regions"]:
            index.append(i)
            boxes.append([x1 / width, y1 / height, x2 / width, y2 / height])
            phrases.append(phrase or rec["caption"])  # a region without a phrase falls back to the caption
    return {
        "images.npy": images,
        "tokens.npy": tokenizer.encode([r["caption"] for r in records], max_len),
        "heatmaps.npy": heatmaps,
        "regions.npz": dict(image_index=np.asarray(index, dtype=np.int32),
                            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                            phrases=tokenizer.encode(phrases, max_len)),
        "captions.json": [r["caption"] for r in records],
    }


def install(stage, data_dir):
    """Moves a complete staged cache into data_dir by renames only; meta.json last, so it marks completeness."""
    data_dir.mkdir(parents=True, exist_ok=True)
    trash = Path(tempfile.mkdtemp(prefix=".old-", dir=data_dir))
    try:
        for name in CACHE_ENTRIES[::-1]:  # meta.json first out ...
            if (data_dir / name).exists():
                (data_dir / name).rename(trash / name)
        for name in CACHE_ENTRIES:  # ... and last in
            if (stage / name).exists():
                (stage / name).rename(data_dir / name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def ingest_odvg(src, data_dir, image_size, source, seed=None, weights_dir=None):
    """Ingests a Ukiyo-eVG-layout directory into the array cache. Either everything is written or nothing is."""
    src = Path(src)
    weights_dir = Path(weights_dir or default_weights_dir())
    records, skipped = {}, {}
    for split, rel in SPLIT_FILES.items():
        path = src / rel
        if not path.is_file():
            raise UserError(f"missing annotation file {path}")
        with open(path) as f:
            records[split], skipped[split] = parse_odvg_lines(f, str(path))
    images_dir = src / "images"
    for split in records:  # check every image before doing any work, so the error comes early and names the file
        for rec in records[split]:
            if not (images_dir / rec["filename"]).is_file():
                raise UserError(f"missing image file {images_dir / rec['filename']} (needed by the {split} split)")
    for split in records:
        for rec in records[split]:
            w, h = rec["width"], rec["height"]
            if not w or not h:
                with Image.open(images_dir / rec["filename"]) as im:
                    w, h = im.size
            rec["width"], rec["height"] = float(w), float(h)
            rec["regions"] = clip_regions(rec["regions"], rec["width"], rec["height"])
        skipped[split] += sum(1 for r in records[split] if not r["regions"])
        records[split] = [r for r in records[split] if r["regions"]]
    if not records["train"]:
        raise UserError(f"no usable training records in {src / SPLIT_FILES['train']}")
    train_texts = [r["caption"] for r in records["train"]] + [p for r in records["train"] for p, _ in r["regions"]]
    tokenizer, tok_name = make_tokenizer(train_texts, weights_dir)
    max_len = min(MAX_LEN_CAP, max(tokenizer.length(t) for t in train_texts))

    data_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=data_dir))
    try:
        for split in records:
            (stage / split).mkdir()
            for name, value in build_split(records[split], images_dir, image_size, tokenizer, max_len).items():
                if name.endswith(".npy"):
                    np.save(stage / split / name, value)
                elif name.endswith(".npz"):
                    np.savez(stage / split / name, **value)
                else:
                    (stage / split / name).write_text(json.dumps(value))
        vocab_size = tokenizer.vocab_size if tok_name != "word" else len(tokenizer.vocab)
        if tok_name == "word":
            (stage / "vocab.txt").write_text("\n".join(tokenizer.vocab) + "\n")
        meta = {"source": source, "image_size": image_size, "max_len": max_len, "tokenizer": tok_name,
                "vocab_size": vocab_size, "pad_id": 0, "counts": {s: len(r) for s, r in records.items()},
                "skipped": skipped, "seed": seed}
        (stage / "meta.json").write_text(json.dumps(meta, indent=1))
        install(stage, data_dir)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for split in records:
        print(f"{split}: kept {len(records[split])} records, skipped {skipped[split]}")
    print(f"skipped: {sum(skipped.values())}")
    print(f"wrote {data_dir} (tokenizer: {tok_name}, vocab {vocab_size}, max_len {max_len}, image size {image_size})")
    return meta


# ----------------------------------------------------------------------------------------------- weights

def download_weights(weights_dir):
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError("huggingface_hub is missing: pip install -r requirements.txt")
    weights_dir.mkdir(parents=True, exist_ok=True)
    for repo_id, patterns in [(PRETRAINED["vit"], ["*.json", "*.safetensors"]),
                              (PRETRAINED["text"], ["*.json", "*.txt", "*.safetensors"])]:
        try:
            path = snapshot_download(repo_id, cache_dir=str(weights_dir), allow_patterns=patterns)
        except Exception as e:
            raise UserError(f"could not download {repo_id} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})."
                            " --download-weights needs internet access to huggingface.co; without the weights,"
                            " training builds the models from their configs with random weights")
        print(f"cached {repo_id} in {path}")
    print(f"weights are in {weights_dir}; rebuild the data (python prepare_data.py) to use the DistilBERT tokenizer")


# ----------------------------------------------------------------------------------------------- preview

def preview(data_dir, n, out_dir):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    split = data_dir / "val"
    images, heatmaps = np.load(split / "images.npy", mmap_mode="r"), np.load(split / "heatmaps.npy", mmap_mode="r")
    captions = json.loads((split / "captions.json").read_text())
    regions = np.load(split / "regions.npz")
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(min(n, len(images))):
        fig, axes = plt.subplots(1, 2, figsize=(7, 4.2))
        s = images.shape[1]
        axes[0].imshow(images[i], extent=(0, 1, 1, 0), interpolation="nearest")
        axes[1].imshow(images[i], extent=(0, 1, 1, 0), interpolation="nearest")
        axes[1].imshow(heatmaps[i] / 255.0, extent=(0, 1, 1, 0), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        for x1, y1, x2, y2 in regions["boxes"][regions["image_index"] == i]:
            axes[1].add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", lw=1))
        for ax in axes:
            ax.set_axis_off()
        fig.suptitle(textwrap.fill(captions[i], 80), fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"val_{i:04d}.png", dpi=100)
        plt.close(fig)
    print(f"wrote {min(n, len(images))} previews ({s}px images) to {out_dir}")


# ----------------------------------------------------------------------------------------------- trusted evaluation
# Two processes. The trusted parent never imports torch and never runs anything from the hand-off: it reads the
# split, checks every byte of the two archives and rebuilds them in memory, and ranks. The graphs run in a child
# process (encoder_child) that gets only the rebuilt archives and the inputs, in two independent secret orders,
# and hands back only float32 embeddings. The child never sees which image goes with which caption, nor the
# parent's memory or file descriptors (the parent is not dumpable), nor the real stdout (its own is /dev/null).

def retrieval_metrics(sim):
    """Ranks for image->text (rows) and text->image (columns) of a square similarity matrix whose diagonal holds
    the correct pairs. Rank 1 = correct first; ties count against: rank = number of scores >= the correct one.
    Non-finite scores are treated as the worst possible."""
    sim = np.asarray(sim, dtype=np.float64)
    sim = np.where(np.isfinite(sim), sim, -np.inf)
    correct = np.diag(sim)
    ranks_i2t = (sim >= correct[:, None]).sum(axis=1)
    ranks_t2i = (sim >= correct[None, :]).sum(axis=0)
    out = {"mean_rank": (ranks_i2t.mean() + ranks_t2i.mean()) / 2,
           "median_rank": (np.median(ranks_i2t) + np.median(ranks_t2i)) / 2}
    for k in (1, 5, 10):
        out[f"r{k}"] = ((ranks_i2t <= k).mean() + (ranks_t2i <= k).mean()) / 2
    out["n"] = sim.shape[0]
    return out


ENCODERS = ["image_encoder.pt2", "text_encoder.pt2"]
HANDOFF_CAPS = {"image_encoder.pt2": 2 << 30, "text_encoder.pt2": 2 << 30, "train_stats.json": 1 << 16}  # bytes
MAX_DIM = 16384            # embedding size cap: what the child may send back per row
BATCH_TOLERANCE = 0.005    # batch independence: allowed drift, as a fraction of the distance between two items
# What torch.export.save writes for one plain nn.Module, and nothing else: torch.export.load() would unpickle
# (weights_only=False) weights or constants marked "use_pickle", custom/opaque objects, old-format files and
# sample inputs, so none of those ever reach it.
ARCHIVE_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                             r"|models/model\.json|data/sample_inputs/model\.pt"
                             r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                             r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)")
ARCHIVE_HEADER = {"archive_format": rb"pt2", "archive_version": rb"\d+", "byteorder": rb"little|big",
                  ".data/version": rb"\d+\n?"}
FQN = re.compile(r"[A-Za-z_][\w.]*")  # weight names and graph names; they end up in generated Python code
# Graph ops: aten only (plus the plumbing export emits), no I/O, no string arguments but these harmless ones.
DENIED_ATEN = {"_print", "from_file"}
STR_ARGS = {"approximate", "rounding_mode", "equation", "reduce", "side", "mode", "padding", "padding_mode",
            "interpolation_mode", "norm", "ord", "indexing", "assert_msg", "msg"}
OTHER_OPS = {"_operator." + n for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg",
                                        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
OTHER_OPS |= {"torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_float", "torch.sym_int", "torch._assert",
              "torch.ops.higher_order.wrap_with_set_grad_enabled", "torch.ops.higher_order.wrap_with_autocast"}
# Custom objects, operators as values and namedtuple types: torch looks each up by name.
BY_NAME = {"as_custom_obj", "as_operator", "custom_obj_values", "treespec_namedtuple_fields"}
# A plain program reads parameters, buffers and constants and returns outputs: no effect tokens, no mutated
# state carried from one batch to the next, no custom objects.
INPUT_SPECS = {"user_input", "parameter", "buffer", "tensor_constant", "constant_input"}
OUTPUT_SPECS = {"user_output"}
# Symbolic shapes are parsed with sympy.sympify (an eval) and guards become Python code: plain arithmetic only.
SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Float", "True", "False", "positive", "integer", "real",
               "nonnegative", "finite", "Max", "Min", "Mul", "Add", "Pow", "Mod", "Abs", "floor", "ceiling", "Eq",
               "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "FloorDiv", "CleanDiv", "CeilDiv",
               "ModularIndexing", "PythonMod", "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "ToFloat",
               "IntTrueDiv", "FloatTrueDiv", "PowByNatural", "FloatPow", "Where"}
SYMBOL = r"[a-z]+\d+"
GUARD_TERM = re.compile(r"L\['[A-Za-z_]\w*'\](\.(size|stride)\(\)\[\d+\])?")


def _check_op(name, inputs=()):
    """Raises UserError unless name is an allowed graph op ('torch.ops.aten.<op>.<overload>' or OTHER_OPS) whose
    only string arguments are harmless ones."""
    m = re.fullmatch(r"torch\.ops\.aten\.(\w+)\.(\w+)", name)
    if name not in OTHER_OPS and (not m or m.group(1) in DENIED_ATEN):
        raise UserError(f"the graph calls {name[:80]!r}: only side-effect-free aten ops are allowed")
    for a in inputs:
        arg = a.get("arg") if isinstance(a, dict) else None
        if isinstance(arg, dict) and {"as_string", "as_strings"} & set(arg) and a.get("name") not in STR_ARGS:
            raise UserError(f"the graph calls {name} with a string argument {str(a.get('name'))[:40]!r}, "
                            "which is not allowed")


def _check_expr(s):
    if not re.fullmatch(r"[\w\s+\-*/%(),.<>=!']*", s) or "__" in s:
        raise UserError(f"unexpected symbolic expression {s[:80]!r}")
    rest = re.sub(rf"'{SYMBOL}'", "", s)  # quoted symbol names are the only strings allowed
    names = re.findall(r"[A-Za-z_]\w*", rest)
    if "'" in rest or any(n not in SYMPY_NAMES and not re.fullmatch(SYMBOL, n) for n in names):
        raise UserError(f"unexpected symbolic expression {s[:80]!r}")


def _check_guard(s):
    rest = GUARD_TERM.sub("0", s)
    if not re.fullmatch(r"[\w\s+\-*/%()<>=!]*", rest) or any(
            n not in ("and", "or", "not") for n in re.findall(r"[A-Za-z_]\w*", rest)):
        raise UserError(f"unexpected guard {s[:80]!r}")


def _check_spec(s):
    """A pytree spec as torch.export.save writes it for an encoder: tensors in tuples, lists and dicts with plain
    keys. torch imports any other type, and enum values in a dict's keys, by name (a ctypes library loader, say)."""
    def node(t):
        ok = isinstance(t, dict) and set(t) == {"type", "context", "children_spec"} and isinstance(
            t["children_spec"], list)
        typ, ctx, kids = (t["type"], t["context"], t["children_spec"]) if ok else (None, None, None)
        if not ok:
            pass
        elif typ is None:
            ok = ctx is None and not kids
        elif typ in ("builtins.tuple", "builtins.list"):
            ok = ctx == "null"
        elif typ == "builtins.dict":
            keys = _strict_json(ctx) if isinstance(ctx, str) else None
            ok = isinstance(keys, list) and len(keys) == len(kids) and all(
                isinstance(k, str) and FQN.fullmatch(k) for k in keys)
        else:
            ok = False
        if not ok:
            raise UserError(f"unexpected input/output structure {json.dumps(t)[:100]}: only tensors in tuples, "
                            "lists and dicts with plain string keys are allowed")
        for k in kids:
            node(k)

    spec = _strict_json(s) if isinstance(s, str) else None
    if not (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1):
        raise UserError(f"unexpected pytree spec {str(s)[:80]!r}")
    node(spec[1])


def _check_program(o, key=""):
    """Walks the serialized program: node targets, symbolic expressions, guards, specs and names must all be plain.
    Node metadata (stack traces, module paths) is dropped: it only informs, and torch imports or compiles some of
    it."""
    if isinstance(o, dict):
        if "target" in o and "inputs" in o:  # a graph node, at any depth (subgraphs included)
            _check_op(str(o["target"]), o["inputs"] if isinstance(o["inputs"], list) else [])
        for k, v in o.items():
            if not FQN.fullmatch(k):
                raise UserError(f"unexpected name {k[:60]!r} in the graph")
            if k == "metadata":
                o[k] = {}
            elif k in BY_NAME and v:
                raise UserError(f"the graph uses {k}: only tensors and plain values are allowed")
            elif k in ("input_specs", "output_specs") and not all(
                    isinstance(spec, dict) and set(spec) <= (INPUT_SPECS if k == "input_specs" else OUTPUT_SPECS)
                    for spec in v):
                raise UserError(f"the graph has {k} of kinds {sorted({s for d in v for s in d})}: only plain inputs, "
                                "parameters, buffers and constants in, outputs out (no state carried between calls)")
            elif k == "expr_str":
                _check_expr(str(v))
            elif k == "guards_code":
                for g in v:
                    _check_guard(str(g))
            elif k in ("in_spec", "out_spec"):
                _check_spec(v)
            else:
                _check_program(v, k)
    elif isinstance(o, list):
        for v in o:
            _check_program(v, key)
    elif isinstance(o, str):
        ok = FQN.fullmatch(o) or o == "" or (key == "as_string" and re.fullmatch(r"[\w ,.\->]*", o)) or (
            key == "torch_version" and re.fullmatch(r"[\w.+]*", o))
        if not ok:
            raise UserError(f"unexpected string {o[:60]!r} in the graph ({key})")


def _strict_json(b):
    """JSON with unique keys, so that what we check is what torch reads (its parser keeps the last duplicate)."""
    def unique(pairs):
        if len({k for k, _ in pairs}) != len(pairs):
            raise UserError(f"duplicate keys in {[k for k, _ in pairs][:8]} in the archive's JSON")
        return dict(pairs)
    return json.loads(b, object_pairs_hook=unique)


def check_archive(raw):
    """The archive torch will load, rebuilt in memory from the checked entries of `raw` (what train.py wrote),
    else UserError. Only what torch.export.save writes for a plain nn.Module: plain, unique entry names, raw
    tensors only (nothing torch would unpickle), unique-key JSON, safe graph ops and plain specs. torch never
    reads `raw` itself, so where two zip readers disagree (NUL bytes in names, duplicate names, a local header
    that differs from the central directory) only the checked reading counts."""
    try:
        z = zipfile.ZipFile(io.BytesIO(raw))
        infos = z.infolist()
        root = infos[0].orig_filename.split("/", 1)[0] + "/" if infos else ""
        entries = {}
        for info in infos:
            name = info.orig_filename  # zipfile's .filename stops at a NUL byte; torch reads the whole name
            if not (name.isascii() and name.isprintable()):
                raise UserError(f"entry name {name[:80]!r} has a non-printable character")
            rel = name[len(root):]
            if rel in entries:
                raise UserError(f"duplicate entry {name[:80]!r}")
            if not name.startswith(root) or not ARCHIVE_ENTRIES.fullmatch(rel):
                raise UserError(f"unexpected entry {name[:80]!r}: only what torch.export.save writes is allowed")
            if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                raise UserError(f"entry {name[:80]!r} is compressed or encrypted; torch.export.save stores entries")
            entries[rel] = z.read(info)  # checks the local header's name against the central directory's
        if entries.get("archive_format") != b"pt2" or "models/model.json" not in entries:
            raise UserError("not a torch.export archive (save it with torch.export.save)")
        out = {}
        for name, pattern in ARCHIVE_HEADER.items():
            if not re.fullmatch(pattern, entries[name]):
                raise UserError(f"unexpected {name} {entries[name][:20]!r}")
            out[name] = entries[name]
        for cfg, folder, prefix in (("data/weights/model_weights_config.json", "data/weights/", "weight_"),
                                    ("data/constants/model_constants_config.json", "data/constants/", "tensor_")):
            config = _strict_json(entries[cfg])
            if set(config) != {"config"}:
                raise UserError(f"unexpected keys {sorted(config)[:5]} in {cfg}")
            for fqn, pm in config["config"].items():
                if pm.get("use_pickle") is not False or not pm.get("tensor_meta") or not FQN.fullmatch(fqn) \
                        or not re.fullmatch(prefix + r"\d+", str(pm.get("path_name"))):
                    raise UserError(f"{fqn[:60]!r} is not a plain tensor (pickled or custom objects are refused)")
                _check_program(pm)
                out[folder + pm["path_name"]] = entries[folder + pm["path_name"]]
            out[cfg] = json.dumps(config).encode()
        program = _strict_json(entries["models/model.json"])
        _check_program(program)
        out["models/model.json"] = json.dumps(program).encode()
        out["data/sample_inputs/model.pt"] = b""  # read as "no sample inputs": nothing for torch to unpickle
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError, RecursionError) as e:
        raise UserError(f"not a torch.export archive ({type(e).__name__}: {str(e)[:200]})")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as w:
        for name, data in out.items():
            w.writestr("archive/" + name, data)
    return buf.getvalue()


def read_handoff(run_dir, name):
    """The bytes of one hand-off file, None if it is missing. Only a regular file of at most its cap: never a
    symlink (no-follow), never a FIFO (non-blocking open) or a device."""
    cap = HANDOFF_CAPS[name]
    try:
        fd = os.open(Path(run_dir) / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot open {name} in the run directory ({os.strerror(e.errno)}); "
                        "the hand-off may hold regular files only")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{name} in the run directory is not a regular file; the hand-off may hold regular "
                            "files only")
        if st.st_size > cap:
            raise UserError(f"{name} is {st.st_size} bytes, more than the {cap} allowed")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise UserError(f"{name} is more than the {cap} bytes allowed")
    return data


def read_split(data, split):
    """meta.json, images and tokens of a split: from a data directory, or with data "-" from a tar stream on stdin
    that holds just those three files (how run.sh passes them, so that no file in the evaluation container holds
    the split and only this process, not the one running the graphs, ever has it)."""
    names = ["meta.json", f"{split}/images.npy", f"{split}/tokens.npy"]
    files = {}
    if str(data) == "-":
        try:
            with tarfile.open(fileobj=sys.stdin.buffer, mode="r|") as tar:
                for m in tar:
                    if not m.isreg() or m.name not in names or m.name in files:
                        raise UserError(f"unexpected entry {m.name[:80]!r} in the data on stdin (expected {names})")
                    files[m.name] = tar.extractfile(m).read()
        except tarfile.TarError as e:
            raise UserError(f"cannot read the data on stdin as a tar stream ({e})")
    else:
        files = {n: (Path(data) / n).read_bytes() for n in names if (Path(data) / n).is_file()}
    if len(files) != len(names):
        raise UserError(f"no prepared {split} split in {data}; run python prepare_data.py first")
    meta = json.loads(files["meta.json"])
    images, tokens = (np.load(io.BytesIO(files[n]), allow_pickle=False) for n in names[1:])
    return meta, images, tokens


def read_train_stats(data, notes):
    """The informational numbers of train_stats.json, keeping only real finite numbers (never echo strings)."""
    try:
        stats = json.loads(data)
    except (TypeError, ValueError):
        notes.append("note: no readable train_stats.json in the run directory")
        return {}
    out = {}
    for k in STAT_KEYS:
        v = stats.get(k) if isinstance(stats, dict) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            out[k] = v
        else:
            notes.append(f"note: train_stats.json has no valid number for {k}")
    return out


def _not_dumpable():
    """Other processes of our uid (the encoder child) can then neither read our memory nor open our file
    descriptors through /proc, nor ptrace us; there is no Yama on every kernel to stop them otherwise."""
    if sys.platform == "linux":
        import ctypes
        if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE, 0
            raise UserError(f"prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}")


def _one_line(s, limit=300):
    """Text from the child, safe to print: printable ASCII on one bounded line."""
    return " ".join(re.sub(r"[^\x20-\x7e]", " ", s).split())[:limit]


# Frames on the pipes between parent and child: 8-byte little-endian length, then the body.
def _read_exact(fd, n, deadline=None):
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None and not select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
            raise TimeoutError
        chunk = os.read(fd, min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _write_all(fd, data, deadline=None):
    view = memoryview(data)
    while view:
        if deadline is not None and not select.select([], [fd], [], max(0, deadline - time.monotonic()))[1]:
            raise TimeoutError
        view = view[os.write(fd, view):]


def _send(fd, body, deadline=None):
    _write_all(fd, struct.pack("<Q", len(body)) + body, deadline)


def _recv(fd, cap=None, deadline=None):
    n = struct.unpack("<Q", _read_exact(fd, 8, deadline))[0]
    if cap is not None and n > cap:
        raise UserError(f"the encoder process sent {n} bytes where at most {cap} fit")
    return _read_exact(fd, n, deadline)


CHILD_ENV = ("PATH", "HOME", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")


class Encoders:
    """The parent's end of the child that runs the graphs: one time limit over everything, and nothing taken from
    it but bounded, shape-checked float32 arrays (and, on failure, one sanitized line)."""

    def __init__(self, deadline):
        self.deadline = deadline
        r, w = os.pipe()
        env = {k: os.environ[k] for k in CHILD_ENV if k in os.environ}
        env.update(TORCH_FORCE_WEIGHTS_ONLY_LOAD="1", OMP_WAIT_POLICY="PASSIVE")
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import prepare_data; "
                "prepare_data.encoder_child(int(sys.argv[2]))")
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code, str(ROOT), str(w)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, pass_fds=(w,))
        os.close(w)
        self.to_child, self.from_child = self.proc.stdin.fileno(), r
        os.set_blocking(self.to_child, False)
        os.set_blocking(r, False)

    def talk(self, requests, tag, cap):
        """Sends the request frames, returns the body of the reply, which must carry `tag` and fit in cap bytes."""
        try:
            for body in requests:
                _send(self.to_child, body, self.deadline)
            reply = _recv(self.from_child, 1 + max(cap, 4096), self.deadline)  # room for an error line
        except TimeoutError:
            raise UserError("evaluating the exported model took too long (AUTORESEARCH_EVAL_TIMEOUT)")
        except (EOFError, BrokenPipeError):
            self.proc.kill()
            rc = self.proc.wait()
            raise UserError(f"the encoder process died ({f'signal {-rc}' if rc < 0 else f'exit code {rc}'})")
        if reply[:1] == b"E":
            raise UserError(_one_line(reply[1:].decode("ascii", "replace")))
        if reply[:1] != tag:
            raise UserError("the encoder process sent a malformed reply")
        return reply[1:]

    def encode(self, which, arrays):
        """Embeddings [rows, D] of one batch for encoder `which` (0 image, 1 text)."""
        buf = io.BytesIO()
        for a in arrays:
            np.save(buf, a)
        rows = len(arrays[0])
        body = self.talk([bytes([which]) + buf.getvalue()], b"A", 8 + rows * MAX_DIM * 4)
        n, dim = struct.unpack("<II", body[:8]) if len(body) >= 8 else (-1, 0)
        if n != rows or not 1 <= dim <= MAX_DIM or len(body) != 8 + n * dim * 4:
            raise UserError(f"{ENCODERS[which]} returned shape ({n}, {dim}) for {rows} inputs; expected "
                            f"[{rows}, D] with D <= {MAX_DIM}")
        return np.frombuffer(body, "<f4", offset=8).reshape(n, dim)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        os.close(self.from_child)


def encoder_child(reply_fd):
    """The child: loads the two archives sent on stdin, then answers each batch with its embeddings on reply_fd.
    It runs the untrusted graphs, so what it sends is checked by the parent, never believed."""
    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prepare = [lambda a, dev: [torch.from_numpy(a[0]).to(dev).permute(0, 3, 1, 2).float().div(255)],
               lambda a, dev: [torch.from_numpy(x).to(dev).long() for x in a]]
    models, fell_back, stage = [], [], ENCODERS[0]
    try:
        for stage in ENCODERS:
            ep = torch.export.load(io.BytesIO(_recv(0)))
            check_graphs(ep)
            dev = device
            if device != "cpu":
                try:
                    from torch.export.passes import move_to_device_pass
                    ep = move_to_device_pass(ep, device)
                except Exception:
                    dev = "cpu"
            module = ep.module()
            # Everything the graph could write to and read back in its next call: weights, buffers, constants.
            state = [t for t in itertools.chain(module.parameters(), module.buffers(), (
                v for m in module.modules() for v in vars(m).values())) if isinstance(t, torch.Tensor)]
            models.append((module, dev, state, [t.clone() for t in state]))
            fell_back.append(dev != device)
        _send(reply_fd, b"R" + bytes(fell_back))
        while True:
            try:
                request = _recv(0)
            except EOFError:
                return
            which, f = request[0], io.BytesIO(request[1:])
            model, dev, state, pristine = models[which]
            stage = ENCODERS[which]
            with torch.no_grad():
                out = model(*prepare[which]([np.load(f) for _ in range(which + 1)], dev))
            if not all(torch.equal(a, b) for a, b in zip(state, pristine)):
                raise UserError("the graph changed its own weights, buffers or constants; nothing may carry over "
                                "from one batch to the next")
            if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] > MAX_DIM:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise UserError(f"it returned {shape}, expected a tensor [batch, D] with D <= {MAX_DIM}")
            out = out.detach().float().cpu().contiguous().numpy().astype("<f4", copy=False)
            _send(reply_fd, b"A" + struct.pack("<II", *out.shape) + out.tobytes())
    except Exception as e:
        what = f"cannot load {stage}" if len(models) < len(ENCODERS) else f"{stage} failed on the evaluation data"
        why = f": {e}" if isinstance(e, UserError) else f" ({type(e).__name__}: {e})"
        _send(reply_fd, b"E" + (what + why).encode("ascii", "replace"))


def _op_name(target):
    """'torch.ops.aten.add.Tensor' style name of a graph node target (an OpOverload, a HOP or a function)."""
    import torch
    if isinstance(target, torch._ops.OpOverload):
        return f"torch.ops.{target.namespace}.{target._overloadpacket.__name__}.{target._overloadname}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"torch.ops.higher_order.{target.name()}"
    if callable(target) and getattr(target, "__module__", None) in ("_operator", "operator"):
        return f"_operator.{target.__name__}"
    if callable(target) and getattr(torch, getattr(target, "__name__", ""), None) is target:
        return f"torch.{target.__name__}"
    return repr(target)


def check_graphs(ep):
    """After loading, the graph as torch sees it (all submodules) must still use allowed ops only."""
    for gm in ep.graph_module.modules():
        graph = getattr(gm, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op in ("call_function", "call_method", "call_module"):
                if node.op != "call_function":
                    raise UserError(f"the graph has a {node.op} node; only functional aten graphs are allowed")
                _check_op(_op_name(node.target))


def _encode_all(encoders, which, arrays, order, batch):
    """Embeddings of all rows, in row order, sent to the child in `order`, `batch` rows at a time."""
    parts = [encoders.encode(which, [a[idx] for a in arrays])
             for idx in np.split(order, range(batch, len(order), batch))]
    sizes = sorted({p.shape[1] for p in parts})
    if len(sizes) != 1:
        raise UserError(f"{ENCODERS[which]} returned embeddings of different sizes {sizes}")
    emb = np.empty((len(order), parts[0].shape[1]), dtype=np.float32)
    emb[order] = np.concatenate(parts)
    if not np.isfinite(emb).all():
        raise UserError(f"{ENCODERS[which]} returned non-finite embeddings")
    return emb


def _unit(e):
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


def _check_batch_independence(encoders, which, arrays, emb, batch, rng):
    """Each row's embedding must depend on that row alone. For each batch size of the first pass, a random subset
    is encoded again as one batch of that size, next to different rows at different positions; a graph that uses
    the rest of its batch (subtracting the batch mean, say) adapts to the evaluation data and is refused."""
    n = len(emb)
    spread = np.median(np.linalg.norm(_unit(emb) - _unit(emb[rng.permutation(n)]), axis=1))
    allowed = max(BATCH_TOLERANCE * spread, 1e-6)
    for size in sorted({min(batch, n - s) for s in range(0, n, batch)}):
        idx = rng.choice(n, size, replace=False)
        again = encoders.encode(which, [a[idx] for a in arrays])
        drift = np.median(np.linalg.norm(_unit(again) - _unit(emb[idx]), axis=1))
        if not drift <= allowed:  # also refuses NaN
            raise UserError(f"{ENCODERS[which]} gives a different embedding for the same input in another batch "
                            f"(median change {drift:.3g}, allowed {allowed:.3g}): each row's output must depend on "
                            "that row alone, not on the rest of the batch")


def evaluate(run_dir, data, split="val", batch=256):
    """Prints the metric block on stdout (notes first, whole lines); see the README's trust boundary."""
    t0 = time.monotonic()
    deadline = t0 + 0.9 * float(os.environ.get("AUTORESEARCH_EVAL_TIMEOUT") or 600)  # our message before the kill
    _not_dumpable()
    encoders = Encoders(deadline)  # starts now: it imports torch while we read and check
    try:
        archives = []
        for name in ENCODERS:
            raw = read_handoff(run_dir, name)
            if raw is None:
                raise UserError(f"missing model file {Path(run_dir) / name} (train.py must export it with "
                                "torch.export.save)")
            try:
                archives.append(check_archive(raw))
            except UserError as e:
                raise UserError(f"cannot load {Path(run_dir) / name}: {e}")
        notes = []
        stats = read_train_stats(read_handoff(run_dir, "train_stats.json"), notes)
        meta, images, tokens = read_split(data, split)
        n = len(images)
        fell_back = encoders.talk(archives, b"R", len(ENCODERS))[:len(ENCODERS)]
        notes += [f"note: could not move {name} to the GPU; evaluated on the CPU"
                  for name, f in zip(ENCODERS, fell_back) if f]
        # Two independent secret orders: the graphs never see which image goes with which caption. Batches of at
        # most half the split, so a batch never holds all of it and a second composition always exists.
        rng = np.random.default_rng(secrets.randbits(64))
        batch = max(1, min(batch, -(-n // 2)))
        inputs = [[images], [tokens, (tokens != meta.get("pad_id", 0)).astype(np.int32)]]
        emb = []
        for which, order in enumerate([rng.permutation(n), rng.permutation(n)]):
            emb.append(_encode_all(encoders, which, inputs[which], order, batch))
            _check_batch_independence(encoders, which, inputs[which], emb[which], batch, rng)
    finally:
        encoders.close()
    emb_i, emb_t = emb
    if emb_i.shape[1] != emb_t.shape[1]:
        raise UserError(f"embedding sizes differ: image {emb_i.shape[1]}, text {emb_t.shape[1]}")
    m = retrieval_metrics(_unit(emb_i.astype(np.float64)) @ _unit(emb_t.astype(np.float64)).T)
    lines = [f"{split}_mean_rank: {m['mean_rank']:.2f}", f"{split}_median_rank: {m['median_rank']:.1f}",
             f"{split}_r1: {m['r1']:.4f}", f"{split}_r5: {m['r5']:.4f}", f"{split}_r10: {m['r10']:.4f}",
             f"{split}_n: {n}"]
    lines += [f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items()]
    lines.append(f"eval_seconds: {time.monotonic() - t0:.1f}")
    print("\n".join(notes + lines), flush=True)
    return m


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--data", dest="out", type=Path, default=None,
                   help="data directory (default: $AUTORESEARCH_DATA, else ./data); for --evaluate, '-' reads "
                        "meta.json and the split's images.npy and tokens.npy as a tar stream on stdin")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic train split (public: in meta.json)")
    p.add_argument("--heldout-seed", type=int, default=None,
                   help="seed of the synthetic val and test splits (secret; default: the one recorded in "
                        "DATA/raw-synthetic/params.json, else a new random one)")
    p.add_argument("--n-train", type=int, default=8000)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=None, help="cache resolution (default 64 synthetic, 224 real)")
    p.add_argument("--ukiyoe-vg", type=Path, default=None, metavar="DIR", help="ingest a local Ukiyo-eVG copy")
    p.add_argument("--weights", type=Path, default=None, help="weights cache (default: $AUTORESEARCH_WEIGHTS, else ./weights)")
    p.add_argument("--download-weights", action="store_true", help="cache the pretrained models (needs internet)")
    p.add_argument("--preview", type=int, default=None, metavar="N", help="write N validation previews to ./previews")
    p.add_argument("--evaluate", type=Path, default=None, metavar="RUN_DIR", help="trusted evaluation of a run")
    p.add_argument("--split", choices=["val", "test"], default="val")
    args = p.parse_args(argv)
    data_dir = args.out or default_data_dir()
    weights_dir = args.weights or default_weights_dir()
    try:
        if args.evaluate is not None:
            evaluate(args.evaluate, data_dir, args.split)
            return 0
        if args.download_weights:
            download_weights(weights_dir)
        if args.ukiyoe_vg is not None:
            build = True
        elif args.download_weights:   # just the weights
            build = False
        else:                         # the synthetic data, unless only previews of existing data were asked for
            build = args.preview is None or not (data_dir / "meta.json").exists()
        if build:
            if min(args.n_train, args.n_val, args.n_test) < 1:
                raise UserError("--n-train, --n-val and --n-test must be at least 1")
            if args.ukiyoe_vg is not None:
                ingest_odvg(args.ukiyoe_vg, data_dir, args.image_size or 224, "ukiyoe-vg", None, weights_dir)
            else:
                counts = {"train": args.n_train, "val": args.n_val, "test": args.n_test}
                raw = ensure_synthetic_raw(data_dir, args.seed, counts, args.heldout_seed)
                ingest_odvg(raw, data_dir, args.image_size or 64, "synthetic", args.seed, weights_dir)
        if args.preview:
            preview(data_dir, args.preview, ROOT / "previews")
        return 0
    except UserError as e:
        print(f"prepare_data.py: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever it quotes
        return 1
    except KeyboardInterrupt:
        print("prepare_data.py: interrupted; nothing was half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
