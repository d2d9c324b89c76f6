"""Moving tensors between pipeline stages; nothing here knows what a flow layer is.

* :mod:`.topology` -- which rank is which stage of which replica, and its process groups.
* :mod:`.transport` -- forward-only messages between neighbouring stages, with timeouts
  and byte counts.
* :mod:`.pipeline` -- the by-parts phase: receive, train one part, send onwards.
* :mod:`.finetune` -- gathering the parts on every rank, then data-parallel fine-tuning.
"""
