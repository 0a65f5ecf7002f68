"""From config to training run: `trainfit train` (a LLaMA-Factory run that measures memory and time per step
and logs predicted vs measured) and `trainfit calibrate` (per-GPU allocator overheads fitted from that log).

Modules: record (the calibration log's schema, reading and appending), calibrate (the fit, the profile and
the hook that `estimate`, `check` and `solve` use), run (preflight check and the training run; imports torch
and LLaMA-Factory only inside `run_training`), callback (the transformers TrainerCallback that measures).
"""

from .calibrate import Profile, active_calibration, calibrate_log, load_profile
from .record import LOG_SCHEMA, Record, append_record, default_log_path, read_log

__all__ = ["LOG_SCHEMA", "Profile", "Record", "active_calibration", "append_record", "calibrate_log",
           "default_log_path", "load_profile", "read_log"]
