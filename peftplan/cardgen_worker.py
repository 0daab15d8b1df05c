"""The first card of a new config.json, built in a forked worker that skips what a meta build never runs.

    generate(config, name, source, sha256, task, text_only)   the fields of `cardgen.generate`, faster

Why (issue 11: a first `estimate` of a new config.json within 5 s). Nearly all of that call is importing.
Measured with `python -X importtime` and CPU clocks (torch 2.13, transformers 5.24, Python 3.11, 2 cores),
the meta build and the card itself take 0.1 s; the imports of one modeling module take ~4 s CPU, of which
  - the cyclic garbage collector, run again and again while ~3,000 modules create their objects: 0.6–0.8 s;
  - `torch._dynamo` (0.3 s beyond what torch.distributed.tensor shares with it; 0.9 s alone, torch.onnx
    included): transformers.masking_utils imports one name from it, classes use `torch.compiler.disable`,
    `torch._dynamo.assume_constant_result` and `allow_in_graph` as decorators;
  - `scipy.optimize` (0.25 s): transformers.loss.loss_for_object_detection imports `linear_sum_assignment`
    whenever scipy is installed;
  - `accelerate` (0.1 s, boto3 with it): transformers.integrations.accelerate imports names from it;
  - and, at exit, the interpreter's finalization of all those modules: 0.8 s.
Neither library has a switch to skip these (transformers.utils.import_utils decides by package availability
alone; no environment variable of torch or transformers gates torch._dynamo), and torch.distributed.tensor
cannot be skipped: transformers.distributed.tensor_parallel creates `Replicate()` objects at import.

How. On POSIX, `os.fork()`; the child turns the garbage collector off (it exits after one build, by
`os._exit`, so nothing is finalized; the parent never imports torch and exits at once too), installs
an import finder that serves DEFERRED packages (only those installed) as stubs, builds the card with
`cardgen.generate` and sends the fields (or its PlanError) back through a pipe. In a stub, every name is a
placeholder class: calling it, reading its attributes or instantiating a subclass raises `DeferredUse`, a
BaseException (so no `except Exception` in library code can hide it), and `isinstance(x, placeholder)` is
False, which is the truth in a process that never imported the real class. The three torch._dynamo
decorators in PASS_THROUGH return the function undecorated: they only tell torch.compile what to do, and the
worker neither compiles nor runs a forward pass. If anything touches a placeholder, or the child fails in any
other way, the parent builds in-process, the ordinary way. Either way the card is what transformers' own
class on the meta device gives (tests/test_cardgen_worker.py builds every family both ways and compares).
The stubs never reach the parent: a later trace in the same process imports the real modules.
"""
from __future__ import annotations

import gc
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pickle
import sys
import threading
import types

DEFERRED = ("torch._dynamo", "scipy", "accelerate")
PASS_THROUGH = {"torch._dynamo": frozenset({"disable", "assume_constant_result", "allow_in_graph"})}
# A parent that imported torch is past the point where a worker saves anything (and may hold torch's native
# thread pools, which a fork does not carry safely): it builds in-process.
_ALREADY = ("torch", "transformers.modeling_utils")
SWITCH = "PEFTPLAN_CARD_WORKER"  # "0": always build in-process (the benchmark's baseline)


class DeferredUse(BaseException):
    """A placeholder of a deferred module was used: the build needs the real module (the parent retries)."""

    def __init__(self, what: str):
        super().__init__(what)
        TOUCHED.append(what)  # kept even where library code swallows the exception


TOUCHED: list[str] = []  # placeholders used in this process (the worker delivers nothing if any)


class _Placeholder(type):
    """Metaclass of the stand-ins for names read from a deferred module."""

    def __call__(cls, *args, **kwargs):
        raise DeferredUse(cls.__qualname__)

    def __getattr__(cls, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise DeferredUse(f"{cls.__qualname__}.{name}")

    def __instancecheck__(cls, obj) -> bool:
        return False

    def __subclasscheck__(cls, sub) -> bool:
        return sub is cls


def _undecorated(fn=None, *args, **kwargs):
    """A torch._dynamo decorator in eager code that is never compiled: the function itself."""
    return fn if callable(fn) else (lambda f: f)


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = (_undecorated if name in PASS_THROUGH.get(self.__name__, ())
                 else _Placeholder(name, (), {"__qualname__": f"{self.__name__}.{name}", "__module__": self.__name__}))
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module) -> None:
        module.__path__ = []  # a package, so `import root.sub` is served a stub too


class DeferringFinder(importlib.abc.MetaPathFinder):
    """Serves stubs for `roots` and their submodules (first on sys.meta_path)."""

    def __init__(self, roots: tuple[str, ...]):
        self.roots = roots

    def find_spec(self, name, path=None, target=None):
        if any(name == r or name.startswith(r + ".") for r in self.roots):
            return importlib.machinery.ModuleSpec(name, _StubLoader(), is_package=True)
        return None


def defer_imports(roots: tuple[str, ...] | None = None) -> DeferringFinder:
    """Install the stubs for those of `roots` (default DEFERRED) that are installed and not yet imported (a
    package that is not installed must keep failing to import). Irreversible: for a process that exits after
    one build."""
    present = tuple(r for r in (DEFERRED if roots is None else roots) if r not in sys.modules and importlib.util.find_spec(r) is not None)
    finder = DeferringFinder(present)
    sys.meta_path.insert(0, finder)
    return finder


def _worker(write_fd: int, kwargs: dict) -> None:
    """The child: no cyclic GC, stubs, one build; ('ok', fields) or ('error', PlanError) down the pipe."""
    from peftplan.cardgen import generate as build
    from peftplan.errors import PlanError

    gc.disable()
    defer_imports()
    try:
        result = ("ok", build(**kwargs))
    except PlanError as e:
        result = ("error", e)
    if TOUCHED:
        raise DeferredUse(f"used: {', '.join(TOUCHED)}")
    with os.fdopen(write_fd, "wb") as out:
        pickle.dump(result, out, protocol=pickle.HIGHEST_PROTOCOL)


def _in_worker(kwargs: dict):
    """(status, payload) from a forked worker, or None when it did not deliver (the caller builds itself)."""
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child; coverage does not follow forks
        code = 1  # DeferredUse, anything raised: exit 1 at once (no traceback), the parent builds in-process
        try:
            os.close(read_fd)
            _worker(write_fd, kwargs)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not data:
        return None
    try:
        return pickle.loads(data)
    except Exception:  # noqa: BLE001 -- a truncated result: build in-process
        return None


def generate(config: dict, name: str, source: str, sha256: str, task: str | None = None,
             text_only: bool = False) -> dict:
    """Card fields for a config.json dict, exactly `peftplan.cardgen.generate`'s (same arguments, same
    PlanError), built in a forked worker where the process has not imported transformers' models yet, the
    platform can fork and the process runs one thread (forking a threaded process is unsafe); else
    in-process with the garbage collector paused during the build (also where PEFTPLAN_CARD_WORKER=0)."""
    kwargs = dict(config=config, name=name, source=source, sha256=sha256, task=task, text_only=text_only)
    if (hasattr(os, "fork") and os.environ.get(SWITCH, "1") != "0" and threading.active_count() == 1
            and not any(m in sys.modules for m in _ALREADY)):
        got = _in_worker(kwargs)
        if got is not None:
            status, payload = got
            if status == "error":
                raise payload
            return payload
    from peftplan.cardgen import generate as build

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return build(**kwargs)
    finally:
        if was_enabled:
            gc.enable()


__all__ = ["DEFERRED", "PASS_THROUGH", "DeferredUse", "defer_imports", "generate"]
