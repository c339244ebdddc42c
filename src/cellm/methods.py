"""Named methods: each is a set of config overrides over the same round loop (no copy of the loop per method).

Densities are fractions of the adapter; "rank/4" means a quarter of the base preset's LoRA rank.
"""

from __future__ import annotations

from collections.abc import Callable

from cellm.config import CellmConfig
from cellm.errors import ConfigError

Overrides = Callable[[CellmConfig], list[str]]


def _flasc(d: float) -> Overrides:
    return lambda cfg: [f"comm.down_density={d}", f"comm.up_density={d}"]


def _relative(d: float, down: str, up: str, feedback: bool = True) -> Overrides:
    """Init-relative download at ``down`` precision, upload at ``up`` precision (with error feedback)."""
    return lambda cfg: _flasc(d)(cfg) + ["comm.init_relative=true", f"comm.codec_down={down}",
                                         f"comm.codec_up={up}", f"comm.error_feedback_up={str(feedback).lower()}"]


def _shared(rule: str, d_up: float, head: bool = False) -> Overrides:
    """ir-ef-int4-1/16's download, uploads on a support every client of the round shares (values only, int4,
    error feedback): what secure aggregation needs. Without positions, d_up = 1/8 costs about the bytes of 1/16."""
    return lambda cfg: _relative(0.0625, "int4", "int4")(cfg) + [
        f"comm.up_density={d_up}", f'comm.up_support="{rule}"', f"comm.up_support_head={str(head).lower()}"]


def _slora(stage2: list[str]) -> Overrides:
    """SLoRA: stage 1 (a quarter of the rounds) trains a seeded 1% of the target matrices, then LoRA from its SVD."""
    return lambda cfg: [f"slora.stage1_rounds={max(1, cfg.rounds // 4)}", "slora.density=0.01", *stage2]


METHODS: dict[str, tuple[str, Overrides]] = {
    "dense": ("Dense LoRA: the whole adapter both ways (d = 1).",
              lambda cfg: ["comm.down_density=1.0", "comm.up_density=1.0"]),
    "flasc-1/4": ("FLASC: top-k of the weights down, top-k of the delta up, d = 1/4 each way.", _flasc(0.25)),
    "flasc-1/16": ("FLASC at d = 1/16 each way.", _flasc(0.0625)),
    "flasc-1/64": ("FLASC at d = 1/64 each way.", _flasc(0.015625)),
    "lora-rank/4": ("Dense LoRA at a quarter of the rank (the lower-rank baseline).",
                    lambda cfg: [f"model.lora_rank={max(1, cfg.model.lora_rank // 4)}",
                                 f"model.lora_alpha={cfg.model.lora_alpha / 4}",
                                 "comm.down_density=1.0", "comm.up_density=1.0"]),
    "ffa-lora": ("FFA-LoRA: A frozen at its seeded init, never trained nor sent; B and head dense.",
                 lambda cfg: ["model.freeze_a=true", "comm.down_density=1.0", "comm.up_density=1.0"]),
    "pruned-lora-1/4": ("Pruned LoRA: one dense round, then a fixed top-1/4 mask; training and upload stay on it.",
                        lambda cfg: ["comm.freeze_mask_after=1", "comm.client_freeze=true",
                                     "comm.down_density=0.25", "comm.up_density=0.25"]),
    "flasc-ef-1/16": ("FLASC d = 1/16 with upload error feedback (clients keep what top-k dropped).",
                      lambda cfg: _flasc(0.0625)(cfg) + ["comm.error_feedback_up=true"]),
    "flasc-int8-1/16": ("FLASC d = 1/16 with int8 values both ways.",
                        lambda cfg: _flasc(0.0625)(cfg) + ["comm.codec_down=int8", "comm.codec_up=int8"]),
    "flasc-ef-int8-1/16": ("FLASC d = 1/16 to stateless clients (weights download), upload error feedback, int8 both ways.",
                           lambda cfg: _flasc(0.0625)(cfg) + ["comm.error_feedback_up=true", "comm.codec_down=int8",
                                                              "comm.codec_up=int8"]),
    "flasc-ef-int8-1/32": ("As flasc-ef-int8-1/16 at d = 1/32.",
                           lambda cfg: _flasc(0.03125)(cfg) + ["comm.error_feedback_up=true", "comm.codec_down=int8",
                                                               "comm.codec_up=int8"]),
    "cellm-1/16": ("cellm: d = 1/16, delta downloads to stateful clients, upload error feedback, int8 both ways.",
                   lambda cfg: _flasc(0.0625)(cfg) + ["comm.download_mode=delta", "comm.error_feedback_up=true",
                                                      "comm.codec_down=int8", "comm.codec_up=int8"]),
    "cellm-1/64": ("cellm at d = 1/64.",
                   lambda cfg: _flasc(0.015625)(cfg) + ["comm.download_mode=delta", "comm.error_feedback_up=true",
                                                        "comm.codec_down=int8", "comm.codec_up=int8"]),
    "flasc-ir-1/16": ("FLASC d = 1/16 with the init-relative download (top-k of w - w0; w0 rebuilt by clients), fp32.",
                      _relative(0.0625, "fp32", "fp32", feedback=False)),
    "ir-ef-int8-1/16": ("Init-relative download, upload error feedback, int8 both ways, d = 1/16.",
                        _relative(0.0625, "int8", "int8")),
    "ir-ef-int4-1/16": ("Init-relative download, upload error feedback, int4 both ways, d = 1/16.",
                        _relative(0.0625, "int4", "int4")),
    "ir-ef-int4-1/32": ("As ir-ef-int4-1/16 at d = 1/32.", _relative(0.03125, "int4", "int4")),
    "ir-ef-int4-1/64": ("As ir-ef-int4-1/16 at d = 1/64.", _relative(0.015625, "int4", "int4")),
    "ir-ef-int4-int2-1/16": ("Init-relative int4 download, ternary (int2) upload with error feedback, d = 1/16.",
                             _relative(0.0625, "int4", "int2")),
    "ir-ef-int4-random-1/8": ("As ir-ef-int4-1/16, uploads on a seeded random support of 1/8 shared by the round's "
                              "clients (values only).", _shared("random", 0.125)),
    "ir-ef-int4-dlr-head-1/8": ("As ir-ef-int4-1/16, uploads on the download's support topped up with a seeded random "
                                "set to 1/8, plus the whole head, shared by the round's clients (values only).",
                                _shared("download+random", 0.125, head=True)),
    "ir-ef-int4-b16-1/16": ("As ir-ef-int4-1/16 with block top-k: whole blocks of 16 consecutive entries, a position "
                            "a block (comm.topk_block = 16).",
                            lambda cfg: _relative(0.0625, "int4", "int4")(cfg) + ["comm.topk_block=16"]),
    "ir-ef-rot3-rot2-1/16": ("As ir-ef-int4-1/16 with randomly rotated values: 3 bits down, 2 bits up (rot3 / rot2).",
                             _relative(0.0625, "rot3", "rot2")),
    "ir-ef-rot3-rot2-1/16-s2": ("As ir-ef-rot3-rot2-1/16 with twice the base server learning rate (fewer rounds).",
                                lambda cfg: _relative(0.0625, "rot3", "rot2")(cfg) + [
                                    f"server.lr={2 * cfg.server.lr}"]),
    "rank1-rot3-rot2-s2": ("Dense rank-1 LoRA (alpha / r kept) with rotated values, 3 bits down and 2 bits up, "
                           "init-relative download, upload error feedback, twice the base server learning rate.",
                           lambda cfg: _relative(1.0, "rot3", "rot2")(cfg) + [
                               "model.lora_rank=1", f"model.lora_alpha={cfg.model.lora_alpha / cfg.model.lora_rank}",
                               f"server.lr={2 * cfg.server.lr}"]),
    "dense-int4-ef": ("The quantization-only peer: dense LoRA, int4 both ways (the download relative to the seeded "
                      "init), upload error feedback.", _relative(1.0, "int4", "int4")),
    "rank1-int4-ef": ("The low-rank peer: dense rank-1 LoRA (alpha / r kept), int4 both ways (download relative to "
                      "the seeded init), upload error feedback.",
                      lambda cfg: _relative(1.0, "int4", "int4")(cfg) + [
                          "model.lora_rank=1", f"model.lora_alpha={cfg.model.lora_alpha / cfg.model.lora_rank}"]),
    "vera-int4-ef": ("The tiny-payload peer: VeRA through peft (shared frozen random projections of rank "
                     "model.vera_rank; only their per-layer scaling vectors and the head are trained and sent), "
                     "dense, int4 both ways (download relative to the seeded init), upload error feedback.",
                     lambda cfg: _relative(1.0, "int4", "int4")(cfg) + ["model.adapter=vera"]),
    "slora": ("SLoRA as published: a quarter of the rounds training a seeded 1% of the target matrices (fp32), "
              "then dense LoRA initialised from the SVD of that change.",
              _slora(["comm.down_density=1.0", "comm.up_density=1.0"])),
    "slora-ef-int4-1/16": ("SLoRA's stage 1, then stage 2 with FLASC d = 1/16, upload error feedback, int4 both ways.",
                           _slora(["comm.down_density=0.0625", "comm.up_density=0.0625", "comm.error_feedback_up=true",
                                   "comm.codec_down=int4", "comm.codec_up=int4"])),
}


def method_overrides(name: str, base: CellmConfig) -> list[str]:
    if name not in METHODS:
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(METHODS)})")
    return METHODS[name][1](base)
