"""Image-affinity request routing for the ``Segmenter`` deployment (a Ray Serve custom request router).

Every round on an image must reach the replica that holds the image's embedding. Each call names
its image with a ``sha256=`` keyword argument; the router ranks the replicas by **rendezvous
(highest-random-weight) hashing** of that sha256 with each replica's id and tries them in that
order, so

* every caller (the HTTP ingress, a backend holding a ``DeploymentHandle``, any process) picks the
  same primary replica for an image without sharing any state: the ranking is a pure function of
  (sha256, replica ids), computed with blake2b, not Python's per-process ``hash``;
* when replicas come or go (autoscaling, a crash), only the images of those replicas move (about
  1/n of them), the others keep their cache;
* a primary whose queue is full (``max_ongoing_requests``) is passed over for the next replica in
  the ranking (bounded load); that replica embeds the image too, and later rounds go back to the
  primary once it has room. When every replica is full the router backs off and tries again.

Calls without an image (``info``) go to the less loaded of two random replicas, like Serve's
default power-of-two-choices router.

Serve pickles this module **by value** into every process that routes to the deployment (the
proxy-side ingress replicas, backends with a handle), so it imports nothing from seemly.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

AFFINITY_KWARG = "sha256"


def affinity_key(pending_request: PendingRequest | None) -> str | None:
    """The image identity a request is routed by (its ``sha256=`` keyword argument), if any."""
    if pending_request is None:
        return None
    kwargs: dict[Any, Any] = pending_request.kwargs or {}
    value = kwargs.get(AFFINITY_KWARG)
    return value if isinstance(value, str) and value else None


def rendezvous_order(key: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` ranked for ``key``, best first (highest random weight)."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class ImageAffinityRouter(RequestRouter):
    """Rendezvous hashing of the request's image over the replicas (see the module doc)."""

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # One pass over the ranking is one attempt: back off before the next pass.
            pending_request.routing_context.should_backoff = True
        key = affinity_key(pending_request)
        if key is None:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica_id]] for replica_id in rendezvous_order(key, list(by_id))]
