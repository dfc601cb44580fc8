"""`python -m sn_lightning` is `python -m sn_lightning.fit`."""

from sn_lightning.fit import main

main()
