"""The `peftplan` command line: parse options, call the API, render its typed results.

One error renderer (`main` -> `run_app`): a PlanError, a click/typer usage error (wrong type, unknown option,
missing value, unknown command), an unreadable input or an unwritable stdout all end as one line
`peftplan: error: ...` on stderr and exit code 2, for every command. Data goes to stdout, warnings to
stderr. `--json` prints `Estimate.to_dict()` (versioned by `schema_version`). On a terminal whose encoding
is not UTF-8 the output falls back to ASCII (`ascii_fallback`).
"""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from peftplan.errors import PlanError
from peftplan.terminal import ascii_fallback, error_line, silence_stdout, wide_when_piped
from peftplan.plan import Plan

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Plan, trace and profile the memory and cost of fine-tuning LLMs.")

Model = Annotated[str, typer.Option("--model", "-m", help="card name (see `peftplan models`), config.json or folder")]
Method = Annotated[str, typer.Option(help="full | top | adapter | lora | qlora")]
R = Annotated[int, typer.Option("--r", help="LoRA rank r")]
Alpha = Annotated[float, typer.Option(help="LoRA α (scaling α/r)")]
Dropout = Annotated[float, typer.Option(help="LoRA dropout")]
Targets = Annotated[Optional[str], typer.Option(help="LoRA targets: names (a,b), 'all-linear' or 're:REGEX'")]
AdapterSize = Annotated[int, typer.Option(help="Houlsby adapter bottleneck m")]
Placement = Annotated[str, typer.Option("--adapter-placement", help="houlsby (2 per block) | ffn (1 per block)")]
TopK = Annotated[int, typer.Option(help="top: train the top k blocks")]
Batch = Annotated[int, typer.Option("--batch-size", "-b", help="micro-batch size b")]
Seq = Annotated[int, typer.Option("--seq-len", "-s", help="sequence length s")]
Dtype = Annotated[str, typer.Option(help="bf16 | fp16 | fp32")]
Optim = Annotated[str, typer.Option(help="adamw | adamw8bit | paged-adamw | paged-adamw8bit | sgd | sgd-momentum")]
Foreach = Annotated[bool, typer.Option("--foreach/--no-foreach", help="multi-tensor optimizer step (CUDA default)")]
GradCkpt = Annotated[bool, typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="recompute blocks")]
Attention = Annotated[str, typer.Option(help="sdpa | eager | flash (flash_attention_2)")]
AdapterDtype = Annotated[str, typer.Option(help="LoRA A/B dtype: fp32 (peft's default upcast) | bf16 | fp16")]
Dora = Annotated[bool, typer.Option("--dora/--no-dora", help="DoRA (peft use_dora)")]
Autocast = Annotated[str, typer.Option(help="none | bf16 | fp16: the Trainer's bf16=True / fp16=True")]
GradAccum = Annotated[int, typer.Option("--grad-accum", help="gradient_accumulation_steps")]
MaxGradNorm = Annotated[float, typer.Option(help="clip_grad_norm_ before the step (Trainer default 1.0; 0 = off)")]
Reentrant = Annotated[bool, typer.Option("--use-reentrant/--no-use-reentrant", help="reentrant checkpointing")]
MoeRouting = Annotated[str, typer.Option(help="mixture of experts: balanced (t·k/E tokens per expert) | worst "
                                              "(every token to the same k experts)")]
ShiftCopy = Annotated[bool, typer.Option("--logits-shift-copy/--no-logits-shift-copy",
                                         help="transformers <= 4.48's loss: a contiguous fp32 copy of the shifted logits")]
DoubleQuant = Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="QLoRA NF4 double quantization")]
KbitPrep = Annotated[bool, typer.Option("--kbit-prep/--no-kbit-prep", help="QLoRA: upcast non-4-bit weights to fp32")]
Gpu = Annotated[Optional[str], typer.Option(help="GPU card (see `peftplan gpus`) for fit, time and cost")]
Tokens = Annotated[float, typer.Option(help="tokens of data, for GPU-hours and cost")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object to stdout")]
From = Annotated[Optional[list[str]], typer.Option(
    "--from", help="training config(s) to plan from: peft adapter_config.json, BitsAndBytesConfig, Trainer/TRL "
                   "arguments, axolotl or LLaMA-Factory YAML (repeatable; flags override files)")]
Gpus = Annotated[int, typer.Option("--gpus", help="GPUs in all (world size W); per-GPU memory is shown")]
Nodes = Annotated[int, typer.Option(help="nodes (must divide --gpus)")]
Strategy = Annotated[str, typer.Option(help="none (DDP past one GPU) | ddp | zero1 | zero2 | zero3 | fsdp | "
                                            "fsdp-grad-op | fsdp-hybrid")]
Offload = Annotated[str, typer.Option(help="none | optimizer | optimizer+params (ZeRO / FSDP CPU offload)")]
ReduceBucket = Annotated[int, typer.Option(help="DeepSpeed reduce_bucket_size (elements)")]
Prefetch = Annotated[int, typer.Option("--stage3-prefetch-bucket-size", help="DeepSpeed ZeRO-3 prefetch (elements)")]
MaxLive = Annotated[int, typer.Option("--stage3-max-live-parameters", help="DeepSpeed ZeRO-3 live parameters cap")]
Yes = Annotated[bool, typer.Option("--yes", help="run work past the documented size bound (see README)")]
Task = Annotated[Optional[str], typer.Option(help="config.json: causal-lm | masked-lm | seq2seq-lm | "
                                                  "image-text-to-text | classification (default: its Auto class)")]
TextOnly = Annotated[bool, typer.Option("--text-only", help="multimodal config.json: plan the text model alone")]


def fail(message: str) -> None:
    typer.echo(error_line(message), err=True)
    raise typer.Exit(2)


def explicit_params() -> set[str]:
    """Names of the current command's parameters given on the command line (not left at their defaults)."""
    # typer ships its own copy of click (typer._click) from 0.2x on; fall back to click for older ones
    try:
        from typer._click.globals import get_current_context
        from typer._click.core import ParameterSource
    except ImportError:  # pragma: no cover - typer < 0.2x
        from click import get_current_context
        from click.core import ParameterSource

    ctx = get_current_context(silent=True)
    if ctx is None:
        return set()
    renamed = {"dora": "use_dora"}  # the flag is peft's word; the Plan field is peft's LoraConfig name
    return {renamed.get(name, name) for name in ctx.params
            if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}


def with_files(files: list[str] | None, plan: Plan, model: str | None) -> tuple[str | None, Plan]:
    """`plan` and `model` with the `--from` files applied under the explicit flags; warnings to stderr.

    Raises PlanError (one line) for unreadable, malformed or contradictory files."""
    if not files:
        return model, plan
    from peftplan.sources import plan_from_files

    explicit = explicit_params()
    chosen, plan, warnings = plan_from_files(files, plan, explicit, model if "model" in explicit else None)
    for w in warnings:
        typer.echo(f"peftplan: warning: {w}", err=True)
    return (chosen if chosen is not None else model), plan


def make_plan(method: str, r: int, alpha: float, dropout: float, targets: str | None, adapter_size: int,
              adapter_placement: str, top_k: int, batch_size: int, seq_len: int, dtype: str, optimizer: str,
              foreach: bool, grad_checkpointing: bool, attention: str, double_quant: bool, kbit_prep: bool,
              **stack) -> Plan:
    """`stack`: the peft/Trainer options (adapter_dtype, use_dora, autocast, grad_accum, max_grad_norm,
    use_reentrant), Plan's field names."""
    return Plan(method=method, r=r, alpha=alpha, dropout=dropout, targets=targets, adapter_size=adapter_size,
                adapter_placement=adapter_placement, top_k=top_k, batch_size=batch_size, seq_len=seq_len,
                dtype=dtype, optimizer=optimizer, foreach=foreach, grad_checkpointing=grad_checkpointing,
                attention=attention, double_quant=double_quant, kbit_prep=kbit_prep, **stack)


@app.command()
def estimate(
    model: Model = "opt-6.7b", method: Method = "lora", r: R = 16, alpha: Alpha = 16.0, dropout: Dropout = 0.0,
    targets: Targets = None, adapter_size: AdapterSize = 64, adapter_placement: Placement = "houlsby",
    top_k: TopK = 2, batch_size: Batch = 1, seq_len: Seq = 512, dtype: Dtype = "bf16", optimizer: Optim = "adamw",
    foreach: Foreach = True, grad_checkpointing: GradCkpt = False, attention: Attention = "sdpa",
    double_quant: DoubleQuant = True, kbit_prep: KbitPrep = True, adapter_dtype: AdapterDtype = "fp32",
    dora: Dora = False, autocast: Autocast = "none", grad_accum: GradAccum = 1, max_grad_norm: MaxGradNorm = 1.0,
    use_reentrant: Reentrant = False, logits_shift_copy: ShiftCopy = False, gpu: Gpu = None, tokens: Tokens = 0,
    json_out: Json = False, from_files: From = None, moe_routing: MoeRouting = "balanced",
    gpus: Gpus = 1, nodes: Nodes = 1, strategy: Strategy = "none", offload: Offload = "none",
    reduce_bucket_size: ReduceBucket = 500_000_000, stage3_prefetch_bucket_size: Prefetch = 50_000_000,
    stage3_max_live_parameters: MaxLive = 1_000_000_000,
    task: Task = None, text_only: TextOnly = False,
) -> None:
    """Exact parameters, per-component peak memory, and time/cost of one fine-tuning plan."""
    from peftplan.planning import estimate as run

    try:
        plan = make_plan(method, r, alpha, dropout, targets, adapter_size, adapter_placement, top_k, batch_size,
                         seq_len, dtype, optimizer, foreach, grad_checkpointing, attention, double_quant, kbit_prep,
                         adapter_dtype=adapter_dtype, use_dora=dora, autocast=autocast, grad_accum=grad_accum,
                         max_grad_norm=max_grad_norm, use_reentrant=use_reentrant, moe_routing=moe_routing,
                         logits_shift_copy=logits_shift_copy)
        plan = plan.with_(gpus=gpus, nodes=nodes, strategy=strategy, offload=offload,
                          reduce_bucket_size=reduce_bucket_size, stage3_prefetch_bucket_size=stage3_prefetch_bucket_size,
                          stage3_max_live_parameters=stage3_max_live_parameters)
        model, plan = with_files(from_files, plan, model)
        if task or text_only:
            from peftplan.planning.cards import load_card

            model = load_card(model, task, text_only)
        est = run(model, plan, gpu=gpu, tokens=tokens)
    except PlanError as e:
        fail(str(e))
    for w in est.warnings:
        typer.echo(f"peftplan: warning: {w}", err=True)
    if json_out:
        typer.echo(json.dumps(est.to_dict(), indent=2))
        return
    from peftplan.render import render_estimate

    render_estimate(est)


@app.command()
def compare(
    model: Model = "opt-6.7b", r: R = 16, adapter_size: AdapterSize = 64, top_k: TopK = 2, targets: Targets = None,
    batch_size: Batch = 1, seq_len: Seq = 512, dtype: Dtype = "bf16", optimizer: Optim = "adamw",
    grad_checkpointing: GradCkpt = False, attention: Attention = "sdpa", adapter_dtype: AdapterDtype = "fp32",
    autocast: Autocast = "none", grad_accum: GradAccum = 1, max_grad_norm: MaxGradNorm = 1.0,
    use_reentrant: Reentrant = False, gpu: Gpu = None, tokens: Tokens = 0, json_out: Json = False,
    from_files: From = None,
) -> None:
    """Full, top-k, adapter, LoRA and QLoRA side by side for one model and step shape."""
    from peftplan.planning import estimate as run

    try:
        base = Plan(r=r, adapter_size=adapter_size, top_k=top_k, targets=targets, batch_size=batch_size,
                    seq_len=seq_len, dtype=dtype, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                    attention=attention, adapter_dtype=adapter_dtype, autocast=autocast, grad_accum=grad_accum,
                    max_grad_norm=max_grad_norm, use_reentrant=use_reentrant)
        model, base = with_files(from_files, base, model)  # every method is compared: the files' method is not used
        results = [run(model, base.with_(method=m), gpu=gpu, tokens=tokens)
                   for m in ("full", "top", "adapter", "lora", "qlora")]
    except PlanError as e:
        fail(str(e))
    seen: dict[str, list[str]] = {}  # each warning once, with the methods it concerns
    for est in results:
        for w in est.warnings:
            if not w.startswith("options this plan does not use"):  # compare sets every method's options
                seen.setdefault(w, []).append(est.plan.method)
    for w, methods in seen.items():
        typer.echo(f"peftplan: warning: {'/'.join(methods)}: {w}" if len(methods) < len(results)
                   else f"peftplan: warning: {w}", err=True)
    if json_out:
        typer.echo(json.dumps([e.to_dict() for e in results], indent=2))
        return
    from peftplan.render import render_compare

    render_compare(results)


@app.command()
def advise(
    model: Model = "llama-3.1-8b", method: Method = "qlora", gpu: Annotated[str, typer.Option(help="GPU card")] = "rtx4090",
    global_batch: Annotated[int, typer.Option(help="target sequences per optimizer step (b·N)")] = 0,
    global_tokens: Annotated[float, typer.Option(help="target tokens per optimizer step (instead of sequences)")] = 0,
    seq_len: Seq = 2048, headroom: Annotated[float, typer.Option(help="memory kept free, fraction")] = 0.10,
    optimizers: Annotated[str, typer.Option(help="optimizers allowed, comma-separated")] = "adamw,adamw8bit,paged-adamw8bit",
    attentions: Annotated[str, typer.Option(help="attention kernels allowed, comma-separated")] = "flash,sdpa",
    r: R = 16, alpha: Alpha = 16.0, targets: Targets = None, dtype: Dtype = "bf16", autocast: Autocast = "bf16",
    top: Annotated[int, typer.Option(help="rows of the ranked table to show")] = 10,
    json_out: Json = False, from_files: From = None,
) -> None:
    """Micro-batch × accumulation × checkpointing × optimizer × attention that fit a GPU with headroom, fastest first."""
    from peftplan.planning.advise import advise as run, axolotl_keys, training_arguments

    try:
        if global_batch and global_tokens:
            raise PlanError("give --global-batch (sequences) or --global-tokens, not both")
        if global_tokens:
            if not (global_tokens == global_tokens and 0 < global_tokens < 1e15):
                raise PlanError(f"--global-tokens must be a positive number, got {global_tokens:g}")
            global_batch = max(1, round(global_tokens / seq_len))
        if not global_batch:
            raise PlanError("give the target global batch: --global-batch SEQUENCES or --global-tokens TOKENS")
        base = Plan(method=method, r=r, alpha=alpha, targets=targets, seq_len=seq_len, dtype=dtype, autocast=autocast)
        model, base = with_files(from_files, base, model)
        adv = run(model, base, gpu, global_batch, headroom=headroom,
                  optimizers=[x.strip() for x in optimizers.split(",") if x.strip()],
                  attentions=[x.strip() for x in attentions.split(",") if x.strip()])
    except PlanError as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps(adv.to_dict(), indent=2))
        return
    from peftplan.render import render_advice

    render_advice(adv, top)
    if adv.best is None:
        raise typer.Exit(1)
    typer.echo("\n" + training_arguments(adv.best) + "\n\n# axolotl\n" + axolotl_keys(adv.best))


@app.command()
def models(json_out: Json = False) -> None:
    """The shipped model cards."""
    from peftplan.planning.cards import registry
    from peftplan.planning.params import active_params, total_params

    cards = registry()
    if json_out:
        drop = ("config", "tree")  # the module tree stays in the card file
        typer.echo(json.dumps([{k: v for k, v in c.to_dict().items() if k not in drop}
                               | {"family": c.family, "params": total_params(c), "active_params": active_params(c)}
                               for c in cards.values()], indent=2))
        return
    from peftplan.render import render_models

    render_models(list(cards.values()))


card_app = typer.Typer(no_args_is_help=True, help="Model cards from transformers config.json files.")
app.add_typer(card_app, name="card")


@card_app.command("import")
def card_import(
    config: Annotated[str, typer.Argument(help="config.json or a folder holding one")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="card file to write (default: cache)")] = None,
    name: Annotated[Optional[str], typer.Option(help="card name (default: the config's folder)")] = None,
    source: Annotated[Optional[str], typer.Option(help="where the config comes from (its URL)")] = None,
    comment: Annotated[str, typer.Option(help="a comment line for the card's head")] = "",
    task: Task = None, text_only: TextOnly = False,
) -> None:
    """Build the config's model on the meta device and write its generated card (TOML)."""
    from pathlib import Path

    from peftplan.planning.cards import card_from_config_path, write_atomic

    try:
        if output is None:
            card = card_from_config_path(Path(config), task, text_only)
            typer.echo(f"{card.name}: cached generated card ({card.model_class}, {card.n_layers} blocks)")
            return
        from peftplan.cardgen import import_config

        fields, text = import_config(config, name, source, task, text_only, comment)
        write_atomic(Path(output), text)
    except PlanError as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write '{output}': {e.strerror or e}")
    typer.echo(f"wrote {output} ({fields['model_class']}, {fields['n_layers']} blocks)")


@app.command()
def gpus(json_out: Json = False) -> None:
    """The shipped GPU cards."""
    from dataclasses import asdict

    from peftplan.planning.gpus import gpu_registry

    cards = gpu_registry()
    if json_out:
        typer.echo(json.dumps([asdict(g) for g in cards.values()], indent=2))
        return
    from peftplan.render import render_gpus

    render_gpus(list(cards.values()))


def _register_optional() -> None:
    """Commands whose modules live in sub-packages (each adds itself with `register(app)`)."""
    import importlib

    for mod in ("peftplan.trace.cli", "peftplan.profile.cli", "peftplan.report.cli", "peftplan.rank.cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("peftplan"):
                continue
            raise
        module.register(app)


CORE = {"estimate", "compare", "advise", "models", "gpus", "card"}

def run_app(args: list[str]) -> int:
    """Run one command line; return its exit code. Every refusal is one line on stderr and code 2."""
    try:
        try:
            rv = app(args=args, prog_name="peftplan", standalone_mode=False)
            code = rv if isinstance(rv, int) else 0
        except typer.TyperException as e:  # typer's click: usage errors (wrong type, unknown option, ...)
            if type(e).__name__ == "NoArgsIsHelpError":  # `peftplan` alone: the help, on stdout
                typer.echo(e.ctx.get_help())
                code = 0
            else:
                typer.echo(error_line(e.format_message()), err=True)
                code = 2
        except (typer.Abort, KeyboardInterrupt):
            code = 130
        except PlanError as e:  # a command that let one through
            typer.echo(error_line(str(e)), err=True)
            code = 2
        sys.stdout.flush()
        return code
    except OSError as e:  # stdout full, closed, or a device that refuses writes
        silence_stdout()
        try:
            typer.echo(error_line(f"cannot write the output: {e.strerror or e}"), err=True)
        except OSError:
            pass
        return 2


def main(argv: list[str] | None = None) -> None:
    """The `peftplan` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    ascii_fallback()
    wide_when_piped()
    # the planning commands start fast: the other commands' modules load only when one of them may run
    if not (args and args[0] in CORE):
        _register_optional()
    sys.exit(run_app(args))
