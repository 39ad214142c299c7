import sys

from uip2p_jax.cli import main

sys.exit(main())
