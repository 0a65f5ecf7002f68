"""Names the dead-code check (vulture, tests/test_house.py) must not report: each is read by a framework, not by
trainfit's own code. Anything else vulture finds is dead and goes. Nothing runs this file: vulture reads the
attribute names below as uses.

- pydantic: `model_config`, validators, and fields of output models that are serialized (JSON output, the
  calibration log and profile) rather than read by trainfit;
- typer: enum members are the choices of a flag, commands are called by the app, `__signature__` is what typer reads;
- transformers: TrainerCallback hooks (`on_*`, with their `control` argument);
- attributes set on library objects (transformers configs, bitsandbytes/PEFT modules, the CP-SAT solver's
  parameters) that those libraries read;
- arguments of patched library functions that keep the library's signature.
"""

_ = object

# pydantic
_.model_config
_._consistent, _._check, _._file_or_summary, _._positive, _._engines, _._drop_single, _._stage, _._stage_fits  # validators, serializers
_.saves_bytes, _.architecture, _.hidden_act, _.interconnect_source  # serialized fields
_.mean_tokens, _.max_tokens, _.tokenizer_id, _.from_cache  # shown by `trainfit data --json`
_.collective_bytes, _.pcie_offload_bytes, _.host_short  # multi-GPU JSON output
_.schema_, _.source_log  # calibration log and profile
_.forward_backward_s, _.optimizer_s, _.other_s, _.allocated_bytes, _.device_bytes  # calibration record fields

# typer
_.auto, _.disabled, _.sdpa, _.fa2  # --flash-attn choices
_.adamw_torch, _.adamw_torch_fused, _.adamw_8bit, _.adamw_bnb_8bit, _.paged_adamw_8bit, _.sgd  # --optim choices
_.brute, _.best_quality, _.fastest  # --solver, --pick choices
_.trace  # the `trace` command
_.__signature__

# transformers TrainerCallback hooks
_.on_step_begin, _.on_substep_end, _.on_pre_optimizer_step, _.on_optimizer_step, _.on_step_end, _.on_log
_.control

# attributes libraries read (transformers, bitsandbytes, PEFT, OR-Tools)
_.use_cache, _.is_quantized, _.quantization_method, _.is_loaded_in_4bit, _.is_loaded_in_8bit
_.param_names, _.compress_statistics, _.bnb_quantized, _.has_fp16_weights
_.num_workers, _.random_seed, _.max_time_in_seconds, _.cp_model_probing_level, _.find_big_linear_overlap, _.cp_model_presolve

# the tracker's diagnostic counter, read by tests/test_trace.py
_.inplace_accumulations

# arguments of patched library functions (same signature as the library's)
_.position_ids, _.col_stats, _.out_col, _.grad_inputs, _.grad_outputs

# VisionTower fields copied from config.json `vision_config` (read by tests/test_catalog.py; the vision activations
# that need them are not modelled yet)
_.num_heads, _.window_size, _.fullatt_block_indexes
