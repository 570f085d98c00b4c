"""Why the offline model cannot model a launch: the exceptions it raises (and records in rows)."""


class OfflineError(RuntimeError):
    """The offline model cannot model this launch (the message says why)."""


class LoopMismatch(OfflineError):
    """The launch's ``loops`` do not match the loops of the compiled code."""


class TritonApiMismatch(OfflineError):
    """This Triton's internals differ from what the offline compile path uses."""
