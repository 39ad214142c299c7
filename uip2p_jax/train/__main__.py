"""`python -m uip2p_jax.train ...` is `uip2p train ...`."""

import sys

from uip2p_jax.train.loop import main

sys.exit(main())
