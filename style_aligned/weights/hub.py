"""Models and weights files named by Hugging Face Hub ids, fetched through `huggingface_hub` and its cache.

A pipeline is named `org/name` or `org/name@revision`; a weights file `org/name/path/in/repo.safetensors` (or
`org/name@revision/path/...`). Everything goes through `huggingface_hub`: its cache (`HF_HOME`, `HF_HUB_CACHE`), its
progress bars, `HF_TOKEN` for gated and private repos, and `HF_HUB_OFFLINE`. Only what a run needs is fetched: the
pipeline's `model_index.json`, the `config.json` and `.safetensors` weights of the components used (the fp16 variant
in half precision, when the repo has one), never `.bin` or `.ckpt` files.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from style_aligned.weights.architectures import ARCHITECTURES, PIPELINES
from style_aligned.weights.safetensors_io import PICKLE_SUFFIXES, WeightsError, pickle_error

_PART = r"[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9_])?"
_REPO = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w./-]+?))?")
_FILE = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[\w.-]+))?/(?P<path>[\w./ -]+\.\w+)")
_WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class HubModel:
    """A pipeline resolved to a local folder.

    Attributes:
        path: The folder (a diffusers pipeline, a converted folder) or the single file.
        variant: The weights variant to read in that folder (`"fp16"`), or None for the plain weights.
        reference: What the user named it (a path or a Hub id), for messages and set files.
        from_hub: Whether it was named by a Hub id (`path` is then a snapshot in the Hugging Face cache).
    """

    path: Path
    variant: str | None = None
    reference: str = ""
    from_hub: bool = False


def parse_repo_id(text: str) -> tuple[str, str | None] | None:
    """`(repo_id, revision)` if `text` reads as a Hub repo id `org/name[@revision]`, else None."""
    match = _REPO.fullmatch(text)
    return (match["repo"], match["revision"]) if match else None


def parse_file_id(text: str) -> tuple[str, str | None, str] | None:
    """`(repo_id, revision, path)` if `text` reads as `org/name[@revision]/path/in/repo.ext`, else None."""
    match = _FILE.fullmatch(text)
    return (match["repo"], match["revision"], match["path"]) if match else None


def _hf() -> Any:
    """`huggingface_hub`, imported when first needed (it reads its environment variables then)."""
    import huggingface_hub

    return huggingface_hub


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _how_to_get(repo_id: str, revision: str | None, files: str = "") -> str:
    command = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "") + files
    return (
        "fetch it where the Hub can be reached (run the same command there once, or `" + command + "`) and copy the"
        " Hugging Face cache (HF_HOME) here, or run without HF_HUB_OFFLINE"
    )


def _hub_call(call: Callable[[], T], repo_id: str, revision: str | None, files: str = "") -> T:
    """Run a `huggingface_hub` call, turning its errors into one-line `WeightsError`s that say what to do."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = repo_id + (f"@{revision}" if revision else "")
    try:
        return call()
    except GatedRepoError:
        raise WeightsError(
            f"{name} is a gated repo: accept its terms on https://huggingface.co/{repo_id} and set HF_TOKEN (or run"
            " `hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise WeightsError(
            f"the Hugging Face Hub has no repo {repo_id} that you can access: check the id, or for a private or gated"
            " repo set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise WeightsError(f"the Hub repo {repo_id} has no revision {revision!r}") from None
    except RemoteEntryNotFoundError as error:
        raise WeightsError(f"the Hub repo {name} has no file {files.strip() or ''}: {error}".rstrip(": ")) from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        state = "HF_HUB_OFFLINE is set" if _offline() else "the Hugging Face Hub cannot be reached"
        raise WeightsError(
            f"{name} is not in the Hugging Face cache and {state}: {_how_to_get(repo_id, revision, files)}"
        ) from None
    except HfHubHTTPError as error:
        raise WeightsError(f"the Hugging Face Hub refused {name}: {str(error).splitlines()[0]}") from None


def _repo_files(repo_id: str, revision: str | None) -> tuple[Path | None, set[str]]:
    """The files of a repo: listed by the Hub, or, offline or unreachable, those of the cached snapshot (then also its
    folder)."""
    if not _offline():
        try:
            files = _hub_call(lambda: _hf().HfApi().list_repo_files(repo_id, revision=revision), repo_id, revision)
            return None, set(files)
        except WeightsError as error:
            if "cannot be reached" not in str(error):
                raise
        except Exception:  # no connection (httpx errors are not OSErrors): use the cache, as huggingface_hub does
            pass
    snapshot_download = _hf().snapshot_download
    folder = Path(
        _hub_call(lambda: snapshot_download(repo_id, revision=revision, local_files_only=True), repo_id, revision)
    )
    files = {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}
    return folder, files


def _weights(files: set[str], component: str, variant: str | None) -> tuple[list[str], str | None]:
    """The safetensors files of a component to fetch, and the variant they are (never pickle files)."""
    infixes: list[str | None] = [variant, None] if variant else [None]
    for name in _WEIGHT_NAMES:
        for infix in infixes:
            stem = f"{component}/{name}{f'.{infix}' if infix else ''}"
            if f"{stem}.safetensors" in files:
                return [f"{stem}.safetensors"], infix
            if f"{stem}.safetensors.index.json" in files:
                shards = sorted(f for f in files if re.fullmatch(rf"{re.escape(stem)}-\d+-of-\d+\.safetensors", f))
                return [f"{stem}.safetensors.index.json", *shards], infix
    if pickles := sorted(f for f in files if f.startswith(f"{component}/") and f.endswith(PICKLE_SUFFIXES)):
        raise pickle_error(Path(pickles[0]))
    raise WeightsError(f"the repo has no .safetensors weights for {component}/")


FLUX_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
"""The models of a FLUX.1 diffusers pipeline, each a folder with `config.json` and safetensors weights."""
FLUX_FOLDERS = ("tokenizer", "tokenizer_2", "scheduler")
"""The other folders of a FLUX.1 diffusers pipeline that loading needs (configuration and vocabulary files)."""
_SMALL_FILES = (".json", ".txt", ".model")


def _pipeline_kind(model_index: dict[str, Any], name: str) -> str:
    pipeline_class = str(model_index.get("_class_name", ""))
    if pipeline_class == "FluxPipeline":
        return "flux"
    if not pipeline_class.startswith("StableDiffusion") or "Upscale" in pipeline_class:
        raise WeightsError(f"{name}: {pipeline_class or 'this repo'} is not an SD1, SDXL or FLUX.1 pipeline")
    return "sdxl" if pipeline_class.startswith("StableDiffusionXL") else "sd1"


def _components(kind: str, without: tuple[str, ...]) -> list[str]:
    if kind == "flux":
        return [component for component in FLUX_COMPONENTS if component not in without]
    return [component for architecture in PIPELINES[kind] for component in ARCHITECTURES[architecture].configs]


def _small_files(files: set[str], kind: str, name: str) -> list[str]:
    """The configuration and vocabulary files of a pipeline's other folders (FLUX.1's tokenizers and scheduler)."""
    if kind != "flux":
        return []
    wanted: list[str] = []
    for folder in FLUX_FOLDERS:
        found = sorted(f for f in files if f.startswith(f"{folder}/") and f.endswith(_SMALL_FILES))
        if not found:
            raise WeightsError(f"{name} lacks {folder}/: the pipeline is incomplete")
        wanted += found
    return wanted


def download_pipeline(
    repo_id: str, revision: str | None = None, half: bool = False, *, without: tuple[str, ...] = ()
) -> HubModel:
    """Fetch what an SD1, SDXL or FLUX.1 pipeline repo needs into the Hugging Face cache, and return its snapshot
    folder.

    For FLUX.1 (`black-forest-labs/FLUX.1-schnell`, `-dev`): `model_index.json`, the `config.json` and safetensors
    weights (single or sharded, with their index) of `transformer/`, `text_encoder/` (CLIP L), `text_encoder_2/`
    (T5) and `vae/`, and the configuration and vocabulary files of `tokenizer/`, `tokenizer_2/` and `scheduler/`.

    Args:
        repo_id: `org/name`.
        revision: A branch, tag or commit (default: `main`).
        half: Prefer the `fp16` weights variant.
        without: FLUX.1 models not to fetch (e.g. `("transformer",)` where it comes from a single file).

    Raises:
        WeightsError: If the repo is unknown, gated without a token, not cached while offline, or not an SD1, SDXL
            or FLUX.1 pipeline with safetensors weights.
    """
    snapshot_download = _hf().snapshot_download

    name = repo_id + (f"@{revision}" if revision else "")
    cached, files = _repo_files(repo_id, revision)
    if "model_index.json" not in files:
        raise WeightsError(f"{name} is not a diffusers pipeline (it has no model_index.json)")
    if cached is not None:
        model_index = json.loads((cached / "model_index.json").read_text())
    else:
        hf_hub_download = _hf().hf_hub_download

        index_file = _hub_call(
            lambda: hf_hub_download(repo_id, "model_index.json", revision=revision), repo_id, revision
        )
        model_index = json.loads(Path(index_file).read_text())
    kind = _pipeline_kind(model_index, name)
    wanted = ["model_index.json"]
    variants: set[str | None] = set()
    for component in _components(kind, without):
        if f"{component}/config.json" not in files:
            raise WeightsError(f"{name} lacks {component}/config.json: the pipeline is incomplete")
        weights, found = _weights(files, component, "fp16" if half and kind != "flux" else None)
        wanted += [f"{component}/config.json", *weights]
        variants.add(found)
    wanted += _small_files(files, kind, name)
    if cached is None:
        folder = Path(
            _hub_call(
                lambda: snapshot_download(repo_id, revision=revision, allow_patterns=wanted),
                repo_id,
                revision,
                f" --include {' '.join(wanted)}",
            )
        )
    else:
        folder = cached
    variant = "fp16" if "fp16" in variants else None  # preferred where present, the plain weights elsewhere
    return HubModel(path=folder, variant=variant, reference=name, from_hub=True)


def resolve_model(reference: str | Path, half: bool = False, *, without: tuple[str, ...] = ()) -> HubModel:
    """Resolve what a user named as a model: a local folder or file, else a Hub repo id `org/name[@revision]`.

    Raises:
        WeightsError: If it is neither an existing path nor a Hub id, or the Hub id cannot be fetched.
    """
    text = str(reference)
    path = Path(reference).expanduser()
    if path.exists():
        return HubModel(path=path, variant=None, reference=text)
    if path.suffix in (".safetensors", *PICKLE_SUFFIXES):
        raise WeightsError(f"the checkpoint file {path} does not exist")
    if (parsed := parse_repo_id(text)) is None:
        raise WeightsError(
            f"{text} is neither a folder, a checkpoint file nor a Hugging Face Hub repo id (org/name[@revision])"
        )
    return download_pipeline(*parsed, half=half, without=without)


def resolve_file(reference: str | Path) -> Path:
    """Resolve a weights file: a local path, else `org/name[@revision]/path/in/repo.safetensors` on the Hub.

    Raises:
        WeightsError: If it does not exist locally and is not a Hub file id, is a pickle file, or cannot be fetched.
    """
    text = str(reference)
    path = Path(reference).expanduser()
    if path.exists():
        return path
    if (parsed := parse_file_id(text)) is None:
        raise WeightsError(f"{text} does not exist (give a file, or a Hub file as org/name/path/in/repo.safetensors)")
    repo_id, revision, filename = parsed
    if filename.endswith(PICKLE_SUFFIXES):
        raise pickle_error(Path(filename))
    if not filename.endswith(".safetensors"):
        raise WeightsError(f"{text}: only .safetensors weights files are read")
    hf_hub_download = _hf().hf_hub_download

    return Path(
        _hub_call(lambda: hf_hub_download(repo_id, filename, revision=revision), repo_id, revision, f" {filename}")
    )


SCORER_FILES = ["*.json", "*.txt", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
"""What a transformers model folder needs: configs, processor files and safetensors weights (no pickle)."""


def resolve_folder(reference: str | Path, allow_patterns: list[str]) -> Path:
    """Resolve a model folder: a local folder, else a Hub repo id `org/name[@revision]`, fetching only these files.

    Raises:
        WeightsError: If it is neither a local path nor a Hub id, or the Hub repo cannot be fetched.
    """
    text = str(reference)
    path = Path(reference).expanduser()
    if path.exists() or (parsed := parse_repo_id(text)) is None:
        return path
    snapshot_download = _hf().snapshot_download

    repo_id, revision = parsed
    return Path(
        _hub_call(
            lambda: snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns),
            repo_id,
            revision,
            f" --include {' '.join(repr(p) for p in allow_patterns)}",
        )
    )
