"""Running untrusted programs (model-written code) in a separate, limited process. See docs/rewards.md."""

from posttrain.sandbox.config import ExecResult, SandboxConfig, Status
from posttrain.sandbox.execute import run_humaneval, run_mbpp, run_program
from posttrain.sandbox.isolation import isolation_mode, probe
from posttrain.sandbox.pool import run_many

__all__ = ["ExecResult", "SandboxConfig", "Status", "isolation_mode", "probe", "run_humaneval", "run_many",
           "run_mbpp", "run_program"]
