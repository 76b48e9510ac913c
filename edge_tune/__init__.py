"""edge_tune: adapt a quantized, frozen transformer on the device it runs on, and ship tiny patches.

Importing this package loads torch and the custom ops' references, never the compiled extension."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here ever downloads; make interop code agree

from .rss import limit_heap_growth

limit_heap_growth()

from .bank import PatchBank, Prediction  # noqa: E402
from .base import Base, load_base  # noqa: E402
from .errors import BudgetError, DataError, EdgeTuneError, PatchError, ProfileError  # noqa: E402
from .methods import MethodSpec  # noqa: E402
from .patch import Manifest, Patch, load_patch, save_patch  # noqa: E402
from .profiles import DeviceProfile, load_profile  # noqa: E402

__all__ = [
    "Base", "BudgetError", "DataError", "DeviceProfile", "EdgeTuneError", "Manifest", "MethodSpec", "Patch",
    "PatchBank", "PatchError", "Prediction", "ProfileError", "load_base", "load_patch", "load_profile", "save_patch",
]  # fmt: skip
__version__ = "0.1.0"
