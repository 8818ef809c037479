"""The project's data and metric for autoresearch (eCLIP on Ukiyo-eVG). The research agent never edits this file.

    python prepare_data.py                       build the offline synthetic dataset into ./data
    python prepare_data.py --ukiyoe-vg DIR       ingest a local copy of Ukiyo-eVG instead
    python prepare_data.py --download-weights    cache the pretrained ViT-S/16 and DistilBERT in ./weights (internet)
    python prepare_data.py --preview 8           PNGs of validation images with their heatmaps, into ./previews
    python prepare_data.py --evaluate RUN_DIR    the trusted evaluation of an exported model (engine/evaluator.py's)

The evaluation is split in two: this file declares what is scored (METRIC, DIRECTION, PROGRAMS, EVAL_FILES) and
scores it (score(), the retrieval metrics); engine/evaluator.py, the engine a fork keeps, checks and runs the hand-off.

The synthetic train split is a pure function of --seed (public: meta.json records it). The val and test splits
come from a separate secret --heldout-seed, drawn at random on the first build and recorded only in
DATA/raw-synthetic/params.json (never mounted into a sandbox, never in meta.json), so train.py cannot regenerate
them. Given both seeds, every split is deterministic.

The synthetic data is written in exactly the Ukiyo-eVG layout (ODVG JSONL + image files) and then ingested by the
same code as the real data, so both go through one path. torch and transformers are imported lazily, so that
`from prepare_data import box_heatmap` stays cheap (and so does the engine's import of score()).
"""
import argparse
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import textwrap
import time
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
        print(f"drawing {counts[split]} synthetic {split} scenes ...", flush=True)
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
            print(f"caching the {split} split: {len(records[split])} images, heatmaps and captions ...", flush=True)
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


# ----------------------------------------------------------------------------------------------- evaluation
# The project's half of the trusted evaluation; engine/evaluator.py does the rest (README: Fork it). These
# four declarations are literals, read without importing this file: METRIC and DIRECTION by the harness, all four
# by the engine and run.sh.
METRIC = "mean_rank"
DIRECTION = "minimize"
PROGRAMS = ["image_encoder.pt2", "text_encoder.pt2"]   # what train.py exports (torch.export.save)
EVAL_FILES = ["images.npy", "tokens.npy"]              # what score() reads of DATA/<split>/


def score(encode, split):
    """Retrieval on one split: image i goes with caption i, a pairing that never leaves this function.
    encode(program, *inputs) runs one of PROGRAMS on every row (see engine/evaluator.py); the two encoders give
    embeddings of one size, compared by cosine similarity."""
    images, tokens = split["images"], split["tokens"].astype(np.int64)
    emb_i = encode("image_encoder.pt2", images.transpose(0, 3, 1, 2).astype(np.float32) / 255)
    emb_t = encode("text_encoder.pt2", tokens, (tokens != split["meta"].get("pad_id", 0)).astype(np.int64))
    if emb_i.shape[1] != emb_t.shape[1]:
        raise ValueError(f"embedding sizes differ: image {emb_i.shape[1]}, text {emb_t.shape[1]}")
    return retrieval_metrics(_unit(emb_i.astype(np.float64)) @ _unit(emb_t.astype(np.float64)).T)


def _unit(e):
    return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)


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


# ----------------------------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", "--data", dest="out", type=Path, default=None,
                   help="data directory (default: $AUTORESEARCH_DATA, else ./data); for --evaluate, '-' reads the "
                        "split from stdin (see engine/evaluator.py)")
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
    p.add_argument("--evaluate", type=Path, default=None, metavar="RUN_DIR", help="engine/evaluator.py --evaluate RUN_DIR")
    p.add_argument("--split", choices=["val", "test"], default="val")
    args = p.parse_args(argv)
    data_dir = args.out or default_data_dir()
    weights_dir = args.weights or default_weights_dir()
    if args.evaluate is not None:
        from engine import evaluator
        return evaluator.main(["--evaluate", str(args.evaluate), "--data", str(data_dir), "--split", args.split])
    try:
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
