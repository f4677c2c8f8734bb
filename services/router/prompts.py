"""From a validated OpenAI request to a CompletionJob: prompt tokens, context limits, sampling.

Length vocabulary: prompt_len + max_tokens <= max_context, where max_context is the model's
max_position_embeddings (or the router's setting). A prompt must leave room for one token.
"""

from __future__ import annotations

import array

import numpy as np

from services.common.prompt_wire import token_array
from services.common.sampling_params import SamplingParams
from services.router.chat_prompt import chat_prompt
from services.router.errors import ContextLengthExceeded, InvalidRequest
from services.router.job import CompletionJob
from services.router.openai_schema import ChatCompletionRequest, CompletionRequest, TokenIds
from services.router.settings import RouterSettings
from services.router.tokenization import RouterTokenizer


def chat_job(req: ChatCompletionRequest, tok: RouterTokenizer, settings: RouterSettings) -> CompletionJob:
    ids, output = chat_prompt(req, tok, settings)
    prompt = token_array(ids)
    limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = _max_tokens(
        [prompt], req.token_limit, None, _context(tok, settings), "messages", limit_param
    )
    return CompletionJob((prompt,), _sampling(req, max_tokens, req.logprobs), req.n, output)


def completion_job(req: CompletionRequest, tok: RouterTokenizer, settings: RouterSettings) -> CompletionJob:
    prompts = completion_prompts(req, tok)
    max_tokens = _max_tokens(
        prompts,
        req.max_tokens,
        settings.completions_default_max_tokens,
        _context(tok, settings),
        "prompt",
        "max_tokens",
    )
    sampling = _sampling(req, max_tokens, req.logprobs is not None)
    return CompletionJob(tuple(prompts), sampling, req.n)


def completion_prompts(req: CompletionRequest, tok: RouterTokenizer) -> list[TokenIds]:
    """`prompt` as the spec allows it: text, list of texts, token ids, list of token-id lists;
    each prompt as an array("I") (hashed and sent packed as it is)."""
    p = req.prompt
    prompts: list[TokenIds] = []
    for item in [p] if isinstance(p, str | array.array) else p:
        if isinstance(item, str):
            prompts.append(token_array(tok.encode(item)))
        else:
            prompts.append(token_array(item))  # validated ints (openai_schema)
    vocab = tok.info.vocab_size
    for ids in prompts:
        if ids and int(np.frombuffer(ids, dtype=np.uint32).max()) >= vocab:
            raise InvalidRequest(
                f"prompt token ids must be below the vocabulary size {vocab}", param="prompt"
            )
    return prompts


def _context(tok: RouterTokenizer, settings: RouterSettings) -> int:
    return settings.max_context or tok.info.max_context


def _max_tokens(
    prompts: list[TokenIds],
    requested: int | None,
    default: int | None,
    max_context: int,
    prompt_param: str,
    limit_param: str,
) -> int:
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise InvalidRequest("the prompt is empty (it must contain at least one token)", param=prompt_param)
    if longest >= max_context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_context} tokens, but the prompt has "
            f"{longest} tokens (at least one must be left to generate).",
            param=prompt_param,
        )
    room = max_context - longest
    if requested is None:
        return room if default is None else min(default, room)
    if requested > room:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_context} tokens; the prompt has {longest} tokens "
            f"and {limit_param} asks for {requested}, {longest + requested} in all.",
            param=limit_param,
        )
    return requested


def _sampling(req: ChatCompletionRequest | CompletionRequest, max_tokens: int, logprobs: bool) -> SamplingParams:
    try:  # the schema checked each field; this is the workers' own validation, once, at the door
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=max(0, req.top_k or 0),
            seed=req.seed,
            stop=req.stop_list,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
