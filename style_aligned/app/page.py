"""The page: a Gradio app to make style-consistent sets without the command line.

The settings on the left are the options of `generate`, `transfer` and `sweep` (see `forms`); the right shows the
progress, a preview of the reference while it denoises, the set, its grid and a zip of it, or a sweep's contact
sheet. Jobs run one at a time on the server (see `studio`), each set in a new folder under the output folder.
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
    command_args,
    control,
    lora_arguments,
    loras,
    prompt_lines,
)
from style_aligned.app.making import Inversions, make_generate_set, make_sweep, make_transfer_set
from style_aligned.app.studio import NUMBERS, Job, JobView, Studio

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


def build_page(studio: Studio, settings: PageSettings) -> gr.Blocks:
    """The app's page (a Gradio `Blocks`); launch it with `launch`."""
    with gr.Blocks(title="StyleAligned sets", analytics_enabled=False) as page:
        gr.Markdown(INTRODUCTION)
        model_state = gr.Markdown(studio.model_text(), elem_id="model-state")
        memory = gr.State(Inversions)
        with gr.Row():
            with gr.Column(scale=2):
                prompts = gr.Textbox(label="Prompts, one per line", lines=5, elem_id="prompts")
                reference = gr.Radio(list(REFERENCES), value=REFERENCES[0], label="Reference", elem_id="reference")
                with gr.Group(visible=False) as reference_prompt_group:
                    reference_prompt = widget(control("generate", "reference_prompts"))
                with gr.Group(visible=False) as upload_group:
                    upload = gr.File(label="Reference image", file_types=["image"], elem_id="upload")
                    upload_preview = gr.Image(label="Uploaded image", interactive=False, elem_id="upload-preview")
                    transfer_inputs = {name: widget(control("transfer", name)) for name in TRANSFER_CONTROLS}
                with gr.Accordion("Set", open=True):
                    set_inputs = {name: widget(control("generate", name)) for name in SET_CONTROLS}
                with gr.Accordion("StyleAligned options", open=False):
                    style_inputs = {name: widget(control("generate", name)) for name in STYLE_CONTROLS}
                with gr.Accordion("LoRAs", open=False):
                    available = ", ".join(loras(settings.lora_dir)) or "none"
                    lora_text = gr.Textbox(
                        label="LoRAs, one NAME[:SCALE] per line",
                        info=f"files of the LoRA folder ({available})" if settings.lora_dir else "off (see --lora-dir)",
                        lines=2,
                        interactive=settings.lora_dir is not None,
                        elem_id="loras",
                    )
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Set", elem_id="set-tab"):
                        with gr.Row():
                            make = gr.Button("Make the set", variant="primary", elem_id="make")
                            cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
                        progress = gr.HTML(progress_html(JobView(text="")), elem_id="progress")
                        with gr.Row():
                            preview = gr.Image(label="Reference, denoising", interactive=False, elem_id="preview")
                            download = gr.File(label="The set as a zip", interactive=False, elem_id="download")
                        gallery = gr.Gallery(label="The set", columns=4, elem_id="gallery")
                        grid = gr.Image(label="Labelled grid", interactive=False, elem_id="grid")
                    with gr.Tab("Sweep", elem_id="sweep-tab"):
                        gr.Markdown("One set per setting of a grid of options, with the prompts and settings.")
                        sweep_grid = gr.Textbox(
                            label="Grid, one NAME=V1,V2,... per line",
                            info=control("sweep", "grid").help,
                            lines=2,
                            elem_id="sweep-grid",
                        )
                        with gr.Row():
                            sweep = gr.Button("Run the sweep", variant="primary", elem_id="sweep")
                            sweep_cancel = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
                        sweep_progress = gr.HTML(progress_html(JobView(text="")), elem_id="sweep-progress")
                        contact_sheet = gr.Image(label="Contact sheet", interactive=False, elem_id="contact-sheet")
                        sweep_download = gr.File(label="The sweep, zipped", interactive=False, elem_id="sweep-download")

        values = {**set_inputs, **style_inputs, **transfer_inputs}
        inputs: set[Block] = {prompts, reference, upload, lora_text, memory, reference_prompt, *values.values()}

        def page_args(data: dict[Any, Any], command: Command, **given: Any) -> Any:
            lines = prompt_lines(data[prompts])
            if not lines:
                raise ValueError("no prompt: write at least one prompt, one per line")
            page_values = {name: data[component] for name, component in values.items()}
            references = None
            if data[reference] == REFERENCES[1]:
                if not (text := (data[reference_prompt] or "").strip()):
                    raise ValueError("no reference prompt: write one, or choose the first prompt as the reference")
                references = [text]
            loras = lora_arguments(data[lora_text], settings.lora_dir)
            return command_args(
                command,
                page_values,
                prompts=lines,
                reference_prompts=references,
                lora=loras or None,
                model=settings.model,
                **given,
            )

        def set_work(data: dict[Any, Any]) -> Callable[[Job, Any], None]:
            if data[reference] != REFERENCES[2]:
                args = page_args(data, "generate")
                return lambda job, sd: make_generate_set(job, sd, args, out=settings.out)
            if not data[upload]:
                raise ValueError("no reference image: upload one, or choose a prompt as the reference")
            path = Path(data[upload])
            args = page_args(data, "transfer", images=[path])
            caption = str(args.captions or "").strip()
            if not caption:
                raise ValueError("no caption: describe the reference image in a few words")
            args.captions = [caption]
            image = read_upload(path, uploads=settings.uploads, max_bytes=settings.max_upload_bytes)
            memory_value: Inversions = data[memory]
            return lambda job, sd: make_transfer_set(
                job, sd, args, out=settings.out, image=image, upload=path, memory=memory_value
            )

        def sweep_work(data: dict[Any, Any]) -> Callable[[Job, Any], None]:
            grid_lines = prompt_lines(data[sweep_grid])
            if data[reference] == REFERENCES[2]:
                raise ValueError("a sweep takes its reference from the prompts: choose a prompt as the reference")
            if not grid_lines:
                raise ValueError("no grid: give at least one NAME=V1,V2,... line (e.g. shared_score_shift=0,0.69)")
            args = page_args(data, "sweep", grid=grid_lines, clip=None, dino=None, text_until=None)
            return lambda job, sd: make_sweep(job, sd, args, out=settings.out)

        def run(
            data: dict[Any, Any], request: gr.Request, make_work: Callable[[dict[Any, Any]], Callable[[Job, Any], None]]
        ) -> Iterator[tuple[Any, ...]]:
            try:
                work = make_work(data)
            except ValueError as error:
                gr.Warning(str(error))
                yield message_html(str(error)), *(_skip(),) * 5
                return
            job = Job(request.session_hash or "")
            thread = studio.submit(job, work)
            shown = -1
            sent: dict[str, Any] = {}
            try:
                while True:
                    view = job.wait(shown, timeout=0.5)
                    shown = view.version
                    if view.finished and view.error:
                        gr.Warning(view.error)
                    yield tuple(_changed(sent, view, job.number, data[memory]))
                    if view.finished:
                        break
            finally:
                if not job.view.finished:  # the page went away: stop the job
                    job.cancel()
                    thread.join()

        def make_set(data: dict[Any, Any], request: gr.Request) -> Iterator[tuple[Any, ...]]:
            yield from run(data, request, set_work)

        def make_sweep_set(data: dict[Any, Any], request: gr.Request) -> Iterator[tuple[Any, ...]]:
            for progress_value, _, _, grid_value, download_value, _ in run(data, request, sweep_work):
                yield progress_value, grid_value, download_value

        def cancel_job(request: gr.Request) -> None:
            studio.cancel(request.session_hash or "")

        def show_reference(choice: str) -> tuple[Any, Any]:
            return gr.update(visible=choice == REFERENCES[1]), gr.update(visible=choice == REFERENCES[2])

        def check_upload(path: str | None) -> Any:
            if not path:
                return None
            try:
                return read_upload(path, uploads=settings.uploads, max_bytes=settings.max_upload_bytes)
            except ValueError as error:
                gr.Warning(str(error))
                return None

        def model_updates() -> Iterator[str]:
            while not studio.state.loaded.is_set():
                yield studio.model_text()
                time.sleep(0.5)
            yield studio.model_text()

        set_outputs = [progress, preview, gallery, grid, download, memory]
        job_options: dict[str, Any] = {"concurrency_id": "jobs", "concurrency_limit": 1}
        make.click(make_set, inputs, set_outputs, **job_options)
        cancel.click(cancel_job, None, None, queue=False)
        sweep_outputs = [sweep_progress, contact_sheet, sweep_download]
        sweep.click(make_sweep_set, inputs | {sweep_grid}, sweep_outputs, **job_options)
        sweep_cancel.click(cancel_job, None, None, queue=False)
        reference.change(show_reference, reference, [reference_prompt_group, upload_group], queue=False)
        upload.change(check_upload, upload, upload_preview, concurrency_limit=None)
        page.load(model_updates, None, model_state, concurrency_limit=None)
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
