"""The supervised fine-tuning loop: images really used, partial / full / LoRA, resumable.

A checkpoint holds only what trained (the "local" parameters, or the LoRA adapters) plus the
optimiser moments and the loop position, as safetensors + JSON, written to a temp directory and
renamed, so a killed run leaves either a complete checkpoint or none. Randomness is a pure
function of (seed, step): `paddle.seed(seed, step)` before every optimiser step and data order
from (seed, epoch). A step-bounded run killed with SIGKILL and resumed therefore ends with the
same weights as an uninterrupted one. (A wall-clock-bounded run ends where the clock says, which
no resume can reproduce exactly; its schedule still continues from the saved elapsed time.)
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..runtime import UserError, atomic_write, configure_environment
from .config import TrainConfig, resolve_path

CHECKPOINT_PREFIX = "checkpoint-"
FINAL_DIR = "final"
LOCAL_PARAMS = "local_params.safetensors"
OPTIMIZER_STATE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class LoopState:
    step: int = 0  # optimiser steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's batches consumed in `epoch`
    samples: int = 0
    elapsed_s: float = 0.0  # wall time spent in the loop, carried across resumes
    config_fingerprint: str = ""


# ---- schedule ------------------------------------------------------------------------------------
def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at training progress in [0, 1] (step- or time-based, whichever is further)."""
    progress = min(max(progress, 0.0), 1.0)
    if cfg.warmup_ratio > 0 and progress < cfg.warmup_ratio:
        return cfg.learning_rate * progress / cfg.warmup_ratio
    rest = (progress - cfg.warmup_ratio) / max(1e-12, 1 - cfg.warmup_ratio)
    floor = cfg.min_lr_ratio
    if cfg.lr_scheduler == "constant":
        factor = 1.0
    elif cfg.lr_scheduler == "linear":
        factor = floor + (1 - floor) * (1 - rest)
    else:
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * rest))
    return cfg.learning_rate * factor


# ---- data sharding for several GPUs ----------------------------------------------------------------
class RankBatchSampler:
    """This rank's share of a LengthGroupedBatchSampler's epoch: batches[rank::world], resumable."""

    def __init__(self, base, rank: int, world: int):
        self.base, self.rank, self.world = base, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_batches: int = 0):
        self.epoch, self.skip = epoch, skip_batches

    def epoch_batches(self, epoch: int):
        batches = self.base.epoch_batches(epoch)
        usable = len(batches) - len(batches) % self.world if self.world > 1 else len(batches)
        return batches[:usable][self.rank::self.world]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def __iter__(self):
        yield from self.epoch_batches(self.epoch)[self.skip:]

    def __len__(self):
        return max(0, self.batches_per_epoch - self.skip)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.output_dir = Path(cfg.output_dir)
        configure_environment(cfg.num_threads or None)
        from ..runtime import import_paddle

        self.paddle = import_paddle()
        self.rank, self.world = self._distributed_setup()

    # ---- set-up ----------------------------------------------------------------------------------
    def _distributed_setup(self):
        paddle = self.paddle
        world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
        if world > 1:
            paddle.distributed.init_parallel_env()
            return paddle.distributed.get_rank(), world
        return 0, 1

    def build_model(self):
        from ..model.config import MgenVLConfig
        from ..model.mgen_vl import MgenVLForCausalLM

        cfg, paddle = self.cfg, self.paddle
        if cfg.model_name_or_path:
            model_dir = resolve_path(cfg.model_name_or_path)
            # float32 weights under O1 autocast, as before `dtype` existed (issue 14 wires O2 here)
            model = MgenVLForCausalLM.from_pretrained(model_dir, allow_pickle=cfg.allow_pickle, dtype="float32")
            self.tokenizer_dir = model_dir
        else:
            config = MgenVLConfig.from_pretrained(resolve_path(cfg.model_config))
            paddle.seed(cfg.init_seed)
            model = MgenVLForCausalLM(config)
            self.tokenizer_dir = None
        model.config.ablate_images = cfg.ablate_images
        return model

    def setup_trainable(self, model):
        from .freeze import apply_freezing

        cfg = self.cfg
        if cfg.finetune_mode == "lora":
            from .lora import apply_lora

            model = apply_lora(model, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        elif cfg.finetune_mode == "full":
            apply_freezing(model, ["*"], cfg.frozen, "full")
        else:
            apply_freezing(model, cfg.trainable, cfg.frozen, "partial")
        if cfg.lr_scale:
            from .freeze import apply_lr_scale

            scaled = apply_lr_scale(model, cfg.lr_scale)
            self.log(f"lr_scale: {len(scaled)} parameter(s) at " + ", ".join(
                f"{f:g}x" for f in sorted(set(scaled.values()))) + " of learning_rate")
        return model

    def build_data(self, model_config):
        from ..data.dataset import CaptionDataset, Collator, LengthGroupedBatchSampler
        from ..data.records import load_records
        from ..data.samples import PromptTemplate
        from ..tokenizer import QWenVLTokenizer

        cfg = self.cfg
        self.tokenizer = QWenVLTokenizer.for_model(model_config, self.tokenizer_dir)
        prompt_file = resolve_path(cfg.prompt_file)
        system_file = resolve_path(cfg.system_file) if cfg.system_file else None
        try:
            self.template = PromptTemplate.from_files(prompt_file, system_file)
        except FileNotFoundError as err:
            raise UserError(f"prompt file not found: {err}") from None
        size = model_config.visual.image_size
        records = _read_records(cfg.train_records, load_records)
        if not records:
            raise UserError(f"{cfg.train_records}: no training records")
        self.train_set = CaptionDataset(records, self.tokenizer, self.template, size, cfg.max_length)
        base = LengthGroupedBatchSampler(self.train_set.lengths, cfg.per_device_train_batch_size,
                                         shuffle=True, seed=cfg.seed, group_by_length=cfg.group_by_length)
        self.sampler = RankBatchSampler(base, self.rank, self.world)
        if self.sampler.batches_per_epoch == 0:
            raise UserError("fewer training batches than GPUs: nothing to train on")
        self.loader = self.paddle.io.DataLoader(
            self.train_set, batch_sampler=self.sampler, collate_fn=Collator(self.train_set.pad_id),
            num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
            use_shared_memory=True, return_list=True)
        self.val_set = None
        if cfg.val_records:
            val = _read_records(cfg.val_records, load_records)
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
            grad_clip=paddle.nn.ClipGradByGlobalNorm(cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None)

    # ---- the loop --------------------------------------------------------------------------------
    def train(self) -> dict:
        from .freeze import trainable_table

        cfg, paddle = self.cfg, self.paddle
        self._check_output_dir()
        model = self.build_model()
        model = self.setup_trainable(model)
        self.model = model
        self.base_model = getattr(model, "model", model)  # LoRA wrappers keep the base as .model
        self.build_data(self.base_model.config)
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if not p.stop_gradient]
        optimizer = self.build_optimizer(model)
        self.optimizer = optimizer
        if self.rank == 0:
            self.log(trainable_table(model))
        amp = self._amp_context()

        state = LoopState(config_fingerprint=_fingerprint(cfg))
        resumed_from = self.maybe_resume(state)
        self._prepare_log(state.step)
        if not resumed_from and self.rank == 0:
            self._write_run_files()

        train_model = paddle.DataParallel(model) if self.world > 1 else model
        model.train()
        accum = cfg.gradient_accumulation_steps
        per_epoch = self.sampler.batches_per_epoch // accum
        if per_epoch == 0:
            raise UserError(f"gradient_accumulation_steps ({accum}) exceeds the batches in an epoch "
                            f"({self.sampler.batches_per_epoch})")
        total_steps = cfg.max_steps if cfg.max_steps > 0 else (
            math.ceil(cfg.num_train_epochs * per_epoch) if cfg.num_train_epochs > 0 else 10 ** 12)
        budget_s = cfg.max_train_minutes * 60 if cfg.max_train_minutes > 0 else math.inf
        self.log(f"training {cfg.finetune_mode}: {len(self.train_set)} samples, batch "
                 f"{cfg.per_device_train_batch_size} x accum {accum} x {self.world} rank(s), "
                 + (f"{total_steps} steps" if total_steps < 10 ** 12 else "")
                 + (f", budget {cfg.max_train_minutes:g} min" if budget_s < math.inf else "")
                 + (f"; resumed from {resumed_from} at step {state.step}" if resumed_from else ""))

        bar = self._progress_bar(total_steps if total_steps < 10 ** 12 else None, state.step)
        start = time.time() - state.elapsed_s
        last_eval = last_save = state.elapsed_s
        step_times, window_loss, window_samples, window_t = [], [], 0, time.time()
        micro, done = 0, False
        stop_reason = "max_steps" if cfg.max_steps > 0 else "epochs"
        if state.step >= total_steps:
            done = True
        while not done:
            self.sampler.set_epoch(state.epoch, state.batch_in_epoch)
            if len(self.sampler) < accum:  # too few batches left for a full step: next epoch
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                continue
            step_start = time.time()
            for batch in self.loader:
                if micro == 0:
                    paddle.seed(cfg.seed * 1_000_003 + state.step)  # RNG is a function of the step
                with amp():
                    out = train_model(batch["input_ids"], images=batch["images"],
                                      attention_mask=batch["attention_mask"], labels=batch["labels"])
                (out.loss / accum).backward()
                window_loss.append(float(out.loss))
                window_samples += int(batch["input_ids"].shape[0]) * self.world
                micro += 1
                state.batch_in_epoch += 1
                if micro < accum:
                    continue
                micro = 0
                state.elapsed_s = time.time() - start
                progress = max(state.step / total_steps, state.elapsed_s / budget_s)
                lr = lr_at(cfg, progress)
                optimizer.set_lr(lr)
                optimizer.step()
                optimizer.clear_grad()
                state.step += 1
                state.samples += cfg.per_device_train_batch_size * accum * self.world
                step_times.append(time.time() - step_start)
                step_start = time.time()
                state.elapsed_s = time.time() - start
                if state.step % cfg.logging_steps == 0 or state.step == 1:
                    rate = window_samples / max(1e-9, time.time() - window_t)
                    record = {"kind": "train", "step": state.step, "epoch": state.epoch,
                              "elapsed_s": round(state.elapsed_s, 3), "loss": float(np.mean(window_loss)),
                              "lr": lr, "samples_per_s": rate}
                    self._log_record(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
                    window_loss, window_samples, window_t = [], 0, time.time()
                bar.update(1)
                # stop when the next step would overrun the budget, so the budget holds exactly
                next_step = float(np.median(step_times[-20:]))
                if state.step >= total_steps:
                    done = True
                elif state.elapsed_s + next_step > budget_s:
                    done, stop_reason = True, "time budget"
                if not done and self._due(cfg.eval_steps, cfg.eval_minutes, state, last_eval):
                    self.evaluate(state)
                    last_eval = state.elapsed_s = time.time() - start
                if not done and self._due(cfg.save_steps, cfg.save_minutes, state, last_save):
                    self.save_checkpoint(state)
                    last_save = state.elapsed_s = time.time() - start
                if done:
                    break
            else:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        bar.close()
        state.elapsed_s = time.time() - start
        final = self.save_checkpoint(state, final=True)
        metrics = self.evaluate(state)
        summary = {"steps": state.step, "samples": state.samples, "epochs": state.epoch,
                   "train_seconds": round(state.elapsed_s, 1), "stop_reason": stop_reason,
                   "final_checkpoint": str(final), "eval": metrics}
        if self.rank == 0:
            with atomic_write(self.output_dir / "train_summary.json") as handle:
                json.dump(summary, handle, indent=2, ensure_ascii=False)
            self.log(f"done: {state.step} steps, {state.samples} samples in {state.elapsed_s / 60:.1f} min "
                     f"({stop_reason}); final checkpoint {final}"
                     + (f"; val loss {metrics.get('val_loss', float('nan')):.3f}, "
                        f"CIDEr-D {metrics.get('CIDEr-D', float('nan')):.3f}" if metrics else ""))
        return summary

    def _due(self, every_steps, every_minutes, state, last_elapsed) -> bool:
        if every_steps and state.step % every_steps == 0:
            return True
        return bool(every_minutes) and state.elapsed_s - last_elapsed >= every_minutes * 60

    def _amp_context(self):
        import contextlib

        cfg, paddle = self.cfg, self.paddle
        if cfg.dtype == "float32":
            return contextlib.nullcontext
        if not paddle.is_compiled_with_cuda():
            self.log(f"dtype {cfg.dtype} requested, but this is a CPU run: training in float32 "
                     "(Paddle has no bf16/fp16 training kernels on this CPU)")
            return contextlib.nullcontext
        return lambda: paddle.amp.auto_cast(enable=True, dtype=cfg.dtype, level="O1")

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, state: LoopState) -> dict:
        """Validation loss on a fixed subset, then greedy captions on a fixed subset, scored."""
        if self.val_set is None or self.rank != 0:
            return {}
        from ..data.dataset import collate_batch
        from ..eval.metrics import score_captions
        from ..model.generation import GenerationConfig, generate

        paddle, cfg = self.paddle, self.cfg
        eval_model = self.model
        was_training = eval_model.training
        eval_model.eval()
        t0 = time.time()
        n_loss = min(cfg.eval_loss_samples, len(self.val_set))
        losses, weights = [], []
        with paddle.no_grad():
            for start in range(0, n_loss, cfg.eval_batch_size):
                batch = collate_batch([self.val_set[i] for i in range(start, min(n_loss, start + cfg.eval_batch_size))],
                                      self.val_set.pad_id)
                out = eval_model(paddle.to_tensor(batch["input_ids"]), images=paddle.to_tensor(batch["images"]),
                                 attention_mask=paddle.to_tensor(batch["attention_mask"]),
                                 labels=paddle.to_tensor(batch["labels"]))
                n_tokens = int((batch["labels"][:, 1:] != -100).sum())
                losses.append(float(out.loss) * n_tokens)
                weights.append(n_tokens)
        record = {"kind": "eval", "step": state.step, "elapsed_s": round(state.elapsed_s, 3),
                  "val_loss": sum(losses) / max(1, sum(weights))}
        n_cap = min(cfg.eval_caption_samples, len(self.val_set))
        if n_cap:
            prompt = list(self.val_set.prompt_ids)
            gen_cfg = GenerationConfig(max_new_tokens=cfg.eval_max_new_tokens)
            predictions, references = {}, {}
            for start in range(0, n_cap, cfg.eval_batch_size):
                idx = list(range(start, min(n_cap, start + cfg.eval_batch_size)))
                images = paddle.to_tensor(np.stack([self.val_set.load_image(i) for i in idx]))
                outs = generate(eval_model, [prompt] * len(idx), images, gen_cfg)
                for i, tokens in zip(idx, outs):
                    rid = str(self.val_set.records[i]["id"])
                    predictions[rid] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                    references[rid] = [str(self.val_set.records[i]["caption"])]
            scores = score_captions(predictions, references)
            record.update({k: v for k, v in scores.items() if k != "n"})
            record.update(_field_scores(predictions, references))
        record["eval_seconds"] = round(time.time() - t0, 2)
        self._log_record(record)
        self.log(f"eval @ step {state.step}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float) and k not in ("elapsed_s",)))
        if was_training:
            eval_model.train()
        return record

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, state: LoopState, final: bool = False) -> Path:
        """Write a checkpoint dir atomically (temp dir + rename); prune beyond save_total_limit."""
        if self.rank != 0:
            return self.output_dir / FINAL_DIR
        from ..model.checkpoint import save_safetensors

        name = FINAL_DIR if final else f"{CHECKPOINT_PREFIX}{state.step:06d}"
        target = self.output_dir / name
        tmp = self.output_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.cfg.finetune_mode == "lora":
            from .lora import save_lora

            save_lora(self.model, tmp / "lora")
        else:
            save_safetensors({n: p for n, p in self.named_trainable}, tmp / LOCAL_PARAMS)
        save_safetensors(self._optimizer_state(), tmp / OPTIMIZER_STATE)
        _write_json(tmp / "model_config.json", self.base_model.config.to_dict())
        _write_json(tmp / "prompt.json", {"system": self.template.system, "prompt": self.template.prompt})
        _write_json(tmp / "train_config.json", self.cfg.to_dict())
        _write_json(tmp / STATE_FILE, {**asdict(state), "complete": True, "final": final})
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        self._prune()
        return target

    def _prune(self):
        if self.cfg.save_total_limit <= 0:
            return
        for old in list_checkpoints(self.output_dir)[: -self.cfg.save_total_limit]:
            shutil.rmtree(old, ignore_errors=True)

    def _optimizer_state(self) -> dict:
        """AdamW moments under structured parameter names (Paddle's own names differ per process)."""
        out = {}
        for acc_name, per_param in self.optimizer._accumulators.items():
            for name, param in self.named_trainable:
                if param.name in per_param:
                    out[f"{name}::{acc_name}"] = per_param[param.name]
        return out

    def maybe_resume(self, state: LoopState) -> str | None:
        """Continue from the newest complete checkpoint in output_dir, if any."""
        candidates = list_checkpoints(self.output_dir)
        final = self.output_dir / FINAL_DIR
        if (final / STATE_FILE).is_file():
            candidates.append(final)
        if not candidates:
            return None
        latest = max(candidates, key=lambda p: json.loads((p / STATE_FILE).read_text())["step"])
        saved = json.loads((latest / STATE_FILE).read_text())
        if saved.get("config_fingerprint") != state.config_fingerprint:
            raise UserError(f"{latest}: checkpoint of a different training config; use another "
                            "output_dir or delete the old run")
        from ..model.checkpoint import load_safetensors

        if self.cfg.finetune_mode == "lora":
            from .lora import load_lora_weights

            load_lora_weights(self.model, latest / "lora")
        else:
            params = load_safetensors(latest / LOCAL_PARAMS)
            for name, param in self.named_trainable:
                if name not in params:
                    raise UserError(f"{latest}: missing trained parameter {name!r}")
                param.set_value(params[name])
        moments = load_safetensors(latest / OPTIMIZER_STATE)
        by_name = dict(self.named_trainable)
        translated = {}
        for key, value in moments.items():
            name, acc = key.split("::")
            translated[f"{by_name[name].name}_{acc}_0"] = value
        self.optimizer.set_state_dict(translated)
        for key in asdict(state):
            if key in saved:
                setattr(state, key, saved[key])
        return str(latest)

    # ---- files -----------------------------------------------------------------------------------
    def _check_output_dir(self):
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise UserError(f"output_dir {self.output_dir} exists and is not a directory")
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def _write_run_files(self):
        _write_json(self.output_dir / "train_config.json", self.cfg.to_dict())

    def _prepare_log(self, resumed_step: int):
        """Keep log records up to the resumed step (a killed run may have logged further)."""
        self.log_path = self.output_dir / "log.jsonl"
        self.visualdl = None
        if self.rank != 0:
            return
        if self.log_path.exists():
            kept = [line for line in self.log_path.read_text().splitlines()
                    if line.strip() and _safe_step(line) <= resumed_step]
            with atomic_write(self.log_path) as handle:
                handle.write("".join(line + "\n" for line in kept))
        if self.cfg.visualdl:
            try:
                from visualdl import LogWriter

                self.visualdl = LogWriter(logdir=str(self.output_dir / "visualdl"))
            except ImportError:
                self.log("visualdl requested but not installed: logging to log.jsonl only")

    def _log_record(self, record: dict):
        if self.rank != 0:
            return
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.visualdl is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "kind"):
                    self.visualdl.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _progress_bar(self, total, initial):
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    disable=not self.cfg.progress or self.rank != 0, file=sys.stderr)


# ---- helpers -------------------------------------------------------------------------------------
def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete numbered checkpoints, oldest first."""
    found = [p for p in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def _fingerprint(cfg: TrainConfig) -> str:
    """Fields that change the trajectory; budget/logging/eval settings may differ on resume."""
    import hashlib

    volatile = {"output_dir", "progress", "logging_steps", "eval_steps", "eval_minutes", "save_steps",
                "save_minutes", "save_total_limit", "visualdl", "num_workers", "num_threads",
                "max_train_minutes", "eval_loss_samples", "eval_caption_samples", "eval_max_new_tokens",
                "eval_batch_size", "val_records"}
    stable = {k: v for k, v in cfg.to_dict().items() if k not in volatile}
    return hashlib.sha1(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]


def _read_records(path, load_records):
    resolved = resolve_path(path)
    if resolved is None or not Path(resolved).is_file():
        raise UserError(f"{path}: records file not found (run tools/convert_labels.py first)")
    return load_records(resolved)


def _field_scores(predictions: dict, references: dict) -> dict:
    """Field accuracy where references follow the synthetic-ad grammar; nothing otherwise."""
    from ..eval.fields import field_accuracy

    try:
        fields = field_accuracy(predictions, {k: v[0] for k, v in references.items()})
    except ValueError:
        return {}
    return {f"acc_{k}": v for k, v in fields.items() if isinstance(v, float)}


def _safe_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, ValueError):
        return 10 ** 12  # unreadable (torn) lines are dropped


def _write_json(path: Path, data: dict):
    with atomic_write(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
