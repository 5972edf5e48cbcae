"""electra_fast.mask_tokens: bit-identical backends, an independent pure-Python oracle, invariants,
statistics (5-sigma bounds), determinism, hypothesis properties, compile / opcheck, bad input."""
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import electra_fast
from conftest import all_backends, fast_backends
from electra_fast.ops.masking import _OP
from electra_fast.reference import masking as ref
from electra_fast.reference.philox import MASKING, philox

VOCAB = 60
SPECIALS = (0, 1, 2, 3)  # [PAD], [CLS], [SEP], [MASK]
MASK_ID = 3
BERT = dict(mask_token_frac=0.8, random_token_frac=0.1)


def make(b, t, *, seed=0, pad=True, words=False, id_dtype=torch.int64, vocab=VOCAB):
    """ids with [CLS] ... [SEP] and right padding (one all-padding row), optional word starts."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), vocab, (b, t), generator=g, dtype=id_dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    if pad:
        lengths = torch.randint(0, t + 1, (b,), generator=g)
        lengths[-1:] = t
        if b > 2:
            lengths[0] = 0
        mask = torch.arange(t)[None, :] < lengths[:, None]
        ids = torch.where(mask, ids, 0)
    if t > 0:
        ids[:, 0] = torch.where(mask[:, 0], 1, ids[:, 0])  # [CLS]
    if t > 2:
        ids[:, t // 2] = torch.where(mask[:, t // 2], 2, ids[:, t // 2])  # a [SEP] mid-row
    starts = None
    if words:
        starts = (torch.rand(b, t, generator=g) < 0.45) | ~mask
        starts[:, :1] = True
    return ids, (mask if pad else None), starts


def electra_count(n_real: int, mask_prob: float, T: int) -> int:
    """google-research/electra's num_to_predict before its max(1, .): tf.round(fp32(num_tokens) * fp32(mask_prob))
    (half to even, as Python's round) capped by max_predictions_per_seq = int((mask_prob + 0.005) * T)."""
    return min(int((mask_prob + 0.005) * T), round(float(np.float32(n_real) * np.float32(mask_prob))))


def run(backend, ids, **kw):
    kw = {"mask_token_id": MASK_ID, "vocab_size": VOCAB, "special_token_ids": SPECIALS, **kw}
    with electra_fast.use_backend(backend):
        return electra_fast.mask_tokens(ids, **kw)


def oracle(ids, mask, starts, *, seed, mask_prob=0.15, mask_token_frac=0.85, random_token_frac=0.0,
           strategy="count", specials=SPECIALS, vocab=VOCAB):
    """The documented semantics in plain Python loops (shares only Philox with the reference)."""
    B, T = ids.shape
    out, masked = ids.tolist(), [[False] * T for _ in range(B)]
    x = [w.tolist() for w in philox(seed, torch.arange(B * T).reshape(B, T), MASKING)]
    sp = sorted(set(specials))
    for b in range(B):
        real = [mask is None or bool(mask[b, t]) for t in range(T)]
        cand = [real[t] and out[b][t] not in sp for t in range(T)]
        units, t = [], 0
        while t < T:  # (start, length)
            e = t + 1
            while starts is not None and e < T and real[e] and not starts[b, e]:
                e += 1
            units.append((t, e - t))
            t = e
        units = [(s, ln) for s, ln in units if all(cand[s:s + ln])]
        take = []
        if strategy == "count":
            n = min(sum(cand), max(1, electra_count(sum(real), mask_prob, T)))
            if sum(cand) == 0:
                n = 0
            total = 0
            for s, ln in sorted((u for u in units if u[1] <= n), key=lambda u: (x[0][b][u[0]], u[0])):
                if total + ln > n:
                    break
                total += ln
                take.append((s, ln))
        else:
            take = [(s, ln) for s, ln in units if (x[0][b][s] >> 8) * 2.0 ** -24 < mask_prob]
        for s, ln in take:
            for t in range(s, s + ln):
                masked[b][t] = True
                u = (x[1][b][t] >> 8) * 2.0 ** -24
                if u < mask_token_frac:
                    out[b][t] = MASK_ID
                elif u < mask_token_frac + random_token_frac:
                    r = (x[2][b][t] * (vocab - len(sp))) >> 32
                    for s_ in sp:
                        r += r >= s_
                    out[b][t] = r
    return torch.tensor(out, dtype=ids.dtype), torch.tensor(masked)


def check_invariants(ids, mask, starts, res, *, strategy, mask_prob, random_token_frac=0.0):
    """Properties every result must have, whatever the random draws."""
    out, labels, masked = res
    assert out.dtype == ids.dtype and labels.dtype == torch.int64 and masked.dtype == torch.bool
    real = torch.ones_like(masked) if mask is None else mask.bool()
    special = torch.isin(ids, torch.tensor(SPECIALS))
    cand = real & ~special
    assert not (masked & ~cand).any(), "selected a special or padding position"
    assert torch.equal(out[~masked], ids[~masked]), "an unselected position changed"
    assert torch.equal(labels, torch.where(masked, ids.long(), -100))
    changed = masked & (out != ids)
    assert not torch.isin(out[changed & (out != MASK_ID)], torch.tensor(SPECIALS)).any(), "random token is special"
    if random_token_frac == 0:
        assert torch.equal(out[changed], torch.full_like(out[changed], MASK_ID))
    if starts is not None:  # never a split word, never a word holding a non-candidate
        B, T = ids.shape
        es = starts.bool() | ~real
        es[:, :1] = True
        wid = es.long().cumsum(1)
        for b in range(B):
            for w in wid[b].unique():
                sel = masked[b][wid[b] == w]
                assert sel.all() or not sel.any(), "split word"
                if sel.any():
                    assert cand[b][wid[b] == w].all()
    if strategy == "count":
        n_real, n_cand = real.sum(1), cand.sum(1)
        T = real.shape[1]
        want = torch.minimum(n_cand, torch.tensor([max(1, electra_count(int(k), mask_prob, T)) for k in n_real]))
        got = masked.sum(1)
        if starts is None:
            assert torch.equal(got, want), "count mode must select exactly n tokens"
        else:
            assert (got <= want).all()


# ---------------------------------------------------------------- bit-identical across backends

CASES = [  # (B, T, pad, words, strategy, options)
    (1, 1, False, False, "count", {}),
    (2, 5, True, False, "count", BERT),
    (3, 17, True, False, "bernoulli", BERT),
    (4, 64, True, False, "count", dict(mask_prob=0.3, **BERT)),
    (4, 64, False, False, "bernoulli", dict(mask_prob=0.5)),
    (3, 33, True, True, "count", dict(mask_prob=0.4, **BERT)),
    (4, 64, True, True, "count", {}),
    (4, 64, True, True, "bernoulli", dict(mask_prob=0.3, mask_token_frac=0.5, random_token_frac=0.5)),
    (2, 48, False, True, "count", dict(mask_prob=1.0)),
    (3, 40, True, False, "count", dict(mask_prob=0.0, special_token_ids=())),
]


@pytest.mark.parametrize("backend,device", fast_backends())
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_bit_identical(backend, device, case, id_dtype):
    B, T, pad, words, strategy, opts = CASES[case]
    for seed in (case, 2 ** 40 + 7 * case + 3):  # both seed words in use
        ids, mask, starts = make(B, T, seed=seed, pad=pad, words=words, id_dtype=id_dtype)
        kw = dict(seed=seed, strategy=strategy, attention_mask=mask, word_starts=starts, **opts)
        want = run("reference", ids, **kw)
        got = run(backend, ids.to(device), **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
        for name, w, g in zip(("input_ids", "labels", "masked"), want, got):
            assert torch.equal(w, g.cpu()), f"{name} differs from the reference (seed {seed})"


@pytest.mark.parametrize("words", [False, True])
@pytest.mark.parametrize("strategy", ["count", "bernoulli"])
def test_reference_matches_python_oracle(words, strategy):
    for seed in range(6):
        ids, mask, starts = make(5, 41, seed=seed, words=words)
        kw = dict(seed=seed, mask_prob=0.35, strategy=strategy, **BERT)
        res = run("reference", ids, attention_mask=mask, word_starts=starts, **kw)
        want_ids, want_masked = oracle(ids, mask, starts, **kw)
        assert torch.equal(res.masked, want_masked)
        assert torch.equal(res.input_ids, want_ids)
        check_invariants(ids, mask, starts, res, strategy=strategy, mask_prob=0.35, random_token_frac=0.1)


@pytest.mark.parametrize("backend,device", all_backends())
def test_exact_probability_thresholds(backend, device):
    """u < p is exact: a draw equal to p is not below it, one ulp (2**-24) more is."""
    ids = torch.full((1, 64), 10)
    x0, x1, _, _ = philox(21, torch.arange(64)[None], MASKING)
    k0, k1 = (x0[0, 5] >> 8).item(), (x1[0, 7] >> 8).item()
    for p, want in ((k0 * 2.0 ** -24, False), ((k0 + 1) * 2.0 ** -24, True)):
        res = run(backend, ids.to(device), seed=21, mask_prob=p, strategy="bernoulli", special_token_ids=())
        assert res.masked[0, 5].item() is want
        assert torch.equal(res.masked.cpu(), (x0 >> 8) < math.ceil(p * 2 ** 24))
    for f, want in ((k1 * 2.0 ** -24, 10), ((k1 + 1) * 2.0 ** -24, MASK_ID)):
        res = run(backend, ids.to(device), seed=21, mask_prob=1.0, strategy="bernoulli", mask_token_frac=f)
        assert res.masked.all() and res.input_ids[0, 7].item() == want


@pytest.mark.parametrize("backend,device", all_backends())
def test_count_equal_keys_ordered_by_position(backend, device):
    """Seed 1146 gives positions 3620 and 3883 of a 4096-token row the same 32-bit key, with 1866 keys
    below it: n = 1867 takes the earlier position only, n = 1868 both, n = 1866 neither."""
    ids = torch.full((1, 4096), 10, device=device)
    for n, want in ((1866, (False, False)), (1867, (True, False)), (1868, (True, True))):
        res = run(backend, ids, seed=1146, mask_prob=n / 4096, special_token_ids=())
        assert res.masked.sum().item() == n
        assert (res.masked[0, 3620].item(), res.masked[0, 3883].item()) == want


@pytest.mark.parametrize("backend,device", all_backends())
def test_large_rows_cpu_backends(backend, device):
    """Rows longer than the smallest Triton tile, every option at once (interpreter: one row)."""
    b = 1 if backend == "triton" else 6
    ids, mask, starts = make(b, 1500, seed=5, words=True)
    for strategy in ("count", "bernoulli"):
        kw = dict(seed=11, strategy=strategy, attention_mask=mask, word_starts=starts, **BERT)
        want = run("reference", ids, **kw)
        got = run(backend, ids.to(device), **{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()})
        assert all(torch.equal(w, g.cpu()) for w, g in zip(want, got))
        check_invariants(ids, mask, starts, want, strategy=strategy, mask_prob=0.15, random_token_frac=0.1)


def test_cpp_thread_count_independent(cpp_extension):
    ids, mask, starts = make(64, 200, seed=1, words=True)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            outs.append(run("cpp", ids, seed=3, attention_mask=mask, word_starts=starts))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


# ---------------------------------------------------------------- semantics and invariants

@pytest.mark.parametrize("backend,device", all_backends())
def test_invariants_and_edge_shapes(backend, device):
    for B, T in ((0, 5), (3, 0), (2, 1), (1, 2)):
        ids, mask, starts = make(B, T, seed=B + T, pad=False, words=True)
        for strategy in ("count", "bernoulli"):
            res = run(backend, ids.to(device), seed=1, strategy=strategy, word_starts=starts.to(device))
            assert res.input_ids.shape == res.labels.shape == res.masked.shape == (B, T)
            check_invariants(ids, None, starts, [r.cpu() for r in res], strategy=strategy, mask_prob=0.15)
    # T = 1 with a real token: "count" masks it (max(1, round(0.15))), unless it is special
    one = run(backend, torch.tensor([[7], [1]], device=device), seed=0)
    assert one.masked.cpu().tolist() == [[True], [False]]


def test_count_is_electras():
    """tf.round rounds half to even; max_predictions_per_seq = int((mask_prob + 0.005) * max_seq_length) caps."""
    table = ref.count_table(0.5, 9)
    assert table.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 4, 4]  # 0.5 -> 0, 2.5 -> 2, 4.5 -> 4 (N = 4 for T = 9)
    t128 = ref.count_table(0.15, 128)
    # 0.15 x 30 = 4.5 -> 4 (half to even: the case the old half-up rule got wrong); 70 -> 10.5 -> 10; 110 -> 16
    assert t128[30].item() == 4 and t128[70].item() == 10 and t128[110].item() == 16
    assert t128[128].item() == 19 and int((0.15 + 0.005) * 128) == 19  # 19.2 rounds to the cap
    assert ref.count_table(0.15, 512)[512].item() == 77 and ref.count_table(0.15, 10)[10].item() == 1  # N = 1
    for T in (1, 7, 64, 512):  # the table agrees with the independent formula everywhere
        assert ref.count_table(0.15, T).tolist() == [electra_count(k, 0.15, T) for k in range(T + 1)]


@pytest.mark.parametrize("backend, device", all_backends())
def test_count_matches_electra_for_half_way_rows(backend, device):
    """Rows of 30 / 70 / 110 real tokens (x 0.15 lands on .5): every backend masks ELECTRA's count."""
    T = 128
    ids = torch.randint(10, VOCAB, (3, T))
    mask = torch.zeros(3, T, dtype=torch.bool)
    for row, n in enumerate((30, 70, 110)):
        mask[row, :n] = True
    res = run(backend, ids.to(device), seed=5, attention_mask=mask.to(device))
    assert res.masked.sum(1).cpu().tolist() == [4, 10, 16]


def test_whole_word_count_takes_prefix_and_at_least_one_word():
    # every row: [CLS] w(len 3) w(len 3) w(len 3) [SEP]; n = round(0.3 * 11) = 3: exactly one word fits
    ids = torch.tensor([[1, 10, 11, 12, 13, 14, 15, 16, 17, 18, 2]] * 50)
    starts = torch.tensor([[1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1]] * 50, dtype=torch.bool)
    res = run("reference", ids, seed=4, mask_prob=0.3, word_starts=starts)
    assert (res.masked.sum(1) == 3).all()
    # n = 2: no word fits, nothing is masked although candidates exist
    res = run("reference", ids, seed=4, mask_prob=0.2, word_starts=starts)
    assert not res.masked.any()


def test_triton_refuses_long_rows():
    if electra_fast._backend.triton_import_error() is not None:
        pytest.skip("triton not importable")
    from electra_fast.kernels.masking import MAX_T

    with pytest.raises(RuntimeError, match="T <= 8192"):
        run("triton", torch.full((1, MAX_T + 1), 5), seed=0)


# ---------------------------------------------------------------- statistics (5-sigma bounds)

def _default_run(ids, **kw):
    return run(None, ids, **kw)  # automatic routing: C++ when built, else the reference


def _within(k, n, p, sigmas=5.0):
    return abs(k - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def test_bernoulli_rate_and_replacement_split():
    ids, mask, _ = make(2048, 128, seed=7)
    res = _default_run(ids, seed=99, mask_prob=0.2, strategy="bernoulli", attention_mask=mask, **BERT)
    cand = mask & ~torch.isin(ids, torch.tensor(SPECIALS))
    k, n = res.masked.sum().item(), cand.sum().item()
    assert _within(k, n, 0.2), (k, n)
    sel = res.masked
    n_mask = (res.input_ids[sel] == MASK_ID).sum().item()
    n_same = (res.input_ids[sel] == ids[sel]).sum().item()  # kept, or a random draw of the original id
    assert _within(n_mask, k, 0.8)
    p_same = 0.1 + 0.1 / (VOCAB - len(SPECIALS))
    assert _within(n_same, k, p_same)


def test_whole_word_bernoulli_rate():
    ids, mask, starts = make(1024, 96, seed=8, words=True)
    res = _default_run(ids, seed=5, mask_prob=0.3, strategy="bernoulli", attention_mask=mask, word_starts=starts)
    cand = mask & ~torch.isin(ids, torch.tensor(SPECIALS))
    wid = (starts | ~mask).long().cumsum(1) + torch.arange(ids.shape[0])[:, None] * ids.shape[1]  # global word ids
    n_words = int(wid.max()) + 1
    bad = torch.zeros(n_words, dtype=torch.long).index_add_(0, wid.flatten(), (~cand).long().flatten())
    sel = torch.zeros(n_words, dtype=torch.long).index_add_(0, wid.flatten(), res.masked.long().flatten())
    present = torch.zeros(n_words, dtype=torch.long).index_add_(0, wid.flatten(), torch.ones_like(wid).flatten())
    eligible = (present > 0) & (bad == 0)
    assert (sel[~eligible] == 0).all()
    k, n = (sel[eligible] > 0).sum().item(), eligible.sum().item()
    assert _within(k, n, 0.3), (k, n)


def _chi2_ok(counts, expected):
    df = counts.numel() - 1
    chi2 = ((counts.double() - expected) ** 2 / expected).sum().item()
    return chi2 <= df + 5 * math.sqrt(2 * df), chi2


def test_random_tokens_uniform_and_never_special():
    ids, mask, _ = make(2048, 64, seed=9)
    res = _default_run(ids, seed=123, mask_prob=0.5, mask_token_frac=0.0, random_token_frac=1.0, attention_mask=mask)
    drawn = res.input_ids[res.masked]
    assert not torch.isin(drawn, torch.tensor(SPECIALS)).any()
    counts = torch.bincount(drawn, minlength=VOCAB)[len(SPECIALS):]
    ok, chi2 = _chi2_ok(counts, drawn.numel() / counts.numel())
    assert ok, chi2


def test_selected_positions_uniform():
    ids = torch.randint(4, VOCAB, (8192, 40))
    res = _default_run(ids, seed=77, mask_prob=0.25)
    assert (res.masked.sum(1) == 10).all()
    ok, chi2 = _chi2_ok(res.masked.sum(0), 8192 * 10 / 40)
    assert ok, chi2


# ---------------------------------------------------------------- determinism and seeds

def test_determinism_and_seeds():
    ids, mask, starts = make(16, 100, seed=3, words=True)
    a = _default_run(ids, seed=5, attention_mask=mask, word_starts=starts)
    b = _default_run(ids, seed=5, attention_mask=mask, word_starts=starts)
    c = _default_run(ids, seed=6, attention_mask=mask, word_starts=starts)
    d = _default_run(ids, seed=5 + 2 ** 32, attention_mask=mask, word_starts=starts)  # the seed's high word counts
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.masked, c.masked) and not torch.equal(a.masked, d.masked)


def test_token_masker_reproducible_and_dynamic():
    m = electra_fast.TokenMasker.bert(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS)
    assert (m.mask_token_frac, m.random_token_frac) == (0.8, 0.1)
    ids, mask, _ = make(8, 64, seed=2)
    torch.manual_seed(42)
    a1, a2 = m(ids, mask), m(ids, mask)
    torch.manual_seed(42)
    b1 = m(ids, mask)
    assert all(torch.equal(x, y) for x, y in zip(a1, b1))
    assert not torch.equal(a1.masked, a2.masked)  # a fresh seed per call
    fixed = m(ids, mask, seed=9)
    want = electra_fast.mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=9, special_token_ids=SPECIALS,
                                    attention_mask=mask, **BERT)
    assert all(torch.equal(x, y) for x, y in zip(fixed, want))
    with pytest.raises(ValueError, match="^mask_token_id"):
        electra_fast.TokenMasker(mask_token_id=VOCAB, vocab_size=VOCAB)


# ---------------------------------------------------------------- hypothesis properties

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(0, 5), T=st.integers(1, 70), seed=st.integers(0, 2 ** 63 - 1),
       mask_prob=st.floats(0, 1), fracs=st.tuples(st.floats(0, 1), st.floats(0, 1)),
       strategy=st.sampled_from(["count", "bernoulli"]), words=st.booleans(), pad=st.booleans(),
       data_seed=st.integers(0, 1000))
def test_properties(B, T, seed, mask_prob, fracs, strategy, words, pad, data_seed):
    mtf, rtf = fracs[0], fracs[1] * (1 - fracs[0])
    ids, mask, starts = make(B, T, seed=data_seed, pad=pad, words=words)
    kw = dict(seed=seed, mask_prob=mask_prob, mask_token_frac=mtf, random_token_frac=rtf, strategy=strategy,
              attention_mask=mask, word_starts=starts)
    res = run("reference", ids, **kw)
    check_invariants(ids, mask, starts, res, strategy=strategy, mask_prob=mask_prob, random_token_frac=rtf)
    if electra_fast.extension_loaded():
        assert all(torch.equal(a, b) for a, b in zip(res, run("cpp", ids, **kw)))


# ---------------------------------------------------------------- torch.library / torch.compile

def test_opcheck():
    ids, mask, starts = make(3, 20, seed=1, words=True)
    args = (ids, mask.view(torch.uint8), starts.view(torch.uint8), list(SPECIALS), 5, MASK_ID, VOCAB - 4, 0.3,
            ref.prob_threshold(0.3), ref.prob_threshold(0.8), ref.prob_threshold(0.9), True)
    torch.library.opcheck(_OP.op, args)
    torch.library.opcheck(_OP.op, args[:-1] + (False,))


def test_torch_compile_fullgraph():
    ids, mask, starts = make(4, 32, seed=2, words=True)

    def f(x, m, s):
        out = electra_fast.mask_tokens(x, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=17, special_token_ids=SPECIALS,
                                       attention_mask=m, word_starts=s, validate=False, **BERT)
        return out.input_ids + 1, out.labels, out.masked

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(ids, mask, starts)
    want = f(ids, mask, starts)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------- bad input

def _bad_cases():
    ids = torch.randint(4, VOCAB, (2, 6))
    base = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, seed=0, special_token_ids=SPECIALS)
    starts_bad = torch.zeros(2, 6, dtype=torch.bool)
    return [
        ("mask_prob", ValueError, ids, dict(mask_prob=1.5)),
        ("mask_prob", ValueError, ids, dict(mask_prob=-0.1)),
        ("mask_prob", ValueError, ids, dict(mask_prob=float("nan"))),
        ("mask_token_frac", ValueError, ids, dict(mask_token_frac=1.01)),
        ("random_token_frac", ValueError, ids, dict(random_token_frac=-0.5)),
        ("random_token_frac", ValueError, ids, dict(mask_token_frac=0.8, random_token_frac=0.3)),
        ("mask_token_id", ValueError, ids, dict(mask_token_id=VOCAB)),
        ("mask_token_id", ValueError, ids, dict(mask_token_id=-1)),
        ("special_token_ids", ValueError, ids, dict(special_token_ids=(1, VOCAB))),
        ("special_token_ids", ValueError, ids, dict(special_token_ids=(-3,))),
        ("special_token_ids", ValueError, ids, dict(vocab_size=4, mask_token_id=3, random_token_frac=0.1)),
        ("input_ids", ValueError, ids + VOCAB, {}),
        ("input_ids", ValueError, ids - VOCAB, {}),
        ("input_ids", TypeError, ids.float(), {}),
        ("input_ids", ValueError, ids[0], {}),
        ("attention_mask", ValueError, ids, dict(attention_mask=torch.ones(2, 5, dtype=torch.bool))),
        ("attention_mask", ValueError, ids, dict(attention_mask=torch.ones(2, 6, dtype=torch.bool, device="meta"))),
        ("attention_mask", TypeError, ids, dict(attention_mask=torch.ones(2, 6))),
        ("word_starts", ValueError, ids, dict(word_starts=torch.ones(3, 6, dtype=torch.bool))),
        ("word_starts", ValueError, ids, dict(word_starts=starts_bad)),
        ("word_starts", ValueError, ids, dict(word_starts=torch.ones(2, 6, dtype=torch.bool, device="meta"))),
        ("strategy", ValueError, ids, dict(strategy="topk")),
        ("vocab_size", ValueError, ids, dict(vocab_size=0, mask_token_id=0)),
        ("seed", ValueError, ids, dict(seed=-1)),
        ("seed", TypeError, ids, dict(seed=1.5)),
    ], base


@pytest.mark.parametrize("i", range(25))
def test_bad_input(i):
    cases, base = _bad_cases()
    name, exc, ids, kw = cases[i]
    with pytest.raises(exc, match=f"^{name}"):
        electra_fast.mask_tokens(ids, **{**base, **kw})


def test_bad_input_list_is_complete():
    assert len(_bad_cases()[0]) == 25


def test_special_ids_are_checked_not_truncated():
    """TokenMasker kept int(101.7) = 101 and int(True) = 1 as special ids; mask_tokens refused NumPy ints, which
    gumbel_sample's disallowed_ids accept: one rule (_validate.int_ids) for both."""
    import numpy as np
    for bad in ([101.7, 3], [True, 3]):
        with pytest.raises(TypeError, match="^special_token_ids: integer dtype required"):
            electra_fast.TokenMasker.electra(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=bad)
        with pytest.raises(TypeError, match="^special_token_ids: integer dtype required"):
            electra_fast.mask_tokens(torch.randint(4, VOCAB, (2, 6)), mask_token_id=MASK_ID, vocab_size=VOCAB, seed=0,
                                     special_token_ids=bad)
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(3))
    want = electra_fast.mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=5, special_token_ids=SPECIALS)
    got = electra_fast.mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=5,
                                   special_token_ids=np.array(SPECIALS))
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    m = electra_fast.TokenMasker.electra(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=np.array(SPECIALS))
    assert m.special_token_ids == tuple(SPECIALS) and all(type(s) is int for s in m.special_token_ids)
    with pytest.raises(TypeError, match="^mask_token_id: expected an int, got bool"):  # was: input_ids: ... bool
        electra_fast.TokenMasker.electra(mask_token_id=True, vocab_size=VOCAB)
    # NumPy integers for the scalar ids, size and seed too (they were "expected an int, got int64")
    got = electra_fast.mask_tokens(ids, mask_token_id=np.int64(MASK_ID), vocab_size=np.int32(VOCAB), seed=np.uint8(5),
                                   special_token_ids=SPECIALS)
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
    with pytest.raises(TypeError, match="^seed: expected an int, got float64"):
        electra_fast.mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=np.float64(5))


def test_word_starts_checked_after_left_padding():
    ids = torch.tensor([[0, 0, 5, 6]])
    mask = torch.tensor([[0, 0, 1, 1]])
    ok = electra_fast.mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=0, attention_mask=mask,
                                  word_starts=torch.tensor([[0, 0, 1, 0]]))
    assert ok.masked[0, :2].tolist() == [False, False]
    with pytest.raises(ValueError, match="^word_starts"):
        electra_fast.mask_tokens(ids, mask_token_id=MASK_ID, vocab_size=VOCAB, seed=0, attention_mask=mask,
                                 word_starts=torch.tensor([[1, 1, 0, 1]]))
