"""Batch independence (engine/evaluator.py, no podman): every row is encoded twice, in batches of the same size and
next to other batch-mates the second time, and its outputs must be bitwise the same, at any scale. Graphs that use the
rest of their batch are refused however they scale their outputs or however few rows they cheat on, and so is a
language-model fork's program that looks its answer up in the next row. Through ./run.sh:
test_integrity.py::test_batch_dependence_is_refused_at_any_scale."""
import json
import sys

import numpy as np
import pytest

from conftest import ROOT, copy_into
from test_evaluator import evaluate, trainer

sys.path.insert(0, str(ROOT))
from engine import evaluator as ev  # noqa: E402


def test_every_row_meets_other_batch_mates_in_batches_of_the_same_size():
    rng = np.random.default_rng(0)
    # every size up to two full batches and a little over (where the batch size and the padding change), then a few
    for n in [*range(1, 2 * ev.BATCH + 40), 1000, 1099, 4096, 10007, 65536]:
        first, second, b = ev.passes(n, rng)
        assert len(first) == len(second) and len(first) % b == 0 and 1 <= b <= min(ev.BATCH, n // 2 + n % 2), n
        assert set(first) == set(range(n)) and sorted(first) == sorted(second), n   # every row, the same copies
        # every row is sent next to two different sets of batch-mates at least (a row alone has none); past 4096
        # rows the layout only repeats, and these sets are slow to build
        if 1 < b and n <= 4096:
            mates = {}
            for p in (first, second):
                for j in range(0, len(p), b):
                    for i in p[j:j + b]:
                        mates.setdefault(i, set()).add(frozenset(p[j:j + b]) - {i})
            assert all(len(m) >= 2 for m in mates.values()), n


def check(outputs, order=None):
    """_check_batch_independence on outputs for `order` (default: each row once, then each again)."""
    outputs = np.asarray(outputs, np.float32)
    order = np.tile(np.arange(len(outputs) // 2), 2) if order is None else np.asarray(order)
    return ev._check_batch_independence("model.pt2", order, outputs)


def test_every_output_of_a_row_must_be_bitwise_the_same():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 16)).astype(np.float32)
    assert (check(np.concatenate([a, a])) == a).all()
    changed = a.copy()
    changed[7, 0] = np.nextafter(changed[7, 0], np.inf)   # one bit of one row of a thousand
    for scale in (1e-30, 1e-9, 1, 1e30):
        with pytest.raises(ev.Refused, match=r"in another batch \(1 of 1000 rows changed"):
            check(np.concatenate([scale * a, scale * changed]))
    # a huge constant column, as cosine scoring ignores: no tolerance to hide a cheat in the others
    diluted = np.concatenate([a, np.full((1000, 1), 1e6, np.float32)], axis=1)
    cheat = diluted.copy()
    cheat[:, :16] += 0.5 * rng.normal(size=(1000, 16))
    with pytest.raises(ev.Refused, match="1000 of 1000 rows changed"):
        check(np.concatenate([diluted, cheat]))
    # a row that pads a batch is held to its other outputs too
    with pytest.raises(ev.Refused, match="1 of 2 rows changed"):
        check([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [3.0, 4.0], [1.0, 2.5]], [0, 1, 0, 1, 0])


def test_a_tolerance_for_hardware_that_does_not_repeat_its_results(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(1000, 16))
    rounding = a * (1 + 1e-6 * rng.normal(size=a.shape))
    monkeypatch.setattr(ev, "BATCH_TOLERANCE", 1e-4)
    check(np.concatenate([a, rounding]))
    with pytest.raises(ev.Refused, match="allowed 0.0001.*AUTORESEARCH_BATCH_TOLERANCE"):
        check(np.concatenate([a, a * (1 + 1e-3)]))


# ZCA whitening of each batch (matmuls only: Newton-Schulz for the inverse square root), scaled: the forgery the
# red team recorded as ok at 1e-9 and 1e30, and on ~40% of the rows, picked by a hash of the image.
WHITENED = '''
SCALE, PART = @SCALE@, @PART@
class Whitened(Img):
    def forward(s, images):
        e = super().forward(images)
        c = e - e.mean(0, keepdim=True)
        eye = torch.eye(8)
        cov = c.T @ c / e.shape[0] + 1e-3 * eye
        trace = (cov * eye).sum()
        y, z = cov / trace, eye
        for _ in range(12):
            t = 1.5 * eye - 0.5 * z @ y
            y, z = y @ t, t @ z
        cheat = (images.sum(dim=(1, 2, 3)) * 1000).floor() % 100 < PART
        return torch.where(cheat.unsqueeze(1), c @ z / trace.sqrt(), e) * SCALE
img, txt = Whitened(), Txt()
'''


# The same whitening, diluted: a huge constant column on the image side (a zero one on the text side) is ignored by
# cosine scoring and makes the whitened part tiny beside each row's norm, which a relative tolerance let through.
DILUTED = WHITENED.replace("img, txt = Whitened(), Txt()", '''class Wide(Whitened):
    def forward(s, images):
        e = super().forward(images)
        return torch.cat([e, torch.full_like(e[:, :1], 1e6)], 1)
class WideTxt(Txt):
    def forward(s, input_ids, attention_mask):
        e = super().forward(input_ids, attention_mask)
        return torch.cat([e, torch.zeros_like(e[:, :1])], 1)
img, txt = Wide(), WideTxt()''')


@pytest.mark.parametrize("program, scale, part", [(WHITENED, "1e-9", 100), (WHITENED, "1e30", 100),
                                                  (WHITENED, "1", 40), (DILUTED, "1", 100)],
                         ids=["tiny", "huge", "partial", "diluted"])
def test_a_batch_dependent_program_is_refused_at_any_scale_and_on_a_few_rows(tiny_data, tmp_path, program, scale,
                                                                              part):
    run = trainer(tmp_path / "run", tiny_data, program.replace("@SCALE@", scale).replace("@PART@", str(part)))
    p = evaluate(run, tiny_data)
    assert p.returncode == 1 and "image_encoder.pt2 gives a different output for the same input in another batch" \
        in p.err and "mean_rank" not in p.out, p.err


def test_an_honest_program_scores_what_its_outputs_give(tiny_data, tmp_path):
    import torch
    run = trainer(tmp_path / "run", tiny_data)
    p = evaluate(run, tiny_data)
    assert p.returncode == 0, p.err
    sys.path.insert(0, str(ROOT))
    import prepare_data
    split = ev.read_split(tiny_data, "val", ["images.npy", "tokens.npy"])

    def encode(program, *inputs):   # all rows in one batch, in order, in this process
        with torch.no_grad():
            return torch.export.load(run / program).module()(*map(torch.from_numpy, inputs)).numpy()
    assert float(p.values["val_mean_rank"]) == pytest.approx(prepare_data.score(encode, split)["mean_rank"],
                                                              abs=0.011)


# ----------------------------------------------------------------------------------------------- a fork

# A language-model fork whose score() slides a window over one text: row i's answer, the token after its window, is
# the last token of row i + 1's window.
LM_PROJECT = '''
import numpy as np
METRIC = "bpb"
DIRECTION = "minimize"
PROGRAMS = ["lm.pt2"]
EVAL_FILES = ["text.npy"]
WINDOW = 8


def score(encode, split):
    """Bits per token of the token after each window of the text."""
    text = split["text"]
    logits = encode("lm.pt2", np.lib.stride_tricks.sliding_window_view(text[:-1], WINDOW)).astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    return {"bpb": -logp[np.arange(len(logp)), text[WINDOW:]].mean() / np.log(2)}
'''
VOCAB = 16


def lm_fork(tmp_path, lookup):
    """(evaluator, run directory, data) of the fork, its program honest or looking its answer up in its batch."""
    import torch

    class Honest(torch.nn.Module):
        def __init__(s):
            super().__init__()
            s.e = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(s, x):
            return s.e(x[:, -1])

    class Lookup(Honest):
        def forward(s, x):
            continues = (x[:, 1:].unsqueeze(1) == x[:, :-1].unsqueeze(0)).all(-1)   # [r, s]: row s continues row r
            found = continues.float() @ torch.nn.functional.one_hot(x[:, -1], VOCAB).float()
            return super().forward(x) + 30 * found

    d, data, run = tmp_path / "fork", tmp_path / "data", tmp_path / "run"
    for path in (data / "val", run):
        path.mkdir(parents=True)
    copy_into(d, ["engine"])
    (d / "prepare_data.py").write_text(LM_PROJECT)
    (data / "meta.json").write_text(json.dumps({"vocab": VOCAB}))
    np.save(data / "val" / "text.npy", np.random.default_rng(0).integers(0, VOCAB, 1009))
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=4096)
    ep = torch.export.export((Lookup if lookup else Honest)().eval(), (torch.zeros(2, 8, dtype=torch.long),),
                             dynamic_shapes=({0: batch},))
    torch.export.save(ep, str(run / "lm.pt2"))
    return d / "engine" / "evaluator.py", run, data


def test_a_program_that_looks_up_its_answer_in_the_rest_of_its_batch_is_refused(tmp_path):
    evaluator, run, data = lm_fork(tmp_path / "honest", lookup=False)
    honest = evaluate(run, data, evaluator=evaluator)
    assert honest.returncode == 0 and float(honest.values["val_bpb"]) > 4, honest.err
    evaluator, run, data = lm_fork(tmp_path / "lookup", lookup=True)
    p = evaluate(run, data, evaluator=evaluator)
    assert p.returncode == 1 and "lm.pt2 gives a different output for the same input in another batch" in p.err, \
        p.out + p.err
    # the attack is real: without the check, a quarter of the rows find their answer next to them (in a batch of
    # 256 of 1001), and only those change in another batch
    check = "    changed = np.unique(order[drift > BATCH_TOLERANCE])\n"
    assert check in evaluator.read_text()
    evaluator.write_text(evaluator.read_text().replace(check, "    changed = []\n"))
    p = evaluate(run, data, evaluator=evaluator)
    assert p.returncode == 0 and float(p.values["val_bpb"]) < float(honest.values["val_bpb"]) - 0.5, p.out + p.err
