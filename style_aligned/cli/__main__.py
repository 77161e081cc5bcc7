"""`python -m style_aligned.cli`: the `style-aligned` command."""

from style_aligned.cli import main

main()
