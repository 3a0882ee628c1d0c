"""COCO-30K mode end to end on a tiny synthetic COCO-format set, and its input checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.core.config import EvaluateConfig, PrepareConfig, SourceConfig, WorldConfig
from src.core.errors import UserError
from src.evaluate import Paths, evaluate
from src.prepare import prepare
from src.scoring.metrics import COCO_SIZE, center_crop_resize, file_listing_key, folder_stats, load_inception


class TinyInception(torch.nn.Module):
    """Stands in for clean-fid's weights file: same TorchScript interface (`.layers`, 2048 features)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
                                          torch.nn.Linear(3 * 16, 2048))

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return self.layers(x)


def write_inception(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(path))
    return path


@pytest.fixture(scope="module")
def coco(tmp_path_factory, tokenizer_dir):
    """captions_val2014.json (6 captions of 4 images), val2014/ with odd-sized JPEGs, prompts/eval.jsonl."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    images = root / "val2014"
    images.mkdir()
    sizes = [(48, 64), (64, 40), (50, 50), (30, 70), (64, 64), (40, 56), (52, 44)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"COCO_val2014_{i + 1:012d}.jpg")
    captions = ["a red circle on a blue background", "a small green square at the top",
                "a yellow triangle in the center", "a big white cross on black",
                "an orange square at the lower left", "a violet triangle on a white canvas"]
    anns = [{"image_id": i % 4 + 1, "id": 100 + i, "caption": c} for i, c in enumerate(captions)]
    (root / "captions_val2014.json").write_text(json.dumps({"annotations": anns, "images": []}))
    prompts = root / "prompts"
    prepare(PrepareConfig(tokenizer=str(tokenizer_dir), train=SourceConfig(limit=4),
                          eval=SourceConfig(source="coco", path=str(root / "captions_val2014.json"), dedupe=False)),
            WorldConfig(), 0, prompts)
    write_inception(root / "inception")
    return root


def coco_cfg(root: Path, models: Path, **kw) -> EvaluateConfig:
    return EvaluateConfig(mode="coco", coco={"images": str(root / "val2014"),
                                             "inception": str(root / "inception" / "inception-2015-12-05.pt"),
                                             "clip": str(models / "evaluator")},
                          teacher_steps=2, batch_size=4, grid_rows=3, **kw)


def test_coco_mode_end_to_end(tmp_path, coco, micro_models, micro_student):
    models, _ = micro_models
    cfg = coco_cfg(coco, models)
    paths = Paths(eval_prompts=coco / "prompts" / "eval.jsonl", student=micro_student, images=tmp_path / "img",
                  reports=tmp_path / "rep")
    metrics = evaluate(cfg, str(models / "teacher"), paths)

    assert set(metrics) == {"teacher_1", "teacher_2", "student_1"}
    for name, m in metrics.items():
        assert set(m) == {"fid", "clip_score"}
        assert np.isfinite(m["fid"]) and m["fid"] > 0 and -1 <= m["clip_score"] <= 1
        files = sorted((paths.images / name).glob("*.png"))
        assert len(files) == 6                                   # one per caption, duplicates of an image kept
        assert all(Image.open(f).size == (256, 256) for f in files)
    on_disk = json.loads((paths.reports / "metrics.json").read_text())
    assert {k: pytest.approx(v) for k, v in metrics.items()} == on_disk
    readme = (paths.reports / "README.md").read_text()
    assert "COCO-30K" in readme and "transformers:evaluator" in readme and "| student_1 |" in readme
    grid = Image.open(paths.reports / "grid.png")
    assert grid.size[1] > 3 * 256                                # reference column + 3 rows at 256 px
    # CLIP score has its interval; FID has none unless evaluate.coco.fid_resamples asks (2048-d roots each)
    ci = json.loads((paths.reports / "intervals.json").read_text())
    assert set(ci["intervals"]["student_1"]) == {"clip_score"} and ci["fid_resamples"] == 0
    assert set(ci["vs_teacher"]["student_1"]) == {"clip_score"} and "no interval" in readme

    # Reference statistics are cached next to the images and reused while the folder is unchanged
    # (checked on the cache directly: each FID costs a 2048 x 2048 matrix square root).
    cache = paths.images / "coco_reference_stats.npz"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    inception, cpu = load_inception(cfg.coco.inception, torch.device("cpu")), torch.device("cpu")

    def ref_stats():
        key = file_listing_key(coco / "val2014", COCO_SIZE, Path(cfg.coco.inception).stat().st_size)
        return folder_stats(coco / "val2014", inception, device=cpu, image_transform=center_crop_resize,
                            cache=cache, cache_key=key)

    mu, _ = ref_stats()
    assert cache.stat().st_mtime_ns == stamp
    # ...and recomputed when it changes: here an extra, very different reference image.
    extra = coco / "val2014" / "COCO_val2014_000000000099.jpg"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(extra)
    try:
        mu_changed, _ = ref_stats()
    finally:
        extra.unlink()
    assert cache.stat().st_mtime_ns != stamp and not np.allclose(mu, mu_changed)


def test_every_missing_coco_input_is_named_in_one_error(tmp_path, coco, micro_models, micro_student):
    models, _ = micro_models
    cfg = EvaluateConfig(mode="coco", coco={"images": str(tmp_path / "no_val2014"),
                                            "inception": str(tmp_path / "w" / "inception-2015-12-05.pt"),
                                            "clip": "open_clip:ViT-g-14:" + str(tmp_path / "no_clip.bin")})
    paths = Paths(eval_prompts=coco / "prompts" / "eval.jsonl", student=micro_student, images=tmp_path / "img",
                  reports=tmp_path / "rep")
    with pytest.raises(UserError) as err:
        evaluate(cfg, str(models / "teacher"), paths)
    text = str(err.value)
    for missing in ("no_val2014", "inception-2015-12-05.pt", "no_clip.bin"):
        assert missing in text
    assert not (tmp_path / "img").exists() and not (tmp_path / "rep").exists()   # nothing half-written


def test_coco_mode_refuses_world_prompts(tmp_path, coco, micro_models, micro_student, world_prompts):
    models, _ = micro_models
    paths = Paths(eval_prompts=world_prompts / "eval.jsonl", student=micro_student, images=tmp_path / "i",
                  reports=tmp_path / "r")
    with pytest.raises(UserError, match="prepare.eval.source: coco"):
        evaluate(coco_cfg(coco, models), str(models / "teacher"), paths)


def test_coco_mode_needs_its_paths_in_the_config():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="coco.images, coco.inception, coco.clip"):
        EvaluateConfig(mode="coco")


def test_inception_file_must_be_clean_fids(tmp_path):
    other = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(other))
    with pytest.raises(UserError, match="inception-2015-12-05.pt"):
        load_inception(other, torch.device("cpu"))
    bad = tmp_path / "x" / "inception-2015-12-05.pt"
    bad.parent.mkdir()
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a TorchScript"):
        load_inception(bad, torch.device("cpu"))


def test_center_crop_keeps_the_middle_and_resizes_with_lanczos():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = (0, 0, 255)                              # the centred square is blue, the sides red
    wide[:, :100] = wide[:, 200:] = (255, 0, 0)
    out = center_crop_resize(wide)
    assert out.shape == (256, 256, 3)
    assert (out[..., 2] > 250).all() and (out[..., 0] < 5).all()
    tall = np.zeros((300, 100, 3), np.uint8)
    tall[100:200] = 255
    assert (center_crop_resize(tall) > 250).all()
    # Lanczos (not nearest): a one-pixel checkerboard averages out to mid-grey when downsampled.
    checker = (np.indices((512, 512)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    assert abs(float(center_crop_resize(checker).mean()) - 127.5) < 3
