"""`style-aligned app`: a local web page to make sets, style transfers and sweeps (needs the `app` extra)."""

import argparse
import os
from pathlib import Path

from style_aligned.cli.options import add_model_options, load_model
from style_aligned.extras import require
from style_aligned.weights.hub import parse_repo_id


def run_app(args: argparse.Namespace) -> None:
    """Check the options, start loading the model in the background and serve the page until interrupted."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before Gradio is imported
    require("gradio", extra="app", feature="the app")
    from style_aligned.app.page import PageSettings, launch
    from style_aligned.app.studio import Studio

    if not Path(args.model).exists() and parse_repo_id(str(args.model)) is None:
        raise FileNotFoundError(f"the model {args.model} is neither a file or folder nor a Hub repo id (org/name)")
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        raise FileNotFoundError(f"the LoRA folder {args.lora_dir} does not exist")
    if not 0 < args.max_upload_mb <= 1000:
        raise ValueError(f"--max-upload-mb must be in (0, 1000], got {args.max_upload_mb}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    settings = PageSettings(
        out=args.out.resolve(),
        model=str(args.model),
        lora_dir=args.lora_dir,
        max_upload_bytes=int(args.max_upload_mb * 1e6),
    )
    studio = Studio(load=lambda: load_model(args), description=str(args.model))
    studio.start_loading()
    launch(studio, settings, host=args.host, port=args.port)


def add_app_command(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve a local web page to make style-consistent sets, style transfers from an uploaded image and sweeps,"
        " with every option of generate, transfer and sweep. The model is loaded once; jobs run one at a time. Each"
        " set is written to a new folder under --out, as generate or transfer writes it. The page listens on"
        " 127.0.0.1 (this machine only) unless --host says otherwise, and never makes a public share link."
    )
    add_model_options(parser)
    group = parser.add_argument_group("app")
    group.add_argument("--out", type=Path, default=Path("sets"), metavar="DIR", help="where sets go (default: sets)")
    group.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0: every network it is on)",
    )
    group.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    group.add_argument("--lora-dir", type=Path, metavar="DIR", help="LoRA files the page may use (default: none)")
    group.add_argument(
        "--max-upload-mb", type=float, default=20.0, metavar="MB", help="largest uploaded image (default: 20 MB)"
    )
    parser.set_defaults(command=run_app)
