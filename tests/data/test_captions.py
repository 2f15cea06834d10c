"""Captions from every usual place reach ``batch["caption"]`` as a list of str: imagefolder
``metadata.jsonl`` (diffusers' train_text_to_image), csv/json columns, and ``.txt`` /
``.caption`` files next to the images (kohya's sd-scripts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hookengine import Engine

from .conftest import write_images


def _named(engine_options: dict) -> dict[str, str]:
    """Like _captions, naming samples by their image file (a transform keeps the name)."""
    engine = Engine(seed=0)
    engine.use("dataset", batch_size=2, shuffle=False, remainder="pad", **engine_options)

    @engine.attach("transform_sample")
    def keep_name(next_impl, sample):
        sample = next_impl(sample)
        sample["file"] = Path(sample["__name__"]).name
        return sample

    engine.fire("setup")
    out = {}
    for batch in engine.state.dataloaders["train"]:
        assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
        out.update(zip(batch["file"], batch["caption"]))
    return out


@pytest.mark.parametrize("column", ["text", "caption", "prompt"])
def test_imagefolder_metadata_jsonl_captions_found_without_options(tmp_path: Path, column: str) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 4, captions=False)
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({"file_name": row["file_name"], column: f"a {column} of {row['file_name']}"}) + "\n")
    got = _named({"path": "imagefolder", "data_dir": str(folder)})
    assert got == {r["file_name"]: f"a {column} of {r['file_name']}" for r in rows}


def test_caption_column_auto_prefers_caption_then_text_then_prompt(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 2, captions=False)
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps({"file_name": row["file_name"], "prompt": "p", "text": "t"}) + "\n")
    assert set(_named({"path": "imagefolder", "data_dir": str(folder)}).values()) == {"t"}
    # an explicit column wins
    assert set(_named({"path": "imagefolder", "data_dir": str(folder), "caption_column": "prompt"}).values()) == {"p"}


def test_sidecar_txt_and_caption_files(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 4, captions=False)
    names = [r["file_name"] for r in rows]
    (folder / names[0].replace(".png", ".txt")).write_text("from txt\n")
    (folder / names[1].replace(".png", ".caption")).write_text("from caption")
    (folder / names[2].replace(".png", ".txt")).write_text("txt wins")
    (folder / names[2].replace(".png", ".caption")).write_text("caption loses")
    (folder / names[3].replace(".png", ".txt")).write_bytes("\ufeffwith a BOM".encode())
    got = _named({"path": "imagefolder", "data_dir": str(folder)})
    assert got == {names[0]: "from txt", names[1]: "from caption", names[2]: "txt wins", names[3]: "with a BOM"}
    # the order of caption_extension decides
    got = _named({"path": "imagefolder", "data_dir": str(folder), "caption_extension": [".caption", ".txt"]})
    assert got[names[2]] == "caption loses"
    got = _named({"path": "imagefolder", "data_dir": str(folder), "caption_extension": ".caption"})
    assert got == {names[0]: "", names[1]: "from caption", names[2]: "caption loses", names[3]: ""}


def test_no_captions_anywhere_means_no_caption_key(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, [(16, 16)] * 2, captions=False)
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), batch_size=2)
    engine.fire("setup")
    assert "caption" not in next(iter(engine.state.dataloaders["train"]))


@pytest.mark.parametrize("builder", ["csv", "json"])
def test_csv_and_json_caption_columns(tmp_path: Path, builder: str) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 3, captions=False)
    records = [{"image": str(folder / r["file_name"]), "prompt": f"prompt {i}"} for i, r in enumerate(rows)]
    if builder == "csv":
        lines = ["image,prompt"] + [f"{r['image']},{r['prompt']}" for r in records]
        (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    else:
        (tmp_path / "d.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    got = _named({"path": builder, "data_files": str(tmp_path / f"d.{'csv' if builder == 'csv' else 'json'}")})
    assert got == {r["file_name"]: f"prompt {i}" for i, r in enumerate(rows)}


def test_an_empty_caption_in_the_column_is_read_from_its_file(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 2, captions=False)
    with open(folder / "metadata.jsonl", "w") as handle:
        handle.write(json.dumps({"file_name": rows[0]["file_name"], "text": "from the column"}) + "\n")
        handle.write(json.dumps({"file_name": rows[1]["file_name"], "text": ""}) + "\n")
    (folder / rows[1]["file_name"].replace(".png", ".txt")).write_text("from the file")
    got = _named({"path": "imagefolder", "data_dir": str(folder)})
    assert got == {rows[0]["file_name"]: "from the column", rows[1]["file_name"]: "from the file"}


def test_an_explicit_caption_column_that_does_not_exist_names_the_columns(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, [(16, 16)] * 2)  # metadata.jsonl with file_name + text
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), caption_column="caption")
    with pytest.raises(ValueError, match=r"dataset\.caption_column: .* no column 'caption'; its columns are \['image', 'text'\]"):
        engine.fire("setup")


def test_require_caption_without_any_caption_source_fails_at_setup(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    write_images(folder, [(16, 16)] * 2, captions=False)
    engine = Engine(seed=0)
    engine.use("dataset", path="imagefolder", data_dir=str(folder), require_caption=True)
    with pytest.raises(ValueError, match=r"require_caption: .* no caption column .* no caption files \(\.txt, \.caption\)"):
        engine.fire("setup")


def test_streaming_captions_from_files(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    rows = write_images(folder, [(16, 16)] * 4, captions=False)
    for row in rows:
        (folder / row["file_name"].replace(".png", ".txt")).write_text(f"side {row['file_name']}")
    got = _named({"path": "imagefolder", "data_dir": str(folder), "streaming": True})
    assert got == {r["file_name"]: f"side {r['file_name']}" for r in rows}
