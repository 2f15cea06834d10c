"""The diffusion demo's data and plugins: sklearn digits composed at several aspect ratios.

Each 8x8 digit is upscaled to a ``tile`` and laid out once (square), twice side by side
(wide) or twice stacked (tall), so a data set of real handwriting has three aspect
ratios and bucketing matters. A LoRA phase then learns a new *style* (colour), applied
to the batches by a ``transform_batch`` hook while that phase runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from ..core.plugins import model_factory

__all__ = ["scenes", "StyleShift", "DigitsVal", "SampleTensors", "LAYOUTS", "classify_samples"]

# (columns, rows) of digit tiles: square, wide, tall.
LAYOUTS = ((1, 1), (2, 1), (1, 2))


def _split_indices(count: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    import numpy as np

    order = np.random.default_rng(seed).permutation(count)
    cut = int(round(count * val_fraction))
    return sorted(order[cut:].tolist()), sorted(order[:cut].tolist())


def scenes(split: str = "train", tile: int = 16, val_fraction: float = 0.1, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Yield ``{"image", "label", "width", "height"}`` samples (a ``Dataset.from_generator`` source).

    Sizes are columns too, so bucketing never decodes an image to size it.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    train, val = _split_indices(len(digits.images), val_fraction, seed)
    for index in train if split == "train" else val:
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        glyph = Image.fromarray(pixels, mode="L").resize((tile, tile), Image.Resampling.BICUBIC)
        columns, rows = LAYOUTS[index % len(LAYOUTS)]
        canvas = Image.new("L", (tile * columns, tile * rows))
        for c in range(columns):
            for r in range(rows):
                canvas.paste(glyph, (c * tile, r * tile))
        yield {"image": canvas, "label": int(digits.target[index]), "width": canvas.width, "height": canvas.height}



@model_factory
def digits_unet(
    sample_size: int = 8,
    channels: int = 1,
    num_classes: int | None = 10,
    width: int = 32,
) -> Any:
    """A small class-conditional ``UNet2DModel`` for 8x8 images (the digits demo)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(width, 2 * width),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=num_classes,
    )


class StyleShift:
    """Recolour batches during one phase: white-on-black digits become ``ink`` on ``paper``.

    A wrapper of the ``dataset`` plugin's ``transform_batch`` slot: a user's plugin
    changing what every batch looks like, from one phase on, without touching the data.

    Args:
        phase: the phase whose batches are recoloured.
        ink, paper: RGB colours in [0, 1] of the strokes and the background.
        image_key: the image tensor in a batch (values in [-1, 1]).
    """

    name = "style"

    def __init__(
        self,
        phase: str = "lora",
        ink: tuple[float, float, float] = (1.0, 0.55, 0.1),
        paper: tuple[float, float, float] = (0.05, 0.1, 0.35),
        image_key: str = "image",
    ) -> None:
        self.phase, self.ink, self.paper, self.image_key = phase, ink, paper, image_key

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.attach("transform_batch", self._transform)

    def recolour(self, images: Any) -> Any:
        """Map grey images in [-1, 1] to the style's colours, still in [-1, 1]."""
        import torch

        t = (images.mean(dim=1, keepdim=True) + 1) / 2  # stroke intensity in [0, 1]
        ink = torch.tensor(self.ink, dtype=images.dtype).view(1, 3, 1, 1)
        paper = torch.tensor(self.paper, dtype=images.dtype).view(1, 3, 1, 1)
        return (paper + (ink - paper) * t) * 2 - 1

    def _transform(self, next_impl: Any, batch: Any) -> Any:
        batch = next_impl(batch)
        if self.engine.state.clock.phase == self.phase and self.image_key in batch:
            batch[self.image_key] = self.recolour(batch[self.image_key])
        return batch


class DigitsVal:
    """A ``val`` loader of square digit scenes for the validation loss.

    Args:
        tile: the tile size of :func:`scenes`; images are resized to ``size``.
        size: side of the square validation images (the UNet's sample size).
        batch_size: samples per batch.
    """

    name = "digits_val"

    def __init__(self, tile: int = 16, size: int = 24, batch_size: int = 64) -> None:
        self.tile, self.size, self.batch_size = tile, size, batch_size

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("setup", self._register, priority="early")

    def _register(self, state: Any) -> None:
        import numpy as np
        import torch
        from PIL import Image
        from torch.utils.data import DataLoader

        from ..data.shuffle import EpochBatchSampler

        images, labels = [], []
        for sample in scenes("val", tile=self.tile):
            if sample["width"] != sample["height"]:
                continue
            square = sample["image"].convert("RGB").resize((self.size, self.size), Image.Resampling.LANCZOS)
            images.append(torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
            labels.append(sample["label"])
        data = [{"image": x, "label": y} for x, y in zip(images, labels)]
        runtime = self.engine.runtime
        sampler = EpochBatchSampler(len(data), self.batch_size, shuffle=False,
                                    num_replicas=runtime.num_processes, rank=runtime.process_index)
        state.dataloaders["val"] = DataLoader(data, batch_sampler=sampler)


class SampleTensors:
    """At each phase end, sample every class and save the images as safetensors.

    The grids (PNG) are for people; these tensors let a test classify the samples.

    Args:
        per_class: samples per class.
        steps: sampling steps.
    """

    name = "sample_tensors"

    def __init__(self, per_class: int = 4, steps: int = 25) -> None:
        self.per_class, self.steps = per_class, steps

    def setup(self, engine: Any) -> None:
        self.engine = engine
        engine.on("phase_end", self._save)

    def _save(self, state: Any, phase: Any) -> None:
        import torch
        from safetensors.torch import save_file

        if not state.is_main_process or not state.run_dir:
            return
        labels = [c for c in range(10) for _ in range(self.per_class)]
        images = self.engine.call("sample", labels=labels, steps=self.steps, seed=1234)
        folder = Path(state.run_dir) / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"images": images.detach().float().cpu().contiguous(), "labels": torch.tensor(labels)},
                  str(folder / f"{phase.name}.safetensors"))


def classify_samples(images: Any, classifier: Any) -> Any:
    """Predicted digits of samples (N, C, H, W, any range), with an sklearn classifier
    trained on the 64 pixels (0..16) of the real 8x8 digits."""
    import torch

    grey = images.float().mean(dim=1, keepdim=True)
    # Stretch each sample to the 0..16 range of the real digits, then shrink to 8x8.
    low = grey.amin(dim=(2, 3), keepdim=True)
    high = grey.amax(dim=(2, 3), keepdim=True)
    grey = (grey - low) / (high - low).clamp_min(1e-6)
    small = torch.nn.functional.adaptive_avg_pool2d(grey, 8) * 16
    return classifier.predict(small.flatten(1).numpy())
