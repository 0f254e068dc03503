"""Error types a user can cause (bad config, path or data). The CLI prints them in one line, exit code 2."""


class PosttrainError(ValueError):
    """A user-facing problem, described in one line."""


class ConfigError(PosttrainError):
    """A configuration problem: names the key and, for a misspelling, the closest valid key."""


class ModelLoadError(PosttrainError):
    """A model or tokenizer directory that cannot be used."""


class DataError(PosttrainError):
    """A data file or dataset row that cannot be used: names the file (or dataset) and the line (or row)."""


class InvariantError(PosttrainError):
    """A check that must hold during training failed (e.g. the first minibatch's probability ratio is not 1)."""


class WorkerError(PosttrainError):
    """backend ray: a worker hung past ray.timeout_s, died more often than ray.max_restarts allows, or returned
    weights whose checksum differs from the learner's. Names the worker."""


class WorkerTimeout(WorkerError):
    """backend ray: a remote call did not answer within ray.timeout_s (a hung worker). Names the worker and the call."""


class WorkerLost(WorkerError):
    """backend ray: a worker of a role that cannot be restarted alone (a learner rank: its optimizer state and
    process group) died during a call. `posttrain rl` restarts every role and resumes from the newest checkpoint
    while ray.max_restarts lasts."""

    def __init__(self, role: str, worker: int, label: str, method: str, reason: str):
        self.role, self.worker, self.label, self.method, self.reason = role, worker, label, method, reason
        super().__init__(f"{label} died during {method} ({reason}); the run stops (continue from the last "
                         "checkpoint with --resume)")

    def __reduce__(self):  # pickled with its fields (the default would call __init__ with the message alone)
        return type(self), (self.role, self.worker, self.label, self.method, self.reason)


class RunInterrupted(Exception):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint (not a user error: exit code 130)."""
