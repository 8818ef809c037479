"""prepare_data.py, the template's project: heatmaps, ODVG ingestion, tokenizer fallback, synthetic data, the
retrieval metrics, and --evaluate handing over to the engine (engine/evaluator.py; its own tests: test_evaluator.py)."""
import json
import math
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_py

sys.path.insert(0, str(ROOT))
import prepare_data as pd  # noqa: E402


# ----------------------------------------------------------------------------------------------- heatmaps

def test_box_heatmap_peak_is_one_at_the_box_centre():
    h = pd.box_heatmap([[40, 10, 60, 30]], 100, 40, 101)  # centre (0.5, 0.5) lies on the 101-point grid
    assert h.shape == (101, 101) and h.dtype == np.float32
    assert h[50, 50] == pytest.approx(1.0)
    assert h.max() == pytest.approx(1.0)
    assert np.unravel_index(h.argmax(), h.shape) == (50, 50)


def test_box_heatmap_sigma_follows_box_size_and_has_a_floor():
    # wide box: sigma_x = 0.4/2 = 0.2 -> at 0.2 from the centre the value is exp(-1/2)
    h = pd.box_heatmap([[30, 30, 70, 70]], 100, 100, 101)
    assert h[50, 50 + 20] == pytest.approx(math.exp(-0.5), rel=1e-5)
    # sigma_y = 0.2 as well
    assert h[50 + 20, 50] == pytest.approx(math.exp(-0.5), rel=1e-5)
    # a 1-pixel box of a 1000-pixel image would have sigma 0.0005; the floor makes it 0.02
    h = pd.box_heatmap([[499.5, 499.5, 500.5, 500.5]], 1000, 1000, 101)
    assert h[50, 52] == pytest.approx(math.exp(-0.5), rel=1e-5)
    assert h[52, 50] == pytest.approx(math.exp(-0.5), rel=1e-5)


def test_box_heatmap_merges_boxes_by_maximum():
    a, b = [0, 0, 30, 30], [50, 60, 90, 100]
    ha, hb = pd.box_heatmap([a], 100, 100, 64), pd.box_heatmap([b], 100, 100, 64)
    both = pd.box_heatmap([a, b], 100, 100, 64)
    np.testing.assert_allclose(both, np.maximum(ha, hb))
    assert not np.allclose(both, ha + hb)  # overlapping tails: a sum would differ
    assert pd.box_heatmap([], 100, 100, 8).sum() == 0


def test_box_heatmap_import_does_not_pull_in_torch():
    r = run_py(["-c", "import sys, prepare_data; prepare_data.box_heatmap([[0,0,1,1]], 2, 2, 4); "
                      "assert 'torch' not in sys.modules and 'transformers' not in sys.modules"])
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------------------------- ODVG ingestion

def make_odvg(root, records_by_split, sizes):
    """A hand-made Ukiyo-eVG layout. records_by_split: split -> list of JSON lines (str); sizes: filename -> (w, h)."""
    (root / "images").mkdir(parents=True)
    for name, (w, h) in sizes.items():
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / name)
    for split, lines in records_by_split.items():
        path = root / pd.SPLIT_FILES[split]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")


def rec(name, caption, regions, w=200, h=100):
    return json.dumps({"filename": name, "width": w, "height": h,
                       "grounding": {"caption": caption, "regions": [{"bbox": b, "phrase": p} for p, b in regions]}})


@pytest.fixture
def awkward_odvg(tmp_path):
    src = tmp_path / "ukiyo"
    sizes = {f"{i}.jpg": (200, 100) for i in range(6)}
    make_odvg(src, {
        "train": [
            rec("0.jpg", "a man with a sword", [("a man", [10, 10, 80, 90]), ("a sword", [150, -20, 260, 50])]),
            "",  # blank lines are ignored
            "   ",
            rec("1.jpg", "", [("x", [0, 0, 10, 10])]),  # empty caption: skipped
            rec("2.jpg", "a boat on the sea", []),  # no regions: skipped
            rec("3.jpg", "a mountain", [("a mountain", [0, 0, 200, 100])]),
            rec("4.jpg", "nothing inside", [("ghost", [300, 300, 400, 400])]),  # box entirely outside: skipped
        ],
        "val": [rec("5.jpg", "a woman under a tree", [("a woman", [20, 20, 60, 90])]), ""],
        "test": [rec("3.jpg", "a mountain at dusk", [("a mountain", [0, 0, 200, 100])])],
    }, sizes)
    return src


def test_ingestion_keeps_skips_and_clips(awkward_odvg, tmp_path):
    out, weights = tmp_path / "data", tmp_path / "no-weights"
    weights.mkdir()
    r = run_py([ROOT / "prepare_data.py", "--ukiyoe-vg", awkward_odvg, "--out", out, "--weights", weights,
                "--image-size", "32"])
    assert r.returncode == 0, r.stderr
    assert "train: kept 2 records, skipped 3" in r.stdout
    assert "val: kept 1 records, skipped 0" in r.stdout
    assert "test: kept 1 records, skipped 0" in r.stdout
    assert "skipped: 3" in r.stdout
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "ukiyoe-vg" and meta["image_size"] == 32
    assert meta["counts"] == {"train": 2, "val": 1, "test": 1}
    assert meta["skipped"]["train"] == 3
    images = np.load(out / "train" / "images.npy")
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8  # 200x100 resized without keeping aspect
    tokens = np.load(out / "train" / "tokens.npy")
    assert tokens.shape == (2, meta["max_len"]) and tokens.dtype == np.int32
    heat = np.load(out / "train" / "heatmaps.npy")
    assert heat.shape == (2, 32, 32) and heat.dtype == np.uint8 and heat.max() == 255
    reg = np.load(out / "train" / "regions.npz")
    assert list(reg["image_index"]) == [0, 0, 1]
    # the sword box [150,-20,260,50] is clipped to [150,0,200,50] of a 200x100 image
    np.testing.assert_allclose(reg["boxes"][1], [0.75, 0.0, 1.0, 0.5], atol=1e-6)
    assert reg["boxes"].min() >= 0 and reg["boxes"].max() <= 1
    assert reg["phrases"].shape == (3, meta["max_len"])
    assert json.loads((out / "train" / "captions.json").read_text()) == ["a man with a sword", "a mountain"]
    # the heatmap was computed from the clipped boxes, in the original pixel frame
    expected = pd.box_heatmap([[10, 10, 80, 90], [150, 0, 200, 50]], 200, 100, 32)
    np.testing.assert_allclose(heat[0] / 255.0, expected, atol=1 / 255)
    assert not list(out.glob(".staging-*")) and not list(out.glob(".old-*"))


def test_missing_image_is_a_clear_error_and_leaves_old_data_intact(awkward_odvg, tmp_path):
    out, weights = tmp_path / "data", tmp_path / "no-weights"
    weights.mkdir()
    assert run_py([ROOT / "prepare_data.py", "--ukiyoe-vg", awkward_odvg, "--out", out, "--weights", weights,
                   "--image-size", "16"]).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (awkward_odvg / "images" / "5.jpg").unlink()
    r = run_py([ROOT / "prepare_data.py", "--ukiyoe-vg", awkward_odvg, "--out", out, "--weights", weights])
    assert r.returncode != 0
    assert "5.jpg" in r.stderr and "missing image" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # nothing half-written, nothing lost
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_missing_image_into_a_fresh_dir_writes_nothing(awkward_odvg, tmp_path):
    (awkward_odvg / "images" / "0.jpg").unlink()
    out = tmp_path / "fresh"
    r = run_py([ROOT / "prepare_data.py", "--ukiyoe-vg", awkward_odvg, "--out", out, "--weights", tmp_path])
    assert r.returncode == 1 and "0.jpg" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_parse_odvg_lines_reports_bad_json_with_location():
    with pytest.raises(pd.UserError, match="f.jsonl:2"):
        pd.parse_odvg_lines(['{"filename": "a", "grounding": {"caption": "c", "regions": []}}', "{oops"], "f.jsonl")


def test_clip_regions_orders_and_clips():
    assert pd.clip_regions([("p", [-5, 10, 50, 200])], 40, 100) == [("p", [0.0, 10, 40, 100])]
    assert pd.clip_regions([("p", [50, 0, 60, 10])], 40, 100) == []


# ----------------------------------------------------------------------------------------------- tokenizer

def test_word_tokenizer_fallback(tiny_data):
    meta = json.loads((tiny_data / "meta.json").read_text())
    assert meta["tokenizer"] == "word" and meta["pad_id"] == 0
    vocab = (tiny_data / "vocab.txt").read_text().splitlines()
    assert len(vocab) == meta["vocab_size"] and vocab[:4] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    captions = json.loads((tiny_data / "train" / "captions.json").read_text())
    tokens = np.load(tiny_data / "train" / "tokens.npy")
    words = [vocab[i] for i in tokens[0] if i != 0]
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    assert " ".join(words[1:-1]).replace(" ,", ",") == captions[0]
    tok = pd.WordTokenizer(vocab)
    enc = tok.encode(["a purple zebra", "a " * 100], 8)
    assert enc[0, 0] == 2 and enc[0, 3] == 1 and enc[0, 4] == 3 and (enc[0, 5:] == 0).all()  # unknown word -> [UNK]
    assert enc[1, -1] == 3 and (enc[1] != 0).all()  # truncated, still closed by [SEP]


def test_make_tokenizer_falls_back_without_cached_weights(tmp_path):
    tok, name = pd.make_tokenizer(["b a", "a c"], tmp_path)
    assert name == "word" and tok.vocab == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"]


# ----------------------------------------------------------------------------------------------- synthetic data

def test_synthetic_dataset_layout_and_content(tiny_data):
    raw = tiny_data / "raw-synthetic"
    for split, n in [("train", 600), ("val", 100), ("test", 40)]:
        lines = (raw / pd.SPLIT_FILES[split]).read_text().splitlines()
        assert len(lines) == n
        recs = [json.loads(l) for l in lines]
        captions = [r["grounding"]["caption"] for r in recs]
        assert len(set(captions)) == n  # no duplicate captions
        for r in recs[:20]:
            assert (raw / "images" / r["filename"]).is_file()
            regions = r["grounding"]["regions"]
            assert 2 <= len(regions) <= pd.MAX_OBJECTS
            for reg in regions:
                assert reg["phrase"] in r["grounding"]["caption"]
                x1, y1, x2, y2 = reg["bbox"]
                assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
        arrays = np.load(tiny_data / split / "images.npy")
        assert arrays.shape == (n, 64, 64, 3)


def test_synthetic_dataset_is_deterministic_from_the_two_seeds(tmp_path):
    counts = {"train": 5, "val": 2, "test": 2}
    read = lambda d, split: (d / pd.SPLIT_FILES[split]).read_text()
    a, b = tmp_path / "a", tmp_path / "b"
    pd.write_synthetic_odvg(a, 7, counts, 11)
    pd.write_synthetic_odvg(b, 7, counts, 11)
    for split in pd.SPLIT_FILES:
        assert read(a, split) == read(b, split)
    assert (a / "images" / "train_00003.png").read_bytes() == (b / "images" / "train_00003.png").read_bytes()
    assert (a / "images" / "val_00001.png").read_bytes() == (b / "images" / "val_00001.png").read_bytes()
    c = tmp_path / "c"
    pd.write_synthetic_odvg(c, 8, counts, 11)
    assert read(a, "train") != read(c, "train")
    # the held-out seed alone decides val and test: the public seed (meta.json) does not rebuild them
    d = tmp_path / "d"
    pd.write_synthetic_odvg(d, 7, counts, 12)
    assert read(a, "train") == read(d, "train")
    assert read(a, "val") != read(d, "val") and read(a, "test") != read(d, "test")


def test_held_out_seed_is_secret_recorded_and_reused(tmp_path):
    counts = {"train": 3, "val": 2, "test": 2}
    raw = pd.ensure_synthetic_raw(tmp_path / "x", 5, counts)
    secret = json.loads((raw / "params.json").read_text())["heldout_seed"]
    val = (raw / pd.SPLIT_FILES["val"]).read_text()
    assert pd.ensure_synthetic_raw(tmp_path / "x", 5, counts) == raw   # cached: same secret, same val
    assert (raw / pd.SPLIT_FILES["val"]).read_text() == val
    other = pd.ensure_synthetic_raw(tmp_path / "y", 5, counts)           # a fresh build draws a fresh secret
    assert json.loads((other / "params.json").read_text())["heldout_seed"] != secret
    assert (other / pd.SPLIT_FILES["val"]).read_text() != val
    pd.ensure_synthetic_raw(tmp_path / "x", 5, counts, heldout_seed=secret + 1)  # an explicit seed regenerates
    assert (raw / pd.SPLIT_FILES["val"]).read_text() != val


def test_meta_json_does_not_reveal_the_held_out_seed(tiny_data):
    secret = json.loads((tiny_data / "raw-synthetic" / "params.json").read_text())["heldout_seed"]
    assert str(secret) not in (tiny_data / "meta.json").read_text()


def panels(png):
    """The two image panels of a preview (left and right half), as RGB arrays cut at their edges."""
    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    out = []
    for half in (img[:, :img.shape[1] // 2], img[:, img.shape[1] // 2:]):
        ink = (half < 245).any(axis=2)
        cols = np.where(ink.mean(axis=0) > 0.5)[0]
        rows = np.where(ink[:, cols.min():cols.max() + 1].mean(axis=1) > 0.9)[0]
        out.append(half[rows.min():rows.max() + 1, cols.min():cols.max() + 1])
    return out


def test_preview_writes_pngs(tiny_data, tmp_path):
    pd.preview(tiny_data, 2, tmp_path / "previews")
    pngs = sorted((tmp_path / "previews").glob("*.png"))
    assert len(pngs) == 2 and Image.open(pngs[0]).size[0] > 200
    images = np.load(tiny_data / "val" / "images.npy").astype(int)
    n_boxes = np.load(tiny_data / "val" / "regions.npz")["image_index"]
    for i, png in enumerate(pngs):
        left, right = panels(png)
        shrink = lambda a: np.asarray(Image.fromarray(a.astype(np.uint8)).resize(images.shape[1:3], Image.BOX))
        # the left panel is val image i itself, the right one that image under the heatmap and the boxes
        assert np.abs(shrink(left) - images[i]).mean() < 3
        assert np.abs(shrink(left) - images[1 - i]).mean() > 10
        assert np.abs(shrink(right) - images[i]).mean() > 15
        white = (right[2:-2, 2:-2] >= 250).all(axis=2).sum()     # box outlines (the image has no pure white)
        assert white > 100 * (n_boxes == i).sum() > 0


def test_download_weights_offline_is_a_clear_error(tmp_path):
    # No internet here (or an unreachable endpoint): a one-line error, no traceback, exit non-zero.
    r = run_py([ROOT / "prepare_data.py", "--download-weights", "--weights", tmp_path / "w"],
               env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"},
               timeout=120)
    assert r.returncode == 1
    assert "could not download timm/vit_small_patch16_224.augreg_in21k_ft_in1k" in r.stderr
    assert "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------- metrics

def test_metrics_perfect():
    m = pd.retrieval_metrics(np.eye(5))
    assert m["mean_rank"] == 1 and m["median_rank"] == 1 and m["r1"] == 1 and m["n"] == 5


def test_metrics_reversed():
    n = 20
    sim = -np.eye(n) + 0.01 * np.random.default_rng(0).random((n, n))  # correct pair always scores lowest
    m = pd.retrieval_metrics(sim)
    assert m["mean_rank"] == n and m["median_rank"] == n
    assert m["r1"] == 0 and m["r5"] == 0 and m["r10"] == 0


def test_metrics_ties_count_against():
    assert pd.retrieval_metrics(np.zeros((7, 7)))["mean_rank"] == 7  # a constant model is ranked last
    sim = np.array([[1.0, 1.0, 0.0],   # image 0: tie with text 1 -> rank 2
                    [0.0, 1.0, 0.0],   # image 1: rank 1
                    [0.5, 0.9, 0.5]])  # image 2: 0.9 beats it, 0.5 ties -> rank 3
    m = pd.retrieval_metrics(sim)
    i2t, t2i = [2, 1, 3], [1, 2, 1]  # column 1: 1.0 ties its correct 1.0 -> rank 2; 0.9 is below
    assert m["mean_rank"] == pytest.approx((np.mean(i2t) + np.mean(t2i)) / 2)
    assert m["median_rank"] == pytest.approx((2 + 1) / 2)
    assert m["r1"] == pytest.approx((1 / 3 + 2 / 3) / 2)


def test_metrics_non_finite_scores_are_worst():
    sim = np.eye(4)
    sim[0, 0] = np.nan     # the correct pair of image 0 / text 0 ranks last (4) in both directions, the others first
    assert pd.retrieval_metrics(sim)["mean_rank"] == pytest.approx((4 + 1 + 1 + 1) / 4)
    sim = np.eye(4)
    sim[1, 0] = sim[0, 2] = np.inf    # a non-finite wrong pair never outranks a correct one
    assert pd.retrieval_metrics(sim)["mean_rank"] == 1
    sim[:, 3] = -np.inf               # -inf is as bad as nan: pair 3 ties with all, rank 4 in both directions
    assert pd.retrieval_metrics(sim)["mean_rank"] == pytest.approx((1 + 1 + 1 + 4) / 4)


# ----------------------------------------------------------------------------------------------- evaluator

def test_evaluator_rejects_missing_or_invalid_model_files(tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    r = run_py([ROOT / "prepare_data.py", "--evaluate", run, "--data", tiny_data])
    assert r.returncode == 1 and "image_encoder.pt2" in r.stderr and "Traceback" not in r.stderr
    assert "mean_rank" not in r.stdout
    (run / "image_encoder.pt2").write_bytes(b"not a program")
    (run / "text_encoder.pt2").write_bytes(b"not a program")
    r = run_py([ROOT / "prepare_data.py", "--evaluate", run, "--data", tiny_data])
    assert r.returncode == 1 and "cannot load" in r.stderr and "Traceback" not in r.stderr
    assert "mean_rank" not in r.stdout
