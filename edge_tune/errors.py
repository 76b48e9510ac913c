"""One error type for everything the user can get wrong; the CLI prints it as one line."""


class EdgeTuneError(Exception):
    """A problem the user can act on. Its one-line message reads `<what> (<where>) — <what to do>`;
    `where` (a file, file:line, or flag) and `fix` are optional and kept as attributes for callers."""

    def __init__(self, what: str, where: object = None, fix: str | None = None):
        self.what, self.where, self.fix = what, None if where is None else str(where), fix
        super().__init__(what + (f" ({self.where})" if self.where else "") + (f" — {fix}" if fix else ""))


class ProfileError(EdgeTuneError):
    """A device profile is missing, malformed or out of range."""


class DataError(EdgeTuneError):
    """A dataset file is missing, empty or malformed."""


class PatchError(EdgeTuneError):
    """A patch file is corrupt, incompatible with the base, or cannot be written."""


class BudgetError(EdgeTuneError):
    """A configuration cannot fit the device profile's memory budget; `need_mb`: the smallest budget that
    would hold it, where known."""

    def __init__(self, what: str, where: object = None, fix: str | None = None, need_mb: float | None = None):
        super().__init__(what, where, fix)
        self.need_mb = need_mb
