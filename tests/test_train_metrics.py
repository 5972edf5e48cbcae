"""The discriminator's metrics (exact ROC AUC, precision / recall / F1, the prior) and --eval-every's held-out slice:
the numbers against brute force, the slice never trained on, repeatable evaluation, exact resume with it on."""
import json
import math
import shutil

import numpy as np
import pytest
import torch

from electra_fast.cli import main as cli_main
from electra_fast.train import PretrainError, pretrain
from electra_fast.train import evaluation
from electra_fast.train.data import PackedSequences
from electra_fast.train.metrics import prior, roc_auc, rtd_metrics
from electra_fast.train.tokenizer import load_tokenizer, special_ids
from test_train import _kw, _one_thread, env  # noqa: F401  (fixtures: one torch thread; tiny tokenizer, model, corpus)


def _pairwise_auc(s, y):
    pos, neg = s[y], s[~y]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("n,levels,dtype", [(2, None, torch.float32), (37, 3, torch.float32), (500, 7, torch.bfloat16),
                                            (1000, None, torch.float64), (300, 1, torch.float32)])
def test_roc_auc_is_the_pairwise_count_with_ties_as_halves(n, levels, dtype):
    g = torch.Generator().manual_seed(n)
    y = torch.rand(n, generator=g) < 0.3
    y[0], y[-1] = True, False  # both classes present
    # few distinct values: most pairs tie (levels=1: every score equal -> exactly 0.5)
    s = (torch.randint(0, levels, (n,), generator=g).float() if levels else torch.randn(n, generator=g))
    s = (s + y.float() * 0.7 * (levels != 1)).to(dtype)
    got = roc_auc(s, y)
    want = _pairwise_auc(s.double().numpy(), y.numpy())
    assert got == pytest.approx(want, abs=1e-12)
    assert levels != 1 or got == 0.5


def test_roc_auc_edges():
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([False, True])) == 1.0
    assert roc_auc(torch.tensor([0.9, 0.1]), torch.tensor([False, True])) == 0.0
    assert roc_auc(torch.tensor([0.3, 0.3]), torch.tensor([False, True])) == 0.5
    assert roc_auc(torch.tensor([0.1, 0.9]), torch.tensor([True, True])) is None  # one class: undefined
    with pytest.raises(ValueError, match="scores hold NaN"):
        roc_auc(torch.tensor([float("nan"), 1.0]), torch.tensor([False, True]))
    with pytest.raises(ValueError, match=r"\[N\]"):
        roc_auc(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.bool))


def test_rtd_metrics_counts_and_the_prior():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0, -0.5, 0.0, 4.0])
    labels = torch.tensor([True, True, False, False, True, False, False, True])
    m = rtd_metrics(logits, labels)
    # predicted replaced (> 0): 0, 2, 4, 7; true: 0, 1, 4, 7 -> tp 3, fp 1, fn 1
    assert m["discriminator_precision"] == 0.75 and m["discriminator_recall"] == 0.75
    assert m["discriminator_f1"] == pytest.approx(0.75) and m["discriminator_accuracy"] == 0.75
    assert m["replaced_fraction"] == 0.5 and m["prior_accuracy"] == 0.5
    assert m["discriminator_auc"] == pytest.approx(_pairwise_auc(logits.numpy(), labels.numpy()))
    # the prior's loss is the BCE of the constant logit log(r / (1 - r)), and no constant does better
    for r in (0.15, 0.5, 0.9):
        y = torch.tensor([1.0] * round(r * 20) + [0.0] * (20 - round(r * 20)))
        bce = lambda c: torch.nn.functional.binary_cross_entropy_with_logits(torch.full((20,), c), y).item()
        best = bce(math.log(r / (1 - r)))
        assert prior(r)["prior_rtd_loss"] == pytest.approx(best, rel=1e-6)
        assert all(bce(c) >= best - 1e-7 for c in np.linspace(-4, 4, 41))
    assert prior(0.0) == {"prior_rtd_loss": 0.0, "prior_accuracy": 1.0}
    # more than half replaced (--mask-prob > 0.5): the constant predictor says "replaced" and is right r of the time
    assert prior(0.7)["prior_accuracy"] == pytest.approx(0.7) and prior(0.2)["prior_accuracy"] == pytest.approx(0.8)
    # no positive prediction / no positive label: 0, never NaN
    none = rtd_metrics(torch.tensor([-1.0, -2.0]), torch.tensor([False, False]))
    assert none["discriminator_f1"] == 0.0 and none["discriminator_auc"] is None


def test_heldout_split_never_reaches_the_training_order():
    n = 97
    held, train = evaluation.split(n, evaluation.heldout_count(n))
    assert len(held) == 9 and sorted(set(held) | set(train)) == list(range(n)) and not set(held) & set(train)
    seen = evaluation.SplitSampler(train, seed=3).indices(0, 4 * len(train))  # four epochs
    assert not set(seen) & set(held) and set(seen) == set(train)
    assert np.array_equal(evaluation.split(n, 9)[0], held)  # a fixed draw: the same slice every run
    assert evaluation.heldout_count(1) == 0 and evaluation.heldout_count(5000) == evaluation.HELDOUT_MAX


def _records(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_eval_every_holds_out_sequences_training_never_reads(env, tmp_path, monkeypatch, capsys):
    calls, inside, held = [], [False], []
    batch, init = PackedSequences.batch, evaluation.HeldOut.__init__

    def recording_batch(self, indices):
        if not inside[0]:
            calls.append(list(map(int, indices)))
        return batch(self, indices)

    def recording_init(self, packed, heldout_ids, *args):
        inside[0] = True
        try:
            init(self, packed, heldout_ids, *args)
        finally:
            inside[0] = False
        held.append((len(packed), set(map(int, heldout_ids))))

    monkeypatch.setattr(PackedSequences, "batch", recording_batch)
    monkeypatch.setattr(evaluation.HeldOut, "__init__", recording_init)
    out = tmp_path / "run"
    s = pretrain(env["data"], **_kw(env, out, steps=12, log_every=5, eval_every=4))
    (n, heldout_ids), = held
    trained = {i for c in calls for i in c}
    assert len(heldout_ids) == evaluation.heldout_count(n) > 0
    assert not trained & heldout_ids and len(calls) == 12
    recs = _records(out)
    # logged: the first step, every 5th, every 4th (evaluated) and the last; held-out numbers on evaluated steps
    assert [r["step"] for r in recs] == [1, 4, 5, 8, 10, 12]
    assert [r["step"] for r in recs if "eval_discriminator_auc" in r] == [4, 8, 12]
    for r in recs:
        assert r["prior_accuracy"] == pytest.approx(max(r["replaced_fraction"], 1 - r["replaced_fraction"]))
        p, q = r["discriminator_precision"], r["discriminator_recall"]
        assert r["discriminator_f1"] == pytest.approx(2 * p * q / (p + q) if p + q else 0.0)
        assert 0.0 <= r["discriminator_auc"] <= 1.0
    last = recs[-1]
    for k in ("eval_generator_accuracy", "eval_unigram_accuracy", "eval_discriminator_f1", "eval_rtd_loss"):
        assert 0.0 <= last[k] and math.isfinite(last[k])
    assert s["eval"] == {k: v for k, v in last.items() if k.startswith("eval_")}
    printed = capsys.readouterr()
    assert f"discriminator AUC {last['discriminator_auc']:.2f} (chance 0.50)" in printed.out
    assert f"(unigram baseline {last['eval_unigram_accuracy']:.3f})" in printed.out
    assert "unigram baseline (always" in printed.err


def test_heldout_evaluation_is_repeatable_and_changes_no_state(env, tmp_path):
    s = pretrain(env["data"], **_kw(env, tmp_path / "run", steps=2, eval_every=2))
    net = s["model"].train()
    ids = special_ids(load_tokenizer(env["tokenizer"]))
    stream = next((tmp_path / "run" / "cache").glob("tokens-*.bin")).as_posix()
    packed = PackedSequences(stream, 32, ids["cls"], ids["sep"])
    held, train = evaluation.split(len(packed), evaluation.heldout_count(len(packed)))
    h = evaluation.HeldOut(packed, held, train, lambda i: 1000 + i, tuple(ids.values()), net.config.vocab_size)
    # batches of a fixed size, not --batch-size's: each batch's draw is keyed by its index (runs differing only in
    # --batch-size evaluated on other draws)
    sizes = [len(rows) for rows, _ in h.batches]
    assert sum(sizes) == len(held) and all(n == evaluation.EVAL_ROWS for n in sizes[:-1]) and sizes[-1] <= 16
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    a = h.evaluate(net, torch.device("cpu"), dict(enabled=False))
    b = h.evaluate(net, torch.device("cpu"), dict(enabled=False))
    assert a == b and net.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
    # the unigram baseline token: the most frequent non-special token of the training sequences
    counts = np.bincount(np.concatenate([packed.batch([i])[0, 1:-1].numpy() for i in train]),
                         minlength=net.config.vocab_size)
    counts[list(ids.values())] = -1
    assert h.unigram_token == int(np.argmax(counts))
    # the [MASK]-only numbers, recomputed from the full generator logits: the positions whose generator input shows
    # [MASK] (ELECTRA's masking keeps 15 % of the selected ones as they are), their argmax vs the original. A
    # 2-step generator is right nowhere; pushed to always answer the unigram token it is right as often as the
    # unigram, which differs between the two sets of positions
    with torch.no_grad():
        net.generator.head.bias[h.unigram_token] += 1e4
    a = h.evaluate(net, torch.device("cpu"), dict(enabled=False))
    net.eval()
    hits = unigram_hits = shown_total = selected_total = 0
    for (rows, layout), seed in zip(h.batches, h.seeds):
        with torch.no_grad():
            out = net(rows, layout.get("attention_mask"), seed=seed)
            logits = net.generator.logits(out.generator_input_ids, layout.get("attention_mask"))
        shown = out.masked & (out.generator_input_ids == net.config.mask_token_id)
        hits += int((logits.argmax(-1)[shown] == rows[shown]).sum())
        unigram_hits += int((rows[shown] == h.unigram_token).sum())
        shown_total += int(shown.sum())
        selected_total += int(out.masked.sum())
    net.train()
    assert 0 < shown_total < selected_total  # both kinds occur: the split means something here
    assert a["eval_generator_mask_accuracy"] == hits / shown_total == unigram_hits / shown_total
    assert a["eval_unigram_mask_accuracy"] == unigram_hits / shown_total != a["eval_unigram_accuracy"]
    assert a["eval_generator_accuracy"] == a["eval_unigram_accuracy"]


def test_resume_is_bit_identical_with_eval_on(env, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kw = dict(steps=8, save_every=3, keep=5, grad_accum=2, eval_every=2)
    a = pretrain(env["data"], **_kw(env, straight, **kw))
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    shutil.rmtree(resumed / "checkpoints" / "step-00000006")
    b = pretrain(env["data"], **_kw(env, resumed, resume=True, **kw))
    ra, rb = _records(straight), _records(resumed)
    assert [r["step"] for r in rb] == list(range(1, 9))
    for x, y in zip(ra, rb):
        x.pop("tokens_per_s"), y.pop("tokens_per_s")
        assert x == y
    wa, wb = a["model"].state_dict(), b["model"].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_eval_every_bad_values_and_a_resumed_run_without_a_split(env, tmp_path, capsys):
    for bad in (0, -1, 2.5, True):
        with pytest.raises(PretrainError, match="--eval-every"):
            pretrain(env["data"], **_kw(env, tmp_path / "bad", eval_every=bad))
    assert cli_main(["pretrain", "--eval-every", "0", "--out", str(tmp_path / "cli")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--eval-every" in err
    out = tmp_path / "plain"
    pretrain(env["data"], **_kw(env, out, steps=2, save_every=1))
    with pytest.raises(PretrainError, match="--eval-every: the run being resumed was started without"):
        pretrain(env["data"], **_kw(env, out, steps=4, resume=True, eval_every=2))


def test_a_logged_step_on_a_gpu_waits_for_its_work(monkeypatch):
    """A logged step's tokens/s is its tokens over its time; on CUDA the step returns with its backward and update
    still queued, so the time missed its own work and held the previous steps'. Logged steps wait at both ends
    (synchronize; no GPU here: the call is recorded), other steps and CPU devices never do."""
    from electra_fast.train import trainer as trainer_mod
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    cuda = torch.device("cuda", 1)
    trainer_mod._finish_queued(cuda, True)
    trainer_mod._finish_queued(cuda, False)
    trainer_mod._finish_queued(torch.device("cpu"), True)
    assert calls == [cuda]


def test_undefined_and_infinite_values_are_null_in_metrics_jsonl(env, tmp_path, monkeypatch, capsys):
    """metrics.jsonl held bare Infinity (an fp16 step the grad scaler skipped has an infinite grad norm), which no
    JSON reader takes (jq turned it into 1.8e308); and with no [MASK] position (--mask-token-frac 0) the "[MASK]
    alone" accuracies were 0.000, not undefined. Both are null, as an AUC of one class is, and "-" in the text."""
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: real(*a, **k) * float("inf"))
    out = tmp_path / "run"
    pretrain(env["data"], **_kw(env, out, steps=2, eval_every=2,
                                recipe=dict(mask_token_frac=0.0, random_token_frac=0.5)))
    text = (out / "metrics.jsonl").read_text()
    assert "Infinity" not in text and "NaN" not in text
    recs = [json.loads(line) for line in text.splitlines()]
    assert all(r["grad_norm"] is None for r in recs)
    last = recs[-1]
    assert last["eval_generator_mask_accuracy"] is None and last["eval_unigram_mask_accuracy"] is None
    assert 0 <= last["eval_generator_accuracy"] <= 1  # masked positions exist: defined
    assert "at [MASK] alone - (unigram -)" in capsys.readouterr().out
