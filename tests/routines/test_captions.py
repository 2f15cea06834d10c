"""Captions in diffusion batches: encoded as diffusers' examples do, kohya's caption tricks,
deterministic across a resume, cached embeddings, samples at the training size, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hookengine.routines.captions import caption_rng, prepare_captions, shuffle_tags

from .conftest import quiet_engine, record_losses
from .test_diffusion import script_losses

DIFFUSION = "hookengine.routines.diffusion:DiffusionRoutine"
CAPTIONS = ["a red square", "a blue circle", "two dots", "a line"]


def caption_batches(count: int = 2, size: int = 2, height: int = 32, width: int = 32,
                    captions: list[str] = CAPTIONS) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [
        {"pixel_values": torch.rand((size, 3, height, width), generator=generator) * 2 - 1,
         "caption": [captions[(i * size + j) % len(captions)] for j in range(size)]}
        for i in range(count)
    ]


def tokenized(tiny_sd: Path, batches: list[dict], captions: list[list[str]] | None = None) -> list[dict]:
    """The same batches with ``input_ids`` tokenized by hand, as diffusers' example does."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    out = []
    for i, batch in enumerate(batches):
        text = captions[i] if captions is not None else batch["caption"]
        ids = tokenizer(text, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
        out.append({"pixel_values": batch["pixel_values"], "input_ids": ids})
    return out


def caption_engine(tiny_sd: Path, run_dir: Path, batches: list[dict], steps: int, **options):
    engine = quiet_engine(run_dir, options.pop("plugins", None), max_steps=steps, lr=1e-3, eval_at_phase_end=False)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), prediction_type="epsilon", seed=7,
                         sample_at_phase_end=False, **options)
    engine.on("setup", lambda state: state.dataloaders.update(train=batches))
    return engine, routine


def count_text_encoder_calls(engine) -> list[int]:
    calls: list[int] = []
    engine.on("setup", lambda state: state.models["text_encoder"].register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0]) if args else calls.append(-1)), priority="last")
    return calls


def test_caption_losses_equal_the_diffusers_example_loop(tiny_sd: Path, run_dir: Path) -> None:
    """Captions are tokenized (model_max_length, max_length padding, truncation) and encoded
    (text_encoder(ids)[0]) with the pipeline's own tokenizer and encoder."""
    batches = caption_batches()
    engine, _ = caption_engine(tiny_sd, run_dir, batches, steps=2)
    losses = record_losses(engine)
    engine.run()
    expected = script_losses(tiny_sd, tokenized(tiny_sd, batches), "epsilon", None, 0.0, seed=7, lr=1e-3)
    np.testing.assert_allclose(losses, expected, rtol=1e-6, atol=1e-7)
    # A different caption changes the loss: the captions are really used.
    other = tokenized(tiny_sd, batches, captions=[["x", "y"], ["z", "w"]])
    assert abs(script_losses(tiny_sd, other, "epsilon", None, 0.0, seed=7, lr=1e-3)[0] - expected[0]) > 1e-6


def test_dropped_captions_are_the_empty_prompt_encoded_once(tiny_sd: Path, run_dir: Path) -> None:
    batches = caption_batches()
    engine, _ = caption_engine(tiny_sd, run_dir, batches, steps=2, caption_dropout=1.0)
    calls = count_text_encoder_calls(engine)
    losses = record_losses(engine)
    engine.run()
    empty = tokenized(tiny_sd, batches, captions=[["", ""], ["", ""]])
    expected = script_losses(tiny_sd, empty, "epsilon", None, 0.0, seed=7, lr=1e-3)
    np.testing.assert_allclose(losses, expected, rtol=1e-6, atol=1e-7)
    assert calls == [1]  # one empty prompt, encoded once, reused for 4 samples


def test_cached_embeddings_encode_each_caption_once_and_change_nothing(tiny_sd: Path, run_dir: Path) -> None:
    batches = caption_batches(count=2, size=2, captions=["a", "b"])  # the same two captions in both batches
    first, _ = caption_engine(tiny_sd, run_dir / "a", batches, steps=2, cache_text_embeddings=True)
    calls = count_text_encoder_calls(first)
    cached = record_losses(first)
    first.run()
    second, _ = caption_engine(tiny_sd, run_dir / "b", batches, steps=2)
    plain = record_losses(second)
    second.run()
    assert calls == [2]
    np.testing.assert_allclose(cached, plain, rtol=1e-6, atol=1e-7)


def test_shuffle_keeps_the_first_tags_and_is_a_pure_function_of_seed_and_step() -> None:
    caption = "sks dog, sitting, red collar, grass, sunny day, park"
    before = torch.get_rng_state()
    outs = {prepare_captions([caption], seed=3, step=step, shuffle=True, keep_tokens=2)[0] for step in range(20)}
    assert torch.equal(before, torch.get_rng_state())  # no global draws: noise and timesteps stay put
    assert len(outs) > 5
    for out in outs:
        tags = out.split(", ")
        assert tags[:2] == ["sks dog", "sitting"]
        assert sorted(tags) == sorted(t.strip() for t in caption.split(","))
    again = prepare_captions([caption, caption], seed=3, step=4, shuffle=True, keep_tokens=2)
    assert again == prepare_captions([caption, caption], seed=3, step=4, shuffle=True, keep_tokens=2)
    # kohya: shuffle the tags after keep_tokens with the sample's own generator.
    rng = caption_rng(3, 4, 0, 1)
    flex = ["red collar", "grass", "sunny day", "park"]
    assert again[1] == ", ".join(["sks dog", "sitting"] + [flex[i] for i in rng.permutation(4)])
    assert shuffle_tags("a|b", 0, "|", caption_rng(0, 0, 0, 0)) in ("a, b", "b, a")
    dropped = prepare_captions([caption] * 400, seed=0, step=0, dropout=0.25)
    assert 60 < dropped.count("") < 140 and set(dropped) == {"", caption}


def test_resume_sees_the_same_shuffled_and_dropped_captions(tiny_sd: Path, run_dir: Path) -> None:
    tags = ["one, two, three, four", "five, six, seven, eight"]
    batches = caption_batches(count=4, size=2, captions=tags)
    options = {"caption_dropout": 0.3, "shuffle_caption": True, "keep_tokens": 1}

    def run(folder: Path, steps: int, resume: bool) -> tuple[list[float], list[list[str]]]:
        checkpoint = {"folder": str(run_dir / "ckpt"), "resume": "latest" if resume else None}
        engine, routine = caption_engine(tiny_sd, folder, batches, steps, plugins={"checkpoint": checkpoint}, **options)
        seen: list[list[str]] = []
        encode = routine.encode_captions
        routine.encode_captions = lambda captions: (seen.append(list(captions)), encode(captions))[1]
        losses = record_losses(engine)
        engine.run()
        return losses, seen

    run(run_dir / "first", 2, resume=False)
    resumed, resumed_seen = run(run_dir / "second", 4, resume=True)
    (run_dir / "ckpt").rename(run_dir / "ckpt-old")
    unbroken, unbroken_seen = run(run_dir / "whole", 4, resume=False)
    assert resumed_seen == unbroken_seen[2:]
    assert resumed == unbroken[2:]
    flat = [c for batch in unbroken_seen for c in batch]
    assert "" in flat and any(c not in tags and c for c in flat)  # some dropped, some shuffled


def test_samples_are_drawn_at_the_training_size(tiny_sd: Path, run_dir: Path) -> None:
    batches = caption_batches(count=1, size=2, height=48, width=32)
    engine, routine = caption_engine(tiny_sd, run_dir, batches, steps=1, sample_prompts=["a cat"], sample_steps=2,
                                     sample_options={"guidance_scale": 1.0})
    engine.run()
    assert routine.last_size == (48, 32)
    assert tuple(routine.sample().shape) == (1, 3, 48, 32)
    routine.sample_size = (16, 24)
    assert tuple(routine.sample().shape) == (1, 3, 16, 24)


def test_a_batch_without_text_names_the_keys_and_the_option(tiny_sd: Path, run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd))
    engine.fire("setup")
    batch = {"pixel_values": torch.zeros((1, 3, 32, 32)), "label": torch.tensor([0])}
    message = ("diffusion: the batch has no 'caption', 'input_ids' or 'encoder_hidden_states' "
               "(keys: pixel_values, label); set dataset.caption_column or add .txt caption files")
    with pytest.raises(KeyError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        engine.call("compute_loss", batch)


def test_an_imagefolder_with_caption_files_trains(tiny_sd: Path, run_dir: Path, tmp_path: Path) -> None:
    """The failing case of the brief: imagefolder + .txt captions + SD pipeline, no user Python."""
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, caption in enumerate(CAPTIONS):
        Image.new("RGB", (32, 32), (60 * i, 20, 200 - 40 * i)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    engine = quiet_engine(run_dir, max_steps=2, lr=1e-3, eval_at_phase_end=False)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=2)  # captions: the .txt files
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), image_key="image", seed=0,
                         sample_at_phase_end=False, shuffle_caption=True)
    seen: list[str] = []
    encode = routine.encode_captions
    routine.encode_captions = lambda captions: (seen.extend(captions), encode(captions))[1]
    losses = record_losses(engine)
    engine.run()
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert sorted(seen) == sorted(CAPTIONS)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hookengine.testing.tiny_models import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


def sdxl_script_loss(folder: Path, batch: dict, rng_state: torch.Tensor) -> torch.Tensor:
    """diffusers' examples/text_to_image/train_text_to_image_sdxl.py: encode_prompt,
    compute_time_ids (target = the training resolution) and the epsilon loss."""
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(folder, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    text_encoders = [CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")]
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    prompt_embeds_list = []
    with torch.no_grad():
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            text_input_ids = tokenizer(batch["caption"], padding="max_length", max_length=tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
            prompt_embeds = text_encoder(text_input_ids, output_hidden_states=True, return_dict=False)
            pooled_prompt_embeds = prompt_embeds[0]
            prompt_embeds = prompt_embeds[-1][-2]
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    pooled_prompt_embeds = pooled_prompt_embeds.view(bs_embed, -1)
    torch.set_rng_state(rng_state)
    model_input = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(model_input)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
    noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
    resolution = batch["pixel_values"].shape[-1]

    def compute_time_ids(original_size, crops_coords_top_left):
        return torch.tensor([list(original_size + crops_coords_top_left + (resolution, resolution))]).float()

    add_time_ids = torch.cat([compute_time_ids(tuple(s.tolist()), tuple(c.tolist()))
                              for s, c in zip(batch["original_size_hw"], batch["crop_top_left"])])
    added = {"time_ids": add_time_ids, "text_embeds": pooled_prompt_embeds}
    model_pred = unet(noisy_model_input, timesteps, prompt_embeds, added_cond_kwargs=added, return_dict=False)[0]
    return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")


def test_sdxl_caption_loss_equals_the_diffusers_sdxl_script(tiny_sdxl: Path, run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sdxl), seed=None)
    engine.fire("setup")
    assert {"text_encoder", "text_encoder_2"} <= set(engine.state.models) and routine.tokenizer_2 is not None
    batch = {**caption_batches(count=1, size=2)[0], "original_size_hw": torch.tensor([[40, 36], [32, 32]]),
             "crop_top_left": torch.tensor([[4, 2], [0, 0]])}
    state = torch.get_rng_state()
    with torch.no_grad():
        ours = engine.call("compute_loss", batch)
        theirs = sdxl_script_loss(tiny_sdxl, batch, state)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        # The time ids are used: another crop gives another loss.
        torch.set_rng_state(state)
        moved = engine.call("compute_loss", {**batch, "crop_top_left": torch.tensor([[0, 0], [8, 8]])})
    assert abs(float(moved) - float(ours)) > 1e-7
    assert routine.text_encoders is not None and routine.text_encoders.dual


def test_sdxl_trains_from_captions_and_samples_at_the_training_size(tiny_sdxl: Path, run_dir: Path) -> None:
    batches = caption_batches(count=1, size=2, height=32, width=48)
    engine, routine = caption_engine(tiny_sdxl, run_dir, batches, steps=1, caption_dropout=0.5,
                                     sample_prompts=["a cat"], sample_steps=1, sample_options={"guidance_scale": 1.0})
    losses = record_losses(engine)
    engine.run()
    assert len(losses) == 1 and np.isfinite(losses[0])
    assert tuple(routine.sample().shape) == (1, 3, 32, 48)


def test_caption_slots_can_be_wrapped(tiny_sd: Path, run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), keep_tokens=1, shuffle_caption=True)
    engine.attach("prepare_captions", lambda next_impl, captions, train: ["sks, " + c for c in next_impl(captions, train)])
    seen: list[list[str]] = []
    engine.attach("encode_captions", lambda next_impl, captions: (seen.append(captions), next_impl(captions))[1])
    engine.fire("setup")
    engine.call("compute_loss", {"pixel_values": torch.zeros((2, 3, 32, 32)), "caption": ["a, b, c", "d"]})
    assert seen[0][0].startswith("sks, a, ") and sorted(seen[0][0].split(", ")[2:]) == ["b", "c"]
    assert seen[0][1] == "sks, d"


def test_a_trained_text_encoder_gets_gradients_through_captions(tiny_sd: Path, run_dir: Path) -> None:
    from hookengine import Engine

    engine = Engine(seed=0, run_dir=run_dir)
    routine = engine.use(DIFFUSION, name="diffusion", pipeline=str(tiny_sd), train_text_encoder=True,
                         cache_text_embeddings=True, caption_dropout=1.0, seed=0)
    engine.fire("setup")
    loss = engine.call("compute_loss", {"pixel_values": torch.zeros((2, 3, 32, 32)), "caption": ["a", "b"]})
    loss.backward()
    grads = [p.grad for p in engine.state.models["text_encoder"].parameters()]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads)
    assert routine.text_encoders is not None and not routine.text_encoders.frozen and not routine.text_encoders.memo
