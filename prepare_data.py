"""Data preparation and the trusted evaluation for autoresearch. The research agent never edits this file.

    python prepare_data.py                       build the offline synthetic dataset into ./data
    python prepare_data.py --ukiyoe-vg DIR       ingest a local copy of Ukiyo-eVG instead
    python prepare_data.py --download-weights    cache the pretrained ViT-S/16 and DistilBERT in ./weights (internet)
    python prepare_data.py --preview 8           PNGs of validation images with their heatmaps, into ./previews
    python prepare_data.py --evaluate RUN_DIR    trusted retrieval evaluation of an exported model (val split)

The synthetic train split is a pure function of --seed (public: meta.json records it). The val and test splits
come from a separate secret --heldout-seed, drawn at random on the first build and recorded only in
DATA/raw-synthetic/params.json (never mounted into a sandbox, never in meta.json), so train.py cannot regenerate
them. Given both seeds, every split is deterministic.

The synthetic data is written in exactly the Ukiyo-eVG layout (ODVG JSONL + image files) and then ingested by the
same code as the real data, so both go through one path. torch and transformers are imported lazily, so that
`from prepare_data import box_heatmap` stays cheap.
"""
import argparse
import json
import logging
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

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
        fig.suptitle("\n".join(_wrap(captions[i], 80)), fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / f"val_{i:04d}.png", dpi=100)
        plt.close(fig)
    print(f"wrote {min(n, len(images))} previews ({s}px images) to {out_dir}")


def _wrap(text, width):
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


# ----------------------------------------------------------------------------------------------- trusted evaluation

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


# What torch.export.save writes for one plain nn.Module, and nothing else: torch.export.load() would unpickle
# (weights_only=False) weights or constants marked "use_pickle", custom/opaque objects, old-format files and
# sample inputs that the safe unpickler refuses, so such archives are refused before torch ever opens them.
ARCHIVE_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                             r"|models/model\.json|data/sample_inputs/model\.pt"
                             r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                             r"|data/constants/model_constants_config\.json|data/constants/tensor_\d+)")
FQN = re.compile(r"[A-Za-z_][\w.]*")  # weight names and graph names; they end up in generated Python code
# Graph ops: aten only (plus the plumbing export emits), no I/O, no string arguments but these harmless ones.
DENIED_ATEN = {"_print", "from_file"}
STR_ARGS = {"approximate", "rounding_mode", "equation", "reduce", "side", "mode", "padding", "padding_mode",
            "interpolation_mode", "norm", "ord", "indexing", "assert_msg", "msg"}
OTHER_OPS = {"_operator." + n for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg",
                                        "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")}
OTHER_OPS |= {"torch.sym_max", "torch.sym_min", "torch.sym_not", "torch.sym_float", "torch.sym_int", "torch._assert",
              "torch.ops.higher_order.wrap_with_set_grad_enabled", "torch.ops.higher_order.wrap_with_autocast"}
# Symbolic shapes are parsed with sympy.sympify (an eval) and guards become Python code: plain arithmetic only.
SYMPY_NAMES = {"Symbol", "Integer", "Rational", "Float", "True", "False", "positive", "integer", "real",
               "nonnegative", "finite", "Max", "Min", "Mul", "Add", "Pow", "Mod", "Abs", "floor", "ceiling", "Eq",
               "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "FloorDiv", "CleanDiv", "CeilDiv",
               "ModularIndexing", "PythonMod", "CeilToInt", "FloorToInt", "TruncToInt", "RoundToInt", "ToFloat",
               "IntTrueDiv", "FloatTrueDiv", "PowByNatural", "FloatPow", "Where"}
SYMBOL = r"[a-z]+\d+"
GUARD_TERM = re.compile(r"L\['[A-Za-z_]\w*'\](\.(size|stride)\(\)\[\d+\])?")
METADATA_BAD_CHARS = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


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


def _check_op(name):
    """Raises UserError unless name is an allowed graph op ('torch.ops.aten.<op>.<overload>' or OTHER_OPS)."""
    import torch
    m = re.fullmatch(r"torch\.ops\.aten\.(\w+)\.(\w+)", name)
    if name in OTHER_OPS:
        return
    if not m or m.group(1) in DENIED_ATEN:
        raise UserError(f"the graph calls {name[:80]!r}: only side-effect-free aten ops are allowed")
    op = getattr(getattr(torch.ops.aten, m.group(1), None), m.group(2), None)
    if not isinstance(op, torch._ops.OpOverload):
        raise UserError(f"the graph calls an unknown op {name[:80]!r}")
    for a in op._schema.arguments:
        if "str" in str(a.type) and a.name not in STR_ARGS:
            raise UserError(f"the graph calls {name} with a string argument {a.name!r}, which is not allowed")


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


def _check_model_json(o, key=""):
    """Walks the serialized program: node targets, symbolic expressions, guards and names must all be plain."""
    if isinstance(o, dict):
        if "target" in o and "inputs" in o:  # a graph node, at any depth (subgraphs included)
            _check_op(str(o["target"]))
        for k, v in o.items():
            if k == "metadata" and "target" in o:  # node metadata: stack traces etc., only ever in comments
                for s in _strings(v):
                    if METADATA_BAD_CHARS.search(s):
                        raise UserError("unexpected control characters in the graph's metadata")
            elif k == "expr_str":
                _check_expr(str(v))
            elif k == "guards_code":
                for g in v:
                    _check_guard(str(g))
            elif k in ("in_spec", "out_spec"):  # pytree specs: JSON, decoded with json
                pass
            else:
                _check_model_json(v, k)
    elif isinstance(o, list):
        for v in o:
            _check_model_json(v, key)
    elif isinstance(o, str):
        ok = FQN.fullmatch(o) or o == "" or (key == "as_string" and re.fullmatch(r"[\w ,.\->]*", o)) or (
            key == "torch_version" and re.fullmatch(r"[\w.+]*", o))
        if not ok:
            raise UserError(f"unexpected string {o[:60]!r} in the graph ({key})")


def _strings(o):
    if isinstance(o, str):
        yield o
    elif isinstance(o, dict):
        for k, v in o.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(o, list):
        for v in o:
            yield from _strings(v)


def check_archive(path):
    """Refuses (UserError) any .pt2 that is not exactly what torch.export.save writes for a plain nn.Module: only
    raw tensors, no pickles, no old formats, only safe graph ops; nothing here runs code from the archive."""
    import io
    import torch
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            root = names[0].split("/", 1)[0] + "/" if names else ""
            for n in names:
                if not n.startswith(root) or not ARCHIVE_ENTRIES.fullmatch(n[len(root):]):
                    raise UserError(f"unexpected entry {n[:80]!r}: only what torch.export.save writes is allowed")
            read = lambda n: z.read(root + n)
            if read("archive_format") != b"pt2" or "models/model.json" not in [n[len(root):] for n in names]:
                raise UserError("not a torch.export archive (save it with torch.export.save)")
            for cfg, prefix in (("data/weights/model_weights_config.json", "weight_"),
                                ("data/constants/model_constants_config.json", "tensor_")):
                for fqn, pm in json.loads(read(cfg))["config"].items():
                    if pm.get("use_pickle") is not False or not pm.get("tensor_meta") or not FQN.fullmatch(fqn) \
                            or not re.fullmatch(prefix + r"\d+", str(pm.get("path_name"))):
                        raise UserError(f"{fqn[:60]!r} is not a plain tensor (pickled or custom objects are refused)")
            try:  # torch.export.load falls back to an unrestricted unpickler when the safe one refuses
                torch.load(io.BytesIO(read("data/sample_inputs/model.pt")), weights_only=True)
            except Exception as e:
                raise UserError(f"its sample inputs are not plain tensors ({type(e).__name__})")
            _check_model_json(json.loads(read("models/model.json")))
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"not a torch.export archive ({type(e).__name__}: {e})")


def check_graphs(ep):
    """After loading, the graph as torch sees it (all submodules) must still use allowed ops only."""
    for gm in ep.graph_module.modules():
        graph = getattr(gm, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op in ("call_function", "call_method", "call_module"):
                if node.op != "call_function":
                    raise UserError(f"the graph has a {node.op} node; only functional aten graphs are allowed")
                _check_op(_op_name(node.target))


def _load_program(path, device, notes):
    import torch
    if not path.is_file():
        raise UserError(f"missing model file {path} (train.py must export it with torch.export.save)")
    if not zipfile.is_zipfile(path):
        raise UserError(f"cannot load {path}: not a torch.export archive (save it with torch.export.save)")
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.ERROR)  # torch logs its own traceback before raising; our message says it all
    try:
        check_archive(path)  # before torch opens it: torch.export.load can unpickle
        ep = torch.export.load(str(path))
        check_graphs(ep)
    except UserError as e:
        raise UserError(f"cannot load {path}: {e}")
    except Exception as e:
        raise UserError(f"cannot load {path} as a torch.export program ({type(e).__name__}: {e})")
    finally:
        logger.setLevel(level)
    if device != "cpu":
        try:
            from torch.export.passes import move_to_device_pass
            ep = move_to_device_pass(ep, device)
        except Exception as e:
            notes.append(f"note: could not move {path.name} to {device} ({type(e).__name__}); evaluating on cpu")
            device = "cpu"
    return ep.module(), device


def _encode(fn, arrays, order, batch, device):
    import torch
    chunks = []
    with torch.no_grad():
        for s in range(0, len(order), batch):
            idx = order[s: s + batch]
            chunks.append(fn(*[a(idx, device) for a in arrays]).float().cpu())
    emb = torch.cat(chunks).numpy()
    out = np.empty_like(emb)
    out[order] = emb
    return out


def _check_embeddings(emb, n, what):
    if emb.ndim != 2 or emb.shape[0] != n:
        raise UserError(f"{what} returned shape {tuple(emb.shape)}, expected [{n}, D]")
    if not np.isfinite(emb).all():
        raise UserError(f"{what} returned non-finite embeddings")


def read_train_stats(run_dir, notes):
    """The informational numbers of train_stats.json, keeping only real finite numbers (never echo strings)."""
    try:
        stats = json.loads((run_dir / "train_stats.json").read_text())
    except (OSError, ValueError):
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


class silenced_output:
    """fds 1 and 2 point at /dev/null inside (whatever the loaded graphs or torch print goes nowhere);
    .real writes to the original stdout. Restored on exit, so errors are reported normally."""

    def __enter__(self):
        sys.stdout.flush(), sys.stderr.flush()
        self.saved = os.dup(1), os.dup(2)
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1), os.dup2(null, 2)
        os.close(null)
        self.real = os.fdopen(os.dup(self.saved[0]), "w")
        return self

    def __exit__(self, *exc):
        self.real.close()
        sys.stdout.flush(), sys.stderr.flush()
        for fd, saved in zip((1, 2), self.saved):
            os.dup2(saved, fd)
            os.close(saved)


def evaluate(run_dir, data_dir, split="val", batch=256):
    """Prints the metric block on stdout (notes first, whole lines); see the contract in README/contracts."""
    with silenced_output() as out:
        notes, lines, m = _evaluate(run_dir, data_dir, split, batch)
        out.real.write("".join(line + "\n" for line in notes + lines))
        out.real.flush()
    return m


def _evaluate(run_dir, data_dir, split, batch):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning threads crawl when cores are shared
    import torch
    t0 = time.time()
    run_dir, data_dir = Path(run_dir), Path(data_dir)
    if not (data_dir / "meta.json").is_file() or not (data_dir / split / "images.npy").is_file():
        raise UserError(f"no prepared {split} split in {data_dir}; run python prepare_data.py first")
    meta = json.loads((data_dir / "meta.json").read_text())
    images = np.load(data_dir / split / "images.npy")
    tokens = np.load(data_dir / split / "tokens.npy")
    n = len(images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    notes = []
    image_enc, dev_i = _load_program(run_dir / "image_encoder.pt2", device, notes)
    text_enc, dev_t = _load_program(run_dir / "text_encoder.pt2", device, notes)
    # Two independent secret orders: the exported graphs never see which image goes with which caption.
    rng = np.random.default_rng(secrets.randbits(64))
    order_img, order_txt = rng.permutation(n), rng.permutation(n)
    img_arr = lambda idx, dev: torch.from_numpy(images[idx]).to(dev).permute(0, 3, 1, 2).float().div(255)
    ids_arr = lambda idx, dev: torch.from_numpy(tokens[idx]).to(dev).long()
    mask_arr = lambda idx, dev: (torch.from_numpy(tokens[idx]) != meta.get("pad_id", 0)).to(dev).long()
    try:
        emb_i = _encode(image_enc, [img_arr], order_img, batch, dev_i)
        emb_t = _encode(text_enc, [ids_arr, mask_arr], order_txt, batch, dev_t)
    except UserError:
        raise
    except Exception as e:
        msg = " ".join(str(e).split())[:300]  # one line: the message is the model's, so it must not forge lines
        raise UserError(f"the exported model failed on the {split} data ({type(e).__name__}: {msg})")
    _check_embeddings(emb_i, n, "image_encoder.pt2")
    _check_embeddings(emb_t, n, "text_encoder.pt2")
    if emb_i.shape[1] != emb_t.shape[1]:
        raise UserError(f"embedding sizes differ: image {emb_i.shape[1]}, text {emb_t.shape[1]}")
    normalize = lambda e: e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    m = retrieval_metrics(normalize(emb_i.astype(np.float64)) @ normalize(emb_t.astype(np.float64)).T)
    lines = [f"{split}_mean_rank: {m['mean_rank']:.2f}", f"{split}_median_rank: {m['median_rank']:.1f}",
             f"{split}_r1: {m['r1']:.4f}", f"{split}_r5: {m['r5']:.4f}", f"{split}_r10: {m['r10']:.4f}",
             f"{split}_n: {n}"]
    lines += [f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}"
              for k, v in read_train_stats(run_dir, notes).items()]
    lines.append(f"eval_seconds: {time.time() - t0:.1f}")
    return notes, lines, m


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--data", dest="out", type=Path, default=None,
                   help="data directory (default: $AUTORESEARCH_DATA, else ./data)")
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
        build = args.ukiyoe_vg is not None or not args.download_weights and (
            args.preview is None or not (data_dir / "meta.json").exists())
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
