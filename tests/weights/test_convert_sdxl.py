"""Conversion of a random-weight, full-size SDXL pipeline in the diffusers layout (sharded U-Net) to Refiners.

Memory: each diffusers model is freed once saved, so the loaded pipeline is the only SDXL U-Net in memory. Disk: the
pipeline (14 GB) is converted on the fly; writing converted files is tested on SD1 and by `scripts/bench_convert.py`.
"""

import shutil
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from refiners.foundationals.clip.tokenizer import CLIPTokenizer
from refiners.foundationals.latent_diffusion import StableDiffusion_XL

from style_aligned.weights.loading import load_pipeline
from tests.helpers import diffusers_models as dm
from tests.helpers import models
from tests.helpers.compare import assert_close

PROMPTS = ["a toy train. macro photo. 3d game asset", "an owl in a snowy forest, watercolor"]


@models.full_size_fixture()
def sdxl_source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    models.release()
    root = tmp_path_factory.mktemp("sdxl-diffusers")
    pipeline = root / "pipeline"
    dm.write_model_index(pipeline, "sdxl")
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(2, 4, 8, 8, generator=generator),
        "timestep": torch.tensor([600]),
        "embedding": torch.randn(2, 77, 2048, generator=generator),
        "text_embeds": torch.randn(2, 1280, generator=generator),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2),
        "image": torch.randn(1, 3, 64, 64, generator=generator),
        "latents": torch.randn(1, 4, 8, 8, generator=generator),
    }
    outputs: dict[str, Any] = {}
    with torch.no_grad():
        unet = dm.unet("sdxl")
        added = {"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]}
        outputs["unet"] = unet(inputs["x"], inputs["timestep"], inputs["embedding"], added_cond_kwargs=added).sample
        dm.save(unet, pipeline / "unet")
        del unet
        tokens_l = CLIPTokenizer()(PROMPTS)
        tokens_g = CLIPTokenizer(pad_token_id=0)(PROMPTS)
        encoder_l = dm.text_encoder("text_encoder", "sdxl", seed=20)
        hidden_l = encoder_l(tokens_l, output_hidden_states=True).hidden_states[-2]  # SDXL takes the penultimate
        dm.save(encoder_l, pipeline / "text_encoder")
        del encoder_l
        encoder_g = dm.text_encoder("text_encoder_2", "sdxl", seed=21)
        result_g = encoder_g(tokens_g, output_hidden_states=True)
        outputs["text"] = torch.cat([hidden_l, result_g.hidden_states[-2]], dim=-1)
        outputs["pooled"] = result_g.text_embeds
        dm.save(encoder_g, pipeline / "text_encoder_2")
        del encoder_g, result_g
        vae = dm.vae(seed=22)
        outputs["encoded"] = vae.encode(inputs["image"]).latent_dist.mean
        outputs["decoded"] = vae.decode(inputs["latents"]).sample
        dm.save(vae, pipeline / "vae")
        del vae
    yield {"root": root, "pipeline": pipeline, "inputs": inputs, "outputs": outputs}
    shutil.rmtree(root)


def test_sdxl_pipeline_converts_and_matches_diffusers(sdxl_source: dict[str, Any]) -> None:
    """Converted on the fly (same reading and renaming as `convert`, without writing 14 GB to disk)."""
    pipeline = sdxl_source["pipeline"]
    assert len(list((pipeline / "unet").glob("diffusion_pytorch_model-*.safetensors"))) > 1  # diffusers sharded it
    sd = load_pipeline(pipeline)
    assert isinstance(sd, StableDiffusion_XL)
    inputs, outputs = sdxl_source["inputs"], sdxl_source["outputs"]
    with torch.no_grad():
        sd.unet.set_timestep(inputs["timestep"])
        sd.unet.set_clip_text_embedding(inputs["embedding"])
        sd.unet.set_pooled_text_embedding(inputs["text_embeds"])
        sd.unet.set_time_ids(inputs["time_ids"])
        assert_close(sd.unet(inputs["x"]), outputs["unet"])
        text, pooled = sd.clip_text_encoder(PROMPTS)
        assert_close(text, outputs["text"])
        assert_close(pooled, outputs["pooled"])
        assert_close(sd.lda[0](inputs["image"]), outputs["encoded"])
        assert_close(sd.lda[1](inputs["latents"]), outputs["decoded"])


def test_sdxl_sweep_writes_contact_sheet_table_and_plot(sdxl_source: dict[str, Any], tmp_path: Any) -> None:
    """`style-aligned sweep` on the random SDXL pipeline (converted on the fly) at 64x64 px with 2 steps."""
    import gc

    from style_aligned.cli import main as cli
    from tests.evaluation.test_sweep import sweep_files
    from tests.helpers.random_scorers import save_random_scorers

    gc.collect()  # the previous test's pipeline: one SDXL in memory at a time
    clip, dino = save_random_scorers(tmp_path / "scorers")
    out = tmp_path / "sweep"
    arguments = ["--model", str(sdxl_source["pipeline"]), "--device", "cpu", "--steps", "2", "--size", "64x64"]
    arguments += ["--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--grid", "shared-score-shift=0,0.69"]
    cli(["sweep", *arguments, "--clip", str(clip), "--dino", str(dino), "--out", str(out)])
    table = sweep_files(out, rows=2, columns=2, options=["shared_score_shift"])
    assert [float(row["shared_score_shift"]) for row in table] == [0.0, 0.69]


def test_sdxl_single_file_is_the_original_layout_and_loads(sdxl_source: dict[str, Any], tmp_path: Any) -> None:
    """The pipeline written as one original-layout file: diffusers' from_single_file reads it back into the source
    models (one at a time), and the project loads it into models that match the source's outputs."""
    import gc

    from tests.helpers.single_file import assert_equals_folder, oracle_models, write_single_file

    gc.collect()  # the previous tests' pipelines: one SDXL U-Net in memory at a time
    pipeline, path = sdxl_source["pipeline"], tmp_path / "sdxl-original.safetensors"
    write_single_file(pipeline, "sdxl", path)
    for component, load in oracle_models(path, pipeline, "sdxl").items():
        model = load()
        assert assert_equals_folder(model, pipeline, component) > 0
        del model
        gc.collect()

    sd = load_pipeline(path)
    assert isinstance(sd, StableDiffusion_XL)
    inputs, outputs = sdxl_source["inputs"], sdxl_source["outputs"]
    with torch.no_grad():
        sd.unet.set_timestep(inputs["timestep"])
        sd.unet.set_clip_text_embedding(inputs["embedding"])
        sd.unet.set_pooled_text_embedding(inputs["text_embeds"])
        sd.unet.set_time_ids(inputs["time_ids"])
        assert_close(sd.unet(inputs["x"]), outputs["unet"], 1e-4)
        text, pooled = sd.clip_text_encoder(PROMPTS)
        assert_close(text, outputs["text"])
        assert_close(pooled, outputs["pooled"])
        assert_close(sd.lda[1](inputs["latents"]), outputs["decoded"], 1e-3)
    del sd
    path.unlink()
