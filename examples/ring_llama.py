"""Ring attention in a Llama-style decoder whose sequence is sharded over processes.

    python examples/ring_llama.py [--world-size 2] [--seq-len 256] [--layout zigzag|contiguous]

Builds a small Llama from LlamaConfig (random weights, no downloads) and runs forward and
backward twice: in one process on the whole sequence with PyTorch SDPA attention, and on
--world-size processes (gloo) that each hold their shard of the tokens and of the position
ids (RoPE needs each token's global position), with every attention layer computed by
fastattn.distributed.ring_attention, registered as attn_implementation="fastattn_ring".
The loss is a fixed random weighting of the logits, a sum over tokens, so the ranks' losses
add up to the whole one and their parameter gradients (all-reduced) to its gradients.
Prints the largest differences of the logits and the gradients.
"""
import argparse
import functools
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn.distributed as cp  # noqa: E402

RING_IMPLEMENTATION = "fastattn_ring"
SEED = 0


def ring_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, layout, **kwargs):
    """transformers' attention-function interface on sequence shards: query (B, Hq, S/P, D),
    key/value (B, Hkv, S/P, D). The causal mask over the whole sequence is the ring's own, so
    no mask function is registered and attention_mask arrives as None."""
    if attention_mask is not None:
        raise ValueError(f"attn_implementation='{RING_IMPLEMENTATION}' takes no attention_mask (no padding), got one")
    if dropout:
        raise ValueError(f"attn_implementation='{RING_IMPLEMENTATION}' has no attention dropout, got dropout={dropout}")
    out = cp.ring_attention(query, key, value, causal=True, scale=scaling, layout=layout)
    return out.transpose(1, 2).contiguous(), None


def build(seq_len):
    """The model and its inputs, identical in every process (fixed seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
    )
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, config.vocab_size, (2, seq_len))
    position_ids = torch.arange(seq_len).expand(2, seq_len)
    logit_weights = torch.randn(2, seq_len, config.vocab_size)
    return model, input_ids, position_ids, logit_weights


def forward_backward(model, input_ids, position_ids, logit_weights):
    """Logits and parameter gradients of loss = sum(logits * logit_weights)."""
    model.zero_grad()
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
    (logits * logit_weights).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_parameters()}


def worker(rank, world_size, port, seq_len, layout):
    from transformers import AttentionInterface

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    AttentionInterface.register(RING_IMPLEMENTATION, functools.partial(ring_attention_forward, layout=layout))
    model, input_ids, position_ids, logit_weights = build(seq_len)

    model.set_attn_implementation("sdpa")
    whole_logits, whole_grads = forward_backward(model, input_ids, position_ids, logit_weights)

    model.set_attn_implementation(RING_IMPLEMENTATION)
    shards = (cp.shard(t, dim=1, layout=layout) for t in (input_ids, position_ids, logit_weights))
    logits, grads = forward_backward(model, *shards)
    for grad in grads.values():
        dist.all_reduce(grad)  # each rank's loss covers its tokens only: the gradients add up
    logits = cp.unshard(logits, dim=1, layout=layout)
    if rank == 0:
        logits_diff = (logits - whole_logits).abs().max().item()
        grad_diff = max((grads[name] - whole_grads[name]).abs().max().item() for name in grads)
        grad_scale = max(g.abs().max().item() for g in whole_grads.values())
        print(f"{world_size} ranks, layout={layout}, sequence {seq_len}: ring attention vs one process (SDPA)")
        print(f"  max |logits difference|    {logits_diff:.3g} (logits up to {whole_logits.abs().max().item():.3g})")
        print(f"  max |gradient difference|  {grad_diff:.3g} (gradients up to {grad_scale:.3g})")
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--layout", choices=cp.LAYOUTS, default="zigzag")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(args.world_size, port, args.seq_len, args.layout), nprocs=args.world_size)


if __name__ == "__main__":
    main()
