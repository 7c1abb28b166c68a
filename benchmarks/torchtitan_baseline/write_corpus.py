"""corpus/data.json for torchtitan's c4_test loader: JSON lines {"text": ...} of Python's bundled pydoc topics,
the text our `pydoc` dataset trains on (offline, no download)."""
import json
import os
import pydoc_data.topics

os.makedirs("corpus", exist_ok=True)
with open(os.path.join("corpus", "data.json"), "w") as f:
    for _ in range(4):  # enough documents that no row runs out in 30 steps
        for text in pydoc_data.topics.topics.values():
            f.write(json.dumps({"text": text}) + "\n")
