"""Continuous batching on one paged KV cache: several prompts of different lengths are served
by a small scheduler that admits a request when the page pool has room for it, decodes every
running request together one token per step, and retires finished requests (their pages go
back to the pool for the next ones). Attention is fastattn.attention_with_kvcache on the paged
cache; the rest of the model is a Llama-style decoder (transformers' LlamaForCausalLM, random
weights). Each request's greedy tokens are compared with the same prompt generated alone by
transformers with attn_implementation="eager".

    python examples/generate_paged.py
"""
import collections
import dataclasses

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import fastattn

PAGE_SIZE = 16


@dataclasses.dataclass
class Request:
    prompt: list
    max_new_tokens: int
    pages: list = dataclasses.field(default_factory=list)
    length: int = 0  # tokens in the cache
    generated: list = dataclasses.field(default_factory=list)

    def pages_needed(self):
        return -(-(len(self.prompt) + self.max_new_tokens) // PAGE_SIZE)


class PagedDecoder:
    """A Llama-style model run step by step on a pool of cache pages (one pool per layer)."""

    def __init__(self, model, num_pages):
        self.model = model.model
        self.lm_head = model.lm_head
        config = model.config
        self.head_dim = config.hidden_size // config.num_attention_heads
        shape = (num_pages, config.num_key_value_heads, PAGE_SIZE, self.head_dim)
        # Zero-filled, as a cache should be (see fastattn.attention_with_kvcache).
        self.k_pages = [torch.zeros(shape) for _ in self.model.layers]
        self.v_pages = [torch.zeros(shape) for _ in self.model.layers]
        self.free_pages = collections.deque(range(num_pages))

    @torch.no_grad()
    def forward(self, requests, tokens):
        """Appends `tokens` (B, S) to the requests' caches and returns the next token of each."""
        B, S = tokens.shape
        lengths = torch.tensor([r.length for r in requests], dtype=torch.int32)
        width = max(len(r.pages) for r in requests)
        table = torch.tensor([r.pages + [r.pages[-1]] * (width - len(r.pages)) for r in requests], dtype=torch.int32)
        positions = lengths.long().unsqueeze(1) + torch.arange(S)
        h = self.model.embed_tokens(tokens)
        cos, sin = self.model.rotary_emb(h, positions)
        for layer, k_pages, v_pages in zip(self.model.layers, self.k_pages, self.v_pages):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = (proj(x).view(B, S, -1, self.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            out = fastattn.attention_with_kvcache(
                q, k_pages, v_pages, cache_seqlens=lengths, k_new=k, v_new=v, block_table=table, causal=True
            )
            h = h + attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.lm_head(self.model.norm(h[:, -1]))
        for r in requests:
            r.length += S
        return logits.argmax(-1).tolist()


def serve(decoder, requests):
    """Runs every request to completion; returns the steps taken (prefills + decode steps)."""
    waiting, running, steps = collections.deque(requests), [], 0
    while waiting or running:
        while waiting and waiting[0].pages_needed() <= len(decoder.free_pages):  # admit
            request = waiting.popleft()
            request.pages = [decoder.free_pages.popleft() for _ in range(request.pages_needed())]
            (first,) = decoder.forward([request], torch.tensor([request.prompt]))  # prefill
            request.generated.append(first)
            running.append(request)
            steps += 1
        if not running:
            raise RuntimeError("a request needs more pages than the pool has")
        active = [r for r in running if len(r.generated) < r.max_new_tokens]
        if active:  # one decode step for every running request, rows of different lengths
            next_tokens = decoder.forward(active, torch.tensor([[r.generated[-1]] for r in active]))
            for r, token in zip(active, next_tokens):
                r.generated.append(token)
            steps += 1
        for r in [r for r in running if len(r.generated) >= r.max_new_tokens]:  # retire
            running.remove(r)
            decoder.free_pages.extend(r.pages)
    return steps


def main(num_pages=12, max_new_tokens=12, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(config).eval()
    prompt_lengths = [5, 37, 17, 60, 9, 23]
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (n,), generator=generator).tolist() for n in prompt_lengths]
    requests = [Request(p, max_new_tokens) for p in prompts]
    steps = serve(PagedDecoder(model, num_pages), requests)

    model.config._attn_implementation = "eager"
    matches = 0
    for r in requests:
        alone = model.generate(torch.tensor([r.prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                               attention_mask=torch.ones(1, len(r.prompt), dtype=torch.long), pad_token_id=0)
        expected = alone[0, len(r.prompt):].tolist()
        matches += expected == r.generated
        print(f"prompt of {len(r.prompt):3d} tokens: {'same tokens as eager' if expected == r.generated else 'DIFFERENT'}"
              f"  {r.generated}")
    print(f"{len(requests)} requests on {num_pages} pages of {PAGE_SIZE} tokens in {steps} steps; "
          f"{matches}/{len(requests)} equal to eager generated alone")
    return matches == len(requests)


if __name__ == "__main__":
    raise SystemExit(0 if main() else 1)
