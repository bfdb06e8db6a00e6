"""Where a study's Tune trials and their work run: trial resources and concurrency.

One scheme for the laptop, a single GPU box and the autoscaling cluster (cluster.yaml):

- A Tune trial is a row's *driver*: it resolves the row, launches its stages and reports. It runs on
  the head node, always: its bundle holds a sliver of the custom `head` resource that only the head
  offers (`ray.head.default` in cluster.yaml and cluster-local.yaml; the local `ray.init`).
- The row's *work* runs in one of two places.
  (a) In the trial process itself (`in_process`): only on a single-node Ray, for a 1-worker row.
      The trial's one bundle then holds that worker's CPU (and GPU) as well, so Tune never starts
      more rows than the machine holds: {"CPU": cpus_per_worker, ("GPU": 1,) "head": 0.01}.
  (b) On a Ray Train TorchTrainer (`run_pipeline(..., force_ray=True)`) in every other case: a row of
      several workers, or any row once Ray spans (or can grow to) several nodes. A 1-worker row on
      a cluster is a 1-worker TorchTrainer: the head offers no CPU, so no work can run there, and
      a Train group's start-up (seconds) is nothing next to a row. The trial's bundle is then the
      driver alone, {"head": 0.01}.

Why the Train workers' bundles are not in the trial's placement group (Train V1's pattern): Ray
Train V2 reserves its workers in a placement group of its own, created by the TorchTrainer inside
the trial ({"CPU": cpus_per_worker, "GPU": 1} per worker, from `ScalingConfig`). Bundles reserved
by Tune as well would sit idle while the same GPUs were asked for a second time. That Train group
is the demand Ray's autoscaler sees: a pending group adds a worker node, a finished one lets it idle
out, and a group that lost a node is re-placed on a new one (Train's `FailureConfig`).
Why no CPU in the driver bundle: the head offers CPU 0 (so no work lands there) and a bundle with
CPU 0.01 would not fit on it.

Compute `multinode = is_multinode()` once, after connecting, and pass it to both `trial_resources`
and the trial (whether it calls `run_pipeline` with `force_ray`), so the two always agree. The
study script's own shared work (table1's tokenizer pretrain) follows the same rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray import tune

    from dmvae_study.config import ExperimentConfig

HEAD = "head"                 # custom resource offered by the head node only
DRIVER_SHARE = 0.01           # of `head` per trial driver: 100 drivers per head


def is_multinode() -> bool:
    """Whether the connected Ray spans, or can grow to, more than one node: more than one node is
    alive, or the node this process runs on offers no CPU (a head that only schedules, whose work
    goes to the worker nodes the autoscaler adds). Needs `ray.init` first."""
    import ray
    here = ray.get_runtime_context().get_node_id()
    alive = [n for n in ray.nodes() if n["Alive"]]
    mine = [n for n in alive if n["NodeID"] == here]
    return len(alive) > 1 or not mine or mine[0]["Resources"].get("CPU", 0) == 0


def in_process(cfg: ExperimentConfig, multinode: bool) -> bool:
    """Whether a row's stages run inside its trial process (else on a TorchTrainer, `force_ray`)."""
    return cfg.run.num_workers == 1 and not multinode


def worker_bundle(cfg: ExperimentConfig) -> dict[str, float]:
    """What one Train worker (or an in-process row) reserves."""
    return {"CPU": cfg.run.cpus_per_worker, **({"GPU": 1.0} if cfg.run.use_gpu else {})}


def driver_bundle(offers_head: bool = True) -> dict[str, float]:
    """A trial driver's reservation: a share of the head. Without a `head` resource (a cluster not
    started from this repository's configs) fall back to a sliver of CPU, placed anywhere."""
    return {HEAD: DRIVER_SHARE} if offers_head else {"CPU": DRIVER_SHARE}


def trial_resources(cfg: ExperimentConfig, multinode: bool | None = None,
                    offers_head: bool | None = None) -> tune.PlacementGroupFactory:
    """The Tune trial's placement group: one bundle, the driver's, plus the worker's own resources
    when the row runs in-process. `multinode` and `offers_head` default to the connected Ray's."""
    from ray import tune
    if multinode is None:
        multinode = is_multinode()
    if offers_head is None:
        import ray
        offers_head = ray.cluster_resources().get(HEAD, 0) > 0
    bundle = driver_bundle(offers_head)
    if in_process(cfg, multinode):
        bundle = {**worker_bundle(cfg), **({HEAD: DRIVER_SHARE} if offers_head else {})}
    return tune.PlacementGroupFactory([bundle])


def max_concurrency(cfg: ExperimentConfig, n_rows: int, multinode: bool | None = None,
                    cluster: dict[str, float] | None = None) -> int:
    """Tune's `max_concurrent_trials`. Multi-node: every row at once, so the autoscaler sees the
    whole demand (Train groups beyond the cluster's maximum wait for a node). Single node: the rows
    whose workers fit now (`cluster`: `ray.cluster_resources()`), so no Train group waits for
    resources that will never come. `run.max_concurrent_trials` > 0 caps both."""
    if multinode is None:
        multinode = is_multinode()
    n = n_rows
    if not multinode:
        if cluster is None:
            import ray
            cluster = ray.cluster_resources()
        if cfg.run.use_gpu:
            fits = cluster.get("GPU", 0) // cfg.run.num_workers
        else:
            fits = cluster.get("CPU", 0) // (cfg.run.num_workers * cfg.run.cpus_per_worker)
        n = min(n, int(fits))
    if cfg.run.max_concurrent_trials > 0:
        n = min(n, cfg.run.max_concurrent_trials)
    return max(n, 1)
