"""Fine-tune a model through a swarm with LoRA adapters you own, then generate with them.

    python examples/finetune.py --model ./my-model --initial-peers /ip4/1.2.3.4/tcp/31330/p2p/12D3Koo... \
        --steps 30 --out ./my-adapter

The servers run their frozen blocks forward and backward; this script holds the LoRA
adapters (rank 8 on q and v here) and the optimizer. It prints the loss falling on a
small text, saves the adapter in the PEFT layout (``peft`` can load it onto the same
checkpoint) and shows a greedy continuation before and after training.
"""

import argparse

import torch
import torch.nn.functional as F

from kernels.lora import LoraAdapters, LoraConfig, save_peft
from swarm.serving.remote_training import connect_in_thread

TEXT = "def add(a, b):\n    return a + b\n\n" * 8  # a small text set the adapter learns by heart


def main(args: argparse.Namespace) -> None:
    with connect_in_thread(args.model, args.initial_peers, swarm=args.swarm) as client:
        model = client.model
        ids = model.encode(TEXT)[:, : args.seq_len + 1]
        inputs, labels = ids[:, :-1], ids[:, 1:]
        prompt = model.encode("def add(")
        before = client.run(model.generate(prompt, args.max_new_tokens))
        adapters = LoraAdapters(model.model_config, LoraConfig(rank=8, alpha=16, targets=("q", "v")))
        optimizer = torch.optim.AdamW(adapters.parameters(), lr=args.lr)
        for step in range(1, args.steps + 1):
            optimizer.zero_grad()
            logits = model.forward(inputs, adapters=adapters)  # blocks on the servers, autograd here
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss.backward()
            optimizer.step()
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
        save_peft(adapters, args.out, base_model=args.model)
        # The servers apply the adapter in the generation's KV-cached sessions.
        after = client.run(model.generate(prompt, args.max_new_tokens, adapter=adapters))
        print("before:", repr(model.decode(before[0].tolist())))
        print("after: ", repr(model.decode(after[0].tolist())))
        print(f"adapter saved to {args.out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--initial-peers", nargs="+", required=True, help="multiaddrs of swarm members")
    parser.add_argument("--swarm", default="swarm", help="swarm name")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--out", default="./adapter", help="where the PEFT adapter is saved")
    main(parser.parse_args())
