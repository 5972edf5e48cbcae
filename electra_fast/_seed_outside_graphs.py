"""The seed draw as torch.compile must see it: outside the graph. Traced, Inductor drew it from its own generator and a
compiled run had other dropout masks than the eager one. Its own module because ``torch.compiler.disable`` imports
torch._dynamo (1.8 s here, most of ``import electra_fast``): :func:`electra_fast._seed.draw` loads this only once
something may compile (it is compiling, or dynamo is loaded), so a command that never compiles never pays for it."""
from __future__ import annotations

import torch

from ._seed import drawn_here

drawn_outside_graphs = torch.compiler.disable(drawn_here)
