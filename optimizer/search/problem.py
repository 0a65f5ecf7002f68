"""Problems: what a user asks `trainfit solve` (model, GPU, data, search space, margin, objective)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import ConfigError, ProblemError
from ..io import join_problems, read_mapping
from ..memory import DEFAULT_MARGIN
from ..schema import REFERENCE_FREE_LOSSES, DatasetSummary, PrefLoss

__all__ = ["Problem", "SearchSpace", "DatasetSummary", "DatasetSpec", "CustomGpu", "load_problem", "FT_CHOICES",
           "Cluster"]

_STRICT = ConfigDict(extra="forbid", frozen=True)
# num_train_epochs bounds (objective and search): a positive run and no overflow of the step counts
EPOCHS_MIN, EPOCHS_MAX = 0.001, 10_000

# finetuning_type choices of the search: LoRA on 16-bit weights, QLoRA on bitsandbytes 4-bit or 8-bit
# weights, full fine-tuning.
FT_CHOICES = ("lora", "qlora4", "qlora8", "full")
# The stages `trainfit solve` models: the memory model covers sft (pt runs the same step) and dpo
# (memory/preference.py).
STAGES = ("sft", "dpo")
DPO_CLUSTER = ("stage dpo with a cluster is not modelled (the per-GPU model of distributed/ covers sft steps, not the "
               "reference model)")


class DatasetSpec(BaseModel):
    model_config = _STRICT
    name: str = Field(default="train", description="Dataset name written to dataset_info.json and the config.")
    file: str | None = Field(default=None, description="The LLaMA-Factory data file the emitted config trains on "
                             "(alpaca or sharegpt JSON/JSONL), relative to the problem file.")
    formatting: Literal["alpaca", "sharegpt", "openai"] = Field(
        default="alpaca", description="The data file's format (with `stage: dpo`, its ranking form: chosen/rejected).")
    tokenizer: str = Field(default="auto", description="How `file` is tokenized: `auto` (a local tokenizer.json if "
                           "one is found, else the approximation), `approx` (the documented approximation: the same "
                           "counts on every machine), or a path to a tokenizer.json (relative to the problem file).")
    summary: DatasetSummary | None = Field(
        default=None, description="Sample count and token-length distribution; measured from `file` when absent. "
        "With `stage: dpo` a sample is a pair, its length the prompt plus the longer of chosen and rejected (what "
        "the collator pads to), response_token_share the longer response's share (from a summary the quality score "
        "counts that response once; a data file gives both responses' tokens).")
    packing: bool = Field(default=False, description="LLaMA-Factory `packing`: pack samples into rows of cutoff_len "
                          "tokens. Fewer, full-length micro-batches (the time objective counts packed rows); the "
                          "emitted configs set it.")
    neat_packing: bool = Field(default=False, description="LLaMA-Factory `neat_packing` (implies packing): no "
                               "attention across packed samples; with sdpa a [b, 1, s, s] mask in the compute dtype.")

    images_per_sample: int | None = Field(
        default=None, ge=0, description="Vision-language models: the images each sample holds, each priced at "
        "image_max_pixels in memory and in cutoff_len (the worst micro-batch). Default: the most images one sample "
        "of `file` has (its image tokens are added to each sample's prompt), 0 with a summary (whose "
        "token_length_percentiles should then include the image tokens).")
    image_max_pixels: int = Field(default=768 * 768, gt=0, description="LLaMA-Factory `image_max_pixels` (default "
                                  "768*768): larger images are scaled down to it.")
    image_min_pixels: int = Field(default=32 * 32, gt=0, description="LLaMA-Factory `image_min_pixels` (default "
                                  "32*32): smaller images are scaled up to it.")

    @model_validator(mode="after")
    def _file_or_summary(self) -> DatasetSpec:
        if self.file is None and self.summary is None:
            raise ValueError("give the data `file` or its `summary` (num_samples, token_length_percentiles)")
        if self.image_max_pixels < self.image_min_pixels:
            raise ValueError(f"image_max_pixels {self.image_max_pixels} is smaller than image_min_pixels "
                             f"{self.image_min_pixels}: raise image_max_pixels or lower image_min_pixels")
        return self


class CustomGpu(BaseModel):
    model_config = _STRICT
    name: str = Field(description="A name for the card.")
    # Ranges: 10-100x around real cards (B200: about 2,250 dense BF16 TFLOPS, 8,000 GB/s, 180 GB; a GT 1030:
    # 1 TFLOPS, 48 GB/s, 2 GB), so no real card is refused and no time rounds to 0 s or overflows.
    memory_mib: int = Field(gt=0, le=1 << 24, description="Total memory as nvidia-smi reports it, MiB (<= 16 TiB).")
    bf16_tflops: float = Field(ge=0.01, le=1e5, allow_inf_nan=False, description="Dense BF16 (or FP16) tensor TFLOPS.")
    bandwidth_gbps: float = Field(ge=1, le=1e6, allow_inf_nan=False, description="Memory bandwidth, GB/s.")
    bf16: bool = Field(default=True, description="Supports bfloat16.")
    flash_attn2: Literal["yes", "no", "experimental"] = Field(default="no", description="FlashAttention-2 support.")
    compute_capability: str = Field(default="8.0", description="CUDA compute capability.")


class SearchSpace(BaseModel):
    """Each dimension lists its allowed values; a one-element list pins it."""

    model_config = _STRICT
    finetuning_type: list[Literal["lora", "qlora4", "qlora8", "full"]] = Field(
        default=["lora", "qlora4"], min_length=1,
        description="lora (16-bit base), qlora4, qlora8 (bitsandbytes), full.")
    lora_rank: list[int] = Field(default=[8, 16, 32, 64], min_length=1, description="LoRA ranks.")
    lora_target: list[Literal["attention", "mlp", "all"]] = Field(
        default=["attention", "mlp", "all"], min_length=1, description="Which Linear layers get adapters.")
    cutoff_len: list[int] = Field(default=[256, 384, 512, 768, 1024, 1536, 2048], min_length=1,
                                  description="cutoff_len values.")
    per_device_train_batch_size: list[int] = Field(default=[1, 2, 4, 8], min_length=1, description="Micro-batch sizes.")
    gradient_accumulation_steps: list[int] = Field(default=[1, 2, 4, 8, 16], min_length=1,
                                                   description="Accumulation steps.")
    max_samples: list[int | None] = Field(default=[None], min_length=1, description="max_samples (null = all).")
    gradient_checkpointing: list[bool] = Field(default=[True, False], min_length=1, description="Checkpointing on/off.")
    flash_attn: list[Literal["auto", "sdpa", "fa2", "disabled"]] = Field(
        default=["auto"], min_length=1, description="Attention kernels (fa2 is dropped on GPUs without it).")
    optim: list[Literal["adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"]] = Field(
        default=["adamw_torch_fused", "adamw_8bit"], min_length=1, description="Optimizers.")
    enable_liger_kernel: list[bool] = Field(default=[False, True], min_length=1, description="Liger kernels off/on.")
    num_train_epochs: list[float] | None = Field(
        default=None, min_length=1, description="Epochs to search (they change time and the quality score, not "
        "memory). null: one value, objective.num_train_epochs or the recipe for the data size.")

    @model_validator(mode="after")
    def _positive(self) -> SearchSpace:
        for name in ("lora_rank", "cutoff_len", "per_device_train_batch_size", "gradient_accumulation_steps"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ValueError(f"{name} values must be positive")
        if any(v is not None and v <= 0 for v in self.max_samples):
            raise ValueError("max_samples values must be positive or null")
        if any(not (EPOCHS_MIN <= v <= EPOCHS_MAX) for v in self.num_train_epochs or ()):
            raise ValueError(f"num_train_epochs values must be between {EPOCHS_MIN:g} and {EPOCHS_MAX:g}")
        return self


class Objective(BaseModel):
    model_config = _STRICT
    num_train_epochs: float | None = Field(default=None, ge=EPOCHS_MIN, le=EPOCHS_MAX, allow_inf_nan=False,
                                           description="Epochs (time objective and configs); null: "
                                           "search.num_train_epochs, or the recipe for the data size "
                                           "(search/quality.py recipe_epochs).")
    max_hours: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False,
                                    description="Time budget: the recommendation trains within "
                                    "it when any front point does.")
    prefer: Literal["quality", "balanced", "speed", "fewest_gpus"] = Field(
        default="balanced", description="Which front point to recommend: the best score (quality), the fastest point "
        "within the score's resolution of it (balanced), the fastest defensible point (speed), or, with a cluster, "
        "the point with the fewest GPUs among those balanced would consider (within the score's resolution of the "
        "best; ties to the fastest); see search/objectives.py recommend and search/solve.py.")


class Cluster(BaseModel):
    """The GPUs a run may use: the search adds the number of GPUs, the engine and the offload as dimensions."""

    model_config = _STRICT
    count: int = Field(ge=1, le=4096, description="GPUs available in all (of the problem's `gpu`), across every node.")
    nodes: int = Field(default=1, ge=1, description="Machines; every GPU count searched is a multiple of it.")
    gpu_counts: Literal["all", "powers_of_two"] = Field(
        default="all", description="GPU counts searched: every count 1..count (all) or 1, 2, 4, ... up to count.")
    host_ram_gib: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                       description="Host RAM per node, GiB: bounds the host peak (loading, offload).")
    engines: list[str] = Field(default=["ddp", "zero2", "zero3", "fsdp2"], min_length=1,
                               description="Engines searched with more than one GPU (distributed/engines.py names: "
                               "ddp, zero1, zero2, zero3, fsdp, fsdp2, fsdp_grad_op).")
    offload: list[Literal["none", "optimizer", "params"]] = Field(
        default=["none"], min_length=1, description="Offload settings searched (pairs an engine cannot do are "
        "skipped: distributed/engines.py validate).")

    @field_validator("engines")
    @classmethod
    def _engines(cls, v: list[str]) -> list[str]:
        from ..distributed import parse_engine

        out = []
        for name in v:
            try:
                out.append(parse_engine(name))
            except ConfigError as exc:
                raise ValueError(str(exc).rstrip(".")) from None
        return list(dict.fromkeys(out))

    @model_validator(mode="after")
    def _consistent(self) -> Cluster:
        if self.count % self.nodes:
            raise ValueError(f"count {self.count} does not split evenly over {self.nodes} nodes")
        if any(o != "none" for o in self.offload) and self.host_ram_gib is None:
            raise ValueError("offload needs host_ram_gib (offloaded states live in host RAM)")
        if not self.gpu_count_values():
            raise ValueError(f"no GPU count to search: with gpu_counts {self.gpu_counts} none of the counts up to "
                             f"{self.count} is a multiple of nodes {self.nodes}; use gpu_counts: all or another count")
        return self

    def gpu_count_values(self) -> list[int]:
        """The GPU counts searched, ascending (multiples of nodes, plus 1 on one node)."""
        if self.gpu_counts == "all":
            vals = list(range(1, self.count + 1))
        else:
            vals = [1 << i for i in range(self.count.bit_length()) if 1 << i <= self.count]
        return [n for n in vals if n % self.nodes == 0 or (n == 1 and self.nodes == 1)]


class Problem(BaseModel):
    """A `trainfit solve` problem file."""

    model_config = _STRICT
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="Problem name (letters, digits, '.', '_', '-'); configs go under configs/<name>/.")
    model: str = Field(description="Catalog model id or a path to a config.json (relative to the problem file).")
    gpu: str | CustomGpu = Field(description="Catalog GPU id, or a custom card with its memory.")
    num_gpus: Literal[1] = Field(default=1, description="GPUs (1; give `cluster` to search several).")
    cluster: Cluster | None = Field(default=None, description="Several GPUs of the kind `gpu`: the search adds the "
                                    "GPU count, engine and offload (one solve per setting, fronts merged).")
    trainer: Literal["llamafactory"] = Field(default="llamafactory", description="The trainer the configs are for.")
    stage: str = Field(default="sft", description="LLaMA-Factory `stage`: sft (supervised) or dpo (pairwise "
                       "preference: the data has chosen/rejected responses; each micro-batch runs 2 x batch "
                       "sequences, plus a reference forward unless pref_loss is orpo or simpo).")
    pref_loss: PrefLoss = Field(default="sigmoid", description="stage dpo: LLaMA-Factory `pref_loss` (sigmoid is DPO; "
                                f"{' and '.join(REFERENCE_FREE_LOSSES)} need no reference model).")
    pref_beta: float = Field(default=0.1, gt=0, le=100, allow_inf_nan=False, description="stage dpo: LLaMA-Factory "
                             "`pref_beta` (default 0.1, as in LLaMA-Factory and Rafailov et al. 2023). No memory "
                             "effect.")
    dataset: DatasetSpec = Field(description="The training data.")
    search: SearchSpace = Field(default_factory=SearchSpace, description="The search space.")
    margin: float = Field(default=DEFAULT_MARGIN, ge=0, lt=1, allow_inf_nan=False,
                          description="Share of the GPU's memory kept free. It applies to the "
                          "device peak (what nvidia-smi shows: reserved + CUDA context).")
    objective: Objective = Field(default_factory=Objective, description="Objective settings.")

    @field_validator("stage")
    @classmethod
    def _stage(cls, v: str) -> str:
        if v not in STAGES:
            # [S] LLaMA-Factory hparams/finetuning_args.py: stage is one of pt, sft, rm, ppo, dpo, kto
            known = "a LLaMA-Factory stage trainfit does not model" if v in ("pt", "rm", "ppo", "kto") else \
                "not a LLaMA-Factory stage (pt, sft, rm, ppo, dpo, kto)"
            raise ValueError(f"{v!r} is {known}; trainfit solves sft and dpo: use stage sft or dpo")
        return v

    @model_validator(mode="after")
    def _stage_fits(self) -> Problem:
        if self.stage == "dpo" and self.cluster is not None:
            raise ValueError(f"{DPO_CLUSTER}: remove cluster to solve on one GPU, or use stage sft")
        if self.search.num_train_epochs is not None and self.objective.num_train_epochs is not None:
            raise ValueError("num_train_epochs is set twice: keep objective.num_train_epochs (one value) or "
                             "search.num_train_epochs (values to search), not both")
        defaults = type(self).model_fields
        if self.stage != "dpo" and (self.pref_loss != defaults["pref_loss"].default
                                    or self.pref_beta != defaults["pref_beta"].default):
            raise ValueError("pref_loss and pref_beta apply to stage dpo only: remove them, or set stage: dpo")
        return self


def load_problem(path: str | Path) -> tuple[Problem, Path]:
    """(problem, folder of the file). Every validation problem is reported in one message."""
    p = Path(path)
    data = read_mapping(
        path, error=ProblemError, what="a problem YAML file (see problems/)",
        missing=f"problem file {str(path)!r} does not exist. Pass a problem YAML (see problems/).",
        not_mapping=f"{str(path)!r} is not a mapping. A problem file has keys name, model, gpu, dataset, ...",
    )
    try:
        return Problem(**data), p.parent
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = err["msg"].replace("Value error, ", "")
            msgs.append(f"{loc}: {msg}" if loc else msg)  # a whole-problem rule has no location
        raise ProblemError(f"{path}: " + join_problems(msgs) + ". Fix the problem file.") from None
