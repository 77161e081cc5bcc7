"""The local web app (`style-aligned app`): make sets, style transfers and sweeps from a page, without the command line.

`page` lays out the page and serves it, `forms` turns the commands' options into its settings, `studio` holds the
model and runs one job at a time, `making` makes the sets as the commands do, `files` keeps every file under the
output folder, and `preview` shows the reference while it denoises.
"""
