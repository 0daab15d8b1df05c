"""The forked card worker (peftplan/cardgen_worker.py): the card it builds with deferred imports is the card
the ordinary build gives, for every config.json of tests/data/configs (each family, multimodal whole and
text-only, an encoder's classification task); a placeholder that is used sends the build back in-process;
a PlanError comes back from the worker unchanged; a package that is not installed stays missing.

The deferred builds run in a fresh interpreter (in the test process transformers is imported already, so
nothing could be deferred there); the ordinary builds run here, with the real modules.
"""
import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftplan.errors import PlanError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "configs"
CASES = [(p.parent.name, None, False) for p in sorted(CONFIGS.glob("*/config.json"))] + [
    ("gemma-3-4b", None, True), ("modernbert-base", "classification", False)]


def _kwargs(name: str, task, text_only: bool) -> dict:
    path = CONFIGS / name / "config.json"
    return dict(config=json.loads(path.read_text()), name=name, source=str(path), sha256="0" * 64, task=task,
                text_only=text_only)


def _python(code: str, tmp_path: Path) -> object:
    """Run code in a fresh interpreter; it pickles its answer to the file named OUT."""
    out = tmp_path / "out.pkl"
    env_code = f"OUT = {str(out)!r}\n" + textwrap.dedent(code)
    subprocess.run([sys.executable, "-c", env_code], check=True, cwd=ROOT, timeout=300,
                   env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    return pickle.loads(out.read_bytes())


def test_deferred_build_equals_ordinary_build_every_config(tmp_path):
    pytest.importorskip("transformers")
    cases = [_kwargs(*c) for c in CASES]
    (tmp_path / "cases.pkl").write_bytes(pickle.dumps(cases))
    got = _python(f"""
        import gc, pickle, sys
        from peftplan import cardgen_worker as w
        gc.disable()
        w.defer_imports()
        from peftplan.cardgen import generate
        fields = [generate(**k) for k in pickle.load(open({str(tmp_path / 'cases.pkl')!r}, 'rb'))]
        stubs = sorted(r for r in w.DEFERRED if isinstance(sys.modules.get(r), w._StubModule))
        pickle.dump((fields, stubs, w.TOUCHED), open(OUT, 'wb'))
    """, tmp_path)
    deferred, stubs, touched = got
    assert stubs == ["accelerate", "scipy", "torch._dynamo"]  # really deferred (all three are installed here)
    assert touched == []
    from peftplan.cardgen import generate

    for case, fields in zip(cases, deferred):
        assert fields == generate(**case), case["name"]


def test_first_call_builds_in_the_worker(tmp_path):
    pytest.importorskip("transformers")
    case = _kwargs("qwen3-0.6b", None, False)
    (tmp_path / "case.pkl").write_bytes(pickle.dumps(case))
    got = _python(f"""
        import pickle, sys
        from peftplan import cardgen_worker as w
        got = w._in_worker(pickle.load(open({str(tmp_path / 'case.pkl')!r}, 'rb')))
        pickle.dump((got, "torch" in sys.modules), open(OUT, 'wb'))
    """, tmp_path)
    (status, fields), parent_imported_torch = got
    assert status == "ok" and not parent_imported_torch  # the child built it; the parent stays light
    from peftplan.cardgen import generate

    assert fields == generate(**case)


FAKE_BUILD = """
    import os, pickle
    import peftplan.cardgen
    from peftplan import cardgen_worker as w
    from peftplan.errors import PlanError
    w.DEFERRED = ("xml",)  # a small installed package stands in for torch._dynamo
    PARENT = os.getpid()

    def build(**kwargs):
        if kwargs["name"] == "bad":
            raise PlanError(f"refused in {'the worker' if os.getpid() != PARENT else 'the parent'}")
        import xml.dom.minidom  # a placeholder in the worker, the real module in the parent
        return {"root": xml.dom.minidom.parseString("<card/>").documentElement.tagName, "pid": os.getpid()}

    peftplan.cardgen.generate = build
    args = dict(config={}, source="", sha256="")
"""


def test_used_placeholder_sends_the_build_back_in_process(tmp_path):
    got = _python(FAKE_BUILD + """
    fields = w.generate(name="ok", **args)
    pickle.dump((fields, fields["pid"] == PARENT), open(OUT, "wb"))
    """, tmp_path)
    fields, in_parent = got
    assert fields["root"] == "card" and in_parent


def test_plan_error_comes_back_from_the_worker(tmp_path):
    got = _python(FAKE_BUILD + """
    try:
        w.generate(name="bad", **args)
    except PlanError as e:
        pickle.dump((type(e).__name__, str(e)), open(OUT, "wb"))
    """, tmp_path)
    assert got == ("PlanError", "refused in the worker")


def test_stubs_raise_on_use_and_missing_packages_stay_missing(tmp_path):
    got = _python("""
        import json, pickle
        from peftplan import cardgen_worker as w
        w.PASS_THROUGH = {"xml.dom.minidom": frozenset({"disable"})}
        w.defer_imports(("xml", "json", "no_such_package_peftplan"))
        from xml.dom.minidom import parseString, Node, disable   # importing names works
        out = {"isinstance": isinstance(object(), Node), "decorator": disable(len) is len}
        try:
            parseString("<a/>")
        except w.DeferredUse as e:
            out["call"] = str(e)
        try:
            import no_such_package_peftplan
        except ModuleNotFoundError:
            out["missing"] = True
        out["json"] = json.dumps([1])  # imported before: never replaced
        out["touched"] = list(w.TOUCHED)
        pickle.dump(out, open(OUT, "wb"))
    """, tmp_path)
    assert got == {"isinstance": False, "decorator": True, "call": "xml.dom.minidom.parseString",
                   "missing": True, "json": "[1]", "touched": ["xml.dom.minidom.parseString"]}


def test_generate_in_a_process_with_transformers_builds_in_process():
    pytest.importorskip("transformers")
    import transformers.modeling_utils  # noqa: F401 -- the imports are paid already: no fork

    from peftplan import cardgen_worker

    with pytest.raises(PlanError, match="not known to transformers"):
        cardgen_worker.generate(config={"model_type": "no_such_type_peftplan"}, name="x", source="", sha256="")
