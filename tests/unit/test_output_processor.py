"""service/engine/output_processor.py: stop conditions, stop strings and deltas, with a real
byte-level BPE tokenizer (built offline in conftest)."""

from __future__ import annotations

import pytest

from service.engine.output_processor import SequenceOutput
from service.engine.types import FinishReason, SamplingParams, TokenLogprob


@pytest.fixture
def tok(tiny_tokenizer):
    return tiny_tokenizer


def make(tok, num_prompt_tokens=4, max_model_len=10_000, **params) -> SequenceOutput:
    return SequenceOutput("req", 0, SamplingParams(**params), tok, {tok.eos_token_id},
                          num_prompt_tokens, max_model_len)


def feed(seq: SequenceOutput, ids, stop_when_finished=True):
    """Append ids until the sequence finishes; return (outputs incl. None, emitted text after each token)."""
    outs, emitted, text = [], [], ""
    for i in ids:
        if stop_when_finished and seq.finished:
            break
        out = seq.append(i)
        outs.append(out)
        text += out.text if out else ""
        emitted.append(text)
    return outs, emitted


def joined(outs) -> str:
    return "".join(o.text for o in outs if o is not None)


def last(outs):
    return [o for o in outs if o is not None][-1]


# ---------------------------------------------------------------- stop strings


def test_stop_string_is_cut_and_never_emitted(tok):
    seq = make(tok, stop=("this",))
    ids = tok.encode("Hello world, this is a test.")
    outs, emitted = feed(seq, ids)
    assert seq.finished and seq.finish_reason == FinishReason.STOP
    assert joined(outs) == "Hello world, " == seq.text
    assert all("this" not in e for e in emitted)
    assert last(outs).finished and last(outs).finish_reason == FinishReason.STOP
    assert len(outs) < len(ids)  # it stopped early


def test_stop_string_spanning_two_tokens(tok):
    stop_ids = tok.encode("STOP")
    assert [tok.decode([i]) for i in stop_ids] == ["ST", "OP"]  # "STOP" is two tokens
    ids = tok.encode("go ") + stop_ids + tok.encode(" now")
    seq = make(tok, stop=("STOP",))
    outs, emitted = feed(seq, ids)
    assert seq.finish_reason == FinishReason.STOP
    assert joined(outs) == "go "
    # after "ST" the partial match is held back, never emitted
    assert emitted[-2] == "go " and "S" not in "".join(emitted)


def test_stop_string_spanning_a_token_boundary_mid_token(tok):
    ids = tok.encode("Hello world")  # He | llo | ' w' | o | rld
    seq = make(tok, stop=("lo w",))
    outs, _ = feed(seq, ids)
    assert seq.finish_reason == FinishReason.STOP and joined(outs) == "Hel"


def test_partial_prefix_is_held_back_then_released(tok):
    pieces = ["a", " t", "est", ".", " ok"]
    ids = [i for p in pieces for i in tok.encode(p)]
    seq = make(tok, stop=("test!",))
    outs, emitted = feed(seq, ids)
    assert emitted[:3] == ["a", "a ", "a "]  # "t", "test" could still become "test!"
    assert emitted[3] == "a test."  # "." breaks the match: released
    assert not seq.finished and emitted[-1] == "a test. ok"
    out = seq.append(tok.eos_token_id)
    assert out.finished and out.finish_reason == FinishReason.STOP and out.text == ""


def test_held_back_prefix_is_released_when_the_sequence_ends(tok):
    seq = make(tok, stop=("xyz",))
    outs, emitted = feed(seq, tok.encode("abx"))
    assert emitted[-1] == "ab"
    out = seq.append(tok.eos_token_id)
    assert out.text == "x" and out.finish_reason == FinishReason.STOP

    seq = make(tok, stop=("xyz",), max_tokens=3)
    outs, _ = feed(seq, tok.encode("abx"))
    assert seq.finish_reason == FinishReason.LENGTH and joined(outs) == "abx"


def test_earliest_of_several_stop_strings_wins(tok):
    seq = make(tok, stop=("test", "is"))
    outs, _ = feed(seq, tok.encode("this is a test"))
    assert joined(outs) == "th" and seq.finish_reason == FinishReason.STOP


# ---------------------------------------------------------------- eos, stop ids, lengths


def test_eos_finishes_with_stop_and_is_not_emitted(tok):
    eos = tok.eos_token_id
    ids = tok.encode("hi there") + [eos] + tok.encode("more")
    seq = make(tok)
    outs, _ = feed(seq, ids)
    final = last(outs)
    assert final.finished and final.finish_reason == FinishReason.STOP
    assert final.text == "" and final.token_ids[-1] == eos
    assert joined(outs) == "hi there" and "<|endoftext|>" not in seq.text
    assert final.num_generated_tokens == len(tok.encode("hi there")) + 1


def test_ignore_eos(tok):
    eos = tok.eos_token_id
    ids = tok.encode("hi") + [eos] + tok.encode("yo")
    seq = make(tok, ignore_eos=True, max_tokens=len(ids))
    outs, _ = feed(seq, ids)
    assert seq.finish_reason == FinishReason.LENGTH and seq.num_generated == len(ids)
    assert joined(outs) == "hiyo"  # the eos is a special token: decoded to nothing


def test_stop_token_ids(tok):
    bang = tok.encode("!")[0]
    seq = make(tok, stop_token_ids=(bang,))
    outs, _ = feed(seq, tok.encode("Hello! again"))
    assert seq.finish_reason == FinishReason.STOP
    assert joined(outs) == "Hello" and last(outs).token_ids[-1] == bang


def test_max_tokens_gives_length(tok):
    ids = tok.encode("Hello world, this is a test.")
    seq = make(tok, max_tokens=3)
    outs, _ = feed(seq, ids)
    assert seq.finish_reason == FinishReason.LENGTH and seq.num_generated == 3
    assert joined(outs) == tok.decode(ids[:3])
    with pytest.raises(AssertionError):
        seq.append(ids[3])


def test_context_limit_gives_length(tok):
    ids = tok.encode("Hello world, this is a test.")
    seq = make(tok, num_prompt_tokens=5, max_model_len=8, max_tokens=100)
    outs, _ = feed(seq, ids)
    assert seq.finish_reason == FinishReason.LENGTH and seq.num_generated == 3
    assert last(outs).num_prompt_tokens == 5


def test_length_finish_flushes_a_partial_character(tok):
    ids = tok.encode("a你")
    seq = make(tok, max_tokens=len(ids) - 1)
    outs, _ = feed(seq, ids)
    assert seq.finish_reason == FinishReason.LENGTH
    assert joined(outs) == tok.decode(ids[:-1])


def test_num_generated_tokens_counts_every_token(tok):
    ids = tok.encode("你好🙂") + [tok.eos_token_id]
    seq = make(tok)
    outs, _ = feed(seq, ids)
    real = [o for o in outs if o is not None]
    assert None in outs  # byte tokens that complete no character produce no delta...
    assert [t for o in real for t in o.token_ids] == ids  # ...but their ids ride on the next one
    assert real[-1].num_generated_tokens == len(ids) == seq.num_generated
    counts = [o.num_generated_tokens for o in real]
    assert counts == sorted(counts) and joined(outs) == "你好🙂"


def test_logprobs_ride_along_with_deltas(tok):
    ids = tok.encode("你")
    seq = make(tok, logprobs=True)
    outs = [seq.append(i, TokenLogprob(i, -0.5)) for i in ids]
    assert all(o is not None for o in outs)  # pending logprobs are delivered even without text
    assert [lp.token_id for o in outs for lp in o.logprobs] == ids


def test_abort_returns_a_final_delta(tok):
    seq = make(tok, stop=("zz",))
    feed(seq, tok.encode("abz"))
    out = seq.abort(error="gone")
    assert out.finished and out.finish_reason == FinishReason.ABORT and out.error == "gone"
    assert out.text == "z"  # the held-back prefix is released
