"""The decoding options, declared once: `GenerationConfig` (paddle-free: the CLI and the service
import it without loading the model stack).

Each public option's type, default, bounds and help text live on its dataclass field
(`field(metadata=...)`, see `option`). `predict_batch.py`'s flags and the service's request fields
are derived from these fields (`decoding/derive.py`), and the curation ops take their bounds and
help from them, so adding a decoding option is one field here plus the code that uses it.

A config checks itself when it is made (`__post_init__` -> `validate`): it exists only valid, and
an invalid one fails where the options enter (the CLI's parse, the service's request parse, a
recipe's load), never later in the engine.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace

# Metadata keys of an option field.
HELP, MIN, MIN_EXCLUSIVE, MAX, PUBLIC = "help", "min", "min_exclusive", "max", "public"


def option(default, help: str, *, min=None, max=None, min_exclusive: bool = False, public: bool = True):
    """A decoding option: its default, help text and bounds (`min`/`max` inclusive unless
    `min_exclusive`). `public` options become CLI flags and request fields; the others are filled
    by code (the tokenizer's ids) or by an edge's own alias (the API's `n`)."""
    return field(default=default, metadata={HELP: help, MIN: min, MAX: max, MIN_EXCLUSIVE: min_exclusive,
                                            PUBLIC: public})


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = option(128, "most new tokens per caption", min=1)
    do_sample: bool = option(False, "sample instead of greedy decoding")
    num_beams: int = option(1, "beam search with this many beams (1: none)", min=1)
    temperature: float = option(1.0, "sampling temperature", min=0, min_exclusive=True)
    top_k: int = option(0, "sample among the k most likely tokens (0: all)", min=0)
    top_p: float = option(1.0, "sample from the smallest set of tokens whose probability reaches p",
                          min=0, min_exclusive=True, max=1)
    repetition_penalty: float = option(1.0, "CTRL-style penalty on tokens already in the context (1: none)",
                                       min=0, min_exclusive=True)
    length_penalty: float = option(1.0, "beam search ranks by log-prob / length**this")
    seed: int = option(0, "sampling seed (image/batch k uses seed + k)")
    # Candidates per prompt: the n best beams, or n samples. `generate` then returns n id lists per
    # prompt, one prompt's after another (as Hugging Face's `num_return_sequences`).
    num_return_sequences: int = option(1, "candidates per prompt (n best beams or n samples)", min=1,
                                       public=False)
    # Log-probabilities of the chosen tokens (raw: the model's distribution before the repetition
    # penalty, temperature, top-k/top-p), and the `top_logprobs` most likely alternatives at each
    # position: recorded by `decoding.logprobs` (OpenAI's `logprobs`/`top_logprobs`; set by the API).
    logprobs: bool = option(False, "record each chosen token's log-probability", public=False)
    top_logprobs: int = option(0, "also record this many most likely tokens per position", min=0, max=20,
                               public=False)
    # Ids that end a row (() = none: run to max_new_tokens), and the id left padding uses. None
    # means "the tokenizer's" (`tokenizer.stop_ids`, `tokenizer.pad_id`): `with_tokenizer` fills them.
    stop_ids: tuple | None = option(None, "ids that end a row", public=False)
    pad_id: int | None = option(None, "the id left padding uses", public=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Every rule in one place: each field's declared bounds, then the rules between fields.
        Raises ValueError naming the option."""
        for f in dataclasses.fields(self):
            value, low, high = getattr(self, f.name), f.metadata.get(MIN), f.metadata.get(MAX)
            if value is None:
                continue
            if low is not None and (value <= low if f.metadata.get(MIN_EXCLUSIVE) else value < low):
                raise ValueError(f"{f.name} must be {'>' if f.metadata.get(MIN_EXCLUSIVE) else '>='} {low}, "
                                 f"got {value}")
            if high is not None and value > high:
                raise ValueError(f"{f.name} must be <= {high}, got {value}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError("num_beams > 1 with do_sample: beam search does not sample")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if self.num_return_sequences > 1 and not (self.do_sample or self.num_beams >= self.num_return_sequences):
            raise ValueError("num_return_sequences > 1 needs sampling or at least as many beams "
                             "(greedy decoding would repeat one caption)")

    def with_tokenizer(self, tokenizer) -> "GenerationConfig":
        """This config with the tokenizer's stop and pad ids where none are set."""
        return replace(self, stop_ids=tuple(tokenizer.stop_ids) if self.stop_ids is None else self.stop_ids,
                       pad_id=tokenizer.pad_id if self.pad_id is None else self.pad_id)

    @property
    def rows(self) -> int:
        """Cache rows one request with this config takes in the scheduler: one per beam (`generate`
        makes each of n sampled candidates a request of its own)."""
        return self.num_beams

