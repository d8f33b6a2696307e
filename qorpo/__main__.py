"""`python -m qorpo …` (and `accelerate launch -m qorpo …`): the same CLI as `qorpo …`."""

from qorpo.cli import main

main()
