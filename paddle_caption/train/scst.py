"""Self-critical sequence training (SCST): optimise the metric the contest scores, CIDEr-D.

Per micro-batch of B images (Rennie et al. 2017; Luo 2020 for the `mean` baseline):

1. sample k captions per image with the kit's batched generator's KV-cache batch
   (`decoding.batch.DecodeBatch`): each image is encoded and its prompt prefilled once, its cache
   row copied k times (`keep`, as beam search copies parents), then the k rows decode together,
   finished rows leaving the batch; tokens are drawn by inverse-CDF sampling at the configured
   temperature (and top-k), one Generator per micro-batch;
2. score each against the image's training references: CIDEr-D by the kit's own metric
   (`eval.caption_scores.cider_d`) with document frequencies computed once from all training
   references (`CaptionReward`), optionally plus a weighted sentence BLEU-4;
3. a baseline b per sample: `mean` = the mean reward of the image's other k-1 samples, or
   `greedy` = the reward of the image's greedy caption;
4. loss = -sum_i (r_i - b_i) * sum_t log p(y_it) / (sampled tokens in the micro-batch), through a
   teacher-forced forward over the sampled captions (prompt + caption + <|im_end|> when it ended)
   with the training forward's supervised-positions head. The prompt is shared: it runs once per
   image (vision tower included) with its keys/values kept for autograd, and the image's k
   captions run on copies of that cache (`teacher_forced_rows`; the same log-probabilities and
   gradients as k full sequences, tested, at ~1/3 of the tokens for k = 4). An optional
   cross-entropy term on the reference captions (`ce_weight`) keeps the language model anchored.

Randomness: the trainer seeds Paddle from (seed, step, micro-batch, rank) before every
micro-batch; the sampling seed is drawn from that stream, so it is a pure function of the loop
position (as dropout is) and a resumed run samples exactly what the uninterrupted one did. Data
parallel: each rank samples and scores its own rows; rewards need no communication.

Logged per step (averaged over the logging window): reward, baseline, the greedy caption's reward
(`greedy` baseline), sampled caption length in tokens, and the share of degenerate samples
(`eval/degenerate.py`: repeated n-gram or unfinished ending, the failure SCST is known for).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..runtime import UserError

BASELINES = ("mean", "greedy")


@dataclass
class SCSTConfig:
    samples_per_image: int = 5  # k
    baseline: str = "mean"  # mean (of the image's other samples, Luo 2020) | greedy (Rennie 2017)
    temperature: float = 1.0
    top_k: int = 0  # sample among the k most likely tokens (0: all)
    max_new_tokens: int = 64
    cider_weight: float = 1.0  # reward = cider_weight * CIDEr-D + bleu4_weight * BLEU-4
    bleu4_weight: float = 0.0
    ce_weight: float = 0.0  # loss += ce_weight * cross-entropy on the reference captions

    def validate(self, source: str = "config: scst") -> "SCSTConfig":
        if self.baseline not in BASELINES:
            raise UserError(f"{source}: baseline must be one of {', '.join(BASELINES)}, not {self.baseline!r}")
        if self.samples_per_image < (2 if self.baseline == "mean" else 1):
            raise UserError(f"{source}: samples_per_image must be >= 2 with the mean baseline "
                            "(the baseline is the mean of the other samples)")
        if self.temperature <= 0 or self.max_new_tokens < 1 or self.top_k < 0:
            raise UserError(f"{source}: temperature must be > 0, max_new_tokens >= 1, top_k >= 0")
        if min(self.cider_weight, self.bleu4_weight, self.ce_weight) < 0 or \
                self.cider_weight + self.bleu4_weight == 0:
            raise UserError(f"{source}: cider_weight, bleu4_weight and ce_weight must be >= 0, "
                            "and the reward needs a positive weight")
        return self


# ---- baselines and rewards (paddle-free, tested) ------------------------------------------------
def mean_baseline(rewards: np.ndarray) -> np.ndarray:
    """rewards [B, k] -> for each sample, the mean of its image's other k-1 samples (Luo 2020)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    k = rewards.shape[1]
    return (rewards.sum(axis=1, keepdims=True) - rewards) / (k - 1)


class CaptionReward:
    """A caption's reward against its image's references: CIDEr-D with the training corpus's
    document frequencies (computed once, here), plus an optional weighted sentence BLEU-4."""

    def __init__(self, references: dict[str, list[str]], cider_weight: float = 1.0, bleu4_weight: float = 0.0):
        from ..eval.caption_scores import document_frequencies, tokenize

        self.references = {i: [tokenize(r) for r in refs] for i, refs in references.items()}
        self.doc_freq = document_frequencies(self.references)
        self.cider_weight, self.bleu4_weight = float(cider_weight), float(bleu4_weight)

    def __call__(self, captions: list[str], ids: list[str]) -> np.ndarray:
        from ..eval.caption_scores import bleu, cider_d, tokenize

        out = np.zeros(len(captions), dtype=np.float64)
        for n, (caption, image_id) in enumerate(zip(captions, ids)):
            if image_id not in self.references:
                raise UserError(f"SCST: image {image_id!r} has no training reference")
            cand, refs = {image_id: tokenize(caption)}, {image_id: self.references[image_id]}
            if self.cider_weight:
                out[n] += self.cider_weight * cider_d(cand, refs, doc_freq=self.doc_freq)[0]
            if self.bleu4_weight:
                out[n] += self.bleu4_weight * bleu(cand, refs)[3]
        return out


# ---- the policy-gradient loss -------------------------------------------------------------------
def weighted_nll(rows, linear, targets: np.ndarray, weights: np.ndarray):
    """-sum_i weights[i] * log softmax(linear(rows))[i, targets[i]] as one autograd op: the numpy
    head of `model/head.py` on CPU (one [rows x vocab] buffer), Paddle's ops elsewhere."""
    import paddle

    from ..model.head import use_numpy_head

    targets = np.ascontiguousarray(targets, dtype=np.int64)
    weights = np.ascontiguousarray(weights, dtype=np.float32)
    if use_numpy_head(linear):
        return _NumpyWeightedNLL.apply(rows.astype("float32"), linear.weight, targets, weights)
    logprobs = paddle.nn.functional.log_softmax(linear(rows).astype("float32"), axis=-1)
    picked = paddle.take_along_axis(logprobs, paddle.to_tensor(targets.reshape(-1, 1)), axis=1).reshape([-1])
    return -(picked * paddle.to_tensor(weights)).sum()


def _numpy_weighted_nll():
    import paddle

    from ..model.head import _softmax_and_target_logprob
    from ..model.numpy_bridge import as_numpy, from_numpy

    class NumpyWeightedNLL(paddle.autograd.PyLayer):
        """Like head.py's `_NumpyLinearCrossEntropy`, with a weight per row instead of 1/N."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, weights):
            h, w = as_numpy(hidden), as_numpy(weight)
            probs, target_logprob = _softmax_and_target_logprob(h, w, targets)
            ctx.saved = (h, w, probs, targets, weights)
            ctx.needs = (not hidden.stop_gradient, not weight.stop_gradient)
            return paddle.to_tensor(np.float32(-np.dot(weights.astype(np.float64), target_logprob)))

        @staticmethod
        def backward(ctx, grad):
            h, w, probs, targets, weights = ctx.saved
            ctx.saved = None
            probs[np.arange(len(targets)), targets] -= 1.0  # d(-log p_target)/d logits
            probs *= (weights * float(grad.numpy()))[:, None]
            need_hidden, need_weight = ctx.needs
            return (from_numpy(probs @ w.T) if need_hidden else None,
                    from_numpy(h.T @ probs) if need_weight else None)

    return NumpyWeightedNLL


class _LazyPyLayer:
    """The PyLayer is built on first use: this module imports without paddle (configs, CLI)."""
    layer = None

    def apply(self, *args):
        if _LazyPyLayer.layer is None:
            _LazyPyLayer.layer = _numpy_weighted_nll()
        return _LazyPyLayer.layer.apply(*args)


_NumpyWeightedNLL = _LazyPyLayer()


# ---- the objective ------------------------------------------------------------------------------
class SCSTObjective:
    """`objectives.py`'s interface: loss(train_module, batch, step) -> (loss, extras)."""

    def __init__(self, trainer):
        from ..data.samples import build_prompt_ids

        self.cfg = trainer.cfg.scst
        self.model, self.base = trainer.model, trainer.base_model
        self.tokenizer, self.decode = trainer.tokenizer, trainer.predictor.decode
        self.max_length = trainer.cfg.max_length
        self.prompt = build_prompt_ids(trainer.tokenizer, trainer.template)
        references: dict[str, list[str]] = {}
        for record in trainer.train_set.records:
            references.setdefault(str(record["id"]), []).append(str(record["caption"]))
        self.reward = CaptionReward(references, self.cfg.cider_weight, self.cfg.bleu4_weight)
        from ..decoding.config import GenerationConfig

        self.sampling = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens, do_sample=True,
                                         temperature=self.cfg.temperature, top_k=self.cfg.top_k,
                                         num_return_sequences=self.cfg.samples_per_image
                                         ).with_tokenizer(trainer.tokenizer)
        self.greedy = GenerationConfig(max_new_tokens=self.cfg.max_new_tokens).with_tokenizer(trainer.tokenizer)

    def state_dict(self) -> dict:
        return {}  # the sampling seed is a function of the loop position (module docstring)

    def set_state_dict(self, state: dict) -> None:
        if state:
            raise UserError(f"SCST keeps no state, the checkpoint holds {sorted(state)}")

    def sample(self, images, n_images: int, seed: int):
        """k sampled token lists per image (image-major) and whether each ran out of tokens."""
        samples = sample_shared_prefix(self.model, self.prompt, images, n_images, self.sampling,
                                       np.random.default_rng(seed))
        return samples, np.array([len(s) >= self.cfg.max_new_tokens for s in samples])

    def loss(self, train_module, batch, step: int):
        import paddle

        from ..decoding.generate import generate
        from ..eval.degenerate import degenerate_reason

        k, images = self.cfg.samples_per_image, batch["images"]
        ids = [str(i) for i in batch["ids"]]
        # drawn from Paddle's stream, which the trainer seeds from (seed, step, micro-batch, rank)
        seed = int(paddle.randint(0, 2 ** 31 - 1, [1]).numpy()[0])
        samples, ran_out = self.sample(images, len(ids), seed)
        captions = [self.decode(s) for s in samples]
        sample_ids = [i for i in ids for _ in range(k)]
        rewards = self.reward(captions, sample_ids).reshape(len(ids), k)
        extras = {}
        if self.cfg.baseline == "mean":
            baseline = mean_baseline(rewards)
        else:
            greedy = self.reward([self.decode(s) for s in generate(self.model, [self.prompt] * len(ids), images,
                                                                   self.greedy)], ids)
            baseline = np.repeat(greedy[:, None], k, axis=1)
            extras["greedy_reward"] = float(greedy.mean())
        advantage = (rewards - baseline).reshape(-1)

        rows, targets, batch_row = teacher_forced_rows(
            self.base, self.prompt, images, samples, ran_out, k, self.tokenizer, self.max_length)
        loss = weighted_nll(rows, self.base.lm_head, targets, advantage[batch_row] / len(targets))
        if self.cfg.ce_weight:
            loss = loss + self.cfg.ce_weight * train_module(batch["input_ids"], images=images,
                                                            attention_mask=batch["attention_mask"],
                                                            labels=batch["labels"])
        lengths = np.array([len(s) for s in samples])
        degenerate = [degenerate_reason(c, bool(o)) is not None for c, o in zip(captions, ran_out)]
        extras.update({"reward": float(rewards.mean()), "baseline": float(baseline.mean()),
                       "sample_tokens": float(lengths.mean()), "degenerate_share": float(np.mean(degenerate))})
        return loss, extras


def draw_tokens(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(logits / temperature) (restricted to the top k when top_k),
    by inverse CDF: one uniform per row, rows in order, in float32 on one [rows x vocab] buffer
    (the decoder's `sample_tokens` draws with `Generator.choice`, whose per-row checks cost
    ~2.5 ms on the 151,936-token vocabulary)."""
    x = np.array(logits, dtype=np.float32)
    if top_k:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x[x < kth] = -np.inf
    x -= x.max(axis=-1, keepdims=True)
    x /= temperature
    np.exp(x, out=x)
    np.cumsum(x, axis=-1, out=x)  # unnormalised CDF per row
    u = rng.random(len(x)) * x[:, -1]
    last = x.shape[1] - 1
    return np.array([min(int(np.searchsorted(row, v, side="right")), last) for row, v in zip(x, u)], dtype=np.int64)


def sample_shared_prefix(model, prompt: list[int], images, n_images: int, cfg, rng) -> list[list[int]]:
    """cfg.num_return_sequences sampled continuations of `prompt` per image (image-major), stop id
    excluded, at most cfg.max_new_tokens each. The images are encoded and the prompts prefilled once
    (one cache row per image, then copied), which `decoding.generate` would do k times."""
    import paddle

    from ..decoding.batch import DecodeBatch
    from ..decoding.output_head import transposed_head

    k, stops = cfg.num_return_sequences, set(cfg.stop_ids)
    if len(prompt) + cfg.max_new_tokens > model.config.seq_length:
        raise UserError(f"SCST: prompt ({len(prompt)}) + max_new_tokens ({cfg.max_new_tokens}) exceed the "
                        f"model's seq_length {model.config.seq_length}")
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad(), transposed_head(model.lm_head):
            batch = DecodeBatch(model, cfg.pad_id)
            batch.add([list(prompt)] * n_images, images)
            batch.keep(np.repeat(np.arange(n_images), k))  # each image's row, k times
            alive = np.arange(n_images * k)  # the sample each cache row decodes
            out = [[] for _ in alive]
            for _ in range(cfg.max_new_tokens):
                tokens = draw_tokens(batch.logits, cfg.temperature, cfg.top_k, rng)
                going = np.array([int(t) not in stops for t in tokens])
                for sample, token, on in zip(alive, tokens, going):
                    if on:
                        out[sample].append(int(token))
                going &= np.array([len(out[s]) < cfg.max_new_tokens for s in alive])
                if not going.any():
                    break
                if not going.all():
                    batch.keep(np.flatnonzero(going))
                    alive, tokens = alive[going], tokens[going]
                batch.step(tokens)
    finally:
        if was_training:
            model.train()
    return out


def supervised_answer(prompt, tokens, ran_out: bool, im_end_id: int, max_length: int) -> list[int]:
    """The tokens a sampled caption is trained on: its tokens + <|im_end|> when it ended (as
    `samples.assemble_sample`, cut to max_length), without <|im_end|> when it ran out of tokens
    (the policy did not choose to stop, so no stop is reinforced)."""
    room = max(1, max_length - len(prompt))
    if not ran_out and len(tokens) + 1 <= room:
        return list(tokens) + [im_end_id]
    return list(tokens[:room])


def teacher_forced_rows(base, prompt, images, samples, ran_out, k: int, tokenizer, max_length: int):
    """(last hidden rows at the sampled tokens' positions, their target ids, the sample of each
    row) for k samples per image (image-major). The prompt minus its last token runs once per image
    with its keys/values kept (autograd flows through them into every copy); each sample then runs
    [last prompt token] + its answer, right-padded, on a copy of its image's cache."""
    import paddle

    from ..model.config import IGNORE_INDEX

    n_images = len(samples) // k
    answers = [supervised_answer(prompt, s, bool(o), tokenizer.im_end_id, max_length) for s, o in zip(samples, ran_out)]
    prefix = paddle.to_tensor(np.asarray([prompt[:-1]] * n_images, dtype=np.int64))
    _, past = base.transformer.llm(base.embed(prefix, images), None, None, None, True)
    past = [(paddle.repeat_interleave(key, k, axis=0), paddle.repeat_interleave(value, k, axis=0))
            for key, value in past]
    width = 1 + max(len(a) for a in answers)
    ids = np.full((len(answers), width), tokenizer.pad_id, dtype=np.int64)
    labels = np.full((len(answers), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(answers), len(prompt) - 1 + width), dtype=np.int64)
    for i, answer in enumerate(answers):
        ids[i, 0] = prompt[-1]
        ids[i, 1:1 + len(answer)] = labels[i, 1:1 + len(answer)] = answer
        mask[i, :len(prompt) + len(answer)] = 1
    rows, targets, batch_row, _ = base._supervised_rows(
        base.embed(paddle.to_tensor(ids)), paddle.to_tensor(labels), paddle.to_tensor(mask), past_key_values=past)
    return rows, targets, batch_row
