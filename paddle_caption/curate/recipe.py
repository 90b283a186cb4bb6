"""A curation recipe: one JSON file, data-juicer's shape.

    {
      "dataset": "checkpoints/demo/train/records.jsonl",
      "export_dir": "checkpoints/curated",
      "model_dir": "checkpoints/seed/model",
      "process": [
        {"image_shape_filter": {"min_width": 64, "min_height": 64}},
        {"caption_length_filter": {"unit": "words", "min": {"percentile": 1}, "max": {"mean_std": 3}}},
        {"image_near_dedup": {"hamming": 6}},
        {"consistency_filter": {"min": {"mean_std": -1}}},
        {"repeat_top": {"quota": 4000}}
      ]
    }

Why JSON and not data-juicer's YAML: every run config of the kit is a JSON file read into a
dataclass (`typed_config.py`), with one-line errors for an unknown key or a wrong type before
anything loads; a recipe is checked the same way, op by op. The `process` list has data-juicer's
shape (`[{op_name: {params}}, ...]`), so a data-juicer YAML translates line by line.

`dataset` is a records.jsonl (convert_labels.py's output, or a previous curation's) or, with
`"dataset_format": "data_juicer"`, a data-juicer jsonl (`formats.py`). Model operations take
`model_dir` from their own parameters, else from the recipe's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..files import read_json_object
from ..runtime import UserError
from ..typed_config import from_mapping


@dataclass
class Recipe:
    dataset: str = ""
    dataset_format: str = "records"  # records | data_juicer
    export_dir: str = "checkpoints/curated"
    model_dir: str = ""  # default model directory of the model operations
    # "" = what each model directory holds (an exported one runs on Paddle Inference); "dygraph" |
    # "inference" insist. Image features (cluster_select) run on either; consistency and
    # pseudo_label score captions with the training forward, which only a checkpoint has.
    engine: str = ""
    process: list = field(default_factory=list)
    batch_size: int = 16  # rows per model batch
    seed: int = 0
    num_threads: int = 0  # CPU threads (0: OMP_NUM_THREADS, else every core)
    export_tsv: bool = False  # also write curated.tsv (contest layout: copies the images)
    export_data_juicer: bool = False  # also write data_juicer.jsonl + images/ (see formats.py)

    def validate(self, source: str) -> "Recipe":
        if not self.dataset:
            raise UserError(f"{source}: dataset is required")
        if not Path(self.dataset).is_file():
            raise UserError(f"{source}: dataset {self.dataset} not found")
        if self.dataset_format not in ("records", "data_juicer"):
            raise UserError(f"{source}: dataset_format must be records or data_juicer")
        if not isinstance(self.process, list) or not self.process:
            raise UserError(f"{source}: process must be a non-empty list of {{op_name: {{params}}}}")
        if self.batch_size < 1:
            raise UserError(f"{source}: batch_size must be >= 1")
        if self.engine not in ("", "dygraph", "inference"):
            raise UserError(f"{source}: engine must be dygraph or inference (or empty: what model_dir holds), "
                            f"not {self.engine!r}")
        return self


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    data = read_json_object(path, "recipe")
    data.update(overrides or {})
    return from_mapping(Recipe, data, f"recipe {path}").validate(f"recipe {path}")
