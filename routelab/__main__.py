"""``python -m routelab`` (what ``torchrun -m routelab`` starts on every rank)."""

from routelab.cli import main

main()
