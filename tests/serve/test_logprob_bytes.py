"""Logprobs of tokens that hold only part of a UTF-8 character (the tiny model's byte tokens): chat
``bytes`` are the tokens' raw bytes and join to the content; legacy ``text_offset`` indexes the
returned text. The references are the engine's own token ids, which for the byte-level tokenizer
are the bytes themselves (ids 0..255) or a special token (256 on)."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from msa.cluster.protocol import SamplingParams
from msa.platform.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.serve.conftest import USER, engine_outputs, sse_events

TOK = Tokenizer.byte_level_default()
# Replies of the tiny model that split characters over tokens, checked in each test.
CHAT = {"max_tokens": 12, "seed": 2}
PROMPT = "hi"
COMPLETION = {"max_tokens": 24, "seed": 2, "ignore_eos": True}  # </tool_call> sampled midway


def partial(raw: bytes) -> bool:
    """Whether the bytes are not UTF-8 on their own (part of a character)."""
    try:
        raw.decode()
    except UnicodeDecodeError:
        return True
    return False


def token_raw(token: int, skip_special_tokens: bool = False) -> bytes:
    if token < 256:
        return bytes([token])
    return b"" if skip_special_tokens else SPECIAL_TOKENS[token - 256].encode()


def sampled_ids(app_client, prompt: list[int], **sampling) -> list[int]:
    outs = engine_outputs(app_client, prompt, SamplingParams(**sampling))
    return [t for o in outs for t in o.token_ids]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={
        "model": "tiny", "messages": USER, "logprobs": True, "top_logprobs": 3, **CHAT, **body})


def complete(client, **body):
    return client.post("/v1/completions", json={
        "model": "tiny", "prompt": PROMPT, "logprobs": 2, **COMPLETION, **body})


def check_entry(entry: dict) -> None:
    raw = bytes(entry["bytes"])
    assert raw and raw != "\ufffd".encode()  # a byte token's own byte, never U+FFFD's
    assert entry["token"] == raw.decode("utf-8", "replace")


def test_chat_bytes_are_the_raw_bytes_and_join_to_the_content(app_client):
    r = chat(app_client.client)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    prompt = TOK.encode(TOK.apply_chat_template(USER, add_generation_prompt=True))
    ids = sampled_ids(app_client, prompt, logprobs=3, **CHAT)
    assert len(entries) == len(ids)
    content_ids = [t for t in ids if t < 256]
    assert len(content_ids) == len(ids) - (choice["finish_reason"] == "stop")  # no special one midway
    joined = b"".join(bytes(e["bytes"]) for e, t in zip(entries, ids, strict=True) if t < 256)
    assert joined == bytes(content_ids)
    assert joined.decode("utf-8", "replace") == choice["message"]["content"]
    tops = [t for e in entries for t in e["top_logprobs"]]
    for entry in entries + tops:
        check_entry(entry)
    # The case at hand: characters split over tokens, a whole one among them, partial alternatives.
    assert any(partial(bytes(e["bytes"])) for e in entries)
    assert any(ord(c) > 127 for c in choice["message"]["content"].replace("\ufffd", ""))
    assert any(partial(bytes(t["bytes"])) for t in tops)


def test_chat_stream_carries_the_same_bytes(app_client):
    whole = chat(app_client.client).json()["choices"][0]
    events = sse_events(chat(app_client.client, stream=True).text)
    streamed = [e for c in events[:-1] for e in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert streamed == whole["logprobs"]["content"]


def check_offsets(text: str, tokens: list[str], offsets: list[int], raws: list[bytes]) -> None:
    """Offsets rise, stay in the text, and part it: the tokens at one offset hold the bytes of the
    text from there to the next offset (one character, or a whole token's text)."""
    assert offsets == sorted(offsets) and all(0 <= at <= len(text) for at in offsets)
    starts = sorted(set(offsets))
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        group = b"".join(raw for raw, at in zip(raws, offsets, strict=True) if at == start)
        assert group.decode("utf-8", "replace") == text[start:end], (start, group)
    for token, raw, at in zip(tokens, raws, offsets, strict=True):
        if raw and not partial(raw):
            assert text[at:].startswith(token)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_legacy_text_offsets_index_the_text(app_client, skip_special_tokens):
    r = complete(app_client.client, skip_special_tokens=skip_special_tokens)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text, lp = choice["text"], choice["logprobs"]
    ids = sampled_ids(app_client, TOK.encode(PROMPT, add_special_tokens=True), logprobs=2, **COMPLETION)
    raws = [token_raw(t, skip_special_tokens) for t in ids]
    assert lp["tokens"] == [token_raw(t).decode("utf-8", "replace") for t in ids]
    check_offsets(text, lp["tokens"], lp["text_offset"], raws)
    assert b"".join(raws).decode("utf-8", "replace") == text
    # Exercised: a character split over tokens (they share its offset), and a special token midway.
    assert any(partial(raw) for raw in raws)
    offsets = lp["text_offset"]
    assert any(a == b for a, b, raw in zip(offsets, offsets[1:], raws[1:], strict=False) if raw)
    assert any(t >= 256 for t in ids[:-1])


def test_legacy_offsets_of_the_reviewed_case(app_client):
    r = complete(app_client.client, max_tokens=8, logprobs=0, ignore_eos=False)
    choice = r.json()["choices"][0]
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text[offsets[tokens.index("w")]] == "w"
    # Each character that bytes of several tokens make: those tokens all stand where it begins.
    made = [(at, c) for at, c in enumerate(text) if ord(c) > 127 and c != "\ufffd"]
    assert made
    for at, c in made:
        assert offsets.count(at) == len(c.encode())
    assert len(text) < len(tokens) and offsets[-1] < len(text)


def test_legacy_stream_carries_the_same_offsets(app_client):
    whole = complete(app_client.client).json()["choices"][0]
    chunks = [c["choices"][0] for c in sse_events(complete(app_client.client, stream=True).text)[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    for key in ("tokens", "text_offset", "token_logprobs"):
        assert [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] == whole["logprobs"][key]


@pytest.mark.parametrize("stream", [False, True])
def test_legacy_offsets_stay_in_a_text_a_stop_string_cut(app_client, stream):
    full = complete(app_client.client).json()["choices"][0]["text"]
    at = next(i for i in range(len(full) - 1) if full[i:i + 2].isascii() and full[i:i + 2].isprintable())
    stop = full[at:at + 2]
    r = complete(app_client.client, stop=[stop], stream=stream)
    if stream:
        chunks = [c["choices"][0] for c in sse_events(r.text)[:-1]]
        text = "".join(c["text"] for c in chunks)
        offsets = [x for c in chunks if c["logprobs"] for x in c["logprobs"]["text_offset"]]
    else:
        choice = r.json()["choices"][0]
        text, offsets = choice["text"], choice["logprobs"]["text_offset"]
    assert text == full[:at]
    assert offsets == sorted(offsets) and offsets[-2:] == [at, at]  # the stop string's two tokens


def test_token_bytes_of_byte_level_and_byte_fallback_tokens():
    assert [TOK.token_bytes(t) for t in range(256)] == [bytes([b]) for b in range(256)]
    specials = [TOK.token_bytes(256 + i) for i in range(len(SPECIAL_TOKENS))]
    assert specials == [s.encode() for s in SPECIAL_TOKENS]
    assert TOK.token_bytes(257, skip_special_tokens=True) == b""
    vocab = {"<0xE6>": 0, "<0xB1>": 1, "<0xBA>": 2, "a": 3, "é": 4, "<unk>": 5}
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    fallback = Tokenizer(hf)
    assert fallback.decode([0, 1, 2]) == b"\xe6\xb1\xba".decode() and fallback.decode([0]) == "\ufffd"
    assert [fallback.token_bytes(t) for t in range(5)] == [b"\xe6", b"\xb1", b"\xba", b"a", "é".encode()]
