r"""Generate text from a training run's latest checkpoint, streaming it.

    python -m bt_jax.generate --workdir /tmp/run --prompt "Once upon a time" \
        --max_new_tokens 64 --temperature 0.8 --top_p 0.95 --seed 1

Loads the model, params and tokenizer with
`bt_jax.checkpointing.load_for_inference`, then runs the compiled prefill and
the compiled decode loop of `bt_jax.inference` in chunks of --chunk_tokens
tokens, printing the text as each chunk lands, after the prompt (unless
--no_echo). Generation stops at the tokenizer's EOS or after --max_new_tokens.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

from absl import flags

from bt_jax import cli

FLAGS = flags.FLAGS
DEFAULT_MAX_NEW_TOKENS = 256


def define_flags() -> None:
  """The binary's flags; defined when run as a program only, so that tests can
  import this module beside other binaries."""
  flags.DEFINE_string("workdir", None, "Training workdir (checkpoints, model config, tokenizer).")
  flags.DEFINE_string("prompt", None, "Prompt text.")
  flags.DEFINE_string("prompt_file", None, "File whose whole content is the prompt.")
  flags.DEFINE_integer(
    "max_new_tokens",
    None,
    "Most tokens to generate (default: the rest of the context, at most 256).",
  )
  flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("chunk_tokens", 16, "Tokens per compiled chunk between prints.")
  flags.DEFINE_integer(
    "sequence_devices",
    1,
    "Split the KV cache over this many devices (a `sequence` mesh axis; "
    "Tree Attention merges the per-device partials). 1 = unsharded.",
  )
  flags.DEFINE_string(
    "drafter",
    None,
    "A ReDrafter draft head (python -m bt_jax.train_drafter) for a vanilla "
    "run: speculative decoding, printed at the end with the base-model steps "
    "taken. --temperature 0: beam search and greedy verification (the same "
    "text as greedy decoding); otherwise --beam_width drafts sampled from the "
    "drafter and recursive rejection sampling (distributed as plain sampling).",
  )
  flags.DEFINE_integer(
    "beam_width",
    None,
    "Beams the draft head proposes per step "
    "(--drafter; default 4 at temperature 0, 1 when sampling).",
  )
  flags.DEFINE_bool("no_echo", False, "Print only the continuation, not the prompt before it.")


def read_prompt(prompt: Optional[str], prompt_file: Optional[str]) -> str:
  if (prompt is None) == (prompt_file is None):
    raise ValueError("give exactly one of --prompt and --prompt_file")
  if prompt_file is not None:
    try:
      with open(prompt_file, encoding="utf-8") as f:
        prompt = f.read()
    except FileNotFoundError as e:
      raise FileNotFoundError(f"prompt file {prompt_file!r} does not exist") from e
  if not prompt:
    raise ValueError(
      "the prompt is empty"
      + (f" (file {prompt_file!r})" if prompt_file else "")
      + "; give some text to continue"
    )
  return prompt


def stream_generate(
  workdir: str,
  prompt: str,
  *,
  max_new_tokens: Optional[int] = None,
  temperature: float = 0.8,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  step: Optional[int] = None,
  chunk_tokens: int = 16,
  sequence_devices: int = 1,
  drafter: Optional[str] = None,
  beam_width: Optional[int] = None,
  out: TextIO = sys.stdout,
  err: TextIO = sys.stderr,
  echo: bool = False,
) -> str:
  """Generates a continuation of `prompt`, writing it to `out` as it is made.

  max_new_tokens None: the rest of the context after the prompt, at most
  DEFAULT_MAX_NEW_TOKENS. sequence_devices > 1 shards the global KV cache over
  that many devices (`bt_jax.distributed.sharded_cache`). drafter: the
  folder of a ReDrafter draft head: speculative decoding (greedy at
  temperature 0: the same text as greedy decoding; speculative sampling
  otherwise), written when done, with its step count on `err`.
  echo: write the prompt to `out` first (once the inputs are checked).
  Returns the generated text (without the prompt). Raises FileNotFoundError for a missing
  checkpoint and ValueError for an empty prompt or one too long for the
  context, or a drafter that does not fit.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel

  # pylint: disable-next=import-outside-toplevel
  from bt_jax.inference import SamplingConfig, make_stream_fns, prepare_prompts, tokens_per_step

  if not prompt:
    raise ValueError("the prompt is empty; give some text to continue")
  sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
  if chunk_tokens < 1:
    raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens}")
  mesh = None
  if sequence_devices != 1:
    if not 1 <= sequence_devices <= jax.device_count():
      raise ValueError(
        f"sequence_devices={sequence_devices}, but there are "
        f"{jax.device_count()} devices; use 1 .. {jax.device_count()}"
      )
    from bt_jax.distributed import make_sequence_mesh  # pylint: disable=import-outside-toplevel

    mesh = make_sequence_mesh(sequence_devices)
  if step is None:
    model, params, tokenizer = checkpointing.load_for_inference(workdir)
  else:
    model, params, tokenizer = checkpointing.load_for_inference(workdir, step=step)
  config = model.config
  ids = tokenizer.encode(prompt)
  if not ids:
    raise ValueError(f"the prompt {prompt!r} encodes to no tokens; give some text to continue")
  block_len = config.tokens_per_step
  aligned = config.aligned_length(len(ids))
  if aligned >= config.max_len:
    raise ValueError(
      f"the prompt is {len(ids)} tokens long"
      + (f" ({aligned} padded to whole blocks)" if aligned != len(ids) else "")
      + f", which leaves no room in the model's context of max_len {config.max_len} "
      f"tokens; shorten it to at most {config.max_len - block_len} tokens"
    )
  if max_new_tokens is None:
    max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, config.max_len - aligned)
  batch = prepare_prompts([ids], config, max_new_tokens)  # checks prompt + new tokens
  if echo:
    out.write(prompt)
    out.flush()
  if drafter is not None:
    return _speculative(
      model,
      params,
      tokenizer,
      ids,
      drafter,
      beam_width,
      max_new_tokens,
      sampling,
      seed,
      out,
      err,
      mesh,
    )
  start, resume, finish = make_stream_fns(model, max_new_tokens, sampling, mesh=mesh)
  state = start(
    params,
    jnp.asarray(batch.tokens),
    jnp.asarray(batch.pad),
    jax.random.key(seed),
    tokenizer.eos_id,
  )
  per_step = tokens_per_step(model)
  chunk_steps = max(1, chunk_tokens // per_step)
  total_steps = config.num_steps(max_new_tokens)
  printed = ""
  steps_done = 0
  while steps_done < total_steps:
    state = resume(params, state, min(steps_done + chunk_steps, total_steps))
    new_steps = int(state["step"])
    result = finish(state)
    length = int(result.lengths[0])
    text = tokenizer.decode([int(t) for t in result.tokens[0, :length] if t != tokenizer.eos_id])
    # Hold back a trailing replacement char: a multi-byte character may be cut.
    stable = text.rstrip("\ufffd") if new_steps < total_steps else text
    if stable.startswith(printed) and len(stable) > len(printed):
      out.write(stable[len(printed) :])
      out.flush()
      printed = stable
    if new_steps == steps_done:  # every row finished (EOS)
      break
    steps_done = new_steps
  if not text.startswith(printed):  # a decode that changed earlier text: print the rest plainly
    out.write("\n" + text)
  out.write("\n")
  out.flush()
  return text


def _speculative(
  model,
  params,
  tokenizer,
  ids,
  drafter_dir,
  beam_width,
  max_new_tokens,
  sampling,
  seed,
  out,
  err,
  mesh=None,
) -> str:
  """Speculative decoding with a saved draft head (the KV cache split over
  `mesh`'s sequence axis when given); the text at the end."""
  # pylint: disable=import-outside-toplevel
  from bt_jax.models.vanilla import VanillaLM
  from bt_jax.redrafter import load_drafter, speculative_generate
  from bt_jax.redrafter.checkpoint import check_drafter_fits

  # pylint: enable=import-outside-toplevel
  if not isinstance(model, VanillaLM):
    raise ValueError(f"--drafter needs a vanilla base model; this run is {model.config.kind}")
  drafter, drafter_params, drafter_meta = load_drafter(drafter_dir)
  check_drafter_fits(drafter, model.config, drafter_meta.get("base_model"))
  result = speculative_generate(
    model,
    params,
    drafter,
    drafter_params,
    [ids],
    max_new_tokens=max_new_tokens,
    beam_width=beam_width,
    eos_id=tokenizer.eos_id,
    sampling=sampling,
    seed=seed,
    mesh=mesh,
  )
  length = int(result.lengths[0])
  text = tokenizer.decode([int(t) for t in result.tokens[0, :length] if t != tokenizer.eos_id])
  out.write(text + "\n")
  out.flush()
  steps = int(result.row_steps[0])
  err.write(
    f"speculative: {length} tokens in {steps} base-model steps "
    f"({length / max(steps, 1):.2f} tokens per step)\n"
  )
  return text


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}")
  if not FLAGS.workdir:
    raise cli.UserError("--workdir is required")
  try:
    prompt = read_prompt(FLAGS.prompt, FLAGS.prompt_file)
    stream_generate(
      FLAGS.workdir,
      prompt,
      max_new_tokens=FLAGS.max_new_tokens,
      temperature=FLAGS.temperature,
      top_k=FLAGS.top_k,
      top_p=FLAGS.top_p,
      seed=FLAGS.seed,
      step=FLAGS.step,
      chunk_tokens=FLAGS.chunk_tokens,
      sequence_devices=FLAGS.sequence_devices,
      drafter=FLAGS.drafter,
      beam_width=FLAGS.beam_width,
      echo=not FLAGS.no_echo,
    )
  except (FileNotFoundError, ValueError) as e:  # one line, exit status 2 (bt_jax.cli)
    raise cli.UserError(str(e)) from e


if __name__ == "__main__":
  from bt_jax import logging_utils  # pylint: disable=g-import-not-at-top

  logging_utils.quiet_orbax_logs()
  define_flags()
  cli.run(lambda _: main([sys.argv[0]]))  # --help exits 0; stray arguments are user errors
