"""``python -m megavlm`` (and ``torchrun -m megavlm train ...``): the megavlm command."""
import sys

from megavlm.cli import main

sys.exit(main())
