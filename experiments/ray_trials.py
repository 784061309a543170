"""Ray side of `experiments.sweep`: one actor per trial, one actor per host process.

A `TrialRunner` reserves the trial's hosts as one placement group (all hosts
or none: a half-started multi-host trial would wait forever in its first
collective), starts one `Host` actor per bundle, hands host 0's address to
every process as the `jax.distributed` coordinator, and waits. When one host
process fails the others are stopped (SIGTERM: the binary checkpoints and
exits), then killed after a grace period.

On Cloud TPU (`tpu_type="v4-16"`) the runner first takes the slice head
resource `TPU-v4-16-head` (one per slice, so two trials never share a slice),
reads the slice's name and host count on that host, and places one process on
each host of that slice (resource `<slice name>`, STRICT_SPREAD), the scheme
Ray documents for multi-host TPU jobs.

Elsewhere the hosts are bundles of `resources_per_host` with the SPREAD
strategy: separate nodes when the cluster has them (SLURM, GPU clusters),
one node when it does not (the 2-process CPU test).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from typing import Any, Optional

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

PEER_GRACE_S = 30.0  # the other hosts of a failed trial may sit in a collective
PLACEMENT_POLL_S = 1.0


def init(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
  """Joins `address`, or starts a small local Ray instance in this process."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  pythonpath = os.pathsep.join([repo] + [p for p in [os.environ.get("PYTHONPATH")] if p])
  runtime_env = {"env_vars": {"PYTHONPATH": pythonpath}}
  if address:
    ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
  else:
    # address="local": always a new instance, never a cluster found on this machine.
    ray.init(
      address="local",
      num_cpus=num_cpus or os.cpu_count(),
      object_store_memory=100 * 1024 * 1024,
      include_dashboard=False,
      runtime_env=runtime_env,
      log_to_driver=False,
    )


def shutdown() -> None:
  ray.shutdown()


def wait(refs, timeout: float):
  return ray.wait(refs, num_returns=1, timeout=timeout)


def result(ref) -> dict[str, Any]:
  """A runner's result, or the error that ended it."""
  try:
    return ray.get(ref)
  except Exception as e:  # pylint: disable=broad-except  (RayActorError, RayTaskError, ...)
    return {
      "returncodes": None,
      "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
    }


def request_stop(runner) -> None:
  runner.stop.remote()


def kill(actor) -> None:
  try:
    ray.kill(actor)
  except Exception:  # pylint: disable=broad-except  (already dead)
    pass


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("", 0))
    return s.getsockname()[1]


def _child_setup(niceness: Optional[int]):
  def setup() -> None:
    # The binary gets SIGTERM (and checkpoints) when its Host actor dies.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    # Ray starts its workers at nice 15; the binary runs at the sweep's own
    # priority where allowed (on a shared machine a niced trial starves).
    if niceness is not None:
      try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
      except OSError:
        pass

  return setup


def _actor_options(bundle: dict[str, float]) -> dict[str, Any]:
  bundle = dict(bundle)
  return {
    "num_cpus": bundle.pop("CPU", 0),
    "num_gpus": bundle.pop("GPU", 0),
    "resources": bundle or None,
  }


@ray.remote
class Host:
  """One process of a trial: runs the binary, forwards stop requests as SIGTERM."""

  def __init__(self):
    self.proc: Optional[subprocess.Popen] = None
    self.stopping = False

  def info(self) -> dict[str, Any]:
    return {
      "ip": ray.util.get_node_ip_address(),
      "port": _free_port(),
      "tpu_worker_id": int(os.environ.get("TPU_WORKER_ID", "0") or 0),
    }

  def run(
    self,
    args: list[str],
    env: dict[str, str],
    cwd: str,
    log_path: str,
    header: str,
    niceness: Optional[int] = None,
  ) -> int:
    if self.stopping:
      return -int(signal.SIGTERM)
    full_env = dict(os.environ)
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join(
      [cwd] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    with open(log_path, "a", encoding="utf-8") as log:
      log.write(f"\n===== {header} {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(args)}\n")
      log.flush()
      self.proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_child_setup(niceness),
      )
      return self.proc.wait()

  def pid(self) -> Optional[int]:
    return None if self.proc is None else self.proc.pid

  def stop(self, hard: bool = False) -> None:
    self.stopping = True
    if self.proc is not None and self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)


@ray.remote
class _SliceHead:
  """Holds a slice's head resource for the trial; says which slice it is."""

  def info(self) -> dict[str, Any]:
    from ray.util import tpu  # pylint: disable=g-import-not-at-top

    return {
      "pod": tpu.get_current_pod_name(),
      "hosts": tpu.get_current_pod_worker_count(),
      "chips": tpu.get_num_tpu_chips_on_node(),
    }


@ray.remote
class TrialRunner:
  """Runs one attempt of one trial on its hosts; `stop()` may be called meanwhile."""

  def __init__(self):
    self.hosts: list[Any] = []
    self.stopping = threading.Event()

  def _place(self, num_hosts: int, resources: dict[str, float], tpu_type: Optional[str]):
    """(placement group, bundles, extra actors to keep alive) for the trial's hosts."""
    keep = []
    if tpu_type:
      head = _SliceHead.options(num_cpus=0, resources={f"TPU-{tpu_type}-head": 1}).remote()
      keep.append(head)
      info = ray.get(head.info.remote())
      if info["hosts"] != num_hosts:
        raise RuntimeError(
          f"slice {info['pod']} ({tpu_type}) has {info['hosts']} hosts; the trial "
          f"asked for {num_hosts} (--num_hosts)"
        )
      bundles = [{info["pod"]: 1, "TPU": info["chips"]}] * num_hosts
      strategy = "STRICT_SPREAD"
    else:
      bundles = [dict(resources or {"CPU": 1})] * num_hosts
      strategy = "SPREAD"
    group = placement_group(bundles, strategy=strategy)
    while not self.stopping.is_set():  # waits for free resources; a stop request ends the wait
      ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_POLL_S)
      if ready:
        break
    return group, bundles, keep

  def run(
    self,
    trial: dict[str, Any],
    resources: dict[str, float],
    tpu_type: Optional[str],
    env: dict[str, str],
    working_dir: str,
    python: str,
    attempt: int,
    niceness: Optional[int] = None,
  ) -> dict[str, Any]:
    from experiments.sweep import Trial  # pylint: disable=g-import-not-at-top

    trial = Trial(**trial)
    group, keep = None, []
    try:
      group, bundles, keep = self._place(trial.num_hosts, resources, tpu_type)
      if self.stopping.is_set():
        return {"returncodes": None, "error": "stopped before it started"}
      self.hosts = [
        Host.options(
          max_concurrency=4,
          scheduling_strategy=PlacementGroupSchedulingStrategy(group, i),
          **_actor_options(bundle),
        ).remote()
        for i, bundle in enumerate(bundles)
      ]
      infos = ray.get([h.info.remote() for h in self.hosts])
      if tpu_type:  # process ids in the slice's worker order
        order = sorted(range(len(infos)), key=lambda i: infos[i]["tpu_worker_id"])
        self.hosts, infos = [self.hosts[i] for i in order], [infos[i] for i in order]
      coordinator = f"{infos[0]['ip']}:{infos[0]['port']}" if trial.num_hosts > 1 else None
      refs = []
      for i, host in enumerate(self.hosts):
        log = os.path.join(trial.workdir, "train.log" if i == 0 else f"train.host{i}.log")
        args = trial.command(python, coordinator=coordinator, process_id=i)
        refs.append(
          host.run.remote(
            args,
            env,
            working_dir,
            log,
            f"attempt {attempt}, host {i} of {trial.num_hosts}",
            niceness,
          )
        )
      return self._wait(refs)
    finally:
      for actor in self.hosts + keep:
        kill(actor)
      if group is not None:
        remove_placement_group(group)

  def _wait(self, refs) -> dict[str, Any]:
    codes: list[Optional[int]] = [None] * len(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    pending, error, deadline = list(refs), None, None
    while pending:
      ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
      for ref in ready:
        try:
          codes[index[ref]] = ray.get(ref)
        except Exception as e:  # pylint: disable=broad-except  (the host's node went away)
          error = f"host {index[ref]}: {type(e).__name__}"
          codes[index[ref]] = None
        if codes[index[ref]] != 0 and deadline is None and pending:
          # One host failed: its peers would wait in a collective. Stop them.
          for host in self.hosts:
            host.stop.remote()
          deadline = time.time() + PEER_GRACE_S
      if deadline is not None and time.time() > deadline and pending:
        for host in self.hosts:
          host.stop.remote(hard=True)
        deadline = time.time() + 3600
    return {"returncodes": codes, "error": error}

  def stop(self) -> None:
    """SIGTERM to every host process: each checkpoints and exits."""
    self.stopping.set()
    for host in self.hosts:
      host.stop.remote()

  def host_pids(self) -> list[Optional[int]]:
    return ray.get([h.pid.remote() for h in self.hosts])
