"""Time planning on every shipped card: block Linears get their data-flow stage from the card's roles.

`flops.stage` used to look Linears up by name only, so `estimate --gpu` raised KeyError on DeBERTa-v2
(query_proj), ModernBERT (Wqkv), Falcon/Pythia (query_key_value), T5 (q) and DeepSeek-V2 (kv_a_proj_with_mqa).
"""
from __future__ import annotations

import math

import pytest

from peftplan.planning.api import estimate
from peftplan.planning.cards import registry
from peftplan.planning.flops import _STAGE_BY_LEAF, _STAGE_BY_ROLE, _STAGES, stage
from peftplan.planning.layout import layout

CARDS = sorted(registry())
PLANS = (dict(method="full"), dict(method="adapter"), dict(method="lora", targets="all-linear"),
         dict(method="qlora", targets="all-linear", kbit_prep=False))


@pytest.mark.parametrize("name", CARDS)
def test_every_card_and_method_gets_a_step_time(name):
    for fields in PLANS:
        est = estimate(name, gpu="a100-80gb", batch_size=1, seq_len=128, **fields)
        t = est.time.step_time_s
        assert math.isfinite(t) and t > 0, (name, fields, t)


def test_role_and_name_give_one_stage():
    """Where a hand-written name table knows a Linear, its role (cardgen.role_of) must give the same stage."""
    seen = 0
    for name in CARDS:
        for lin in layout(registry()[name]).block_linears:
            by_name = _STAGES.get(lin.name, _STAGE_BY_LEAF.get(lin.name.rsplit(".", 1)[-1]))
            if lin.role in _STAGE_BY_ROLE and by_name is not None:
                seen += 1
                assert stage(lin) == by_name, (name, lin.name, lin.role)
    assert seen > 100
