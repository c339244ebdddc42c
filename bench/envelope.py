"""What a Flower message costs around cellm's payload: the envelope per client at d = 1, 1/16 and 1/64.

Run:  .venv/bin/python bench/envelope.py

For MiniLM-L6 (BBC head) and SmolLM2-135M, LoRA r=8 on their default targets, it encodes a download and an upload
of the real adapter size N (gaussian values, fp32 and int4, auto positions) with cellm's codec, wraps each in the
Flower message cellm sends (`cellm.runtime.flower.protocol`), and prints the payload, what Flower serializes
for the whole message (`protocol.transport_size`: every object of the message tree, deflated, as pushed to the
SuperLink), and the difference: the envelope. The message metadata carries 64-bit run and node ids as a real
run's do. gRPC's framing (a few bytes a frame) is not counted. A node gets one message a round with the tasks of
all its sampled clients (k of them) and answers with one reply: the envelope is shared, so it is printed per
client for k = 1 and k = 3. Each client here gets its own download (delta mode); in FLASC's weights mode a node's
clients share one download, which the message carries once.
"""

from __future__ import annotations

import torch
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

from cellm.core.codec import CodecSpec
from cellm.core.feedback import compress
from cellm.federated.messages import ClientReply, ClientTask
from cellm.models.flat import FlatView
from cellm.models.registry import load_model
from cellm.runtime.flower import protocol as P

MODELS = {"minilm-l6": 5, "smollm2-135m": None}  # name -> head size (classifier) or None
DENSITIES = {"1": 1.0, "1/16": 1 / 16, "1/64": 1 / 64}


def sizes(n: int, density: float, values: str, k: int) -> tuple[int, int, int, int]:
    """(download payload, download message, upload payload, upload message) bytes, per client, for one message
    carrying the tasks (and one reply carrying the uploads) of ``k`` clients served by one node."""
    gen = torch.Generator().manual_seed(0)
    spec = CodecSpec(values=values)
    tasks, replies = [], []
    for c in range(37, 37 + k):
        down, _, _ = compress(torch.randn(n, generator=gen), density, spec)  # a distinct payload per client
        up, sent, _ = compress(torch.randn(n, generator=gen), density, spec)
        tasks.append(ClientTask(round=12, client=c, download=down, up_density=density, codec_up=spec,
                                download_mode="delta", error_feedback=True, download_masked=density < 1,
                                init_digest="0" * 32))
        replies.append((c, 12, ClientReply(payload=up, num_examples=45, train_loss=0.1234, nonzeros=sent.k,
                                           extra={"codec_s": 0.01})))
    msg = Message(P.task_content(tasks, "f" * 64, 8), dst_node_id=2**62 + 12345, message_type="train",
                  group_id="12")
    back = Message(P.reply_content(replies), reply_to=msg)
    down_bytes, up_bytes = sum(len(t.download) for t in tasks), sum(len(r.payload) for _, _, r in replies)
    return down_bytes // k, P.transport_size(msg) // k, up_bytes // k, P.transport_size(back) // k


def main() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 2**62 + 1, 1, 2**62 + 2
    print("Bytes per client; k = clients of one node in one message (the node's sampled clients of the round).")
    print("| model | N | d | values | k | download payload | download message | envelope | upload payload | "
          "upload message | envelope |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, labels in MODELS.items():
        n = FlatView(load_model(name, lora_rank=8, lora_alpha=16, lora_dropout=0.0, num_labels=labels,
                                cache_dir=".cellm-cache").model).numel
        for label, d in DENSITIES.items():
            for values in ("fp32", "int4"):
                for k in (1, 3):
                    dp, dm, upp, upm = sizes(n, d, values, k)
                    print(f"| {name} | {n:,} | {label} | {values} | {k} | {dp:,} | {dm:,} | {dm - dp:,} "
                          f"({(dm - dp) / dm:.1%}) | {upp:,} | {upm:,} | {upm - upp:,} ({(upm - upp) / upm:.1%}) |")


if __name__ == "__main__":
    main()
