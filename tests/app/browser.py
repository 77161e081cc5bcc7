"""Driving the app: start `style-aligned app` as a user does, and work its page in headless Chromium.

The browser is the distribution's Chromium (`apt-get install chromium`), driven by Playwright through its
`executable_path`; no browser is downloaded.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from playwright.sync_api import sync_playwright

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def other_address() -> str | None:
    """An IPv4 address of this machine that is not a loopback address, if it has one."""
    candidates: list[str] = []
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    return next((address for address in candidates if not address.startswith("127.")), None)


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses a socket listens on at `port`, read from /proc/net/tcp (Linux)."""
    addresses: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:  # 0A: LISTEN
            addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def get(url: str, timeout: float = 5.0) -> int:
    """The HTTP status of a GET (0 if the connection is refused or fails)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, OSError):
        return 0


@dataclass
class RunningApp:
    url: str
    port: int
    out: Path
    model: Path
    log: Path
    process: subprocess.Popen[bytes]


@contextmanager
def running_app(model: Path, out: Path, *extra: str, timeout: float = 180.0) -> Iterator[RunningApp]:
    """Run `style-aligned app` in a process of its own until the block ends; wait until its page answers."""
    port = free_port()
    log = out.parent / f"app-{port}.log"
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "style_aligned.cli", "app", "--model", str(model), "--out", str(out)]
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, "--port", str(port), *extra], stdout=log_file, stderr=subprocess.STDOUT, env=environment
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + timeout
            while get(url) != 200:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the app did not start:\n{log.read_text()}")
                time.sleep(0.5)
            yield RunningApp(url, port, out, model, log, process)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def browser() -> Iterator[Any]:
    """Headless Chromium from the distribution, driven by Playwright."""
    if not Path(CHROMIUM).exists():
        raise RuntimeError("the app's tests need Chromium: apt-get install chromium")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def field(page: Any, name: str) -> Any:
    """The text input or text area of a setting on the page."""
    return page.locator(f"#{name}").locator("textarea, input").first


def open_section(page: Any, title: str) -> None:
    """Open a closed section (accordion) of the settings."""
    button = page.locator("button.label-wrap", has_text=title).first
    if "open" not in (button.get_attribute("class") or ""):
        button.click()


SETTLE_MS = 500  # how long a value must hold before it counts as set


def keep(page: Any, set_values: Callable[[], Any], changed: str, what: str) -> None:
    """Set values on the page and make sure they hold.

    A section that has just opened or appeared mounts its inputs, and their first values can land just after the
    values were set and replace them; so the values are watched for a moment and set again if they changed.

    Args:
        page: The page.
        set_values: Sets the values; returns the argument of `changed` (element handles, taken after setting).
        changed: A JavaScript function of that argument: whether any value changed.
        what: The values, as the error names them.
    """
    for _ in range(5):
        argument = set_values()
        try:
            page.wait_for_function(changed, arg=argument, timeout=SETTLE_MS)
        except PlaywrightTimeoutError:
            return
    raise AssertionError(f"the page did not keep {what}")


def fill(page: Any, **settings: Any) -> None:
    """Fill settings by name (`prompts` takes a list); the values hold (see `keep`)."""
    targets = [
        (field(page, name), "\n".join(value) if isinstance(value, list) else str(value))
        for name, value in settings.items()
    ]

    def set_values() -> list[list[Any]]:
        for target, text in targets:
            target.fill(text)
            target.blur()
        return [[target.element_handle(), text] for target, text in targets]

    changed = "pairs => pairs.some(([element, text]) => element.value !== text)"
    keep(page, set_values, changed, f"the values of {', '.join(settings)}")


def choose(page: Any, name: str, choice: str) -> None:
    """Pick a choice of a radio setting; the choice holds (see `keep`)."""
    option = page.locator(f"#{name}").get_by_label(choice, exact=True)

    def set_values() -> Any:
        option.check()
        return option.element_handle()

    keep(page, set_values, "element => !element.checked", f"{choice!r} for {name}")


def run_job(page: Any, button: str = "make", element: str = "progress", timeout: float = 300.0) -> str:
    """Click a button that starts a job and wait until that job ends; its state (`done`, `error` or `cancelled`)."""
    started = start_job(page, button, element)
    return wait_until_ended(page, started, element, timeout)


def start_job(page: Any, button: str = "make", element: str = "progress") -> str:
    """Click a button that starts a job; the number of the job shown before, to wait for the new one's end."""
    before = page.locator(f"#{element} .sa-progress").first.get_attribute("data-job") or ""
    page.locator(f"#{button}").click()
    return before


def wait_until_ended(page: Any, before: str, element: str = "progress", timeout: float = 300.0) -> str:
    """Wait until a job other than job `before` has ended on the page; its state."""
    page.wait_for_function(
        """([element, before]) => {
            const shown = document.querySelector(`#${element} .sa-progress`);
            const ended = shown && ["done", "error", "cancelled"].includes(shown.dataset.state);
            return ended && shown.dataset.job !== before;
        }""",
        arg=[element, before],
        timeout=timeout * 1000,
    )
    return page.locator(f"#{element} .sa-progress").first.get_attribute("data-state") or ""


def progress_text(page: Any, element: str = "progress") -> str:
    return page.locator(f"#{element}").inner_text()


def set_folders(out: Path) -> list[Path]:
    return sorted(path for path in out.iterdir() if path.is_dir() and not path.name.startswith("."))


def sidecar(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "set.json").read_text())
