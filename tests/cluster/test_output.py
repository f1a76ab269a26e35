"""ChoiceStream with the byte-level tokenizer: streamed text against decode, stop strings."""

from __future__ import annotations

import pytest

from msa.cluster.output import ChoiceStream
from msa.cluster.protocol import InvalidRequestError, SamplingParams
from msa.platform.tokenizer import Tokenizer

TOKENIZER = Tokenizer.byte_level_default()
EOS = TOKENIZER.eos_token_ids[0]


def stream_text(tokens: list[int], **params) -> tuple[str, str | None]:
    """The text a choice streams for ``tokens`` (appended one by one until it finishes) and its
    finish_reason."""
    stream = ChoiceStream("r", 0, 3, SamplingParams(**params), TOKENIZER, [EOS])
    text = ""
    for token in tokens:
        text += stream.append(token, 0.0, None, 0).text
        if stream.finished:
            break
    return text, stream.finish_reason


# 'h', 'é' = [195, 169], then the first two bytes of '€' = [226, 130, 172].
GENERATED = [104, 195, 169, 226, 130]
ENDINGS = {
    "stop_token_id": (GENERATED + [99], dict(stop_token_ids=[99]), "stop"),
    "eos": (GENERATED + [EOS], {}, "stop"),
    "max_tokens": (GENERATED, dict(max_tokens=len(GENERATED)), "length"),
}


@pytest.mark.parametrize("ending", list(ENDINGS), ids=list(ENDINGS))
def test_a_choice_ending_inside_a_character_streams_what_decode_gives(ending):
    tokens, params, reason = ENDINGS[ending]
    text, finish = stream_text(tokens, **params)
    assert text == TOKENIZER.decode(GENERATED) == "hé\ufffd"
    assert finish == reason


def test_held_back_text_comes_out_when_the_choice_ends_inside_a_character():
    """Text held back as the start of a stop string is streamed when the choice ends without it."""
    text, finish = stream_text(list(b"xEN") + [226, EOS], stop=["END"])
    assert (text, finish) == ("xEN\ufffd", "stop")
    # A stop string that does complete cuts the text there, and nothing after it comes out.
    text, finish = stream_text(list(b"xEND"), stop=["END"], max_tokens=4)
    assert (text, finish) == ("x", "stop")


def test_a_stop_string_given_as_one_string_is_that_whole_string():
    assert SamplingParams(stop="END").stop == ["END"]
    assert SamplingParams(stop=None).stop == [] and SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    for stop in [5, ["ok", 3], [""], "", ["a"] * 17, {"END"}]:
        with pytest.raises(InvalidRequestError, match="'stop'"):
            SamplingParams(stop=stop)
    # Each of 'E', 'N' and 'D' appears before the stop string: only the whole string stops.
    text, finish = stream_text(list(b"Done at the END. Never"), stop="END")
    assert (text, finish) == ("Done at the ", "stop")
    text, finish = stream_text(list(b"Done at the E"), stop="END", max_tokens=13)
    assert (text, finish) == ("Done at the E", "length")
