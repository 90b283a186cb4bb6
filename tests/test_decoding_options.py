"""The decoding options are declared once (`GenerationConfig`): predict_batch.py's flags and both
service endpoints' request fields are derived from it, and a config checks itself when made."""
from __future__ import annotations

import dataclasses

import pytest
from pydantic import ValidationError

from paddle_caption.decoding.config import GenerationConfig, option
from paddle_caption.decoding.derive import config_from_args, public_fields
from paddle_caption.predict import cli
from paddle_caption.serve import protocol

PUBLIC = [f.name for f in public_fields()]
ARGS = ["t.tsv", "r.txt", "model"]


def extended():
    """GenerationConfig plus one new option, declared the way every option is."""
    return dataclasses.make_dataclass(
        "Extended", [("no_repeat_ngram_size", int, option(0, "never repeat an n-gram of this size (0: off)", min=0))],
        bases=(GenerationConfig,), frozen=True)


def test_an_option_added_to_the_dataclass_is_a_cli_flag_and_an_api_field_of_both_endpoints():
    cls = extended()
    args = cli.build_parser(cls).parse_args(ARGS + ["--no_repeat_ngram_size", "3", "--num_beams", "2"])
    cfg = config_from_args(args, cls)
    assert isinstance(cfg, cls) and cfg.no_repeat_ngram_size == 3 and cfg.num_beams == 2
    assert "never repeat an n-gram" in cli.build_parser(cls).format_help()
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be >= 0"):
        config_from_args(cli.build_parser(cls).parse_args(ARGS + ["--no_repeat_ngram_size", "-1"]), cls)

    for model in (protocol.caption_options_model(cls), protocol.chat_options_model(cls)):
        assert "no_repeat_ngram_size" in model.model_fields
        assert model.model_fields["no_repeat_ngram_size"].description.startswith("never repeat an n-gram")
        parsed = model.model_validate({"no_repeat_ngram_size": 2})
        assert model.decoding_class is cls and parsed.decoding_values()["no_repeat_ngram_size"] == 2
        with pytest.raises(ValidationError, match="no_repeat_ngram_size"):
            model.model_validate({"no_repeat_ngram_size": -1})  # the bound, from the field's metadata


def test_the_flags_and_request_fields_are_exactly_the_public_options():
    flags = {a.dest for a in cli.build_parser()._actions}
    assert set(PUBLIC) <= flags
    assert {f.name for f in dataclasses.fields(GenerationConfig)} & flags == set(PUBLIC)  # ids stay internal
    caption_fields = set(protocol.CaptionOptions.model_fields)
    assert caption_fields == set(PUBLIC) | {"prompt", "system", "stream"}
    chat_only = set(PUBLIC) - set(protocol.CHAT_ALIASED)
    assert chat_only <= set(protocol.ChatCompletionRequest.model_fields)
    openai_names = {"max_tokens", "max_completion_tokens", "temperature", "n", "logprobs", "top_logprobs"}
    assert openai_names <= set(protocol.ChatCompletionRequest.model_fields)
    assert "do_sample" not in protocol.ChatCompletionRequest.model_fields and "max_new_tokens" not in \
        protocol.ChatCompletionRequest.model_fields  # OpenAI's names only, on the chat endpoint
    # the same defaults and bounds on the flag and on the field
    args = cli.build_parser().parse_args(ARGS)
    assert config_from_args(args) == GenerationConfig()
    assert protocol.CaptionOptions().generation == GenerationConfig()
    top_p = protocol.CaptionOptions.model_fields["top_p"].metadata
    assert {type(m).__name__ for m in top_p} >= {"Gt", "Le"}


def test_a_config_is_checked_when_made_and_a_request_when_parsed():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GenerationConfig(temperature=0)
    with pytest.raises(ValueError, match="top_p must be <= 1"):
        GenerationConfig(top_p=1.5)
    with pytest.raises(ValueError, match="beam search does not sample"):
        GenerationConfig(num_beams=2, do_sample=True)
    with pytest.raises(ValidationError, match="beam search does not sample"):
        protocol.CaptionOptions.model_validate({"num_beams": 2, "do_sample": True})
    with pytest.raises(ValidationError, match="beam search does not sample"):
        protocol.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                       "num_beams": 2, "temperature": 0.5})
    assert protocol.CaptionOptions.model_validate({"max_new_tokens": 5}).max_new_tokens == 5


def test_openai_names_map_onto_the_options_at_the_chat_edge():
    def chat(**kw):
        return protocol.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw})

    greedy = chat(temperature=0, top_p=0.5).generation
    assert not greedy.do_sample and greedy.temperature == 1.0 and greedy.top_p == 0.5
    sampled = chat(temperature=0.7, seed=3, top_k=None).generation
    assert sampled.do_sample and sampled.temperature == 0.7 and sampled.seed == 3 and sampled.top_k == 0
    assert chat(top_p=0.9).generation.do_sample  # temperature omitted: top_p < 1 samples
    assert chat(num_beams=3, length_penalty=0.5).generation.num_beams == 3
    assert chat(max_tokens=7).requested_max_tokens == 7
    seeds = {chat(temperature=1.0).generation.seed for _ in range(4)}
    assert len(seeds) > 1  # no seed: a random one per request


def test_the_pseudo_label_ops_decoding_parameters_are_the_options():
    from paddle_caption.curate.ops.pseudo_label import PseudoLabelParams
    from paddle_caption.decoding.derive import option_values
    from paddle_caption.runtime import UserError

    declared = {f.name: f for f in dataclasses.fields(GenerationConfig)}
    params = {f.name: f for f in dataclasses.fields(PseudoLabelParams)}
    for name in ("temperature", "top_p", "max_new_tokens"):
        assert params[name].metadata == declared[name].metadata  # help and bounds, declared once
    ok = PseudoLabelParams(recaption_below=0.1)
    ok.validate("stage 2")
    assert option_values(ok) == {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}  # its own defaults
    with pytest.raises(UserError, match="stage 2: top_p must be <= 1"):
        PseudoLabelParams(recaption_below=0.1, top_p=1.5).validate("stage 2")


def test_the_options_and_the_command_lines_load_no_paddle():
    import subprocess
    import sys

    code = ("import sys\n"
            "import paddle_caption.decoding.config, paddle_caption.decoding.derive, paddle_caption.decoding.drafting\n"
            "import paddle_caption.predict.cli, paddle_caption.serve.cli, paddle_caption.serve.protocol\n"
            "print('paddle' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
