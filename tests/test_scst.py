"""SCST (train/scst.py) and the objective registry (train/objectives.py): the baseline and loss math
on toy cases, rewards from the kit's CIDEr-D, the degenerate-caption measure, config checks, and the
trainer end to end (resume bit-identical, LoRA and partial `trainable`)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from paddle_caption.eval.caption_scores import cider_d, document_frequencies, tokenize
from paddle_caption.eval.degenerate import degenerate_reason, degenerate_share
from paddle_caption.runtime import UserError
from paddle_caption.train.config import TrainConfig
from paddle_caption.train.scst import CaptionReward, SCSTConfig, mean_baseline

from .test_train import base_config, state_of, train

REFS = {"a": ["3D风格。图片左边是一个绿色的正方形，右边是一个红色的圆形，背景是灰色。"],
        "b": ["写实风格。图片中间是一个蓝色的五角星，背景是白色。"],
        "c": ["卡通风格。图片中间是一个红色的正方形，背景是黑色。"]}
AD_CAPTIONS = ["这款连衣裙采用优质面料，舒适透气，简约大方。", "时尚双肩包，大容量设计，出行必备。",
               "简约白色T恤，百搭款式，夏日清爽。"]


# ---- baseline and loss math ------------------------------------------------------------------------
def test_mean_baseline_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]])
    np.testing.assert_allclose(mean_baseline(rewards), [[2.5, 2.0, 1.5], [3.0, 3.0, 0.0]])
    # advantages of an image sum to zero: k/(k-1) x (r - mean r)
    np.testing.assert_allclose((rewards - mean_baseline(rewards)).sum(axis=1), 0.0, atol=1e-12)


@pytest.mark.parametrize("numpy_head", [True, False])
def test_weighted_nll_value_gradient_sign_and_scale(numpy_head):
    import paddle

    from paddle_caption.train.scst import weighted_nll

    paddle.seed(0)
    rng = np.random.default_rng(0)
    head = paddle.nn.Linear(4, 7, bias_attr=None if not numpy_head else False)
    rows = paddle.to_tensor(rng.standard_normal((3, 4)).astype("float32"), stop_gradient=False)
    targets, weights = np.array([1, 5, 2]), np.array([0.5, -0.25, 0.0], dtype=np.float32)
    loss = weighted_nll(rows, head, targets, weights)
    logits = rows.numpy() @ head.weight.numpy() + (0 if numpy_head else head.bias.numpy())
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(float(loss), -(weights * logp[np.arange(3), targets]).sum(), rtol=1e-5)
    loss.backward()
    probs = np.exp(logp)
    expected = probs.copy()
    expected[np.arange(3), targets] -= 1.0
    expected *= weights[:, None]  # d loss / d logits = w (softmax - onehot)
    np.testing.assert_allclose(rows.grad.numpy(), expected @ head.weight.numpy().T, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(head.weight.grad.numpy(), rows.numpy().T @ expected, rtol=1e-4, atol=1e-7)
    # sign: a small descent step raises the log-probability of a positive-advantage row's token and
    # lowers a negative-advantage row's
    step = rows.numpy() - 0.1 * rows.grad.numpy()
    new = step @ head.weight.numpy() + (0 if numpy_head else head.bias.numpy())
    new_logp = new - np.log(np.exp(new).sum(axis=1, keepdims=True))
    assert new_logp[0, 1] > logp[0, 1] and new_logp[1, 5] < logp[1, 5]
    np.testing.assert_array_equal(rows.grad.numpy()[2], 0.0)  # zero advantage: no gradient


# ---- rewards ---------------------------------------------------------------------------------------
def test_reward_is_the_kits_cider_d_with_training_document_frequencies():
    reward = CaptionReward(REFS)
    captions = [REFS["a"][0], REFS["b"][0], "卡通风格。图片中间是一个红色的圆形，背景是黑色。"]
    got = reward(captions, ["a", "b", "c"])
    tokens = {i: [tokenize(r) for r in refs] for i, refs in REFS.items()}
    doc_freq = document_frequencies(tokens)
    for caption, image_id, value in zip(captions, "abc", got):
        expected = cider_d({image_id: tokenize(caption)}, {image_id: tokens[image_id]}, doc_freq=doc_freq)[0]
        assert value == pytest.approx(expected)
    assert got[0] > got[2] > 0  # an exact caption beats a one-word miss, which still earns something
    # corpus idf given explicitly equals the corpus's own (the refactor changed nothing)
    cands = {i: tokenize(c) for i, c in zip("abc", captions)}
    assert cider_d(cands, tokens)[0] == pytest.approx(cider_d(cands, tokens, doc_freq=doc_freq)[0])
    with pytest.raises(UserError, match="no training reference"):
        reward(["x"], ["zzz"])


def test_bleu4_weight_adds_sentence_bleu():
    only_cider, mixed = CaptionReward(REFS), CaptionReward(REFS, bleu4_weight=2.0)
    caption = [REFS["b"][0]]
    assert mixed(caption, ["b"])[0] == pytest.approx(only_cider(caption, ["b"])[0] + 2.0, abs=1e-6)


# ---- degenerate captions ---------------------------------------------------------------------------
def test_degenerate_captions_are_flagged_and_references_are_not():
    clean = [r for refs in REFS.values() for r in refs] + AD_CAPTIONS + [
        "3D风格。图片左边是一个橙色的五角星，右边是一个橙色的五角星，背景是米色。"]  # two equal objects
    assert [degenerate_reason(c) for c in clean] == [None] * len(clean)
    assert degenerate_reason("卡通风格。图片中间是一个红色的") == "unfinished"
    assert degenerate_reason("卡通风格。图片中间是一个红色的。") == "unfinished"  # dangling 的
    assert degenerate_reason(REFS["b"][0], ran_out=True) == "unfinished"
    assert degenerate_reason("图片中间是一个红色的红色的正方形。") == "repeated n-gram"
    assert degenerate_reason("时尚百搭，时尚百搭，穿出好气质。") == "repeated n-gram"
    assert degenerate_share(AD_CAPTIONS + ["半截"]) == 0.25 and degenerate_share([]) == 0.0


# ---- config -------------------------------------------------------------------------------------
def test_scst_block_is_typed_and_unknown_keys_are_refused(tmp_path, caption_data):
    cfg = base_config(tmp_path, caption_data, objective="scst", scst={"samples_per_image": 3, "baseline": "greedy"})
    parsed = TrainConfig.from_dict(cfg).validate()
    assert parsed.scst == SCSTConfig(samples_per_image=3, baseline="greedy")
    assert json.loads(json.dumps(parsed.to_dict()))["scst"]["samples_per_image"] == 3
    with pytest.raises(UserError, match="unknown key 'samples'"):
        TrainConfig.from_dict({**cfg, "scst": {"samples": 3}})
    with pytest.raises(UserError, match="objective must be one of"):
        TrainConfig.from_dict({**cfg, "objective": "cider"}).validate()
    with pytest.raises(UserError, match="samples_per_image must be >= 2"):
        TrainConfig.from_dict({**cfg, "scst": {"samples_per_image": 1}}).validate()
    with pytest.raises(UserError, match="baseline must be one of"):
        TrainConfig.from_dict({**cfg, "scst": {"baseline": "zero"}}).validate()


# ---- the trainer end to end ---------------------------------------------------------------------------
def _length_reward(monkeypatch):
    """A random micro model's samples all score CIDEr-D 0 (no gradient); reward their length in
    characters instead, so the policy gradient is not zero and the whole path is exercised."""
    from .launched.scst_length_reward import length_reward

    monkeypatch.setattr(CaptionReward, "__call__", length_reward)


def scst_config(tmp_path, caption_data, **overrides):
    values = dict(objective="scst", logging_steps=1, per_device_train_batch_size=2,
                  scst={"samples_per_image": 2, "max_new_tokens": 6, "temperature": 1.5})
    return base_config(tmp_path, caption_data, **{**values, **overrides})


def test_scst_resume_is_bit_identical_and_logs_its_extras(tmp_path, caption_data, monkeypatch):
    from paddle_caption.model.weights_io import load_safetensors

    _length_reward(monkeypatch)
    cfg = scst_config(tmp_path, caption_data, max_steps=4, save_steps=2, save_total_limit=0)
    train(cfg)
    run = tmp_path / "run"
    reference = load_safetensors(run / "final/local_params.safetensors")
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert {"reward", "baseline", "sample_tokens", "degenerate_share"} <= set(records[0])
    # as if killed after step 2's checkpoint: later outputs gone, the run resumes from step 2
    shutil.rmtree(run / "final")
    assert (run / "checkpoint-000002").is_dir()
    (run / "log.jsonl").write_text("")
    _, summary = train(cfg)
    assert summary["steps"] == 4
    resumed = load_safetensors(run / "final/local_params.safetensors")
    for name, value in reference.items():
        np.testing.assert_array_equal(value.numpy(), resumed[name].numpy(), err_msg=name)
    initial = load_safetensors(run / "checkpoint-000002/local_params.safetensors")
    moved = any(not np.array_equal(initial[n].numpy(), reference[n].numpy()) for n in reference)
    assert moved, "SCST steps 3-4 changed no weight"


@pytest.mark.parametrize("mode", ["lora", "partial"])
def test_scst_trains_only_what_the_mode_trains(tmp_path, caption_data, monkeypatch, mode):
    _length_reward(monkeypatch)
    extra = ({"finetune_mode": "lora", "lora_r": 4, "lora_dropout": 0.0} if mode == "lora" else
             {"finetune_mode": "partial", "trainable": ["transformer.llm.h.0.*"],  # and Rennie's baseline
              "scst": {"samples_per_image": 2, "max_new_tokens": 6, "temperature": 1.5, "baseline": "greedy"}})
    from paddle_caption.train.trainer import Trainer

    trainer = Trainer(TrainConfig.from_dict(scst_config(tmp_path, caption_data, max_steps=2, **extra)).validate(),
                      log=lambda *_: None)
    trainer.setup()  # the start every run of this config makes (init_seed), to compare against
    before = state_of(trainer.model)
    trainer = Trainer(trainer.cfg, log=lambda *_: None)
    trainer.train()
    after = state_of(trainer.model)
    trained = {n for n, p in trainer.model.named_parameters() if not p.stop_gradient}
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert changed and changed <= trained, sorted(changed - trained)[:3]
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert ("greedy_reward" in record) == (mode == "partial")


# ---- memory plan: what SCST adds ---------------------------------------------------------------------
def test_scst_memory_plan_counts_sampled_rows_kv_cache_and_logits():
    from paddle_caption.train import memory_plan as MP
    from paddle_caption.train.scst_memory import prompt_tokens

    totals = {}
    for name in ("layers_16_31", "lora"):
        cfg = TrainConfig.load(f"config/mgen_vl/scst/{name}.json")
        config, _ = MP.load_model_config(cfg, "config/model/qwen-vl-chat-7b.json")
        plan = MP.make_plan(config, cfg)
        k, b, new = cfg.scst.samples_per_image, cfg.per_device_train_batch_size, cfg.scst.max_new_tokens
        width = prompt_tokens(config, cfg) + new
        w = plan.workload
        assert (w.batch, w.seq_len, w.answer_tokens) == (b * k + b, width + 1, new + 1)  # + the ce_weight batch
        kv = b * k * config.num_hidden_layers * 2 * width * config.hidden_size * 2  # bfloat16
        assert plan.rows[MP.SAMPLING] == kv + 4 * b * k * config.vocab_size * 4
        one = plan.per_gpu(1, "dp")
        acts = one["activations, stored"] + one["activations, backward working"]
        assert one["total"] == pytest.approx(sum(v for key, v in one.items() if key != "total")
                                             - min(acts, one[MP.SAMPLING]))
        totals[name] = one["total"]
        assert MP.fits(one["total"], 80), name
    assert totals["lora"] < totals["layers_16_31"]


def test_kv_cache_formula_matches_the_generators_cache(tmp_path):
    import paddle

    from paddle_caption.decoding.batch import DecodeBatch
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train import memory_plan as MP
    from paddle_caption.train.scst_memory import scst_sampling_bytes

    from .conftest import micro_model_json, random_image_prompts

    config = MgenVLConfig.from_pretrained(micro_model_json(tmp_path))
    paddle.seed(0)
    model = MgenVLForCausalLM.from_config(config).eval()
    prompts, images = random_image_prompts(config, np.random.default_rng(0), [(3, 2)] * 6)
    batch = DecodeBatch(model, 0)
    batch.add(prompts, images)
    for _ in range(4):
        batch.step(np.zeros(len(prompts), dtype=np.int64))
    cache = sum(int(t.numel()) * t.element_size() for kv in batch.past for t in kv)
    width = len(prompts[0]) + 4
    w = MP.Workload(batch=1, seq_len=1, answer_tokens=1, dtype_bytes=4, recompute=False,
                    sampled_rows=len(prompts), sampled_len=width)
    assert scst_sampling_bytes(MP.Shapes.of(config), w) == cache + 4 * len(prompts) * config.vocab_size * 4


# ---- the scst demo's table and bar (pure functions) -----------------------------------------------------
def _row(label, cider, style, degenerate, steps):
    return {"label": label, "train": {"steps": steps},
            "scores": {"CIDEr-D": cider, "BLEU-4": 0.5, "ROUGE-L": 0.7, "words": 12.0, "degenerate": degenerate,
                       "fields": {"background": 0.9, "style": style, "colour": 0.5, "shape": 0.2, "exact": 0.1}}}


def test_scst_demo_table_and_bar():
    from paddle_caption.demo.scst_demo import bar_checks, caption_stats, mean_and_spread, scst_table

    stats = caption_stats({"a": REFS["a"][0], "b": "卡通风格。图片中间是一个红色的"})
    assert stats["degenerate"] == 0.5 and stats["words"] > 5
    ce = [_row("(a) s1", 4.0, 0.60, 0.0, 300), _row("(a) s2", 4.2, 0.62, 0.0, 310)]
    good = [_row("(b) s1", 4.6, 0.61, 0.0, 60), _row("(b) s2", 4.5, 0.62, 0.0, 62)]
    assert mean_and_spread(ce, "CIDEr-D") == pytest.approx((4.1, 0.2))
    checks = bar_checks({"ce": ce, "scst": good})
    assert checks["bar"]["cider_gain"]["pass"] and checks["bar"]["cider_gain"]["value"] == pytest.approx(4.55 / 4.1 - 1)
    assert checks["bar"]["fields_no_worse"]["pass"] and checks["bar"]["degenerate_no_higher"]["pass"]
    bad = [_row("(b) s1", 4.3, 0.50, 0.05, 60), _row("(b) s2", 4.3, 0.50, 0.0, 62)]
    checks = bar_checks({"ce": ce, "scst": bad})
    assert not checks["bar"]["cider_gain"]["pass"] and checks["bar"]["fields_no_worse"]["value"] == ["style"]
    assert not checks["bar"]["degenerate_no_higher"]["pass"] and checks["lines"][0].startswith("MISS")
    table = scst_table({r["label"]: r for r in ce + good}, {"ce": ce, "scst": good})
    assert "(a) cross-entropy, mean (spread)" in table and "4.100 (0.200)" in table and "| 61 " in table


@pytest.mark.slow
def test_two_ranks_sample_their_own_rows_and_match_one_process(tmp_path, caption_data, monkeypatch):
    """Data parallel SCST: each rank samples and scores its own rows (seeded from step, micro-batch
    and rank), so 2 launched ranks end with the weights of one process with accumulation 2."""
    from .test_data_parallel import final_params, run_launched
    from .test_train import write_config

    _length_reward(monkeypatch)
    cfg = scst_config(tmp_path, caption_data, max_steps=2, output_dir=str(tmp_path / "dp"))
    run_launched(tmp_path, "dp", "tests/launched/scst_length_reward.py", str(write_config(tmp_path / "dp.json", **cfg)))
    train({**cfg, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "single")})
    dp, single = final_params(tmp_path / "dp"), final_params(tmp_path / "single")
    assert dp.keys() == single.keys()
    for name in dp:
        np.testing.assert_allclose(dp[name], single[name], rtol=0, atol=1e-5, err_msg=name)
    from paddle_caption.train.model_init import initial_model

    start = dict(initial_model(None, cfg["model_config"], 0)[0].named_parameters())
    assert any(not np.array_equal(start[n].numpy(), dp[n]) for n in dp), "the SCST steps changed nothing"
    records = [json.loads(line) for line in (tmp_path / "dp" / "log.jsonl").read_text().splitlines()]
    assert all("reward" in r for r in records if r["kind"] == "train")


def test_shared_prefix_sampling_draws_and_decodes_like_the_generator(tmp_path):
    """At a vanishing temperature every one of the k samples of an image is the image's greedy
    caption from `decoding.generate` (the cache rows copied after one prefill decode correctly);
    at temperature 1 the inverse-CDF draw follows the softmax."""
    import paddle

    from paddle_caption.decoding.config import GenerationConfig
    from paddle_caption.decoding.generate import generate
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.scst import draw_tokens, sample_shared_prefix

    from .conftest import micro_model_json, random_image_prompts

    config = MgenVLConfig.from_pretrained(micro_model_json(tmp_path))
    paddle.seed(0)
    model = MgenVLForCausalLM.from_config(config)
    prompts, images = random_image_prompts(config, np.random.default_rng(0), [(3, 2)] * 3)
    greedy = GenerationConfig(max_new_tokens=6, stop_ids=(5, 7), pad_id=0)
    expected = generate(model, prompts, images, greedy)
    cold = GenerationConfig(max_new_tokens=6, stop_ids=(5, 7), pad_id=0, do_sample=True, temperature=1e-6,
                            num_return_sequences=3)
    # the prompts differ per image here; the SCST prompt is one, so sample each image alone
    for i, prompt in enumerate(prompts):
        got = sample_shared_prefix(model, prompt, images[i:i + 1], 1, cold, np.random.default_rng(i))
        assert got == [expected[i]] * 3
    assert model.training  # restored
    logits = np.log(np.array([[1.0, 3.0, 6.0]] * 30000))
    counts = np.bincount(draw_tokens(logits, 1.0, 0, np.random.default_rng(0)), minlength=3) / 30000
    np.testing.assert_allclose(counts, [0.1, 0.3, 0.6], atol=0.01)
    assert set(draw_tokens(logits, 1.0, 2, np.random.default_rng(0))) == {1, 2}


def test_shared_prompt_teacher_forcing_equals_full_sequences(tmp_path):
    """The prompt run once per image and shared by its k captions gives the log-probabilities and
    gradients of k full prompt + caption sequences."""
    import paddle

    from paddle_caption.data.dataset import collate_batch
    from paddle_caption.model.config import MgenVLConfig
    from paddle_caption.model.mgen_vl import MgenVLForCausalLM
    from paddle_caption.train.scst import supervised_answer, teacher_forced_rows, weighted_nll

    from .conftest import micro_model_json, random_image_prompts

    class Tok:
        im_end_id, pad_id = 7, 0

    config = MgenVLConfig.from_pretrained(micro_model_json(tmp_path))
    paddle.seed(0)
    model = MgenVLForCausalLM.from_config(config)
    prompts, images = random_image_prompts(config, np.random.default_rng(0), [(3, 2)] * 2)
    prompt, k = prompts[0], 3
    samples = [[11, 12, 13], [14], [], [15, 16, 17, 18], [19, 20], [21, 22, 23, 24]]
    ran_out = [False, False, False, True, False, True]
    weights = np.linspace(-1, 1, 18).astype(np.float32)  # one per supervised token below

    def loss_and_grads(rows_targets):
        rows, targets, _ = rows_targets
        loss = weighted_nll(rows, model.lm_head, targets, weights)
        loss.backward()
        grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
        model.clear_gradients()
        return float(loss), targets, grads

    shared = loss_and_grads(teacher_forced_rows(model, prompt, images, samples, ran_out, k, Tok, 512))
    items = []
    for s, o in zip(samples, ran_out):
        answer = supervised_answer(prompt, s, o, Tok.im_end_id, 512)
        items.append({"input_ids": np.array(prompt + answer), "id": "", "image": np.zeros(1, np.float32),
                      "labels": np.array([-100] * len(prompt) + answer)})
    full = collate_batch(items, 0)
    features = paddle.repeat_interleave(model.visual(images), k, axis=0)
    rows, targets, batch_row, _ = model._supervised_rows(
        model.embed(paddle.to_tensor(full["input_ids"]), image_features=features),
        paddle.to_tensor(full["labels"]), paddle.to_tensor(full["attention_mask"]))
    reference = loss_and_grads((rows, targets, batch_row))
    assert len(shared[1]) == 18 and list(shared[1]) == list(reference[1])  # <|im_end|> only on ended ones
    assert shared[0] == pytest.approx(reference[0], rel=1e-5)
    assert shared[2].keys() == reference[2].keys()
    for name in reference[2]:
        np.testing.assert_allclose(shared[2][name], reference[2][name], rtol=1e-4, atol=1e-6, err_msg=name)


class CountingObjective:
    """Cross-entropy with a state: how many micro-batches it has seen (tests the checkpoint hook)."""

    def __init__(self, trainer):
        self.seen, self.restored = 0, None

    def loss(self, train_module, batch, step):
        self.seen += 1
        return train_module(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                            labels=batch["labels"]), {"seen": float(self.seen)}

    def state_dict(self):
        return {"seen": self.seen}

    def set_state_dict(self, state):
        self.restored = dict(state)
        self.seen = state.get("seen", 0)


def test_objective_state_is_checkpointed_and_restored(tmp_path, caption_data, monkeypatch):
    from paddle_caption.train import objectives

    monkeypatch.setitem(objectives.OBJECTIVES, "counting", "tests.test_scst:CountingObjective")
    cfg = base_config(tmp_path, caption_data, objective="counting", max_steps=3, save_steps=2, save_total_limit=0,
                      logging_steps=1)
    trainer, _ = train(cfg)
    run = tmp_path / "run"
    assert json.loads((run / "checkpoint-000002" / "objective_state.json").read_text()) == {"seen": 2}
    assert [json.loads(line)["seen"] for line in (run / "log.jsonl").read_text().splitlines()] == [1.0, 2.0, 3.0]
    shutil.rmtree(run / "final")
    trainer, _ = train(cfg)
    assert trainer.objective.restored == {"seen": 2} and trainer.objective.seen == 3
    (run / "checkpoint-000002" / "objective_state.json").write_text("[1]")
    shutil.rmtree(run / "final")
    with pytest.raises(UserError, match="objective state must be a JSON object"):
        train(cfg)
