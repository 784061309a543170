"""The ReDrafter draft head (ReDrafter, arXiv 2403.09919, section 3.1, and
its released code apple/ml-recurrent-drafter; the linear recurrence and the
input projection are TensorRT-LLM's ReDrafter integration).

    s_0 = 0
    s_t = f(W E(x_{t-1}) + U s_{t-1} + b)         x_0 = g_0, W without bias
    z_t = ResBlocks(P [h ; s_t])                   P: optional input projection
    logits_t = head(z_t)
    ResBlock(x) = x + SiLU(Linear(x))

h is the base LM's final-norm hidden state at the last committed position,
g_0 the token it just produced, E the base LM's frozen input embedding table
(passed in, never trained here). The drafter keeps no state between decoding
steps. The variants (`DrafterConfig`):

- recurrence: "silu" (f = SiLU, the released code's `rnn=True`),
  "linear" (f = identity, TensorRT-LLM's), "sum" (s_t = E(x_{t-1}) + s_{t-1},
  no W, U or b: the released code's `rnn=False`);
- exit_dim: the ResBlocks' width; None keeps the concatenation's width
  (H + state, the paper's 2H), anything else adds P = Linear(2H -> exit_dim)
  as TensorRT-LLM's `exit_dim` does;
- lm_head: "own" (the paper's Linear(exit_dim -> V), no bias) or "base":
  Linear(exit_dim -> H), skipped when exit_dim == H, then the base LM's
  frozen output layer (passed in like E). On a small base model the paper's
  own 2H x V head is most of the drafter: see `drafter_cost`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

RECURRENCES = ("silu", "linear", "sum")
LM_HEADS = ("own", "base")


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
  """Sizes and variant of a draft head for a base LM of hidden width
  `hidden_dim`. The defaults are the paper's head (own vocabulary
  projection, ResBlocks at 2H, SiLU recurrence); `for_base` makes the
  cheaper default of this library (the base LM's head, ResBlocks at H)."""

  vocab_size: int
  hidden_dim: int  # H: the base LM's hidden width (h) and the RNN state size
  embed_dim: int  # the base LM's token-embedding width (E)
  num_res_blocks: int = 2  # the recipe's
  draft_len: int = 4  # C: tokens drafted after g_0 (and trained to predict)
  recurrence: str = "silu"  # RECURRENCES
  exit_dim: Optional[int] = None  # the ResBlocks' width; None: H + state width (2H)
  lm_head: str = "own"  # LM_HEADS

  def __post_init__(self):
    for name in ("vocab_size", "hidden_dim", "embed_dim", "draft_len"):
      if getattr(self, name) <= 0:
        raise ValueError(f"DrafterConfig.{name} must be positive; got {getattr(self, name)}")
    if self.num_res_blocks < 0:
      raise ValueError(f"DrafterConfig.num_res_blocks must be >= 0; got {self.num_res_blocks}")
    if self.recurrence not in RECURRENCES:
      raise ValueError(
        f"DrafterConfig.recurrence must be one of {RECURRENCES}; got {self.recurrence!r}"
      )
    if self.lm_head not in LM_HEADS:
      raise ValueError(f"DrafterConfig.lm_head must be one of {LM_HEADS}; got {self.lm_head!r}")
    if self.exit_dim is not None and self.exit_dim <= 0:
      raise ValueError(f"DrafterConfig.exit_dim must be positive or None; got {self.exit_dim}")

  @property
  def state_dim(self) -> int:
    """The RNN state's width: H, or E for the summation (no W to map E to H)."""
    return self.embed_dim if self.recurrence == "sum" else self.hidden_dim

  @property
  def input_dim(self) -> int:
    """Width of [h ; s_t]."""
    return self.hidden_dim + self.state_dim

  @property
  def res_dim(self) -> int:
    """Width of the ResBlocks."""
    return self.exit_dim or self.input_dim

  @classmethod
  def for_base(
    cls, base_config, *, lm_head: str = "base", exit_ratio: float = 0.5, **kwargs
  ) -> "DrafterConfig":
    """A drafter for a base LM config (hidden and embedding width = width;
    for a Block Transformer, its token decoder's width: the drafter reads
    the token decoder, `block_speculative`), ResBlocks of width
    round(exit_ratio * (H + state width)).
    The defaults (the base LM's head, exit_ratio 0.5: ResBlocks at H) are
    this library's cheap drafter; lm_head="own", exit_ratio=1.0 is the
    paper's."""
    if not exit_ratio > 0:
      raise ValueError(f"exit_ratio must be positive; got {exit_ratio}")
    block = getattr(base_config, "kind", "vanilla") == "block"
    width = base_config.token_width if block else base_config.width
    probe = cls(
      vocab_size=base_config.vocab_size,
      hidden_dim=width,
      embed_dim=width,
      lm_head=lm_head,
      **kwargs,
    )
    exit_dim = max(1, int(round(exit_ratio * probe.input_dim)))
    return dataclasses.replace(probe, exit_dim=None if exit_dim == probe.input_dim else exit_dim)


def zero_state(config: DrafterConfig, batch_shape: tuple[int, ...], dtype=jnp.float32):
  """s_0 = 0: [*batch_shape, state_dim]."""
  return jnp.zeros(tuple(batch_shape) + (config.state_dim,), dtype)


class DraftHead(nn.Module):
  """The recurrent drafter: `step` advances the RNN, `logits` reads it out.

  With lm_head "base", `logits` and `__call__` need `base_head`, the base
  LM's output kernel [H, V] (params["lm_head"]["kernel"]), not trained here."""

  config: DrafterConfig

  def setup(self):
    cfg = self.config
    if cfg.recurrence != "sum":
      self.w = nn.Dense(cfg.hidden_dim, use_bias=False, name="w")  # on E(x)
      self.u = nn.Dense(cfg.hidden_dim, use_bias=True, name="u")  # on s (its bias is b)
    if cfg.exit_dim is not None:
      self.input_proj = nn.Dense(cfg.exit_dim, name="input_proj")
    self.res = [nn.Dense(cfg.res_dim, name=f"res_{i}") for i in range(cfg.num_res_blocks)]
    if cfg.lm_head == "own":
      self.head = nn.Dense(cfg.vocab_size, use_bias=False, name="lm_head")
    elif cfg.res_dim != cfg.hidden_dim:
      self.head_proj = nn.Dense(cfg.hidden_dim, use_bias=False, name="head_proj")

  def step(self, state: jax.Array, token_embedding: jax.Array) -> jax.Array:
    """s_t from s_{t-1} [..., state_dim] and E(x_{t-1}) [..., E]."""
    recurrence = self.config.recurrence
    if recurrence == "sum":
      return state + token_embedding.astype(state.dtype)
    pre = self.w(token_embedding) + self.u(state)
    return nn.silu(pre) if recurrence == "silu" else pre

  def logits(
    self, hidden: jax.Array, state: jax.Array, base_head: Optional[jax.Array] = None
  ) -> jax.Array:
    """f32 logits [..., V] of the next draft token from h [..., H] and s_t."""
    cfg = self.config
    z = jnp.concatenate([hidden, state.astype(hidden.dtype)], axis=-1)
    if cfg.exit_dim is not None:
      z = self.input_proj(z)
    for block in self.res:
      z = z + nn.silu(block(z))
    if cfg.lm_head == "own":
      return self.head(z).astype(jnp.float32)
    if base_head is None:
      raise ValueError(
        "a drafter with lm_head='base' needs base_head, the base model's output "
        "kernel [hidden, vocab] (params['lm_head']['kernel'])"
      )
    if cfg.res_dim != cfg.hidden_dim:
      z = self.head_proj(z)
    return jnp.dot(z, jax.lax.stop_gradient(base_head).astype(z.dtype)).astype(jnp.float32)

  def __call__(
    self, hidden: jax.Array, input_embeddings: jax.Array, base_head: Optional[jax.Array] = None
  ) -> jax.Array:
    """Teacher forcing: hidden [..., H] and the embeddings of x_0 .. x_{n-1}
    [..., n, E] -> logits [..., n, V] of x_1 .. x_n."""
    state = zero_state(self.config, hidden.shape[:-1], hidden.dtype)
    out = []
    for t in range(input_embeddings.shape[-2]):
      state = self.step(state, input_embeddings[..., t, :])
      out.append(self.logits(hidden, state, base_head))
    return jnp.stack(out, axis=-2)


def init_drafter(drafter: DraftHead, rng: jax.Array) -> Any:
  cfg = drafter.config

  def init(rng):
    hidden = jnp.zeros((1, cfg.hidden_dim))
    embeddings = jnp.zeros((1, 1, cfg.embed_dim))
    base_head = jnp.zeros((cfg.hidden_dim, cfg.vocab_size)) if cfg.lm_head == "base" else None
    return drafter.init(rng, hidden, embeddings, base_head)["params"]

  return jax.jit(init)(rng)


def base_head_of(drafter: DraftHead, base_params) -> Optional[jax.Array]:
  """The base LM's output kernel when the drafter reads through it, else None."""
  return base_params["lm_head"]["kernel"] if drafter.config.lm_head == "base" else None


def drafter_cost(
  config: DrafterConfig, base_config, *, beam_width: int = 4, context_len: Optional[int] = None
) -> dict:
  """Parameters and matmul FLOPs (2 per multiply-add) of the draft head
  against the base model's, for a benchmark to report.

  draft_token_flops: one beam advancing one draft token (recurrence, input
  projection, ResBlocks, head; the frozen base head included when used).
  base_token_flops: the base model's forward for one token at `context_len`
  (default base max_len / 2) tokens of context: its non-embedding matmuls,
  the output layer and attention's QK and AV. Per speculative step (greedy,
  M = beam_width beams of C tokens) the drafter runs M * C draft tokens and
  the base model verifies at most M * (C + 1) packed tokens (fewer after
  deduplication)."""
  # pylint: disable-next=import-outside-toplevel
  from bt_jax.model_summary import param_counts

  drafter_params = jax.eval_shape(lambda: init_drafter(DraftHead(config), jax.random.key(0)))
  num_drafter = int(sum(x.size for x in jax.tree.leaves(drafter_params)))
  base = param_counts(base_config)
  width, vocab = base_config.width, base_config.vocab_size
  if context_len is None:
    context_len = base_config.max_len // 2
  macs = 0
  if config.recurrence != "sum":
    macs += config.embed_dim * config.hidden_dim + config.hidden_dim * config.hidden_dim
  if config.exit_dim is not None:
    macs += config.input_dim * config.exit_dim
  macs += config.num_res_blocks * config.res_dim * config.res_dim
  if config.lm_head == "own":
    macs += config.res_dim * config.vocab_size
  else:
    if config.res_dim != config.hidden_dim:
      macs += config.res_dim * config.hidden_dim
    macs += config.hidden_dim * config.vocab_size
  draft_token_flops = 2 * macs
  num_layers = base_config.stack.num_layers
  base_token_flops = (
    2 * (base["non_embedding_params"] + width * vocab) + 4 * num_layers * width * context_len
  )
  draft_len = config.draft_len
  drafter_step = beam_width * draft_len * draft_token_flops
  verify_step = beam_width * (draft_len + 1) * base_token_flops
  return {
    "drafter": {
      "recurrence": config.recurrence,
      "exit_dim": config.res_dim,
      "lm_head": config.lm_head,
      "num_res_blocks": config.num_res_blocks,
    },
    "drafter_params": num_drafter,
    "base_params": base["total_params"],
    "params_fraction": num_drafter / base["total_params"],
    "draft_token_flops": draft_token_flops,
    "base_token_flops": base_token_flops,
    "draft_token_fraction": draft_token_flops / base_token_flops,
    "beam_width": beam_width,
    "draft_len": draft_len,
    "context_len": context_len,
    "drafter_flops_per_step": drafter_step,
    "verify_flops_per_step": verify_step,
    "step_fraction": drafter_step / verify_step,
  }


def teacher_forcing_loss(
  drafter: DraftHead,
  params,
  hidden: jax.Array,
  embed_table: jax.Array,
  tokens: jax.Array,
  mask: jax.Array,
  *,
  base_head: Optional[jax.Array] = None,
  target_mask: Optional[jax.Array] = None,
  teacher_logits: Optional[jax.Array] = None,
  temperature: float = 1.0,
  top_k: int = 4,
):
  """The drafter's loss over every position at once (the released recipe's
  teacher forcing; with `teacher_logits`, the paper's distillation).

  hidden [B, T, H]: the frozen base LM's hidden states of tokens [B, T]
  (mask [B, T] 1 = real token). At position t, h_t and the embeddings of
  tokens t+1, t+2, ... drive the RNN; step i predicts token t+2+i, for
  i < draft_len. A target counts where it is a real token and, with
  `target_mask` [B, T], where target_mask is 1 there (the base model's own
  tokens, not the prompt's text). Without `teacher_logits` the loss of step
  i is the mean cross-entropy against token t+2+i; with teacher_logits
  [B, T, V] (the base LM's logits: position j predicts token j+1) it is
  temperature**2 * KL(softmax(teacher / T) || softmax(drafter / T)), the
  teacher's distribution of that token (Hinton et al.'s scaling).
  Returns (sum over i of the loss of step i, {"loss_i", "acc_i" top-1
  accuracy against token t+2+i, "topk_i" it being in the drafter's top_k,
  "count_i"}, each [C]).
  """
  cfg = drafter.config
  num_steps = cfg.draft_len
  batch, length = tokens.shape
  pad = ((0, 0), (0, num_steps + 2))
  padded = jnp.pad(tokens, pad)
  valid_pad = jnp.pad(mask.astype(bool), pad)
  if target_mask is not None:
    valid_pad &= jnp.pad(target_mask.astype(bool), pad)
  # x_i = token t+1+i (i = 0 .. C-1), the target of step i is token t+2+i.
  inputs = jnp.stack([padded[:, 1 + i : 1 + i + length] for i in range(num_steps)], axis=2)
  targets = jnp.stack([padded[:, 2 + i : 2 + i + length] for i in range(num_steps)], axis=2)
  valid = jnp.stack([valid_pad[:, 2 + i : 2 + i + length] for i in range(num_steps)], axis=2)
  valid &= mask.astype(bool)[:, :, None]
  embeddings = jnp.take(embed_table, inputs, axis=0)  # [B, T, C, E]
  logits = drafter.apply(
    {"params": params}, jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(embeddings), base_head
  )  # [B, T, C, V]
  if teacher_logits is None:
    per_target = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  else:
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    teacher = jnp.pad(teacher, ((0, 0), (0, num_steps + 1), (0, 0)))
    teacher = jnp.stack(
      [teacher[:, 1 + i : 1 + i + length] for i in range(num_steps)], axis=2
    )  # [B, T, C, V]
    log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    per_target = temperature**2 * jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  weights = valid.astype(jnp.float32)
  count = jnp.sum(weights, axis=(0, 1))
  denominator = jnp.maximum(count, 1.0)
  loss_i = jnp.sum(per_target * weights, axis=(0, 1)) / denominator
  acc_i = jnp.sum((jnp.argmax(logits, -1) == targets) * weights, axis=(0, 1)) / denominator
  k = min(top_k, cfg.vocab_size)
  _, top = jax.lax.top_k(logits, k)
  in_top = jnp.any(top == targets[..., None], axis=-1)
  topk_i = jnp.sum(in_top * weights, axis=(0, 1)) / denominator
  return jnp.sum(loss_i), {"loss_i": loss_i, "acc_i": acc_i, "topk_i": topk_i, "count_i": count}
