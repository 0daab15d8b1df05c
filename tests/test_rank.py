"""The rank advisor on synthetic adapters with planted subspaces: exact φ, the random baseline, the rule, bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest

from peftplan.errors import PlanError
from peftplan.rank import phi as ph
from peftplan.rank.adapters import read_adapter, split_module, write_adapter
from peftplan.rank.analyse import analyse_ranks

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """As `analyse_ranks` does: thin matrices, and OpenBLAS threads on a shared machine spin (≈100× slower)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def orthonormal_rows(n: int, d: int, rng=RNG) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, n)))
    return q.T  # n × d, orthonormal rows


def with_singular_values(rows: np.ndarray, rng=RNG) -> np.ndarray:
    """A = L · diag(s) · rows: right-singular vectors `rows` in order (s strictly decreasing), random rotation L."""
    n = len(rows)
    s = np.linspace(3.0, 1.0, n)
    left = orthonormal_rows(n, n, rng)
    return left @ (s[:, None] * rows)


def planted(k: int, r1: int, r2: int, d: int, rng=RNG) -> tuple[np.ndarray, np.ndarray]:
    """A_r1, A_r2 sharing their top-k right-singular vectors; all other directions mutually orthogonal."""
    q = orthonormal_rows(r1 + r2 - k, d, rng)
    shared, own1, own2 = q[:k], q[k:r1], q[r1:]
    return (with_singular_values(np.vstack([shared, own1]), rng),
            with_singular_values(np.vstack([shared, own2]), rng))


def naive_phi(a1: np.ndarray, a2: np.ndarray) -> np.ndarray:
    """Eq. (4) term by term: an SVD each, then ‖U_iᵀ V_j‖²_F / min(i, j) for every block."""
    u = np.linalg.svd(a1)[2]
    v = np.linalg.svd(a2)[2]
    out = np.empty((len(a1), len(a2)))
    for i in range(1, len(a1) + 1):
        for j in range(1, len(a2) + 1):
            out[i - 1, j - 1] = np.linalg.norm(u[:i] @ v[:j].T, "fro") ** 2 / min(i, j)
    return out


# ---------------------------------------------------------------- φ itself


@pytest.mark.parametrize("k", [0, 1, 3, 8])
def test_planted_shared_directions_give_min_ijk_over_min_ij_exactly(k):
    r1, r2, d = 8, 32, 96
    a1, a2 = planted(k, r1, r2, d)
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    expected = np.minimum(np.minimum(i, j), k) / np.minimum(i, j)
    np.testing.assert_allclose(ph.phi(a1, a2), expected, atol=1e-6, rtol=0)


def test_a_r2_whose_top_rows_span_a_r1_gives_phi_1_for_j_at_least_r1():
    """Only the span is shared (rotated inside it): φ = 1 wherever U_i ⊆ span(V_j), i.e. j ≥ r1."""
    r1, r2, d = 8, 64, 256
    q = orthonormal_rows(r2, d)
    rot = orthonormal_rows(r1, r1)
    a1 = with_singular_values(rot @ q[:r1])
    a2 = np.vstack([5.0 * q[:r1], 0.5 * q[r1:]])  # its top r1 rows span A_r1's row space
    p = ph.phi(a1, a2)
    np.testing.assert_allclose(p[:, r1 - 1:], 1.0, atol=1e-6, rtol=0)
    assert p[0, 0] < 1 - 1e-3  # the single top directions are not aligned


def test_one_direction_at_a_known_angle_gives_cos_squared():
    d, theta = 16, 0.3
    e = np.eye(d)
    a1 = (np.cos(theta) * e[0] + np.sin(theta) * e[1])[None, :]
    a2 = np.vstack([2 * e[0], e[2]])
    np.testing.assert_allclose(ph.phi(a1, a2), [[np.cos(theta) ** 2, np.cos(theta) ** 2]], atol=1e-12)


def test_cumulative_sum_equals_the_block_by_block_formula():
    a1, a2 = RNG.standard_normal((6, 40)), RNG.standard_normal((20, 40))
    np.testing.assert_allclose(ph.phi(a1, a2), naive_phi(a1, a2), atol=1e-12)


def test_independent_random_subspaces_average_the_baseline_max_ij_over_d():
    """E‖U_iᵀV_j‖²_F = i·j/d for independent uniform subspaces, so E φ = max(i, j)/d."""
    r1, r2, d, n = 8, 24, 128, 300
    rng = np.random.default_rng(7)
    mean = np.mean([ph.phi(rng.standard_normal((r1, d)), rng.standard_normal((r2, d))) for _ in range(n)], axis=0)
    base = ph.random_baseline(r1, r2, d)
    rel = np.abs(mean / base - 1)
    assert rel.max() < 0.3, rel.max()  # φ(1,1) ~ Beta(1/2, (d-1)/2): 8% standard error over 300 draws
    assert rel[3:, 3:].max() < 0.1, rel[3:, 3:].max()


@pytest.mark.parametrize("spread", [0.5, 1e-2, 1e-5])  # the last is below the Gram route's limit: SVD fallback
def test_right_singular_vectors_equal_lapack_svd(spread):
    rng = np.random.default_rng(3)
    a = orthonormal_rows(16, 16, rng).T @ (np.geomspace(1, spread, 16)[:, None] * orthonormal_rows(16, 300, rng))
    ours = ph.right_singular_vectors(a)
    ref = np.linalg.svd(a, full_matrices=False)[2]
    np.testing.assert_allclose(np.abs(np.sum(ours * ref, axis=1)), 1.0, atol=1e-8)  # same vectors up to sign
    np.testing.assert_allclose(ours @ ours.T, np.eye(16), atol=1e-8)


def test_different_input_sizes_are_refused():
    with pytest.raises(ValueError):
        ph.phi(np.ones((2, 8)), np.ones((4, 9)))


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("diag,threshold,k", [
    ([0.9, 0.8, 0.4, 0.9], 0.5, 2),  # the first drop ends the run
    ([0.4, 0.9], 0.5, 0),
    ([0.9, 0.9, 0.9], 0.5, 3),
    ([0.5, 0.9], 0.5, 0),  # "above": strictly
    ([0.5 + 1e-12, 0.9], 0.5, 0),  # rounding at an exact tie is not above
])
def test_captured_rank(diag, threshold, k):
    assert ph.captured_rank(np.array(diag), threshold) == k


@pytest.mark.parametrize("ranks,k", [([3], 3), ([1, 5], 1), ([1, 2, 5], 2), ([0, 0, 4, 4], 0), ([0, 4, 4, 4], 4),
                                     ([8] * 17 + [1] * 15, 8), ([8] * 16 + [1] * 16, 1)])
def test_majority_rank_is_reached_by_more_than_half_of_the_layers(ranks, k):
    assert ph.majority_rank(ranks) == k
    assert sum(r >= k for r in ranks) > len(ranks) / 2
    assert sum(r >= k + 1 for r in ranks) <= len(ranks) / 2


@pytest.mark.parametrize("k,r1,r2,r", [(1, 8, 64, 1), (3, 8, 64, 4), (5, 8, 64, 8), (8, 8, 64, 8), (0, 8, 64, 64),
                                       (10, 12, 64, 12)])
def test_recommend_r(k, r1, r2, r):
    assert ph.recommend_r(k, r1, r2) == r


# ---------------------------------------------------------------- adapters on disk


def module(layer: int, kind: str) -> str:
    return f"model.layers.{layer}.self_attn.{kind}"


def write_pair(tmp_path, shared_per_layer, r1=8, r2=32, d=128, d_out=None, base="meta-llama/Llama-3.2-1B",
               kinds=("q_proj", "v_proj"), seed=0):
    """Two adapters with `shared_per_layer[l]` planted shared directions in layer l, for every kind."""
    rng = np.random.default_rng(seed)
    a1, a2, outs = {}, {}, {}
    for layer, k in enumerate(shared_per_layer):
        for kind in kinds:
            m = module(layer, kind)
            a1[m], a2[m] = planted(k, r1, r2, d, rng)
            outs[m] = (d_out or {}).get(kind, d)
    x = write_adapter(tmp_path / f"r{r1}", a1, outs, base)
    y = write_adapter(tmp_path / f"r{r2}", a2, outs, base)
    return x, y


def test_split_module():
    assert split_module("model.layers.12.self_attn.q_proj") == ("model.layers.*.self_attn.q_proj", 12)
    assert split_module("transformer.h.3.attn.c_attn") == ("transformer.h.*.attn.c_attn", 3)
    assert split_module("lm_head") == ("lm_head", None)


def test_reading_a_peft_layout_adapter_gives_its_matrices(tmp_path):
    a = {module(0, "q_proj"): RNG.standard_normal((4, 16)).astype(np.float32)}
    write_adapter(tmp_path / "ad", a, {module(0, "q_proj"): 24}, "x")
    ad = read_adapter(tmp_path / "ad")
    (m,) = ad.modules
    assert (m.module, m.layer, m.r, m.d_in, m.d_out) == (module(0, "q_proj"), 0, 4, 16, 24)
    np.testing.assert_array_equal(ad.a[m.module], a[m.module])
    assert ad.base_model == "x"
    assert read_adapter(tmp_path / "ad" / "adapter_model.safetensors").modules == ad.modules  # a bare file


def test_bf16_weights_are_read_as_their_float_values(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    a = torch.randn(4, 16).to(torch.bfloat16)
    save_file({"base_model.model.x.0.q.lora_A.weight": a,
               "base_model.model.x.0.q.lora_B.weight": torch.zeros(8, 4, dtype=torch.bfloat16)},
              str(tmp_path / "w.safetensors"))
    ad = read_adapter(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(ad.a["x.0.q"], a.float().numpy())


def test_planted_adapters_exact_phi_and_the_recommendation(tmp_path):
    """Layers share 1, 2, 2, 2, 4 top directions with the rest orthogonal: φ(i, i) = min(i, k)/i exactly, so a
    layer's captured rank at threshold 1/2 is 2k − 1; the majority (3 of 5 layers) reaches 3 → r = 4."""
    shared = [1, 2, 2, 2, 4]
    x, y = write_pair(tmp_path, shared)
    res = analyse_ranks(y, x)  # either order: the smaller r becomes r1
    assert (res.r1, res.r2, res.adapter_1) == (8, 32, str(x))
    for m in res.modules:
        k = shared[m.layer]
        i = np.arange(1, 9)[:, None]
        j = np.arange(1, 33)[None, :]
        np.testing.assert_allclose(np.array(m.phi), np.minimum(np.minimum(i, j), k) / np.minimum(i, j), atol=1e-6)
        assert m.captured_rank == 2 * k - 1
    for kind in res.kinds:
        assert kind.captured_ranks == (1, 3, 3, 3, 7) and kind.captured_rank == 3 and kind.recommended_r == 4
        np.testing.assert_allclose(kind.random_diagonal, np.arange(1, 9) / 128)
    assert res.recommended_r == 4


def test_all_shared_recommends_r1_and_none_shared_r2(tmp_path):
    x, y = write_pair(tmp_path / "all", [8, 8, 8])
    assert analyse_ranks(x, y).recommended_r == 8
    x, y = write_pair(tmp_path / "none", [0, 0, 0])
    res = analyse_ranks(x, y)
    assert res.recommended_r == 32 and any("no direction is shared" in n for n in res.notes)


def test_memory_saved_is_the_estimate_difference_for_the_base_card(tmp_path):
    """Llama-3.2-1B shapes (q: 2048→2048, v: 2048→512), found from base_model_name_or_path's Hub id."""
    from peftplan.planning import estimate

    x, y = write_pair(tmp_path, [1] * 16, r1=8, r2=64, d=2048, d_out={"q_proj": 2048, "v_proj": 512})
    res = analyse_ranks(x, y)
    assert res.recommended_r == 1 and res.base_model == "llama-3.2-1b" and not res.notes
    m = res.memory
    peak = {r: estimate("llama-3.2-1b", method="lora", r=r, targets="q_proj,v_proj").peak_bytes for r in (1, 8, 64)}
    assert m.peak_bytes == (peak[8], peak[64], peak[1])
    assert m.saved_bytes == peak[64] - peak[1] > 0
    # peft's count r·(d_in + d_out) per module, 16 layers: the planner's trainable count at r1 agrees
    assert m.adapter_params == m.trainable_params[0] == 8 * 16 * ((2048 + 2048) + (2048 + 512))
    assert m.saved_params == 63 * 16 * ((2048 + 2048) + (2048 + 512))


def test_a_config_json_beside_the_adapter_names_the_base(tmp_path):
    from peftplan.planning.cards import load_card, to_hf_config

    x, y = write_pair(tmp_path, [2, 2, 2], base="/nonexistent/base", d=768)
    res = analyse_ranks(x, y)
    assert res.memory is None and any("has no card here" in n for n in res.notes)
    (x / "config.json").write_text(json.dumps(to_hf_config(load_card("opt-125m")) | {"_name_or_path": "o-125m"}))
    res = analyse_ranks(x, y)
    assert res.memory is not None and res.memory.model == "o-125m"
    # only 3 of opt-125m's 12 layers are in the adapter: the count check says so
    assert any("is it the base model?" in n for n in res.notes)


def test_json_output(tmp_path):
    x, y = write_pair(tmp_path, [1, 1, 1], d=64, base=None)
    r = cli("rank", str(x), str(y), "--json", "--threshold", "0.6")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["r1"] == 8 and d["r2"] == 32 and d["threshold"] == 0.6 and d["recommended_r"] == 1
    assert len(d["modules"]) == 6 and len(d["modules"][0]["phi"]) == 8 and len(d["modules"][0]["phi"][0]) == 32
    assert {k["name"] for k in d["kinds"]} == {"self_attn.q_proj", "self_attn.v_proj"}
    assert d["memory"] is None and "base model unknown" in r.stderr  # no adapter names a base


# ---------------------------------------------------------------- HTML


def test_html_has_two_plots_per_kind_offline_and_escaped(tmp_path):
    from peftplan.rank.html import render_rank_html

    x, y = write_pair(tmp_path, [1, 2], d=64, kinds=("q_proj", "v<b>_proj"))
    page = render_rank_html(analyse_ranks(x, y), plotly_js="/*plotly*/")
    assert page.count('<div class="plot" id="plot-') == 4
    assert "<b>_proj" not in page and "v&lt;b&gt;_proj" in page
    assert "src=" not in page and "http" not in page.split("</style>")[0]


# ---------------------------------------------------------------- CLI errors


def cli(*args):
    return subprocess.run([sys.executable, "-m", "peftplan", *args], capture_output=True, text=True, timeout=120)


def bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    x, y = write_pair(tmp_path / "ok", [1, 1], d=48)
    same, _ = write_pair(tmp_path / "same", [1, 1], d=48, r1=8, r2=16)
    wide, _ = write_pair(tmp_path / "wide", [1, 1], d=64)
    other_base, _ = write_pair(tmp_path / "base", [1, 1], d=48, base="facebook/opt-125m")
    targets, _ = write_pair(tmp_path / "targets", [1, 1], d=48, kinds=("q_proj", "k_proj"))
    layers, _ = write_pair(tmp_path / "layers", [1], d=48)
    ia3 = write_adapter(tmp_path / "ia3", {module(0, "q_proj"): np.ones((2, 48))}, {module(0, "q_proj"): 48}, None,
                        peft_type="IA3")
    from safetensors.numpy import save_file

    save_file({"model.layers.0.q_proj.weight": np.ones((4, 4), np.float32)}, str(tmp_path / "plain.safetensors"))
    save_file({"base_model.model.m.0.q.lora_A.weight": np.ones((4, 4), np.float32)}, str(tmp_path / "noB.safetensors"))
    nan = write_adapter(tmp_path / "nan", {module(0, "q_proj"): np.full((2, 48), np.nan)}, {module(0, "q_proj"): 48},
                        None)
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    return {
        "missing path": ([str(tmp_path / "nope"), str(y)], "no adapter at"),
        "folder without weights": ([str(tmp_path / "empty"), str(y)], "no adapter_model.safetensors"),
        "unreadable file": ([str(tmp_path / "junk.safetensors"), str(y)], "cannot read"),
        "r1 = r2": ([str(same), str(x)], "both adapters have r = 8"),
        "mismatched shapes": ([str(wide), str(y)], "mismatched shapes"),
        "mismatched bases": ([str(other_base), str(y)], "mismatched base models"),
        "different targets": ([str(targets), str(y)], "different targets"),
        "missing modules": ([str(layers), str(y)], "modules missing from"),
        "non-LoRA adapter": ([str(ia3), str(y)], "IA3 adapter, not LoRA"),
        "no LoRA keys": ([str(tmp_path / "plain.safetensors"), str(y)], "holds no LoRA weights"),
        "NaN weights": ([str(nan), str(y)], "NaN or infinite"),
        "lora_B missing": ([str(tmp_path / "noB.safetensors"), str(y)], "has no lora_B"),
        "threshold": ([str(x), str(y), "--threshold", "1.5"], "threshold must be in (0, 1)"),
        "unknown model": ([str(x), str(y), "--model", "no-such-model"], "unknown model"),
        "method": ([str(x), str(y), "--method", "full"], "lora or qlora"),
    }


def in_process(*args):
    """The command in this process (typer's runner keeps stderr apart): 14 cases without 14 interpreter starts."""
    import typer
    from typer.testing import CliRunner

    from peftplan.rank import cli as rank_cli

    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def main() -> None:
        """peftplan (test app)"""

    rank_cli.register(app)
    r = CliRunner().invoke(app, list(args))
    return r.exit_code, r.stdout, r.stderr, r.exception


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path):
    cases = bad_inputs(tmp_path)
    for what, (args, message) in cases.items():
        code, out, err, exc = in_process("rank", *args)
        assert code == 2 and not out, (what, out, err, exc)
        assert len(err.strip().splitlines()) == 1, (what, err)
        assert err.startswith("peftplan: error:") and message in err, (what, err)
    args, message = cases["r1 = r2"]  # and as a real process: no traceback, one line
    r = cli("rank", *args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("peftplan: error:") and message in r.stderr


def test_api_raises_plan_error(tmp_path):
    with pytest.raises(PlanError, match="no adapter at"):
        analyse_ranks(tmp_path / "a", tmp_path / "b")


def test_a_missing_dependency_is_one_line(tmp_path, monkeypatch):
    x, y = write_pair(tmp_path, [1], d=48)
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "peftplan.rank.analyse", raising=False)
    code, out, err, _ = in_process("rank", str(x), str(y))
    assert code == 2 and err.strip() == ("peftplan: error: peftplan rank needs numpy, safetensors and threadpoolctl "
                                         "(threadpoolctl is missing): pip install -e '.[rank]'")
