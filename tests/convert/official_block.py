"""A PyTorch Block Transformer in the official code's module layout
(github.com/itsnamgyu/block-transformer: `BlockTransformer` with `embedder`,
`block_decoder`, `token_decoder`), built from transformers' GPT-NeoX modules,
with the official prefix forward. It is the reference the converted bt_jax
model must reproduce, and its state_dict() has the official tensor names."""

from __future__ import annotations

import torch
import transformers
from torch import nn


def neox_config(width: int, layers: int, vocab: int, max_len: int) -> transformers.GPTNeoXConfig:
  heads = width // 32 if width <= 256 else width // 64  # bt_jax's head_dim rule
  return transformers.GPTNeoXConfig(
    vocab_size=vocab,
    hidden_size=width,
    num_hidden_layers=layers,
    num_attention_heads=heads,
    intermediate_size=4 * width,
    rotary_pct=0.25,
    rotary_emb_base=10000,
    max_position_embeddings=max_len,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=0,
    hidden_act="gelu",
    attention_dropout=0.0,
    hidden_dropout=0.0,
  )


class OfficialBlockTransformer(nn.Module):
  """Lookup ("concat") or projection ("projection_layer") embedder, GPT-NeoX block
  and token decoders, Conv1d expansion layer, prefix decoding strategy."""

  def __init__(
    self,
    *,
    vocab: int = 512,
    max_len: int = 128,
    block_len: int = 4,
    prefix_len: int = 2,
    width: int = 64,
    layers: int = 2,
    embedder: str = "lookup",
  ):
    super().__init__()
    self.block_len, self.prefix_len, self.width = block_len, prefix_len, width
    self.embedder = nn.Module()
    if embedder == "lookup":
      self.embedder.embeddings = nn.Embedding(vocab, width // block_len)
    else:
      self.embedder.embeddings = nn.Embedding(vocab, width)
      self.embedder.projection_layer = nn.Conv1d(
        width, width, kernel_size=block_len, stride=block_len
      )
    self.block_decoder = nn.Module()
    self.block_decoder.gpt_neox = transformers.GPTNeoXModel(
      neox_config(width, layers, vocab, max_len // block_len)
    )
    self.token_decoder = transformers.GPTNeoXForCausalLM(neox_config(width, layers, vocab, max_len))
    self.token_decoder.expansion_layer = nn.Conv1d(width, prefix_len * width, kernel_size=1)

  def logprobs(self, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [batch, length] -> log p(token t | tokens < t) [batch, length - L] for t >= L."""
    batch, length = tokens.shape
    block_len, width = self.block_len, self.width
    blocks = tokens.view(batch, -1, block_len)
    num_blocks = blocks.shape[1]
    embedded = self.embedder.embeddings(blocks.reshape(-1, block_len))  # [B*N, L, d]
    if hasattr(self.embedder, "projection_layer"):
      embedded = self.embedder.projection_layer(embedded.transpose(1, 2)).transpose(1, 2)
    block_inputs = embedded.reshape(batch, num_blocks, width)
    context = self.block_decoder.gpt_neox(inputs_embeds=block_inputs).last_hidden_state
    context = context[:, :-1].reshape(-1, 1, width)  # [B*(N-1), 1, D]
    expanded = self.token_decoder.expansion_layer(context.transpose(1, 2)).transpose(1, 2)
    expanded = expanded.reshape(-1, self.prefix_len, width)  # prefix j = rows j*D..
    targets = blocks[:, 1:].reshape(-1, block_len)
    inputs = torch.cat([expanded, self.token_decoder.gpt_neox.embed_in(targets[:, :-1])], dim=1)
    hidden = self.token_decoder.gpt_neox(inputs_embeds=inputs).last_hidden_state
    head = self.token_decoder.get_output_embeddings()
    logits = head(hidden[:, self.prefix_len - 1 :]).double()
    logprobs = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    return logprobs.reshape(batch, length - block_len)

  def official_state_dict(self) -> dict[str, torch.Tensor]:
    """state_dict() with the official names: transformers 5 calls the GPT-NeoX
    head `lm_head`, the official code's transformers 4.x `embed_out`."""
    return {
      k.replace("token_decoder.lm_head.", "token_decoder.embed_out."): v.contiguous()
      for k, v in self.state_dict().items()
    }


def random_official(seed: int = 0, **kwargs) -> OfficialBlockTransformer:
  torch.manual_seed(seed)
  model = OfficialBlockTransformer(**kwargs).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model
