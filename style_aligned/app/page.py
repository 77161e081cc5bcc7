"""The page: a Gradio app to make style-consistent sets without the command line.

The settings on the left are the fields of the sets' specs, as `generate`, `transfer` and `sweep` take them (see
`forms`); the right shows the progress, a preview of the reference while it denoises, the set, its grid and a zip of
it, or a sweep's contact sheet. Jobs run one at a time on the server (see `studio`), each set in a new folder under
the output folder.
"""

import html
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.blocks import Block
from gradio.themes import Base

from style_aligned.app.files import APP_FOLDER, read_upload
from style_aligned.app.forms import (
    SET_CONTROLS,
    STYLE_CONTROLS,
    SWITCH,
    TRANSFER_CONTROLS,
    Command,
    Control,
    control,
    lora_values,
    loras,
    prompt_lines,
    spec_values,
)
from style_aligned.app.making import Inversions, make_generate_set, make_sweep, make_transfer_set
from style_aligned.app.studio import NUMBERS, Job, JobView, Studio
from style_aligned.evaluation.sweep import GRID_HELP, sweep_inputs
from style_aligned.pipeline.spec import SetSpec
from style_aligned.pipeline.spec_fields import read_spec

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
"""The page's fonts: the system's, so that the page fetches nothing from elsewhere."""
REFERENCES = ("the first prompt", "a reference prompt", "an uploaded image")
"""Where the set's style comes from."""
INTRODUCTION = """# StyleAligned sets
Write a few prompts, one per line: the first image is the reference, and every other image takes its style. Or give
the reference as a prompt of its own, or upload an image and caption it to make a set in its style.
Each set is written to a new folder under the output folder, as `style-aligned generate` or `transfer` writes it."""


@dataclass(frozen=True, kw_only=True)
class PageSettings:
    """What the page may use on the server.

    Attributes:
        out: The output folder: every set goes into a new folder in it.
        model: The model as the command line names it (recorded in the sets' sidecars).
        lora_dir: The folder of the LoRA files the page may use (none: no LoRAs).
        max_upload_bytes: The largest uploaded image, in bytes.
    """

    out: Path
    model: str
    lora_dir: Path | None = None
    max_upload_bytes: int = 20_000_000

    @property
    def uploads(self) -> Path:
        """Where Gradio keeps uploads and the files it serves: under the output folder."""
        return self.out / APP_FOLDER / "cache"


def widget(option: Control, elem_prefix: str = "") -> Any:
    """The Gradio input of a setting, with its one-line help."""
    common: dict[str, Any] = {"label": option.label, "info": option.help, "elem_id": f"{elem_prefix}{option.name}"}
    if option.kind == "switch":
        value = next(name for name, setting in SWITCH.items() if setting == option.default)
        return gr.Radio(list(SWITCH), value=value, **common)
    if option.kind == "choice":
        return gr.Dropdown(list(option.choices), value=option.default, **common)
    if option.kind == "choices":
        return gr.CheckboxGroup(list(option.choices), value=list(option.default or []), **common)
    if option.kind == "slider" and option.bounds is not None:
        low, high = option.bounds
        return gr.Slider(minimum=low, maximum=high, value=option.initial, step=(high - low) / 100, **common)
    if option.kind in ("int", "float") and option.default is not None:
        return gr.Number(value=option.default, precision=0 if option.kind == "int" else None, **common)
    if option.kind == "list":
        return gr.Textbox(value=" ".join(map(str, option.default or [])), placeholder="e.g. 0, 1, 2", **common)
    text = option.default if isinstance(option.default, str) else ""
    return gr.Textbox(value=text, placeholder="default" if not text else None, **common)


def progress_html(view: JobView, number: int = 0) -> str:
    """The progress bar and state of job `number`."""
    fraction = f'value="{view.done}" max="{view.total}"' if view.total else ""
    state = "error" if view.error else "cancelled" if view.cancelled else "done" if view.finished else "running"
    notes = "".join(f"<div class='sa-note'>{html.escape(note)}</div>" for note in view.notes)
    return (
        f"<div class='sa-progress' data-state='{state}' data-job='{number}'><progress {fraction}></progress>"
        f" <span class='sa-progress-text'>{html.escape(view.text)}</span>{notes}</div>"
    )


def message_html(text: str) -> str:
    """A message about the input, in place of a job's progress."""
    state = f"data-state='error' data-job='{next(NUMBERS)}'"
    return f"<div class='sa-progress' {state}><span class='sa-progress-text'>{html.escape(text)}</span></div>"


class PageParts:
    """The page's components, made in its layout by `build_page`: the settings on the left, the set and sweep tabs on
    the right."""

    memory: gr.State
    """The session's kept inversion (see `Inversions`)."""

    def settings_column(self, settings: PageSettings) -> None:
        """The prompts, the reference, the set's settings, the StyleAligned options and the LoRAs."""
        self.prompts = gr.Textbox(label="Prompts, one per line", lines=5, elem_id="prompts")
        self.reference = gr.Radio(list(REFERENCES), value=REFERENCES[0], label="Reference", elem_id="reference")
        with gr.Group(visible=False) as self.reference_prompt_group:
            self.reference_prompt = widget(control("generate", "reference_prompt"))
        with gr.Group(visible=False) as self.upload_group:
            self.upload = gr.File(label="Reference image", file_types=["image"], elem_id="upload")
            self.upload_preview = gr.Image(label="Uploaded image", interactive=False, elem_id="upload-preview")
            transfer_inputs = {name: widget(control("transfer", name)) for name in TRANSFER_CONTROLS}
        with gr.Accordion("Set", open=True):
            set_inputs = {name: widget(control("generate", name)) for name in SET_CONTROLS}
        with gr.Accordion("StyleAligned options", open=False):
            style_inputs = {name: widget(control("generate", name)) for name in STYLE_CONTROLS}
        with gr.Accordion("LoRAs", open=False):
            available = ", ".join(loras(settings.lora_dir)) or "none"
            self.lora_text = gr.Textbox(
                label="LoRAs, one NAME[:SCALE] per line",
                info=f"files of the LoRA folder ({available})" if settings.lora_dir else "off (see --lora-dir)",
                lines=2,
                interactive=settings.lora_dir is not None,
                elem_id="loras",
            )
        self.values: dict[str, Any] = {**set_inputs, **style_inputs, **transfer_inputs}

    def set_tab(self) -> None:
        """The set's buttons, progress, preview, images, grid and zip."""
        with gr.Row():
            self.make = gr.Button("Make the set", variant="primary", elem_id="make")
            self.cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
        self.progress = gr.HTML(progress_html(JobView(text="")), elem_id="progress")
        with gr.Row():
            self.preview = gr.Image(label="Reference, denoising", interactive=False, elem_id="preview")
            self.download = gr.File(label="The set as a zip", interactive=False, elem_id="download")
        self.gallery = gr.Gallery(label="The set", columns=4, elem_id="gallery")
        self.grid = gr.Image(label="Labelled grid", interactive=False, elem_id="grid")

    def sweep_tab(self) -> None:
        """The sweep's grid, buttons, progress, contact sheet and zip."""
        gr.Markdown("One set per setting of a grid of options, with the prompts and settings.")
        self.sweep_grid = gr.Textbox(
            label="Grid, one NAME=V1,V2,... per line",
            info=GRID_HELP,
            lines=2,
            elem_id="sweep-grid",
        )
        with gr.Row():
            self.sweep = gr.Button("Run the sweep", variant="primary", elem_id="sweep")
            self.sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
        self.sweep_progress = gr.HTML(progress_html(JobView(text="")), elem_id="sweep-progress")
        self.contact_sheet = gr.Image(label="Contact sheet", interactive=False, elem_id="contact-sheet")
        self.sweep_download = gr.File(label="The sweep, zipped", interactive=False, elem_id="sweep-download")

    def inputs(self) -> set[Block]:
        """The components a job reads."""
        fixed = (self.prompts, self.reference, self.upload, self.lora_text, self.memory, self.reference_prompt)
        return {*fixed, *self.values.values()}


class PageJobs:
    """What the page's buttons do: read the page into a job, run it in the studio and show its progress."""

    def __init__(self, studio: Studio, settings: PageSettings, parts: PageParts) -> None:
        self.studio, self.settings, self.parts = studio, settings, parts

    def spec_values(self, data: dict[Any, Any], command: Command) -> dict[str, Any]:
        """The values of the spec's fields on the page (see `read_spec`)."""
        parts = self.parts
        lines = prompt_lines(data[parts.prompts])
        if not lines:
            raise ValueError("no prompt: write at least one prompt, one per line")
        given: dict[str, Any] = {"prompts": lines}
        if data[parts.reference] == REFERENCES[1]:
            if not (text := (data[parts.reference_prompt] or "").strip()):
                raise ValueError("no reference prompt: write one, or choose the first prompt as the reference")
            given["reference_prompt"] = text
        if lora := lora_values(data[parts.lora_text], self.settings.lora_dir):
            given["loras"] = lora
        page_values = {name: data[component] for name, component in parts.values.items()}
        return spec_values(command, page_values, **given)

    def set_work(self, data: dict[Any, Any]) -> Callable[[Job, Any], None]:
        """The job of the set button: a set from the prompts, or a transfer from the uploaded image."""
        parts, settings = self.parts, self.settings
        if data[parts.reference] != REFERENCES[2]:
            spec = read_spec(SetSpec, self.spec_values(data, "generate"))
            spec.check()
            return lambda job, sd: make_generate_set(job, sd, spec, model=settings.model, out=settings.out)
        if not data[parts.upload]:
            raise ValueError("no reference image: upload one, or choose a prompt as the reference")
        path = Path(data[parts.upload])
        values = self.spec_values(data, "transfer")
        caption = str(control("transfer", "captions").parse(data[parts.values["captions"]]) or "").strip()
        if not caption:
            raise ValueError("no caption: describe the reference image in a few words")
        image = read_upload(path, uploads=settings.uploads, max_bytes=settings.max_upload_bytes)
        memory: Inversions = data[parts.memory]
        return lambda job, sd: make_transfer_set(
            job,
            sd,
            values,
            model=settings.model,
            out=settings.out,
            image=image,
            caption=caption,
            upload=path,
            memory=memory,
        )

    def sweep_work(self, data: dict[Any, Any]) -> Callable[[Job, Any], None]:
        """The job of the sweep button: one set per setting of the grid."""
        parts, settings = self.parts, self.settings
        grid_lines = prompt_lines(data[parts.sweep_grid])
        if data[parts.reference] == REFERENCES[2]:
            raise ValueError("a sweep takes its reference from the prompts: choose a prompt as the reference")
        if not grid_lines:
            raise ValueError("no grid: give at least one NAME=V1,V2,... line (e.g. shared_score_shift=0,0.69)")
        spec, grid = sweep_inputs(self.spec_values(data, "sweep"), grid_lines)
        return lambda job, sd: make_sweep(job, sd, spec, settings=grid, model=settings.model, out=settings.out)

    def run(
        self,
        data: dict[Any, Any],
        request: gr.Request,
        make_work: Callable[[dict[Any, Any]], Callable[[Job, Any], None]],
    ) -> Iterator[tuple[Any, ...]]:
        """Run the job that `make_work` reads from the page, yielding the set outputs that change as it goes."""
        try:
            work = make_work(data)
        except ValueError as error:
            gr.Warning(str(error))
            yield message_html(str(error)), *(_skip(),) * 5
            return
        job = Job(request.session_hash or "")
        thread = self.studio.submit(job, work)
        shown = -1
        sent: dict[str, Any] = {}
        try:
            while True:
                view = job.wait(shown, timeout=0.5)
                shown = view.version
                if view.finished and view.error:
                    gr.Warning(view.error)
                yield tuple(_changed(sent, view, job.number, data[self.parts.memory]))
                if view.finished:
                    break
        finally:
            if not job.view.finished:  # the page went away: stop the job
                job.cancel()
                thread.join()

    def make_set(self, data: dict[Any, Any], request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """The set button."""
        yield from self.run(data, request, self.set_work)

    def make_sweep(self, data: dict[Any, Any], request: gr.Request) -> Iterator[tuple[Any, ...]]:
        """The sweep button."""
        for progress_value, _, _, grid_value, download_value, _ in self.run(data, request, self.sweep_work):
            yield progress_value, grid_value, download_value

    def cancel(self, request: gr.Request) -> None:
        """The cancel buttons."""
        self.studio.cancel(request.session_hash or "")

    def check_upload(self, path: str | None) -> Any:
        """The uploaded image, shown once read (a bad file is a warning)."""
        if not path:
            return None
        try:
            return read_upload(path, uploads=self.settings.uploads, max_bytes=self.settings.max_upload_bytes)
        except ValueError as error:
            gr.Warning(str(error))
            return None

    def model_updates(self) -> Iterator[str]:
        """The model's state, until it is loaded."""
        while not self.studio.state.loaded.is_set():
            yield self.studio.model_text()
            time.sleep(0.5)
        yield self.studio.model_text()


def show_reference(choice: str) -> tuple[Any, Any]:
    """Show the reference prompt or the upload, as the reference chosen."""
    return gr.update(visible=choice == REFERENCES[1]), gr.update(visible=choice == REFERENCES[2])


def build_page(studio: Studio, settings: PageSettings) -> gr.Blocks:
    """The app's page (a Gradio `Blocks`); launch it with `launch`."""
    parts = PageParts()
    with gr.Blocks(title="StyleAligned sets", analytics_enabled=False) as page:
        gr.Markdown(INTRODUCTION)
        model_state = gr.Markdown(studio.model_text(), elem_id="model-state")
        parts.memory = gr.State(Inversions)
        with gr.Row():
            with gr.Column(scale=2):
                parts.settings_column(settings)
            with gr.Column(scale=3), gr.Tabs():
                with gr.Tab("Set", elem_id="set-tab"):
                    parts.set_tab()
                with gr.Tab("Sweep", elem_id="sweep-tab"):
                    parts.sweep_tab()
        jobs = PageJobs(studio, settings, parts)
        set_outputs = [parts.progress, parts.preview, parts.gallery, parts.grid, parts.download, parts.memory]
        job_options: dict[str, Any] = {"concurrency_id": "jobs", "concurrency_limit": 1}
        parts.make.click(jobs.make_set, parts.inputs(), set_outputs, **job_options)
        parts.cancel.click(jobs.cancel, None, None, queue=False)
        sweep_outputs = [parts.sweep_progress, parts.contact_sheet, parts.sweep_download]
        parts.sweep.click(jobs.make_sweep, parts.inputs() | {parts.sweep_grid}, sweep_outputs, **job_options)
        parts.sweep_cancel.click(jobs.cancel, None, None, queue=False)
        groups = [parts.reference_prompt_group, parts.upload_group]
        parts.reference.change(show_reference, parts.reference, groups, queue=False)
        parts.upload.change(jobs.check_upload, parts.upload, parts.upload_preview, concurrency_limit=None)
        page.load(jobs.model_updates, None, model_state, concurrency_limit=None)
    return page


def _skip() -> Any:
    """No change to an output."""
    return gr.skip()  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]


def _changed(sent: dict[str, Any], view: JobView, number: int, memory: Any) -> list[Any]:
    """The outputs of a set job that changed since they were last sent (`_skip()` for the others)."""
    values = {
        "progress": progress_html(view, number),
        "preview": view.preview,
        "gallery": [(str(path), caption) for path, caption in view.images],
        "grid": str(view.grid) if view.grid else None,
        "download": str(view.archive) if view.archive else None,
    }
    outputs: list[Any] = []
    for name, value in values.items():
        same = name in sent and (sent[name] is value if name == "preview" else sent[name] == value)
        outputs.append(_skip() if same else value)
        sent[name] = value
    outputs.append(memory)
    return outputs


def launch(
    studio: Studio,
    settings: PageSettings,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Serve the page on `host:port` (no public share link), one job at a time.

    Gradio's uploads and served files are kept under the output folder, and the only folder it may serve besides
    its own files is the output folder.

    Args:
        studio: The model and the jobs.
        settings: What the page may use.
        host: The address to listen on: `127.0.0.1` serves this machine only.
        port: The port.
        block: Whether to serve until interrupted (otherwise return once the server is up).
        quiet: Print nothing.

    Returns:
        The page's local URL.
    """
    settings.uploads.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(settings.uploads.resolve())  # read when the page's components are made
    page = build_page(studio, settings)
    page.queue(default_concurrency_limit=1)
    _, url, _ = page.launch(
        server_name=host,
        server_port=port,
        share=False,
        prevent_thread_lock=True,
        quiet=quiet,
        max_file_size=settings.max_upload_bytes,
        allowed_paths=[str(settings.out.resolve())],
        ssr_mode=False,
        mcp_server=False,
        footer_links=[],
        theme=Base(font=SYSTEM_FONTS, font_mono=["ui-monospace", "monospace"]),
    )
    if block:
        page.block_thread()
    return url
