#!/usr/bin/env bash
# Re-import every shipped generated card from its config.json (tests/data/configs/NAME/config.json).
# Usage: benchmarks/import_cards.sh [NAME...]   (needs torch + transformers; writes profiles/models/NAME.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
names=("$@")
[ ${#names[@]} -eq 0 ] && names=($(python -c "import json; print(' '.join(json.load(open('tests/data/configs/sources.json'))))"))
for n in "${names[@]}"; do
  read -r url text published < <(python -c "
import json; s = json.load(open('tests/data/configs/sources.json'))['$n']
print(s['url'], '--text-only' if s['text_only'] else '-', s['published'])")
  args=(card import "tests/data/configs/$n/config.json" -o "profiles/models/$n.toml" --name "$n" --source "$url"
        --comment "published size: $published")
  [ "$text" != "-" ] && args+=("$text")
  python -m peftplan "${args[@]}"
done
