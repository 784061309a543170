"""The workdir guards (bt_jax.workdir) and the stop request (bt_jax.run_utils)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from bt_jax import workdir as workdir_lib
from tests.utils import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPERATIVE = textwrap.dedent("""\
    from __gin__ import dynamic_registration
    import bt_jax.train
    # Parameters for BlockConfig:
    BlockConfig.block_len = 4
    BlockConfig.width_list = [
        1,
        2,
    ]
    BlockConfig.name = 'a # not a comment'

    # Parameters for train:
    train.steps = 100
    train.learning_rate = 0.001  # a comment
    train.log_every = 10
    """)


def _write_run(path, config=None, gin=OPERATIVE):
  os.makedirs(path, exist_ok=True)
  config = config or {"kind": "block", "config": {"block_len": 4, "width": 64, "remat": "none"}}
  with open(os.path.join(path, "model_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f)
  with open(os.path.join(path, "config.gin"), "w", encoding="utf-8") as f:
    f.write(gin)
  return json.dumps(config)


def test_parse_gin_bindings_joins_continuations_and_drops_comments():
  bindings = workdir_lib.parse_gin_bindings(OPERATIVE)
  assert bindings == {
    "BlockConfig.block_len": "4",
    "BlockConfig.width_list": "[ 1, 2, ]",
    "BlockConfig.name": "'a # not a comment'",
    "train.steps": "100",
    "train.learning_rate": "0.001",
    "train.log_every": "10",
  }


def test_same_run_with_more_steps_is_not_a_conflict(tmp_path):
  model_json = _write_run(tmp_path)
  longer = OPERATIVE.replace("train.steps = 100", "train.steps = 900").replace(
    "train.log_every = 10", "train.log_every = 50"
  )
  remat = json.loads(model_json)
  remat["config"]["remat"] = "full"  # computation only: may change on resume
  assert workdir_lib.run_differences(str(tmp_path), json.dumps(remat), longer) == []
  workdir_lib.check_same_run(str(tmp_path), model_json, longer)


def test_another_run_is_refused_naming_each_field_and_nothing_changes(tmp_path):
  _write_run(tmp_path)
  before = snapshot(tmp_path)
  new_model = json.dumps(
    {"kind": "block", "config": {"block_len": 8, "width": 64, "remat": "none"}}
  )
  new_gin = OPERATIVE.replace("0.001", "0.01").replace(
    "BlockConfig.block_len = 4", "BlockConfig.block_len = 8"
  )
  with pytest.raises(workdir_lib.WorkdirError) as info:
    workdir_lib.check_same_run(str(tmp_path), new_model, new_gin)
  message = str(info.value)
  assert "3 setting(s) differ" in message
  assert "model_config.json: block_len: this workdir has 4, the new run has 8" in message
  assert "config.gin: train.learning_rate: this workdir has 0.001, the new run has 0.01" in message
  assert "config.gin: BlockConfig.block_len" in message
  assert "--start_over" in message and "new --workdir" in message
  assert snapshot(tmp_path) == before


def test_another_model_kind_is_a_difference(tmp_path):
  _write_run(tmp_path)
  vanilla = json.dumps({"kind": "vanilla", "config": {"width": 64}})
  names = [d.name for d in workdir_lib.run_differences(str(tmp_path), vanilla, None)]
  assert names[0] == "kind" and "block_len" in names


def test_move_run_aside_keeps_every_file(tmp_path):
  _write_run(tmp_path)
  before = snapshot(tmp_path)
  target = workdir_lib.move_run_aside(str(tmp_path))
  assert os.path.basename(target).startswith("replaced-")
  assert snapshot(target) == before
  assert sorted(os.listdir(tmp_path)) == [os.path.basename(target)]


_HOLDER = textwrap.dedent("""\
    import sys, time
    from bt_jax.workdir import WorkdirLock
    lock = WorkdirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
    """)


@pytest.mark.slow
def test_lock_names_the_holder_and_dies_with_it(tmp_path):
  holder = subprocess.Popen(
    [sys.executable, "-c", _HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {holder.pid}"):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
    holder.wait(timeout=60)
  with workdir_lib.WorkdirLock(str(tmp_path)) as lock:
    with open(lock.path, encoding="utf-8") as f:
      assert f"pid {os.getpid()}" in f.read()
  # Disabled (processes > 0 of a multi-host run): takes nothing.
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with workdir_lib.WorkdirLock(str(tmp_path), enabled=False):
      pass


def _save_steps(tmp_path, steps):
  from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel

  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  for step in steps:
    params = {"w": np.full((64, 8), float(step), np.float32)}
    ckpt.save(step, params, {"step": np.int32(step)})
  ckpt.close()
  return checkpointing.checkpoint_dir(str(tmp_path))


def _restore_fn(tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  from bt_jax import checkpointing  # pylint: disable=import-outside-toplevel

  def restore(step):
    ckpt = checkpointing.Checkpointer(str(tmp_path), read_only=True, async_save=False)
    try:
      abstract = {"w": jax.ShapeDtypeStruct((64, 8), np.float32)}
      params, _ = ckpt.restore(step, abstract)
      return np.asarray(params["w"])
    finally:
      ckpt.close()

  return restore


def _damage(step_dir):
  """Truncates the largest file of a saved step (the array data)."""
  files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 3)
  return biggest


def test_damaged_newest_step_is_skipped_and_moved_aside(tmp_path):
  ckpt_dir = _save_steps(tmp_path, [10, 20])
  _damage(os.path.join(ckpt_dir, "20", "params"))
  restore = _restore_fn(tmp_path)
  steps = workdir_lib.existing_steps(ckpt_dir)
  assert steps == [10, 20]
  # --step at the damaged step: an error naming it and the newest good step; nothing moved.
  with pytest.raises(
    workdir_lib.CheckpointRestoreError,
    match=r"step 20 .* does not restore .*newest good step is 10",
  ):
    workdir_lib.restore_newest_good(ckpt_dir, steps, restore, step=20)
  assert workdir_lib.existing_steps(ckpt_dir) == [10, 20]
  step, w = workdir_lib.restore_newest_good(ckpt_dir, steps, restore)
  assert step == 10 and np.all(w == 10.0)
  assert workdir_lib.existing_steps(ckpt_dir) == [10]
  damaged = os.listdir(os.path.join(tmp_path, workdir_lib.DAMAGED_DIR))
  assert len(damaged) == 1 and damaged[0].startswith("20-")
  with open(
    os.path.join(tmp_path, workdir_lib.DAMAGED_DIR, damaged[0], "REASON"), encoding="utf-8"
  ) as f:
    assert f.read().strip()
  # A rerun does not trip on it again.
  assert workdir_lib.restore_newest_good(ckpt_dir, [10], restore)[0] == 10


def test_no_good_step_is_an_error(tmp_path):
  ckpt_dir = _save_steps(tmp_path, [5])
  _damage(os.path.join(ckpt_dir, "5", "params"))
  with pytest.raises(workdir_lib.CheckpointRestoreError, match="no checkpoint .* restores: 5"):
    workdir_lib.restore_newest_good(ckpt_dir, [5], _restore_fn(tmp_path), move_aside=False)


# A stand-in for a run: `busy` is a long call that releases the GIL and does not
# return to the program when a signal arrives (as XLA compiling does: the
# Python handler only sets the request), `loop` checks the request between steps.
_RUNNER = textwrap.dedent("""\
    import sys, time
    from bt_jax.run_utils import StopRequest
    mode = sys.argv[1]
    with StopRequest(exit_before_ready=True) as stop:
      if mode == "loop":
        stop.ready()
      print("started", flush=True)
      if mode == "loop":
        while not stop.requested.is_set():
          time.sleep(0.01)
        print("checkpointed and stopped", flush=True)
        sys.exit(0)
      if mode == "ready-busy":
        stop.ready()
      time.sleep(600)
    """)


def _start(mode):
  proc = subprocess.Popen(
    [sys.executable, "-c", _RUNNER, mode],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  assert proc.stdout.readline().strip() == "started"
  return proc


def _finish(proc, timeout=30):
  start = time.monotonic()
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    raise
  return proc.returncode, out, err, time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_during_first_compile_exits_at_once(signum):
  proc = _start("busy")
  time.sleep(0.2)
  proc.send_signal(signum)
  code, _, err, _ = _finish(proc)
  assert code == 0 and "before the first step" in err


@pytest.mark.slow
def test_ctrl_c_in_the_loop_checkpoints_and_exits_zero():
  proc = _start("loop")
  proc.send_signal(signal.SIGINT)
  code, out, err, _ = _finish(proc)
  assert code == 0, err
  assert "checkpointed and stopped" in out and "Traceback" not in err


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once():
  proc = _start("ready-busy")
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)  # first: a stop request the busy step cannot see yet
  time.sleep(0.5)
  assert proc.poll() is None
  proc.send_signal(signal.SIGINT)
  code, _, err, _ = _finish(proc)
  assert code == 130 and "second interrupt" in err


def test_tensorboard_scalars_are_grouped():
  from bt_jax.run_utils import tensorboard_tag  # pylint: disable=import-outside-toplevel

  assert [
    tensorboard_tag(k)
    for k in ("train_loss", "eval_loss", "learning_rate", "heldout_acc_0", "eval_loss_by_position")
  ] == [
    "train/loss",
    "eval/loss",
    "train/learning_rate",
    "eval/heldout_acc_0",
    "eval/loss_by_position",
  ]
