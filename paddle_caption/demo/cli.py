"""The demos' command lines: `demo` (tools/run_demo.py, `make demo`), `compare-modes`
(tools/compare_modes.py), `curate-demo` (tools/run_curate_demo.py) and `scst-demo`
(tools/run_scst_demo.py, `make scst-demo`). Each builds its options and
runs the demo its module holds; the synthetic-data and budget flags they share are declared once."""
from __future__ import annotations

import argparse
from pathlib import Path

from .pipeline import DemoOptions


def _parser(doc: str, out: str) -> argparse.ArgumentParser:
    """The flags every demo takes: config, output, the synthetic split sizes, budget and decoding."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--config", default="config/demo.json", help="training config (TrainConfig JSON)")
    parser.add_argument("--out", default=out, help="output directory")
    parser.add_argument("--train", type=int, default=4000, help="synthetic training images")
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--test", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, help="cap every training run at N steps (quick checks)")
    parser.add_argument("--batch-size", type=int, default=16, help="prediction batch size")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    return parser


def _demo_options(args, minutes, ablation: bool) -> DemoOptions:
    return DemoOptions(config=Path(args.config), out=Path(args.out), n_train=args.train, n_val=args.val,
                       n_test=args.test, data_seed=args.data_seed, minutes=minutes, max_steps=args.max_steps,
                       ablation=ablation, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)


def demo_main(argv=None) -> int:
    from .pipeline import Demo

    parser = _parser("The whole workflow on the embedded default: data, train (images / no images), "
                     "merge, predict, score.", "checkpoints/demo")
    parser.add_argument("--minutes", type=float, help="training budget per model (default: the config's)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the no-image ablation")
    args = parser.parse_args(argv)
    Demo(_demo_options(args, args.minutes, not args.no_ablation)).run()
    return 0


def compare_modes_main(argv=None) -> int:
    from .compare_modes import LABELS, CompareModes

    parser = _parser("Full, partial (16-31) and LoRA fine-tuning side by side on the same data and budget.",
                     "checkpoints/compare_modes")
    parser.add_argument("--minutes", type=float, default=10.0, help="training budget per mode (wall clock)")
    parser.add_argument("--modes", default="full,partial,lora", help="comma-separated subset of full,partial,lora")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (the tiny model is 64 wide)")
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in LABELS]
    if unknown or not modes:
        parser.error(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(LABELS)}")
    CompareModes(_demo_options(args, args.minutes, False), modes, args.lora_r, args.lora_alpha).run()
    return 0


def curate_demo_main(argv=None) -> int:
    from .curate_demo import CurateDemo, CurateDemoOptions

    d = CurateDemoOptions()
    parser = _parser("Raw noisy rows vs curated rows on the synthetic world, the same training budget.", str(d.out))
    parser.set_defaults(config=str(d.config), train=d.n_train, val=d.n_val, test=d.n_test, data_seed=d.data_seed,
                        batch_size=d.batch_size, max_new_tokens=d.max_new_tokens)
    parser.add_argument("--unlabeled", type=int, default=d.n_unlabeled)
    parser.add_argument("--seed-steps", type=int, default=d.seed_steps, help="seed model training steps")
    parser.add_argument("--seed-minutes", type=float, default=d.seed_minutes, help="cap on the seed model's training time")
    parser.add_argument("--minutes", type=float, help="training budget of (a) and (b) (default: the config's)")
    parser.add_argument("--processes", type=int, default=d.processes, help="curation processes")
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=d.rounds,
                        help="1: the seed's scores (default); 2: rescore with the seed fine-tuned on round 1's rows")
    parser.add_argument("--refine-steps", type=int, default=d.refine_steps)
    parser.add_argument("--candidates", type=int, default=d.num_candidates, help="pseudo-label candidates per image")
    parser.add_argument("--train-seeds", type=int, default=d.train_seeds,
                        help="train (a) and (b) once per seed; >= 3 gives mean +- std and the 2-std test")
    parser.add_argument("--mismatched", type=float, default=d.noise["mismatched"],
                        help="share of training rows with another image's caption")
    args = parser.parse_args(argv)
    CurateDemo(CurateDemoOptions(
        out=Path(args.out), config=Path(args.config), n_train=args.train, n_val=args.val, n_test=args.test,
        n_unlabeled=args.unlabeled, data_seed=args.data_seed, seed_steps=args.seed_steps,
        seed_minutes=args.seed_minutes, minutes=args.minutes, max_steps=args.max_steps, processes=args.processes,
        rounds=args.rounds, refine_steps=args.refine_steps, num_candidates=args.candidates,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, train_seeds=args.train_seeds,
        noise={**d.noise, "mismatched": args.mismatched})).run()
    return 0


def scst_demo_main(argv=None) -> int:
    from .scst_demo import SCSTDemo, SCSTDemoOptions

    d = SCSTDemoOptions()
    parser = argparse.ArgumentParser(description="The demo model + N minutes of cross-entropy vs + N minutes of "
                                                 "SCST, two seeds each, on the demo's test split.")
    parser.add_argument("--demo", default=str(d.demo), help="make demo's output (data and the stage-1 model)")
    parser.add_argument("--out", default=str(d.out), help="output directory")
    parser.add_argument("--config", default=str(d.config), help="the SCST stage's TrainConfig")
    parser.add_argument("--minutes", type=float, default=d.minutes, help="training budget per run (wall clock)")
    parser.add_argument("--seeds", default=",".join(map(str, d.seeds)), help="comma-separated training seeds")
    parser.add_argument("--ce-batch-size", type=int, default=d.ce_batch_size, help="batch of the cross-entropy runs")
    parser.add_argument("--max-steps", type=int, help="cap every run at N steps (quick checks)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="prediction batch size")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    args = parser.parse_args(argv)
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        parser.error(f"--seeds: comma-separated integers, not {args.seeds!r}")
    SCSTDemo(SCSTDemoOptions(demo=Path(args.demo), out=Path(args.out), config=Path(args.config), minutes=args.minutes,
                             seeds=seeds, ce_batch_size=args.ce_batch_size, max_steps=args.max_steps,
                             batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)).run()
    return 0
