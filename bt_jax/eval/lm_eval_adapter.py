"""lm-evaluation-harness (0.4.x) adapter: a bt_jax model as a harness `LM`.

Needs `pip install lm-eval`; nothing else in bt_jax imports this module.
Importing it registers the model under the name "bt_jax":

    import lm_eval
    from bt_jax.eval.lm_eval_adapter import BtJaxLM
    lm = BtJaxLM(model=model, params=params, tokenizer=tokenizer, batch_size=32)
    lm_eval.simple_evaluate(model=lm, tasks=["hellaswag", "piqa", "arc_easy"])

or from the command line (this module runs the harness CLI after registering):

    python -m bt_jax.eval.lm_eval_adapter run --model bt_jax \
        --model_args workdir=/runs/block_85m --tasks hellaswag,piqa --batch_size 32

The harness does the tokenisation rules (TemplateLM); the scoring is the same
`LoglikelihoodScorer` the native evaluator (`bt_jax.eval.zero_shot`) uses, so
both give the same log-likelihoods. Generation is not supported.
"""

from __future__ import annotations

from typing import Any, Optional

from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from bt_jax.eval.scoring import LoglikelihoodScorer, ScoreRequest
from bt_jax.eval.sharding import eval_sharding_from_flag

DEFAULT_BATCH_SIZE = 32


def _parse_batch_size(batch_size: Any) -> int:
  if batch_size is None:
    return DEFAULT_BATCH_SIZE
  if isinstance(batch_size, str) and batch_size.startswith("auto"):
    logging.warning(
      "batch_size=%s: automatic batch sizes are not supported; using %d "
      "(set max_batch_tokens to bound memory on long inputs)",
      batch_size,
      DEFAULT_BATCH_SIZE,
    )
    return DEFAULT_BATCH_SIZE
  try:
    value = int(batch_size)
  except ValueError:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}") from None
  if value <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  return value


@register_model("bt_jax")
class BtJaxLM(TemplateLM):
  """A vanilla or block bt_jax model behind the harness's `TemplateLM`.

  Give either `workdir` (a trained run, loaded with
  `bt_jax.checkpointing.load_for_inference`) or `model`, `params` and
  `tokenizer`. `with_greedy` computes the harness's `is_greedy` (one extra
  forward pass per batch); multiple-choice tasks do not use it. `mesh_shape`
  is the eval binaries' flag: "auto" (every local device data-parallel when
  there are several), "none", or "D,F,T" (see `bt_jax.eval.sharding`).
  """

  def __init__(
    self,
    workdir: Optional[str] = None,
    *,
    model=None,
    params=None,
    tokenizer=None,
    batch_size: Any = DEFAULT_BATCH_SIZE,
    max_batch_tokens: Any = None,
    min_bucket: Any = 32,
    with_greedy: Any = True,
    mesh_shape: str = "auto",
    **harness_kwargs: Any,
  ):
    super().__init__()
    # The harness passes device / max_batch_size; JAX places arrays itself.
    unused = {k: v for k, v in harness_kwargs.items() if k not in ("device", "max_batch_size")}
    if unused:
      raise TypeError(
        f"unknown BtJaxLM arguments {sorted(unused)}; valid ones are workdir, "
        "batch_size, max_batch_tokens, min_bucket, with_greedy, mesh_shape"
      )
    sharding = eval_sharding_from_flag(str(mesh_shape))
    if workdir is not None:
      if model is not None or params is not None or tokenizer is not None:
        raise ValueError("give either workdir or model/params/tokenizer, not both")
      from bt_jax.checkpointing import load_for_inference  # pylint: disable=g-import-not-at-top

      model, params, tokenizer = load_for_inference(workdir, sharding=sharding)
    elif model is None or params is None or tokenizer is None:
      raise ValueError("BtJaxLM needs workdir=DIR, or all of model, params and tokenizer")
    if isinstance(with_greedy, str):
      with_greedy = with_greedy.lower() in ("1", "true", "yes")
    self.model = model
    self.bt_tokenizer = tokenizer
    self.scorer = LoglikelihoodScorer(
      model,
      params,
      batch_size=_parse_batch_size(batch_size),
      max_batch_tokens=int(max_batch_tokens) if max_batch_tokens else None,
      min_bucket=int(min_bucket),
      with_greedy=bool(with_greedy),
      sharding=sharding,
    )
    self.params = self.scorer.params  # placed on the mesh when there is one

  @property
  def eot_token_id(self) -> int:
    return self.bt_tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self.model.config.max_len

  def tok_encode(
    self, string: str, add_special_tokens: Optional[bool] = None, **kwargs: Any
  ) -> list[int]:
    del add_special_tokens, kwargs  # our tokenizer adds no special tokens
    return list(self.bt_tokenizer.encode(string))

  def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
    del kwargs
    return self.bt_tokenizer.decode(tokens)

  def _loglikelihood_tokens(
    self, requests, disable_tqdm: bool = False, **kwargs: Any
  ) -> list[tuple[float, bool]]:
    """requests: [((context, continuation), context_ids, continuation_ids)]."""
    del kwargs
    score_requests = [
      ScoreRequest(tuple(context_ids), tuple(continuation_ids))
      for _, context_ids, continuation_ids in requests
    ]
    loglikelihoods, greedy = self.scorer(
      score_requests, progress=not disable_tqdm, desc="bt_jax loglikelihood"
    )
    answers = []
    for (cache_key, _, _), ll, is_greedy in zip(requests, loglikelihoods, greedy):
      answer = (float(ll), bool(is_greedy))
      if cache_key is not None:
        self.cache_hook.add_partial("loglikelihood", cache_key, answer)
      answers.append(answer)
    return answers

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Log-likelihood of whole strings, in disjoint windows that each fit the
    context (the harness's rolling windows with max_seq_len = context - 1, as
    `token_logprobs` needs the scored tokens inside the window)."""
    windows, owners = [], []
    for index, (string,) in enumerate(
      tqdm([req.args for req in requests], disable=disable_tqdm, desc="rolling windows")
    ):
      for context_ids, continuation_ids in map(
        lm_utils.make_disjoint_window,
        lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string),
          prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length - 1,
          context_len=1,
        ),
      ):
        windows.append((None, context_ids, continuation_ids))
        owners.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for index, (ll, _) in zip(owners, scores):
      totals[index] += ll
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    raise NotImplementedError(
      "the bt_jax lm-eval adapter scores log-likelihoods only (multiple-choice and "
      "perplexity tasks such as hellaswag, piqa, arc_easy, wikitext); generative tasks "
      "(generate_until) are not supported"
    )


if __name__ == "__main__":
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

  cli_evaluate()
