"""What the ``--jobs`` workers' fork server imports before it forks them: everything a conversion imports (torch,
transformers, PEFT, the pipeline), once for all the workers instead of once in each.

PEFT imports bitsandbytes wherever it is installed; the command line marks it unavailable unless a run needs it
(``cli._defer_bitsandbytes``) and says so in the environment (``names.DEFER_BITSANDBYTES``), which the fork server
inherits.
"""

import os
import sys

from .names import DEFER_BITSANDBYTES

if os.environ.get(DEFER_BITSANDBYTES) == "1" and "peft" not in sys.modules:
    sys.modules.setdefault("bitsandbytes", None)  # type: ignore[arg-type]

import peft  # noqa: E402, F401 - most of a conversion's import time (its tuners, transformers, accelerate)

from . import pipeline  # noqa: E402, F401
