"""bt_jax.cli and what every binary gets from it: --help exits 0 and lists the
flags; a user error is one line on stderr with exit status 2 and changes
nothing; a bug keeps its traceback; benchmark JSON is written atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from bt_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "eval", "fixtures")


def _run(args, timeout=300, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def _listing(folder):
  return sorted(
    (os.path.relpath(os.path.join(d, f), folder), os.path.getmtime(os.path.join(d, f)))
    for d, _, files in os.walk(folder)
    for f in files
  )


def _assert_user_error(proc, *fragments):
  assert proc.returncode == cli.USER_ERROR_EXIT_STATUS, (proc.returncode, proc.stderr[-3000:])
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


# (module, a flag its --help must list): every binary of the package.
BINARIES = [
  ("bt_jax.train", "--workdir"),
  ("bt_jax.generate", "--no_echo"),
  ("bt_jax.eval_zero_shot", "--out"),
  ("bt_jax.eval_perplexity", "--out_dir"),
  ("bt_jax.model_summary", "--gin_file"),
  ("bt_jax.train_drafter", "--workdir"),
  ("bt_jax.data.prepare_tfds", "--input_glob"),
  ("experiments.throughput", "--out"),
  ("experiments.kernel_bench", "--out"),
  ("experiments.tree_vs_ring", "--out"),
  ("experiments.redrafter_bench", "--out"),
  ("experiments.plot_training", "--out"),
  ("experiments.report", "--root"),
  ("experiments.drafter_cost", "--batch_sizes"),
  ("bt_jax.convert", "--workdir"),
  ("experiments.sweep", "--sweep"),
  ("experiments.peer_bench", "--models"),
  ("experiments.uptrain_vs_scratch", "--out"),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, flag", BINARIES)
def test_help_exits_0_and_lists_the_flags(module, flag):
  proc = _run(["-m", module, "--help"])
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  assert flag in proc.stdout, proc.stdout[-2000:]


_TOY = textwrap.dedent("""
    import sys
    from absl import flags
    from bt_jax import cli

    def define_flags(flag_values):
      flags.DEFINE_string("path", None, "A path.", flag_values=flag_values)

    def main(flag_values):
      if flag_values.path == "bug":
        raise ValueError("a bug")
      if flag_values.path == "missing":
        open("/no/such/file")
      raise cli.UserError(f"--path {flag_values.path!r} is bad; give a good one")

    cli.run(main, define_flags)
""")


@pytest.mark.parametrize(
  "args, status, stderr",
  [
    (["--path", "x"], 2, "error: --path 'x' is bad; give a good one\n"),
    (["--path", "missing"], 2, "error: [Errno 2] No such file or directory: '/no/such/file'\n"),
    (["--bogus"], 2, "error: Unknown command line flag 'bogus' (see --help for the valid flags)\n"),
    (
      ["--path", "x", "stray"],
      2,
      "error: unexpected arguments ['stray']; every input is a --flag (see --help)\n",
    ),
  ],
)
def test_run_reports_user_errors_on_one_line(args, status, stderr):
  proc = _run(["-c", _TOY, *args], timeout=60)
  assert (proc.returncode, proc.stderr) == (status, stderr)


def test_run_keeps_tracebacks_for_bugs_and_verbose():
  bug = _run(["-c", _TOY, "--path", "bug"], timeout=60)
  assert bug.returncode == 1 and "Traceback" in bug.stderr and "ValueError: a bug" in bug.stderr
  verbose = _run(["-c", _TOY, "--path", "x", "--verbose"], timeout=60)
  assert verbose.returncode == 2 and "Traceback" in verbose.stderr
  assert verbose.stderr.endswith("error: --path 'x' is bad; give a good one\n")
  help_ = _run(["-c", _TOY, "--help"], timeout=60)
  assert help_.returncode == 0 and "--path" in help_.stdout


def test_write_json_atomic(tmp_path, monkeypatch):
  path = tmp_path / "a" / "b" / "report.json"
  cli.write_json_atomic(str(path), {"results": [1]})
  assert json.loads(path.read_text()) == {"results": [1]}

  def crash(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(json, "dump", crash)
  with pytest.raises(RuntimeError, match="disk full"):
    cli.write_json_atomic(str(path), {"results": [1, 2]})
  assert json.loads(path.read_text()) == {"results": [1]}  # the last whole file stays
  assert os.listdir(path.parent) == ["report.json"]  # no temporary left


def test_call_parses_a_fresh_flag_set():
  from experiments import tree_vs_ring  # pylint: disable=import-outside-toplevel

  flag_values = cli.parse(
    tree_vs_ring.define_flags, ["--contexts", "512,1024", "--kv_heads", "1", "--two_level", "2x4"]
  )
  config = tree_vs_ring.config_from_flags(flag_values)
  assert config["contexts"] == [512, 1024] and config["kv_heads"] == 1
  assert config["two_level"] == "2x4" and config["methods"] == list(tree_vs_ring.SHARDED_METHODS)
  for argv, message in [
    (["--contexts", "512,x"], "--contexts '512,x' must be comma-separated"),
    (["--two_level", "2by4"], "--two_level '2by4' must be NODESxLOCAL"),
    (["--methods", "tree,spiral"], r"--methods \['spiral'\] unknown"),
  ]:
    with pytest.raises(cli.UserError, match=message):
      tree_vs_ring.config_from_flags(cli.parse(tree_vs_ring.define_flags, argv))


_LIBTPU = (
  "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: libtpu.so: "
  "cannot open shared object file: No such file or directory"
)


def test_missing_libtpu_line_dropped_and_nothing_else():
  logger = logging.getLogger("jax._src.xla_bridge")
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  old_level, old_filters = logger.level, list(logger.filters)
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    cli.quiet_missing_libtpu()
    cli.quiet_missing_libtpu()  # idempotent
    assert len(logger.filters) == len(old_filters) + 1
    logger.info("Unable to initialize backend '%s': %s", "tpu", _LIBTPU.split(": ", 1)[1])
    kept = [
      "Unable to initialize backend 'tpu': ABORTED: The TPU is already in use by process "
      "with pid 17. Not attempting to load libtpu.so in this process.",
      "Unable to initialize backend 'rocm': module has no attribute 'GpuAllocatorConfig'",
    ]
    for message in kept:
      logger.info(message)
    warnings = [
      "An NVIDIA GPU may be present on this machine, but a CUDA-enabled jaxlib is not "
      "installed. Falling back to cpu.",
      _LIBTPU,
    ]  # a warning is never dropped
    for message in warnings:
      logger.warning(message)
    assert [r.getMessage() for r in records] == kept + warnings
  finally:
    logger.removeHandler(handler)
    logger.setLevel(old_level)
    logger.filters[:] = old_filters


_ABSL_JAX_START = textwrap.dedent("""
    from absl import app
    def main(argv):
      import jax
      print(jax.devices())
    app.run(main)
""")


@pytest.mark.slow
def test_binaries_start_without_the_libtpu_line():
  """JAX_PLATFORMS unset, as a user runs them: JAX tries the TPU backend first."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env["PYTHONPATH"] = ROOT

  def run(args):
    return subprocess.run(
      [sys.executable, *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )

  plain = run(["-c", _ABSL_JAX_START])
  assert plain.returncode == 0, plain.stderr[-2000:]
  summary = run(
    ["-m", "bt_jax.model_summary", "--gin_file", "gin_configs/models/block_b4_tiny.gin"]
  )
  assert summary.returncode == 0 and "total" in summary.stdout.lower(), summary.stderr[-2000:]
  assert "libtpu" not in summary.stderr, summary.stderr[-2000:]
  if "Failed to open libtpu.so" not in plain.stderr:
    pytest.skip(
      "this machine's JAX logs no missing-libtpu line (a TPU machine, or "
      f"another JAX): {plain.stderr[-300:]!r}"
    )


# --- user errors of the real binaries: message, status 2, nothing changed ----


@pytest.fixture
def workdir(tmp_path):
  """A run folder whose content must not change."""
  folder = tmp_path / "run"
  folder.mkdir()
  (folder / "model_config.json").write_text("{}")
  return folder


def test_eval_zero_shot_missing_piqa_labels_before_the_checkpoint(workdir, tmp_path):
  data = tmp_path / "piqa"
  data.mkdir()
  shutil.copy(os.path.join(FIXTURES, "valid.jsonl"), data / "valid.jsonl")
  before = _listing(workdir)
  proc = _run(["-m", "bt_jax.eval_zero_shot", "--workdir", str(workdir), "--task", f"piqa={data}"])
  # The model_config.json is not a valid one: had the checkpoint been read
  # first, that would be the error.
  _assert_user_error(proc, "PIQA labels not found", str(data / "valid-labels.lst"))
  assert _listing(workdir) == before
  (data / "valid-labels.lst").write_bytes(b"0\n\xff\n1\n")
  proc = _run(["-m", "bt_jax.eval_zero_shot", "--workdir", str(workdir), "--task", f"piqa={data}"])
  _assert_user_error(proc, str(data / "valid-labels.lst"), "is not UTF-8 text")
  assert _listing(workdir) == before


@pytest.mark.parametrize(
  "files, fragments",
  [
    ({"bad.txt": "caf\xe9".encode("latin-1")}, ["bad.txt is not UTF-8 text (byte 3"]),
    ({"d.jsonl": b'{"text": "ok"}\n{"text": broken\n'}, ["d.jsonl:2 is not valid JSON"]),
    ({"d.jsonl": b'{"text": "ok"}\n{"body": "x"}\n'}, ["d.jsonl:2 has no field 'text'"]),
    ({"e.jsonl": b"\n"}, ["hold no documents"]),
    ({}, ["no files match", "*.txt"]),
  ],
)
def test_eval_perplexity_bad_data(workdir, tmp_path, files, fragments):
  data = tmp_path / "data"
  data.mkdir()
  for name, content in files.items():
    (data / name).write_bytes(content)
  pattern = str(data / ("*" if files else "*.txt"))
  before = _listing(workdir)
  proc = _run(["-m", "bt_jax.eval_perplexity", "--workdir", str(workdir), "--data", pattern])
  _assert_user_error(proc, *fragments)
  assert _listing(workdir) == before


def test_eval_perplexity_bad_flags(workdir, tmp_path):
  before = _listing(workdir)
  proc = _run(
    [
      "-m",
      "bt_jax.eval_perplexity",
      "--workdir",
      str(workdir),
      "--data",
      "x",
      "--batch_size",
      "many",
    ]
  )
  _assert_user_error(proc, "--batch_size", "many")
  proc = _run(["-m", "bt_jax.eval_perplexity", "--workdir", str(workdir)])
  _assert_user_error(proc, "--data")
  assert _listing(workdir) == before


def test_prepare_tfds_bad_glob(tmp_path):
  from bt_jax.data import prepare_tfds  # pylint: disable=import-outside-toplevel

  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match="no files match .*nothing"):
    cli.call(
      prepare_tfds, ["--input_glob", str(tmp_path / "nothing*.txt"), "--data_dir", str(data_dir)]
    )
  with pytest.raises(cli.UserError, match="--name 'Bad-Name' must be snake_case"):
    cli.call(prepare_tfds, ["--input_glob", "x", "--data_dir", str(data_dir), "--name", "Bad-Name"])
  assert not data_dir.exists()


def test_plot_training_bad_labels(tmp_path):
  from experiments import plot_training  # pylint: disable=import-outside-toplevel

  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": oops}\n')
  with pytest.raises(cli.UserError, match=r"metrics.jsonl:2 is not valid JSON"):
    cli.call(plot_training, ["--workdir", str(tmp_path)])
  with pytest.raises(cli.UserError, match="got 2 --label values for 1 --workdir"):
    cli.call(plot_training, ["--workdir", str(tmp_path), "--label", "a", "--label", "b"])
  assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


@pytest.mark.slow
def test_eval_zero_shot_bad_record_names_file_and_line(workdir, tmp_path):
  data = tmp_path / "hellaswag_val.jsonl"
  with open(os.path.join(FIXTURES, "hellaswag_val.jsonl"), encoding="utf-8") as f:
    data.write_text(f.readline() + '{"ind": 3, "label": 1, "ctx_a": "x"}\n', encoding="utf-8")
  before = _listing(workdir)
  proc = _run(
    [
      "-m",
      "bt_jax.eval_zero_shot",
      "--workdir",
      str(workdir),
      "--task",
      f"hellaswag={data}",
      "--out",
      str(tmp_path / "out" / "zs.json"),
    ]
  )
  # model_config.json is "{}": the records were read before the checkpoint.
  _assert_user_error(
    proc, f"{data}:2 is not a valid HellaSwag record", "no field 'ctx_b'", "hellaswag_val.jsonl"
  )
  assert _listing(workdir) == before and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
  "bindings, fragments",
  [
    (
      ['data.corpus = "files:{data}/*"', 'data.validation_pattern = "{data}/*"'],
      ["the 'train' split of corpus 'files:", "has no text", "point data.corpus"],
    ),
    (["train.seq_len = 256"], ["train.seq_len=256 exceeds the model's max_len 64"]),
  ],
)
def test_train_empty_data_or_bad_binding_is_a_user_error(tmp_path, bindings, fragments):
  from tests.utils import TINY_RUN_GIN  # pylint: disable=import-outside-toplevel

  data = tmp_path / "data"
  data.mkdir()
  (data / "a.jsonl").write_text("\n")
  (data / "b.txt").write_text("  \n")
  (data / "c.jsonl").write_text('{"text": ""}\n')
  gin_file = tmp_path / "tiny.gin"
  gin_file.write_text(TINY_RUN_GIN)
  workdir = tmp_path / "run"
  args = ["-m", "bt_jax.train", "--gin_file", str(gin_file), "--workdir", str(workdir)]
  for binding in bindings:
    args += ["--gin_param", binding.format(data=data)]
  proc = _run(args)
  _assert_user_error(proc, *fragments)
  # Refused before anything was written: at most the (released) lock file.
  assert set(os.listdir(workdir)) <= {".lock"}, os.listdir(workdir)


def test_drafter_cost_out_folders_and_one_write_per_measurement(tmp_path, monkeypatch):
  """--out's folders are created and the JSON is rewritten after every
  measurement, so a crash keeps what was measured (weights and timings
  stubbed: no compile)."""
  from experiments import drafter_cost  # pylint: disable=import-outside-toplevel

  calls = []

  def timings(*args):
    calls.append(args)
    if len(calls) == 3:
      raise RuntimeError("crash at the third measurement")
    return {"draft_ms": 1.0, "verify_ms": 2.0, "decode_step_ms": 4.0}

  monkeypatch.setattr(drafter_cost, "_timings", timings)
  for name in ("init_params", "init_drafter"):  # weights only feed the timings
    monkeypatch.setattr(drafter_cost, name, lambda *args: None)
  out = tmp_path / "a" / "b" / "cost.json"
  with pytest.raises(RuntimeError, match="third measurement"):
    cli.call(
      drafter_cost,
      [
        "--width",
        "32",
        "--layers",
        "1",
        "--vocab",
        "64",
        "--max_len",
        "32",
        "--context",
        "8",
        "--beam_width",
        "2",
        "--draft_len",
        "2",
        "--batch_sizes",
        "1",
        "--out",
        str(out),
      ],
    )
  report = json.loads(out.read_text())
  assert len(report["results"]) == 2 and report["meta"]["batch_sizes"] == "1"
  assert report["results"][0]["draft_over_verify"] == 0.5
  for argv, message in [
    (["--batch_sizes", "1,x"], "--batch_sizes '1,x' must be"),
    (["--width", "16"], "width 16 is not divisible by head_dim"),
  ]:
    with pytest.raises(cli.UserError, match=message):
      cli.call(drafter_cost, argv + ["--out", str(tmp_path / "bad" / "x.json")])
  assert not (tmp_path / "bad").exists()
