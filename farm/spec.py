"""The job spec: strict, typed, validated before anything runs.

Every model is `extra="forbid"` so a typo in `jobs/*.yaml` is an error naming the field. `load_spec` turns
any problem (unreadable file, bad YAML, wrong field) into one `SpecError` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from farm.calibration import MIX, mixture_source
from farm.errors import SpecError
from farm.locations import check_location, check_tracking_uri
from farm.methods import REGISTRY, AnyMethod, MethodConfig

# Type checkers see the common base; pydantic validates against the registry's discriminated union.
if TYPE_CHECKING:
    MethodField = MethodConfig
else:
    MethodField = AnyMethod

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
MAX_SPEC_BYTES = 1_000_000


# A model, text or output location: s3:// and hf:// forms are checked as written (locations.py).
Location = Annotated[str, AfterValidator(check_location)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelSpec(Strict):
    source: Location = Field(description="hf://org/name@rev, s3://bucket/prefix or a local directory")
    name: str | None = Field(None, pattern=NAME, description="short name (default: last part of the source)")
    revision: str | None = Field(None, max_length=128, description="hub revision (also accepted as @rev)")
    trust_remote_code: bool = Field(False, description="allow the model's own Python code to run")
    allow_pickle: bool = Field(False, description="accept .bin/.pt weights (unpickling can run code)")
    merge_adapter: str | None = Field(
        None,
        description="a PEFT LoRA adapter directory merged into this base "
        "before anything else: its variants ship the adapter inside",
    )

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v  # the type check names it
        v = v.strip()
        if not v:
            raise ValueError("must not be empty")
        if "\x00" in v:
            raise ValueError("contains a NUL byte")
        return v

    def display_name(self) -> str:
        if self.name:
            return self.name
        tail = re.split(r"[/:]", self.source.split("@")[0].rstrip("/"))[-1]
        return re.sub(r"[^A-Za-z0-9_.-]", "-", tail)[:64] or "model"


class MixtureItem(Strict):
    source: Location = Field(description="text file (.txt / JSONL with 'text'), local, s3:// or hf-dataset://")
    weight: float = Field(gt=0, le=1e6, description="share of the samples, relative to the other parts")


class CalibrationSpec(Strict):
    source: Location = Field(
        "",
        description="text file (.txt) or JSONL with a 'text' field, local or s3://, or "
        "hf-dataset://org/name[@rev]?split=&column= from the hub cache (or use `mixture`)",
    )
    mixture: list[MixtureItem] | None = Field(
        None, min_length=1, max_length=64, description="weighted mixture of sources instead of `source`"
    )
    num_samples: int = Field(128, gt=0, le=100_000, description="number of calibration samples")
    max_seq_length: int = Field(2048, gt=0, le=131_072, description="tokens per sample")
    seed: int = Field(0, ge=0, description="sampling seed: same seed, same samples")

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSpec:
        if self.mixture and self.source and not self.source.startswith(MIX):
            raise ValueError("give `source` or `mixture`, not both")
        if not self.mixture and not self.source:
            raise ValueError("`source` or `mixture` is required")
        if self.mixture and not self.source:  # the mixture travels as one canonical source string
            object.__setattr__(self, "source", mixture_source([(m.source, m.weight) for m in self.mixture]))
        return self

    def with_paths(self, base: Path) -> CalibrationSpec:
        if not self.mixture:
            return self.model_copy(update={"source": _resolve(self.source, base)})
        items = [m.model_copy(update={"source": _resolve(m.source, base)}) for m in self.mixture]
        return self.model_copy(
            update={"mixture": items, "source": mixture_source([(m.source, m.weight) for m in items])}
        )


class ValidationSpec(Strict):
    source: Location = Field(
        description="text that judges a search's or a mixed variant's candidates: apart from the calibration text "
        "and the held-out evaluation text, so the evaluation figure stays a held-out number"
    )
    max_tokens: int = Field(
        4096, gt=0, le=10_000_000, description="tokens of validation text each candidate is scored on"
    )
    seq_len: int = Field(512, gt=1, le=131_072, description="window length (non-overlapping windows)")


class PerplexitySpec(Strict):
    source: Location = Field(description="held-out text file (.txt) or JSONL with a 'text' field")
    max_tokens: int = Field(12_288, gt=0, le=10_000_000, description="tokens of held-out text evaluated")
    seq_len: int = Field(512, gt=0, le=131_072, description="window length (non-overlapping windows)")


class GenerationSpec(Strict):
    prompt: str = Field("The capital of France is", max_length=4096, description="greedy generation sample")
    max_new_tokens: int = Field(24, gt=0, le=4096)


DEFAULT_PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "List three colours:",
    "To be, or not to be,",
    "The quickest way to learn a language is",
    "Question: What is 12 plus 7? Answer:",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]


class LatencySpec(Strict):
    prompt_tokens: int = Field(64, gt=0, le=32_768, description="prompt length for time to first token")
    new_tokens: int = Field(32, gt=0, le=4096, description="tokens generated for tokens/s")
    batch_size: int = Field(8, gt=1, le=1024, description="the batched tokens/s measurement")
    repeats: int = Field(3, gt=0, le=50, description="warm measurements (median reported)")


class MemorySpec(Strict):
    budget_gb: float = Field(
        0.25,
        gt=0,
        le=4096,
        description="memory for KV cache and activations beyond the "
        "weights, in which the largest batch and context are searched",
    )
    context: int = Field(128, gt=0, le=1_048_576, description="context length at which the largest batch is searched")
    max_batch: int = Field(32, gt=0, le=65_536, description="search ceiling for batch size")
    max_context: int | None = Field(
        None,
        gt=0,
        description="search ceiling for context (default: the model's "
        "maximum, capped at 2048 to bound the search's cost)",
    )


class OutputsSpec(Strict):
    prompts: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROMPTS),
        min_length=1,
        max_length=256,
        description="fixed prompts: determinism, reference diff against the base",
    )
    max_new_tokens: int = Field(24, gt=0, le=1024)
    seed: int = Field(0, ge=0, description="sampling seed for the determinism check")


class SafetySpec(Strict):
    suite: str | None = Field(None, description="JSONL of {prompt, expect: refuse|answer} (default: farm's suite)")
    max_new_tokens: int = Field(40, gt=0, le=1024)


class TasksSpec(Strict):
    names: list[str] = Field(
        default_factory=lambda: ["shakespeare_next_line", "shakespeare_last_word"],
        min_length=1,
        max_length=64,
        description="lm-eval task names (farm's, or yours)",
    )
    data_dir: str = Field("../.fixtures/tasks", description="where farm's task JSONL lives (built by fixtures)")
    include_path: str | None = Field(None, description="a directory of your own lm-eval task YAMLs")
    limit: int | None = Field(100, gt=0, description="documents per task (null: all)")
    batch_size: int = Field(8, gt=0, le=1024)


DEFAULT_TURNS = [
    "Hello! I am planning a trip to the seaside. Can you help me?",
    "What should I pack for a week by the sea?",
    "Which of those things matters most if it rains?",
    "Suggest a short walk I could take on the first morning.",
    "What could I cook for dinner with fresh fish?",
    "How long should I grill it?",
    "Remind me: what was the first thing you told me to pack?",
    "Thank you. Summarise our plan in two sentences.",
]


class KVCacheSpec(Strict):
    turns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TURNS),
        min_length=2,
        max_length=64,
        description="user turns of one long conversation",
    )
    max_new_tokens: int = Field(40, gt=0, le=1024, description="tokens per assistant reply")


class SpeculativeSpec(Strict):
    draft_tokens: int = Field(4, gt=0, le=64, description="tokens the quantized variant drafts per step")
    max_new_tokens: int = Field(32, gt=0, le=4096)


class AdapterSpec(Strict):
    name: str = Field(pattern=r"^[a-z0-9_]{1,32}$", description="short name; metrics are adapter_<name>_perplexity")
    source: str = Field(description="directory of a PEFT LoRA adapter trained on the base (adapter_config.json)")
    eval_source: Location | None = Field(None, description="text the adapter is judged on (default: the held-out text)")
    max_tokens: int = Field(4096, gt=0, le=10_000_000, description="tokens scored")
    seq_len: int = Field(512, gt=1, le=131_072)


ShapeName = Literal["default", "chat", "long_context"]
SERVING_SHAPES = {"default": (512, 128), "chat": (256, 256), "long_context": (4096, 128)}


class ServingShape(Strict):
    name: str = Field(pattern=r"^[a-z0-9_]{1,24}$", description="names the metrics: serve_<name>_c<N>_...")
    input_tokens: int = Field(gt=0, le=1_048_576, description="prompt tokens of every request")
    output_tokens: int = Field(gt=0, le=65_536, description="tokens generated per request (EOS ignored)")


class ServingSpec(Strict):
    """The variant as a serving engine runs it: its own process and environment, on the worker's GPU."""

    engine: Literal["vllm"] = Field("vllm", description="serving engine (vLLM's async engine, as `vllm serve`)")
    python: str | None = Field(
        None,
        min_length=1,
        description="interpreter of an environment with the engine installed (default: the worker's own)",
    )
    pythonpath: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="directories put first on the engine process's PYTHONPATH (an engine installed with pip --target)",
    )
    env: dict[str, str] = Field(
        default_factory=dict, max_length=64, description="environment variables of the engine process"
    )
    shapes: list[ShapeName | ServingShape] = Field(
        default_factory=lambda: list[ShapeName | ServingShape](["default"]),
        min_length=1,
        max_length=8,
        description="request shapes: default 512 in / 128 out, chat 256 / 256, long_context 4096 / 128, or "
        "{name, input_tokens, output_tokens}",
    )
    concurrency: list[int] = Field(
        default_factory=lambda: [1, 16, 64, 256],
        min_length=1,
        max_length=16,
        description="requests in flight at once, one measurement per level",
    )
    requests_per_level: int | None = Field(
        None, gt=0, le=100_000, description="requests measured per level (default: max(8, 2 x concurrency))"
    )
    warmup_requests: int = Field(4, ge=0, le=1024, description="requests run before measuring, not counted")
    seed: int = Field(0, ge=0, description="seed of the prompt draw (windows of the held-out text)")
    context: int | None = Field(
        None,
        gt=0,
        le=1_048_576,
        description="context at which the KV cache's "
        "concurrent sequences are reported (default: the largest shape's length)",
    )
    max_model_len: int | None = Field(
        None,
        gt=0,
        le=1_048_576,
        description="engine's max_model_len (default: the larger of the largest shape and `context`)",
    )
    engine_args: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        max_length=64,
        description="the engine's own arguments as the deployment sets them "
        "(vLLM's AsyncEngineArgs, e.g. max_num_seqs, kv_cache_dtype); measured as given",
    )
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=0.98,
        description="engine's share of the GPU (default: 0.85 x the variant's num_gpus, at most 0.85)",
    )
    greedy_prompts: int = Field(
        8, ge=0, le=256, description="prompts whose greedy outputs are compared with the base's (exact-match share)"
    )
    greedy_tokens: int = Field(32, gt=0, le=4096, description="tokens of each greedy output")
    timeout_s: float = Field(1800, gt=0, le=86_400, description="the engine process is stopped after this")

    @field_validator("concurrency")
    @classmethod
    def _levels(cls, v: list[int]) -> list[int]:
        if any(c < 1 or c > 65_536 for c in v):
            raise ValueError("each level must be between 1 and 65536")
        if len(set(v)) != len(v):
            raise ValueError("levels must be distinct")
        return sorted(v)

    @field_validator("engine_args")
    @classmethod
    def _not_farms(cls, v: dict[str, Any]) -> dict[str, Any]:
        own = {
            "model": None,
            "tokenizer": None,
            "trust_remote_code": "models[].trust_remote_code",
            "seed": "evaluation.serving.seed",
            "max_model_len": "evaluation.serving.max_model_len",
            "gpu_memory_utilization": "evaluation.serving.gpu_memory_utilization",
        }
        for key in v:
            if key in own:
                raise ValueError(f"{key} is farm's to set" + (f": use {own[key]}" if own[key] else ""))
        return v

    @field_validator("shapes")
    @classmethod
    def _unique_shapes(cls, v: list[Any]) -> list[Any]:
        names = [s if isinstance(s, str) else s.name for s in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"shape names must be unique: {', '.join(dup)}")
        return v

    def resolved_shapes(self) -> list[ServingShape]:
        return [
            ServingShape(name=s, input_tokens=SERVING_SHAPES[s][0], output_tokens=SERVING_SHAPES[s][1])
            if isinstance(s, str)
            else s
            for s in self.shapes
        ]

    def model_len(self) -> int:
        longest = max(s.input_tokens + s.output_tokens for s in self.resolved_shapes())
        return self.max_model_len or max(longest, self.context or 0)

    def identity(self) -> dict[str, Any]:
        """What changes the figures (not where the engine is installed): part of the base evaluation's id."""
        return self.model_dump(mode="json", exclude={"python", "pythonpath", "env", "timeout_s"})


class Thresholds(Strict):
    max_perplexity_delta: float | None = Field(None, ge=0, description="flag variants above this ppl increase")


class EvaluationSpec(Strict):
    perplexity: PerplexitySpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    thresholds: Thresholds = Field(default_factory=Thresholds)
    serving: ServingSpec | None = Field(
        None,
        description="throughput, latency, weights and KV cache as the "
        "serving engine (vLLM) runs the variant, on its GPU",
    )
    latency: LatencySpec | None = Field(
        None,
        description="dense reference, not deployment speed: time to first "
        "token and tokens/s of transformers generate on the decompressed weights",
    )
    memory: MemorySpec | None = Field(
        None,
        description="dense reference, not deployment memory: weights, peak, "
        "largest batch and context under transformers",
    )
    outputs: OutputsSpec | None = Field(None, description="determinism and reference diff against the base")
    safety: SafetySpec | None = Field(None, description="refusal accuracy and toxicity of generations")
    speculative: SpeculativeSpec | None = Field(None, description="acceptance rate drafting for the base")
    tasks: TasksSpec | None = Field(None, description="task accuracy through lm-eval-harness (local tasks)")
    kv_cache: KVCacheSpec | None = Field(None, description="a long conversation with and without an FP8 KV cache")
    adapters: list[AdapterSpec] = Field(
        default_factory=list,
        max_length=16,
        description="LoRA adapters of the base, each evaluated on the base and on every quantized variant (QLoRA)",
    )

    @field_validator("adapters")
    @classmethod
    def _unique_adapters(cls, v: list[AdapterSpec]) -> list[AdapterSpec]:
        names = [a.name for a in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapter names must be unique: {', '.join(dup)}")
        return v


class GateRule(Strict):
    metric: str = Field(pattern=r"^[a-z0-9_]{1,64}$", description="a variant metric (see README)")
    op: Literal["<=", ">=", "<", ">", "=="] = Field(description="comparison")
    threshold: float
    versus_base: Literal["none", "delta", "ratio"] = Field(
        "none", description="compare the metric itself, variant - base, or variant / base"
    )
    required: bool = Field(True, description="a failing required rule rejects; an advisory one only warns")


class GateSpec(Strict):
    rules: list[GateRule] | None = Field(
        None, max_length=100, description="the evaluation matrix (default: farm's, for the checks the job enables)"
    )
    alias: str = Field(
        "candidate",
        pattern=r"^[a-z][a-z0-9-]{0,40}$",
        description="registry alias prefix for "
        "promoted variants (@candidate = the smallest promoted variant of a base)",
    )
    ladder: list[list[str]] | None = Field(
        None,
        max_length=16,
        description="rungs of method labels, cheapest "
        "risk first (e.g. [[gptq-w8a16-g128], [gptq-w4a16-g128]]): a rung runs "
        "for a base only if every variant of the rung below was promoted",
    )
    tiers: dict[str, list[str]] = Field(
        default_factory=dict,
        description="tier -> method labels (e.g. premium: "
        "[fp8-dynamic], bulk: [gptq-w4a16-g64]); the smallest promoted variant of "
        "each tier gets @<alias>-<tier>",
    )


class ResourceSpec(Strict):
    num_gpus: float = Field(0, ge=0, le=64, description="GPUs per variant (fractions pack variants on a GPU)")
    num_cpus: float = Field(1, gt=0, le=512, description="CPUs per variant (also torch threads)")
    memory_gb: float | None = Field(None, gt=0, le=4096, description="host memory reserved per variant")
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="GPU memory a variant may use (default: its share of the GPU); a checkpoint that does not fit "
        "70% of it stays on the host and is onloaded layer by layer",
    )
    max_retries: int = Field(1, ge=0, le=10, description="times a variant whose worker died is retried")
    ranks: int = Field(
        1,
        ge=1,
        le=64,
        description="data-parallel calibration ranks per variant: >1 forms a Ray "
        "placement group of this many workers (each num_gpus/num_cpus) running llm-compressor's "
        "distributed oneshot; data-free methods use one worker",
    )
    gptq_hessian: Literal["tensor_cores", "fp32"] = Field(
        "tensor_cores",
        description="how GPTQ's Hessians are summed on GPUs: tensor_cores (bf16 products, exact in "
        "fp32, summed in fp32 in 4096-token chunks; ~10x faster, GPTQ's loss within 0.05%) or fp32 "
        "(llm-compressor's own fp32 GEMM); the output format is the same",
    )
    gptq_inverse: Literal["left_looking", "reversed_cholesky", "llmcompressor"] = Field(
        "left_looking",
        description="how GPTQ uses the inverse Hessian on GPUs: left_looking (the column loop "
        "reorganised to need only the Hessian's Cholesky factor, no inverse; an 8B down_proj solve 0.29 -> "
        "0.08-0.13 s), reversed_cholesky (the inverse factor from one Cholesky and a triangular solve) or "
        "llmcompressor (its three factorisations and right-looking loop); same algorithm and format",
    )
    gptq_broadcast: Literal["forward_order", "llmcompressor"] = Field(
        "llmcompressor",
        description="with ranks > 1 on GPUs, how each layer's GPTQ results reach every rank: "
        "forward_order (sent in the order the layer uses them, each waited for where first used, and each rank's "
        "share propagated in one batch when memory allows: the other ranks run attention and gate/up while "
        "down_proj's owner solves, and that owner given fewer calibration samples) or llmcompressor (all sent, "
        "then all waited for; an even split); the same GPTQ problem, its float sums in another order",
    )
    calibration_attention: Literal["sdpa", "eager"] = Field(
        "sdpa",
        description="attention in calibration forward passes: sdpa (transformers' fused attention with "
        "llm-compressor's eager causal mask, for architectures whose eager attention is plain softmax attention) "
        "or eager (llm-compressor's default; ~60% of a 1B GPTQ run's GPU time on an H100)",
    )

    gpu_packing: Literal["share", "memory"] = Field(
        "share",
        description="share: every variant gets num_gpus; memory: each variant gets the fraction of a GPU its "
        "memory need takes, at most num_gpus (measured by an earlier run of the same model, method and "
        "calibration shape, else estimated from the checkpoint), with its CUDA allocator held to that share: "
        "small variants share a GPU, an onloading variant reserves its working set, and a variant no share "
        "holds is refused before any run (single-rank variants)",
    )
    gpu_card_gb: float | None = Field(
        None,
        gt=0,
        le=4096,
        description="with gpu_packing: memory, the memory of one GPU (the smallest, on a cluster of mixed "
        "cards); default: read by a task on a GPU of the cluster",
    )

    @model_validator(mode="after")
    def _whole_gpus_for_ranks(self) -> ResourceSpec:
        if self.ranks > 1 and self.num_gpus != int(self.num_gpus):
            raise ValueError(f"ranks: {self.ranks} ranks need whole GPUs each (num_gpus is {self.num_gpus:g})")
        if self.gpu_packing == "memory" and (self.num_gpus <= 0 or self.ranks > 1):
            raise ValueError(
                "gpu_packing: memory packs single-rank GPU variants: it needs num_gpus > 0 (the largest share a "
                f"variant may take) and ranks 1 (got num_gpus {self.num_gpus:g}, ranks {self.ranks})"
            )
        if self.gpu_card_gb is not None and self.gpu_packing != "memory":
            raise ValueError("gpu_card_gb: only read with gpu_packing: memory")
        return self


class TrackingSpec(Strict):
    uri: Annotated[str, AfterValidator(check_tracking_uri)] | None = Field(
        None, description="MLflow tracking URI (default: sqlite under output.root)"
    )
    experiment: str = Field("farm", min_length=1, max_length=200, description="MLflow experiment name")
    registered_model_prefix: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$", description="registry name prefix")
    log_model: bool = Field(True, description="upload the quantized model as run artifacts")
    tags: dict[str, str] = Field(
        default_factory=dict,
        max_length=64,
        description="extra MLflow tags on every run of the job (farm's own tags win)",
    )

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-/ ]{1,250}", key):
                raise ValueError(f"tag {key!r}: keys are 1-250 letters, digits, '_', '.', '-', '/', ' '")
            if len(value) > 5000:
                raise ValueError(f"tag {key!r}: value longer than 5000 characters")
        return v


class OutputSpec(Strict):
    root: Location = Field(".farm", description="local directory or s3://bucket/prefix for variants")


class JobSpec(Strict):
    name: str = Field(pattern=NAME, description="job name")
    models: list[ModelSpec] = Field(min_length=1, max_length=256)
    methods: list[MethodField] = Field(min_length=1, max_length=256)
    calibration: CalibrationSpec
    calibration_sets: dict[str, CalibrationSpec] = Field(
        default_factory=dict,
        max_length=64,
        description="named calibration sets a method can pick "
        "(`calibration: {set: name}`); a variant calibrated on a different set is a different variant",
    )
    validation: ValidationSpec | None = Field(
        None, description="validation text for methods that choose between candidates (search, mixed)"
    )
    evaluation: EvaluationSpec
    resources: ResourceSpec = Field(default_factory=ResourceSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    gate: GateSpec | None = Field(None, description="promotion gate: evaluation matrix -> decision per variant")

    @model_validator(mode="after")
    def _unique(self) -> JobSpec:
        for what, names in (
            ("models", [m.display_name() for m in self.models]),
            ("methods", [m.label() for m in self.methods]),
        ):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: duplicate name(s) {', '.join(dup)}; give each a distinct `name`")
        for i, m in enumerate(self.methods):
            for where, wanted in m.calibration_sets_named():
                if wanted not in self.calibration_sets:
                    raise ValueError(
                        f"methods.{i}.{where}calibration.set: unknown set {wanted!r}; defined: "
                        f"{', '.join(sorted(self.calibration_sets)) or 'none'}"
                    )
            if m.uses_validation and self.validation is None:
                raise ValueError(
                    f"methods.{i} ({m.label()}): {m.method} judges its candidates on validation text; add a "
                    "`validation:` section (text apart from the calibration and the held-out evaluation text)"
                )
        if self.evaluation.serving and self.resources.num_gpus <= 0:
            raise ValueError(
                "evaluation.serving: the serving engine runs on the variant's GPU, but "
                "resources.num_gpus is 0; give each variant a GPU (or its share) or drop serving"
            )
        if self.gate:
            labels = {m.label() for m in self.methods}
            named = [x for rung in self.gate.ladder or [] for x in rung] + [
                x for group in self.gate.tiers.values() for x in group
            ]
            unknown = sorted(set(named) - labels)
            if unknown:
                raise ValueError(
                    f"gate: unknown method label(s) {', '.join(unknown)}; labels: {', '.join(sorted(labels))}"
                )
        return self


def one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"].replace("\n", " ")
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    elif first["type"] == "union_tag_invalid":
        loc += ".method"
        msg = f"unknown method {first['ctx']['tag']!r}; available: {', '.join(sorted(REGISTRY))}"
    elif first["type"] == "union_tag_not_found":
        loc += ".method"
        msg = f"missing; one of {', '.join(sorted(REGISTRY))}"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc or 'spec'}: {msg}{more}"


def parse_spec(data: Any, base_dir: Path | None = None) -> JobSpec:
    """Validate a parsed YAML document; relative local paths resolve against `base_dir`."""
    if not isinstance(data, dict):
        raise SpecError(f"spec: expected a mapping at the top level, got {type(data).__name__}")
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(one_line(err)) from None
    return resolve_paths(spec, base_dir) if base_dir else spec


def _resolve(path: str, base: Path) -> str:
    if "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def resolve_paths(spec: JobSpec, base: Path) -> JobSpec:
    ev = spec.evaluation
    return spec.model_copy(
        update={
            "models": [
                m.model_copy(
                    update={
                        "source": _resolve(m.source, base),
                        "merge_adapter": _resolve(m.merge_adapter, base) if m.merge_adapter else None,
                    }
                )
                for m in spec.models
            ],
            "calibration": spec.calibration.with_paths(base),
            "calibration_sets": {k: v.with_paths(base) for k, v in spec.calibration_sets.items()},
            "validation": spec.validation.model_copy(update={"source": _resolve(spec.validation.source, base)})
            if spec.validation
            else None,
            "evaluation": ev.model_copy(
                update={
                    "perplexity": ev.perplexity.model_copy(update={"source": _resolve(ev.perplexity.source, base)}),
                    "safety": ev.safety.model_copy(update={"suite": _resolve(ev.safety.suite, base)})
                    if ev.safety and ev.safety.suite
                    else ev.safety,
                    "tasks": ev.tasks.model_copy(
                        update={
                            "data_dir": _resolve(ev.tasks.data_dir, base),
                            "include_path": _resolve(ev.tasks.include_path, base) if ev.tasks.include_path else None,
                        }
                    )
                    if ev.tasks
                    else None,
                    "adapters": [
                        a.model_copy(
                            update={
                                "source": _resolve(a.source, base),
                                "eval_source": _resolve(a.eval_source, base) if a.eval_source else None,
                            }
                        )
                        for a in ev.adapters
                    ],
                }
            ),
            "output": spec.output.model_copy(update={"root": _resolve(spec.output.root, base)}),
        }
    )


MAX_DEPTH = 32  # the deepest spec field is ~6 levels down; deeper is a mistake or an attack on the parser


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that refuses anchors/aliases (no billion-laughs expansion, and specs stay explicit), mappings
    with a key given twice (YAML would keep the last silently) and nesting deeper than MAX_DEPTH (the composer
    recurses: a deep document would end in a RecursionError)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(f"spec line {event.start_mark.line + 1}: YAML aliases (*name) are not allowed")
        if self.check_event(yaml.MappingStartEvent, yaml.SequenceStartEvent):
            self._depth += 1
            if self._depth > MAX_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise SpecError(f"spec line {line}: nested deeper than {MAX_DEPTH} levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise SpecError(f"spec line {key_node.start_mark.line + 1}: key {key!r} is given twice")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise SpecError(f"{path}: cannot read spec ({err.strerror or err})") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: spec is {len(raw)} bytes; the limit is {MAX_SPEC_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: spec is not UTF-8 (byte {err.start})") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}:{where} invalid YAML: {problem}") from None


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    return parse_spec(read_yaml(path), base_dir=path.resolve().parent)
