"""Moving tensors between pipeline stages; nothing here knows what a flow layer is.

* :mod:`.topology` -- which rank is which stage of which replica, and its process groups.
* :mod:`.transport` -- forward-only messages between neighbouring stages, with timeouts
  and byte counts.
* :mod:`.collectives` -- the few collectives (agree, broadcast, gather, gradient averaging)
  and :func:`.collectives.guard`, which turns a silent peer into one readable error.
* :mod:`.process_group` -- joining and leaving the process group, the same for launch and bench.

The training loop that drives them is :mod:`pipeflow.loop`.
"""
