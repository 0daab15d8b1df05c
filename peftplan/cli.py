"""The `peftplan` command line: parse options, call the API, render its typed results.

Every command turns a PlanError into one line on stderr and exit code 2. Data goes to stdout, warnings
to stderr. `--json` prints `Estimate.to_dict()` (versioned by `schema_version`).
"""
from __future__ import annotations

import json
import sys
from typing import Annotated, Optional

import typer

from peftplan.errors import PlanError
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
Attention = Annotated[str, typer.Option(help="sdpa | eager")]
DoubleQuant = Annotated[bool, typer.Option("--double-quant/--no-double-quant", help="QLoRA NF4 double quantization")]
KbitPrep = Annotated[bool, typer.Option("--kbit-prep/--no-kbit-prep", help="QLoRA: upcast non-4-bit weights to fp32")]
Gpu = Annotated[Optional[str], typer.Option(help="GPU card (see `peftplan gpus`) for fit, time and cost")]
Tokens = Annotated[float, typer.Option(help="tokens of data, for GPU-hours and cost")]
Json = Annotated[bool, typer.Option("--json", help="print one JSON object to stdout")]
Task = Annotated[Optional[str], typer.Option(help="config.json: causal-lm | masked-lm | seq2seq-lm | "
                                                  "image-text-to-text | classification (default: its Auto class)")]
TextOnly = Annotated[bool, typer.Option("--text-only", help="multimodal config.json: plan the text model alone")]


def fail(message: str) -> None:
    typer.echo(f"peftplan: error: {message}", err=True)
    raise typer.Exit(2)


def make_plan(method: str, r: int, alpha: float, dropout: float, targets: str | None, adapter_size: int,
              adapter_placement: str, top_k: int, batch_size: int, seq_len: int, dtype: str, optimizer: str,
              foreach: bool, grad_checkpointing: bool, attention: str, double_quant: bool, kbit_prep: bool) -> Plan:
    return Plan(method=method, r=r, alpha=alpha, dropout=dropout, targets=targets, adapter_size=adapter_size,
                adapter_placement=adapter_placement, top_k=top_k, batch_size=batch_size, seq_len=seq_len,
                dtype=dtype, optimizer=optimizer, foreach=foreach, grad_checkpointing=grad_checkpointing,
                attention=attention, double_quant=double_quant, kbit_prep=kbit_prep)


@app.command()
def estimate(
    model: Model = "opt-6.7b", method: Method = "lora", r: R = 16, alpha: Alpha = 16.0, dropout: Dropout = 0.0,
    targets: Targets = None, adapter_size: AdapterSize = 64, adapter_placement: Placement = "houlsby",
    top_k: TopK = 2, batch_size: Batch = 1, seq_len: Seq = 512, dtype: Dtype = "bf16", optimizer: Optim = "adamw",
    foreach: Foreach = True, grad_checkpointing: GradCkpt = False, attention: Attention = "sdpa",
    double_quant: DoubleQuant = True, kbit_prep: KbitPrep = True, gpu: Gpu = None, tokens: Tokens = 0,
    task: Task = None, text_only: TextOnly = False, json_out: Json = False,
) -> None:
    """Exact parameters, per-component peak memory, and time/cost of one fine-tuning plan."""
    from peftplan.planning import estimate as run

    try:
        plan = make_plan(method, r, alpha, dropout, targets, adapter_size, adapter_placement, top_k, batch_size,
                         seq_len, dtype, optimizer, foreach, grad_checkpointing, attention, double_quant, kbit_prep)
        if task or text_only:
            from peftplan.planning.cards import load_card

            model = load_card(model, task, text_only)
        est = run(model, plan, gpu=gpu, tokens=int(tokens))
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
    grad_checkpointing: GradCkpt = False, attention: Attention = "sdpa", gpu: Gpu = None, tokens: Tokens = 0,
    json_out: Json = False,
) -> None:
    """Full, top-k, adapter, LoRA and QLoRA side by side for one model and step shape."""
    from peftplan.planning import estimate as run

    try:
        results = [
            run(model, Plan(method=m, r=r, adapter_size=adapter_size, top_k=top_k, targets=targets,
                            batch_size=batch_size, seq_len=seq_len, dtype=dtype, optimizer=optimizer,
                            grad_checkpointing=grad_checkpointing, attention=attention), gpu=gpu, tokens=int(tokens))
            for m in ("full", "top", "adapter", "lora", "qlora")
        ]
    except PlanError as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps([e.to_dict() for e in results], indent=2))
        return
    from peftplan.render import render_compare

    render_compare(results)


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

    for mod in ("peftplan.trace.cli", "peftplan.profile.cli", "peftplan.report.cli"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("peftplan"):
                continue
            raise
        module.register(app)


CORE = {"estimate", "compare", "models", "gpus", "card"}


def main() -> None:
    # the planning commands start fast: the other commands' modules load only when one of them may run
    if not (len(sys.argv) > 1 and sys.argv[1] in CORE):
        _register_optional()
    try:
        app()
    except PlanError as e:  # a command that let one through
        typer.echo(f"peftplan: error: {e}", err=True)
        sys.exit(2)
