"""Multi-head (Medusa) decoding: the heads, their training mode, drafting from them (alone and with
retrieval), the per-step draft budget, and output identical to plain greedy decoding."""
from __future__ import annotations

import json

import numpy as np
import paddle
import pytest

from .conftest import small_config



# ------------------------------------------------------------------------------------ the heads
def test_heads_numpy_path_equals_the_layer_and_round_trips(tmp_path):
    from paddle_caption.model.draft_heads import (DraftHeadsConfig, HeadWeights, build_heads, load_draft_heads,
                                                  save_draft_heads)

    paddle.seed(0)
    lm_head = paddle.randn([16, 40])
    heads = build_heads(DraftHeadsConfig(16, num_heads=3, num_layers=2, draft_vocab=[3, 9, 1, 30]), lm_head)
    # zero-initialised blocks: a fresh restricted head is lm_head's columns of the draft vocabulary
    x = paddle.randn([5, 16])
    assert np.allclose(heads.head_logits(0, x).numpy(), (x @ lm_head).numpy()[:, [3, 9, 1, 30]], atol=1e-5)
    for p in heads.parameters():
        p.set_value(paddle.randn(p.shape) * 0.3)
    weights = HeadWeights.from_layer(heads)
    for k, features in enumerate(weights.features(x.numpy())):
        assert np.allclose(features @ weights.proj[k].T, heads.head_logits(k, x).numpy(), atol=1e-5)
    save_draft_heads(heads, tmp_path)
    again = load_draft_heads(tmp_path)
    assert again.config == heads.config
    for (name, a), (_, b) in zip(heads.state_dict().items(), again.state_dict().items()):
        assert np.array_equal(a.numpy(), b.numpy()), name
    on_disk = HeadWeights.from_directory(tmp_path)
    assert np.array_equal(on_disk.vocab, [3, 9, 1, 30])


def test_draft_vocabulary_is_stop_ids_then_the_most_frequent_caption_tokens():
    from paddle_caption.tokenizer import QWenVLTokenizer
    from paddle_caption.train.draft_heads import draft_vocabulary

    tok = QWenVLTokenizer()
    captions = ["卡通风格。背景是白色。", "卡通风格。背景是红色。", "写实风格。背景是白色。"]
    vocab = draft_vocabulary(captions, tok, 6)
    assert vocab[:len(tok.stop_ids)] == list(tok.stop_ids) and len(vocab) == 6
    counts = {}
    for ids in tok.encode_batch(captions):
        for t in ids:
            counts[t] = counts.get(t, 0) + 1
    assert all(counts[t] >= counts[u] for t in vocab[len(tok.stop_ids):] for u in counts if u not in vocab)


def test_heads_config_errors_name_the_file(tmp_path):
    from paddle_caption.model.draft_heads import read_heads_config
    from paddle_caption.runtime import UserError

    (tmp_path / "draft_heads.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(UserError, match="draft_heads.json: not a draft heads config"):
        read_heads_config(tmp_path)
    (tmp_path / "draft_heads.json").write_text(json.dumps({"format": "paddle_caption.draft_heads/1",
                                                           "hidden_size": 8, "num_heads": 0}))
    with pytest.raises(UserError, match="num_heads"):
        read_heads_config(tmp_path)


# ------------------------------------------------------------------------------------ drafting
# the random model, six image prompts, `config` and `run_batch` of the speculative decoding tests
from .test_speculative import config, run_batch, setup, short_context  # noqa: E402,F401  (setup: a fixture)


def random_heads(model, num_heads=4, vocab=None, scale=0.0, seed=0):
    from paddle_caption.model.draft_heads import DraftHeadsConfig, HeadWeights, build_heads

    paddle.seed(seed)
    heads = build_heads(DraftHeadsConfig(model.config.hidden_size, num_heads=num_heads,
                                         draft_vocab=vocab or []), model.lm_head.weight)
    if scale:
        for name, p in heads.named_parameters():
            if "blocks" in name:
                p.set_value(paddle.randn(p.shape) * scale)
    return HeadWeights.from_layer(heads)


def head_drafter(model, weights, **kw):
    from paddle_caption.decoding.drafting import output_layer_transposed
    from paddle_caption.decoding.head_drafting import HeadDrafter

    kw.setdefault("min_confidence", 0.0)
    return HeadDrafter(weights, None if weights.config.draft_vocab else output_layer_transposed(model), **kw)


def test_head_drafts_equal_plain_greedy_in_mixed_batches(setup, kernels):
    """Untrained full-vocabulary heads draft lm_head's own argmax of the current state (right for
    repeated tokens, mostly wrong otherwise); random heads and a restricted vocabulary draft
    anything. Greedy rows beside beam and sampling rows, stop ids and short limits: every row's
    tokens are the plain run's."""
    model, prompts, images = setup
    free, _, _ = run_batch(model, prompts[:1], images[:1], [config()])
    stop = free[0][4]
    cfgs = [config(stop_ids=(stop,)), config(num_beams=3), config(max_new_tokens=3),
            config(do_sample=True, seed=3, temperature=0.9), config(repetition_penalty=1.3), config()]
    want, reasons, _ = run_batch(model, prompts, images, cfgs)
    for weights in (random_heads(model), random_heads(model, scale=0.5, seed=1),
                    random_heads(model, vocab=list(range(0, 1000, 3)), scale=0.2, seed=2)):
        got, got_reasons, stats = run_batch(model, prompts, images, cfgs, head_drafter(model, weights))
        assert got == want and got_reasons == reasons
        assert stats.drafted > 0


def test_heads_that_always_draft_wrong_never_change_the_output(setup, kernels):
    """Heads whose every draft is wrong (their vocabulary holds only ids the model never emits
    here) still give exactly the plain output; nothing is accepted."""
    model, prompts, images = setup
    cfgs = [config()] * len(prompts)
    want, _, _ = run_batch(model, prompts, images, cfgs)
    used = {t for row in want for t in row}
    never = [t for t in range(1000) if t not in used][:50]
    got, _, stats = run_batch(model, prompts, images, cfgs,
                              head_drafter(model, random_heads(model, vocab=never, scale=0.3)))
    assert got == want and stats.drafted > 0 and stats.accepted == 0


class FakeRow:
    def __init__(self, tokens):
        self.tokens, self.draft_state = list(tokens), None


class FixedHeads:
    """A HeadDrafter stand-in: the same head choices for every row."""

    def __init__(self, tokens, probs):
        self.tokens, self.probs = np.asarray(tokens), np.asarray(probs, dtype=np.float64)
        self.num_draft_tokens, self.stop_ids = len(tokens), frozenset({99})

    def head_choices(self, hidden):
        return np.tile(self.tokens, (len(hidden), 1)), np.tile(self.probs, (len(hidden), 1))


def test_head_drafts_stop_where_the_cache_would_outgrow_seq_length(setup):
    """No forward may cross seq_length (Qwen's dynamic NTK): head drafts shrink and then stop there,
    and the output stays plain greedy's."""
    short, prompt, image, cfg, want = short_context(setup)
    got, _, stats = run_batch(short, prompt, image, [cfg], head_drafter(short, random_heads(short)))
    assert got == want
    # 7 tokens fit after the prompt: once 6 are in the cache no step has room for a draft
    assert stats.drafted > 0 and 0 < stats.verify_steps <= 6


def test_hybrid_takes_the_more_confident_drafter_per_position_and_retrieval_continues_after_a_head_word():
    from paddle_caption.decoding.datastore import DraftDatastore
    from paddle_caption.decoding.drafting import RetrievalDrafter
    from paddle_caption.decoding.head_drafting import HybridDrafter

    stop = 99
    # "1 2 <colour> 5 6 7": the stored captions agree on everything but the colour (3 or 4)
    store = DraftDatastore.build([[1, 2, 3, 5, 6, 7, stop]] * 3 + [[1, 2, 4, 5, 6, 7, stop]] * 2, depth=16)
    retrieval = RetrievalDrafter(store, num_draft_tokens=8, stop_ids=(stop,))
    assert retrieval.draft(FakeRow([1, 2]), 8).tokens.tolist() == [3, 5, 6, 7, stop]  # 3: 60% of matches
    # the heads saw the image: the colour is 4, with probability 0.9 > the store's 0.6
    hybrid = HybridDrafter(retrieval, FixedHeads([4, 5], [0.9, 0.5]), min_confidence=0.1)
    got = hybrid.propose([FakeRow([1, 2])], [8], hidden=np.zeros((1, 4)))[0]
    # position 0: the head's 4; after it the store continues "5 6 7 <stop>" (every match agrees)
    assert got.tokens.tolist() == [4, 5, 6, 7, stop]
    assert got.probs.tolist() == [0.9, 1.0, 1.0, 1.0, 1.0]
    assert hybrid.propose([FakeRow([1, 2])], [2], np.zeros((1, 4)))[0].tokens.tolist() == [4, 5]  # the limit
    # a less sure head loses to the store at that position
    unsure = HybridDrafter(retrieval, FixedHeads([4, 5], [0.5, 0.5]), min_confidence=0.1)
    assert unsure.propose([FakeRow([1, 2])], [8], np.zeros((1, 4)))[0].tokens.tolist() == [3, 5, 6, 7, stop]
    # a text the store has never seen: the heads draft alone, then the store picks up what it knows
    fresh = HybridDrafter(retrieval, FixedHeads([2, 4], [0.8, 0.8]), min_confidence=0.1)
    assert fresh.propose([FakeRow([42])], [8], np.zeros((1, 4)))[0].tokens.tolist()[:3] == [2, 4, 5]
    # the running product cuts the draft
    low = HybridDrafter(retrieval, FixedHeads([4, 5], [0.9, 0.5]), min_confidence=0.95)
    assert low.propose([FakeRow([1, 2])], [8], np.zeros((1, 4)))[0].tokens.tolist() == []


def test_draft_budget_feeds_only_what_pays():
    from paddle_caption.decoding.draft_budget import DraftBudget
    from paddle_caption.decoding.drafting import Draft

    sure = [Draft(np.arange(4), np.full(4, 0.95))] * 16
    doubtful = [Draft(np.arange(4), np.full(4, 0.1))] * 16
    budget = DraftBudget(retry_every=5)
    assert budget.choose(sure) == 0  # first: a plain step, to measure it
    budget.record(16, 0, 0.010)
    assert budget.choose(sure) == 4  # then a full-width step, to measure the slope
    budget.record(16, 4, 0.030, expected=float(sum(d.cumulative.sum() for d in sure)), accepted=16 * 3)
    # a plain step: 16 tokens / 10 ms; width 4: 16 * (1 + ~3) tokens / 30 ms -> wider is worth it
    assert budget.choose(sure) > 0
    assert budget.choose(doubtful) == 0  # 16 * 1.1 tokens in 15 ms at width 1 < 16 in 10 ms
    # a cheap slope (a GPU, or batch 1) makes even doubtful drafts worth a token
    cheap = DraftBudget()
    cheap.choose(doubtful)
    cheap.record(1, 0, 0.010)
    cheap.choose([doubtful[0]])
    cheap.record(1, 4, 0.0102, expected=0.4, accepted=0)
    assert cheap.choose([Draft(np.arange(4), np.full(4, 0.5))]) >= 1
    # a bucket that stays plain re-tries drafting every retry_every steps
    choices = [budget.choose(doubtful) for _ in range(10)]
    assert choices.count(0) == 8 and all(c > 0 for c in choices if c)


def test_draft_budget_keeps_the_output_and_adapts(setup):
    """With a budget the drafter's tokens are verified the same way: the output is plain greedy's."""
    from paddle_caption.decoding.draft_budget import DraftBudget

    model, prompts, images = setup
    cfgs = [config(max_new_tokens=16)] * len(prompts)
    want, _, _ = run_batch(model, prompts, images, cfgs)
    drafter = head_drafter(model, random_heads(model))
    drafter.budget = DraftBudget(retry_every=3)
    got, _, stats = run_batch(model, prompts, images, cfgs, drafter)
    assert got == want
    assert drafter.budget.decisions["plain"] >= 1 and drafter.budget.decisions["draft"] >= 1


# ------------------------------------------------------------------------------------ trained heads
@pytest.fixture(scope="module")
def trained_heads(trained_micro):
    """The shared trained micro model (conftest.trained_micro), then its draft heads trained in the
    draft_heads mode on the frozen model and merged beside it (root/model_heads)."""
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.config import TrainConfig
    from paddle_caption.train.merge import merge
    from paddle_caption.train.trainer import Trainer

    root = trained_micro
    heads_cfg = {"model_name_or_path": str(root / "model"), "train_records": str(root / "train" / "records.jsonl"),
                 "val_records": str(root / "val" / "records.jsonl"), "finetune_mode": "draft_heads",
                 "draft_heads": {"num_heads": 3, "draft_vocab_size": 512},
                 "learning_rate": 1e-2, "weight_decay": 0.0, "per_device_train_batch_size": 8, "max_steps": 40,
                 "num_workers": 0, "warmup_ratio": 0.05, "eval_caption_samples": 0, "eval_loss_samples": 24,
                 "output_dir": str(root / "heads_run"), "progress": False, "logging_steps": 10}
    trainer = Trainer(TrainConfig.from_dict(heads_cfg).validate(), log=lambda *_: None)
    summary = trainer.train()
    # the trained model's own base parameters, as training left them in memory
    summary["base_after"] = {name: p.numpy().copy() for name, p in trainer.model.named_parameters()
                             if not name.startswith("draft_heads.")}
    merge(str(root / "model"), root / "model_heads", local_path=str(root / "heads_run"), log=lambda *_: None)
    return root, summary, MgenVLForCausalLM


@pytest.mark.slow
def test_training_heads_leaves_the_base_bit_identical_and_merges_beside_it(trained_heads):
    from paddle_caption.model.weights_io import load_safetensors
    from paddle_caption.train.run_checkpoints import LOCAL_PARAMS

    root, summary, model_cls = trained_heads
    trained = load_safetensors(root / "heads_run" / "final" / LOCAL_PARAMS)
    assert trained and all(name.startswith("draft_heads.") for name in trained)
    base, merged = model_cls.from_pretrained(root / "model"), model_cls.from_pretrained(root / "model_heads")
    assert getattr(base, "draft_heads", None) is None and merged.draft_heads.config.num_heads == 3
    base_state, merged_state = base.state_dict(), merged.state_dict()
    assert set(base_state) == set(merged_state)  # the heads stay outside the model's state
    for name, value in base_state.items():
        assert np.array_equal(value.numpy(), merged_state[name].numpy()), name
    # training moved no base parameter by a bit (the trainer's model after the run)
    after = summary["base_after"]
    assert set(after) == {n for n, _ in base.named_parameters()}
    for name, param in base.named_parameters():
        assert np.array_equal(after[name], param.numpy()), name
    for name, value in merged.draft_heads.state_dict().items():
        assert np.array_equal(value.numpy(), trained["draft_heads." + name].numpy()), name
    assert (root / "model_heads" / "draft_heads.safetensors").is_file()
    # the heads learned: each head's top-1 accuracy on the validation captions, in the eval record
    evals = [json.loads(line) for line in (root / "heads_run" / "log.jsonl").read_text().splitlines()]
    last = [r for r in evals if r.get("kind") == "eval"][-1]
    assert last["head0_top1"] > 0.3 and last["head0_top5"] >= last["head0_top1"]
    assert any("head0_top1" in r for r in evals if r.get("kind") == "train")
    # a later ordinary run merged into this directory drops heads trained for the old weights
    from paddle_caption.train.merge import merge

    merge(str(root / "model_heads"), root / "model_again", local_path=str(root / "run"), log=lambda *_: None)
    assert not (root / "model_again" / "draft_heads.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["heads", "hybrid"])
def test_trained_heads_decode_exactly_greedy_one_by_one_and_batched(trained_heads, kernels, mode):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.scheduler import SpeculationStats
    from paddle_caption.predict.inputs import load_batch, read_test_rows
    from paddle_caption.predict.predictor import load_predictor

    root = trained_heads[0]
    gen = GenerationConfig(max_new_tokens=40)
    plain = load_predictor(root / "model_heads", gen)
    spec = load_predictor(root / "model_heads", gen, speculative=mode)
    rows = read_test_rows(root / "tsv" / "test.tsv")[:32]
    with open(root / "tsv" / "test.tsv", "rb") as handle:
        images, _ = load_batch(handle.fileno(), rows, plain.preprocess, max_pixels=1 << 24, min_side=0)
    images = [images[row.id] for row in rows]
    want = plain.generate_ids(images)
    stats = SpeculationStats()
    assert [spec.generate_ids([image], stats=stats)[0] for image in images] == want
    spec.drafter.budget = None  # batched: every draft fed, so the heads' drafts are really verified
    assert spec.generate_ids(images, stats=stats) == want
    assert stats.accepted > 0 and stats.tokens_per_step > 1.3


@pytest.mark.slow
def test_heads_drafting_on_the_exported_engine_and_in_the_service(trained_heads, tmp_path):
    """An exported directory carries the heads (drafting runs them in numpy on the engine's hidden
    states): hybrid decoding there equals plain greedy; the caption service with heads drafting
    answers the plain captions and counts accepted drafts."""

    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.deploy.export import export_model
    from paddle_caption.predict.inputs import load_batch, read_test_rows
    from paddle_caption.predict.predictor import load_predictor

    from .serve_support import AppClient, build, metric

    root = trained_heads[0]
    gen = GenerationConfig(max_new_tokens=40)
    plain = load_predictor(root / "model_heads", gen)
    export_model(root / "model_heads", tmp_path / "exported", log=lambda *_: None)
    assert (tmp_path / "exported" / "draft_heads.safetensors").is_file()
    engine = load_predictor(tmp_path / "exported", gen, speculative="hybrid")
    rows = read_test_rows(root / "tsv" / "test.tsv")[:16]
    with open(root / "tsv" / "test.tsv", "rb") as handle:
        images, _ = load_batch(handle.fileno(), rows, plain.preprocess, max_pixels=1 << 24, min_side=0)
    pixels = [images[row.id] for row in rows]
    want = plain.generate_ids(pixels)
    engine.drafter.budget = None
    assert engine.generate_ids(pixels) == want

    spec = load_predictor(root / "model_heads", gen, speculative="heads")
    spec.drafter.budget = None
    raw = {}
    for line in (root / "tsv" / "test.tsv").read_text().splitlines()[:4]:
        key, payload = line.split("\t")[:2]
        raw[key] = payload
    _, metrics, app = build(spec, drafter=spec.drafter)
    with AppClient(app) as client:
        r = client.post("/v1/captions", json={"images": list(raw.values()), "max_new_tokens": 40})
        assert r.status_code == 200, r.text
        assert [item["caption"] for item in r.json()] == [plain.decode(ids) for ids in want[:4]]
        assert metric(client.get("/metrics").text, "paddle_caption_draft_tokens_total", outcome="accepted") > 0


def test_memory_plan_counts_the_heads_exactly_and_the_7b_recipe_fits_one_card():
    from paddle_caption.model.draft_heads import DraftHeadsConfig, build_heads
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train import memory_plan as MP
    from paddle_caption.train.config import TrainConfig

    config = small_config(num_hidden_layers=2)
    for vocab_size in (64, 0):
        cfg = TrainConfig.from_dict({"finetune_mode": "draft_heads", "draft_heads": {
            "num_heads": 3, "num_layers": 2, "draft_vocab_size": vocab_size}})
        plan = MP.make_plan(config, cfg)
        paddle.seed(0)
        model = MgenVLForCausalLM(config)
        heads = build_heads(DraftHeadsConfig(config.hidden_size, 3, 2, list(range(vocab_size))), model.lm_head.weight)
        assert plan.groups.trainable == sum(int(np.prod(p.shape)) for p in heads.parameters())
        assert plan.groups.frozen == sum(int(np.prod(p.shape)) for p in model.parameters())
        assert plan.rows["weights, trainable"] == 4 * plan.groups.trainable
    seven = TrainConfig.load("config/mgen_vl/draft_heads.json")
    model_config, _ = MP.load_model_config(seven, "config/model/qwen-vl-chat-7b.json")
    plan = MP.make_plan(model_config, seven)
    assert plan.groups.trainable == 4 * (4096 * 4096 + 4096 + 4096 * 8192)
    assert MP.fits(plan.per_gpu(1, "dp")["total"], 80)


def test_speculative_heads_without_heads_is_one_line_naming_the_directory(tmp_path):
    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.predict.predictor import load_predictor
    from paddle_caption.runtime import UserError

    from .conftest import make_model_dir

    model_dir = make_model_dir(tmp_path)
    (tmp_path / "captions.txt").write_text("卡通风格。背景是白色。\n", encoding="utf-8")
    for mode in ("heads", "hybrid"):
        with pytest.raises(UserError, match=f"{model_dir} has no draft heads") as err:
            load_predictor(model_dir, GenerationConfig(max_new_tokens=4), speculative=mode,
                           draft_source=str(tmp_path / "captions.txt") if mode == "hybrid" else None)
        assert "\n" not in str(err.value)
