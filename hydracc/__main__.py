"""``python -m hydracc`` runs the command line."""

from hydracc.cli import main

main()
