"""eCLIP: CLIP with expert attention from bounding-box heatmaps. The one file the research agent edits.

Trains an image encoder (timm ViT) and a text encoder (DistilBERT) contrastively for a fixed wall-clock budget,
with an expert loss that uses box heatmaps, then exports both encoders with torch.export for the trusted evaluator
(engine/evaluator.py). Reads only DATA/meta.json and DATA/train/.
"""
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the network: pretrained weights only from the local cache
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Threads sleep instead of spinning while they wait: with other processes on the same few cores, spinning
# OpenMP threads made CPU steps 3-10x slower (measured on 2 shared cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------- hyperparameters
TIME_BUDGET = float(os.environ.get("AUTORESEARCH_TIME_BUDGET", 300))  # seconds of training; the harness sets it
SEED = int(os.environ.get("AUTORESEARCH_SEED", 0))  # the harness varies it to measure noise
MAX_STEPS = int(os.environ.get("AUTORESEARCH_MAX_STEPS", 0))  # tests only: stop after this many steps (0: budget only)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

WEIGHT_DECAY = 1e-4
WARMUP_FRAC = 0.2  # fraction of the time budget spent in linear warmup, then cosine decay to 0
GRAD_CLIP = 1.0
LOGIT_SCALE_INIT = 1 / 0.07
LOGIT_SCALE_MAX = 100.0  # generous: the original's cap of 2 froze the temperature and cost the most mean rank
EXPERT_LOSS_WEIGHT = 0.1
EXPERT_LOSS_PROB = 0.8  # chance per step of adding the expert loss
MIXUP_ALPHA = 0.3  # lambda ~ Beta(a, a) mixes image and expert embeddings
HEATMAP_HEADS = 4

if DEVICE == "cuda":  # paper scale: ViT-S/16 at 224 px, DistilBERT, CLS pooling, pretrained when cached
    LEARNING_RATE = 2e-4
    BATCH_SIZE = 64
    EMBED_DIM = 512
    IMAGE_RES = 224  # cached images are upsampled on the GPU when smaller
    VIT = dict(model_name="vit_small_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=6)
    TEXT = dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072)
    POOL = "cls"
    PRETRAINED = True
    AMP_DTYPE = torch.bfloat16
else:  # a small model that learns within minutes on 2 CPU cores; mean pooling + warmup keep it from collapsing
    LEARNING_RATE = 1e-3
    BATCH_SIZE = 128
    EMBED_DIM = 128
    IMAGE_RES = 64
    VIT = dict(model_name="vit_small_patch16_224", patch_size=16, embed_dim=128, depth=4, num_heads=4)
    TEXT = dict(dim=128, n_layers=2, n_heads=4, hidden_dim=256)
    POOL = "mean"
    PRETRAINED = False
    AMP_DTYPE = None

ROOT = Path(__file__).resolve().parent
DATA = Path(os.environ.get("AUTORESEARCH_DATA") or ROOT / "data")
OUT = Path(os.environ.get("AUTORESEARCH_OUT") or ROOT / "runs" / "dev")
WEIGHTS = Path(os.environ.get("AUTORESEARCH_WEIGHTS") or ROOT / "weights")
LOG_EVERY_S = 5.0
PAD_ID = 0  # set from meta.json in main()


def fail(msg):
    print(f"train.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


# ----------------------------------------------------------------------------------------------- data

def load_train(meta):
    d = DATA / "train"
    images = torch.from_numpy(np.load(d / "images.npy")).permute(0, 3, 1, 2).contiguous()  # uint8 [N,3,S,S]
    heatmaps = torch.from_numpy(np.load(d / "heatmaps.npy")).unsqueeze(1).contiguous()  # uint8 [N,1,S,S]
    tokens = torch.from_numpy(np.load(d / "tokens.npy")).long()
    regions = np.load(d / "regions.npz")
    order = np.argsort(regions["image_index"], kind="stable")
    counts = np.bincount(regions["image_index"], minlength=len(images))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    phrases = torch.from_numpy(regions["phrases"][order]).long()
    return dict(images=images, heatmaps=heatmaps, tokens=tokens, phrases=phrases,
                region_start=torch.from_numpy(starts).long(), region_count=torch.from_numpy(counts).long())


def get_batch(data, idx):
    """One batch on DEVICE: images/heatmaps as float in [0,1], caption ids, and one random region phrase per image."""
    r = data["region_start"][idx] + (torch.rand(len(idx)) * data["region_count"][idx]).long()
    b = dict(images=data["images"][idx], heatmaps=data["heatmaps"][idx], tokens=data["tokens"][idx],
             snippets=data["phrases"][r])
    for k in ("tokens", "snippets"):  # drop all-padding columns: short snippets then cost little
        b[k] = b[k][:, : int((b[k] != PAD_ID).sum(1).max())]
    b = {k: v.to(DEVICE, non_blocking=True) for k, v in b.items()}
    b["images"] = b["images"].float().div_(255)
    b["heatmaps"] = b["heatmaps"].float().div_(255)
    return b


# ----------------------------------------------------------------------------------------------- model

class ImageEncoder(nn.Module):
    """images float [B,3,S,S] in [0,1] -> [B,EMBED_DIM]; resizing and normalization live inside (for export)."""

    def __init__(self):
        super().__init__()
        import timm
        name = VIT["model_name"]
        kw = dict(num_classes=0, img_size=IMAGE_RES, patch_size=VIT["patch_size"], embed_dim=VIT["embed_dim"],
                  depth=VIT["depth"], num_heads=VIT["num_heads"], global_pool="token" if POOL == "cls" else "avg")
        self.vit = None
        if PRETRAINED:
            try:
                self.vit = timm.create_model(name + ".augreg_in21k_ft_in1k", pretrained=True, cache_dir=str(WEIGHTS), **kw)
                print(f"image encoder: pretrained {name} from {WEIGHTS}")
            except Exception as e:
                print(f"image encoder: no usable pretrained weights in {WEIGHTS} ({type(e).__name__}); random init")
        if self.vit is None:
            self.vit = timm.create_model(name, pretrained=False, **kw)
        self.proj = nn.Linear(self.vit.num_features, EMBED_DIM)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def prep(self, images):
        if images.shape[-1] != IMAGE_RES or images.shape[-2] != IMAGE_RES:
            images = F.interpolate(images, size=(IMAGE_RES, IMAGE_RES), mode="bilinear", align_corners=False)
        return (images - self.mean) / self.std

    def forward(self, images):
        return self.proj(self.vit(self.prep(images)))


class TextEncoder(nn.Module):
    """input_ids, attention_mask int64 [B,L] -> [B,EMBED_DIM]."""

    def __init__(self, meta):
        super().__init__()
        from transformers import DistilBertConfig, DistilBertModel
        self.bert = None
        if PRETRAINED and meta["tokenizer"] == "distilbert-base-uncased":
            try:
                self.bert = DistilBertModel.from_pretrained("distilbert-base-uncased", cache_dir=str(WEIGHTS),
                                                            local_files_only=True)
                print(f"text encoder: pretrained distilbert-base-uncased from {WEIGHTS}")
            except Exception as e:
                print(f"text encoder: no usable pretrained weights in {WEIGHTS} ({type(e).__name__}); random init")
        if self.bert is None:
            cfg = DistilBertConfig(vocab_size=meta["vocab_size"], max_position_embeddings=max(512, meta["max_len"]),
                                   pad_token_id=meta["pad_id"], **TEXT)
            self.bert = DistilBertModel(cfg)
        self.proj = nn.Linear(self.bert.config.dim, EMBED_DIM)

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if POOL == "cls":
            pooled = h[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.proj(pooled)


class HeatmapProcessor(nn.Module):
    """Heatmap patches attend to image patches; the result, mean-pooled and L2-normalized, is the expert embedding."""

    def __init__(self, dim, patch, heads):
        super().__init__()
        self.image_patches = nn.Conv2d(3, dim, patch, patch)
        self.heatmap_patches = nn.Conv2d(1, dim, patch, patch)
        self.norm_q, self.norm_k = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, images, heatmaps):
        img = self.image_patches(images).flatten(2).transpose(1, 2)  # [B, T, D]
        heat = self.heatmap_patches(heatmaps).flatten(2).transpose(1, 2)
        out, _ = self.attn(self.norm_q(heat), self.norm_k(img), img, need_weights=False)
        return F.normalize(out.mean(1), dim=-1)


class ECLIP(nn.Module):
    def __init__(self, meta):
        super().__init__()
        self.image = ImageEncoder()
        self.text = TextEncoder(meta)
        self.expert = HeatmapProcessor(EMBED_DIM, VIT["patch_size"], HEATMAP_HEADS)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE_INIT)))


def clip_loss(a, b, scale):
    logits = scale * a @ b.t()
    labels = torch.arange(len(a), device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def compute_loss(model, b, use_expert):
    img = F.normalize(model.image(b["images"]), dim=-1)
    mask = (b["tokens"] != PAD_ID).long()
    txt = F.normalize(model.text(b["tokens"], mask), dim=-1)
    scale = model.logit_scale.exp()
    loss = clip_loss(img, txt, scale)
    if use_expert:
        snip = F.normalize(model.text(b["snippets"], (b["snippets"] != PAD_ID).long()), dim=-1)
        masked = model.expert(model.image.prep(b["images"]), F.interpolate(b["heatmaps"], size=(IMAGE_RES, IMAGE_RES)))
        lam = torch.distributions.Beta(MIXUP_ALPHA, MIXUP_ALPHA).sample((len(img), 1)).to(img.device)
        mixed = F.normalize(lam * img + (1 - lam) * masked, dim=-1)
        expert = (clip_loss(mixed, snip, scale) + clip_loss(masked, txt, scale)) / 2
        loss = loss + EXPERT_LOSS_WEIGHT * expert
    return loss


def lr_at(progress):
    """Warmup then cosine, as a function of the fraction of the time budget used."""
    if progress < WARMUP_FRAC:
        return LEARNING_RATE * progress / WARMUP_FRAC
    return LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP_FRAC) / (1 - WARMUP_FRAC))))


# ----------------------------------------------------------------------------------------------- export

def export(model, meta):
    """The hand-off to the trusted evaluator: two torch.export programs with a dynamic batch dimension."""
    model = model.float().cpu().eval()
    OUT.mkdir(parents=True, exist_ok=True)
    s, L = meta["image_size"], meta["max_len"]
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        ep = torch.export.export(model.image, (torch.rand(2, 3, s, s),), dynamic_shapes=({0: batch},))
        torch.export.save(ep, str(OUT / "image_encoder.pt2"))
        ids = torch.randint(1, meta["vocab_size"], (2, L))
        mask = torch.ones(2, L, dtype=torch.long)
        mask[1, L // 2:] = 0  # a padded example, so the graph keeps the general masking path
        ep = torch.export.export(model.text, (ids, mask), dynamic_shapes=({0: batch}, {0: batch}))
        torch.export.save(ep, str(OUT / "text_encoder.pt2"))


# ----------------------------------------------------------------------------------------------- main

def main():
    global PAD_ID
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    if not (DATA / "meta.json").is_file():
        fail(f"no prepared data in {DATA}; run python prepare_data.py first")
    meta = json.loads((DATA / "meta.json").read_text())
    PAD_ID = meta["pad_id"]
    data = load_train(meta)
    n = len(data["images"])
    print(f"device {DEVICE} | train {n} | image {meta['image_size']}px -> {IMAGE_RES}px | tokenizer {meta['tokenizer']}"
          f" | budget {TIME_BUDGET:.0f}s | seed {SEED}", flush=True)

    model = ECLIP(meta).to(DEVICE)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"params {num_params / 1e6:.2f}M", flush=True)
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in name]
    no_decay = [p for name, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in name]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=LEARNING_RATE, betas=(0.9, 0.98), eps=1e-6, fused=DEVICE == "cuda")
    gen = torch.Generator().manual_seed(SEED)
    perm, pos = torch.randperm(n, generator=gen), 0
    step, smooth, last_log = 0, None, -LOG_EVERY_S
    model.train()
    t0 = time.time()
    while True:
        elapsed = time.time() - t0
        progress = max(elapsed / TIME_BUDGET, step / MAX_STEPS if MAX_STEPS else 0.0)
        if progress >= 1.0:
            break
        lr = lr_at(progress)
        for g in opt.param_groups:
            g["lr"] = lr
        if pos + BATCH_SIZE > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        b = get_batch(data, perm[pos: pos + BATCH_SIZE])
        pos += BATCH_SIZE
        use_expert = EXPERT_LOSS_WEIGHT > 0 and torch.rand(1, generator=gen).item() < EXPERT_LOSS_PROB
        with torch.autocast(DEVICE, dtype=AMP_DTYPE, enabled=AMP_DTYPE is not None):
            loss = compute_loss(model, b, use_expert)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(LOGIT_SCALE_MAX))
        loss_f = loss.item()
        if not math.isfinite(loss_f) or loss_f > 100:
            fail(f"training diverged at step {step}: loss {loss_f} (try a lower LEARNING_RATE or more warmup)")
        smooth = loss_f if smooth is None else 0.9 * smooth + 0.1 * loss_f
        step += 1
        if elapsed - last_log >= LOG_EVERY_S:
            last_log = elapsed
            print(f"step {step} | loss {loss_f:.4f} | lr {lr:.1e} | {elapsed:.1f}/{TIME_BUDGET:.0f}s", flush=True)
    training_seconds = time.time() - t0
    print(f"step {step} | loss {smooth:.4f} | done in {training_seconds:.1f}s | scale {model.logit_scale.exp().item():.1f}",
          flush=True)

    if DEVICE == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.time()
    export(model, meta)
    stats = {"training_seconds": round(training_seconds, 2), "num_steps": step, "peak_memory_mb": round(peak_mb, 1),
             "num_params_m": round(num_params / 1e6, 3), "final_loss": round(smooth, 4)}
    (OUT / "train_stats.json").write_text(json.dumps(stats, indent=1))
    print(f"exported to {OUT} in {time.time() - t1:.1f}s", flush=True)


if __name__ == "__main__":
    main()
