"""What a Flower message costs around cellm's payload: the envelope per message at d = 1, 1/16 and 1/64.

Run:  .venv/bin/python bench/envelope.py

For MiniLM-L6 (BBC head) and SmolLM2-135M, LoRA r=8 on their default targets, it encodes a download and an upload
of the real adapter size N (gaussian values, fp32 and int4, auto positions) with cellm's codec, wraps each in the
Flower message cellm sends (`cellm.runtime.flower.protocol`), and prints the payload, what Flower serializes
for the whole message (`protocol.transport_size`: every object of the message tree, deflated, as pushed to the
SuperLink), and the difference: the envelope. The message metadata carries 64-bit run and node ids as a real
run's do. gRPC's framing (a few bytes a frame) is not counted.
"""

from __future__ import annotations

import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from cellm.core.codec import CodecSpec
from cellm.core.feedback import compress
from cellm.federated.client import ClientReply, ClientTask
from cellm.models.flat import FlatView
from cellm.models.registry import load_model
from cellm.runtime.flower import protocol as P

MODELS = {"minilm-l6": 5, "smollm2-135m": None}  # name -> head size (classifier) or None
DENSITIES = {"1": 1.0, "1/16": 1 / 16, "1/64": 1 / 64}


def sizes(n: int, density: float, values: str) -> tuple[int, int, int, int]:
    """(download payload, download message, upload payload, upload message) bytes."""
    gen = torch.Generator().manual_seed(0)
    spec = CodecSpec(values=values)
    down, _, _ = compress(torch.randn(n, generator=gen), density, spec)
    up, sent, _ = compress(torch.randn(n, generator=gen), density, spec)
    task = ClientTask(round=12, client=37, download=down, up_density=density, codec_up=spec,
                      download_mode="weights", error_feedback=True, download_masked=density < 1,
                      init_digest="0" * 32)
    msg = Message(P.task_content(task, "f" * 64), dst_node_id=2**62 + 12345, message_type="train", group_id="12")
    reply = ClientReply(payload=up, num_examples=45, train_loss=0.1234, nonzeros=sent.k, extra={"codec_s": 0.01})
    back = Message(P.reply_content([(37, 12, reply)]), reply_to=msg)
    return len(down), P.transport_size(msg), len(up), P.transport_size(back)


def main() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 2**62 + 1, 1, 2**62 + 2
    print("| model | N | d | values | download payload | download message | envelope | upload payload | upload message | envelope |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, labels in MODELS.items():
        n = FlatView(load_model(name, lora_rank=8, lora_alpha=16, lora_dropout=0.0, num_labels=labels).model).numel
        for label, d in DENSITIES.items():
            for values in ("fp32", "int4"):
                dp, dm, upp, upm = sizes(n, d, values)
                print(f"| {name} | {n:,} | {label} | {values} | {dp:,} | {dm:,} | {dm - dp:,} ({(dm - dp) / dm:.1%}) "
                      f"| {upp:,} | {upm:,} | {upm - upp:,} ({(upm - upp) / upm:.1%}) |")


if __name__ == "__main__":
    main()
