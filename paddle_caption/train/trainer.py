"""The supervised fine-tuning loop: images really used, partial / full / LoRA, resumable.

Randomness is a pure function of (seed, step): `paddle.seed(...)` before every optimiser step and
data order from (seed, epoch). A step-bounded run killed with SIGKILL and resumed from its last
checkpoint (`run_checkpoints.py`) therefore ends with the same weights as an uninterrupted one. (A
wall-clock-bounded run ends where the clock says, which no resume can reproduce exactly; its
schedule still continues from the saved elapsed time.)

The loop knows no dataset: evaluation (`evaluation.py`) captions through the same Predictor as
`predict_batch.py` and computes the extra scores the config names.

Several processes (`python -m paddle.distributed.launch --nproc_per_node N`; `parallel.py`): rank r
trains on batches r, r+N, ... of each step's group (`RankBatchSampler`), gradients are all-reduced
and averaged once per optimiser step (`parallel.reduce_gradients`; recompute included), so N ranks
x accumulation A train exactly like one process with accumulation N*A (tested to 1e-5). Rank 0 decides everything that depends on a clock (the learning rate on a wall-clock
schedule, the last step, when to evaluate and save) and every rank follows (`parallel.agree`, one
all-reduce a step). Rank 0 alone prints and writes files: log.jsonl, train_config.json, checkpoints,
evaluation, train_summary.json (with sharding, each rank adds its optimizer-state share to the
checkpoint rank 0 writes). At the end, the replicas' weights are checked identical. A resumed run
checks that every rank resumed from the same step (output_dir must be shared across machines).
Evaluation runs on rank 0 while the others wait in the next step's all-reduce (Paddle's default
collective timeout, 30 minutes, bounds an evaluation).

Precision (`dtype`, see mixed_precision.py): the model is built in its dtype; bfloat16/float16 train
with Paddle's O2 (float32 master weights in AdamW, O2 autocast, a GradScaler for float16 whose state
is checkpointed). A low-precision config on a CPU stops at start, in one line. `recompute: true`
checkpoints every decoder and ViT layer's activations (model/recompute.py; under LoRA, the wrapped
base model's).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..distributed import rank_and_world
from ..files import write_json
from ..runtime import UserError, configure
from . import run_checkpoints as ckpt
from ..data.records import load_named_records
from .config import TrainConfig, config_fingerprint
from .objectives import build_objective, mean_extras
from .run_log import RunLog
from .schedule import lr_at

# Why a run stopped, shared between ranks as an index (`parallel.agree` moves floats): 0 = going on.
STOP_REASONS = ("", "max_steps", "epochs", "time budget")


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's batches consumed in `epoch`
    samples: int = 0
    elapsed_s: float = 0.0  # wall time spent in the loop, carried across resumes
    config_fingerprint: str = ""


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.output_dir = Path(cfg.output_dir)
        self.paddle = configure(cfg.num_threads or None)
        from . import parallel  # imports paddle: only after configure() (see runtime.py)

        self.parallel = parallel
        from .mixed_precision import MixedPrecision

        self.precision = MixedPrecision(cfg.dtype)
        self.rank, self.world = rank_and_world()
        note = parallel.check_sharding(self.world, cfg.sharding)
        self.sharded = parallel.is_sharded(self.world, cfg.sharding)
        parallel.init_processes(self.world, cfg.sharding)
        # Rank 0 alone speaks and writes files (logs, checkpoints, evaluation, summary).
        self.log = log if self.rank == 0 else (lambda *_, **__: None)
        if note:
            self.log(note)

    # ---- set-up ----------------------------------------------------------------------------------
    def build_model(self):
        from .model_init import apply_init_from, initial_model, setup_trainable

        cfg = self.cfg
        model, self.model_dir = initial_model(cfg.model_name_or_path, cfg.model_config, cfg.init_seed,
                                              cfg.allow_pickle, dtype=cfg.dtype)
        if cfg.init_from:
            apply_init_from(model, cfg.init_from, cfg.model_name_or_path or cfg.model_config, cfg.allow_pickle,
                            self.log)
        model.config.ablate_images = cfg.ablate_images
        if cfg.recompute:
            model.enable_recompute()  # the base model: a LoRA wrapper below keeps it as .model
        return setup_trainable(model, cfg, self.log)

    def build_data(self, model_config):
        from ..data.dataset import CaptionDataset, make_dataloader
        from ..data.prompts import PromptTemplate
        from ..tokenizer import QWenVLTokenizer

        cfg = self.cfg
        self.tokenizer = QWenVLTokenizer.for_model(model_config, self.model_dir)
        self.template = PromptTemplate.from_files(cfg.prompt_file, cfg.system_file)
        size = model_config.visual.image_size
        records = load_named_records(cfg.train_records)
        if not records:
            raise UserError(f"{cfg.train_records}: no training records")
        self.train_set = CaptionDataset(records, self.tokenizer, self.template, size, cfg.max_length, cfg.augment)
        accum = cfg.gradient_accumulation_steps
        self.loader = make_dataloader(self.train_set, cfg.per_device_train_batch_size, shuffle=True,
                                      seed=cfg.seed, num_workers=cfg.num_workers,
                                      group_by_length=cfg.group_by_length, rank=self.rank, world=self.world,
                                      accumulation=accum)
        self.sampler = self.loader.batch_sampler
        if self.sampler.batches_per_epoch == 0:
            raise UserError(f"{self.sampler.base.batches_per_epoch} training batch(es) of "
                            f"{cfg.per_device_train_batch_size}: fewer than one optimiser step needs "
                            f"({self.world} rank(s) x gradient_accumulation_steps {accum})")
        self.val_set = None
        if cfg.val_records:
            val = load_named_records(cfg.val_records)
            if val:
                self.val_set = CaptionDataset(val, self.tokenizer, self.template, size, cfg.max_length)

    def build_optimizer(self, model):
        cfg, paddle = self.cfg, self.paddle
        params = [p for p in model.parameters() if not p.stop_gradient]
        # No weight decay on biases and norm weights (1-D), as is standard for AdamW fine-tuning.
        decay = {p.name for p in params if len(p.shape) > 1}
        return paddle.optimizer.AdamW(
            learning_rate=cfg.learning_rate, beta1=cfg.adam_beta1, beta2=cfg.adam_beta2,
            epsilon=cfg.adam_epsilon, parameters=params, weight_decay=cfg.weight_decay,
            apply_decay_param_fun=lambda name: name in decay,
            grad_clip=paddle.nn.ClipGradByGlobalNorm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None,
            **self.precision.optimizer_options())

    def build_predictor(self):
        """The evaluation captioner: the Predictor every caption of the kit goes through."""
        from ..decoding.config import GenerationConfig
        from ..predict.predictor import Predictor

        return Predictor(self.model, self.tokenizer, self.template,
                         GenerationConfig(max_new_tokens=self.cfg.eval_max_new_tokens))

    # ---- the loop --------------------------------------------------------------------------------
    def setup(self):
        """Everything before the first step: model (in its dtype), data, evaluation captioner,
        optimizer (O2-decorated for bfloat16/float16), loss scaler, parallel wrappers. Nothing here
        computes, so it also runs on a CPU for a low-precision config (tests)."""
        from .freeze import trainable_table

        cfg, precision = self.cfg, self.precision
        self._check_output_dir()
        model = self.build_model()
        self.model = model
        self.base_model = getattr(model, "model", model)  # LoRA wrappers keep the base as .model
        self.build_data(self.base_model.config)
        if cfg.finetune_mode == "draft_heads":  # base frozen, fresh trainable heads (draft_heads.py)
            from .draft_heads import attach_heads

            attach_heads(model, cfg, self.tokenizer, self.train_set.records, self.log)
        self.predictor = self.build_predictor()
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
        # O2 decoration precedes the parallel wrappers (PaddleNLP's order). The parallel engine wraps
        # the model and optimizer before a resume loads into them (a sharded optimizer takes only
        # its own share of the state); wrapping broadcasts rank 0's weights, which a resume then
        # overwrites with the same checkpoint on every rank.
        optimizer = precision.decorate(model, self.build_optimizer(model))
        precision.scaler = self.parallel.distributed_scaler(precision.scaler, self.world, cfg.sharding)
        self.train_module, self.optimizer = self.parallel.wrap_for_training(
            model, optimizer, self.world, cfg.sharding)
        self.log(trainable_table(model))
        self.objective = build_objective(cfg.objective_name, self)  # the step's loss (objectives.py)

    def train(self) -> dict:
        cfg, paddle, precision = self.cfg, self.paddle, self.precision
        precision.require_device()  # a bfloat16/float16 config on a CPU: one line, nothing loaded
        self.setup()
        model, train_module, optimizer = self.model, self.train_module, self.optimizer

        state = LoopState(config_fingerprint=config_fingerprint(cfg))
        resumed_from = self.maybe_resume(state)
        self.run_log = RunLog(self.output_dir, self.rank == 0, self.cfg.visualdl, state.step, self.log)
        if not resumed_from and self.rank == 0:
            write_json(self.output_dir / "train_config.json", cfg.to_dict())

        self.parallel.check_same_on_all_ranks(self.world, state.step, "the step to resume from")
        model.train()
        accum = cfg.gradient_accumulation_steps
        per_epoch = self.sampler.batches_per_epoch // accum
        total_steps = cfg.max_steps if cfg.max_steps > 0 else (
            math.ceil(cfg.num_train_epochs * per_epoch) if cfg.num_train_epochs > 0 else 10 ** 12)
        budget_s = cfg.max_train_minutes * 60 if cfg.max_train_minutes > 0 else math.inf
        self.log(f"training {cfg.finetune_mode}: {len(self.train_set)} samples, batch "
                 f"{cfg.per_device_train_batch_size} x accum {accum} x {self.world} rank(s), "
                 + (f"{total_steps} steps" if total_steps < 10 ** 12 else "")
                 + (f", budget {cfg.max_train_minutes:g} min" if budget_s < math.inf else "")
                 + (f"; resumed from {resumed_from} at step {state.step}" if resumed_from else ""))

        bar = self.run_log.progress_bar(total_steps if total_steps < 10 ** 12 else None, state.step,
                                        enabled=cfg.progress)
        start = time.time() - state.elapsed_s
        last_eval = last_save = state.elapsed_s  # rank 0's clock; only rank 0 decides with them
        step_times, window_loss, window_samples, window_t, window_extras = [], [], 0, time.time(), []
        micro, step_loss, done = 0, 0.0, state.step >= total_steps
        stop_reason = "max_steps" if cfg.max_steps > 0 else "epochs"
        while not done:
            self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
            self.train_set.set_epoch(state.epoch)  # augmentation draws (data/augment.py)
            if len(self.sampler) == 0:  # resumed at the end of an epoch (epochs hold whole steps)
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            step_start = time.time()
            for batch in self.loader:
                # RNG is a function of (step, micro-batch of the step across all ranks): a step's
                # dropout is the same whether its micro-batches run on one process or on several.
                paddle.seed(_step_seed(cfg.seed, state.step, micro * self.world + self.rank))
                with self.parallel.micro_step(train_module):
                    with precision.autocast():
                        loss, extras = self.objective.loss(train_module, batch, state.step)
                    window_extras.append(extras)
                    # each micro-batch's loss is the mean over its supervised tokens; DataParallel
                    # averages over ranks, so a step is the mean of its world x accum micro-batches
                    precision.backward(loss / accum)
                step_loss += float(loss)
                window_samples += int(batch["input_ids"].shape[0]) * self.world
                micro += 1
                state.batch_in_epoch += 1
                if micro < accum:
                    continue
                # One decision for all ranks, made on rank 0's clock: the schedule's time progress,
                # whether this is the last step (the next one would overrun the budget), and whether
                # to evaluate / save after it. Ranks deciding alone could disagree and hang.
                elapsed = time.time() - start
                next_step = float(np.median(step_times[-20:] + [time.time() - step_start]))
                step_after = state.step + 1
                stop = (STOP_REASONS.index(stop_reason) if step_after >= total_steps else
                        STOP_REASONS.index("time budget") if elapsed + next_step > budget_s else 0)
                decided, summed = self.parallel.agree(self.world, [
                    elapsed, float(stop),
                    float(not stop and self._due(cfg.eval_steps, cfg.eval_minutes, step_after, elapsed, last_eval)),
                    float(not stop and self._due(cfg.save_steps, cfg.save_minutes, step_after, elapsed, last_save)),
                ], [step_loss])
                state.elapsed_s, stop, eval_due, save_due = decided
                lr = lr_at(cfg, max(state.step / total_steps, state.elapsed_s / budget_s))
                optimizer.set_lr(lr)
                self.parallel.reduce_gradients(train_module, (p for _, p in self.named_trainable))
                precision.step(optimizer)  # float16: unscaled first, skipped on overflow
                optimizer.clear_grad()
                window_loss.append(summed[0] / (accum * self.world))
                micro, step_loss = 0, 0.0
                state.step = step_after
                state.samples += cfg.per_device_train_batch_size * accum * self.world
                step_times.append(time.time() - step_start)
                if state.step % cfg.logging_steps == 0 or state.step == 1:
                    rate = window_samples / max(1e-9, time.time() - window_t)
                    record = {"kind": "train", "step": state.step, "epoch": state.epoch,
                              "elapsed_s": round(state.elapsed_s, 3), "loss": float(np.mean(window_loss)),
                              "lr": lr, "samples_per_s": rate}
                    if precision.loss_scale() is not None:
                        record["loss_scale"] = precision.loss_scale()
                    record.update(mean_extras(window_extras))
                    self.run_log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
                    window_loss, window_samples, window_t, window_extras = [], 0, time.time(), []
                bar.update(1)
                if stop:
                    done, stop_reason = True, STOP_REASONS[int(stop)]
                    break
                if eval_due:
                    self.evaluate(state)
                    last_eval = time.time() - start
                if save_due:
                    self.save_checkpoint(state)
                    last_save = time.time() - start
                step_start = time.time()  # a step's time excludes evaluation and saving
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        bar.close()
        self.parallel.check_replicas_agree(self.world, self.named_trainable)
        state.elapsed_s = time.time() - start
        final = self.save_checkpoint(state, final=True)
        metrics = self.evaluate(state)
        summary = {"steps": state.step, "samples": state.samples, "epochs": state.epoch,
                   "trainable_parameters": sum(int(np.prod(p.shape)) for _, p in self.named_trainable),
                   "train_seconds": round(state.elapsed_s, 1), "stop_reason": stop_reason,
                   "final_checkpoint": str(final), "eval": metrics}
        if self.rank == 0:
            write_json(self.output_dir / "train_summary.json", summary)
            self.log(f"done: {state.step} steps, {state.samples} samples in {state.elapsed_s / 60:.1f} min "
                     f"({stop_reason}); final checkpoint {final}"
                     + "".join(f", {label} {metrics[key]:.3f}" for key, label in
                               (("val_loss", "val loss"), ("CIDEr-D", "CIDEr-D"), ("head0_top1", "head 0 top-1"))
                               if key in metrics))
        return summary

    @staticmethod
    def _due(every_steps, every_minutes, step, elapsed, last_elapsed) -> bool:
        if every_steps and step % every_steps == 0:
            return True
        return bool(every_minutes) and elapsed - last_elapsed >= every_minutes * 60

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, state: LoopState) -> dict:
        """Validation loss and scored captions (rank 0, with validation records), logged."""
        if self.val_set is None or self.rank != 0:
            return {}
        from .evaluation import evaluate

        scores = evaluate(self.model, self.predictor, self.val_set, self.cfg)
        record = {"kind": "eval", "step": state.step, "elapsed_s": round(state.elapsed_s, 3), **scores}
        self.run_log.write(record)
        self.log(f"eval @ step {state.step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float) and k != "elapsed_s"))
        return record

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, state: LoopState, final: bool = False) -> Path:
        """Rank 0 writes the checkpoint (see run_checkpoints.py); every rank returns its path. With a
        sharded optimizer every rank first adds its share of the optimizer state (all ranks call
        this at the same step: the decision to save is rank 0's, shared in `agree`)."""
        name = ckpt.FINAL_DIR if final else f"{ckpt.CHECKPOINT_PREFIX}{state.step:06d}"
        if self.sharded:
            from ..model.weights_io import save_safetensors

            if self.rank == 0:
                ckpt.begin_checkpoint(self.output_dir, name)
            self.parallel.barrier(self.world)
            save_safetensors(ckpt.optimizer_state(self.optimizer, self.named_trainable),
                             ckpt.temp_dir(self.output_dir, name) / ckpt.optimizer_shard_name(self.rank, self.world))
            self.parallel.barrier(self.world)
        if self.rank != 0:
            return self.output_dir / name
        lora = self.model if self.cfg.finetune_mode == "lora" else None
        files = {"model_config.json": self.base_model.config.to_dict(),
                 "prompt.json": {"system": self.template.system, "prompt": self.template.prompt},
                 "train_config.json": self.cfg.to_dict()}
        if self.cfg.finetune_mode == "draft_heads":  # what merge needs to rebuild the heads
            from ..model.draft_heads import CONFIG_FILE, heads_config_record

            files[CONFIG_FILE] = heads_config_record(self.model.draft_heads)
        if self._scaling():
            files[ckpt.SCALER_STATE] = ckpt.scaler_state(self.precision.scaler)
        if self.objective.state_dict():
            files[ckpt.OBJECTIVE_STATE] = self.objective.state_dict()
        return ckpt.save_checkpoint(
            self.output_dir, name, trained=None if lora else dict(self.named_trainable), lora_model=lora,
            optimizer_tensors=None if self.sharded else ckpt.optimizer_state(self.optimizer, self.named_trainable),
            begun=self.sharded, files=files,
            state={**asdict(state), "complete": True, "final": final}, keep=self.cfg.save_total_limit)

    def maybe_resume(self, state: LoopState) -> str | None:
        """Continue from the newest complete checkpoint in output_dir, if any."""
        from ..model.weights_io import load_safetensors

        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is None:
            return None
        saved = ckpt.read_state(latest)
        if saved.get("config_fingerprint") != state.config_fingerprint:
            raise UserError(f"{latest}: checkpoint of a different training config; use another "
                            "output_dir or delete the old run")
        ckpt.load_trained(latest, self.named_trainable, self.model if self.cfg.finetune_mode == "lora" else None)
        optimizer_file = latest / (ckpt.optimizer_shard_name(self.rank, self.world) if self.sharded
                                   else ckpt.OPTIMIZER_STATE)
        if not optimizer_file.is_file():
            raise UserError(f"{optimizer_file}: missing; a sharded run resumes with the number of "
                            "processes that wrote its checkpoint")
        ckpt.set_optimizer_state(self.optimizer, self.named_trainable, load_safetensors(optimizer_file),
                                 optimizer_file)
        if self._scaling():
            scaler_file = latest / ckpt.SCALER_STATE
            if not scaler_file.is_file():
                raise UserError(f"{scaler_file}: missing (a float16 run checkpoints its loss scaler)")
            ckpt.set_scaler_state(self.precision.scaler, json.loads(scaler_file.read_text()), scaler_file)
        self.objective.set_state_dict(ckpt.read_objective_state(latest))
        for key in asdict(state):
            if key in saved:
                setattr(state, key, saved[key])
        return str(latest)

    def _scaling(self) -> bool:
        """Whether a loss scaler is at work (float16 on a GPU), so its state belongs in checkpoints."""
        return self.precision.scaler is not None and self.precision.scaler.is_enable()

    # ---- files -----------------------------------------------------------------------------------
    def _check_output_dir(self):
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"output_dir {self.output_dir} exists and is not a directory")
        self.output_dir.mkdir(parents=True, exist_ok=True)


def _step_seed(seed: int, step: int, micro_batch: int) -> int:
    """The RNG seed of one micro-batch of one optimiser step."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1)[0])

