"""Run "part index -> shard" workers on Ray Data: the one scale-out path of every data command.

``run_parts_on_ray(worker_cls, kwargs, todo, ...)``: ``ray.data.from_items(part indexes)
.map_batches(worker_cls, batch_size=1, compute=ActorPoolStrategy(size=n))``. ``worker_cls(**kwargs,
torch_threads=t)`` loads its models once; its ``__call__({"part": [i]})`` returns
``{"stats": [json of that part's statistics]}`` and does exactly what the local executor does for
part ``i`` (same function), so Ray and local runs write the same bytes.

Without ``ray_address`` an embedded local Ray starts (``num_cpus = num_workers``, no dashboard); with
``ray_address`` ("auto", "ray://...") it joins a cluster. On a cluster with GPUs there is one actor per
GPU (``num_gpus=1``, capped by ``num_workers``), otherwise ``num_workers`` CPU actors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def run_parts_on_ray(
    worker_cls: type,
    worker_kwargs: dict,
    todo: Sequence[int],
    desc: str,
    progress: bool = True,
    ray_address: str | None = None,
    num_workers: int | None = None,
    count_key: str = "images_in",
) -> list[dict]:
    """The statistics of every part in ``todo``; the bar counts ``stats[count_key]`` items per second."""
    import ray
    from tqdm.auto import tqdm

    started_here = False
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address)
        else:
            ray.init(num_cpus=max(1, num_workers or 1), include_dashboard=False, log_to_driver=False)
        started_here = True
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # our bar shows images per second instead
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if gpus:
            workers = min(num_workers, gpus) if num_workers else gpus
            per_actor = {"num_gpus": 1, "num_cpus": 1}
        else:
            workers, per_actor = max(1, num_workers or 1), {"num_cpus": 1}
        ds = ray.data.from_items([{"part": i} for i in todo], override_num_blocks=max(1, len(todo)))
        ds = ds.map_batches(
            worker_cls,
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            fn_constructor_kwargs={**worker_kwargs, "torch_threads": 1 if not gpus else 4},
            **per_actor,
        )
        results = []
        with tqdm(unit="img", desc=f"{desc} (ray, {workers} worker(s))", disable=not progress) as bar:
            for row in ds.iter_rows():
                st = json.loads(row["stats"])
                results.append(st)
                bar.update(st.get(count_key, 0))
                bar.set_postfix(parts=f"{len(results)}/{len(todo)}")
        return results
    finally:
        if started_here:
            ray.shutdown()
