"""Model configuration: frozen dataclasses (Flax-examples habit).

The library never imports gin; the binaries bind these classes from gin files
(see `bt_jax.gin_utils`). Variants for decode or eval are made with
`dataclasses.replace(config, ...)`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax.numpy as jnp

EMBEDDERS = ("lookup", "projection", "encoder")
TOKEN_DECODERS = ("prefix", "summation", "cross_attention")
ATTENTION_IMPLS = ("xla", "pallas", "pallas_interpret", "cudnn")
# Rematerialisation of each decoder layer in the backward pass (MaxText names):
# "none" keeps every activation, "minimal" keeps only the matmul outputs,
# "full" keeps only the layer inputs and recomputes the rest.
REMAT_POLICIES = ("none", "minimal", "full")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def cdiv(a: int, b: int) -> int:
  """ceil(a / b) for non-negative ints."""
  return -(-a // b)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n."""
  return cdiv(n, multiple) * multiple


def head_dim_for_width(width: int) -> int:
  """The Block Transformer paper's head_dim rule: 32 if D <= 256, 64 if D <= 1536, else 128."""
  if width <= 256:
    return 32
  if width <= 1536:
    return 64
  return 128


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ValueError(f"unknown {name} {value!r}; valid values are {list(valid)}")


def _check_positive(name: str, value: int) -> None:
  if not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class StackConfig:
  """One GPT-NeoX decoder stack."""

  num_layers: int
  width: int
  head_dim: Optional[int] = None  # None: head_dim_for_width (the Block Transformer paper's sizes)
  mlp_ratio: int = 4
  rotary_pct: float = 0.25
  rotary_base: float = 10000.0
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    _check_positive("num_layers", self.num_layers)
    _check_positive("width", self.width)
    if self.width % self.resolved_head_dim:
      raise ValueError(f"width {self.width} is not divisible by head_dim {self.resolved_head_dim}")
    rot = self.rotary_dims
    if rot % 2:
      raise ValueError(
        f"rotary_pct {self.rotary_pct} of head_dim {self.resolved_head_dim} gives an odd "
        f"number of rotary dims ({rot}); it must be even"
      )

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or head_dim_for_width(self.width)

  @property
  def num_heads(self) -> int:
    return self.width // self.resolved_head_dim

  @property
  def rotary_dims(self) -> int:
    return int(self.resolved_head_dim * self.rotary_pct)


@dataclasses.dataclass(frozen=True)
class _CommonConfig:
  vocab_size: int = 50304
  max_len: int = 2048  # context length in tokens
  dtype: str = "float32"  # compute dtype
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  init_std: float = 0.02
  pad_id: int = 0  # pad = eos (Pythia's <|endoftext|>)
  remat: str = "none"  # REMAT_POLICIES: memory for compute in training

  def _validate_common(self):
    _check_positive("vocab_size", self.vocab_size)
    _check_positive("max_len", self.max_len)
    _check_choice("dtype", self.dtype, tuple(DTYPES))
    _check_choice("param_dtype", self.param_dtype, tuple(DTYPES))
    _check_choice("attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("remat", self.remat, REMAT_POLICIES)
    if not 0 <= self.pad_id < self.vocab_size:
      raise ValueError(f"pad_id {self.pad_id} outside the vocabulary [0, {self.vocab_size})")

  # Model-kind facts every caller needs (training, generation, eval, benchmarks);
  # each kind sets `tokens_per_step`, `first_scored_position` and `init_length`.

  def aligned_length(self, num_tokens: int) -> int:
    """num_tokens rounded up to whole steps (a block model's prompts are
    left-padded to a block boundary)."""
    return round_up(num_tokens, self.tokens_per_step)

  def num_steps(self, num_tokens: int) -> int:
    """Decode steps that make num_tokens new tokens (the last may overshoot)."""
    return cdiv(num_tokens, self.tokens_per_step)

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]


@dataclasses.dataclass(frozen=True)
class VanillaConfig(_CommonConfig):
  """A decoder-only GPT-NeoX LM (the baseline)."""

  num_layers: int = 6
  width: int = 256
  head_dim: Optional[int] = None
  # Per-stack GPT-NeoX numbers that a converted model may change (bt_jax.convert
  # maps them from a Hugging Face config.json); the defaults are Pythia's
  # (Biderman et al. 2023, arXiv 2304.01373).
  mlp_ratio: int = 4
  rotary_pct: float = 0.25
  rotary_base: float = 10000.0
  layer_norm_eps: float = 1e-5

  def __post_init__(self):
    self._validate_common()
    _check_positive("mlp_ratio", self.mlp_ratio)
    if not 0.0 <= self.rotary_pct <= 1.0:
      raise ValueError(f"rotary_pct {self.rotary_pct} must lie in [0, 1]")
    if not self.rotary_base > 0 or not self.layer_norm_eps > 0:
      raise ValueError(
        f"rotary_base {self.rotary_base} and layer_norm_eps {self.layer_norm_eps} must be positive"
      )
    self.stack  # validates the stack

  @property
  def kind(self) -> str:
    return "vanilla"

  @property
  def tokens_per_step(self) -> int:
    """Tokens one decode step makes."""
    return 1

  @property
  def first_scored_position(self) -> int:
    """The first position of a training sequence that is a target (0 has no context)."""
    return 1

  @property
  def first_eval_position(self) -> int:
    """The first token position `bt_jax.models.token_logprobs` scores."""
    return 1

  @property
  def init_length(self) -> int:
    """Length of the dummy sequence parameters are initialised with."""
    return 8

  @property
  def packing(self) -> str:
    """How `bt_jax.data` packs training sequences for this kind."""
    return "plain"

  @property
  def stack(self) -> StackConfig:
    return StackConfig(
      num_layers=self.num_layers,
      width=self.width,
      head_dim=self.head_dim,
      mlp_ratio=self.mlp_ratio,
      rotary_pct=self.rotary_pct,
      rotary_base=self.rotary_base,
      layer_norm_eps=self.layer_norm_eps,
    )


@dataclasses.dataclass(frozen=True)
class BlockConfig(_CommonConfig):
  """A Block Transformer: embedder -> block decoder -> token decoder."""

  block_len: int = 4
  block_layers: int = 3
  block_width: int = 256
  token_layers: int = 3
  token_width: int = 256
  prefix_len: int = 2
  embedder: str = "lookup"
  token_decoder: str = "prefix"
  encoder_layers: int = 3  # `encoder` embedder only
  encoder_width: int = 256
  bos_id: int = 0  # `summation` / `cross_attention` start token
  # Zero-shot / log-likelihood scoring without the L-1 left pads (block_len
  # tokens of real context fill block 0, which is never scored). The released
  # official checkpoints of >= 300M parameters were trained without the random
  # left pad and are scored this way (docs/convert.md).
  eval_no_pad: bool = False

  def __post_init__(self):
    self._validate_common()
    _check_positive("block_len", self.block_len)
    _check_positive("prefix_len", self.prefix_len)
    _check_choice("embedder", self.embedder, EMBEDDERS)
    _check_choice("token_decoder", self.token_decoder, TOKEN_DECODERS)
    if self.embedder == "lookup" and self.block_width % self.block_len:
      raise ValueError(
        f"the lookup embedder needs block_width divisible by block_len: block_width "
        f"{self.block_width} is not divisible by block_len {self.block_len} (valid block_len "
        f"values divide {self.block_width}; or use embedder='projection')"
      )
    if self.max_len % self.block_len:
      raise ValueError(f"max_len {self.max_len} is not a multiple of block_len {self.block_len}")
    self.block_stack, self.token_stack  # validate
    if self.embedder == "encoder":
      self.encoder_stack

  @property
  def kind(self) -> str:
    return "block"

  @property
  def tokens_per_step(self) -> int:
    """Tokens one decode step makes: one block."""
    return self.block_len

  @property
  def first_scored_position(self) -> int:
    """Block 0 is context only, never a target."""
    return self.block_len

  @property
  def first_eval_position(self) -> int:
    """The first token position `bt_jax.models.token_logprobs` scores: 1 (the
    L-1 left pads of evaluation make every real token after the first a
    target), or block_len with `eval_no_pad` (block 0 is never a target)."""
    return self.block_len if self.eval_no_pad else 1

  @property
  def init_length(self) -> int:
    return 2 * self.block_len

  @property
  def packing(self) -> str:
    return "block"

  @property
  def num_blocks(self) -> int:
    return self.max_len // self.block_len

  @property
  def block_stack(self) -> StackConfig:
    return StackConfig(num_layers=self.block_layers, width=self.block_width)

  @property
  def token_stack(self) -> StackConfig:
    return StackConfig(num_layers=self.token_layers, width=self.token_width)

  @property
  def encoder_stack(self) -> StackConfig:
    return StackConfig(num_layers=self.encoder_layers, width=self.encoder_width)

  @property
  def token_decoder_len(self) -> int:
    """Positions the token decoder runs over for one block."""
    if self.token_decoder == "prefix":
      return self.prefix_len + self.block_len - 1
    return self.block_len

  @property
  def num_expanded(self) -> int:
    """Vectors the expansion layer makes from one context embedding."""
    return self.prefix_len if self.token_decoder == "prefix" else self.block_len


ModelConfig = Union[VanillaConfig, BlockConfig]
