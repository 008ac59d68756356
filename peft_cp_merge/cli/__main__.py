"""``python -m peft_cp_merge.cli`` is ``peft-cp-merge`` (e.g. under ``accelerate launch -m peft_cp_merge.cli``)."""

import sys

from . import main

sys.exit(main())
