"""Build what the examples train on, offline: tiny models saved with ``save_pretrained``
and small real data sets (sklearn's handwritten digits as captioned images, arithmetic as
prompt/response text).

Run once before the examples (about 10 s):

    python examples/make_assets.py            # writes examples/assets/

The examples' recipes then point at ``examples/assets/...``: a real job would point at a hub
id or a local copy of a real model instead.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def captioned_digits(folder: Path, count: int = 48, seed: int = 0) -> Path:
    """An imagefolder of digit images at three aspect ratios, captions in ``metadata.jsonl``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(32, 32), (48, 32), (32, 48)]  # (width, height): square, wide, tall
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index in range(count):
            pick = rng.randrange(len(digits.images))
            glyph = (digits.images[pick] / 16.0 * 255).astype(np.uint8)
            tile = Image.fromarray(255 - glyph).resize((32, 32), Image.NEAREST).convert("RGB")
            width, height = shapes[index % len(shapes)]
            canvas = Image.new("RGB", (width, height), "white")
            canvas.paste(tile, ((width - 32) // 2, (height - 32) // 2))
            name = f"{index:03d}.png"
            canvas.save(folder / name)
            caption = f"a handwritten digit {DIGIT_WORDS[digits.target[pick]]}, black ink, white paper"
            metadata.write(json.dumps({"file_name": name, "text": caption}) + "\n")
    return folder


def arithmetic_sft(path: Path, count: int = 200, seed: int = 0) -> Path:
    """Prompt/response pairs as JSON lines: ``{"prompt": "12+7=", "response": "19"}``."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for _ in range(count):
            a, b = rng.randrange(20), rng.randrange(20)
            out.write(json.dumps({"prompt": f"{a}+{b}=", "response": f"{a + b}\n"}) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "assets"), help="where to write (default: examples/assets)")
    args = parser.parse_args(argv)
    from hookengine.testing import save_tiny_causal_lm, save_tiny_sd_pipeline

    out = Path(args.out)
    save_tiny_sd_pipeline(out / "tiny-sd")
    save_tiny_causal_lm(out / "tiny-llama", architecture="llama")
    captioned_digits(out / "captioned-digits")
    arithmetic_sft(out / "arithmetic.jsonl")
    print(f"examples: assets written to {out}")


if __name__ == "__main__":
    main()
