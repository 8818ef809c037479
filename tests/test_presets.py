"""The CUDA preset, run on the CPU: nothing else exercises the paper-scale shapes (ViT-S/16 at 224 px, DistilBERT
dims, CLS pooling, bf16 autocast) when no GPU is present. Two steps at batch 4 (AUTORESEARCH_MAX_STEPS, so that a slow
machine takes as many as a fast one), then the real export, whose size sizes the hand-off limit (the README's figure
for the GPU preset comes from here)."""
import json
import re

from conftest import ROOT, run_py
from engine.archive import check_archive

BERT_VOCAB, BERT_DIM = 30522, 768  # distilbert-base-uncased: the real tokenizer's embedding table


def cuda_preset_on_cpu(tmp_path):
    """train.py with the `if DEVICE == "cuda":` block forced on and the batch cut to 4: the shapes of the GPU run."""
    src = (ROOT / "train.py").read_text()
    src, n = re.subn(r'^if DEVICE == "cuda":', "if True:", src, flags=re.M)
    assert n == 1, "train.py no longer has the `if DEVICE == \"cuda\":` preset block"
    src, n = re.subn(r"^    BATCH_SIZE = 64$", "    BATCH_SIZE = 4", src, flags=re.M)
    assert n == 1, "the CUDA preset's BATCH_SIZE line changed"
    path = tmp_path / "train.py"
    path.write_text(src)
    return path


def test_cuda_preset_shapes_train_and_export_on_cpu(tiny_data, tmp_path):
    out, weights = tmp_path / "out", tmp_path / "no-weights"
    weights.mkdir()
    r = run_py([cuda_preset_on_cpu(tmp_path)], env={"AUTORESEARCH_DATA": str(tiny_data), "AUTORESEARCH_OUT": str(out),
                                                    "AUTORESEARCH_WEIGHTS": str(weights),
                                                    "AUTORESEARCH_TIME_BUDGET": "3600", "AUTORESEARCH_MAX_STEPS": "2"},
               timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "image 64px -> 224px" in r.stdout, r.stdout[:500]          # the paper resolution, upsampled
    assert "no usable pretrained weights" in r.stdout                 # offline: random init, said so
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["num_steps"] == 2, stats
    # ViT-S/16 (22M) + a 6-layer 768-wide DistilBERT without its 23M-entry vocabulary + the heatmap processor
    assert 60 < stats["num_params_m"] < 75, stats
    img, txt = (out / "image_encoder.pt2").stat().st_size, (out / "text_encoder.pt2").stat().st_size
    meta = json.loads((tiny_data / "meta.json").read_text())
    full = img + txt + (BERT_VOCAB - meta["vocab_size"]) * BERT_DIM * 4   # fp32 export with the real vocabulary
    print(f"CUDA-preset export: image {img / 2**20:.0f} MiB, text {txt / 2**20:.0f} MiB; "
          f"with DistilBERT's vocabulary {full / 2**20:.0f} MiB")
    assert 80e6 < img < 100e6 and 300e6 < full < 400e6, (img, txt, full)
    for name in ("image_encoder.pt2", "text_encoder.pt2"):   # every op of the paper-scale graphs is allowlisted
        check_archive((out / name).read_bytes())
