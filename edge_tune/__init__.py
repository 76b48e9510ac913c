"""edge_tune: adapt a quantized, frozen transformer on the device it runs on, and ship tiny patches.

Importing this package loads torch and registers the edge_tune:: ops; it changes nothing process-wide.
The compiled kernels load on an op's first call (or load_base); the process settings a training or serving
process wants (rss.apply_process_settings) are applied by adapt, train, PatchBank and the CLI."""

from .bank import PatchBank, Prediction
from .base import Base, load_base
from .errors import BudgetError, DataError, EdgeTuneError, PatchError, ProfileError
from .methods import MethodSpec
from .patch import Manifest, Patch, load_patch, save_patch
from .profiles import DeviceProfile, load_profile

__all__ = [
    "Base", "BudgetError", "DataError", "DeviceProfile", "EdgeTuneError", "Manifest", "MethodSpec", "Patch",
    "PatchBank", "PatchError", "Prediction", "ProfileError", "load_base", "load_patch", "load_profile", "save_patch",
]  # fmt: skip
__version__ = "0.1.0"
