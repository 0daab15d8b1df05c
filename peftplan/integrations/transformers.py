"""`PeftplanCallback`: the plan of a user's own Trainer run, and the true peaks of that run beside it.

    trainer = SFTTrainer(..., callbacks=[PeftplanCallback(gpu="a100-80gb")])

At the first step it builds the plan from the live model (transformers' config, peft's LoraConfig, bitsandbytes
4-bit weights, the dtypes the parameters really have), the TrainingArguments (the same mapping as `--from`,
`peftplan.sources.trainer`) and the first micro-batch's shape, and prints the prediction. Each optimizer step it
records the step's peaks (`torch.cuda.max_memory_allocated/reserved`, reset at the step's start; NVML device
memory when available), its sequence length and its time, and warns as soon as a step exceeds the prediction by
more than `margin`. After the first optimizer step it measures, tensor by tensor, what every device can show:
frozen and trainable weights, gradients and optimizer states. At the end it writes one result in the
`profiles/measured/` schema (`peftplan.profile.store.Measurement`, `steps` holding the per-step peaks), which
`peftplan report --measured-dir` draws as measured points. Without CUDA (a CPU Trainer) it records what exists —
the components, times and shapes — and says that device peaks were not measured.

Callback events as transformers 5.24 calls them (trainer.py `_inner_training_loop`): `on_step_begin` before the
first micro-batch of an optimizer step, `on_optimizer_step` right after `optimizer.step()` (gradients still alive),
`on_step_end` after `model.zero_grad()`.
"""
from __future__ import annotations

import datetime as _dt
import platform
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from peftplan.errors import PlanError
from peftplan.plan import Plan

MiB = 2**20


# ---------------------------------------------------------------- the plan of a live model


def _unwrap(model):
    """The transformers model under peft's PeftModel / LoraModel wrappers."""
    inner = model
    for attr in ("base_model", "model"):
        nxt = getattr(inner, attr, None)
        if isinstance(nxt, torch.nn.Module) and hasattr(nxt, "config"):
            inner = nxt
    return inner


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dt, "fp32")


def _is_4bit(p: torch.Tensor) -> bool:
    return type(p).__name__ == "Params4bit" or getattr(p, "quant_state", None) is not None


def lora_config(model):
    """peft's active LoraConfig of a PeftModel, else None."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    cfg = configs.get(active if isinstance(active, str) else "default") or next(iter(configs.values()))
    return cfg if str(getattr(cfg, "peft_type", "")).upper().endswith("LORA") else None


def plan_fields_from_model(model) -> tuple[dict, list[str]]:
    """Plan fields the live model fixes: method, LoRA settings, dtypes, attention, checkpointing."""
    notes: list[str] = []
    inner = _unwrap(model)
    params = list(model.parameters())
    quantized = any(_is_4bit(p) for p in params)
    cfg = lora_config(model)
    frozen_float = [p for p in params if not p.requires_grad and not _is_4bit(p) and p.is_floating_point()]
    out: dict = {}
    if cfg is not None:
        out["method"] = "qlora" if quantized else "lora"
        out["r"], out["alpha"] = int(cfg.r), float(cfg.lora_alpha)
        out["dropout"] = float(cfg.lora_dropout or 0.0)
        t = cfg.target_modules
        out["targets"] = (t if t == "all-linear" else f"re:{t}") if isinstance(t, str) else ",".join(sorted(t))
        out["use_dora"] = bool(getattr(cfg, "use_dora", False))
        lora_a = [p for n, p in model.named_parameters() if "lora_A" in n]
        if lora_a:
            out["adapter_dtype"] = _dtype_name(lora_a[0].dtype)
        if getattr(cfg, "modules_to_save", None):
            notes.append(f"modules_to_save {list(cfg.modules_to_save)}: counted in the measured parameters, "
                         "not in the plan")
    elif all(p.requires_grad for p in params):
        out["method"] = "full"
    else:
        raise PlanError("the model trains some of its parameters without peft's LoRA: no plan for it")
    if quantized:
        qc = getattr(inner.config, "quantization_config", None)
        qd = qc.to_dict() if hasattr(qc, "to_dict") else (qc or {})
        compute = str(qd.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch.")
        out["dtype"] = {"bfloat16": "bf16", "float16": "fp16"}.get(compute, "fp32")
        out["double_quant"] = bool(qd.get("bnb_4bit_use_double_quant", False))
        # peft's prepare_model_for_kbit_training upcasts every non-quantized fp16/bf16 parameter to fp32
        out["kbit_prep"] = bool(frozen_float) and all(p.dtype == torch.float32 for p in frozen_float)
    else:
        source = frozen_float or params
        out["dtype"] = _dtype_name(source[0].dtype) if source else "fp32"
    attn = getattr(inner.config, "_attn_implementation", None) or "sdpa"
    out["attention"] = {"flash_attention_2": "flash", "flash_attention_3": "flash", "sdpa": "sdpa",
                        "eager": "eager"}.get(attn, "sdpa")
    if attn not in ("flash_attention_2", "flash_attention_3", "sdpa", "eager"):
        notes.append(f"attention implementation '{attn}' planned as sdpa")
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    flag = "is_activation_checkpointing" if hasattr(type(inner), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    out["grad_checkpointing"] = bool(getattr(inner, flag, False))
    return out, notes


def card_of(model):
    """The peftplan card of a live transformers model, from its config (never a download)."""
    from peftplan.planning.cards import card_from_hf_config

    inner = _unwrap(model)
    cfg = inner.config.to_dict()
    name = str(cfg.get("_name_or_path") or cfg.get("model_type") or "model") or "model"
    return card_from_hf_config(cfg, name=name, source="live model config")


def plan_for_run(model, args, batch_size: int, seq_len: int) -> tuple[Plan, list[str]]:
    """The Plan of this Trainer run: TrainingArguments (as `--from` reads them) under what the live model says."""
    from peftplan.sources.trainer import read_trainer

    d = {k: v for k, v in args.to_dict().items() if v is not None}
    if not d.get("fsdp"):
        d.pop("fsdp_config", None)  # the defaults TrainingArguments fills in even without FSDP
    src = read_trainer(d, Path("TrainingArguments"))
    fields = {**src.defaults, **src.fields}
    fields.pop("seq_len", None)
    model_fields, notes = plan_fields_from_model(model)
    fields.update(model_fields)
    fields.update(batch_size=batch_size, seq_len=seq_len)
    if fields.get("autocast", "none") != "none" and fields["dtype"] not in ("fp32", fields["autocast"]):
        fields["autocast"] = "none"  # e.g. bf16 autocast over fp16 weights: planned without autocast
        notes.append("autocast dtype differs from the weights' dtype: planned without autocast")
    notes += list(src.warnings)
    if src.unsupported:
        for k, reason in src.unsupported.items():
            fields.pop(k, None)
            notes.append(reason + ": planned with peftplan's default")
    known = {f for f in Plan.__dataclass_fields__}
    return Plan(**{k: v for k, v in fields.items() if k in known}), notes


# ---------------------------------------------------------------- what every device can show


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
    return sum(seen.values())


def measure_components(model, optimizer) -> dict[str, int]:
    """Bytes of frozen weights (4-bit weights with their quantization constants), trainable weights, gradients
    and optimizer states, each storage counted once. Call with gradients alive (after optimizer.step())."""
    from peftplan.measure.count import quant_state_tensors

    frozen, trainable, grads = [], [], []
    for p in model.parameters():
        (trainable if p.requires_grad else frozen).append(p)
        if p.grad is not None:
            grads.append(p.grad)
        state = getattr(p, "quant_state", None)
        if state is not None:
            frozen += quant_state_tensors(state)
    states = []
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        for st in inner.state.values():
            states += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return {"frozen_weights_bytes": _storage_bytes(frozen), "trainable_weights_bytes": _storage_bytes(trainable),
            "gradients_bytes": _storage_bytes(grads), "optimizer_states_bytes": _storage_bytes(states)}


# ---------------------------------------------------------------- the callback


class PeftplanCallback(TrainerCallback):
    """Plan the run at its first step, record every step's true peaks, write one result at the end.

    gpu: a `peftplan gpus` card name for time and fit (default: matched from the CUDA device's name);
    margin: warn when a step's measured peak exceeds the prediction by more than this fraction;
    output_dir: where the result file goes (default `<TrainingArguments.output_dir>/peftplan`);
    echo: where the prediction and warnings are printed (default `print`).
    """

    def __init__(self, gpu: str | None = None, margin: float = 0.05, output_dir: str | Path | None = None,
                 echo=print) -> None:
        if not (0 <= margin < 10):
            raise PlanError(f"margin must be a fraction in [0, 10), got {margin}")
        self.gpu, self.margin, self.output_dir, self.echo = gpu, margin, output_dir, echo
        self.shapes: list[tuple[int, int]] = []
        self.steps: list = []
        self.components: dict[str, int] | None = None
        self.estimate = None
        self.card = None
        self.plan: Plan | None = None
        self.notes: list[str] = []
        self.warned = False
        self._hook = None
        self._t0 = 0.0
        self._nvml = None
        self.path: Path | None = None

    # -- helpers
    def _cuda(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_initialized()

    def _nvml_used(self) -> int | None:
        if self._nvml is None:
            return None
        nvml, handle = self._nvml
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception:  # noqa: BLE001 - NVML gone mid-run: stop sampling, keep the run going
            self._nvml = None
            return None

    def _record_shape(self, module, args, kwargs) -> None:
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            self.shapes.append((int(x.shape[0]), int(x.shape[1])))

    # -- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._hook = model.register_forward_pre_hook(self._record_shape, with_kwargs=True)
        if torch.cuda.is_available():
            try:
                from peftplan.profile.nvml import device_handle, load_nvml

                nvml = load_nvml()
                self._nvml = (nvml, device_handle(nvml, torch.cuda.current_device()))
            except Exception as e:  # noqa: BLE001 - NVML is optional
                self.notes.append(f"no NVML: {e}")
        else:
            self.notes.append("no CUDA device: device peaks (allocated, reserved, NVML) not measured")

    def on_step_begin(self, args, state, control, **kwargs):
        self.shapes.clear()
        if self._cuda():
            torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.components is None and model is not None and state.global_step >= 0:
            self.components = measure_components(model, optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        seconds = time.perf_counter() - self._t0
        b, s = self.shapes[0] if self.shapes else (0, 0)
        alloc = reserved = None
        if self._cuda():
            torch.cuda.synchronize()
            alloc, reserved = int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
        from peftplan.profile.store import StepMeasure

        step = StepMeasure(step=int(state.global_step), batch_size=b, seq_len=s, seconds=seconds,
                           peak_allocated_bytes=alloc, peak_reserved_bytes=reserved, nvml_bytes=self._nvml_used())
        self.steps.append(step)
        if self.plan is None and model is not None and b:
            self._predict(model, args, b, s)
        self._check(step)

    def _predict(self, model, args, b: int, s: int) -> None:
        from peftplan.planning import estimate
        from peftplan.render import gib

        try:
            self.card = card_of(model)
            self.plan, notes = plan_for_run(model, args, b, s)
            self.notes += notes
            gpu = self.gpu or self._gpu_card()
            try:
                self.estimate = estimate(self.card, self.plan, gpu=gpu)
            except PlanError:
                self.estimate = estimate(self.card, self.plan)
        except PlanError as e:
            self.notes.append(f"no prediction: {e}")
            self.echo(f"peftplan: no prediction for this run: {e}")
            return
        e = self.estimate
        self.echo(f"peftplan: {e.model} · {e.plan.method} · b={b} s={s} · grad_accum={e.plan.grad_accum}: predicted "
                  f"peak {gib(e.peak.tensor_bytes)} allocated, {gib(e.peak.reserved_bytes)} reserved, "
                  f"{gib(e.peak_bytes)} device ({e.peak.phase})")
        for n in self.notes:
            self.echo(f"peftplan: note: {n}")

    def _gpu_card(self) -> str | None:
        if not torch.cuda.is_available():
            return None
        from peftplan.profile.run import match_gpu_card

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return match_gpu_card(props.name, int(props.total_memory))

    def _check(self, step) -> None:
        if self.estimate is None or step.peak_allocated_bytes is None or self.warned:
            return
        predicted = self.estimate.peak.tensor_bytes
        if step.peak_allocated_bytes > (1 + self.margin) * predicted:
            self.warned = True
            over = step.peak_allocated_bytes / predicted - 1
            self.echo(f"peftplan: warning: step {step.step} peaked at {step.peak_allocated_bytes / 2**30:.2f} GiB "
                      f"allocated, {over:.0%} over the prediction (s={step.seq_len}, b={step.batch_size})")

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.plan is None:
            self.echo("peftplan: no result written: no step was planned")
            return
        m = self.measurement(model)
        from peftplan.profile.store import save

        directory = Path(self.output_dir) if self.output_dir else Path(args.output_dir) / "peftplan"
        self.path = save(m, directory)
        self.echo(f"peftplan: wrote {self.path}")

    # -- the result
    def measurement(self, model):
        from peftplan.measure.count import count_model
        from peftplan.profile.run import _peftplan_version, _version
        from peftplan.profile.store import CompareRow, Environment, Measurement, Settings

        cuda = torch.cuda.is_available()
        props = torch.cuda.get_device_properties(torch.cuda.current_device()) if cuda else None
        env = Environment(
            gpu_name=props.name if props else "cpu", gpu_memory_bytes=int(props.total_memory) if props else 0,
            gpu_card=self._gpu_card(), compute_capability=f"{props.major}.{props.minor}" if props else "",
            driver_version="", cuda_version=torch.version.cuda or "", torch_version=torch.__version__,
            transformers_version=_version("transformers") or "", bitsandbytes_version=_version("bitsandbytes"),
            peft_version=_version("peft"), python_version=platform.python_version(),
            peftplan_version=_peftplan_version())
        rows = []
        est = self.estimate
        opt_phase = next((p for p in est.phases if p.phase == "optimizer"), None) if est else None

        def row(name: str, measured: int, predicted: int) -> None:
            rows.append(CompareRow(name=name, reference="estimate", measured_bytes=int(measured),
                                   predicted_bytes=int(predicted), error_bytes=int(predicted - measured),
                                   rel_error=(predicted - measured) / measured if measured else None))

        if self.components and opt_phase is not None:
            for k, v in self.components.items():
                row(k.removesuffix("_bytes"), v, getattr(opt_phase, k))
        measured_steps = [s for s in self.steps if s.peak_allocated_bytes is not None]
        if measured_steps and est is not None:
            row("peak.allocated", max(s.peak_allocated_bytes for s in measured_steps), est.peak.tensor_bytes)
            row("peak.reserved", max(s.peak_reserved_bytes for s in measured_steps), est.peak.reserved_bytes)
            nv = [s.nvml_bytes for s in measured_steps if s.nvml_bytes is not None]
            if nv:
                row("peak.device", max(nv), est.peak_bytes)
        counted = count_model(model) if model is not None else None
        warnings = list(self.notes)
        if counted is not None and est is not None and counted.trainable != est.params.trainable:
            warnings.append(f"trainable parameters: measured {counted.trainable:,}, planned {est.params.trainable:,}")
        from peftplan.profile.run import _plain

        return Measurement(
            model=est.model if est else "model", plan=self.plan, settings=Settings(
                steps=len(self.steps), warmup=0, nvml=self._nvml is not None, phase_sync=False, impl="user",
                tag="trainer-callback"),
            status="ok", environment=env, predicted=_plain(est.to_dict()) if est else None,
            comparison=tuple(rows), card=self.card.to_dict() if self.card else {}, warnings=tuple(warnings),
            steps=tuple(self.steps), seconds=sum(s.seconds for s in self.steps),
            created_utc=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
