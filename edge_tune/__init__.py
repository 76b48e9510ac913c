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
from .run import AdaptResult, RunPlan, RunRequest, adapt, plan_run
from .search import TuneRequest, TuneResult, tune
from .trainer import TrainConfig, TrainResult, train

__all__ = [
    "AdaptResult", "Base", "BudgetError", "DataError", "DeviceProfile", "EdgeTuneError", "Manifest", "MethodSpec",
    "Patch", "PatchBank", "PatchError", "Prediction", "ProfileError", "RunPlan", "RunRequest", "TrainConfig",
    "TrainResult", "TuneRequest", "TuneResult", "adapt", "load_base", "load_patch", "load_profile", "plan_run",
    "save_patch", "train", "tune",
]  # fmt: skip
__version__ = "0.1.0"
