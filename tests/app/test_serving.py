"""What the app serves, and to whom: this machine only by default, and no file outside its output folder.

The app runs as a user starts it, on a model folder that holds no model: the page is served while the model loads
(here, fails to load), so nothing heavy is built.
"""

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from style_aligned.cli import build_parser
from tests.app.browser import RunningApp, get, listening_addresses, other_address, running_app


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    root = tmp_path_factory.mktemp("serving")
    (root / "no-model").mkdir()
    (root / "secret.txt").write_text("not for the page")
    (root / "sets").mkdir()
    (root / "sets" / "inside.txt").write_text("a file of the output folder")
    with running_app(root / "no-model", root / "sets") as running:
        yield running


def test_the_command_listens_on_loopback_by_default() -> None:
    args = build_parser().parse_args(["app", "--model", "models/sd1"])
    assert (args.host, args.port, args.out, args.lora_dir) == ("127.0.0.1", 7860, Path("sets"), None)


def test_requests_from_outside_loopback_are_not_served(app: RunningApp) -> None:
    assert get(app.url) == 200
    assert listening_addresses(app.port) == {"127.0.0.1"}
    address = other_address()
    if address is not None:  # the machine's other interface: nobody listens there
        assert get(f"http://{address}:{app.port}/", timeout=3) == 0


def test_the_page_reads_no_file_outside_the_output_folder(app: RunningApp) -> None:
    secret = app.out.parent / "secret.txt"
    for path in (secret, app.out / ".." / "secret.txt", Path("/etc/passwd"), Path(__file__)):
        assert get(f"{app.url}gradio_api/file={quote(str(path))}") in (403, 404), path
    assert get(f"{app.url}gradio_api/file={quote(str(app.out.resolve() / 'inside.txt'))}") == 200


def test_a_model_that_does_not_load_is_said_on_the_page_and_the_server_goes_on(app: RunningApp) -> None:
    from tests.app.browser import browser

    with browser() as chromium:
        page = chromium.new_page()
        page.goto(app.url)
        page.wait_for_selector("#model-state:has-text('could not be loaded')", timeout=60_000)
        page.locator("#prompts textarea").fill("a toy train")
        page.locator("#make").click()
        page.wait_for_selector("#progress .sa-progress[data-state=error]", timeout=30_000)
        assert "could not be loaded" in page.locator("#progress").inner_text()
    assert get(app.url) == 200 and app.process.poll() is None
