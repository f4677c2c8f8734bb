from services.common.sampling_params import SamplingParams
from services.engine.request import FinishReason, Req
from services.engine.stop_check import check_finish, find_stop_string, output_text

VOCAB = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 9: "<eos>"}


def decode(ids):
    return "".join(VOCAB[i] for i in ids if i != 9)


def _run(params, tokens, eos=frozenset({9}), ctx=1000):
    req = Req(rid="r", prompt_ids=[7, 7], params=params)
    for t in tokens:
        req.output_ids.append(t)
        check_finish(req, eos, ctx, decode)
        if req.finished:
            break
    return req


def test_find_stop_string_earliest():
    assert find_stop_string("abcXYdefZZ", ["ZZ", "XY"]) == (3, "XY")
    assert find_stop_string("abc", ["d"]) is None


def test_eos_stops_unless_ignored():
    req = _run(SamplingParams(max_tokens=10), [1, 2, 9, 3])
    assert req.finish_reason is FinishReason.STOP and req.output_ids == [1, 2, 9]
    assert output_text(req, decode) == "Hello"
    req = _run(SamplingParams(max_tokens=4, ignore_eos=True), [1, 2, 9, 3])
    assert req.finish_reason is FinishReason.LENGTH and len(req.output_ids) == 4


def test_stop_string_across_tokens_is_cut_from_text():
    req = _run(SamplingParams(max_tokens=10, stop=("o wo",)), [1, 2, 3, 4, 5])
    assert req.finish_reason is FinishReason.STOP and req.matched_stop == "o wo"
    assert req.output_ids == [1, 2, 3]
    assert output_text(req, decode) == "Hell"


def test_stop_token_id_and_length_and_context():
    req = _run(SamplingParams(max_tokens=10, stop_token_ids=(3,)), [1, 2, 3, 4])
    assert req.matched_stop == 3 and output_text(req, decode) == "Hello"
    req = _run(SamplingParams(max_tokens=2), [1, 2, 3])
    assert req.finish_reason is FinishReason.LENGTH and req.output_ids == [1, 2]
    req = _run(SamplingParams(max_tokens=100), [1, 2, 3, 4], ctx=5)  # 2 prompt + 3 out = context
    assert req.finish_reason is FinishReason.LENGTH and req.output_ids == [1, 2, 3]
