"""One error type for everything the user can get wrong; the CLI prints it as one line."""


class EdgeTuneError(Exception):
    """A problem the user can act on: the message says what, where, and what to do."""


class ProfileError(EdgeTuneError):
    """A device profile is missing, malformed or out of range."""


class DataError(EdgeTuneError):
    """A dataset file is missing, empty or malformed."""


class PatchError(EdgeTuneError):
    """A patch file is corrupt, incompatible with the base, or cannot be written."""


class BudgetError(EdgeTuneError):
    """A configuration cannot fit the device profile's memory budget."""
