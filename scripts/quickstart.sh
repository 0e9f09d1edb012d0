#!/usr/bin/env bash
# The main job on a fresh machine: install, build moon3.engine from the committed weights
# (export -> INT8 with fidelity gates against the FP32 teacher), then embed the shipped sample
# products with the torch-free runtime, print the nearest products of a few queries, and let the
# engine's reasoner describe one sample product from its photo.
# Extra arguments go to `moon3 search` (e.g. --query "Women Red Heels").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
newest=sdk/train/weights/embedder.safetensors
for w in sdk/train/weights/reasoner/reasoner.safetensors sdk/train/weights/attribute_heads/heads.safetensors; do
  if [ -f "$w" ] && [ "$w" -nt "$newest" ]; then newest=$w; fi
done
if [ ! moon3.engine -nt "$newest" ]; then
  .venv/bin/moon3 build --out moon3.engine --precision int8
fi
.venv/bin/moon3 inspect moon3.engine
if [ "$#" -eq 0 ]; then
  set -- --query "Men Black Analog Watch" --query "Women Black Handbag" --query "Men Blue Jeans" \
         --query "Boys White T-shirt" --query "Men Sports Shoes" \
         --image data/samples/images/2040.jpg --image data/samples/images/6490.jpg
fi
.venv/bin/moon3 search moon3.engine --catalog data/samples "$@"
if .venv/bin/python -c "import json,sys; from sdk.engine import EngineFile; sys.exit('reasoner' not in EngineFile.read('moon3.engine').manifest)"; then
  echo "reasoner on data/samples/images/2040.jpg (photo only; the product is $(grep -m1 '"id": 2040' data/samples/items.jsonl | .venv/bin/python -c 'import json,sys; print(json.loads(sys.stdin.read())["title"])')):"
  .venv/bin/moon3 reason moon3.engine --image data/samples/images/2040.jpg --key colour
fi
