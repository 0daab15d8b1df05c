"""Re-import every shipped generated card from its config.json: `python benchmarks/import_cards.py [NAME ...]`.

The same as `peftplan card import tests/data/configs/NAME/config.json -o profiles/models/NAME.toml --name NAME
--source URL [--text-only]` for each entry of tests/data/configs/sources.json, in one process (torch and
transformers are imported once). Prints each card's total and active parameters and the import time.
"""
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from peftplan.cardgen import import_config  # noqa: E402
from peftplan.planning.cards import ModelCard, write_atomic  # noqa: E402
from peftplan.planning.params import active_params, total_params  # noqa: E402


def main(names: list[str]) -> None:
    sources = json.loads((ROOT / "tests/data/configs/sources.json").read_text())
    for name in names or sorted(sources):
        s = sources[name]
        t = time.perf_counter()
        fields, text = import_config(ROOT / "tests/data/configs" / name / "config.json", name=name, source=s["url"],
                                     text_only=s["text_only"], comment=f"published size: {s['published']}")
        write_atomic(ROOT / "profiles/models" / f"{name}.toml", text)
        card = ModelCard(**fields)
        print(f"{name:20s} {card.model_class:32s} total {total_params(card):>15,}  active {active_params(card):>15,}"
              f"  ({s['published']})  {time.perf_counter() - t:.2f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
