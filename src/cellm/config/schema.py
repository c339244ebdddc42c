"""The config tree: one dataclass per table; each field holds its default, its help and the values it admits.

Every field's ``help`` is its documentation (``cellm config --fields`` prints it). Choice lists come from the
modules that own them (codecs, robust rules, datasets, partitions), so the config never keeps a copy to go stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

import tomli_w

from cellm.core.codec.spec import MAX_POS_BLOCK, POSITION_CHOICES, VALUE_CHOICES
from cellm.core.robust import RULES
from cellm.core.support import UP_SUPPORTS
from cellm.data import DATASETS, DEFAULT_CLIENTS
from cellm.data.files import HOLDOUTS, PARTITIONS
from cellm.models.registry import ADAPTERS, MODELS

VALUE_CODECS = VALUE_CHOICES  # the value codings of comm.codec_down / codec_up and slora.codec


def _f(default: Any, help: str, choices: tuple | None = None, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None) -> Any:
    """A config field: its default, its help, and what values it admits (choices, or bounds checked by
    :func:`cellm.config.validate` and shown by ``cellm config --fields``)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if bounds:
        meta["bounds"] = bounds
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def bounds_text(bounds: dict[str, float]) -> str:
    """A field's declared bounds as the user reads them: ``in (0, 1]``, ``>= 1``."""
    lo = f"[{bounds['ge']:g}" if "ge" in bounds else (f"({bounds['gt']:g}" if "gt" in bounds else None)
    hi = f"{bounds['le']:g}]" if "le" in bounds else (f"{bounds['lt']:g})" if "lt" in bounds else None)
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f">= {bounds['ge']:g}" if "ge" in bounds else f"> {bounds['gt']:g}"
    return f"<= {bounds['le']:g}" if "le" in bounds else f"< {bounds['lt']:g}"


@dataclass
class ModelConfig:
    name: str = _f("minilm-l6", f"Registered model: {', '.join(MODELS)} (only a label when model.path is set).")
    path: str = _f("", "Your own model instead: a local Hugging Face folder (config.json, weights, tokenizer) or a "
                       ".gguf file, loaded as a causal LM or a sequence classifier by the data's task; nothing is "
                       "fetched from a hub.")
    adapter: str = _f("lora", "Adapter type, built by peft: lora, or vera (VeRA: frozen random A and B shared by "
                              "every layer, seeded by the run; only a scaling vector per rank (model.vera_rank) and "
                              "one per output feature are trained and sent, so the flat vector is tiny).",
                      ADAPTERS)
    lora_rank: int = _f(8, "LoRA rank r.", ge=1)
    lora_alpha: float = _f(16.0, "LoRA alpha; the adapter is scaled by alpha / r.", gt=0)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: list[str] = _f([], "Module names that get LoRA; empty = the model's default (peft's table for "
                                       "its architecture).")
    freeze_a: bool = _f(False, "FFA-LoRA: the A matrices stay at their (seeded) initialisation, never trained nor "
                               "sent.")
    vera_rank: int = _f(256, "model.adapter = vera: rank of the shared frozen projections (peft's VeraConfig.r).",
                        ge=1, le=65536)


@dataclass
class DataConfig:
    name: str = _f("bbc", "Dataset: bbc (classification), shakespeare or chitchat (next-token prediction), or files "
                          "(your own: data.path).", tuple(DATASETS))
    path: str = _f("", "data.name = files: a .jsonl, .json, .csv or .parquet file, one row per example.")
    test_path: str = _f("", "data.name = files: an optional held-out file in the same format (then no training row "
                            "is held out).")
    text_column: str = _f("", "Column of the text (classification with data.label_column; next-token prediction "
                              "alone).")
    label_column: str = _f("", "Column of class labels (strings or integers): makes the data a classification "
                               "task.")
    prompt_column: str = _f("", "Instruction tuning: column of prompts (with data.response_column); the loss counts "
                                "response tokens only.")
    response_column: str = _f("", "Instruction tuning: column of responses.")
    messages_column: str = _f("", "Chat data: column of [{role, content}, ...] rendered with the tokenizer's chat "
                                  "template; the loss counts assistant turns only.")
    client_column: str = _f("", "Column naming each row's client: one client per distinct value (data.partition "
                                "natural).")
    partition: str = _f("auto", "How rows are split over clients (flwr-datasets partitioners): natural "
                                "(data.client_column), iid, dirichlet or shard (over data.label_column); auto = "
                                "natural with a client column, else iid.", PARTITIONS)
    holdout: str = _f("fraction", "Without data.test_path: fraction = a stratified data.test_fraction of each "
                                  "client's rows is held out; clients = that share of whole clients.", HOLDOUTS)
    shards_per_client: int = _f(2, "data.partition = shard: label-sorted shards per client.", ge=1)
    num_clients: int = _f(0, "Number of federated clients (natural partitions: how many of the file's clients, a "
                             "seeded choice). 0 = auto: every usable client of a natural partition of files "
                             f"(data.name = files), else {DEFAULT_CLIENTS}; a run records the number it used.",
                          ge=0)
    seq_len: int = _f(64, "Tokens per example (truncate / pad / chunk).", ge=8)
    min_client_size: int = _f(8, "Fewest examples (sequences) a client may hold.", ge=1)
    dirichlet_alpha: float = _f(0.5, "Label skew of the Dirichlet split (bbc): smaller is more non-IID.", gt=0)
    test_fraction: float = _f(0.2, "Held-out share of examples (bbc, files; stratified), or of clients "
                                   "(data.holdout = clients).", gt=0, lt=1)
    max_test_examples: int = _f(0, "Cap on held-out examples used for evaluation; 0 = all.", ge=0)
    cache_dir: str = _f(".cellm-cache", "Where tokenized data is cached; empty string = no cache.")


@dataclass
class FLConfig:
    clients_per_round: int = _f(5, "Distinct clients sampled uniformly each round.", ge=1)
    local_steps: int = _f(5, "Local optimizer steps per client per round (used when local_epochs = 0).", ge=1)
    local_epochs: int = _f(0, "Local epochs per client per round; 0 = use local_steps.", ge=0)
    batch_size: int = _f(16, "Local batch size.", ge=1)
    eval_every: int = _f(5, "Evaluate every this many rounds (and after the last round, and at round 0).", ge=1)
    aggregation: str = _f("mean", "How uploads are combined: mean (FLASC) or weighted (by example count).",
                          ("mean", "weighted"))


@dataclass
class ClientConfig:
    optimizer: str = _f("sgd", "Local optimizer, fresh each round.", ("sgd", "adamw"))
    lr: float = _f(0.1, "Local learning rate.", gt=0)
    momentum: float = _f(0.9, "SGD momentum.", ge=0, lt=1)
    weight_decay: float = _f(0.0, "Local weight decay.", ge=0)
    max_grad_norm: float = _f(0.0, "Clip local gradients to this L2 norm; 0 = off.", ge=0)


@dataclass
class ServerConfig:
    optimizer: str = _f("adamw", "Server optimizer stepped with the mean delta as gradient.", ("adamw", "adam", "sgd"))
    lr: float = _f(1e-2, "Server learning rate (sgd with lr 1 and momentum 0 is plain FedAvg).", gt=0)
    momentum: float = _f(0.0, "Server SGD momentum.", ge=0, lt=1)
    beta1: float = _f(0.9, "Adam/AdamW beta1.", ge=0, lt=1)
    beta2: float = _f(0.999, "Adam/AdamW beta2.", ge=0, lt=1)
    eps: float = _f(1e-8, "Adam/AdamW epsilon.", gt=0)
    weight_decay: float = _f(0.0, "Server weight decay.", ge=0)


@dataclass
class CommConfig:
    down_density: float = _f(1.0, "Share of adapter entries sent server -> client (top-k of |w|, or of |w - w0| "
                                  "with init_relative).", gt=0, le=1)
    up_density: float = _f(1.0, "Share of delta entries sent client -> server (top-k of |delta|, or the size of a "
                                "shared support's random part: comm.up_support).", gt=0, le=1)
    up_support: str = _f("topk", "Where uploads lie. topk: each client's own top-k of its delta, positions sent "
                                 "(FLASC). Shared supports, known to every client of the round before it trains and "
                                 "sent as values only (no position bytes; what secure aggregation needs): random (a "
                                 "seeded set of up_density, new each round); download (the round's download "
                                 "positions M, so d_up follows d_down); download+random (M topped up with a seeded "
                                 "set to up_density: exploration); server (M topped up to up_density with the "
                                 "entries of largest server-optimizer first moment, sent in the download, so their "
                                 "positions and values count as download bytes). Error feedback keeps what falls "
                                 "outside.",
                          UP_SUPPORTS)
    up_support_head: bool = _f(False, "Add every entry of the classifier head to a shared upload support (comm."
                                      "up_support); random parts fill the rest of up_density. Measured on BBC + "
                                      "MiniLM: random and download supports starve the head; with it, "
                                      "download+random came closest to per-client top-k (still a few points short "
                                      "at equal bytes).")
    down_decay: float = _f(1.0, "Download density multiplier every decay_every rounds.", gt=0, le=1)
    up_decay: float = _f(1.0, "Upload density multiplier every decay_every rounds.", gt=0, le=1)
    decay_every: int = _f(1, "Rounds between density decays.", ge=1)
    freeze_mask_after: int = _f(0, "Compute the download mask once after this many rounds and keep it (pruned "
                                   "LoRA); 0 = recompute every round.", ge=0)
    client_freeze: bool = _f(False, "Clients train and upload only on the download support (gradients multiplied "
                                    "by the mask).")
    codec_down: str = _f("fp32", "Value coding of downloads: fp32, fp16, bf16, int8 / int4 / int2 (ternary) "
                                 "with a block absmax scale, or rot4 / rot3 / rot2 (random rotation of chunks of "
                                 "up to comm.int8_block values, which must then be a power of two, and 4, 3 or 2 "
                                 "bits a value).", VALUE_CODECS)
    codec_up: str = _f("fp32", "Value coding of uploads: as codec_down.", VALUE_CODECS)
    int8_block: int = _f(256, "Values per scale block of the int8, int4 and int2 codecs; the largest rotated chunk "
                              "of rot4, rot3 and rot2 (then a power of two).", ge=1)
    zstd_level: int = _f(0, "zstd level applied on top of each message; 0 = off.", ge=0, le=22)
    positions: str = _f("auto", "Position coding: auto (cheapest per message), bitmap or gaps.", POSITION_CHOICES)
    topk_block: int = _f(1, "Entries per top-k block: top-k keeps whole blocks of b consecutive entries of the flat "
                            "adapter (ranked by their L2 norm) and a position names a block. Blocks lie on one grid "
                            "over the flat vector (block j = entries [j*b, (j+1)*b)); tensors are row-major, so with "
                            "b dividing a row of lora_A a block is part of a row. 1 = per-entry top-k. Both "
                            "directions; needs comm.up_support = topk and no rank tiers.", ge=1, le=MAX_POS_BLOCK)
    error_feedback_up: bool = _f(False, "Clients keep what top-k and quantization dropped and add it to their next "
                                        "upload.")
    init_relative: bool = _f(False, "Downloads carry the top-k of w - w0, where w0 is the seeded initial adapter "
                                    "(LoRA A's init, B = 0, the head's init) that every client regenerates from the "
                                    "config and never receives; clients start from w0 + M * (w - w0). FLASC (false) "
                                    "sends the top-k of w itself, which spends its first rounds on A's random init.")
    download_mode: str = _f("weights", "weights: top-k of w to stateless clients (FLASC); delta: sparse change since "
                                       "each client's last copy (stateful clients).", ("weights", "delta"))


@dataclass
class EvalConfig:
    batch_size: int = _f(64, "Evaluation batch size.", ge=1)


@dataclass
class FaultsConfig:
    failure_prob: float = _f(0.0, "Probability that a sampled client drops out of a round (no upload).", ge=0, lt=1)
    deadline_s: float = _f(0.0, "Round deadline in seconds; uploads later than this are not aggregated; 0 = none.",
                           ge=0)
    client_time_s: float = _f(10.0, "Embedded runtime: median simulated duration of a client's round (for the "
                                    "deadline).", gt=0)
    time_sigma: float = _f(0.5, "Embedded runtime: lognormal spread of simulated client durations.", ge=0)
    norm_factor: float = _f(0.0, "Reject an upload whose L2 norm exceeds this times the round's median norm; 0 = "
                                 "off.")
    byzantine: float = _f(0.0, "Simulated attackers: the share of each round's sampled clients that send a "
                               "hostile upload (round(share * m), at least one when > 0); 0 = none.", ge=0, le=1)
    attack: str = _f("scale", "What a simulated attacker sends, made from its honest upload: scale (times "
                              "faults.attack_scale), signflip (times -faults.attack_scale), random (Gaussian "
                              "noise of faults.attack_scale times the honest norm).", ("scale", "signflip", "random"))
    attack_scale: float = _f(1e30, "The attackers' factor.", gt=0)


@dataclass
class RobustConfig:
    clip_factor: float = _f(1.0, "Scale every upload down to at most this times the lower median L2 norm of the "
                                 "round's uploads and of the last robust.history_rounds rounds' (bounded) ones, "
                                 "before aggregating: no single client moves the model by more than that. 1 (the "
                                 "median itself) held sign-flipping attackers that 3 did not; 0 = off.", ge=0)
    max_norm: float = _f(0.0, "An absolute L2 bound on every upload as well (also with one upload); 0 = none.", ge=0)
    history_rounds: int = _f(3, "Rounds of past upload norms that the relative bound also looks at.", ge=0)
    aggregator: str = _f("mean", "How the bounded uploads are combined: mean (FLASC; fl.aggregation applies), "
                                 "trimmed_mean or median (coordinate-wise; an entry not sent counts as 0), or "
                                 "krum (the upload closest to its neighbours).", RULES)
    trim_fraction: float = _f(0.2, "trimmed_mean: the share of values cut at each end, per coordinate.", ge=0, lt=0.5)
    krum_byzantine: int = _f(1, "krum: the number of attackers f it assumes among a round's uploads.", ge=0)
    min_cosine: float = _f(-1.0, "Reject an upload whose cosine similarity to the round's consensus (the "
                                 "coordinate-wise trimmed mean) is below this, with 3 uploads or more; -1 = off.",
                           ge=-1, le=1)


@dataclass
class DPConfig:
    noise_multiplier: float = _f(0.0, "Gaussian noise z (std z in units of clip_norm, per coordinate); 0 = no DP.",
                                 ge=0)
    clip_norm: float = _f(1.0, "Per-client L2 clipping norm C of the sparse delta.", gt=0)
    delta: float = _f(1e-5, "The delta of (epsilon, delta)-DP reported by the accountant.", gt=0, lt=1)


@dataclass
class SecAggConfig:
    enabled: bool = _f(False, "Secure aggregation (SecAgg+): clients mask their uploads so that the server learns "
                              "only the round's sum, never one client's upload. Needs a shared upload support "
                              "(comm.up_support other than topk) and rules out what needs single uploads (robust "
                              "bounds and rules, faults.norm_factor, simulated attackers, DP for now).")
    clip: float = _f(0.05, "The public bound every client clips each uploaded value to before masking (the server "
                           "cannot check it); error feedback keeps what is cut.", gt=0)
    value_bits: int = _f(8, "Bits of one quantized value, sign included; the ring adds ceil(log2 "
                            "fl.clients_per_round) bits so the sum cannot wrap.", ge=2, le=32)
    neighbours: int = _f(0, "SecAgg+ degree k: each client masks with, and shares its secrets among, k others; 0 = "
                            "everyone (plain SecAgg: the most robust to dropouts).", ge=0)
    threshold: int = _f(0, "Shamir threshold t of a neighbourhood (its k + 1 clients); 0 = a majority.", ge=0)


@dataclass
class HeteroConfig:
    mode: str = _f("none", "Client tiers: none; density (tier i sends at density d * 4^-(T-1-i)); rank (trains and "
                           "sends only the first r * 4^-(T-1-i) ranks).", ("none", "density", "rank"))
    num_tiers: int = _f(3, "Number of tiers; client c is in tier c % num_tiers.", ge=1)


@dataclass
class SLoRAConfig:
    stage1_rounds: int = _f(0, "SLoRA: rounds of stage 1, where clients fine-tune a fixed random subset of the LoRA "
                               "target matrices' own entries (drawn from the seed, never sent), before the switch to "
                               "LoRA initialised from the truncated SVD of that change; 0 = one stage, LoRA from the "
                               "start.", ge=0)
    density: float = _f(0.01, "SLoRA stage 1: share of each target matrix's entries that are trained and sent.",
                        gt=0, le=1)
    codec: str = _f("fp32", "SLoRA stage 1: value coding of the subset's values, both ways (positions cost nothing: "
                            "the subset comes from the seed).", VALUE_CODECS)


@dataclass
class RunConfig:
    checkpoint_every: int = _f(1, "Write the whole server and client state to the run folder every this many rounds; "
                                  "0 = never.", ge=0)
    threads: int = _f(0, "Torch CPU threads for every computation of the run (the sum order of a matmul depends "
                         "on it, so results are bit-identical only at the same count). 0 = decided at start: "
                         "OMP_NUM_THREADS if set, else torch's default; the run folder's config.toml records the "
                         "number, and a resume, Flower workers and ClientApps use it whatever their environment "
                         "says.", ge=0)
    device: str = _f("auto", "Where the model trains and evaluates: auto (a GPU when torch sees one), cpu or cuda. "
                             "The flat adapter, codec and server stay on CPU.", ("auto", "cpu", "cuda"))
    precision: str = _f("fp32", "Autocast of forward passes: fp32 (none), bf16 or fp16 (GPU only); weights and the "
                                "adapter stay fp32.", ("fp32", "bf16", "fp16"))


@dataclass
class CellmConfig:
    seed: int = _f(0, "Seed of everything: adapter init, client sampling, batches, dropout.", ge=0)
    rounds: int = _f(30, "Federated rounds.", ge=1)
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "Model and LoRA."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "Dataset and federated split."})
    fl: FLConfig = field(default_factory=FLConfig, metadata={"help": "Rounds, sampling, local work, aggregation."})
    client: ClientConfig = field(default_factory=ClientConfig, metadata={"help": "Client optimizer."})
    server: ServerConfig = field(default_factory=ServerConfig, metadata={"help": "Server optimizer."})
    comm: CommConfig = field(default_factory=CommConfig, metadata={"help": "Sparsity and wire format."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Evaluation."})
    run: RunConfig = field(default_factory=RunConfig, metadata={"help": "Run folder and checkpoints."})
    faults: FaultsConfig = field(default_factory=FaultsConfig, metadata={"help": "Dropouts, deadlines, rejection."})
    robust: RobustConfig = field(default_factory=RobustConfig,
                                 metadata={"help": "Bounding and combining uploads against hostile clients."})
    dp: DPConfig = field(default_factory=DPConfig, metadata={"help": "Differential privacy."})
    secagg: SecAggConfig = field(default_factory=SecAggConfig, metadata={"help": "Secure aggregation of uploads."})
    hetero: HeteroConfig = field(default_factory=HeteroConfig, metadata={"help": "Client tiers."})
    slora: SLoRAConfig = field(default_factory=SLoRAConfig, metadata={"help": "SLoRA's sparse first stage."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def describe_fields(cls: type = CellmConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every leaf field: the config's reference documentation."""
    rows = []
    inst = cls()
    for f in fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows.extend(describe_fields(type(value), f"{prefix}{f.name}."))
        else:
            help_ = f.metadata.get("help", "")
            if "choices" in f.metadata:
                help_ += f" [one of {', '.join(f.metadata['choices'])}]"
            elif "bounds" in f.metadata:
                help_ += f" [{bounds_text(f.metadata['bounds'])}]"
            rows.append((prefix + f.name, repr(value), help_))
    return rows
