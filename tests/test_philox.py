"""The shared Philox4x32-10 stream: known answers, and the three backends agree bit for bit."""
import os
import subprocess
import sys

import pytest
import torch

import electra_fast
from electra_fast import _seed
from electra_fast.nn.dropout import Dropout
from electra_fast.reference import philox


def test_random123_known_answers():
    # Random123's kat_vectors for philox4x32_10: counter 0, key 0.
    words = philox.philox(0, torch.tensor([0]), 0)
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_counter_layout_and_seed_split():
    idx = torch.tensor([0, 1, 2**32 + 5, 2**40])
    a = philox.philox(2**33 + 7, idx, 2)
    b = philox.philox(2**33 + 7, idx, 3)
    assert all((x >= 0).all() and (x < 2**32).all() for x in a)
    assert not torch.equal(a[0], b[0])  # the purpose is part of the counter
    assert not torch.equal(philox.philox(7, idx, 2)[0], a[0])  # the seed's high word is part of the key


def test_uniform_conversions_are_exact_and_in_range():
    x = torch.tensor([0, 255, 256, 2**32 - 1, 2**31])
    u = philox.uniform(x)
    assert u[0] == 0 and u[1] == 0 and u[2] == 2.0 ** -24 and u[3] == 1 - 2.0 ** -24 and u[4] == 0.5
    v = philox.uniform_open(x)
    assert (v > 0).all() and (v < 1).all() and v[0] == 2.0 ** -24 and v[3] == 1 - 2.0 ** -24


@pytest.mark.parametrize("seed,exc", [(None, TypeError), ("bad", TypeError), (1.5, TypeError), (True, TypeError),
                                      (-1, ValueError), (2**63, ValueError)])
def test_bad_seeds(seed, exc):
    """A wrong type is a TypeError, an int out of range a ValueError, in every op (one check: _seed.check)."""
    with pytest.raises(exc, match="^seed"):
        philox.check_seed(seed)
    with pytest.raises(exc, match="^seed"):
        electra_fast.gumbel_sample(torch.zeros(2, 3), seed=seed)
    if seed is not None:  # None is the attention's "no dropout" seed: with dropout_p > 0 a ValueError, as missing
        with pytest.raises(exc, match="^seed"):
            electra_fast.disentangled_attention(*(torch.zeros(1, 1, 2, 4) for _ in range(3)), dropout_p=0.1,
                                                seed=seed)


def test_every_drawn_seed_comes_from_one_place(monkeypatch):
    """Callers that pass no seed (the dropout and masking modules, the model) draw it with _seed.draw: in
    [0, 2**63), reproducible under torch.manual_seed."""
    torch.manual_seed(3)
    a = [_seed.draw() for _ in range(50)]
    torch.manual_seed(3)
    assert a == [_seed.draw() for _ in range(50)] and all(0 <= s < _seed.SEED_LIMIT for s in a) and len(set(a)) == 50
    monkeypatch.setattr(_seed, "draw", lambda: 12345)
    x = torch.randn(4, 8)
    assert torch.equal(Dropout(0.5)(x), electra_fast.dropout(x, 0.5, 12345))
    ids = torch.randint(5, 50, (2, 16))
    masker = electra_fast.TokenMasker(mask_token_id=1, vocab_size=50)
    want = electra_fast.mask_tokens(ids, mask_token_id=1, vocab_size=50, seed=12345)
    assert torch.equal(masker(ids).input_ids, want.input_ids)


def test_draws_stay_outside_compiled_graphs_and_import_does_not_load_dynamo():
    """A fresh process: importing electra_fast and drawing a seed leave torch._dynamo unloaded (1.8 s of every
    command's start here; torch's custom ops load it at their first call). The first draws, made while torch.compile
    (Inductor) traces, still come from torch's default generator, outside the graph: the compiled Dropout and masker
    give what the eager ones give afterwards under the same manual_seed."""
    code = """
import sys, torch
import electra_fast
from electra_fast import _seed
from electra_fast.nn.dropout import Dropout
_seed.draw()
assert 'torch._dynamo' not in sys.modules, 'import electra_fast or a draw loaded torch._dynamo'
masker = electra_fast.TokenMasker(mask_token_id=1, vocab_size=50)
def step(x, ids):
    return Dropout(0.5)(x), masker(ids).input_ids
x, ids = torch.randn(4, 64), torch.randint(5, 50, (4, 64))
compiled = torch.compile(step)
torch.manual_seed(7)
got = [compiled(x, ids) for _ in range(3)]
torch.manual_seed(7)
eager = [step(x, ids) for _ in range(3)]
assert all(torch.equal(a, b) for e, g in zip(eager, got) for a, b in zip(e, g)), 'compiled draws differ'
assert not torch.equal(eager[0][0], eager[1][0])
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(__file__))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


try:
    import triton
    import triton.language as tl

    from electra_fast.kernels import philox as kphilox
except ImportError:  # pragma: no cover - triton is part of the test extra
    triton = None

if triton is not None:
    @triton.jit
    def _draw(seed, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        idx = offs.to(tl.int64) * 4294967311  # spans both counter words
        x0, x1, x2, x3 = kphilox.philox4(seed, idx, 2)
        m = offs < n
        tl.store(out_ptr + offs * 4 + 0, x0.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + offs * 4 + 1, x1.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + offs * 4 + 2, x2.to(tl.int64) & 0xFFFFFFFF, mask=m)
        tl.store(out_ptr + offs * 4 + 3, x3.to(tl.int64) & 0xFFFFFFFF, mask=m)
        u = kphilox.uniform(x0)
        v = kphilox.uniform_open(x1)
        tl.store(out_ptr + n * 4 + offs * 2, (u * 16777216.0).to(tl.int64), mask=m)
        tl.store(out_ptr + n * 4 + offs * 2 + 1, (v * 8388608.0 * 2.0).to(tl.int64), mask=m)


@pytest.mark.skipif(triton is None, reason="triton not installed")
def test_triton_stream_matches_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, seed = 50, 2**40 + 12345
    out = torch.zeros(n * 6, dtype=torch.int64, device=device)
    _draw[(1,)](seed, out, n, BLOCK=64)
    out = out.cpu()
    words = philox.philox(seed, torch.arange(n, dtype=torch.int64) * 4294967311, 2)
    assert torch.equal(out[:n * 4].view(n, 4), torch.stack(words, dim=1))
    conv = out[n * 4:].view(n, 2)
    # the float conversions are exact: scaled back they are integers, equal to the reference's
    assert torch.equal(conv[:, 0], (philox.uniform(words[0]) * 2**24).to(torch.int64))
    assert torch.equal(conv[:, 1], (philox.uniform_open(words[1]) * 2**24).to(torch.int64))
