"""The op-level suites: attention as encoders, decoders, padded batches and cross-attention
use it, the fused masked softmax, and the CPU performance targets. Each case compares every
usable fastattn backend of the device with PyTorch: SDPA (on CUDA each of its kernels that
runs) and the eager formula.

Shapes keep the token count per batch fixed (batch = tokens // seq), so the work grows
linearly with the sequence length; on CUDA they are flash-attention's benchmark setup (bf16,
16k tokens, heads * head_dim = 2048).
"""
import dataclasses

import torch
import torch.nn.functional as F

import fastattn

from .. import ops
from .engine import FWD, FWD_BWD, Case, Impl, attention_flops
from .measure import Timing
from .report import Target


@dataclasses.dataclass(frozen=True)
class Shapes:
    dtype: torch.dtype
    head_dims: tuple
    seqs: tuple  # attention sequence lengths (keys for cross-attention)
    tokens: int  # batch * seq
    model_dim: int  # heads * head_dim
    softmax_heads: int
    softmax_seqs: tuple  # softmax rows = columns


SHAPES = {
    ("cpu", "tiny"): Shapes(torch.float32, (16,), (32, 64), 128, 32, 2, (32, 64)),
    ("cpu", "quick"): Shapes(torch.float32, (64,), (256, 512, 1024), 2048, 512, 8, (256, 512, 1024)),
    ("cpu", "full"): Shapes(torch.float32, (64,), (256, 512, 1024, 2048), 4096, 512, 8, (256, 512, 1024, 2048)),
    ("cuda", "tiny"): Shapes(torch.bfloat16, (64,), (128, 256), 1024, 256, 4, (128, 256)),
    ("cuda", "quick"): Shapes(torch.bfloat16, (128,), (1024, 4096, 16384), 16384, 2048, 16, (1024, 4096)),
    ("cuda", "full"): Shapes(
        torch.bfloat16, (64, 128), (512, 1024, 2048, 4096, 8192, 16384), 16384, 2048, 16, (512, 1024, 2048, 4096, 8192)
    ),
}

TIMING = {
    "tiny": Timing(min_reps=2, budget_s=0.0, max_reps=2, cuda_warmup_ms=5, cuda_rep_ms=20),
    "quick": Timing(min_reps=3, budget_s=0.3, max_reps=20),
    "full": Timing(min_reps=5, budget_s=1.0, max_reps=50),
}

# fastattn backends worth timing per device (Triton on CPU is its interpreter, for tests only).
DEVICE_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def unavailable(device):
    """{implementation: reason} for the fastattn backends of `device` that cannot run here."""
    status = fastattn.backends()
    return {
        f"fastattn-{name}": status[name]["reason"] for name in DEVICE_BACKENDS[device] if not status[name]["usable"]
    }


def _usable_backends(device):
    status = fastattn.backends()
    return [name for name in DEVICE_BACKENDS[device] if status[name]["usable"]]


# ----------------------------------------------------------------------------- attention


def _padding_mask(batch, seq, device):
    """Key-padding mask (B, 1, 1, S), True = real token: lengths spread uniformly over
    [S/4, S], the longest sequence filling the batch as padding to the longest does."""
    lengths = torch.randint(max(1, seq // 4), seq + 1, (batch,), device=device)
    lengths[0] = seq
    return (torch.arange(seq, device=device) < lengths[:, None]).view(batch, 1, 1, seq)


def eager_attention(q, k, v, mask, causal, scale):
    """softmax(scale * q @ k^T, masked) @ v as models write it, in the input dtype."""
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if causal:
        hidden = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(hidden, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _sdpa_impls(device, causal):
    def sdpa(inputs):
        return F.scaled_dot_product_attention(
            inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"], is_causal=causal
        )

    if device == "cpu":
        return [Impl("sdpa", sdpa)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    impls = []
    for label, name in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                        ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")):
        backend = getattr(SDPBackend, name, None)  # cuDNN's kernel is missing from older torch
        if backend is None:
            continue

        def run(inputs, backend=backend):
            with sdpa_kernel(backend):
                return sdpa(inputs)

        # A kernel that rejects these inputs (flash with a mask) raises RuntimeError: skipped.
        impls.append(Impl(f"sdpa-{label}", run, declines=(RuntimeError,)))
    return impls


def _key_mask(kind, batch, seq, device):
    """The key mask of a case: None ("none"), random lengths ("key-padding", see
    _padding_mask) or the same for every sequence ("last half hidden")."""
    if kind == "none":
        return None
    if kind == "key-padding":
        return _padding_mask(batch, seq, device)
    return (torch.arange(seq, device=device) < seq // 2).view(1, 1, 1, seq).repeat(batch, 1, 1, 1)


def _shape_label(batch, heads, seq_q, seq_k, head_dim):
    seqs = f"S{seq_q}" if seq_q == seq_k else f"Sq{seq_q} Sk{seq_k}"
    return f"B{batch} H{heads} {seqs} D{head_dim}"


FP32_TWIN = "fastattn-cpu fp32"


def _attention_case(suite, device, dtype, batch, heads, seq_q, seq_k, head_dim, causal, mask, label=None,
                    fp32_twin=False):
    """fp32_twin: the case also runs fastattn's CPU kernel on fp32 copies of its inputs (impl
    FP32_TWIN), interleaved with the others, so that a low-precision case can be compared with
    fp32 in the same rounds rather than with an fp32 case timed minutes apart."""
    scale = head_dim**-0.5

    def make_inputs(requires_grad):
        q, k, v = (
            torch.randn(batch, heads, s, head_dim, device=device, dtype=dtype, requires_grad=requires_grad)
            for s in (seq_q, seq_k, seq_k)
        )
        inputs = {"q": q, "k": k, "v": v, "mask": _key_mask(mask, batch, seq_k, device)}
        if fp32_twin:
            inputs.update({f"{name} fp32": t.detach().float().requires_grad_(requires_grad)
                           for name, t in (("q", q), ("k", k), ("v", v))})
        return inputs

    impls = []
    for backend in _usable_backends(device):

        def run(inputs, backend=backend):
            return fastattn.attention(
                inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"], causal=causal, backend=backend
            )

        # A forced backend that cannot run these inputs raises ValueError saying why: skipped.
        impls.append(Impl(f"fastattn-{backend}", run, declines=(ValueError,)))
    if fp32_twin:
        impls.append(Impl(FP32_TWIN, lambda i: fastattn.attention(i["q fp32"], i["k fp32"], i["v fp32"],
                                                                  attn_mask=i["mask"], causal=causal, backend="cpu")))
    impls += _sdpa_impls(device, causal)
    impls.append(Impl("eager", lambda i: eager_attention(i["q"], i["k"], i["v"], i["mask"], causal, scale)))
    return Case(
        suite=suite,
        label=label or _shape_label(batch, heads, seq_q, seq_k, head_dim),
        params=dict(
            batch=batch,
            heads_q=heads,
            heads_kv=heads,
            seq_q=seq_q,
            seq_k=seq_k,
            head_dim=head_dim,
            dtype=str(dtype).replace("torch.", ""),
            causal=causal,
            mask=mask,
        ),
        make_inputs=make_inputs,
        impls=impls,
        baseline="sdpa",
        x=seq_k,
        series=f"D={head_dim}",
        flops=attention_flops(batch, heads, seq_q, seq_k, head_dim, causal=causal),
    )


def _attention_suite(suite, causal=False, padded=False, query_fraction=1):
    # Causal cases are square, where fastattn's bottom-right rule and SDPA's top-left agree.
    def build(device, scale):
        shapes = SHAPES[device, scale]
        cases = []
        for head_dim in shapes.head_dims:
            heads = shapes.model_dim // head_dim
            for seq in shapes.seqs:
                batch = max(2 if padded else 1, shapes.tokens // seq)  # padding needs >= 2 sequences
                mask = "key-padding" if padded else "none"
                args = (batch, heads, seq // query_fraction, seq, head_dim, causal, mask)
                cases.append(_attention_case(suite, device, shapes.dtype, *args))
        return cases

    return build


# ----------------------------------------------------------------------------- targets

# The CPU performance targets: name, (B, H, S, D), dtype, causal, key mask, whether eager runs
# the fwd+bwd pass too (not at S=2048 causal: slow, and no target reads it).
TARGET_CASES = (
    ("base", (4, 12, 512, 64), torch.float32, False, "none", True),
    ("causal", (1, 12, 2048, 64), torch.float32, True, "none", False),
    ("key-padding", (4, 12, 512, 64), torch.float32, False, "last half hidden", True),
    ("base-bf16", (4, 12, 512, 64), torch.bfloat16, False, "none", True),
    ("causal-bf16", (1, 12, 2048, 64), torch.bfloat16, True, "none", False),
    ("head128", (2, 8, 1024, 128), torch.float32, False, "none", True),
)
# One KV-cache generation step (name, (B, H, Sq, Sk, D)), fp32 forward: reported, no target.
DECODE_CASE = ("decode", (4, 12, 1, 2000, 64))
# One fp32 forward, no mask, where eager's S x S scores take GBs: peak memory, one timed run.
MEMORY_CASE = ("memory", (1, 8, 8192, 64))
MEMORY_BOUND_BYTES = 100e6


# The ceilings, timed in the same run as the targets: the peak FMA rate (a register-resident
# FMA loop with the CPU kernels' vectors on every intra-op thread), the kernels' own tile GEMM
# on an L1-resident 64^3 tile (what their micro-kernel leaves of that peak) and an fp32
# matmul of a size comparable to attention's. Sizes: (tiny scale, full scale).
FMA_ITERATIONS = (2_000, 2_000_000)
TILE_GEMM_ITERATIONS = (20, 20_000)
SGEMM_SIZE = (128, 2048)
CEILING_FMA, CEILING_TILE_GEMM, CEILING_SGEMM = "peak FMA rate", "tile GEMM in L1", "sgemm"


def _ceiling_cases(scale):
    """The ceilings as cases of the targets suite; report.roofline reads them by params["ceiling"]."""
    full = scale != "tiny"
    size = SGEMM_SIZE[full]
    cases = []
    if ops._C is not None:
        loops = ((CEILING_FMA, "fma-loop", ops._C.cpu_fma_peak, FMA_ITERATIONS[full]),
                 (CEILING_TILE_GEMM, "tile-gemm", ops._C.cpu_tile_gemm_peak, TILE_GEMM_ITERATIONS[full]))
        for ceiling, impl, loop, iterations in loops:
            run = Impl(impl, lambda inputs, loop=loop, iterations=iterations: torch.tensor(float(loop(iterations))))
            cases.append(Case(suite="targets", label=f"ceiling: {ceiling}", params={"ceiling": ceiling},
                              make_inputs=lambda requires_grad: {}, impls=[run], baseline=impl,
                              x=iterations, series="ceilings", passes=(FWD,),
                              flops={FWD: iterations * loop(1)}))  # the loops return their FLOPs

    def matrices(requires_grad):
        return {"a": torch.randn(size, size), "b": torch.randn(size, size)}

    cases.append(Case(suite="targets", label=f"ceiling: {CEILING_SGEMM} {size}^3", params={"ceiling": CEILING_SGEMM},
                      make_inputs=matrices, impls=[Impl("torch.mm", lambda inputs: torch.mm(inputs["a"], inputs["b"]))],
                      baseline="torch.mm", x=size, series="ceilings", passes=(FWD,), flops={FWD: 2 * size**3}))
    return cases


def _target_shape(shape, scale):
    """The shape at `scale`: as given, or (for the tests) 1 sequence, 2 heads, S/16, D/4."""
    if scale != "tiny":
        return shape
    _, _, seq, head_dim = shape
    return 1, 2, seq // 16, head_dim // 4


def _target_label(name, shape, scale):
    batch, heads, seq, head_dim = _target_shape(shape, scale)
    return f"{name} {_shape_label(batch, heads, seq, seq, head_dim)}"


def _targets_suite(device, scale):
    if device != "cpu":
        return []  # CPU targets; the run says so (see unsupported)
    cases = _ceiling_cases(scale)
    for name, shape, dtype, causal, mask, eager_backward in TARGET_CASES:
        batch, heads, seq, head_dim = _target_shape(shape, scale)
        label = _target_label(name, shape, scale)
        case = _attention_case("targets", device, dtype, batch, heads, seq, seq, head_dim, causal, mask, label,
                               fp32_twin=dtype != torch.float32 and ops._C is not None)
        case = dataclasses.replace(case, series=name)  # a plot per case: they differ in more than S
        if eager_backward:
            cases.append(case)
        else:
            without_eager = [impl for impl in case.impls if impl.name != "eager"]
            cases += [dataclasses.replace(case, passes=(FWD,)),
                      dataclasses.replace(case, passes=(FWD_BWD,), impls=without_eager)]
    name, (batch, heads, seq_q, seq_k, head_dim) = DECODE_CASE
    if scale == "tiny":
        batch, heads, seq_k, head_dim = 1, 2, seq_k // 16, head_dim // 4
    case = _attention_case("targets", device, torch.float32, batch, heads, seq_q, seq_k, head_dim, False, "none",
                           f"{name} {_shape_label(batch, heads, seq_q, seq_k, head_dim)}")
    cases.append(dataclasses.replace(case, series=name, passes=(FWD,)))
    name, shape = MEMORY_CASE
    batch, heads, seq, head_dim = _target_shape(shape, scale)
    case = _attention_case("targets", device, torch.float32, batch, heads, seq, seq, head_dim, False, "none",
                           _target_label(name, shape, scale))
    cases.append(dataclasses.replace(
        case,
        impls=[impl for impl in case.impls if impl.name != "sdpa"],
        baseline="eager",
        series=name,
        passes=(FWD,),
        timing=Timing(min_reps=1, budget_s=0.0, max_reps=1),
    ))
    return cases


def _targets(device, scale):
    """The targets of the targets suite, naming its cases (report.check_targets reads them)."""
    if device != "cpu":
        return []
    label = {name: _target_label(name, shape, scale) for name, shape, *_ in TARGET_CASES + (MEMORY_CASE,)}
    fast = "fastattn-cpu"
    targets = [
        Target("forward, no mask: fastattn / SDPA speed", "speedup",
               (label["base"], FWD, fast), ">=", 1.3, (label["base"], FWD, "sdpa")),
        Target("causal forward: fastattn / SDPA speed", "speedup",
               (label["causal"], FWD, fast), ">=", 1.35, (label["causal"], FWD, "sdpa")),
        Target("key-padding forward, same mask: fastattn / SDPA speed", "speedup",
               (label["key-padding"], FWD, fast), ">=", 1.8, (label["key-padding"], FWD, "sdpa")),
        Target("forward+backward, no mask: fastattn / SDPA speed", "speedup",
               (label["base"], FWD_BWD, fast), ">=", 1.35, (label["base"], FWD_BWD, "sdpa")),
    ]
    for pass_ in (FWD, FWD_BWD):
        targets.append(Target(f"head dim 128 {pass_}: fastattn / SDPA speed", "speedup",
                              (label["head128"], pass_, fast), ">=", 1.15, (label["head128"], pass_, "sdpa")))
    if ops._C is not None:  # the roofline: the forward's FLOP rate against the FMA loop's
        for name in ("base", "head128"):
            targets.append(Target(f"{name} forward: fastattn GFLOP/s / peak FMA rate", "fraction",
                                  (label[name], FWD, fast), ">=", 0.85, (f"ceiling: {CEILING_FMA}", FWD, "fma-loop")))
    for name in ("base", "causal"):  # bf16 against fp32 copies of its inputs, in the same rounds
        for pass_ in (FWD, FWD_BWD):
            targets.append(Target(
                f"{name} {pass_}: fastattn bf16 time / its fp32 time", "time ratio",
                (label[f"{name}-bf16"], pass_, fast), "<=", 1.0, (label[f"{name}-bf16"], pass_, FP32_TWIN),
            ))
    targets.append(Target("one long forward: fastattn peak memory increase (MB)", "peak MB",
                          (label["memory"], FWD, fast), "<", MEMORY_BOUND_BYTES / 1e6))
    return targets


# ----------------------------------------------------------------------------- softmax


def eager_masked_softmax(x, mask, scale):
    return torch.softmax((x * scale).masked_fill(~mask, float("-inf")), dim=-1)


def _softmax_case(device, shapes, batch, heads, seq):
    dtype, scale = shapes.dtype, 0.125

    def make_inputs(requires_grad):
        x = torch.randn(batch, heads, seq, seq, device=device, dtype=dtype, requires_grad=requires_grad)
        return {"x": x, "mask": _padding_mask(batch, seq, device)}

    impls = [
        Impl(
            f"fastattn-{backend}",
            lambda i, backend=backend: fastattn.softmax(i["x"], mask=i["mask"], scale=scale, backend=backend),
            declines=(ValueError,),
        )
        for backend in _usable_backends(device)
    ]
    impls.append(Impl("torch", lambda i: eager_masked_softmax(i["x"], i["mask"], scale)))
    # Least possible traffic: forward reads x and writes y; backward reads dy and y, writes dx.
    size = batch * heads * seq * seq * dtype.itemsize
    return Case(
        suite="softmax",
        label=f"B{batch} H{heads} {seq}x{seq}",
        params=dict(batch=batch, heads_q=heads, seq_q=seq, seq_k=seq, dtype=str(dtype).replace("torch.", ""),
                    causal=False, mask="key-padding"),
        make_inputs=make_inputs,
        impls=impls,
        baseline="torch",
        x=seq,
        bytes={FWD: 2 * size, FWD_BWD: 5 * size},
    )


def _softmax_suite(device, scale):
    shapes = SHAPES[device, scale]
    return [
        _softmax_case(device, shapes, max(1, shapes.tokens // seq), shapes.softmax_heads, seq)
        for seq in shapes.softmax_seqs
    ]


SUITES = {
    "encoder": _attention_suite("encoder"),
    "decoder": _attention_suite("decoder", causal=True),
    "padded": _attention_suite("padded", padded=True),
    "cross": _attention_suite("cross", query_fraction=4),
    "softmax": _softmax_suite,
    "targets": _targets_suite,
}
# `fastattn bench` without --suite: the targets suite re-times the shapes of the CPU targets.
DEFAULT_SUITES = ("encoder", "decoder", "padded", "cross", "softmax")

DESCRIPTIONS = {
    "encoder": "self-attention, no mask (BERT-like encoders)",
    "decoder": "causal self-attention (GPT-like decoders)",
    "padded": "self-attention with a key-padding mask, lengths spread over [S/4, S]",
    "cross": "cross-attention, queries = keys / 4 (T5/BART-like decoders reading the encoder)",
    "softmax": "fused masked softmax vs torch.softmax (key-padding mask, scaled)",
    "targets": "the CPU performance targets: fixed shapes, fp32 and bf16, then their met / not met (CPU only)",
}


def unsupported(names, device):
    """{suite: reason} for the named suites that have nothing to run on `device`."""
    return {
        name: "its targets are CPU ones (on CUDA see encoder, decoder, padded, cross)"
        for name in names
        if name == "targets" and device != "cpu"
    }


def build(names, device, scale):
    """The cases of the named suites (in order) for `device` ("cpu"/"cuda") at `scale`
    ("tiny", "quick" or "full")."""
    return [case for name in names for case in SUITES[name](device, scale)]


def targets(names, device, scale):
    """The targets to check after running the named suites."""
    return _targets(device, scale) if "targets" in names else []
